"""Packed layout of the pooled attention views, shared by the torch reference (``toolkit.capture.pooled``) and the
fused Triton kernel (``toolkit.kernels.pooled``): per head, ``packed_bins(grid)`` float32 sums

    [frame_mass F·F | offset_t 2F−1 | offset_h 2H−1 | offset_w 2W−1]

(frame_mass row-major from query frame to key frame; offset bins at key − query + size − 1).
"""

from __future__ import annotations

import torch


def packed_bins(grid: tuple[int, int, int]) -> int:
    """Floats per head of the packed sums: ``F·F + (2F−1) + (2H−1) + (2W−1)``."""
    frames, height, width = grid
    return frames * frames + 2 * frames - 1 + 2 * height - 1 + 2 * width - 1


def unpack(bins: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """Views of packed sums ``... n`` -> (frame_mass ``... F F``, offset_t, offset_h, offset_w ``... 2S−1``)."""
    frames, height, width = grid
    sizes = (frames * frames, 2 * frames - 1, 2 * height - 1, 2 * width - 1)
    fm, off_t, off_h, off_w = bins.split(sizes, dim=-1)
    return fm.unflatten(-1, (frames, frames)), off_t, off_h, off_w
