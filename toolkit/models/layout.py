"""The shape of one sampling run as the attention seams see it (``RunLayout``), given by the sampler that makes
the run (``toolkit.models.sampling``) and used by capture to validate selections and label records."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RunLayout:
    """Shape of one sampling run as the seams will see it.

    ``timesteps[s]`` is the timestep of step ``s``; for the causal model the last step is the clean-context pass
    (``clean_step``, timestep 0). ``frames_per_chunk=None`` means bidirectional (one chunk covering the clip)."""

    grid: tuple[int, int, int]  # whole clip (frames, height, width) in tokens
    num_layers: int
    num_heads: int
    head_dim: int
    timesteps: tuple[float, ...]
    frames_per_chunk: int | None = None
    clean_step: int | None = None
    scale: float | None = None  # softmax scale; None = head_dim ** -0.5

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

    @classmethod
    def self_forcing(
        cls, cfg, grid: tuple[int, int, int], timesteps, frames_per_chunk: int = 3
    ) -> RunLayout:
        """Layout of ``self_forcing_rollout``: denoising steps 0..n-1, then the clean pass (step n, t = 0)."""
        ts = tuple(float(t) for t in timesteps) + (0.0,)
        return cls(tuple(grid), cfg.num_layers, cfg.num_heads, cfg.head_dim, ts, frames_per_chunk, len(ts) - 1)

    @classmethod
    def bidirectional(cls, cfg, grid: tuple[int, int, int], timesteps) -> RunLayout:
        """Layout of a bidirectional sampler (``wan_sample``): one chunk, no clean pass."""
        return cls(tuple(grid), cfg.num_layers, cfg.num_heads, cfg.head_dim, tuple(float(t) for t in timesteps))

    def to_attrs(self) -> dict:
        return {
            "grid": list(self.grid), "num_layers": self.num_layers, "num_heads": self.num_heads,
            "head_dim": self.head_dim, "timesteps": list(self.timesteps),
            "frames_per_chunk": self.frames_per_chunk, "clean_step": self.clean_step, "scale": self.scale,
        }

    @classmethod
    def from_attrs(cls, d: dict) -> RunLayout:
        return cls(tuple(d["grid"]), d["num_layers"], d["num_heads"], d["head_dim"], tuple(d["timesteps"]),
                   d["frames_per_chunk"], d["clean_step"], d.get("scale"))
