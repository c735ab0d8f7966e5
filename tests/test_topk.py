"""toolkit.analysis.topk against a float64 brute force that materialises A, sorts rows and builds Â per level."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_attention

from toolkit.analysis import topk
from toolkit.errors import ToolkitError

MASSES = (0.5, 0.9, 0.95, 0.99)
SPARSITIES = (0.0, 0.1, 0.5, 0.7, 0.9, 0.95, 0.99)


def qkv(heads, n_q, n_k, d, seed, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, n_q, d, generator=g) * spread
    k = torch.randn(heads, n_k, d, generator=g)
    v = torch.randn(heads, n_k, d, generator=g)
    return q, k, v


def brute_force(q, k, v, scale, masses, sparsities):
    """Definitions of the module docstring, written out on the full float64 map (ties shared equally)."""
    a = dense_attention(q, k, scale=scale).probs  # h i j
    v = v.double()
    n_q, n = a.shape[-2:]
    desc = torch.sort(a, dim=-1, descending=True).values
    cum = desc.cumsum(-1)
    cover = torch.stack([(cum < p).sum(-1) + 1 for p in masses], dim=-1)
    res = {"coverage_keys": cover, "kept_mass": [], "map_mse": [], "map_rel_fro": [], "output_rel_l2": [],
           "output_cosine": []}
    av = a @ v
    for kept in topk.keep_counts(n, sparsities):
        t = desc[..., kept - 1 : kept]
        n_gt = (a > t).sum(-1, keepdim=True)
        n_eq = (a == t).sum(-1, keepdim=True)
        w = (a > t).double() + (a == t).double() * (kept - n_gt) / n_eq
        trunc = a * w
        renorm = trunc / trunc.sum(-1, keepdim=True)
        res["kept_mass"].append(trunc.sum(-1))
        per_variant = {"mse": [], "fro": [], "out": [], "cos": []}
        for approx in (renorm, trunc):  # order = topk.VARIANTS
            err = a - approx
            per_variant["mse"].append(err.square().mean(dim=(-1, -2)))
            per_variant["fro"].append(err.square().sum(dim=(-1, -2)).sqrt() / a.square().sum(dim=(-1, -2)).sqrt())
            out = approx @ v
            rel = (av - out).square().sum(dim=(-1, -2)).sqrt() / av.square().sum(dim=(-1, -2)).sqrt()
            per_variant["out"].append(rel)
            per_variant["cos"].append(torch.nn.functional.cosine_similarity(av, out, dim=-1).mean(-1))
        res["map_mse"].append(torch.stack(per_variant["mse"], -1))
        res["map_rel_fro"].append(torch.stack(per_variant["fro"], -1))
        res["output_rel_l2"].append(torch.stack(per_variant["out"], -1))
        res["output_cosine"].append(torch.stack(per_variant["cos"], -1))
    res["kept_mass"] = torch.stack(res["kept_mass"], -1)
    for name in ("map_mse", "map_rel_fro", "output_rel_l2", "output_cosine"):
        res[name] = torch.stack(res[name], dim=1)  # h L V
    return res


def assert_matches(got, ref, rtol, atol=1e-12):
    assert torch.equal(got["coverage_keys"], ref["coverage_keys"])
    torch.testing.assert_close(got["kept_mass"], ref["kept_mass"], rtol=rtol, atol=atol)
    for name in ("map_mse", "map_rel_fro", "output_rel_l2", "output_cosine"):
        torch.testing.assert_close(got[name], ref[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("query_chunk", [7, 30, None])
def test_float64_equals_brute_force(query_chunk):
    q, k, v = (t.double() for t in qkv(3, 30, 52, 16, seed=0))
    got = topk.topk_tensors(q, k, v, 0.3, masses=MASSES, sparsities=SPARSITIES, query_chunk=query_chunk)
    ref = brute_force(q, k, v, 0.3, MASSES, SPARSITIES)
    assert got["coverage_keys"].shape == (3, 30, 4) and got["map_mse"].shape == (3, len(SPARSITIES), 2)
    assert_matches(got, ref, rtol=1e-9)


@pytest.mark.parametrize("spread", [0.5, 4.0])
def test_float32_radix_equals_sort_and_brute_force(spread):
    # 300 keys so that boundary bins hold several entries; spread 4 gives peaked rows with tiny entries.
    q, k, v = qkv(2, 45, 300, 16, seed=1, spread=spread)
    sparsities = (0.0, 0.3, 0.5, 0.8, 0.9, 0.97, 0.99)
    radix = topk.topk_tensors(q, k, v, 0.25, masses=MASSES, sparsities=sparsities, query_chunk=16, method="radix")
    sort = topk.topk_tensors(q, k, v, 0.25, masses=MASSES, sparsities=sparsities, query_chunk=16, method="sort")
    for name in radix:
        torch.testing.assert_close(radix[name], sort[name], rtol=1e-12, atol=0, msg=name)
    ref = brute_force(q, k, v, 0.25, MASSES, sparsities)
    torch.testing.assert_close(radix["map_mse"], ref["map_mse"], rtol=2e-4, atol=1e-12)
    torch.testing.assert_close(radix["map_rel_fro"], ref["map_rel_fro"], rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(radix["output_rel_l2"], ref["output_rel_l2"], rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(radix["output_cosine"], ref["output_cosine"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(radix["kept_mass"], ref["kept_mass"], rtol=1e-5, atol=1e-6)
    # Coverage in float32 may differ from float64 only where the crossing is within rounding; allow no more
    # than a handful of off-by-one rows.
    diff = (radix["coverage_keys"] - ref["coverage_keys"]).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02


def test_select_radix_equals_select_sort_on_blocks():
    g = torch.Generator().manual_seed(2)
    # awkward values: exact zeros (underflow), exact ties, values > 1 bins apart
    p = torch.rand(4, 37, 211, generator=g) ** 6
    p[..., :20] = 0.0
    p[..., 50:60] = p[..., 49:50]  # a tie group of 11 equal values per row
    p[0, 3, :] = 0.25  # a constant row
    keep = topk.keep_counts(211, (0.0, 0.05, 0.5, 0.75, 0.9, 0.99))
    a = topk.select_radix(p, keep, MASSES)
    b = topk.select_sort(p, keep, MASSES)
    for field in ("threshold", "n_greater", "n_equal", "coverage_keys"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(a.n_equal[0, 3], torch.full((len(keep),), 211))


def test_ties_are_shared():
    # Duplicate keys give exactly equal logits; the shared-tie definition is brute-forced above.
    # Small multiples of 1/2 make every logit exact, so duplicated keys tie exactly.
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randint(-3, 4, (2, n, 8), generator=g).double() / 2 for n in (30, 40, 40))
    k[:, 20:] = k[:, :20]
    v[:, 20:] += 1.0  # duplicate keys carry different values, so the tie share shows in the output
    sparsities = (0.0, 0.025, 0.275, 0.525, 0.925)  # odd kept counts 40, 39, 29, 19, 3 split a tied pair
    keep = topk.keep_counts(40, sparsities)
    assert keep == [40, 39, 29, 19, 3]
    p = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1)
    sel = topk.select_sort(p, keep, MASSES)
    split = (sel.n_greater < torch.tensor(keep)) & (sel.n_greater + sel.n_equal > torch.tensor(keep))
    assert split[..., 1:].double().mean() > 0.5  # most rows share a tie group at the threshold
    got = topk.topk_tensors(q, k, v, 0.5, masses=MASSES, sparsities=sparsities, query_chunk=11)
    assert_matches(got, brute_force(q, k, v, 0.5, MASSES, sparsities), rtol=1e-9)


def test_zero_at_sparsity_zero_and_monotone():
    q, k, v = qkv(3, 30, 52, 16, seed=4)
    sparsities = tuple(i / 20 for i in range(20))
    got = topk.topk_tensors(q, k, v, 0.3, sparsities=sparsities)
    for name in ("map_mse", "map_rel_fro", "output_rel_l2"):
        assert torch.all(got[name][:, 0] == 0), name
    assert torch.all(got["output_cosine"][:, 0] > 1 - 1e-9)
    assert torch.all(got["kept_mass"][..., 0] == 1)
    # Truncation only ever removes entries: its map error and the kept mass are monotone in sparsity.
    trunc = got["map_mse"][..., topk.VARIANTS.index("truncated")]
    assert torch.all(trunc.diff(dim=1) >= 0) and torch.all(trunc[:, -1] > 0)
    assert torch.all(got["kept_mass"].diff(dim=-1) <= 0)
    assert torch.all(got["coverage_keys"].diff(dim=-1) >= 0)


def test_without_v_only_map_metrics():
    q, k, _ = qkv(2, 10, 30, 8, seed=5)
    got = topk.topk_tensors(q, k, None, 0.3)
    assert "output_rel_l2" not in got and got["map_mse"].shape == (2, len(topk.SPARSITIES), 2)


@pytest.mark.parametrize("masses, sparsities", [((0.0,), (0.5,)), ((1.0,), (0.5,)), ((0.5,), (1.0,)),
                                                ((0.5,), (-0.1,))])
def test_impossible_levels(masses, sparsities):
    q, k, v = qkv(1, 4, 8, 4, seed=6)
    with pytest.raises(ToolkitError, match="impossible"):
        topk.topk_tensors(q, k, v, 1.0, masses=masses, sparsities=sparsities)
