"""The attention seam: the single place where a model's self-attention is computed.

Every Wan block owns one ``AttentionSeam`` (named ``blocks.{layer}.self_attn.seam``, in the spirit of
TransformerLens hook points). It receives post-RoPE q and the *attended* K/V slice (for the causal model:
the KV cache up to the end of the current chunk) together with an ``AttentionContext`` describing where in
the run we are. Two things can be attached:

* a **backend** (``seam.backend = fn``) that replaces how attention is computed (dense SDPA by default;
  Monarch kernels, oracle top-k, ...). Signature ``fn(q, k, v, ctx) -> out``.
* **hooks** (``seam.hooks.append(fn)``) that observe every call: ``fn(q, k, v, out, ctx) -> None``.
  Capture is a hook. With no hooks the seam costs one empty-list check.

Shapes (einops style): q ``b i h d`` (i = query tokens), k and v ``b j h d`` (j = attended keys),
out ``b i h d``. Token order is raster order over the (frames, height, width) latent token grid:
``token = (frame * height + row) * width + col``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AttentionContext:
    """Where one self-attention call happens.

    ``step`` indexes the forward passes of one chunk: 0..num_steps-1 are denoising steps, and for the causal
    model ``step == num_steps`` is the clean-context pass (``is_clean`` True) that rewrites the chunk's K/V.
    Bidirectional models use ``chunk = 0``. Queries cover frames ``[query_frames[0], query_frames[1])`` and
    keys ``[key_frames[0], key_frames[1])`` of the token ``grid`` (frames, height, width), preceded, when a rolling
    KV cache keeps an attention sink, by the keys of frames ``[0, sink_frames)``.
    """

    layer: int
    step: int
    chunk: int
    is_clean: bool
    timestep: float
    scale: float
    grid: tuple[int, int, int]
    query_frames: tuple[int, int]
    key_frames: tuple[int, int]
    # Optional boolean mask ``i j`` (True = attend); used only by the no-cache block-causal training path.
    attn_mask: torch.Tensor | None = None
    sink_frames: int = 0  # frames [0, sink_frames) attended before key_frames (``toolkit.models.layout``)
    # ``b h i`` float32: log-sum-exp of the logits of keys the model attended but the seam does not receive (the
    # text tokens of a joint text+video attention; ``toolkit.capture.adapters``), so the row LSE covers them too.
    extra_lse: torch.Tensor | None = None

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def query_offset(self) -> int:
        """Raster index of the first query token in the full clip."""
        return self.query_frames[0] * self.tokens_per_frame

    @property
    def key_offset(self) -> int:
        """Raster index of the first attended key token in the full clip."""
        return self.key_frames[0] * self.tokens_per_frame


Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionContext], torch.Tensor]
Hook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionContext], None]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """softmax(scale · q kᵀ) v with PyTorch SDPA (cuDNN / flash backends on GPU). q ``b i h d`` → ``b i h d``."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=ctx.attn_mask, scale=ctx.scale
    )
    return out.transpose(1, 2)


class AttentionSeam(nn.Module):
    """Named attention point ``blocks.{layer}.self_attn.seam``; see the module docstring."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.backend: Backend | None = None
        self.hooks: list[Hook] = []

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if ctx.layer != self.layer:  # the model builds one context per forward; each seam stamps its layer
            ctx = replace(ctx, layer=self.layer)
        out = (self.backend or dense_attention)(q, k, v, ctx)
        for hook in self.hooks:
            hook(q, k, v, out, ctx)
        return out

    def extra_repr(self) -> str:
        backend = "dense_attention" if self.backend is None else getattr(self.backend, "__name__", None)
        backend = backend or type(self.backend).__name__  # never repr(): a bound method's repr holds its owner
        return f"layer={self.layer}, backend={backend}, hooks={len(self.hooks)}"


def seams(model: nn.Module) -> list[AttentionSeam]:
    """All seams of a model, in layer order."""
    found = [m for m in model.modules() if isinstance(m, AttentionSeam)]
    return sorted(found, key=lambda s: s.layer)


def set_backend(model: nn.Module, backend: Backend | None) -> None:
    """Give every seam of ``model`` the attention ``backend`` (``None``: dense)."""
    for seam in seams(model):
        seam.backend = backend


@contextmanager
def use_backend(model: nn.Module, backend: Backend | None) -> Iterator[nn.Module]:
    """Every seam of ``model`` computes attention with ``backend`` inside the block; the previous backends after."""
    previous = [(seam, seam.backend) for seam in seams(model)]
    set_backend(model, backend)
    try:
        yield model
    finally:
        for seam, old in previous:
            seam.backend = old
