"""The Monarch backward kernels (``kernels/monarch_backward.py``, under the Triton interpreter) against autograd of
the float64 PyTorch reference ``toolkit.attention.monarch.monarch_attention``: dq, dk, dv in the three modes, at
tilings with awkward (non-power-of-two) tile heights b1, widths b2 and key-tile counts F, head dims that are
zero-padded, several scratch chunks, half precision, every tuning candidate's blocks; the tuning-cache round trip;
plus the op's tracing contract (fake backward, aot_eager).
Kernel scratch is NaN-poisoned, so an intermediate no program wrote cannot pass."""

from __future__ import annotations

import json

import pytest
import toolkit.kernels._common as kcommon
import toolkit.kernels.monarch as kmonarch
import toolkit.kernels.monarch_backward as kbackward
import torch
from toolkit.kernels import monarch_attention_triton
from toolkit.kernels._common import TileGeometry

from toolkit.attention.monarch import monarch_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ‖grad − ref‖/‖ref‖ bounds. fp32: products are exact in the interpreter, so only fp32 rounding of the sums is
# left (measured ≤ 4e-7); dropping or flipping any single term of the backward gives ≥ 0.2. Half precision rounds
# α, Y, dα, dY, s·dx, the output (Δ = dO·out) and the product operands to the input dtype: measured ≤ 1.7e-2
# (bf16) and ≤ 8.2e-4 (fp16) over three seeds, about what the forward alone shows at these few keys.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 4e-2}


@pytest.fixture(autouse=True)
def poison_scratch(monkeypatch):
    monkeypatch.setattr(kcommon, "POISON_SCRATCH", True)


def _tensors(grid, query_frames, key_frames, heads, dim, batch, seed):
    g = torch.Generator().manual_seed(seed)
    tpf = grid[1] * grid[2]
    n_q, n_k = (query_frames[1] - query_frames[0]) * tpf, (key_frames[1] - key_frames[0]) * tpf
    q, k, v = (torch.randn(batch, n, heads, dim, generator=g, dtype=torch.float64) for n in (n_q, n_k, n_k))
    return q, k, v, torch.randn(batch, n_q, heads, dim, generator=g, dtype=torch.float64)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "unwritten (NaN-poisoned) or non-finite gradient"
    return ((x.double() - ref).norm() / ref.norm()).item()


def _reference_grads(q, k, v, grad_out, grid, tiling, **kw):
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    out = monarch_attention(*leaves, grid, tiling, scale=0.35, **kw)
    return torch.autograd.grad(out, leaves, grad_out.double())


# grid, tiling, query frames, key frames, block-causal frames, heads, head dim, batch, scratch bytes
CASES = {
    # b1 = 3, b2 = 17 (two column blocks of 16 in the R-step backward, the second partial), F = 2; d = 20 padded
    "bidirectional-111": ((2, 3, 17), (1, 1, 1), (0, 2), (0, 2), None, 1, 20, 1, None),
    # w_reduce = 2: tile columns are not contiguous tokens (b1 = 2, b2 = 3, F = 4); batch 2
    "bidirectional-112-batch2": ((2, 2, 6), (1, 1, 2), (0, 2), (0, 2), None, 1, 16, 2, None),
    # h_reduce = 2: 8 key tiles of b1 = 2 in 2 chunks of 2 frames (query tile a sees key tiles up to its chunk's end)
    "block-causal-121": ((4, 4, 5), (1, 2, 1), (0, 4), (0, 4), 2, 1, 16, 1, None),
    # tiles of 3 frames (b1 = 6, b2 = 5, F = 2), 2 heads; scratch for one tile of one head: 4 chunks, so dk, dv
    # add up over query-tile chunks and every kernel runs on head-sliced views
    "block-causal-311-chunked": ((6, 2, 5), (3, 1, 1), (0, 6), (0, 6), 3, 2, 12, 1, 1),
    # a chunk against a partly filled cache (keys are frames 0–3 of a 6-frame grid): A = 2, F = 4, b2 = 7
    "kv-cache-111": ((6, 3, 7), (1, 1, 1), (2, 4), (0, 4), None, 1, 24, 1, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_backward_kernels_match_float64_reference_gradients(case):
    grid, tiling, qf, kf, bc, heads, dim, batch, scratch_bytes = CASES[case]
    q, k, v, grad_out = _tensors(grid, qf, kf, heads=heads, dim=dim, batch=batch, seed=len(case))
    kw = dict(query_frames=qf, key_frames=kf, block_causal_frames=bc)
    leaves = [x.float().requires_grad_(True) for x in (q, k, v)]
    out = monarch_attention_triton(*leaves, grid, tiling, scale=0.35, scratch_bytes=scratch_bytes, **kw)
    got = torch.autograd.grad(out, leaves, grad_out.float())
    want = _reference_grads(q, k, v, grad_out, grid, tiling, **kw)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert _rel(a, b) < TOL[torch.float32], f"d{name}: relative error {_rel(a, b):.2e}"


def _launcher_grads(q, k, v, grad_out, grid, tiling, query_frames, out=None, **kw):
    """dq, dk, dv from ``monarch_attention_backward`` called directly (as the op calls it), for its keywords; keys
    are all frames up to the queries' end (a KV-cache chunk when the queries start later). ``out``: the forward's
    output if already computed. The forward's v1 R-step: fewer interpreted programs than v2's at these shapes."""
    qf, kf = query_frames, (0, query_frames[1])
    gq, gk = TileGeometry(grid, tiling, qf), TileGeometry(grid, tiling, kf)
    if out is None:
        out = kmonarch._forward(q, k, v, grid, tiling, query_frames=qf, key_frames=kf, scale=0.35, version="v1")

    def recompute_rows(step):
        kmonarch._forward(q, k, v, grid, tiling, query_frames=qf, key_frames=kf, scale=0.35, version="v1",
                          after_rows=step)

    return kbackward.monarch_attention_backward(q, k, v, out, grad_out, gq, gk, None, 0.35, recompute_rows, **kw)


def _distinct_blocks(configs: list[dict]) -> list[dict]:
    """The first config of each distinct set of blocks: the interpreter ignores warps and stages."""
    first: dict[tuple, dict] = {}
    for c in configs:
        first.setdefault(tuple((n, v) for n, v in c.items() if n.startswith("BLOCK")), c)
    return list(first.values())


# (grid, query frames): one query tile (a KV-cache chunk) keeps the interpreter's program count low.
# 65 keys per column (F = 5 key tiles of b1 = 13 rows): the L-step loops over a second, partial key block at
# BLOCK_K = 64 (three blocks at 32)
MANY_KEYS = ((5, 13, 3), (4, 5))
# tile width b2 = 33: the R-step loops over a second, partial column block at BLOCK_J = 32 (three at 16)
WIDE_TILES = ((2, 1, 33), (1, 2))


@pytest.mark.parametrize("kernel", ["cols", "rows"])
def test_every_candidate_config_matches_float64_reference(kernel):
    """Every tuning candidate gives the reference gradients, at a shape where its loop runs over a second, partial
    block: the L-step's key blocks at MANY_KEYS, the R-step's column blocks at WIDE_TILES (the dq₂ kernel's
    candidates differ in warps and stages only, run by both). The other kernels run their defaults."""
    (grid, qf), dim = (MANY_KEYS if kernel == "cols" else WIDE_TILES), 16
    i = ("cols", "rows").index(kernel)
    kf = (0, qf[1])
    tiling = (1, 1, 1)
    geometry = TileGeometry(grid, tiling, qf)
    defaults = kbackward.backward_configs(geometry.b1, geometry.b2, dim)
    blocks = _distinct_blocks(kbackward.backward_candidates(geometry.b1, geometry.b2, dim)[i])
    assert [c[("BLOCK_K", "BLOCK_J")[i]] for c in blocks] == [(32, 16)[i], 64 // (i + 1)]
    assert _distinct_blocks(kbackward.backward_candidates(geometry.b1, geometry.b2, dim)[2]) == [defaults[2]]
    q, k, v, grad_out = _tensors(grid, qf, kf, heads=1, dim=dim, batch=1, seed=17 + i)
    want = _reference_grads(q, k, v, grad_out, grid, tiling, query_frames=qf, key_frames=kf)
    q, k, v, grad_out = (x.float() for x in (q, k, v, grad_out))
    out = kmonarch._forward(q, k, v, grid, tiling, query_frames=qf, key_frames=kf, scale=0.35, version="v1")
    for cfg in blocks:
        configs = tuple(cfg if j == i else defaults[j] for j in range(3))
        got = _launcher_grads(q, k, v, grad_out, grid, tiling, qf, out=out, configs=configs)
        for name, a, b in zip("qkv", got, want):
            assert _rel(a, b) < TOL[torch.float32], f"d{name} at {cfg}: relative error {_rel(a, b):.2e}"


def test_tuned_configs_are_cached_and_read_back_without_tuning(tmp_path, monkeypatch):
    """With a (faked) GPU the tuner times every candidate of each backward kernel once, on the first scratch chunk,
    writes the winners to TOOLKIT_KERNEL_CACHE and leaves the gradients exact (the R-step kernel adds into dk, dv,
    so its timed runs must not); a new process (empty in-memory memo) reads the winners back and times nothing."""
    monkeypatch.setenv("TOOLKIT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kcommon, "_PICKED", {})
    monkeypatch.setattr(kcommon, "interpreted", lambda: False)  # kernels still run interpreted; tuning is allowed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "test-gpu")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: None)
    timed = []

    def fake_bench(fn, **_):  # runs the candidate once; each later candidate is "faster", so the last one wins
        fn()
        timed.append(1)
        return 1.0 / len(timed)

    monkeypatch.setattr(kcommon.triton.testing, "do_bench", fake_bench)
    all_candidates = kbackward.backward_candidates
    # two candidates per kernel are enough for the round trip (and cheap under the interpreter)
    monkeypatch.setattr(kbackward, "backward_candidates", lambda *shape: tuple(c[:2] for c in all_candidates(*shape)))
    grid, tiling, qf = (2, 2, 5), (1, 1, 1), (1, 2)
    q, k, v, grad_out = _tensors(grid, qf, (0, 2), heads=1, dim=16, batch=1, seed=19)
    want = _reference_grads(q, k, v, grad_out, grid, tiling, query_frames=qf, key_frames=(0, 2))
    winners = [lst[-1] for lst in kbackward.backward_candidates(2, 5, 16)]

    for source in ("tuned", "cached"):
        n_log, timed[:] = len(kcommon.TUNING_LOG), []
        got = _launcher_grads(q.float(), k.float(), v.float(), grad_out.float(), grid, tiling, qf, autotune=True)
        log = [t for t in kcommon.TUNING_LOG[n_log:] if t["key"].startswith("monarch bwd")]
        assert [t["source"] for t in log] == [source] * 3
        assert [t["config"] for t in log] == winners
        assert len(timed) == (sum(map(len, kbackward.backward_candidates(2, 5, 16))) if source == "tuned" else 0)
        for name, a, b in zip("qkv", got, want):
            assert _rel(a, b) < TOL[torch.float32], f"d{name} ({source} configs): relative error {_rel(a, b):.2e}"
        kcommon._PICKED.clear()  # the next round is a new process: only the disk cache remains
    cache = json.loads((tmp_path / "kernel_tuning.json").read_text())
    assert sum(key.startswith("test-gpu|") and "monarch bwd" in key for key in cache) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_half_precision(dtype):
    grid, tiling, qf, kf = (4, 2, 3), (1, 1, 1), (0, 4), (0, 4)
    q, k, v, grad_out = (x.to(dtype) for x in _tensors(grid, qf, kf, heads=1, dim=16, batch=1, seed=11))
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = monarch_attention_triton(*leaves, grid, tiling, scale=0.35, block_causal_frames=2)
    got = torch.autograd.grad(out, leaves, grad_out)
    want = _reference_grads(q, k, v, grad_out, grid, tiling, block_causal_frames=2)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype
        assert _rel(a, b) < TOL[dtype], f"d{name}: relative error {_rel(a, b):.2e}"


def test_kv_cache_gradient_reaches_only_the_new_chunk():
    """A chunk that trains against a detached cache passes k = cat(cache.detach(), k_new): k_new's gradient is the
    reference's gradient of its slice of k (the cache gets none)."""
    grid, tiling, qf, kf = (4, 4, 3), (1, 2, 1), (2, 4), (0, 4)
    q, k, v, grad_out = _tensors(grid, qf, kf, heads=1, dim=16, batch=1, seed=7)
    n_cache = 2 * grid[1] * grid[2]
    k_new, v_new = (x[:, n_cache:].float().requires_grad_(True) for x in (k, v))
    k_all = torch.cat([k[:, :n_cache].float().detach(), k_new], 1)
    v_all = torch.cat([v[:, :n_cache].float().detach(), v_new], 1)
    out = monarch_attention_triton(q.float(), k_all, v_all, grid, tiling, query_frames=qf, key_frames=kf,
                                   scale=0.35)
    got_k, got_v = torch.autograd.grad(out, (k_new, v_new), grad_out.float())
    _, want_k, want_v = _reference_grads(q, k, v, grad_out, grid, tiling, query_frames=qf, key_frames=kf)
    assert _rel(got_k, want_k[:, n_cache:]) < TOL[torch.float32]
    assert _rel(got_v, want_v[:, n_cache:]) < TOL[torch.float32]


def test_backward_op_traces_and_compiles():
    """The backward is its own op with a fake implementation: ``opcheck`` accepts it, and a function calling the
    forward op differentiates under ``torch.compile(backend="aot_eager")`` to the eager gradients."""
    grid, tiling, qf, kf = (2, 2, 3), (1, 1, 1), (0, 2), (0, 2)
    q, k, v, grad_out = (x.float() for x in _tensors(grid, qf, kf, heads=1, dim=16, batch=1, seed=5))

    def model(q, k, v):
        return monarch_attention_triton(q, k, v, grid, tiling, scale=0.35) * 2

    def grads(fn):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        return torch.autograd.grad(fn(*leaves), leaves, grad_out)

    eager = grads(model)
    compiled = grads(torch.compile(model, backend="aot_eager", fullgraph=True))
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)
    out = model(q, k, v) / 2
    torch.library.opcheck(torch.ops.toolkit.monarch_attention_backward.default,
                          (q, k, v, out, grad_out, list(grid), list(tiling), list(qf), list(kf), None, 0.35, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_tiles_taller_than_the_kernel_takes_get_reference_gradients(monkeypatch):
    """b1 > MAX_BACKWARD_ROWS (one column's rows no longer fit one block on sm_90): the op's backward is the
    PyTorch reference's autograd, the kernels are not launched."""
    import toolkit.kernels.monarch as kmonarch

    def no_kernels(*args, **kwargs):
        raise AssertionError("backward kernels launched for b1 > MAX_BACKWARD_ROWS")

    monkeypatch.setattr(kmonarch, "monarch_attention_backward", no_kernels)
    monkeypatch.setattr(kmonarch, "MAX_BACKWARD_ROWS", 2)  # the real limit, 128, needs a slow forward here
    grid, tiling = (2, 3, 5), (1, 1, 1)  # b1 = 3
    q, k, v, grad_out = _tensors(grid, (0, 2), (0, 2), heads=1, dim=16, batch=1, seed=13)
    leaves = [x.float().requires_grad_(True) for x in (q, k, v)]
    out = monarch_attention_triton(*leaves, grid, tiling, scale=0.35)
    got = torch.autograd.grad(out, leaves, grad_out.float())
    for name, a, b in zip("qkv", got, _reference_grads(q, k, v, grad_out, grid, tiling)):
        assert _rel(a, b) < TOL[torch.float32], f"d{name}: relative error {_rel(a, b):.2e}"
