"""Exact softmax attention from q, k (, v): the one place every analysis gets attention weights from.

A full map at 32,760 keys is 4.3 GB per head in float32, so nothing here materialises more than a tile:

    lse_i   = log Σ_j exp(s · q_i·k_j)                 streaming over key chunks (running max + rescaled sum)
    P_ij    = exp(s · q_i·k_j − lse_i)                 any tile, exact, from q, k and the row's lse
    out_i   = Σ_j P_ij v_j                             streaming (online softmax) over key chunks

Shapes (einops style): q ``... i d``, k and v ``... j d`` with any matching (broadcastable) leading dims, typically
heads; lse ``... i``. Arithmetic runs in float32 (float64 inputs stay float64, for brute-force references) on the
device of q, so GPU tensors are processed on the GPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Entries of one exact probability block (2**27 float32 = 512 MiB): what `iter_query_blocks` aims for by
# default, and the block budget of the Monarch tile loops and of the capture reader's rows()/tile().
DEFAULT_BLOCK_ENTRIES = 2**27


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 captures are upcast before any product)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Logits s · q kᵀ in the compute dtype: ``... i d, ... j d -> ... i j``."""
    dt = compute_dtype(q, k)
    return torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale


def _cpu_flash_logsumexp(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor | None:
    """The same streaming LSE from PyTorch's CPU flash-attention kernel (about 3x faster on the CPU: no logit tile
    goes through memory), for float32 CPU inputs with equal leading dims; None where it does not apply."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if (op is None or q.device.type != "cpu" or q.dtype != torch.float32 or k.dtype != torch.float32
            or q.shape[:-2] != k.shape[:-2] or q.requires_grad or k.requires_grad or k.shape[-2] == 0):
        return None
    q4 = q.reshape(1, -1, *q.shape[-2:])
    k4 = k.reshape(1, -1, *k.shape[-2:])
    try:  # k doubles as v: only the LSE is used, and it needs no extra tensor
        _, lse = op(q4, k4, k4, 0.0, False, attn_mask=None, scale=scale)
    except RuntimeError:  # a layout or head size this kernel does not take
        return None
    return lse.reshape(q.shape[:-1])


def logsumexp(q: torch.Tensor, k: torch.Tensor, scale: float, *, key_chunk: int = 8192) -> torch.Tensor:
    """Natural-log LSE of ``scale · q kᵀ`` over all keys, streaming over key chunks: ``... i``.

    Peak memory is one ``... i key_chunk`` logit tile. Float32 CPU inputs go through PyTorch's CPU flash kernel,
    which streams the same way (``_cpu_flash_logsumexp``).
    """
    if key_chunk < 1:
        raise ValueError(f"key_chunk must be positive, got {key_chunk}")
    fast = _cpu_flash_logsumexp(q, k, scale)
    if fast is not None:
        return fast
    m = s = None  # running row max and Σ exp(logit - m)
    for start in range(0, k.shape[-2], key_chunk):
        logits = scores(q, k[..., start : start + key_chunk, :], scale)
        chunk_max = logits.amax(dim=-1)
        if m is None:
            m = chunk_max
            s = torch.exp(logits - m.unsqueeze(-1)).sum(dim=-1)
        else:
            new_m = torch.maximum(m, chunk_max)
            s = s * torch.exp(m - new_m) + torch.exp(logits - new_m.unsqueeze(-1)).sum(dim=-1)
            m = new_m
    if m is None:
        raise ValueError("logsumexp over zero keys")
    return m + torch.log(s)


def probs(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact probability tile ``exp(scale · q kᵀ − lse)``: ``... i d, ... j d, ... i -> ... i j``.

    ``k`` may be any subset of the attended keys; rows sum to 1 only when it is all of them.
    """
    logits = scores(q, k, scale)
    return torch.exp(logits - lse.to(logits.dtype).unsqueeze(-1))


def default_query_chunk(n_keys: int, leading: int = 1, budget: int = DEFAULT_BLOCK_ENTRIES) -> int:
    """Query rows per block so that one ``leading × rows × n_keys`` block holds about ``budget`` entries."""
    return max(1, budget // max(1, n_keys * leading))


def iter_query_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    lse: torch.Tensor | None = None,
    *,
    query_chunk: int | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, P[..., rows, :])`` for consecutive query blocks, each an exact ``... rows j`` tile.

    ``lse`` (``... i``) is computed by `logsumexp` when not given (e.g. stored by the capture). The default
    ``query_chunk`` keeps a block near `DEFAULT_BLOCK_ENTRIES` entries; the last block may be shorter.
    """
    n_q, n_k = q.shape[-2], k.shape[-2]
    if query_chunk is None:
        leading = 1
        for size in torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]):
            leading *= size
        query_chunk = default_query_chunk(n_k, leading)
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be positive, got {query_chunk}")
    if lse is None:
        lse = logsumexp(q, k, scale)
    for start in range(0, n_q, query_chunk):
        rows = slice(start, min(start + query_chunk, n_q))
        yield rows, probs(q[..., rows, :], k, lse[..., rows], scale)


def attention_output(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    key_chunk: int = 8192,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale · q kᵀ) v by online softmax over key chunks: ``... i d, ... j d, ... j e -> ... i e``.

    Accumulates in the compute dtype (float32, or float64 for float64 inputs); with ``return_lse`` also returns
    the row LSE (``... i``) that the same pass produced.
    """
    if key_chunk < 1:
        raise ValueError(f"key_chunk must be positive, got {key_chunk}")
    dt = compute_dtype(q, k, v)
    m = s = acc = None  # running max, Σ exp(logit - m), Σ exp(logit - m) v
    for start in range(0, k.shape[-2], key_chunk):
        keys = slice(start, start + key_chunk)
        logits = scores(q, k[..., keys, :], scale)
        chunk_max = logits.amax(dim=-1)
        new_m = chunk_max if m is None else torch.maximum(m, chunk_max)
        w = torch.exp(logits - new_m.unsqueeze(-1))
        pv = torch.matmul(w, v[..., keys, :].to(dt))
        if m is None:
            s, acc = w.sum(dim=-1), pv
        else:
            alpha = torch.exp(m - new_m)
            s = s * alpha + w.sum(dim=-1)
            acc = acc * alpha.unsqueeze(-1) + pv
        m = new_m
    if m is None:
        raise ValueError("attention over zero keys")
    out = acc / s.unsqueeze(-1)
    return (out, m + torch.log(s)) if return_lse else out
