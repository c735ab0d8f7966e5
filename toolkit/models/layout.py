"""The shape of one sampling run as the attention seams see it (``RunLayout``), given by the sampler that makes
the run (``toolkit.models.sampling``) and used by capture to validate selections and label records.

Which key frames a chunk attends is decided here once (``attended_frames``), for the KV cache that holds them
(``toolkit.models.wan.KVCache``), the layout that labels records, and the capture that stores them by reference."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    import torch

Span = tuple[int, int]  # frames [start, end)


def attended_frames(start: int, end: int, local_attn_size: int = -1, sink_size: int = 0) -> tuple[Span, ...]:
    """Key frames a chunk of query frames ``[start, end)`` attends under Self-Forcing's rolling KV cache
    (``docs/self-forcing.md`` "Rolling KV cache"): every frame up to the chunk's end while they fit in
    ``local_attn_size`` frames (-1: always, global attention), else the first ``sink_size`` frames (the attention
    sink, never evicted) and the most recent ``local_attn_size - sink_size`` frames, which end with the chunk.
    Spans are in increasing frame order, the order of the keys the seam receives."""
    if local_attn_size == -1 or end <= local_attn_size:
        return ((0, end),)
    recent = (end - (local_attn_size - sink_size), end)
    return ((0, sink_size), recent) if sink_size else (recent,)


def check_window(local_attn_size: int, sink_size: int, frames_per_chunk: int) -> None:
    """Refuse (one line) a window the official cache cannot roll: it must hold the sink and a whole chunk (else the
    eviction would drop part of the chunk being generated); a sink needs a window (it is what rolling keeps)."""
    if not isinstance(local_attn_size, int) or not (local_attn_size == -1 or local_attn_size >= 1):
        raise ToolkitError(f"local attention size {local_attn_size!r}: a number of frames >= 1, or -1 for global "
                           "attention")
    if not isinstance(sink_size, int) or sink_size < 0:
        raise ToolkitError(f"sink size {sink_size!r}: a number of frames >= 0")
    if local_attn_size == -1:
        if sink_size:
            raise ToolkitError(f"sink size {sink_size} needs a local attention window (--local-attn-size): with "
                               "global attention every frame is kept")
        return
    if sink_size + frames_per_chunk > local_attn_size:
        raise ToolkitError(f"local attention size {local_attn_size} cannot hold {sink_size} sink frames and a chunk "
                           f"of {frames_per_chunk} frames (needs >= {sink_size + frames_per_chunk})")


@dataclass(frozen=True)
class RunLayout:
    """Shape of one sampling run as the seams will see it.

    ``timesteps[s]`` is the timestep of step ``s``; for the causal model the last step is the clean-context pass
    (``clean_step``, timestep 0). ``frames_per_chunk=None`` means bidirectional (one chunk covering the clip).
    ``local_attn_size`` / ``sink_size``: the causal model's rolling KV cache (``attended_frames``; -1 = global)."""

    grid: tuple[int, int, int]  # whole clip (frames, height, width) in tokens
    num_layers: int
    num_heads: int
    head_dim: int
    timesteps: tuple[float, ...]
    frames_per_chunk: int | None = None
    clean_step: int | None = None
    scale: float | None = None  # softmax scale; None = head_dim ** -0.5
    local_attn_size: int = -1  # frames a chunk attends at most (Self-Forcing's option); -1 = every earlier frame
    sink_size: int = 0  # first frames kept when the cache rolls

    def __post_init__(self) -> None:
        if self.local_attn_size != -1 or self.sink_size:
            if self.frames_per_chunk is None:
                raise ToolkitError("a local attention window is for the causal (chunked) model")
            check_window(self.local_attn_size, self.sink_size, self.frames_per_chunk)

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim**-0.5

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def num_chunks(self) -> int:
        return 1 if self.frames_per_chunk is None else math.ceil(self.grid[0] / self.frames_per_chunk)

    @property
    def causal(self) -> bool:
        return self.frames_per_chunk is not None

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.tokens_per_frame

    def chunk_frames(self, chunk: int) -> tuple[int, int]:
        """Query frames ``[start, end)`` of a chunk."""
        if self.frames_per_chunk is None:
            return 0, self.grid[0]
        start = chunk * self.frames_per_chunk
        return start, min(start + self.frames_per_chunk, self.grid[0])

    def chunk_tokens(self, chunk: int) -> tuple[int, int]:
        f0, f1 = self.chunk_frames(chunk)
        return f0 * self.tokens_per_frame, f1 * self.tokens_per_frame

    @property
    def rolling(self) -> bool:
        """The cache rolls: some chunk attends fewer frames than precede it."""
        return self.local_attn_size != -1 and self.grid[0] > self.local_attn_size

    def key_frame_spans(self, chunk: int) -> tuple[Span, ...]:
        """Key frames chunk ``chunk``'s queries attend, in key order (``attended_frames``): for the causal model
        ``(0, end)`` unless the cache rolls; the whole clip for a bidirectional run."""
        f0, f1 = self.chunk_frames(chunk)
        if not self.causal:
            return ((0, self.grid[0]),)
        return attended_frames(f0, f1, self.local_attn_size, self.sink_size)

    def max_key_frames(self) -> int:
        """Most frames any chunk attends: the KV cache's capacity in frames."""
        return max(sum(b - a for a, b in self.key_frame_spans(c)) for c in range(self.num_chunks))

    @classmethod
    def self_forcing(
        cls, cfg: Any, grid: tuple[int, int, int], timesteps: Sequence[float] | torch.Tensor, frames_per_chunk: int = 3,
        local_attn_size: int = -1, sink_size: int = 0,
    ) -> RunLayout:
        """Layout of ``self_forcing_rollout``: denoising steps 0..n-1, then the clean pass (step n, t = 0)."""
        ts = tuple(float(t) for t in timesteps) + (0.0,)
        return cls(tuple(grid), cfg.num_layers, cfg.num_heads, cfg.head_dim, ts, frames_per_chunk, len(ts) - 1,
                   local_attn_size=local_attn_size, sink_size=sink_size)

    @classmethod
    def bidirectional(
        cls, cfg: Any, grid: tuple[int, int, int], timesteps: Sequence[float] | torch.Tensor
    ) -> RunLayout:
        """Layout of a bidirectional sampler (``wan_sample``): one chunk, no clean pass."""
        return cls(tuple(grid), cfg.num_layers, cfg.num_heads, cfg.head_dim, tuple(float(t) for t in timesteps))

    def to_attrs(self) -> dict:
        d = {
            "grid": list(self.grid), "num_layers": self.num_layers, "num_heads": self.num_heads,
            "head_dim": self.head_dim, "timesteps": list(self.timesteps),
            "frames_per_chunk": self.frames_per_chunk, "clean_step": self.clean_step, "scale": self.scale,
        }
        if self.local_attn_size != -1:  # global runs keep the attribute they always had (resume compares it)
            d.update(local_attn_size=self.local_attn_size, sink_size=self.sink_size)
        return d

    @classmethod
    def from_attrs(cls, d: dict) -> RunLayout:
        return cls(tuple(d["grid"]), d["num_layers"], d["num_heads"], d["head_dim"], tuple(d["timesteps"]),
                   d["frames_per_chunk"], d["clean_step"], d.get("scale"), d.get("local_attn_size", -1),
                   d.get("sink_size", 0))
