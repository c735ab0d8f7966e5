"""Capture from other video DiTs: route their ``torch.nn.functional.scaled_dot_product_attention`` calls through
``AttentionSeam``s, so ``capture`` (and any seam backend) works on models we did not write.

    blocks = [b.attn1 for b in transformer.blocks]                 # the self-attention modules, in layer order
    adapter = SDPAAdapter(blocks, grid=(frames, height, width), root=transformer)
    layout = adapter.layout(timesteps)                             # one step per call of ``root``
    with adapter, capture(adapter, select=Selection(layers="3"), out="run.h5", layout=layout):
        pipe(prompt, ...)                                          # e.g. a diffusers pipeline

How it works: while the adapter is active, ``F.scaled_dot_product_attention`` is replaced by a wrapper. A call
made *inside* one of the given modules whose queries and keys both cover the whole token grid (self-attention
over ``frames·height·width`` tokens, raster order, ``b h i d`` as SDPA takes them) goes through that module's
seam; every other call (cross-attention, masked or causal calls, calls elsewhere) goes straight to the original
function. Outputs are unchanged: the seam's backend is the original SDPA with the caller's arguments.

Requirements and limits (say so when capturing a new model):

* the model must look the function up at call time (``F.scaled_dot_product_attention(...)`` or
  ``torch.nn.functional.scaled_dot_product_attention(...)``); ``from torch.nn.functional import
  scaled_dot_product_attention`` binds the original and is not seen. diffusers' default ``native`` attention
  backend (``dispatch_attention_fn``) looks it up at call time, so ``WanTransformer3DModel`` works as is; with
  other diffusers backends (flash, sage, ...) switch to ``native`` while capturing;
* q and k must already carry the positional encoding (diffusers' Wan processor applies RoPE before the call);
* the token grid is the user's: sequences with extra tokens (text concatenated as in MM-DiTs) are not captured;
* bidirectional only (one chunk); the step counts calls of ``root`` (or set ``adapter.step`` yourself), and
  ``timestep_fn(args, kwargs)`` can read the timestep from ``root``'s arguments (default: a ``timestep``
  keyword or the second positional argument).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.models.layout import RunLayout
from toolkit.models.seam import AttentionContext, AttentionSeam, set_backend


def _default_timestep(args: tuple, kwargs: dict) -> float | None:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, torch.Tensor) and t.numel() > 0:
        return float(t.flatten()[0])
    return float(t) if isinstance(t, (int, float)) else None


class SDPAAdapter(nn.Module):
    """Seams for the self-attention SDPA calls of ``modules`` (one layer each, in the given order)."""

    def __init__(
        self,
        modules: Sequence[nn.Module],
        grid: tuple[int, int, int],
        *,
        root: nn.Module | None = None,
        timestep_fn: Callable[[tuple, dict], float | None] = _default_timestep,
    ) -> None:
        super().__init__()
        self.targets = nn.ModuleList(modules)  # parameters -> the capture sees the model's dtype
        self.seams = nn.ModuleList(AttentionSeam(i) for i in range(len(modules)))
        set_backend(self.seams, self._model_sdpa)  # attention computed as the wrapped model computes it
        self._call: dict = {}
        self.grid = tuple(int(x) for x in grid)
        self.root, self.timestep_fn = root, timestep_fn
        self.step, self.timestep = 0, 0.0
        self._calls = 0
        self._active: list[int] = []  # stack of layers whose module is running
        self._handles: list = []
        self._original = None
        self.num_heads: int | None = None
        self.head_dim: int | None = None

    @classmethod
    def for_diffusers(cls, transformer: nn.Module, latent_shape: Sequence[int]) -> SDPAAdapter:
        """Adapter for a diffusers video transformer with ``blocks[i].attn1`` self-attention (``WanTransformer3DModel``
        and relatives); the token grid is ``latent_shape`` ``(b, c, F, H, W)`` divided by ``config.patch_size``.
        Refuses non-native attention backends, whose kernels never call SDPA."""
        from toolkit.errors import ToolkitError

        blocks = getattr(transformer, "blocks", None)
        if blocks is None or not all(hasattr(b, "attn1") for b in blocks):
            raise ToolkitError(f"{type(transformer).__name__} has no blocks[i].attn1; pass the modules to SDPAAdapter")
        for b in blocks:
            backend = getattr(getattr(b.attn1, "processor", None), "_attention_backend", None)
            if backend is not None and "native" not in str(backend).lower():
                raise ToolkitError(f"attention backend {backend} does not go through SDPA; call "
                                   "transformer.set_attention_backend('native') while capturing")
        pt, ph, pw = transformer.config.patch_size
        _, _, f, h, w = latent_shape
        return cls([b.attn1 for b in blocks], (f // pt, h // ph, w // pw), root=transformer)

    @property
    def num_tokens(self) -> int:
        f, h, w = self.grid
        return f * h * w

    def layout(self, timesteps: Sequence[float], *, num_heads: int, head_dim: int,
               scale: float | None = None) -> RunLayout:
        """RunLayout of a bidirectional run with one step per entry of ``timesteps``."""
        return RunLayout(self.grid, len(self.seams), num_heads, head_dim, tuple(float(t) for t in timesteps),
                         scale=scale)

    # ------------------------------------------------------------------------------------------------------
    def __enter__(self) -> SDPAAdapter:
        if self._original is not None:
            raise RuntimeError("SDPAAdapter is already active")
        for layer, module in enumerate(self.targets):
            self._handles.append(module.register_forward_pre_hook(self._enter_hook(layer)))
            self._handles.append(module.register_forward_hook(self._exit_hook, always_call=True))
        if self.root is not None:
            self._handles.append(self.root.register_forward_pre_hook(self._on_root_call, with_kwargs=True))
        self._original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = self._sdpa  # torch.nn.functional is the module F names
        return self

    def __exit__(self, *exc) -> None:
        F.scaled_dot_product_attention = self._original
        self._original = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active.clear()

    def _enter_hook(self, layer: int):
        def enter(module, args) -> None:  # hooks must return None, or they replace the module's input/output
            self._active.append(layer)

        return enter

    def _exit_hook(self, module, args, output) -> None:
        self._active.pop()

    def _on_root_call(self, module, args, kwargs) -> None:
        self.step = self._calls
        self._calls += 1
        t = self.timestep_fn(args, kwargs)
        if t is not None:
            self.timestep = t

    def _model_sdpa(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        """The seams' backend: the wrapped model's own SDPA call with its arguments (seam layout b i h d)."""
        out = self._original(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **self._call)
        return out.transpose(1, 2)

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        original = self._original
        n = self.num_tokens
        if (not self._active or attn_mask is not None or is_causal or query.dim() != 4
                or query.shape[-2] != n or key.shape[-2] != n or key.shape[-3] != query.shape[-3]):
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kw)
        layer = self._active[-1]
        d = query.shape[-1]
        sm_scale = scale if scale is not None else d**-0.5

        self._call = dict(dropout_p=dropout_p, scale=scale, **kw)  # read by _model_sdpa, the seams' backend
        seam = self.seams[layer]
        ctx = AttentionContext(layer=layer, step=self.step, chunk=0, is_clean=False, timestep=self.timestep,
                               scale=sm_scale, grid=self.grid, query_frames=(0, self.grid[0]),
                               key_frames=(0, self.grid[0]))
        out = seam(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), ctx)
        return out.transpose(1, 2)
