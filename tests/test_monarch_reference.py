"""Reference MonarchAttention and exact projection, float64, on awkward small grids."""

import itertools
import math

import pytest
import torch
from conftest import dense_attention

from toolkit.attention.monarch import (
    _tile_groups,
    exact_projection,
    map_errors,
    monarch_attention,
    monarch_backend,
    rank1,
    variational,
)
from toolkit.errors import ToolkitError
from toolkit.grid import ALIGNED_BASES, MonarchLayout, TokenGrid
from toolkit.models.seam import AttentionContext

GRID = TokenGrid(6, 6, 10)  # 360 tokens, rows of 10 (not a power of two), 2 chunks of 3 frames
TPF = GRID.tokens_per_frame
F64 = torch.float64


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def qkv(n_q=GRID.n_tokens, n_k=GRID.n_tokens, heads=2, d=8, seed=0, scale=1.5):
    """Head-leading ``h i d`` tensors; larger scale makes the maps peakier (harder)."""
    return rand(heads, n_q, d, seed=seed, scale=scale), rand(heads, n_k, d, seed=seed + 1, scale=scale), rand(
        heads, n_k, d, seed=seed + 2
    )


def dense_probs(q, k, scale, allowed=None):
    ref = dense_attention(q, k, scale=scale, allowed=allowed)
    return ref.probs, ref.logits


def token_mask(q_frames, k_frames, chunk):
    qf = torch.arange(q_frames[0] * TPF, q_frames[1] * TPF) // TPF
    kf = torch.arange(k_frames[0] * TPF, k_frames[1] * TPF) // TPF
    return (kf[None, :] // chunk) <= (qf[:, None] // chunk)


def slices_of(m, layout, q_frames=None, k_frames=None):
    """Permute a raster map ``h i j`` into slices ``h a j f k i l`` using only the layout's token table."""
    _, qtok = layout.tiles_of_frames(q_frames)
    _, ktok = layout.tiles_of_frames(k_frames)
    x = m[:, qtok.flatten()][:, :, ktok.flatten()]
    x = x.unflatten(1, qtok.shape).unflatten(-1, ktok.shape)  # h a i j f k l
    return x.permute(0, 1, 3, 4, 5, 2, 6)


def objective_dense(m, s):
    """Σ_rows ⟨M_row, S_row⟩ + H(M_row) from the materialised map (hidden entries have M = 0)."""
    return (m * s.masked_fill(m == 0, 0)).sum((-1, -2)) - torch.special.xlogy(m, m).sum((-1, -2))


# ---- an independent, loop-by-loop T = 1 reference for the paper's fh,w layout (docs/monarch.md) ----------------------
def naive_t1(q, k, v, grid, tiling, scale):
    """q, k, v ``n d`` (one head, whole clip); index maps written out from ``docs/monarch.md`` "Layouts" with
    Python loops."""
    fr, hh, ww = grid
    f_t, c_h, c_w = tiling
    hp, wp = hh // c_h, ww // c_w
    b1, b2, n_tiles = f_t * hp, wp, (fr // f_t) * c_h * c_w
    pos = {}
    for phi, y, x in itertools.product(range(fr), range(hh), range(ww)):
        a = ((phi // f_t) * c_h + y // hp) * c_w + x // wp
        pos[(a, (phi % f_t) * hp + y % hp, x % wp)] = (phi * hh + y) * ww + x
    qs, ks = q * math.sqrt(scale), k * math.sqrt(scale)
    out = torch.zeros_like(v)
    for a in range(n_tiles):
        for j in range(b2):
            # R rows and the L logits for every key (f, kk) seen from column j of tile a
            alpha, c, ys = {}, {}, {}
            for f, kk in itertools.product(range(n_tiles), range(b1)):
                keys = [pos[(f, kk, l)] for l in range(b2)]
                r = torch.softmax(torch.stack([qs[pos[(a, kk, j)]] @ ks[t] for t in keys]), 0)
                alpha[f, kk] = sum(r[l] * ks[keys[l]] for l in range(b2))
                c[f, kk] = sum(r[l] * torch.log(r[l]) for l in range(b2))
                ys[f, kk] = sum(r[l] * v[keys[l]] for l in range(b2))
            for i in range(b1):
                logits = torch.stack([qs[pos[(a, i, j)]] @ alpha[fk] - c[fk] for fk in alpha])
                w = torch.softmax(logits, 0)
                out[pos[(a, i, j)]] = sum(wi * ys[fk] for wi, fk in zip(w, alpha))
    return out


def test_t1_matches_loop_reference():
    grid, tiling = TokenGrid(2, 4, 3), (1, 2, 1)  # 4 tiles of 2×3
    q, k, v = qkv(grid.n_tokens, grid.n_tokens, heads=1, d=5, seed=3)
    ref = naive_t1(q[0], k[0], v[0], tuple(grid), tiling, 0.7)
    out = monarch_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], grid,
                            tiling, scale=0.7)
    torch.testing.assert_close(out[0, :, 0], ref, rtol=1e-12, atol=1e-12)


# ---- variational ------------------------------------------------------------------------------------------
MODES = {  # name: (query_frames, key_frames, block_causal_frames)
    "bidirectional": (None, None, None),
    "block_causal": (None, None, 3),
    "kv_cache": ((3, 6), (0, 6), None),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", [MonarchLayout.aligned(GRID, "fh,w", (1, 2, 1)),
                                    MonarchLayout.aligned(GRID, "hw,f", (3, 3, 2)),
                                    MonarchLayout.contiguous(GRID, 4, 15)], ids=lambda x: x.name)
def test_rows_stochastic_slices_rank1_output_consistent(mode, layout):
    qfr, kfr, causal = MODES[mode]
    nq = TPF * (6 if qfr is None else qfr[1] - qfr[0])
    q, k, v = qkv(nq, TPF * 6, seed=5)
    out, fac = variational(q, k, v, layout, query_frames=qfr, key_frames=kfr, block_causal_frames=causal, iters=2)
    m = fac.dense()  # h i j raster
    torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1], dtype=F64), rtol=0, atol=1e-12)
    assert (m >= 0).all()
    if causal:
        mask = token_mask((0, 6), (0, 6), causal)
        assert (m[:, ~mask] == 0).all() and (m[:, mask] > 0).all()
    sv = torch.linalg.svdvals(slices_of(m, layout, qfr, kfr))
    assert (sv[..., 1] <= 1e-12 * sv[..., 0].clamp_min(1e-300)).all()
    torch.testing.assert_close(out, m @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_objective_monotone_and_below_dense_optimum(mode):
    qfr, kfr, causal = MODES[mode]
    layout = MonarchLayout.aligned(GRID, "fh,w", (3, 2, 1))
    nq = TPF * (6 if qfr is None else qfr[1] - qfr[0])
    q, k, v = qkv(nq, TPF * 6, seed=11, scale=2.0)
    scale = 0.4
    allowed = token_mask(qfr or (0, 6), kfr or (0, 6), causal) if causal else None
    p, s = dense_probs(q, k, scale, allowed)
    optimum = torch.logsumexp(s, -1).sum(-1)  # max of ⟨p, S⟩ + H(p) per row = lse
    values, prev_l = [], []
    s_slices = slices_of(s.masked_fill(torch.isinf(s), 0), layout, qfr, kfr)  # h a j f k i l

    def record(fac):
        m = fac.dense()
        values.append(objective_dense(m, s))
        torch.testing.assert_close(fac.objective(q, k, scale), values[-1], rtol=1e-12, atol=1e-9)
        # this R-step maximised the objective given the last L: R ∝ exp(Σ_i L S / Σ_i L)
        # (docs/monarch.md "MonarchAttention (variational)")
        if prev_l:
            lp = prev_l[-1].permute(0, 1, 2, 4, 5, 3)  # h a j f k i
            expected = torch.softmax((lp.unsqueeze(-1) * s_slices).sum(-2) / lp.sum(-1, keepdim=True), -1)
            seen = fac.allowed[None, :, None, :, None, None]
            got = fac.R.permute(0, 1, 4, 2, 3, 5)  # h a j f k l
            torch.testing.assert_close(got.where(seen, 0), expected.where(seen, 0), rtol=1e-10, atol=1e-12)
        prev_l.append(fac.L)

    variational(q, k, v, layout, query_frames=qfr, key_frames=kfr, block_causal_frames=causal, iters=6,
                scale=scale, on_iteration=record)
    values = torch.stack(values)  # T h
    assert (values[1:] >= values[:-1] - 1e-9).all()
    assert (values[-1] > values[0]).all()  # it does move
    assert (values <= optimum + 1e-9).all()
    torch.testing.assert_close(objective_dense(p, s), optimum)  # the bound is attained by softmax itself


@pytest.mark.parametrize("tiling", [(1, 1, 1), (3, 2, 5), (1, 3, 2)])
def test_block_causal_equals_per_chunk(tiling):
    q, k, v = (x.transpose(0, 1)[None] for x in qkv(seed=21))  # b i h d
    full = monarch_attention(q, k, v, GRID, tiling, block_causal_frames=3, iters=2)
    for c in range(2):
        rows = slice(3 * c * TPF, 3 * (c + 1) * TPF)
        keys = slice(0, 3 * (c + 1) * TPF)
        chunk = monarch_attention(q[:, rows], k[:, keys], v[:, keys], GRID, tiling, query_frames=(3 * c, 3 * c + 3),
                                  key_frames=(0, 3 * c + 3), iters=2)
        torch.testing.assert_close(full[:, rows], chunk, rtol=1e-12, atol=1e-12)


def test_seam_backend_modes():
    q, k, v = (x.transpose(0, 1)[None] for x in qkv(seed=31))
    be = monarch_backend((1, 2, 1), iters=1)
    ctx = AttentionContext(layer=0, step=0, chunk=1, is_clean=False, timestep=500.0, scale=0.3, grid=tuple(GRID),
                           query_frames=(3, 6), key_frames=(0, 6))
    rows = slice(3 * TPF, 6 * TPF)
    out = be(q[:, rows], k, v, ctx)
    ref = monarch_attention(q[:, rows], k, v, GRID, (1, 2, 1), query_frames=(3, 6), key_frames=(0, 6), scale=0.3)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    mask = token_mask((0, 6), (0, 6), 3)
    ctx = AttentionContext(0, 0, 0, False, 500.0, 0.3, tuple(GRID), (0, 6), (0, 6), attn_mask=mask)
    ref = monarch_attention(q, k, v, GRID, (1, 2, 1), block_causal_frames=3, scale=0.3)
    torch.testing.assert_close(be(q, k, v, ctx), ref, rtol=0, atol=0)
    ctx = AttentionContext(0, 0, 0, False, 500.0, 0.3, tuple(GRID), (0, 6), (0, 6), attn_mask=token_mask((0, 6),
                           (0, 6), 2))
    with pytest.raises(ToolkitError):
        be(q, k, v, ctx)


def test_reference_errors():
    q, k, v = (x.transpose(0, 1)[None] for x in qkv(seed=1))
    with pytest.raises(ToolkitError, match="straddle"):  # 2-frame tiles straddle 3-frame chunks
        monarch_attention(q, k, v, GRID, (2, 1, 1), block_causal_frames=3)
    with pytest.raises(ToolkitError, match="divide"):
        monarch_attention(q, k, v, GRID, (1, 4, 1))
    with pytest.raises(ToolkitError, match="iters"):
        monarch_attention(q, k, v, GRID, iters=0)


def test_low_precision_inputs_keep_dtype():
    q, k, v = (x.transpose(0, 1)[None].to(torch.bfloat16) for x in qkv(seed=2))
    out = monarch_attention(q, k, v, GRID)
    ref = monarch_attention(q.double(), k.double(), v.double(), GRID)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


# ---- exact projection -------------------------------------------------------------------------------------
def svd_bound(p, layout, q_frames=None, k_frames=None):
    """min ‖P − M‖² = Σ over slices of Σ_(r≥2) σ_r², by float64 SVD of every slice."""
    sv = torch.linalg.svdvals(slices_of(p, layout, q_frames, k_frames))
    return sv[..., 1:].square().sum((-1, -2, -3, -4, -5))


@pytest.mark.parametrize("method", ["eigh", "power"])
@pytest.mark.parametrize("mode", MODES)
def test_exact_projection_equals_svd_bound(mode, method):
    qfr, kfr, causal = MODES[mode]
    layout = MonarchLayout.aligned(GRID, "fw,h", (3, 2, 2))  # b1 = 15 > b2 = 3: the transposed Gram branch
    nq = TPF * (6 if qfr is None else qfr[1] - qfr[0])
    q, k, v = qkv(nq, TPF * 6, seed=41, scale=2.0)
    allowed = token_mask(qfr or (0, 6), kfr or (0, 6), causal) if causal else None
    p, s = dense_probs(q, k, 0.5, allowed)
    lse = torch.logsumexp(s, -1)
    err, fac = exact_projection(q, k, layout, lse=lse, v=v, query_frames=qfr, key_frames=kfr,
                                block_causal_frames=causal, scale=0.5, return_factors=True, method=method,
                                block_entries=3000)  # several tile groups
    bound = svd_bound(p, layout, qfr, kfr)
    torch.testing.assert_close(err.sq_error, bound, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(err.p_sq, p.square().sum((-1, -2)))
    m = fac.dense()
    torch.testing.assert_close(((p - m) ** 2).sum((-1, -2)), err.sq_error, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(err.out_sq_error, ((p - m) @ v).square().sum((-1, -2)), rtol=1e-9, atol=1e-15)
    assert (m >= -1e-15).all()  # non-negative map -> non-negative projection
    assert err.n_entries == (p > 0).sum((-1, -2))[0]
    assert (err.rel_frobenius > 0.05).all()  # random maps are far from Monarch: the comparison is not vacuous


def test_projection_beats_random_perturbations_and_variational():
    layout = MonarchLayout.aligned(GRID, "fh,w", (1, 2, 1))
    q, k, v = qkv(seed=51, scale=2.0)
    p, _ = dense_probs(q, k, 0.5)
    err, fac = exact_projection(q, k, layout, scale=0.5, return_factors=True)
    gen = torch.Generator().manual_seed(0)
    for eps in (1e-1, 1e-3, 1e-6):
        for _ in range(3):
            fac.L = fac.L + eps * fac.L.abs().mean() * torch.randn(fac.L.shape, generator=gen, dtype=F64)
            fac.R = fac.R + eps * fac.R.abs().mean() * torch.randn(fac.R.shape, generator=gen, dtype=F64)
            assert (((p - fac.dense()) ** 2).sum((-1, -2)) >= err.sq_error * (1 - 1e-12)).all()
            _, fac = exact_projection(q, k, layout, scale=0.5, return_factors=True)
    for iters in (1, 4):
        _, vfac = variational(q, k, v, layout, iters=iters, scale=0.5)
        verr = map_errors(q, k, vfac, v=v, scale=0.5, block_entries=5000)
        m = vfac.dense()
        torch.testing.assert_close(verr.sq_error, ((p - m) ** 2).sum((-1, -2)), rtol=1e-10, atol=1e-15)
        torch.testing.assert_close(verr.out_sq_error, ((p - m) @ v).square().sum((-1, -2)), rtol=1e-10, atol=1e-15)
        assert (verr.sq_error > err.sq_error).all()


def test_rank1_against_svd():
    x = rand(50, 7, 11, seed=3).exp()
    x[0] = torch.outer(rand(7, seed=4).exp(), rand(11, seed=5).exp())  # exactly rank 1
    x[1] = torch.eye(7, 11, dtype=F64)  # degenerate σ1 = σ2: any unit vector of the top space is optimal
    # σ2/σ1 = 1 - 1e-4: squaring and power iteration do not separate them, the eigh fallback must
    uu, _, vv = torch.linalg.svd(rand(7, 11, seed=6), full_matrices=False)
    x[2] = uu @ torch.diag(torch.tensor([1.0, 1 - 1e-4, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=F64)) @ vv
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    best = s[..., :1, None] * u[..., :, :1] @ vh[..., :1, :]
    for method in ("eigh", "power"):
        for y, ref in ((x, best), (x.transpose(-1, -2), best.transpose(-1, -2))):
            a, b = rank1(y, method)
            approx = a[..., :, None] * b[..., None, :]
            err = (y - approx).square().sum((-1, -2))
            torch.testing.assert_close(err, (y - ref).square().sum((-1, -2)), rtol=1e-9, atol=1e-12)
            keep = torch.arange(50) != 1  # the best rank-1 matrix is unique where σ1 > σ2
            torch.testing.assert_close(approx[keep], ref[keep], rtol=1e-7, atol=1e-9)


# ---- structure: separable positional kernels; nested tilings ------------------------------------------------
def separable_qk(grid, seed):
    """q, k (1 head) with scale 1 such that softmax(q kᵀ) = d_f ⊗ d_h ⊗ d_w exactly (each row-stochastic)."""
    fr, hh, ww = grid
    logs = [torch.log_softmax(rand(n, n, seed=seed + i), -1) for i, n in enumerate((fr, hh, ww))]
    f, h, w = grid.coords(torch.arange(grid.n_tokens))
    onehot = lambda idx, n: torch.nn.functional.one_hot(idx, n).to(F64)  # noqa: E731
    q = torch.cat([onehot(f, fr), onehot(h, hh), onehot(w, ww)], -1)
    k = torch.cat([logs[0][:, f].T, logs[1][:, h].T, logs[2][:, w].T], -1)
    p = logs[0].exp()[f][:, f] * logs[1].exp()[h][:, h] * logs[2].exp()[w][:, w]
    return q[None], k[None], p[None]


def test_separable_kernel_aligned_exact_misaligned_not():
    q, k, p = separable_qk(GRID, seed=60)
    torch.testing.assert_close(torch.softmax(q @ k.transpose(-1, -2), -1), p)
    for base, tiling in itertools.product(ALIGNED_BASES, [(6, 1, 1), (3, 2, 1), (1, 3, 5)]):
        err, _ = exact_projection(q, k, MonarchLayout.aligned(GRID, base, tiling), scale=1.0)
        assert err.rel_frobenius.item() < 1e-7, (base, tiling)
    for b1, b2 in [(12, 30), (8, 45), (8, 9), (20, 18)]:  # blocks that cut rows or frames between i and l
        err, _ = exact_projection(q, k, MonarchLayout.contiguous(GRID, b1, b2), scale=1.0)
        assert err.rel_frobenius.item() > 1e-3, (b1, b2)
    # and the variational fit recovers it too when aligned (the L-step's softmax is exact for separable maps)
    v = rand(1, GRID.n_tokens, 4, seed=61)
    _, fac = variational(q, k, v, MonarchLayout.aligned(GRID, "fh,w"), scale=1.0)
    assert map_errors(q, k, fac, scale=1.0).rel_frobenius.item() < 1e-7


@pytest.mark.parametrize("base", ["fh,w", "hw,f", "h,fw"])
def test_tiling_never_increases_projection_error(base):
    q, k, _ = qkv(heads=3, seed=70, scale=2.0)
    chain = [(6, 1, 1), (3, 1, 1), (3, 2, 1), (1, 2, 1), (1, 2, 2), (1, 6, 2), (1, 6, 10)]  # each refines the last
    errors = [exact_projection(q, k, MonarchLayout.aligned(GRID, base, t), scale=0.5)[0].sq_error for t in chain]
    for coarse, fine in zip(errors, errors[1:]):
        assert (fine <= coarse * (1 + 1e-10)).all()
    assert (errors[-1] < errors[0]).all()


def test_tile_groups_respect_the_memory_budget():
    causal = torch.arange(7)[None, :] // 3 <= torch.arange(7)[:, None] // 3  # 7 tiles, chunks of 3
    for allowed in (torch.ones(5, 21, dtype=torch.bool), causal):
        for tile_tokens, budget in ((10, 1), (10, 2500), (12, 10**5), (3, 10**9)):
            groups = list(_tile_groups(allowed, tile_tokens, budget))
            assert torch.equal(torch.cat(groups), torch.arange(allowed.shape[0]))
            for g in groups:
                assert (allowed[g] == allowed[g[0]]).all()
                entries = len(g) * tile_tokens * int(allowed[g[0]].sum()) * tile_tokens
                assert len(g) == 1 or entries <= budget
            if budget == 10**9:  # a generous budget merges every run of identical rows
                assert len(groups) == len({tuple(r.tolist()) for r in allowed})


def test_factor_sizes_match_accounting():
    layout = MonarchLayout.aligned(GRID, "fh,w", (3, 2, 1))
    q, k, v = qkv(seed=80)
    _, fac = variational(q, k, v, layout)
    params = (fac.L[0].numel() + fac.R[0].numel()) / GRID.n_tokens**2
    assert params == pytest.approx(1 - layout.effective_sparsity)
