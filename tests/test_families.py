"""Approximation families (``toolkit.attention.families``): each mask and output equals a brute-force float64
definition written out plainly here, on awkward grids (6 x 5 x 7 tokens, tiles that do not divide the axes, tiles
straddling block-causal chunks, a KV-cache call); densities are counts of pairs; every spec runs as an
``--attention`` rule on a tiny model and touches only the layers, chunks and heads it names."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import dense_attention as reference_attention
from conftest import tiny_config, tiny_wan

from toolkit.attention.backends import (
    backend_density,
    backend_for,
    parse_attention,
    parse_attention_rules,
    use_attention,
)
from toolkit.attention.families import (
    OracleBlockTopK,
    PredictedBlockTopK,
    RadialAttention,
    SlidingTileAttention,
    SparseVideoGen,
    call_context,
    family_backend,
    keep_count,
    parse_family,
    sampled_rows,
    tokens_context,
)
from toolkit.cli import main
from toolkit.errors import ToolkitError
from toolkit.models.sampling import self_forcing_rollout
from toolkit.models.seam import dense_attention, seams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRID = (6, 5, 7)  # frames, height, width: no axis divides by the 2 x 2 x 3 / 2 x 4 x 4 tiles below
SCALE = 0.5


# ---- plain definitions ----------------------------------------------------------------------------------------
def coords(frames: tuple[int, int], grid=GRID) -> list[tuple[int, int, int]]:
    """(frame, row, col) of the raster tokens of ``frames``."""
    _, height, width = grid
    return [(f, r, c) for f in range(*frames) for r in range(height) for c in range(width)]


def chunk_causal(frames: int, chunk: int, grid=GRID) -> torch.Tensor:
    """Block-causal pairs (no cache): a query sees keys of its chunk and earlier ones."""
    cs = coords((0, frames), grid)
    return torch.tensor([[kf // chunk <= qf // chunk for kf, _, _ in cs] for qf, _, _ in cs])


def allowed_of(ctx, n_q: int, n_k: int) -> torch.Tensor:
    return torch.ones(n_q, n_k, dtype=torch.bool) if ctx.attn_mask is None else ctx.attn_mask


# The calls every family is checked on: bidirectional, a KV-cache call (queries the last chunk of 2 frames, keys
# every frame up to it) and a block-causal no-cache call with 3-frame chunks (2-frame tiles straddle them).
CALLS = {
    "bidirectional": dict(query_frames=(0, 6), key_frames=(0, 6)),
    "kv_cache": dict(query_frames=(4, 6), key_frames=(0, 6)),
    "block_causal": dict(query_frames=(0, 6), key_frames=(0, 6), attn_mask=chunk_causal(6, 3)),
}


def make_call(name: str, heads: int = 2, seed: int = 0):
    ctx = call_context(GRID, SCALE, **CALLS[name])
    per_frame = GRID[1] * GRID[2]
    n_q = (ctx.query_frames[1] - ctx.query_frames[0]) * per_frame
    n_k = (ctx.key_frames[1] - ctx.key_frames[0]) * per_frame
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, n_q, 4, generator=g, dtype=torch.float64) * 2
    k = torch.randn(heads, n_k, 4, generator=g, dtype=torch.float64) * 2
    v = torch.randn(heads, n_k, 3, generator=g, dtype=torch.float64)
    return q, k, v, ctx


def tile_of(token: tuple[int, int, int], tile) -> tuple[int, int, int]:
    return tuple(x // t for x, t in zip(token, tile))


def brute_block_topk(q, k, ctx, keep: float, tile, score_of) -> torch.Tensor:
    """Per head and query tile: the own tile, then the present key tiles by descending score (ties: lower tile
    first), ⌈keep · present⌉ in all; a pair is kept if its key tile is and the exact attention has it."""
    q_tiles = [tile_of(t, tile) for t in coords(ctx.query_frames)]
    k_tiles = [tile_of(t, tile) for t in coords(ctx.key_frames)]
    allowed = allowed_of(ctx, len(q_tiles), len(k_tiles)).tolist()
    present: dict = {}
    for i, a in enumerate(q_tiles):
        for j, b in enumerate(k_tiles):
            if allowed[i][j]:
                present.setdefault(a, set()).add(b)
    masks = []
    for h in range(q.shape[0]):
        score = score_of(h)  # (query tile, key tile) -> score
        kept = {}
        for a, tiles in present.items():
            order = sorted(tiles, key=lambda b, a=a: (b != a, -score[a, b], b))
            kept[a] = set(order[: max(1, math.ceil(keep * len(tiles) - 1e-9))])
        masks.append([[allowed[i][j] and b in kept[a] for j, b in enumerate(k_tiles)] for i, a in enumerate(q_tiles)])
    return torch.tensor(masks)


def oracle_scores(q, k, ctx, tile):
    q_tiles = [tile_of(t, tile) for t in coords(ctx.query_frames)]
    k_tiles = [tile_of(t, tile) for t in coords(ctx.key_frames)]
    p = reference_attention(q, k, scale=SCALE, allowed=allowed_of(ctx, len(q_tiles), len(k_tiles))).probs.tolist()

    def score_of(h):
        mass: dict = {}
        for i, a in enumerate(q_tiles):
            for j, b in enumerate(k_tiles):
                mass[a, b] = mass.get((a, b), 0.0) + p[h][i][j]
        return mass

    return score_of


def pooled_scores(q, k, ctx, tile):
    qs, ks = coords(ctx.query_frames), coords(ctx.key_frames)

    def means(x, tokens):
        groups: dict = {}
        for n, t in enumerate(tokens):
            groups.setdefault(tile_of(t, tile), []).append(x[n])
        return {a: torch.stack(rows).mean(0) for a, rows in groups.items()}

    def score_of(h):
        mq, mk = means(q[h], qs), means(k[h], ks)
        return {(a, b): float(mq[a] @ mk[b]) * SCALE for a in mq for b in mk}

    return score_of


def brute_sta(ctx, window, tile) -> torch.Tensor:
    qs, ks = coords(ctx.query_frames), coords(ctx.key_frames)
    key_tiles = [sorted({tile_of(t, tile)[axis] for t in ks}) for axis in range(3)]

    def inside(a: int, b: int, axis: int) -> bool:
        lo, hi = key_tiles[axis][0], key_tiles[axis][-1]
        w = min(window[axis], hi - lo + 1)
        start = min(max(a - w // 2, lo), hi - w + 1)  # shifted, not cropped, at the borders
        return start <= b < start + w

    allowed = allowed_of(ctx, len(qs), len(ks)).tolist()
    q_tiles, k_tiles = [tile_of(t, tile) for t in qs], [tile_of(t, tile) for t in ks]
    pairs = {(a, b): all(inside(a[x], b[x], x) for x in range(3)) for a in set(q_tiles) for b in set(k_tiles)}
    return torch.tensor([[allowed[i][j] and pairs[a, b] for j, b in enumerate(k_tiles)] for i, a in enumerate(q_tiles)])


def brute_radial(ctx, dense_frames: int, radius: int) -> torch.Tensor:
    qs, ks = coords(ctx.query_frames), coords(ctx.key_frames)
    allowed = allowed_of(ctx, len(qs), len(ks)).tolist()

    def keep(qt, kt) -> bool:
        d = abs(kt[0] - qt[0])
        if d <= dense_frames:
            return True
        band = 0
        while max(dense_frames, 1) * 2 ** (band + 1) <= d:
            band += 1
        return max(abs(kt[1] - qt[1]), abs(kt[2] - qt[2])) <= radius // 2**band

    return torch.tensor([[allowed[i][j] and keep(qt, kt) for j, kt in enumerate(ks)] for i, qt in enumerate(qs)])


def brute_svg(q, k, v, ctx, rows: int, frame_band: int, spatial_band: int) -> tuple[torch.Tensor, list[bool]]:
    qs, ks = coords(ctx.query_frames), coords(ctx.key_frames)
    allowed = allowed_of(ctx, len(qs), len(ks))
    spatial = torch.tensor([[abs(kt[0] - qt[0]) <= frame_band for kt in ks] for qt in qs]) & allowed
    temporal = torch.tensor([[abs(kt[1] - qt[1]) <= spatial_band and abs(kt[2] - qt[2]) <= spatial_band
                              for kt in ks] for qt in qs]) & allowed
    sample = sorted({round(i * (len(qs) - 1) / (rows - 1)) for i in range(rows)})
    masks, choices = [], []
    for h in range(q.shape[0]):
        exact_rows = reference_attention(q[h, sample], k[h], v[h], SCALE, allowed[sample]).out
        err_s = (reference_attention(q[h, sample], k[h], v[h], SCALE, spatial[sample]).out - exact_rows).pow(2).mean()
        err_t = (reference_attention(q[h, sample], k[h], v[h], SCALE, temporal[sample]).out - exact_rows).pow(2).mean()
        choices.append(bool(err_s <= err_t))
        masks.append(spatial if choices[-1] else temporal)
    return torch.stack(masks), choices


def check_family(family, q, k, v, ctx, expected_mask: torch.Tensor) -> None:
    """Mask, output (softmax over the kept keys) and density against their plain definitions."""
    result = family.evaluate(q, k, v, ctx)
    mask = torch.broadcast_to(result.mask, expected_mask.shape) if expected_mask.dim() == 3 else result.mask
    assert torch.equal(mask, expected_mask)
    expected_mask = torch.broadcast_to(expected_mask, (q.shape[0], *expected_mask.shape[-2:]))
    assert expected_mask.any(-1).all()  # every row keeps a key
    torch.testing.assert_close(result.out, reference_attention(q, k, v, SCALE, expected_mask).out,
                               rtol=1e-12, atol=1e-12)
    allowed = allowed_of(ctx, q.shape[1], k.shape[1])
    pairs = [int(m.sum()) / int(allowed.sum()) for m in expected_mask]
    torch.testing.assert_close(torch.broadcast_to(result.density, (q.shape[0],)),
                               torch.tensor(pairs, dtype=torch.float64))
    assert not (expected_mask & ~allowed).any()  # never a pair the exact attention leaves out


# ---- each family against its definition -----------------------------------------------------------------------
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize(("keep", "tile"), [(0.3, (2, 2, 3)), (0.5, (1, 4, 4)), (0.13, (1, 1, 1))])
def test_oracle_block_topk(call, keep, tile):
    q, k, v, ctx = make_call(call)
    family = OracleBlockTopK(keep, tile)
    expected = brute_block_topk(q, k, ctx, keep, tile, oracle_scores(q, k, ctx, tile))
    check_family(family, q, k, v, ctx, expected)
    assert 0 < float(family.evaluate(q, k, v, ctx).density.max()) < 1


@pytest.mark.parametrize("call", list(CALLS))
def test_predicted_block_topk(call):
    q, k, v, ctx = make_call(call, seed=1)
    family = PredictedBlockTopK(0.3, (2, 2, 3))
    check_family(family, q, k, v, ctx, brute_block_topk(q, k, ctx, 0.3, (2, 2, 3), pooled_scores(q, k, ctx, (2, 2, 3))))


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize(("window", "tile"), [((3, 3, 3), (1, 2, 2)), ((2, 1, 2), (2, 2, 3)), ((9, 9, 9), (1, 1, 1))])
def test_sliding_tile_attention(call, window, tile):
    q, k, v, ctx = make_call(call)
    check_family(SlidingTileAttention(window, tile), q, k, v, ctx, brute_sta(ctx, window, tile))


def test_sta_windows_shift_inside_the_grid_and_the_cached_frames():
    ctx = call_context(GRID, SCALE, query_frames=(4, 6), key_frames=(0, 6))
    mask = SlidingTileAttention((3, 3, 3), (1, 1, 1)).mask(torch.zeros(1, 70, 1), torch.zeros(1, 210, 1), None, ctx)
    per_row = mask.sum(-1)
    assert torch.equal(per_row, torch.full_like(per_row, 27))  # every query sees 3 x 3 x 3 keys, also at borders
    last = coords((4, 6)).index((5, 4, 6))  # the corner token of the last frame: frames 3-5, rows 2-4, cols 4-6
    keys = {coords((0, 6))[j] for j in mask[last].nonzero().flatten().tolist()}
    assert keys == {(f, r, c) for f in (3, 4, 5) for r in (2, 3, 4) for c in (4, 5, 6)}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize(("dense_frames", "radius"), [(1, 4), (0, 3), (2, 1)])
def test_radial_attention(call, dense_frames, radius):
    q, k, v, ctx = make_call(call)
    check_family(RadialAttention(dense_frames, radius), q, k, v, ctx, brute_radial(ctx, dense_frames, radius))


@pytest.mark.parametrize("call", list(CALLS))
def test_sparse_videogen(call):
    q, k, v, ctx = make_call(call, heads=3, seed=2)
    family = SparseVideoGen(4, 1, 1)
    expected, choices = brute_svg(q, k, v, ctx, 4, 1, 1)
    check_family(family, q, k, v, ctx, expected)
    assert family.is_spatial(q, k, v, ctx).tolist() == choices


def test_sparse_videogen_tells_spatial_from_temporal_heads():
    """Head 0 attends within its frame (a large per-frame component), head 1 along the same position (a large
    per-position component): the profile picks spatial for the first and temporal for the second."""
    ctx = call_context(GRID, SCALE)
    cs = coords((0, 6))
    g = torch.Generator().manual_seed(3)
    frame_code, position_code = torch.randn(6, 8, generator=g), torch.randn(5, 7, 8, generator=g)
    per_frame = torch.stack([frame_code[f] for f, _, _ in cs]).double() * 3
    per_position = torch.stack([position_code[r, c] for _, r, c in cs]).double() * 3
    x = torch.stack([per_frame, per_position])
    v = torch.randn(2, len(cs), 3, generator=g, dtype=torch.float64)
    family = SparseVideoGen(8, 0, 0)
    assert family.is_spatial(x, x, v, ctx).tolist() == [True, False]
    expected, choices = brute_svg(x, x, v, ctx, 8, 0, 0)
    assert choices == [True, False]
    check_family(family, x, x, v, ctx, expected)


def test_a_context_from_captured_token_indices():
    ctx = tokens_context(GRID, SCALE, torch.arange(4 * 35, 6 * 35), torch.arange(0, 6 * 35))
    assert (ctx.query_frames, ctx.key_frames, ctx.grid, ctx.scale) == ((4, 6), (0, 6), GRID, SCALE)
    with pytest.raises(ToolkitError, match="whole frames"):
        tokens_context(GRID, SCALE, torch.arange(0, 6 * 35, 2), torch.arange(0, 6 * 35))


@pytest.mark.parametrize(("spec", "divides"), [
    ("sta:3,3,3:1,2,2", True), ("sta:2,1,2:2,2,3", True), ("radial:1,2", True), ("radial:0,1", True),
    ("blocktopk:0.3:2,5,7", True), ("blocktopk-pred:0.5:3,1,7", True), ("blocktopk:0.3:2,2,3", False),
    ("svg:4:1,1", False), ("py:test_families:same_frame_mask", False),
])
def test_clip_density_without_data_is_the_mask_density(spec, divides):
    q, k, v, ctx = make_call("bidirectional", heads=1)
    value = backend_density(spec, GRID)
    if not divides:
        assert value is None
        return
    measured = float(parse_family(spec).evaluate(q, k, v, ctx).density.flatten()[0])
    assert value == pytest.approx(measured, rel=1e-12)
    assert backend_density("dense", GRID) == 1.0
    assert backend_density("monarch:1,1,1", GRID) == pytest.approx((5 + 7) / (5 * 7))  # fh,w: b1 = 5 rows, b2 = 7


def test_keep_counts_and_sampled_rows():
    assert keep_count(0.1, torch.tensor([30, 7, 1, 0])).tolist() == [3, 1, 1, 1]
    assert keep_count(0.14, torch.tensor([50])).tolist() == [7]  # 0.14 * 50 = 7.000000000000001 in floats
    assert keep_count(1.0, torch.tensor([12])).tolist() == [12]
    assert sampled_rows(70, 4).tolist() == [0, 23, 46, 69]
    assert sampled_rows(3, 8).tolist() == [0, 1, 2]


# ---- a researcher's own callable ------------------------------------------------------------------------------
def same_frame_mask(q, k, v, ctx):
    """A user mask (seam layout q ``b i h d``): same frame only, ``i j``."""
    per_frame = ctx.grid[1] * ctx.grid[2]
    q_frame = torch.arange(q.shape[1]) // per_frame + ctx.query_frames[0]
    k_frame = torch.arange(k.shape[1]) // per_frame + ctx.key_frames[0]
    return q_frame[:, None] == k_frame[None, :]


def half_dense(q, k, v, ctx):
    """A user output: half of dense attention (any tensor ``b i h e`` the idea computes)."""
    return dense_attention(q, k, v, ctx) * 0.5


@pytest.mark.parametrize("call", list(CALLS))
def test_user_mask_round_trips(call):
    q, k, v, ctx = make_call(call)
    family = parse_family("py:test_families:same_frame_mask")
    assert str(family) == "py:test_families:same_frame_mask"
    qs, ks = coords(ctx.query_frames), coords(ctx.key_frames)
    expected = torch.tensor([[qt[0] == kt[0] for kt in ks] for qt in qs]) & allowed_of(ctx, len(qs), len(ks))
    check_family(family, q, k, v, ctx, torch.broadcast_to(expected, (2, *expected.shape)).clone())


def test_user_output_round_trips_without_a_density():
    q, k, v, ctx = make_call("kv_cache")
    result = parse_family("py:test_families:half_dense").evaluate(q.float(), k.float(), v.float(), ctx)
    torch.testing.assert_close(result.out, reference_attention(q, k, v, SCALE).out.float() * 0.5)
    assert result.mask is None and torch.isnan(result.density).all()


# ---- specs and the seam backend -------------------------------------------------------------------------------
SPECS = ["blocktopk:0.3:1,2,2", "blocktopk-pred:0.3:1,2,2", "sta:1,3,3:1,1,1", "radial:0,1", "svg:8:0,0",
         "py:test_families:same_frame_mask"]


@pytest.mark.parametrize("spec", SPECS)
def test_specs_read_back_to_themselves(spec):
    name, family = parse_attention(spec)
    assert spec.startswith(name) and str(family) == spec
    assert parse_attention_rules(f"{spec}@layers=1@heads=0,2")[0].attention == spec


@pytest.mark.parametrize(("spec", "says"), [
    ("blocktopk:0:1,4,4", "blocktopk:KEEP:TF,TH,TW"),
    ("blocktopk:1.5:1,4,4", "KEEP in (0, 1]"),
    ("blocktopk-pred:0.1:1,4", "blocktopk-pred:KEEP:TF,TH,TW"),
    ("sta:3,3,3:0,4,4", "sta:WF,WH,WW:TF,TH,TW"),
    ("sta:3,3,3", "sta:WF,WH,WW:TF,TH,TW"),
    ("radial:1,-2", "radial:DENSE_FRAMES,RADIUS"),
    ("svg:0:1,1", "svg:ROWS:FRAME_BAND,SPATIAL_BAND"),
    ("py:no_such_module_here:f", "cannot import module 'no_such_module_here'"),
    ("py:test_families:nothing", "has no 'nothing'"),
    ("py:test_families", "py:MODULE:FUNCTION"),
    ("topk:0.1", "'sta:WF,WH,WW:TF,TH,TW'"),
])
def test_bad_specs_are_one_line_errors(spec, says):
    with pytest.raises(ToolkitError) as err:
        parse_attention_rules(f"{spec}@layers=0")
    assert says in str(err.value) and "\n" not in str(err.value)


def test_calls_not_made_of_whole_frames_are_refused():
    q, k, v, ctx = make_call("bidirectional")
    twice = torch.cat([q, q], dim=1)  # the teacher-forcing sequence holds the clip twice
    with pytest.raises(ToolkitError, match="raster tokens of whole frames"):
        RadialAttention(1, 1).mask(twice, torch.cat([k, k], dim=1), None, ctx)


def test_the_backend_equals_the_reference_in_the_seam_layout():
    q, k, v, ctx = make_call("kv_cache", heads=3)
    seam = [x.float().transpose(0, 1).unsqueeze(0) for x in (q, k, v)]  # 1 n h d
    for spec in SPECS:
        family = parse_family(spec)
        out = family_backend(family)(*seam, ctx)
        assert out.shape == seam[0].shape[:3] + (3,) and out.dtype == torch.float32
        torch.testing.assert_close(out[0].transpose(0, 1), family.output(q, k, v, ctx).float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(backend_for(spec)(*seam, ctx), out)


RULE_HEADS = (0, 2)


@pytest.mark.parametrize("spec", SPECS)
def test_a_family_rule_touches_exactly_its_layers_chunks_and_heads(spec):
    """``SPEC@layers=1@chunks=1,2@heads=0,2`` over a KV-cache rollout: those heads are the family's reference,
    every other head, chunk and layer bit-identical to dense."""
    model = tiny_wan(tiny_config(), sharpen=4.0)
    family = parse_family(spec)
    seen = {"family": 0, "differs": 0, "dense": 0}

    def check(q, k, v, out, ctx):
        dense = dense_attention(q, k, v, ctx)
        if ctx.layer == 1 and ctx.chunk in (1, 2):
            idx = list(RULE_HEADS)
            mine = family_backend(family)(q[:, :, idx], k[:, :, idx], v[:, :, idx], ctx)
            torch.testing.assert_close(out[:, :, idx], mine, rtol=1e-4, atol=1e-5)
            others = [h for h in range(q.shape[2]) if h not in idx]
            assert torch.equal(out[:, :, others], dense[:, :, others])
            seen["family"] += 1
            seen["differs"] += int(not torch.allclose(mine, dense[:, :, idx], atol=1e-4))
        else:
            assert torch.equal(out, dense)
            seen["dense"] += 1

    for seam in seams(model):
        seam.hooks.append(check)
    g = torch.Generator().manual_seed(0)
    noise, context = torch.randn(1, 16, 6, 6, 10, generator=g), torch.randn(1, 4, 16, generator=g)
    with use_attention(model, f"{spec}@layers=1@chunks=1,2@heads=0,2"):
        self_forcing_rollout(model, noise, context, frames_per_chunk=2, timesteps=[1000.0, 500.0],
                             generator=torch.Generator().manual_seed(1))
    assert all(s.backend is None for s in seams(model))
    assert seen["family"] == 2 * 3  # chunks 1, 2 x (2 steps + clean pass), layer 1
    assert seen["dense"] == 3 * 3 * 3 - seen["family"]
    assert seen["differs"] > 0  # the family really changed the attention of its heads


@pytest.fixture
def no_loading(monkeypatch):
    from toolkit.models import registry

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(registry, "load_model", refuse)


def test_cli_refuses_a_bad_family_spec_before_loading(no_loading, tmp_path, capsys):
    assert main(["generate", "--attention", "sta:3,3:1,4,4@layers=0", "--out", str(tmp_path / "g"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sta:WF,WH,WW:TF,TH,TW" in err and len(err.splitlines()) == 1
