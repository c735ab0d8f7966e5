"""Triton kernels vs the float64 PyTorch reference (toolkit.attention.monarch), on the CPU through the interpreter
(tests/conftest.py sets TRITON_INTERPRET before toolkit.kernels is first imported).
Shapes are tiny but awkward: widths/heights that are not powers of two, several tiles, blocks smaller than the
tile (forced configs) so the column/row/key loops run more than once, chunk boundaries, a partly filled cache.
Outputs and kernel scratch are NaN-poisoned before launch so an unwritten element fails.
"""

import pytest
import toolkit.kernels._common as kcommon
import torch
from conftest import dense_attention
from toolkit.kernels import apply_factors, monarch_attention_triton, monarch_backend_triton, monarch_compare
from toolkit.kernels.bench import dense_flops, monarch_flops
from toolkit.kernels.monarch import _forward  # the launcher with the benchmark's switches (configs, version, out)

from toolkit.attention.monarch import (
    allowed_tiles,
    exact_projection,
    map_errors,
    monarch_attention,
    monarch_backend,
)
from toolkit.grid import MonarchLayout
from toolkit.models.seam import AttentionContext

# ‖out − ref‖/‖ref‖ bounds: fp32 products are exact in the interpreter; fp16/bf16 round q/k/v (before the
# reference sees them too), P and the α/Y intermediates (MonarchRT keeps them in the input dtype).
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def poison_scratch(monkeypatch):
    monkeypatch.setattr(kcommon, "POISON_SCRATCH", True)


def _inputs(grid, query_frames, key_frames, heads=2, dim=16, dtype=torch.float32, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    tpf = grid[1] * grid[2]
    n_q, n_k = (query_frames[1] - query_frames[0]) * tpf, (key_frames[1] - key_frames[0]) * tpf
    q, k, v = (torch.randn(batch, n, heads, dim, generator=g, dtype=torch.float64) for n in (n_q, n_k, n_k))
    # round to the kernel dtype first so the float64 reference sees exactly the kernel's inputs
    return tuple(x.to(dtype) for x in (q, k, v))


def _rel(x, ref):
    assert torch.isfinite(x).all(), "unwritten (NaN-poisoned) or non-finite elements"
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _nan_like(q):
    return torch.full_like(q, float("nan"))


# grid, tiling, query_frames, key_frames, block_causal_frames, configs (None = launcher defaults), scratch
FORWARD_CASES = {
    "bidirectional-111": ((2, 3, 5), (1, 1, 1), (0, 2), (0, 2), None, None, None),
    "bidirectional-121-small-blocks": (
        (2, 4, 18), (1, 2, 1), (0, 2), (0, 2), None,
        ({"BLOCK_J": 16, "BLOCK_L": 16}, {"BLOCK_I": 16, "BLOCK_K": 16}), None,
    ),
    "bidirectional-112-chunked": ((2, 3, 10), (1, 1, 2), (0, 2), (0, 2), None, None, 1),
    "block-causal-311": ((6, 3, 5), (3, 1, 1), (0, 6), (0, 6), 3, None, None),
    "block-causal-121-chunked": ((6, 2, 5), (1, 2, 1), (0, 6), (0, 6), 3, None, 50_000),
    "kv-cache-partly-filled": (
        (9, 3, 7), (1, 1, 1), (3, 6), (0, 6), None,
        ({"BLOCK_J": 16, "BLOCK_L": 16}, {"BLOCK_I": 16, "BLOCK_K": 16}), None,
    ),
    # v2 R-step: 3 query tiles of width 5 per 16-row program, 7 tiles = program groups {0,1,2}, {3,4,5}, {6};
    # key tiles split over 2 programs
    "bidirectional-111-v2-packed": (
        (7, 2, 5), (1, 1, 1), (0, 7), (0, 7), None,
        ({"BLOCK_M": 16, "F_SPLIT": 2}, {"BLOCK_I": 16, "BLOCK_K": 16}), None,
    ),
    # v2: one program holds query tiles of two chunks (different numbers of visible key tiles); 3 key-tile splits
    "block-causal-111-v2-packed-split": (
        (6, 2, 5), (1, 1, 1), (0, 6), (0, 6), 3,
        ({"BLOCK_M": 32, "F_SPLIT": 3}, {"BLOCK_I": 16, "BLOCK_K": 16}), None,
    ),
    # v2 with scratch chunks of 3 query tiles, i.e. program groups {0,1}, {2} per chunk (2 tiles of width 7 per
    # 16 rows), against a partly filled cache
    "kv-cache-v2-chunked": (
        (9, 3, 7), (1, 1, 1), (3, 9), (0, 9), None,
        ({"BLOCK_M": 16, "F_SPLIT": 1}, {"BLOCK_I": 16, "BLOCK_K": 16}), 3 * 7 * 9 * 3 * (2 * 16 * 4 + 4),
    ),
}
# cases with launcher-default configs run with both R-step versions; explicit configs name their version
FORWARD_RUNS = [(case, version) for case, spec in FORWARD_CASES.items()
                for version in (("v1", "v2") if spec[5] is None else (None,))]


@pytest.mark.parametrize("case,version", FORWARD_RUNS)
def test_monarch_forward_matches_reference(case, version):
    grid, tiling, qf, kf, bc, configs, scratch = FORWARD_CASES[case]
    # batch 2 × 2 heads once; one head elsewhere keeps the interpreter fast
    q, k, v = _inputs(grid, qf, kf, batch=2 if case == "bidirectional-111" else 1,
                      heads=2 if case == "bidirectional-111" else 1)
    out = _forward(
        q, k, v, grid, tiling, query_frames=qf, key_frames=kf, block_causal_frames=bc, configs=configs,
        scratch_bytes=scratch, out=_nan_like(q), version=version,
    )
    ref = monarch_attention(q.double(), k.double(), v.double(), grid, tiling, query_frames=qf, key_frames=kf,
                            block_causal_frames=bc)
    assert _rel(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_head_chunked_scratch_matches_reference(version):
    """A budget below one query tile of all heads: chunks of one tile × a head group ({0}, {1, 2} of 3 heads,
    batch 2), the kernels seeing each group through head-sliced views; KV-cache call on a partly filled cache."""
    from toolkit.kernels.monarch import scratch_chunk

    grid, tiling, qf, kf = (4, 3, 5), (1, 1, 1), (2, 4), (0, 4)
    batch, heads, dim = 2, 3, 16
    per_unit = 5 * 4 * 3 * (2 * dim * 4 + 4)  # b2 · F · b1 · (α + Y in fp32, c)
    budget = 2 * batch * per_unit
    assert scratch_chunk(batch, heads, 2, per_unit, budget) == (2, 1)  # 2 heads fit, not one tile of all 3
    q, k, v = _inputs(grid, qf, kf, heads=heads, dim=dim, batch=batch, seed=11)
    out = _forward(q, k, v, grid, tiling, query_frames=qf, key_frames=kf, scratch_bytes=budget,
                   out=_nan_like(q), version=version)
    ref = monarch_attention(q.double(), k.double(), v.double(), grid, tiling, query_frames=qf, key_frames=kf)
    assert _rel(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("wanted, n_groups, fit, ring", [
    ((8, 6), 252, 100, (8, 6)),  # the measured best where the budget holds it
    ((8, 6), 252, 5, (5, 3)),  # cut to 5 slots: two slots between a slot's users, not one
    ((6, 4), 3, 100, (3, 1)),  # three groups only
    ((4, 2), 252, 2, (2, 1)),
    ((4, 2), 252, 0, (1, 0)),  # the budget holds no slot: one, used by each group in turn
    ((2, 1), 252, 100, (2, 1)),
])
def test_streamed_ring_cuts_slots_and_lag(wanted, n_groups, fit, ring):
    from toolkit.kernels.monarch import streamed_ring

    assert streamed_ring(*wanted, n_groups, fit) == ring


# The streamed kernel (both steps in one launch, intermediates in a ring of group slots): the interpreter runs the
# programs one after the other in ticket order, so these check the ticket → job decoding and the slot arithmetic
# (a job reading or refilling the wrong slot gives a wrong output; one waiting on a later ticket never ends); the
# concurrent waits run on the GPU (tests/test_gpu.py).
# name: grid, tiling, query frames, key frames, block-causal frames, config (None = the launcher's default), batch,
# heads, scratch budget in ring slots (None = default)
STREAMED_CASES = {
    "bidirectional-111": ((2, 3, 5), (1, 1, 1), (0, 2), (0, 2), None, None, 2, 2, None),
    # 3 tiles of width 5 per 16-row group: 7 tiles = groups {0,1,2}, {3,4,5}, {6}; key tiles over 2 R-step jobs
    "packed-groups-split": ((7, 2, 5), (1, 1, 1), (0, 7), (0, 7), None, dict(BLOCK_M=16, F_SPLIT=2), 1, 2, None),
    # a group holds tiles of two chunks (different visible key tiles); ring of 3 with lag 1 (4 groups: 4 heads)
    "block-causal-ring3": ((6, 2, 5), (1, 1, 1), (0, 6), (0, 6), 3,
                           dict(BLOCK_M=32, F_SPLIT=3, SLOTS=3, LAG=1), 1, 4, None),
    # a ring of 2 with lag 1: each slot is refilled by the group right after the one reading it
    "ring2-lag1": ((5, 2, 5), (1, 1, 1), (0, 5), (0, 5), None, dict(BLOCK_M=16, SLOTS=2, LAG=1), 1, 2, None),
    # one slot, no lag: every group's R-step jobs wait for the previous group's L-step jobs
    "kv-cache-one-slot": ((9, 3, 7), (1, 1, 1), (3, 9), (0, 9), None, dict(BLOCK_M=16, SLOTS=1, LAG=0), 1, 2, None),
    "block-causal-311": ((6, 3, 5), (3, 1, 1), (0, 6), (0, 6), 3, None, 1, 1, None),
    # a budget of 2 slots caps a ring of 4 (lag 1 still fits)
    "budget-caps-ring": ((3, 4, 18), (1, 2, 1), (0, 3), (0, 3), None, dict(SLOTS=4, LAG=1), 1, 3, 2),
    # a budget of 1 slot: the lag drops to 0 (one group in flight)
    "budget-below-lag": ((3, 4, 18), (1, 2, 1), (0, 3), (0, 3), None, dict(SLOTS=4, LAG=2), 1, 3, 1),
}


@pytest.mark.parametrize("case", list(STREAMED_CASES))
def test_streamed_forward_matches_reference(case, monkeypatch):
    from toolkit.kernels import monarch as km

    grid, tiling, qf, kf, bc, cfg, batch, heads, budget_slots = STREAMED_CASES[case]
    q, k, v = _inputs(grid, qf, kf, batch=batch, heads=heads, seed=len(case))
    n_query_tiles = (qf[1] - qf[0]) // tiling[0] * tiling[1] * tiling[2]
    b1, b2 = tiling[0] * grid[1] // tiling[1], grid[2] // tiling[2]
    base = km._streamed_default(b1, b2)
    config = None if cfg is None else ({**base, "BLOCK_I": 16, "BLOCK_K": 16, **cfg}, None)
    per_slot = ((config or (base,))[0]["BLOCK_M"] // b2) * b2 * (kf[1] - kf[0]) // tiling[0] * tiling[1] \
        * tiling[2] * b1 * (2 * q.shape[-1] * 4 + 4)
    rings = []
    real_scratch = km.scratch
    monkeypatch.setattr(km, "scratch", lambda shape, *a: rings.append(shape[0]) or real_scratch(shape, *a))
    out = _forward(q, k, v, grid, tiling, query_frames=qf, key_frames=kf, block_causal_frames=bc, configs=config,
                   out=_nan_like(q), version="streamed",
                   scratch_bytes=None if budget_slots is None else budget_slots * per_slot)
    ref = monarch_attention(q.double(), k.double(), v.double(), grid, tiling, query_frames=qf, key_frames=kf,
                            block_causal_frames=bc)
    assert _rel(out, ref) < TOL[torch.float32]
    tiles = (config or (base,))[0]["BLOCK_M"] // b2
    n_groups = batch * heads * -(-n_query_tiles // tiles)
    want = min(n_groups, (config or (base,))[0]["SLOTS"], budget_slots or n_groups)
    assert rings == [want] * 3  # α, Y, c: one ring of the expected number of slots (no more than groups)


# grid, tiling, query frames, key frames, budget in (head, query tile) units, version asked, streamed expected
AUTO_STREAMED_CASES = {
    "one-tile-of-3-heads-over-budget": ((4, 3, 5), (1, 1, 1), (2, 4), (0, 4), 2, None, True),
    "one-tile-of-all-heads-fits": ((4, 3, 5), (1, 1, 1), (2, 4), (0, 4), 3, None, False),
    "v2-asked-for": ((4, 3, 5), (1, 1, 1), (2, 4), (0, 4), 2, "v2", False),
    "tile-wider-than-64-is-v1": ((2, 2, 66), (1, 1, 1), (0, 2), (0, 2), 2, None, False),
}


@pytest.mark.parametrize("case", list(AUTO_STREAMED_CASES))
def test_budget_below_one_tile_of_all_heads_runs_the_streamed_kernel(case, monkeypatch):
    """Where the two-stage kernels would run chunks of one query tile of a head group (v2 tiles, the caller asked
    for no version), the public launcher runs the streamed kernel in that budget instead; its output equals the
    float64 reference either way (3 heads, a partly filled KV cache)."""
    from toolkit.kernels import monarch as km

    grid, tiling, qf, kf, units, version, streamed = AUTO_STREAMED_CASES[case]
    q, k, v = _inputs(grid, qf, kf, heads=3, dim=16, seed=13)
    b1, b2 = grid[1], grid[2]
    per_unit = km.intermediate_bytes_per_tile(b1, b2, kf[1] - kf[0], 16, q.element_size())
    launches = []
    real = km._streamed_launch
    monkeypatch.setattr(km, "_streamed_launch", lambda *a: launches.append(a) or real(*a))
    if version is None:  # the public entry (through the custom op)
        out = monarch_attention_triton(q, k, v, grid, tiling, query_frames=qf, key_frames=kf,
                                       scratch_bytes=units * per_unit)
    else:
        out = _forward(q, k, v, grid, tiling, query_frames=qf, key_frames=kf, scratch_bytes=units * per_unit,
                       version=version, out=_nan_like(q))
    ref = monarch_attention(q.double(), k.double(), v.double(), grid, tiling, query_frames=qf, key_frames=kf)
    assert _rel(out, ref) < TOL[torch.float32]
    assert bool(launches) == streamed


def test_streamed_groups_within_the_budget():
    """Groups of two query tiles are tuned only where one of their slots fits the budget; when not even a one-tile
    slot fits, the one-tile groups (the minimum) remain."""
    from toolkit.kernels.monarch import _streamed_candidates, streamed_groups_within

    candidates = _streamed_candidates(30, 52)
    tiles = lambda cs: sorted({c["BLOCK_M"] // 52 for c in cs})  # noqa: E731
    assert tiles(candidates) == [1, 2]
    assert tiles(streamed_groups_within(candidates, 52, 100, 250)) == [1, 2]
    assert tiles(streamed_groups_within(candidates, 52, 100, 199)) == [1]
    assert tiles(streamed_groups_within(candidates, 52, 100, 50)) == [1]
    one_tile = [c for c in candidates if c["BLOCK_M"] // 52 == 1]
    assert streamed_groups_within(candidates, 52, 100, 50) == one_tile


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
def test_monarch_forward_half_precision(dtype, dim):
    grid, tiling, qf, kf = (3, 2, 6), (1, 1, 1), (0, 3), (0, 3)
    q, k, v = _inputs(grid, qf, kf, heads=1, dim=dim, dtype=dtype, seed=dim)
    out = _forward(q, k, v, grid, tiling, out=_nan_like(q))
    assert out.dtype == dtype
    ref = monarch_attention(q.double(), k.double(), v.double(), grid, tiling)
    assert _rel(out, ref) < TOL[dtype]


def test_public_launcher_is_a_custom_op_that_compiles():
    """``monarch_attention_triton`` runs the ``torch.library`` op: its fake implementation gives the output's
    shape and dtype without running anything, ``opcheck`` accepts the registration, and ``torch.compile`` traces
    a function calling it (fullgraph: the op is one node) to the same result as the eager op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    grid, tiling, qf, kf = (6, 2, 5), (1, 2, 1), (3, 6), (0, 6)
    q, k, v = _inputs(grid, qf, kf, heads=2, seed=5)
    eager = monarch_attention_triton(q, k, v, grid, tiling, query_frames=qf, key_frames=kf, scale=0.3)
    ref = monarch_attention(q.double(), k.double(), v.double(), grid, tiling, query_frames=qf, key_frames=kf,
                            scale=0.3)
    assert _rel(eager, ref) < TOL[torch.float32]

    def model(q, k, v):
        out = monarch_attention_triton(q, k, v, grid, tiling, query_frames=qf, key_frames=kf, scale=0.3)
        return out * 2 + 1

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(q, k, v), eager * 2 + 1)

    q16, k16, v16 = (x.to(torch.bfloat16) for x in (q, k, v))
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q16, k16, v16))
        fake = monarch_attention_triton(fq, fk, fv, grid, tiling, query_frames=qf, key_frames=kf)
    assert fake.shape == q.shape and fake.dtype == torch.bfloat16 and fake.device == q.device
    torch.library.opcheck(torch.ops.toolkit.monarch_attention.default,
                          (q, k, v, list(grid), list(tiling), list(qf), list(kf), None, 0.3, None),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("mode", ["kv-cache", "block-causal-mask"])
def test_seam_calls_match_reference_backend(mode):
    """The backend's Triton path (what runs on CUDA tensors) against the reference backend, for the two seam
    call shapes of a causal model; on CPU tensors the backend itself delegates to that reference."""
    grid = (6, 2, 5)
    tpf = grid[1] * grid[2]
    if mode == "kv-cache":  # queries of chunk 1 against the cache up to its end
        tiling, qf, mask, seed = (1, 2, 1), (3, 6), None, 3
    else:  # no-cache training call with the 3-frame block-causal mask
        frame = torch.arange(6 * tpf) // tpf
        tiling, qf, mask, seed = (3, 1, 1), (0, 6), (frame[None, :] // 3) <= (frame[:, None] // 3), 4
    q, k, v = _inputs(grid, qf, (0, 6), seed=seed)
    ctx = AttentionContext(layer=0, step=0, chunk=qf[0] // 3, is_clean=False, timestep=500.0, scale=0.3, grid=grid,
                           query_frames=qf, key_frames=(0, 6), attn_mask=mask)
    want = monarch_backend(tiling)(q.double(), k.double(), v.double(), ctx)
    got = monarch_backend_triton(tiling, cpu_fallback=False)(q, k, v, ctx)  # the Triton path, interpreted
    assert _rel(got, want) < TOL[torch.float32]
    assert _rel(monarch_backend_triton(tiling)(q, k, v, ctx), want) < TOL[torch.float32]


def _head_leading(*xs):
    return tuple(x.transpose(1, 2).double() for x in xs)


@pytest.mark.parametrize("source", ["exact-projection", "variational-kv-cache"])
def test_explicit_factors_apply(source):
    if source == "exact-projection":
        grid, tiling, qf, kf = (2, 4, 6), (1, 2, 1), (0, 2), (0, 2)
    else:
        grid, tiling, qf, kf = (6, 3, 5), (1, 1, 1), (3, 6), (0, 6)
    q, k, v = _inputs(grid, qf, kf, seed=5)
    qh, kh, vh = _head_leading(q, k, v)
    layout = MonarchLayout.aligned(grid, "fh,w", tiling)
    if source == "exact-projection":
        _, factors = exact_projection(qh, kh, layout, query_frames=qf, key_frames=kf, return_factors=True)
    else:
        _, factors = monarch_attention(q.double(), k.double(), v.double(), grid, tiling, query_frames=qf,
                                       key_frames=kf, return_factors=True)
    out, row_sums = apply_factors(factors, v, out=torch.full(q.shape, float("nan")),
                                  row_sums=torch.full(q.shape[:3], float("nan")))
    dense = factors.dense()  # b h i j
    assert _rel(out, torch.einsum("bhij,bjhd->bihd", dense, v.double())) < TOL[torch.float32]
    assert _rel(row_sums, dense.sum(-1).transpose(1, 2)) < TOL[torch.float32]


def _dense_probs(q, k, grid, qf, kf, bc, scale):
    """Float64 probabilities ``b h i j`` of ``b i h d`` inputs, block-causal over frames when ``bc`` is given."""
    allowed = None
    if bc is not None:
        tpf = grid[1] * grid[2]
        q_frame = qf[0] + torch.arange(q.shape[1]) // tpf
        k_frame = kf[0] + torch.arange(k.shape[1]) // tpf
        allowed = (k_frame[None, :] // bc) <= (q_frame[:, None] // bc)
    return dense_attention(q.transpose(1, 2), k.transpose(1, 2), scale=scale, allowed=allowed).probs


@pytest.mark.parametrize("mode", ["implicit-block-causal", "explicit-kv-cache"])
def test_streaming_comparison(mode):
    if mode == "implicit-block-causal":
        grid, tiling, qf, kf, bc = (6, 2, 5), (3, 1, 1), (0, 6), (0, 6), 3
    else:
        grid, tiling, qf, kf, bc = (4, 3, 5), (1, 1, 1), (2, 4), (0, 4), None
    q, k, v = _inputs(grid, qf, kf, heads=1, seed=6)
    scale = q.shape[-1] ** -0.5
    _, factors = monarch_attention(q.double(), k.double(), v.double(), grid, tiling, query_frames=qf,
                                   key_frames=kf, block_causal_frames=bc, return_factors=True)
    if mode == "explicit-kv-cache":
        layout = MonarchLayout.aligned(grid, "fh,w", tiling)
        _, factors = exact_projection(*_head_leading(q, k), layout, query_frames=qf, key_frames=kf,
                                      return_factors=True)
        got = monarch_compare(q, k, v, grid, tiling, query_frames=qf, key_frames=kf, factors=factors)
    else:
        got = monarch_compare(q, k, v, grid, tiling, query_frames=qf, key_frames=kf, block_causal_frames=bc)
    A = _dense_probs(q, k, grid, qf, kf, bc, scale)  # b h i j
    M = factors.dense()
    av, mv = (torch.einsum("bhij,bjhd->bihd", x, v.double()) for x in (A, M))
    want = {
        "map_sq_err": (A - M).square().sum(-1).transpose(1, 2),
        "map_sq_norm": A.square().sum(-1).transpose(1, 2),
        "out_err": (av - mv).norm(dim=-1),
        "out_norm": av.norm(dim=-1),
        "monarch_row_sum": M.sum(-1).transpose(1, 2),
    }
    assert want["map_sq_err"].min() > 0  # the comparison is not trivially zero
    for name, ref in want.items():
        assert _rel(getattr(got, name), ref) < 1e-4, name
    # per-head sums in the reference's MonarchErrors form, as its map_errors computes them
    if bc is None:
        ref_errors = map_errors(*_head_leading(q, k), factors, v=v.transpose(1, 2).double())
        heads = got.per_head()
        assert heads.n_entries == ref_errors.n_entries
        assert _rel(heads.sq_error, ref_errors.sq_error) < 1e-4
        assert _rel(heads.out_sq_error, ref_errors.out_sq_error) < 1e-4


@pytest.mark.parametrize("tiling,qf,kf,bc", [((1, 2, 1), (0, 6), (0, 6), 3), ((3, 1, 1), (3, 6), (0, 6), None),
                                             ((1, 1, 2), (0, 6), (0, 6), None)])
def test_key_tiles_and_flops_match_the_reference_accounting(tiling, qf, kf, bc):
    grid = (6, 4, 10)
    gq, gk = kcommon.TileGeometry(grid, tiling, qf), kcommon.TileGeometry(grid, tiling, kf)
    layout = MonarchLayout.aligned(grid, "fh,w", tiling)
    allowed = allowed_tiles(layout, qf, kf, bc)  # bool A × F, a prefix of key tiles per query tile
    assert torch.equal(kcommon.key_tiles_allowed(gq, gk, bc), allowed.sum(1).to(torch.int32))
    assert torch.equal(allowed, torch.arange(gk.num_tiles)[None, :] < allowed.sum(1, keepdim=True))
    ratio = monarch_flops(grid, tiling, qf, kf, heads=1, head_dim=64, block_causal_frames=bc) / dense_flops(
        gq.n_tokens, gk.n_tokens, heads=1, head_dim=64)
    assert ratio == pytest.approx(layout.flop_ratio(1) * allowed.float().mean().item(), rel=1e-12)


@pytest.mark.parametrize("mode", ["kv-cache", "block-causal-no-v"])
def test_monarch_sweep_kernel_comparison_matches_reference(mode, monkeypatch):
    """``toolkit.analysis.monarch.analyze_record`` with the streaming Triton comparison (what ``compare='auto'``
    picks on CUDA) gives the same variational errors as its PyTorch ``map_errors`` path."""
    import toolkit.analysis.monarch as analysis
    from toolkit.analysis.records import RecordTensors

    grid = (6, 3, 5)  # b1 = 3 rows, b2 = 5 columns per tile at (1, 1, 1)
    tpf = grid[1] * grid[2]
    if mode == "kv-cache":  # queries of chunk 1 against keys of frames 0..6
        qf, bc, iters, tilings = (3, 6), None, 1, ((1, 1, 1), (3, 1, 1))
    else:  # two iterations: the trace compares each iteration's factors
        qf, bc, iters, tilings = (0, 6), 3, 2, ((3, 1, 1),)
    layouts = [MonarchLayout.aligned(grid, "fh,w", t) for t in tilings]
    q, k, v = _head_leading(*_inputs(grid, qf, (0, 6), heads=1, seed=7))
    q, k, v = q[0], k[0], v[0]  # h i d
    scale = 0.4
    logits = q @ k.transpose(-1, -2) * scale  # h i j
    if bc is not None:
        q_frame, k_frame = qf[0] + torch.arange(q.shape[1]) // tpf, torch.arange(k.shape[1]) // tpf
        logits = logits.masked_fill((k_frame[None, :] // bc) > (q_frame[:, None] // bc), float("-inf"))
    lse = torch.logsumexp(logits, -1)  # the record's lse over the attended keys
    common = dict(layouts=layouts, iters=iters, projection=False, topk_baseline=False, block_causal_frames=bc)
    q_tok, k_tok = torch.arange(qf[0] * tpf, qf[1] * tpf), torch.arange(6 * tpf)
    v_in = None if mode == "block-causal-no-v" else v
    t = RecordTensors(q=q, k=k, v=v_in, lse=lse, query_tokens=q_tok, key_tokens=k_tok, grid=grid, scale=scale)
    want = analysis.analyze_record(t, analysis.MonarchOptions(compare="reference", **common))

    def no_reference(*args, **kwargs):
        raise AssertionError("the Triton path must not call the reference map_errors")

    monkeypatch.setattr(analysis, "map_errors", no_reference)
    got = analysis.analyze_record(t, analysis.MonarchOptions(compare="triton", **common))
    assert set(got.data_vars) == set(want.data_vars)
    measured = ["variational_map_mse", "variational_rel_fro"] + (["variational_out_rel_l2"] if v_in is not None else [])
    for name in measured:  # errors of a real approximation: finite and not zero
        assert (torch.from_numpy(want[name].values) > 0).all(), name
    for name in want.data_vars:  # fp32 streaming sums vs float64 reference sums
        torch.testing.assert_close(torch.from_numpy(got[name].values), torch.from_numpy(want[name].values),
                                   rtol=2e-5, atol=0, equal_nan=True, msg=name)
