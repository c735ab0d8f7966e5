"""Monarch error sweeps: values against direct float64 computations, structure, Dataset layout, capture wrapper."""

import math
from types import SimpleNamespace

import pytest
import torch

from toolkit.analysis import topk
from toolkit.analysis.monarch import (
    MonarchOptions,
    analyze,
    analyze_record,
    default_layouts,
    parse_layout,
    resolve_layouts,
    tiling_sweep_layouts,
)
from toolkit.analysis.records import RecordSelection, RecordTensors
from toolkit.attention.monarch import variational
from toolkit.capture.reader import RecordKey
from toolkit.errors import SelectionError, ToolkitError
from toolkit.grid import MonarchLayout, TokenGrid

GRID = TokenGrid(6, 6, 10)
TPF = GRID.tokens_per_frame
F64 = torch.float64


def rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def kv_record(seed=0, heads=2, d=8):
    """A KV-cache record: queries = chunk 1 (frames 3..6), keys = frames 0..6."""
    q, k, v = rand(heads, 3 * TPF, d, seed=seed, scale=1.5), rand(heads, 6 * TPF, d, seed=seed + 1, scale=1.5), rand(
        heads, 6 * TPF, d, seed=seed + 2)
    return q, k, v, torch.arange(3 * TPF, 6 * TPF), torch.arange(6 * TPF)


def dense_errors(p, m, v):
    return dict(map_mse=((p - m) ** 2).mean((-1, -2)), rel_fro=((p - m).norm(dim=(-1, -2)) / p.norm(dim=(-1, -2))),
                out_rel_l2=((p - m) @ v).norm(dim=(-1, -2)) / (p @ v).norm(dim=(-1, -2)))


def test_sweep_values_match_direct_computation():
    q, k, v, qt, kt = kv_record(seed=1)
    scale = 0.6
    layouts = [MonarchLayout.aligned(GRID, "fh,w", (1, 2, 1)), MonarchLayout.aligned(GRID, "hw,f", (3, 1, 2)),
               MonarchLayout.contiguous(GRID, 15, 12)]
    t = RecordTensors(q=q, k=k, v=v, query_tokens=qt, key_tokens=kt, grid=GRID, scale=scale, heads=[4, 7])
    ds = analyze_record(t, MonarchOptions(layouts=layouts, iters=2))
    assert dict(ds.sizes) == {"head": 2, "config": 3, "iters": 2, "variant": 2}
    assert ds["head"].values.tolist() == [4, 7] and ds.iters.values.tolist() == [1, 2]
    s = q @ k.transpose(-1, -2) * scale
    p = torch.softmax(s, -1)
    lse = torch.logsumexp(s, -1)
    for c, lay in enumerate(layouts):
        assert ds.effective_sparsity.values[c] == pytest.approx(1 - (lay.b1 + lay.b2) / (lay.b1 * lay.b2))
        # projection: against the float64 SVD of every slice (the Frobenius optimum)
        _, qtok = lay.tiles_of_frames((3, 6))
        _, ktok = lay.tiles_of_frames((0, 6))
        x = p[:, qtok.flatten()][:, :, ktok.flatten()].unflatten(1, qtok.shape).unflatten(-1, ktok.shape)
        sv = torch.linalg.svdvals(x.permute(0, 1, 3, 4, 5, 2, 6))
        best = sv[..., 1:].square().sum((-1, -2, -3, -4, -5))
        torch.testing.assert_close(torch.from_numpy(ds.projection_map_mse.values[:, c]), best / p[0].numel())
        # variational after T iterations: a separate T-iteration run, errors from its dense map
        for t in (1, 2):
            _, fac = variational(q, k, v, lay, query_frames=(3, 6), key_frames=(0, 6), iters=t, scale=scale)
            m = fac.dense()
            for name, val in dense_errors(p, m, v).items():
                got = torch.from_numpy(ds[f"variational_{name}"].values[:, c, t - 1])
                torch.testing.assert_close(got, val, rtol=1e-9, atol=0)
            kl = (m * (torch.log(m) - torch.log(p))).sum(-1).mean(-1)  # mean KL(M_row || P_row)
            torch.testing.assert_close(torch.from_numpy(ds.variational_kl.values[:, c, t - 1]), kl, rtol=1e-8, atol=0)
        # the projection lower-bounds every variational map error
        assert (ds.projection_map_mse.values[:, c, None] <= ds.variational_map_mse.values[:, c] * (1 + 1e-12)).all()
    assert (ds.variational_kl.diff("iters") <= 1e-12).all()  # objective non-decreasing = KL non-increasing
    # top-k at the same parameter count: the top-k analysis at sparsity = effective sparsity
    ref = topk.topk_tensors(q, k, v, scale, lse, masses=(0.95,), sparsities=tuple(ds.effective_sparsity.values))
    for c in range(3):
        torch.testing.assert_close(torch.from_numpy(ds.topk_map_mse.values[:, c]), ref["map_mse"][:, c])
        torch.testing.assert_close(torch.from_numpy(ds.topk_out_rel_l2.values[:, c]), ref["output_rel_l2"][:, c])
    assert ds.projection_rel_fro.attrs["units"] == "1" and "long_name" in ds.topk_rel_fro.attrs
    assert (ds.attrs["query_start_frame"], ds.attrs["query_end_frame"]) == (3, 6) and ds.attrs["n_keys"] == 6 * TPF


def test_sweep_separable_record_aligned_vs_misaligned():
    """A separable positional map d_f ⊗ d_h ⊗ d_w (scale 1, one-hot queries): aligned ≈ 0, contiguous controls not."""
    logs = [torch.log_softmax(rand(n, n, seed=10 + i), -1) for i, n in enumerate(GRID)]
    f, h, w = GRID.coords(torch.arange(GRID.n_tokens))
    onehot = lambda idx, n: torch.nn.functional.one_hot(idx, n).to(F64)  # noqa: E731
    q = torch.cat([onehot(f, 6), onehot(h, 6), onehot(w, 10)], -1)[None, 3 * TPF:]
    k = torch.cat([logs[0][:, f].T, logs[1][:, h].T, logs[2][:, w].T], -1)[None]
    t = RecordTensors(q=q, k=k, query_tokens=torch.arange(3 * TPF, 6 * TPF), key_tokens=torch.arange(6 * TPF),
                      grid=GRID, scale=1.0)
    ds = analyze_record(t, MonarchOptions(iters=1, topk_baseline=False))
    aligned = ds.aligned.values
    assert aligned.any() and (~aligned).any()
    assert (ds.projection_rel_fro.values[:, aligned] < 1e-7).all()
    assert (ds.projection_rel_fro.values[:, ~aligned] > 1e-3).all()
    assert "projection_out_rel_l2" in ds and math.isnan(ds.projection_out_rel_l2.values[0, 0])  # no V given


def test_block_causal_sweep_and_errors():
    q, k, v = rand(1, GRID.n_tokens, 8, seed=20), rand(1, GRID.n_tokens, 8, seed=21), rand(1, GRID.n_tokens, 8, seed=22)
    tok = torch.arange(GRID.n_tokens)
    mask = (tok[None] // (3 * TPF)) <= (tok[:, None] // (3 * TPF))
    lse = torch.logsumexp((q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, -math.inf), -1)
    lay = MonarchLayout.aligned(GRID, "fh,w", (3, 2, 1))
    rec = dict(q=q, k=k, v=v, query_tokens=tok, key_tokens=tok, grid=GRID, scale=0.5)
    ds = analyze_record(RecordTensors(**rec, lse=lse), MonarchOptions(layouts=[lay], iters=2, block_causal_frames=3))
    assert "topk_map_mse" not in ds  # top-k ranks all keys of a row: not defined under the mask
    p = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, -math.inf), -1)
    _, fac = variational(q, k, v, lay, iters=2, scale=0.5, block_causal_frames=3)
    torch.testing.assert_close(torch.from_numpy(ds.variational_rel_fro.values[:, 0, 1]),
                               dense_errors(p, fac.dense(), v)["rel_fro"], rtol=1e-9, atol=0)
    assert ds.variational_map_mse.values[0, 0, 1] == pytest.approx(((p - fac.dense()) ** 2).sum() / mask.sum())
    with pytest.raises(ToolkitError, match="lse"):
        analyze_record(RecordTensors(**rec), MonarchOptions(layouts=[lay], block_causal_frames=3))
    with pytest.raises(ToolkitError, match="whole frames"):  # strided query capture
        analyze_record(RecordTensors(**{**rec, "q": q[:, ::2], "query_tokens": tok[::2]}))
    with pytest.raises(ToolkitError, match="straddle"):  # 3-frame tiles vs a query range starting at frame 1
        analyze_record(RecordTensors(**{**rec, "q": q[:, TPF:4 * TPF], "query_tokens": tok[TPF:4 * TPF]}),
                       MonarchOptions(layouts=[lay]))


def test_default_layouts_and_parse():
    names = [lay.name for lay in default_layouts(GRID, (3, 6), (0, 6))]
    assert "fh,w (1,1,1)" in names and "fh,w (1,2,1)" in names and "hw,f (3,1,1)" in names
    assert not any(n.endswith("(6,1,1)") for n in names)  # 6-frame tiles do not fit a 3-frame chunk
    assert any(n.startswith("contiguous") for n in names)
    bidir = [lay.name for lay in default_layouts(GRID)]
    assert "fh,w (6,1,1)" in bidir and "f,hw (6,1,1)" in bidir
    for lay in default_layouts(GRID, (3, 6), (0, 6)):
        lay.tiles_of_frames((3, 6))  # every default fits
        if lay.base is None:  # the controls really are misaligned: tiles cut rows
            assert lay.b2 % GRID.width and GRID.width % lay.b2
    assert parse_layout("hw,f:3,2,1", GRID).name == "hw,f (3,2,1)"
    assert parse_layout("contiguous:12x15", GRID).b2 == 15
    for bad in ("fh,w:1,2", "contiguous:12", "fh,w:1,4,1", "hwf:1,1,1"):
        with pytest.raises(ToolkitError):
            parse_layout(bad, GRID)


def test_layout_presets():
    """fh,w:all at 480p (last chunk vs the whole cache) holds the Fig. 1 sweep points of ``docs/monarch.md``
    "Configurations"."""
    lays = tiling_sweep_layouts((21, 30, 52), (18, 21), (0, 21))
    shapes = {(lay.b1, lay.b2) for lay in lays}
    for point in [(2, 2), (5, 4), (15, 4), (6, 13), (15, 13), (30, 13), (15, 26), (30, 26), (30, 52), (90, 26),
                  (45, 52), (90, 52)]:
        assert point in shapes
    sparsity = [lay.effective_sparsity for lay in lays]
    assert sparsity == sorted(sparsity) and min(lay.tiling[0] for lay in lays) == 1
    assert all(lay.tiling[0] in (1, 3) for lay in lays)  # tiles never straddle the 3-frame query chunk
    both = resolve_layouts(["fh,w:1,2,1", "default", "fh,w:all"], GRID, (3, 6), (0, 6))
    names = [lay.name for lay in both]
    assert names[0] == "fh,w (1,2,1)" and len(names) == len(set(names))
    assert set(names) == {lay.name for lay in default_layouts(GRID, (3, 6), (0, 6))} | {
        lay.name for lay in tiling_sweep_layouts(GRID, (3, 6), (0, 6))}


class FakeRecord:
    """The parts of ``toolkit.capture.reader.Record`` the analysis reads (no V stored)."""

    def __init__(self, step, chunk, layer, seed):
        self.step, self.chunk, self.layer, self.timestep, self.scale = step, chunk, layer, 500.0, 0.5
        self.is_clean, self.heads = False, [0, 3]
        self.query_frames, self.key_frames = (3 * chunk, 3 * chunk + 3), (0, 3 * chunk + 3)
        self.query_tokens = torch.arange(3 * chunk * TPF, (3 * chunk + 3) * TPF)
        self.key_tokens = torch.arange((3 * chunk + 3) * TPF)
        self.grid = tuple(GRID)
        n_q, n_k = len(self.query_tokens), len(self.key_tokens)
        self._t = dict(q=rand(2, n_q, 4, seed=seed), k=rand(2, n_k, 4, seed=seed + 1))

    def _get(self, name, heads, device):
        return self._t[name][[self.heads.index(h) for h in (heads or self.heads)]].float().to(device)

    def q(self, heads=None, device=None):
        return self._get("q", heads, device)

    def k(self, heads=None, device=None):
        return self._get("k", heads, device)

    def lse(self, heads=None, device=None):
        return torch.logsumexp(self.q(heads, device) @ self.k(heads, device).transpose(-1, -2) * self.scale, -1)


def fake_capture():
    recs = {(s, c, 2): FakeRecord(s, c, 2, seed=10 * s + c) for s in (0, 1) for c in (0, 1)}
    return SimpleNamespace(records=[RecordKey(*key) for key in recs], grid=tuple(GRID), heads=[0, 3],
                           stored=["q", "k", "lse"], complete=True, path="x.h5",
                           record=lambda s, c, l: recs[(s, c, l)]), recs


def test_analyze_stacks_records():
    cap, recs = fake_capture()
    ds = analyze(cap, RecordSelection(steps=[1], heads=[3]),
                 MonarchOptions(layouts=("fh,w:1,2,1", "contiguous:12x15"), iters=2), device="cpu", progress=False)
    assert dict(ds.sizes) == {"record": 2, "head": 1, "config": 2, "iters": 2, "variant": 2}
    assert ds["step"].values.tolist() == [1, 1] and ds["chunk"].values.tolist() == [0, 1]
    assert ds["query_start_frame"].values.tolist() == [0, 3]  # differs between records: a record coordinate
    assert ds["head"].values.tolist() == [3]
    rec = recs[(1, 1, 2)]
    one = analyze_record(RecordTensors(q=rec.q([3]), k=rec.k([3]), lse=rec.lse([3]), query_tokens=rec.query_tokens,
                                       key_tokens=rec.key_tokens, grid=GRID, scale=0.5, heads=[3]),
                         MonarchOptions(layouts=[parse_layout("fh,w:1,2,1", GRID), parse_layout("contiguous:12x15",
                                                                                                GRID)], iters=2))
    assert ds.isel(record=1).projection_rel_fro.values.tolist() == one.projection_rel_fro.values.tolist()
    # defaults: only layouts that fit every selected record (chunk 0 and chunk 1)
    ds = analyze(cap, RecordSelection(chunks=[0, 1], steps=[0], heads=[0]),
                 MonarchOptions(iters=0, topk_baseline=False), progress=False)
    assert "fh,w (1,1,1)" in ds.config.values and "variational_map_mse" not in ds
    with pytest.raises(SelectionError):
        analyze(cap, RecordSelection(layers=[5]), progress=False)
