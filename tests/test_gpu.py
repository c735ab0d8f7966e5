"""Full-shape GPU checks: the Triton kernels against float64 torch references at the paper's shapes, and
``--attention monarch`` inside a model. Marked ``gpu`` and deselected by default (pyproject's ``addopts`` has
``-m "not gpu"``); skipped without CUDA. Run on the device machine (about a minute on an H200):

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python3 -m pytest -q -m gpu tests/test_gpu.py

The paper's shape is Self-Forcing on Wan2.1-1.3B: token grid 21 frames × 30 × 52 = 32,760 tokens, 12 heads of
head dim 128, batch 1, bf16. Each check is a helper that takes the shapes and the device, so the same code can be
exercised on the CPU at tiny shapes through the Triton interpreter while debugging.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

PAPER_GRID = (21, 30, 52)
HEADS, DIM = 12, 128
# ‖out − ref‖/‖ref‖ bound for bf16 Monarch: q, k, v are rounded to bf16 before the float64 reference sees them,
# so the error is the kernel's own: R and the α/Y intermediates are stored in bf16 (relative rounding 2⁻⁸ ≈ 4e-3
# per element, random in sign, so the output error stays below that), fp32 accumulation. Measured 3.5e-3 on an
# H100 (README); the tiny-shape CPU tests use 3e-2 because their few keys do not average the rounding out.
MONARCH_BF16_TOL = 1e-2


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite (unwritten) output"
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _qkv(grid, query_frames, key_frames, heads, dim, dtype, device, seed):
    """Fresh random ``b n h d`` inputs in the kernel dtype (the reference upcasts exactly these values)."""
    g = torch.Generator().manual_seed(seed)
    tpf = grid[1] * grid[2]
    n_q, n_k = (query_frames[1] - query_frames[0]) * tpf, (key_frames[1] - key_frames[0]) * tpf
    return tuple(torch.randn(1, n, heads, dim, generator=g).to(device=device, dtype=dtype) for n in (n_q, n_k, n_k))


def monarch_rel_error(grid, tiling, query_frames, key_frames, block_causal_frames=None, *, heads=HEADS, dim=DIM,
                      ref_heads=(0, 7), dtype=torch.bfloat16, version=None, device="cuda", seed=0,
                      scratch_over_q: float | None = None) -> float:
    """Relative L2 error of the Triton Monarch forward (all heads, as the model calls it) against the float64
    reference on ``ref_heads``. The reference materialises R, α and L in float64 (≈ 1–4 GB per head at 32,760
    tokens): two heads keep it to a few seconds and ~10 GB; Monarch heads are independent, so a subset of heads
    checks the kernel's indexing of the head dim as well as all of them would. ``scratch_over_q``: the public
    entry's scratch budget in units of size(q)."""
    from toolkit.kernels import monarch_attention_triton
    from toolkit.kernels.monarch import _forward

    from toolkit.attention.monarch import monarch_attention

    q, k, v = _qkv(grid, query_frames, key_frames, heads, dim, dtype, device, seed)
    kw = dict(query_frames=query_frames, key_frames=key_frames, block_causal_frames=block_causal_frames)
    if version is None:  # the public entry point (the torch.library op toolkit::monarch_attention)
        scratch = None if scratch_over_q is None else int(scratch_over_q * q.numel() * q.element_size())
        out = monarch_attention_triton(q, k, v, grid, tiling, scratch_bytes=scratch, **kw)
    else:
        out = _forward(q, k, v, grid, tiling, version=version, **kw)
    hs = list(ref_heads)
    ref = monarch_attention(q[:, :, hs].double(), k[:, :, hs].double(), v[:, :, hs].double(), grid, tiling, **kw)
    return _rel(out[:, :, hs], ref)


# name: grid, tiling, query frames, key frames, block-causal frames, R-step version (None = launcher default)
MONARCH_CASES = {
    "full-111": (PAPER_GRID, (1, 1, 1), (0, 21), (0, 21), None, None),
    "full-111-v1": (PAPER_GRID, (1, 1, 1), (0, 21), (0, 21), None, "v1"),
    "full-311": (PAPER_GRID, (3, 1, 1), (0, 21), (0, 21), None, None),
    "full-122": (PAPER_GRID, (1, 2, 2), (0, 21), (0, 21), None, None),
    "full-111-block-causal": (PAPER_GRID, (1, 1, 1), (0, 21), (0, 21), 3, None),  # training path
    "last-chunk-111": (PAPER_GRID, (1, 1, 1), (18, 21), (0, 21), None, None),  # KV cache: keys are a prefix
    "last-chunk-121": (PAPER_GRID, (1, 2, 1), (18, 21), (0, 21), None, None),
    "last-chunk-311": (PAPER_GRID, (3, 1, 1), (18, 21), (0, 21), None, None),
    # the fused one-kernel forward (kernels/monarch_fused.cu): every mode at the tilings it covers (b1 ≤ 32)
    "full-111-fused": (PAPER_GRID, (1, 1, 1), (0, 21), (0, 21), None, "fused"),
    "full-121-fused": (PAPER_GRID, (1, 2, 1), (0, 21), (0, 21), None, "fused"),
    "full-111-block-causal-fused": (PAPER_GRID, (1, 1, 1), (0, 21), (0, 21), 3, "fused"),
    "last-chunk-111-fused": (PAPER_GRID, (1, 1, 1), (18, 21), (0, 21), None, "fused"),
    "last-chunk-121-fused": (PAPER_GRID, (1, 2, 1), (18, 21), (0, 21), None, "fused"),
    # both steps in one launch, the intermediates in a ring of slots (kernels/monarch.py _monarch_streamed_fwd)
    "full-111-streamed": (PAPER_GRID, (1, 1, 1), (0, 21), (0, 21), None, "streamed"),
    "full-121-streamed": (PAPER_GRID, (1, 2, 1), (0, 21), (0, 21), None, "streamed"),
    "full-111-block-causal-streamed": (PAPER_GRID, (1, 1, 1), (0, 21), (0, 21), 3, "streamed"),
    "last-chunk-111-streamed": (PAPER_GRID, (1, 1, 1), (18, 21), (0, 21), None, "streamed"),
    "last-chunk-121-streamed": (PAPER_GRID, (1, 2, 1), (18, 21), (0, 21), None, "streamed"),
    "full-311-streamed": (PAPER_GRID, (3, 1, 1), (0, 21), (0, 21), None, "streamed"),  # b1 = 90: 2 row blocks
}


@pytest.mark.parametrize("name", list(MONARCH_CASES))
def test_monarch_kernel_matches_float64_reference_at_paper_shape(name):
    grid, tiling, qf, kf, bc, version = MONARCH_CASES[name]
    err = monarch_rel_error(grid, tiling, qf, kf, bc, version=version, seed=len(name))
    assert err < MONARCH_BF16_TOL, f"{name}: rel err {err:.3g}"


@pytest.mark.parametrize("tiling, qf, bc", [((1, 1, 1), (0, 21), None), ((3, 1, 1), (0, 21), 3),
                                           ((1, 2, 1), (18, 21), None)], ids=["full-111", "causal-311", "cache-121"])
def test_public_entry_within_size_of_q_matches_float64_reference(tiling, qf, bc):
    """A scratch budget of size(q) (below one query tile of all heads) runs the streamed kernel with its ring cut
    to the budget, through the public op."""
    err = monarch_rel_error(PAPER_GRID, tiling, qf, (0, 21), bc, scratch_over_q=1.0, seed=17)
    assert err < MONARCH_BF16_TOL, f"rel err {err:.3g}"


# Awkward shapes for the fused kernel: b1, b2 not multiples of 8 or 16 (padding rows k, columns l and j of the
# last column block), b2 = 64 exactly, odd numbers of 16-column l tiles, b1 ≤ 16 (one i tile per warp), batch 2,
# head dims 64 and 128 (the bundled model's 40 padded to 64 by the public entry), fp16, block-causal and KV-cache.
# name: grid, tiling, query frames, key frames, block-causal frames, batch, heads, head dim, dtype
FUSED_CASES = {
    "bundled-111-causal": ((12, 20, 32), (1, 1, 1), (0, 12), (0, 12), 3, 2, 4, 40, torch.bfloat16),
    "bundled-121-cache": ((12, 20, 32), (1, 2, 1), (9, 12), (0, 12), None, 1, 4, 64, torch.bfloat16),
    "7x13-cache": ((6, 7, 13), (1, 1, 1), (3, 6), (0, 6), None, 2, 3, 128, torch.bfloat16),
    "16x64-fp16": ((4, 16, 64), (1, 1, 1), (0, 4), (0, 4), None, 1, 2, 128, torch.float16),
    "15x26-122": ((6, 30, 52), (1, 2, 2), (0, 6), (0, 6), None, 1, 2, 128, torch.bfloat16),
    "32x40-fp16-causal": ((6, 32, 40), (1, 1, 1), (0, 6), (0, 6), 2, 1, 3, 64, torch.float16),
    "9x50": ((2, 9, 50), (1, 1, 1), (0, 2), (0, 2), None, 1, 3, 128, torch.bfloat16),
}
FUSED_SMALL_TOL = 2e-2  # few keys per row: less averaging of the bf16 rounding than at the paper shape


@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_kernel_matches_float64_reference_and_two_stage_kernel(name):
    from toolkit.kernels.monarch import _forward

    from toolkit.attention.monarch import monarch_attention

    grid, tiling, qf, kf, bc, batch, heads, dim, dtype = FUSED_CASES[name]
    g = torch.Generator().manual_seed(len(name))
    tpf = grid[1] * grid[2]
    n_q, n_k = (qf[1] - qf[0]) * tpf, (kf[1] - kf[0]) * tpf
    # q as a strided view of a packed [q | padding] tensor: the launcher copies only what its loads cannot take
    q = torch.randn(batch, n_q, heads, dim + 8, generator=g).to("cuda", dtype)[..., :dim]
    k, v = (torch.randn(batch, n_k, heads, dim, generator=g).to("cuda", dtype) for _ in range(2))
    # the scale of the unpadded head dim (zero-padding does not change q·k, but the default scale would)
    kw = dict(query_frames=qf, key_frames=kf, block_causal_frames=bc, scale=dim**-0.5)
    ref = monarch_attention(q.double(), k.double(), v.double(), grid, tiling, **kw)
    if dim in (64, 128):  # the kernel itself, into a NaN-filled buffer: every element must be written
        out = torch.full((batch, n_q, heads, dim), float("nan"), device="cuda", dtype=dtype)
        _forward(q, k, v, grid, tiling, version="fused", out=out, **kw)
        inputs = (q.contiguous(), k, v)
    else:  # zero-padded to 64, as the public entry pads the bundled model's 40
        inputs = [torch.nn.functional.pad(x, (0, 64 - dim)) for x in (q, k, v)]
        out = _forward(*inputs, grid, tiling, version="fused", **kw)[..., :dim]
    two_stage = _forward(*inputs, grid, tiling, **kw)[..., :dim]
    err, err_two_stage = _rel(out, ref), _rel(two_stage, ref)
    assert err < FUSED_SMALL_TOL, f"{name}: fused rel err {err:.3g} (two-stage: {err_two_stage:.3g})"
    assert _rel(out, two_stage) < FUSED_SMALL_TOL


@pytest.mark.parametrize("b2, dim", [(52, 128), (64, 128), (32, 64), (13, 128)])
def test_fused_kernel_shared_memory_count_matches_the_launcher(b2, dim):
    from toolkit.kernels.monarch_fused import MAX_B1, _tiles, device_smem_bytes, smem_bytes

    assert device_smem_bytes(b2, dim) == smem_bytes(b2, dim, *_tiles(b2, MAX_B1))


# ‖grad − ref‖/‖ref‖ bound for the backward kernels in bf16 (a prediction, to be confirmed on the first GPU run):
# on top of the forward's bf16 α/Y, the backward rounds dα, dY, s·dx and the operands p, dz, dx of its products to
# bf16 (2⁻⁸ relative each, random in sign); dq, dk, dv are sums of many such terms, as the output is.
MONARCH_BF16_GRAD_TOL = 3e-2


def monarch_grad_rel_errors(grid, tiling, query_frames, key_frames, block_causal_frames=None, *, heads=HEADS,
                            dim=DIM, ref_heads=(0, 7), dtype=torch.bfloat16, device="cuda", seed=0) -> dict:
    """Relative L2 errors of dq, dk, dv from the op's backward kernels (all heads, one call as in training)
    against autograd of the float32 reference, head by head on ``ref_heads`` (one head's autograd graph of
    R, α, L is a few GB at 32,760 tokens; heads are independent)."""
    from toolkit.kernels import monarch_attention_triton

    from toolkit.attention.monarch import monarch_attention

    q, k, v = _qkv(grid, query_frames, key_frames, heads, dim, dtype, device, seed)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    kw = dict(query_frames=query_frames, key_frames=key_frames, block_causal_frames=block_causal_frames)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = monarch_attention_triton(*leaves, grid, tiling, **kw)
    got = torch.autograd.grad(out, leaves, d_out)
    del out
    num, den = {n: 0.0 for n in "qkv"}, {n: 0.0 for n in "qkv"}
    for h in ref_heads:
        ref_leaves = [x[:, :, h:h + 1].float().requires_grad_(True) for x in (q, k, v)]
        ref = monarch_attention(*ref_leaves, grid, tiling, **kw)
        want = torch.autograd.grad(ref, ref_leaves, d_out[:, :, h:h + 1].float())
        del ref
        for name, a, b in zip("qkv", got, want):
            assert torch.isfinite(a[:, :, h]).all(), f"d{name}: non-finite gradient"
            num[name] += (a[:, :, h:h + 1].double() - b.double()).norm().item() ** 2
            den[name] += b.double().norm().item() ** 2
    return {name: (num[name] / den[name]) ** 0.5 for name in "qkv"}


# name: grid, tiling, query frames, key frames, block-causal frames
MONARCH_GRAD_CASES = {
    "full-111": (PAPER_GRID, (1, 1, 1), (0, 21), (0, 21), None),
    "last-chunk-111": (PAPER_GRID, (1, 1, 1), (18, 21), (0, 21), None),  # the last AR chunk against the cache
    "full-311-block-causal": (PAPER_GRID, (3, 1, 1), (0, 21), (0, 21), 3),  # training path
}


@pytest.mark.parametrize("name", list(MONARCH_GRAD_CASES))
def test_monarch_backward_matches_float32_reference_at_paper_shape(name):
    errors = monarch_grad_rel_errors(*MONARCH_GRAD_CASES[name], seed=len(name))
    assert max(errors.values()) < MONARCH_BF16_GRAD_TOL, f"{name}: rel errors {errors}"


def test_monarch_op_is_the_registered_torch_library_op():
    """``torch.ops.toolkit.monarch_attention`` called directly gives the launcher's result bit for bit."""
    from toolkit.kernels import monarch_attention_triton

    q, k, v = _qkv(PAPER_GRID, (18, 21), (0, 21), HEADS, DIM, torch.bfloat16, "cuda", seed=5)
    a = monarch_attention_triton(q, k, v, PAPER_GRID, (1, 1, 1), query_frames=(18, 21), key_frames=(0, 21))
    b = torch.ops.toolkit.monarch_attention(q, k, v, list(PAPER_GRID), [1, 1, 1], [18, 21], [0, 21], None,
                                            DIM**-0.5, None)
    assert torch.equal(a, b)


def pooled_errors(grid, query_frames, key_frames, n_queries, *, heads=2, dim=DIM, dtype=torch.bfloat16,
                  device="cuda", seed=0) -> None:
    """The fused pooled-views kernel against the float64 torch reference (``pooled_sums`` on ``exact`` LSE), and
    the recorder's entry point ``accumulate_pooled`` (which takes the kernel for CUDA tensors) against both."""
    import toolkit.kernels.pooled as kpooled

    from toolkit.attention import exact
    from toolkit.capture.pooled import accumulate_pooled, packed_bins, pooled_sums, unpack

    g = torch.Generator().manual_seed(seed)
    tpf = grid[1] * grid[2]
    chunk = torch.arange(query_frames[0] * tpf, query_frames[1] * tpf)
    tokens = chunk[torch.randperm(len(chunk), generator=g)[:n_queries]].sort().values.to(device)
    n_k = (key_frames[1] - key_frames[0]) * tpf
    # 2·randn: logits of std 4 at scale d^-0.5, i.e. peaked attention (uniform maps would hide binning errors)
    q = (2 * torch.randn(heads, n_queries, dim, generator=g)).to(device=device, dtype=dtype)
    k = (2 * torch.randn(heads, n_k, dim, generator=g)).to(device=device, dtype=dtype)
    scale = dim**-0.5
    lse, bins = kpooled.pooled_lse_and_sums(q, k, scale, tokens, key_frames, grid)
    ref_lse = exact.logsumexp(q.double(), k.double(), scale)
    ref = pooled_sums(q.double(), k.double(), ref_lse, scale, tokens, key_frames, grid, query_chunk=16)
    # bf16 products are exact in fp32 and accumulate in fp32 over 32,760 keys: LSE (≈ 10–40 in nats) to 1e-4
    # absolute, probability sums (each ≤ n_queries) to 1e-4 relative; a wrong bin or a lost split is O(1e-2+).
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-4)
    fm, off_t, off_h, off_w = unpack(bins, grid)
    for got, want in ((fm, ref.frame_mass), (off_t, ref.offset_t), (off_h, ref.offset_h), (off_w, ref.offset_w)):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)
    for part in (fm, off_t, off_h, off_w):  # every marginal holds all the mass: one per query row and head
        torch.testing.assert_close(part.double().flatten(1).sum(1), torch.full((heads,), float(n_queries),
                                   dtype=torch.float64, device=device), rtol=1e-4, atol=0)
    acc = torch.zeros(heads, packed_bins(grid), device=device)
    lse_acc = accumulate_pooled(q, k, scale, tokens, key_frames, grid, acc)
    torch.testing.assert_close(lse_acc, lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(acc, bins, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [(18, 21), (0, 3)])
def test_pooled_kernel_matches_float64_reference_at_paper_grid(chunk):
    # a capture record: 48 random queries of one chunk against the cache up to the chunk's end
    pooled_errors(PAPER_GRID, chunk, (0, chunk[1]), 48, seed=chunk[0])


def rollout_errors(tiling, *, device="cuda", dtype=torch.bfloat16, sharpen=4.0, seed=0) -> tuple[float, float]:
    """One Self-Forcing rollout of a random bundled model (grid 12 × 20 × 32, 4 heads of d = 40, 4 chunks × 4
    steps, KV cache) with ``--attention monarch:tiling`` through ``use_attention`` (Triton on CUDA) and with the
    torch Monarch reference backend on the same weights, noise and re-noising generator. Returns the relative
    error of the Triton rollout and, for scale, of a dense-attention rollout, both against the reference."""
    from toolkit.attention.backends import parse_attention, use_attention
    from toolkit.attention.monarch import monarch_backend
    from toolkit.models.bundled import config as bcfg
    from toolkit.models.bundled import data
    from toolkit.models.sampling import self_forcing_rollout
    from toolkit.models.seam import use_backend
    from toolkit.models.wan import WanModel

    spec = "monarch:" + ",".join(map(str, tiling))
    assert parse_attention(spec) == ("monarch", tuple(tiling))
    torch.manual_seed(seed)
    model = WanModel(bcfg.bundled_config()).eval().to(device=device, dtype=dtype)
    with torch.no_grad():  # random init leaves attention nearly uniform: sharper q makes Monarch ≠ dense
        for block in model.blocks:
            block.self_attn.norm_q.weight.mul_(sharpen)
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(1, model.cfg.in_dim, *bcfg.clip_shape(model.cfg), generator=g).to(device)
    context = torch.randn(1, data.TEXT_LEN, data.TEXT_DIM, generator=g).to(device)

    def roll(ctx):
        with torch.no_grad(), ctx:
            gen = torch.Generator(device=device).manual_seed(seed + 2)
            return self_forcing_rollout(model, noise, context, frames_per_chunk=bcfg.frames_per_chunk(model.cfg),
                                        generator=gen).double()

    ref = roll(use_backend(model, monarch_backend(tuple(tiling))))
    triton_out = roll(use_attention(model, spec))
    dense = roll(use_attention(model, "dense"))
    return _rel(triton_out, ref), _rel(dense, ref)


@pytest.mark.parametrize("tiling", [(1, 1, 1), (3, 1, 1)])
def test_attention_monarch_inside_the_model_matches_the_torch_reference(tiling):
    err, dense_err = rollout_errors(tiling)
    # bf16 model: the reference backend computes in fp32 from the same bf16 q, k, v, the kernel keeps α/Y in
    # bf16 (≈ 4e-3 per call, above); 16 forwards × 6 layers and re-noising compound that to a few 1e-2 at most.
    # Dense attention must be far further away, or the comparison would not see a broken backend.
    assert err < 5e-2, f"rel err {err:.3g} (dense vs reference {dense_err:.3g})"
    assert err < 0.5 * dense_err, f"Triton {err:.3g} is not much closer to the reference than dense {dense_err:.3g}"


def finetune_gradient_errors(spec: str, *, device="cuda", seed=0) -> tuple[float, float]:
    """One finetuning step's parameter gradient (``distillation_loss`` of the shipped bundled model, bf16 autocast,
    exit step 2) with ``backend_for(spec, device)`` — on CUDA the Triton op and its backward kernels — and with the
    PyTorch Monarch reference (autograd) on the same weights, inputs and generators. Returns the relative error of
    the Triton gradient and, for scale, of the dense-attention gradient, both against the reference's."""
    import copy

    from toolkit.attention.backends import backend_for, parse_attention
    from toolkit.attention.monarch import monarch_backend
    from toolkit.models.bundled.finetune import distillation_loss
    from toolkit.models.bundled.model import load_bundled
    from toolkit.models.bundled.teacher import ClipSetup, autocast
    from toolkit.models.seam import dense_attention, use_backend

    model, _ = load_bundled(device)
    reference = copy.deepcopy(model).requires_grad_(False)
    setup = ClipSetup.of(model.cfg, device)
    context, noise = setup.prompts_and_noise(2, model.cfg.in_dim, torch.Generator().manual_seed(seed), device)

    def gradient(backend) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with use_backend(model, backend), use_backend(reference, setup.backend), autocast(device):
            loss = distillation_loss(model, reference, context, noise, setup,
                                     torch.Generator(device).manual_seed(seed + 1), exit_step=2)
        loss.backward()
        return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])

    name, tiling = parse_attention(spec)
    assert name == "monarch"
    triton_grad = gradient(backend_for(spec, device))
    ref_grad = gradient(monarch_backend(tiling))
    dense_grad = gradient(dense_attention)
    return _rel(triton_grad, ref_grad), _rel(dense_grad, ref_grad)


@pytest.mark.parametrize("spec", ["monarch:1,1,1", "monarch:3,1,1"])
def test_finetuning_gradients_through_the_triton_op_match_the_reference(spec):
    err, dense_err = finetune_gradient_errors(spec)
    # bf16 autocast in both: the rollouts' bf16 rounding differs between kernel and reference, and a gradient is a
    # difference of such quantities; dense attention is a different function and must be far further away.
    assert err < 0.1, f"rel err {err:.3g} (dense vs reference {dense_err:.3g})"
    assert err < 0.5 * dense_err, f"Triton {err:.3g} is not much closer to the reference than dense {dense_err:.3g}"


# Streamed-kernel configs that change the ticket order and the waits: group size (one or two query tiles), ring
# slots and lag (a slot reused by the next group, up to a ring of 8 with lag 6), key-tile splits.
STREAMED_CONFIGS = [
    dict(BLOCK_M=64, num_warps=4, SLOTS=2, LAG=1, F_SPLIT=1),
    dict(BLOCK_M=64, num_warps=4, SLOTS=1, LAG=0, F_SPLIT=3),
    dict(BLOCK_M=128, num_warps=8, SLOTS=4, LAG=2, F_SPLIT=2),
    dict(BLOCK_M=64, num_warps=4, SLOTS=8, LAG=6, F_SPLIT=2),
    dict(BLOCK_M=64, num_warps=4, SLOTS=5, LAG=3, F_SPLIT=2, L_STAGES=4),  # slot reads 3 key blocks ahead
]


@pytest.mark.parametrize("tiling, qf, bc", [((1, 1, 1), (0, 21), None), ((1, 1, 1), (0, 21), 3),
                                           ((1, 1, 1), (18, 21), None), ((3, 1, 1), (0, 21), None)],
                         ids=["full", "causal", "cache", "full-311"])
def test_streamed_kernel_is_deterministic_and_matches_two_stage_kernel(tiling, qf, bc):
    """A job taken too early (an L-step job reading a slot before its R-step jobs finished, or an R-step job
    refilling a slot still being read) shows as run-to-run differences or a mismatch with the two-stage kernel:
    each config runs three times into NaN-filled outputs at the paper's shape."""
    from toolkit.kernels.monarch import _forward, _streamed_default

    q, k, v = _qkv(PAPER_GRID, qf, (0, 21), HEADS, DIM, torch.bfloat16, "cuda", seed=3)
    kw = dict(query_frames=qf, key_frames=(0, 21), block_causal_frames=bc)
    two_stage = _forward(q, k, v, PAPER_GRID, tiling, **kw)
    b1 = tiling[0] * PAPER_GRID[1]
    base = _streamed_default(b1, 52)
    for cfg in STREAMED_CONFIGS:
        outs = []
        for _ in range(3):
            out = torch.full_like(q, float("nan"))
            _forward(q, k, v, PAPER_GRID, tiling, version="streamed", configs=({**base, **cfg}, None), out=out,
                     **kw)
            outs.append(out)
        assert torch.isfinite(outs[0]).all(), cfg
        assert all(torch.equal(outs[0], o) for o in outs[1:]), f"{cfg}: runs differ"
        assert _rel(outs[0], two_stage) < 1e-3, cfg
