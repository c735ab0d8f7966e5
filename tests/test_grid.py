"""TokenGrid and Monarch layouts: index conventions, permutations, errors, accounting vs the paper's table."""

import itertools

import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.grid import (
    ALIGNED_BASES,
    GRID_480P,
    GRID_720P,
    MonarchLayout,
    TokenGrid,
    config_table,
    effective_sparsity,
    flop_ratio,
    format_config_table,
)

GRID = TokenGrid(6, 6, 10)  # awkward: 10 columns, 6 rows, 360 tokens
TILINGS = [(1, 1, 1), (2, 3, 1), (3, 2, 5), (6, 1, 2), (1, 6, 10)]


def test_coords_index_roundtrip_and_offsets():
    g = GRID
    tokens = torch.randperm(g.n_tokens)[:50]
    f, h, w = g.coords(tokens)
    for t, ff, hh, ww in zip(tokens.tolist(), f.tolist(), h.tolist(), w.tolist()):
        assert t == (ff * g.height + hh) * g.width + ww
        assert 0 <= hh < g.height and 0 <= ww < g.width
    assert torch.equal(g.index(f, h, w), tokens)
    q, k = tokens[:7], tokens[7:]
    dt, dh, dw = g.offsets(q, k)
    assert dt.shape == (7, 43)
    for a, b in [(0, 0), (3, 17), (6, 42)]:
        assert (dt[a, b], dh[a, b], dw[a, b]) == (f[7 + b] - f[a], h[7 + b] - h[a], w[7 + b] - w[a])


def test_frame_range():
    g = GRID
    tpf = g.tokens_per_frame
    assert g.frame_range(torch.arange(2 * tpf, 5 * tpf)) == (2, 5)
    with pytest.raises(ToolkitError):
        g.frame_range(torch.arange(2 * tpf, 5 * tpf, 2))  # strided capture
    with pytest.raises(ToolkitError):
        g.frame_range(torch.arange(1, tpf + 1))


def test_framewise_layout_matches_paper_convention():
    """fh,w with tiling (f_t, c_h, c_w): a = (α c_h + γ) c_w + ε, i = φ' H' + y', j = x'
    (``docs/monarch.md`` "Layouts")."""
    g = GRID
    for f_t, c_h, c_w in [(1, 1, 1), (3, 2, 5), (2, 3, 2)]:
        lay = MonarchLayout.aligned(g, "fh,w", (f_t, c_h, c_w))
        hp, wp = g.height // c_h, g.width // c_w
        assert (lay.b1, lay.b2) == (f_t * hp, wp)
        for phi, y, x in itertools.product(range(g.frames), range(g.height), range(g.width)):
            a = ((phi // f_t) * c_h + y // hp) * c_w + x // wp
            i, j = (phi % f_t) * hp + y % hp, x % wp
            assert lay.tokens[a, i, j] == (phi * g.height + y) * g.width + x


@pytest.mark.parametrize("base", ALIGNED_BASES)
def test_aligned_layouts_are_bijections_with_separated_axes(base):
    g = GRID
    rows, cols = base.split(",")
    for tiling in TILINGS:
        lay = MonarchLayout.aligned(g, base, tiling)
        assert torch.equal(lay.tokens.flatten().sort().values, torch.arange(g.n_tokens))
        assert lay.num_tiles * lay.b1 * lay.b2 == g.n_tokens
        coord = dict(zip("fhw", g.coords(lay.tokens)))  # each [A, b1, b2]
        for axis, c in coord.items():
            # within a tile each axis spans one band; tile-local coordinate depends only on i (rows) or j (cols)
            inner = c - c.flatten(1).min(1).values[:, None, None]
            if axis in rows:
                assert (inner == inner[:, :, :1]).all(), (axis, tiling)
            elif axis in cols:
                assert (inner == inner[:, :1, :]).all(), (axis, tiling)
        f_t = tiling[0]
        assert (coord["f"].flatten(1).max(1).values - coord["f"].flatten(1).min(1).values < f_t).all()


def test_permute_roundtrip_and_frame_ranges():
    lay = MonarchLayout.aligned(GRID, "hw,f", (3, 2, 5))
    x = torch.randn(2, GRID.n_tokens, 4, dtype=torch.float64)
    y = lay.permute(x, dim=1)
    assert y.shape == (2, lay.num_tiles, lay.b1, lay.b2, 4)
    assert torch.equal(y[1, 2, 3, 1], x[1, lay.tokens[2, 3, 1]])
    assert torch.equal(lay.unpermute(y, dim=1), x)
    # the second half of the clip (frames 3..6) is tiles 10..19 (2·5 tiles per 3 frames), tokens relative to frame 3
    tpf = GRID.tokens_per_frame
    ids, local = lay.tiles_of_frames((3, 6))
    assert ids.tolist() == list(range(10, 20))
    ys = lay.permute(x[:, 3 * tpf :], dim=1, frames=(3, 6))
    assert torch.equal(ys, y[:, 10:20])
    assert torch.equal(lay.unpermute(ys, dim=1, frames=(3, 6)), x[:, 3 * tpf :])
    with pytest.raises(ToolkitError, match="straddle"):
        lay.tiles_of_frames((1, 6))


def test_contiguous_layout():
    g = GRID
    # contiguous (height, width) tiles are the framewise aligned layout; (frames*height, width) the untiled one
    assert torch.equal(MonarchLayout.contiguous(g, 6, 10).tokens, MonarchLayout.aligned(g, "fh,w").tokens)
    assert torch.equal(MonarchLayout.contiguous(g, 36, 10).tokens, MonarchLayout.aligned(g, "fh,w", (6, 1, 1)).tokens)
    lay = MonarchLayout.contiguous(g, 8, 9)  # 72-token tiles straddle rows and frames: misaligned
    n = torch.arange(g.n_tokens)
    assert torch.equal(lay.tokens.flatten(), n)
    assert lay.tokens[3, 5, 7] == 3 * 72 + 5 * 9 + 7
    with pytest.raises(ToolkitError, match="straddle"):
        lay.tiles_of_frames((0, 3))  # 180 tokens is not a multiple of 72


@pytest.mark.parametrize(
    "make",
    [
        lambda: MonarchLayout.aligned(GRID, "fh,w", (4, 1, 1)),
        lambda: MonarchLayout.aligned(GRID, "fh,w", (1, 4, 1)),
        lambda: MonarchLayout.aligned(GRID, "fh,w", (1, 1, 3)),
        lambda: MonarchLayout.aligned(GRID, "fhw", (1, 1, 1)),
        lambda: MonarchLayout.contiguous(GRID, 7, 7),
        lambda: TokenGrid(0, 3, 3),
    ],
)
def test_clear_errors(make):
    with pytest.raises(ToolkitError):
        make()


def test_flop_ratio_matches_kernel_mac_count():
    """Stage 1: 3·A·F·b1·b2²·d MACs, stage 2: 2·A·F·b1²·b2·d, one extra round (b1+b2)·2·b1·b2·d per tile pair
    (``docs/monarch.md`` "Kernels"), dense 2·N_q·N_k·d."""
    for b1, b2, iters in [(30, 52, 1), (15, 13, 1), (7, 11, 3), (90, 52, 2)]:
        a, f, d = 3, 5, 64
        macs = 3 * a * f * b1 * b2**2 * d + 2 * a * f * b1**2 * b2 * d
        macs += (iters - 1) * 2 * (b1 + b2) * b1 * b2 * d * a * f
        dense = 2 * (a * b1 * b2) * (f * b1 * b2) * d
        assert flop_ratio(b1, b2, iters) == pytest.approx(macs / dense)
        params = a * b2 * b1 * f * b1 + a * f * b1 * b2 * b2  # |L| + |R|
        assert effective_sparsity(b1, b2) == pytest.approx(1 - params / (a * b1 * b2 * f * b1 * b2))


def test_config_table_reproduces_paper():
    """Percentages and ratios of ``docs/monarch.md`` "Configurations" (α_L + Y in GB)."""
    expected = {  # (grid, base, tiling): (eff. sparsity %, FLOP ratio, bf16 α_L+Y GB for the full clip or None)
        (GRID_480P, "fh,w", (1, 1, 1)): (94.7, 0.069, 4.2),
        (GRID_480P, "fh,w", (1, 2, 1)): (91.4, 0.119, 8.5),
        (GRID_480P, "fh,w", (1, 2, 4)): (85.6, 0.177, None),
        (GRID_480P, "fh,w", (3, 1, 1)): (97.0, 0.036, 1.4),
        (GRID_480P, "fh,w", (3, 2, 1)): (95.9, 0.053, None),
        (GRID_480P, "fh,w", (3, 6, 2)): (89.5, 0.139, None),
        (GRID_480P, "fh,w", (21, 1, 1)): (97.9, 0.022, None),
        (GRID_720P, "fh,w", (3, 1, 1)): (98.0, 0.024, None),
        (GRID_720P, "fh,w", (1, 1, 1)): (96.5, 0.046, None),
        (GRID_480P, "w,fh", (21, 1, 1)): (97.9, None, None),
        (GRID_480P, "f,hw", (21, 1, 1)): (95.2, None, None),
        (GRID_480P, "hw,f", (21, 1, 1)): (95.2, None, None),
        (GRID_480P, "fw,h", (21, 1, 1)): (96.6, None, None),
        (GRID_480P, "h,fw", (21, 1, 1)): (96.6, None, None),
    }
    rows = {(r["grid"], r["base"], r["tiling"]): r for r in config_table()}
    assert set(rows) == set(expected)
    for key, (sparsity, ratio, gb) in expected.items():
        r = rows[key]
        assert round(100 * r["effective_sparsity"], 1) == sparsity, key
        if ratio is not None:
            assert r["flop_ratio"] == pytest.approx(ratio, abs=6e-4), key  # the doc rounds 0.1385 up
        if gb is not None:
            assert round(r["intermediate_gb"], 1) == gb, key
    text = format_config_table()
    for s in ("94.7%", "98.0%", "91.4%", "97.0%"):
        assert s in text
    # AR last chunk (4,680 queries vs 21 key frames), framewise: 0.6 GB
    lay = MonarchLayout.aligned(GRID_480P)
    assert round(lay.intermediate_bytes(4680) / 1e9, 1) == 0.6
    # Fig. 1 sweep points at 480p (docs/monarch.md "Configurations")
    for (b1, b2), pct in {(2, 2): 0.0, (5, 4): 55.0, (15, 4): 68.3, (6, 13): 75.6, (30, 13): 89.0,
                          (30, 26): 92.8, (90, 26): 95.0}.items():
        assert round(100 * effective_sparsity(b1, b2), 1) == pct
