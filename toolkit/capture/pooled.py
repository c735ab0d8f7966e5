"""Pooled attention views, computed exactly from q, k and the row LSE without keeping a map:

* ``frame_mass[h, from_frame, to_frame]``: mean over the stored queries of ``from_frame`` of the attention mass
  they put on the keys of ``to_frame`` (rows sum to 1 over the attended frames);
* ``offset_t/h/w[h, Δ]``: mean over the stored queries of the mass at key − query offset Δ along frames, rows
  and columns (marginals of the (Δt, Δh, Δw) profile; Δ runs from −(size−1) to size−1).

`pooled_sums` is the reference (used on the CPU and by the reader, recomputing from a file). Probability tiles
come from ``toolkit.attention.exact.iter_query_blocks`` with bounded memory; the key axis is reduced separably
per block (sum over (row, col) / (frame, col) / (frame, row)), so no ``i × j`` offset array is ever built.
The recorder calls `accumulate_pooled`, which on CUDA runs the fused Triton kernel ``toolkit.kernels.pooled``
(same sums, two launches per record instead of dozens of small ops) and adds into *packed* per-head bins
(`packed_bins` floats per head: ``[frame_mass F·F | offset_t 2F−1 | offset_h 2H−1 | offset_w 2W−1]``, the layout
of ``toolkit.attention.pooled``, which the kernel shares) that the recorder keeps on the device for a whole
(step, chunk) and writes once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from toolkit.attention import exact
from toolkit.attention.pooled import packed_bins, unpack
from toolkit.grid import TokenGrid

__all__ = ["PooledSums", "accumulate_pooled", "packed_bins", "pooled_sums", "tf32_for_bf16_values", "unpack"]


@contextmanager
def tf32_for_bf16_values(enabled: bool) -> Iterator[None]:
    """Let float32 matmuls use TF32 tensor cores while ``enabled`` (inputs hold bfloat16 values).

    bf16 has 7 mantissa bits and TF32 10, so bf16 values convert to TF32 exactly and every product q_i·k_j is
    exact with float32 accumulation: the result is the float32 reference up to summation order, 3-8× faster on
    the GPU. Never enable it for genuinely float32 data."""
    if not enabled:
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@dataclass
class PooledSums:
    """Sums over queries (divide by the counts for means). Shapes: frame_mass ``h F F``, counts ``F``;
    offset_t ``h (2F-1)``, offset_h ``h (2H-1)``, offset_w ``h (2W-1)``; ``num_queries`` scalar."""

    frame_mass: torch.Tensor
    frame_counts: torch.Tensor
    offset_t: torch.Tensor
    offset_h: torch.Tensor
    offset_w: torch.Tensor
    num_queries: int

    def means(self) -> dict[str, torch.Tensor]:
        counts = self.frame_counts.clamp(min=1).to(self.frame_mass.dtype)
        n = max(self.num_queries, 1)
        return {
            "frame_mass": self.frame_mass / counts[None, :, None],
            "offset_t": self.offset_t / n,
            "offset_h": self.offset_h / n,
            "offset_w": self.offset_w / n,
        }


def pooled_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    query_tokens: torch.Tensor,
    key_frames: tuple[int, int],
    grid: tuple[int, int, int],
    *,
    query_chunk: int = 256,
) -> PooledSums:
    """q ``h i d`` (stored queries, clip tokens ``query_tokens``), k ``h j d`` covering whole frames
    ``key_frames`` in raster order, lse ``h i`` -> PooledSums (float32, on q's device).

    Pass ``query_tokens`` on q's device to keep the GPU queue running (a host tensor costs a synchronous copy)."""
    tg = TokenGrid(*grid)
    frames, height, width = grid
    kf0, kf1 = key_frames
    nkf = kf1 - kf0
    if k.shape[-2] != nkf * tg.tokens_per_frame:
        raise ValueError(f"keys ({k.shape[-2]}) do not cover frames {key_frames} of grid {grid}")
    h, dev = q.shape[0], q.device
    qf, qh, qw = (c.to(dev) for c in tg.coords(query_tokens.to(dev)))
    frame_mass = torch.zeros(h, frames, frames, device=dev, dtype=torch.float32)
    off_t = torch.zeros(h, 2 * frames - 1, device=dev, dtype=torch.float32)
    off_h = torch.zeros(h, 2 * height - 1, device=dev, dtype=torch.float32)
    off_w = torch.zeros(h, 2 * width - 1, device=dev, dtype=torch.float32)
    key_frame_ids = torch.arange(kf0, kf1, device=dev)
    rows, cols = torch.arange(height, device=dev), torch.arange(width, device=dev)

    def scatter(target: torch.Tensor, sums: torch.Tensor, bins: torch.Tensor) -> None:
        # sums h i n, bins i n -> target[h, bins] += sums
        target.scatter_add_(1, bins.reshape(1, -1).expand(h, -1), sums.reshape(h, -1))

    for sl, p in exact.iter_query_blocks(q, k, scale, lse, query_chunk=query_chunk):
        p = p.float().view(h, -1, nkf, height, width)  # h i kf kh kw
        s_fh = p.sum(-1)  # h i kf kh
        s_f, s_h = s_fh.sum(-1), s_fh.sum(2)  # h i kf, h i kh
        s_w = p.sum((2, 3))  # h i kw
        bqf, bqh, bqw = qf[sl], qh[sl], qw[sl]
        frame_mass[:, :, kf0:kf1].index_add_(1, bqf, s_f)
        scatter(off_t, s_f, key_frame_ids[None, :] - bqf[:, None] + frames - 1)
        scatter(off_h, s_h, rows[None, :] - bqh[:, None] + height - 1)
        scatter(off_w, s_w, cols[None, :] - bqw[:, None] + width - 1)
    counts = torch.zeros(frames, device=dev, dtype=torch.long).index_add_(0, qf, torch.ones_like(qf))  # no host sync
    return PooledSums(frame_mass, counts, off_t, off_h, off_w, int(query_tokens.numel()))


# Where `accumulate_pooled` runs the Triton kernel: "auto" = for CUDA tensors; "always" = also on the CPU through
# Triton's interpreter (tests of the recorder's kernel path).
KERNEL = "auto"
# Why the kernel could not be used on CUDA (its first launch failed, e.g. an older Triton rejecting it): the
# captures of this process then take the torch path, with a warning. None while it works or was never tried.
KERNEL_UNAVAILABLE: str | None = None
_kernel_ran = False


def accumulate_pooled(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    query_tokens: torch.Tensor,
    key_frames: tuple[int, int],
    grid: tuple[int, int, int],
    bins: torch.Tensor,
) -> torch.Tensor:
    """Add the pooled sums of q ``h i d`` (clip tokens ``query_tokens``, on q's device) over k ``h j d`` (whole
    frames ``key_frames``) into packed ``bins`` (``h packed_bins(grid)`` float32); return the row LSE ``h i``
    (float32, natural log). The fused Triton kernel on CUDA (no host sync), `pooled_sums` elsewhere."""
    global KERNEL_UNAVAILABLE, _kernel_ran
    if (q.is_cuda and KERNEL_UNAVAILABLE is None) or KERNEL == "always":
        # imports Triton (an optional dependency): only for GPU captures; kernels sit below capture
        from toolkit.kernels import pooled as kernel

        if q.dtype in kernel.SUPPORTED_DTYPES and k.dtype == q.dtype:
            try:
                lse, _ = kernel.pooled_lse_and_sums(q, k, scale, query_tokens, key_frames, grid, bins=bins)
            except Exception as err:
                if _kernel_ran or KERNEL == "always":
                    raise
                # first launch: nothing was added to bins yet, so the torch path below can take over
                KERNEL_UNAVAILABLE = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                warnings.warn(f"pooled-views Triton kernel unavailable, using the slower torch path: "
                              f"{KERNEL_UNAVAILABLE}", RuntimeWarning, stacklevel=2)
            else:
                _kernel_ran = True
                return lse
    with tf32_for_bf16_values(q.is_cuda and q.dtype == torch.bfloat16):
        lse = exact.logsumexp(q, k, scale)
        sums = pooled_sums(q, k, lse, scale, query_tokens, key_frames, grid)
    for target, part in zip(unpack(bins, grid), (sums.frame_mass, sums.offset_t, sums.offset_h, sums.offset_w)):
        target += part
    return lse
