"""Gradients through the Monarch kernel's custom op (``toolkit::monarch_attention``; the Triton forward runs under
the interpreter here) equal autograd of the float64 PyTorch reference, in the three modes and through the padded
head dim."""

from __future__ import annotations

import pytest
import torch
from toolkit.kernels import monarch_attention_triton

from toolkit.attention.monarch import monarch_attention
from toolkit.grid import MonarchLayout


@pytest.mark.parametrize(
    "grid, tiling, query_frames, key_frames, causal, dim",
    [
        ((2, 3, 5), (1, 1, 1), (0, 2), (0, 2), None, 16),  # bidirectional clip
        ((6, 2, 5), (3, 1, 1), (0, 6), (0, 6), 3, 16),  # block-causal chunks (training path)
        ((6, 2, 5), (1, 2, 1), (3, 6), (0, 6), None, 12),  # a chunk against the cache; d = 12 is zero-padded
    ],
    ids=["bidirectional", "block-causal", "kv-cache-padded"],
)
def test_kernel_op_gradients_equal_the_float64_reference(grid, tiling, query_frames, key_frames, causal, dim):
    g = torch.Generator().manual_seed(sum(grid) + dim)
    tpf = grid[1] * grid[2]
    n_q, n_k = (query_frames[1] - query_frames[0]) * tpf, (key_frames[1] - key_frames[0]) * tpf
    q, k, v = (torch.randn(1, n, 2, dim, generator=g, dtype=torch.float64) for n in (n_q, n_k, n_k))
    grad_out = torch.randn(1, n_q, 2, dim, generator=g, dtype=torch.float64)

    leaves = [x.float().requires_grad_(True) for x in (q, k, v)]
    out = monarch_attention_triton(*leaves, grid, tiling, query_frames=query_frames, key_frames=key_frames,
                                   block_causal_frames=causal, scale=0.3)
    got = torch.autograd.grad(out, leaves, grad_out.float())

    ref_leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    ref = monarch_attention(*ref_leaves, grid, layout=MonarchLayout.aligned(grid, "fh,w", tiling),
                            query_frames=query_frames, key_frames=key_frames, block_causal_frames=causal, scale=0.3)
    want = torch.autograd.grad(ref, ref_leaves, grad_out)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        rel = ((a.double() - b).norm() / b.norm()).item()
        assert rel < 2e-5, f"d{name}: relative error {rel:.2e}"
