"""Capture from other video DiTs: route their ``torch.nn.functional.scaled_dot_product_attention`` calls through
``AttentionSeam``s, so ``capture`` works on models we did not write (``docs/adapters.md``).

A diffusers video transformer needs only its input shape; the model's facts (which modules attend, where its text
tokens sit, how the token grid follows from config and input) are in ``DIFFUSERS_MODELS``:

>>> import torch, diffusers
>>> from toolkit.capture import Selection, capture, open_capture
>>> _ = torch.manual_seed(0)
>>> model = diffusers.CogVideoXTransformer3DModel(
...     num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
...     text_embed_dim=8, num_layers=2, sample_frames=5, sample_height=8, sample_width=8, patch_size=2,
...     max_text_seq_length=3).eval()
>>> latents, text = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 3, 8)  # b f c h w; 3 text tokens
>>> adapter = SDPAAdapter.for_diffusers(model, latents.shape)
>>> adapter.grid, adapter.text  # frames x height x width tokens; CogVideoX puts its text tokens first
((2, 4, 4), 'first')
>>> timesteps = [900, 500]
>>> import os, tempfile
>>> out = os.path.join(tempfile.mkdtemp(), "cogvideox.h5")
>>> with torch.no_grad(), adapter, capture(adapter, Selection(store=("q", "k", "v", "lse", "text_mass")), out,
...                                        layout=adapter.layout(timesteps), progress=False):
...     for t in timesteps:
...         _ = model(latents, text, torch.tensor([t]))
>>> cap = open_capture(out)
>>> rec = cap.record(step=1, chunk=0, layer=1)
>>> tuple(rec.q().shape), tuple(rec.lse().shape)  # h i d, h i: video queries only, lse over video + text keys
((2, 32, 8), (2, 32))
>>> rows = torch.from_numpy(cap.rows(rec, 0).values)  # exact video -> video probabilities of head 0
>>> bool(torch.allclose(rows.sum(-1) + rec.text_mass()[0], torch.ones(32), atol=1e-5))
True
>>> cap.attrs["model_class"]
'diffusers.CogVideoXTransformer3DModel'
>>> cap.close()

Any other model: give its self-attention modules (in layer order) and the grid, e.g.
``SDPAAdapter([b.attn1 for b in transformer.blocks], grid=(frames, height, width), root=transformer)`` and
``adapter.layout(timesteps, num_heads=..., head_dim=...)``.

How it works: while the adapter is active, ``F.scaled_dot_product_attention`` is replaced by a wrapper. A call
made *inside* one of the given modules that is self-attention over the video tokens (``b h i d``, as SDPA takes
them; queries and keys the same sequence: ``frames·height·width`` video tokens in raster order, plus, for a
joint-attention model, its text tokens before or after them) goes through that module's seam with the video
rows of q, k and v; every other call (cross-attention, causal or query-dependent masks, calls elsewhere) goes
straight to the original function. Outputs are unchanged: the model's own call computes them.

Joint attention (text and video tokens in one call: CogVideoX, HunyuanVideo, Mochi): the seam sees only the
video -> video block, and the adapter hands the recorder the log-sum-exp of each video query over the *text* keys
the model attended (``AttentionContext.extra_lse``; masked text keys excluded), so the stored ``lse`` is over
every key the model attended and probabilities recomputed from q, k and lse are the model's. A video query's
attention mass on text is ``exp(extra_lse - lse)``: ``--store ...,text_mass`` keeps it.

Requirements and limits (say so when capturing a new model):

* the model must look the function up at call time (``F.scaled_dot_product_attention(...)``); ``from
  torch.nn.functional import scaled_dot_product_attention`` binds the original and is not seen. diffusers'
  default ``native`` attention backend looks it up at call time; other backends (flash, sage, ...) are refused;
* q and k must already carry the positional encoding (every processor above applies RoPE before the call);
* bidirectional only (one chunk). A step is a run of ``root`` calls with the same timestep (classifier-free
  guidance may call ``root`` twice per step; the first call is recorded), read by ``timestep_fn(args, kwargs)``
  (default: ``root.forward``'s ``timestep`` argument); without a timestep every call of ``root`` is a step.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.errors import ToolkitError
from toolkit.models.layout import RunLayout
from toolkit.models.seam import AttentionContext, AttentionSeam, set_backend

TEXT_POSITIONS = ("first", "last")
_QUERY_BLOCK = 4096  # video queries per block of the text LSE: bounds its b h i t float32 logits


def _as_float(t) -> float | None:
    if isinstance(t, torch.Tensor) and t.numel() > 0:
        return float(t.flatten()[0])
    return float(t) if isinstance(t, (int, float)) else None


# ---------------------------------------------------------------------------------------------- model facts
GridFn = Callable[[object, Sequence[int], dict], tuple[int, int, int]]


def _grid_cfhw(cfg, shape: Sequence[int], kwargs: dict) -> tuple[int, int, int]:
    """``hidden_states`` ``b c F H W`` and ``patch_size`` (pt, ph, pw) (Wan, SkyReels-V2)."""
    pt, ph, pw = cfg.patch_size
    _, _, f, h, w = shape
    return f // pt, h // ph, w // pw


def _grid_cfhw_square(cfg, shape: Sequence[int], kwargs: dict) -> tuple[int, int, int]:
    """``hidden_states`` ``b c F H W``, square ``patch_size`` and an optional ``patch_size_t`` (HunyuanVideo,
    Mochi: frames unpatched)."""
    p, pt = cfg.patch_size, getattr(cfg, "patch_size_t", None) or 1
    _, _, f, h, w = shape
    return f // pt, h // p, w // p


def _grid_fchw(cfg, shape: Sequence[int], kwargs: dict) -> tuple[int, int, int]:
    """CogVideoX: ``hidden_states`` ``b F c H W`` (frames before channels); ``patch_size_t`` only in 1.5."""
    p, pt = cfg.patch_size, cfg.patch_size_t or 1
    _, f, _, h, w = shape
    return f // pt, h // p, w // p


def _grid_ltx(cfg, shape: Sequence[int], kwargs: dict) -> tuple[int, int, int]:
    """LTX-Video takes packed tokens ``b n c`` plus the latent ``num_frames, height, width`` keywords; a 5-D
    ``b c F H W`` shape is the unpacked latent."""
    p, pt = cfg.patch_size, cfg.patch_size_t
    if all(kwargs.get(k) is not None for k in ("num_frames", "height", "width")):
        f, h, w = (int(kwargs[k]) for k in ("num_frames", "height", "width"))
    elif len(shape) == 5:
        _, _, f, h, w = shape
    else:
        raise ToolkitError("LTX-Video's grid needs num_frames/height/width or the unpacked latent shape b c F H W")
    return f // pt, h // p, w // p


@dataclass(frozen=True)
class DiTSpec:
    """What the adapter needs to know about one diffusers video transformer class."""

    blocks: tuple[str, ...]  # attributes holding the transformer blocks, in execution (layer) order
    attention: str  # each block's self-attention module
    text: str | None  # where text tokens sit in the attention call: "first", "last", or None (cross-attention)
    grid: GridFn  # token grid (frames, height, width) from config, hidden_states shape and forward keywords
    # its pipeline's classifier-free guidance: "batched" = one call on [unconditional, conditional] samples (the
    # conditional video is then sample batch // 2), "calls" = separate calls, the conditional one first
    cfg: str = "calls"
    per_sample: bool = False  # the processor calls SDPA once per batch sample (batch 1 each), in sample order


DIFFUSERS_MODELS: dict[str, DiTSpec] = {
    "WanTransformer3DModel": DiTSpec(("blocks",), "attn1", None, _grid_cfhw),
    "SkyReelsV2Transformer3DModel": DiTSpec(("blocks",), "attn1", None, _grid_cfhw),
    "LTXVideoTransformer3DModel": DiTSpec(("transformer_blocks",), "attn1", None, _grid_ltx, cfg="batched"),
    "CogVideoXTransformer3DModel": DiTSpec(("transformer_blocks",), "attn1", "first", _grid_fchw, cfg="batched"),
    # dual-stream blocks, then single-stream blocks over the concatenated sequence; text padding is masked
    "HunyuanVideoTransformer3DModel": DiTSpec(("transformer_blocks", "single_transformer_blocks"), "attn", "last",
                                              _grid_cfhw_square),
    # one SDPA call per batch sample over video + that sample's valid text tokens
    "MochiTransformer3DModel": DiTSpec(("transformer_blocks",), "attn1", "last", _grid_cfhw_square, cfg="batched",
                                       per_sample=True),
}


def diffusers_spec(transformer: nn.Module) -> DiTSpec:
    """The ``DIFFUSERS_MODELS`` entry of ``transformer``'s class (or of a base class)."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in DIFFUSERS_MODELS:
            return DIFFUSERS_MODELS[cls.__name__]
    raise ToolkitError(f"{type(transformer).__name__} is not a supported diffusers video transformer (supported: "
                       f"{', '.join(DIFFUSERS_MODELS)}); pass its self-attention modules to SDPAAdapter")


def forward_inputs(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """``module.forward``'s arguments by name (positional ones bound to their parameter names)."""
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    return dict(bound.arguments)


# ---------------------------------------------------------------------------------------------- the adapter
class SDPAAdapter(nn.Module):
    """Seams for the self-attention SDPA calls of ``modules`` (one layer each, in the given order).

    ``text``: where a joint-attention model puts its text tokens in each call (``"first"``, ``"last"``), or None
    when attention is over the video tokens only. ``batch_index``: the batch sample captured (the seams see that
    sample alone, so the capture's own ``Selection.batch_index`` stays 0); ``per_sample``: the model calls SDPA once
    per sample, and the ``batch_index``-th call inside a module is the one captured."""

    def __init__(
        self,
        modules: Sequence[nn.Module],
        grid: tuple[int, int, int],
        *,
        root: nn.Module | None = None,
        text: str | None = None,
        timestep_fn: Callable[[tuple, dict], float | None] | None = None,
        num_heads: int | None = None,
        head_dim: int | None = None,
        batch_index: int = 0,
        per_sample: bool = False,
    ) -> None:
        super().__init__()
        if text is not None and text not in TEXT_POSITIONS:
            raise ToolkitError(f"text position {text!r}: one of {', '.join(TEXT_POSITIONS)} or None")
        self.targets = nn.ModuleList(modules)  # parameters -> the capture sees the model's dtype
        self.seams = nn.ModuleList(AttentionSeam(i) for i in range(len(modules)))
        set_backend(self.seams, self._model_sdpa)  # attention computed as the wrapped model computes it
        self._out: torch.Tensor | None = None
        self.grid = tuple(int(x) for x in grid)
        self.root, self.text, self.timestep_fn = root, text, timestep_fn
        self.num_heads, self.head_dim = num_heads, head_dim
        self.step, self.timestep = 0, 0.0
        self._calls, self._last_t = 0, None
        self._active: list[int] = []  # stack of layers whose module is running
        self._sample_calls: list[int] = []  # SDPA calls so far inside each running module (per_sample models)
        self.batch_index, self.per_sample = int(batch_index), per_sample
        self._handles: list = []
        self._original = None
        self.skipped: dict[str, int] = {}  # why SDPA calls inside the modules were not captured -> count
        self.routed = 0  # calls that went through a seam

    @classmethod
    def for_diffusers(cls, transformer: nn.Module, latent_shape: Sequence[int], *, batch_index: int = 0,
                      **forward_kwargs: Any) -> SDPAAdapter:
        """Adapter for a diffusers video transformer of ``DIFFUSERS_MODELS``; ``latent_shape`` is the shape of the
        ``hidden_states`` it will be called with (LTX-Video: the unpacked ``b c F H W``, or give its ``num_frames,
        height, width`` keywords); ``batch_index``: the sample captured (``DiTSpec.cfg`` says which one is the
        conditional video under guidance). Refuses attention backends that never call SDPA."""
        spec = diffusers_spec(transformer)
        modules = [getattr(block, spec.attention) for name in spec.blocks for block in getattr(transformer, name)]
        for m in modules:
            backend = getattr(getattr(m, "processor", None), "_attention_backend", None)
            if backend is not None and "native" not in str(backend).lower():
                raise ToolkitError(f"attention backend {backend} does not go through SDPA; call "
                                   "transformer.set_attention_backend('native') while capturing")
        cfg = transformer.config
        grid = spec.grid(cfg, tuple(int(x) for x in latent_shape), forward_kwargs)
        if min(grid) < 1:
            raise ToolkitError(f"latent shape {tuple(latent_shape)} gives an empty token grid {grid} for "
                               f"{type(transformer).__name__}")
        if not 0 <= batch_index < int(latent_shape[0]):
            raise ToolkitError(f"batch index {batch_index} but the model is called with {latent_shape[0]} samples")
        return cls(modules, grid, root=transformer, text=spec.text, num_heads=cfg.num_attention_heads,
                   head_dim=cfg.attention_head_dim, batch_index=batch_index, per_sample=spec.per_sample)

    @property
    def ran(self) -> bool:
        """Since ``__enter__``: the root was called or an SDPA call happened inside a watched module."""
        return bool(self._calls or self.routed or self.skipped)

    @property
    def num_tokens(self) -> int:
        f, h, w = self.grid
        return f * h * w

    def layout(self, timesteps: Sequence[float], *, num_heads: int | None = None, head_dim: int | None = None,
               scale: float | None = None) -> RunLayout:
        """RunLayout of a bidirectional run with one step per entry of ``timesteps`` (heads and head size default
        to the model's, known for ``for_diffusers``)."""
        num_heads, head_dim = num_heads or self.num_heads, head_dim or self.head_dim
        if num_heads is None or head_dim is None:
            raise ToolkitError("the adapter does not know the model's heads: pass num_heads and head_dim")
        return RunLayout(self.grid, len(self.seams), num_heads, head_dim, tuple(float(t) for t in timesteps),
                         scale=scale)

    def provenance(self) -> dict:
        """The wrapped model's class, config and (for diffusers) library version, for a capture's attributes."""
        out = {"adapter": "SDPAAdapter", "adapter_text_tokens": self.text or "none"}
        if self.root is not None:
            cls = type(self.root)
            package = cls.__module__.split(".")[0]
            out["model_class"] = f"{package}.{cls.__qualname__}"
            config = getattr(self.root, "config", None)
            if config is not None:
                out["model_config"] = json.loads(json.dumps(dict(config), default=str))
            if package == "diffusers":
                import diffusers

                out["diffusers_version"] = diffusers.__version__
        return out

    def looked_at(self) -> str:
        """The modules the adapter watches, and why SDPA calls inside them were passed over (for errors)."""
        names = {id(m): n for n, m in self.root.named_modules()} if self.root is not None else {}
        mods = [names.get(id(m), type(m).__name__) for m in self.targets]
        shown = ", ".join(mods[:3]) + (f", ... ({len(mods)} modules)" if len(mods) > 3 else "")
        why = "; ".join([f"{n} × {reason}" for reason, n in self.skipped.items()]
                        + [f"{self.routed} calls captured as steps up to {self.step}"] * bool(self.routed))
        why = why or "no SDPA call inside them"
        text = {None: "", "first": " + text tokens first", "last": " + text tokens last"}[self.text]
        return f"{shown}, expecting {self.num_tokens} video tokens (grid {self.grid}){text}: {why}"

    # ------------------------------------------------------------------------------------------------------
    def __enter__(self) -> SDPAAdapter:
        if self._original is not None:
            raise RuntimeError("SDPAAdapter is already active")
        self.step, self._calls, self._last_t = 0, 0, None
        self.skipped.clear()
        self.routed = 0
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
        self._sample_calls.clear()
        self._out = None

    def _enter_hook(self, layer: int):
        def enter(module, args) -> None:  # hooks must return None, or they replace the module's input/output
            self._active.append(layer)
            self._sample_calls.append(0)

        return enter

    def _exit_hook(self, module, args, output) -> None:
        self._active.pop()
        self._sample_calls.pop()

    def _on_root_call(self, module, args, kwargs) -> None:
        if self.timestep_fn is not None:
            t = self.timestep_fn(args, kwargs)
        else:  # the root's ``timestep`` argument, by name or position
            t = _as_float(forward_inputs(module, args, kwargs).get("timestep"))
        if t is None:
            self.step = self._calls
        elif self._last_t is not None and t != self._last_t:
            self.step += 1
        self._calls += 1
        if t is not None:
            self.timestep, self._last_t = t, t

    def _model_sdpa(self, q, k, v, ctx: AttentionContext) -> torch.Tensor:
        """The seams' backend: the captured sample's video rows of the wrapped model's own SDPA call, already
        computed by ``_sdpa`` (seam layout b i h d)."""
        return self._out

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def _video_slice(self, query, key, attn_mask, is_causal) -> slice | None:
        """Where the video tokens sit in a call made inside a target module, or None (not captured: why noted)."""
        n = self.num_tokens
        if self.per_sample:
            self._sample_calls[-1] += 1
            if self._sample_calls[-1] - 1 != self.batch_index:
                return None  # another sample's call: not captured, not a mismatch
        elif query.shape[0] <= self.batch_index:
            return self._skip(f"batch of {query.shape[0]} (batch index {self.batch_index})")
        if is_causal or query.dim() != 4:
            return self._skip("causal or not b h i d")
        total = key.shape[-2]
        if query.shape[-2] != total or key.shape[-3] != query.shape[-3]:
            return self._skip(f"cross-attention or other heads ({query.shape[-2]} queries, {total} keys)")
        extra = total - n
        if extra < 0 or (extra and self.text is None):
            return self._skip(f"{total} tokens")
        if attn_mask is not None and (attn_mask.dim() != 4 or attn_mask.shape[-2] != 1):
            return self._skip("query-dependent mask")
        video = slice(extra, total) if self.text == "first" else slice(0, n)
        if attn_mask is not None:
            m = attn_mask[..., video]
            if not bool(m.all() if m.dtype == torch.bool else (m == 0).all()):
                return self._skip("masked video keys")
        return video

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        original = self._original
        video = self._video_slice(query, key, attn_mask, is_causal) if self._active else None
        if video is None:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kw)
        self.routed += 1
        layer = self._active[-1]
        seam = self.seams[layer]
        sm_scale = scale if scale is not None else query.shape[-1] ** -0.5
        joint = key.shape[-2] != self.num_tokens
        out = None
        if seam.backend == self._model_sdpa:  # the model's own call (text keys and mask included) gives the output
            out = original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, **kw)
            rows = slice(None) if self.per_sample else slice(self.batch_index, self.batch_index + 1)
            query, key, value, out_rows = query[rows], key[rows], value[rows], out[rows]
            if attn_mask is not None and attn_mask.shape[0] > 1:
                attn_mask = attn_mask[rows]
            self._out = out_rows[:, :, video].transpose(1, 2)
        elif joint or self.batch_index:
            raise ToolkitError("a replaced attention backend gets the whole batch of video tokens only: not for a "
                               "joint-attention model or a batch index other than 0")
        extra_lse = None
        if joint and seam.hooks:
            extra_lse = _text_lse(query[:, :, video], key, video, attn_mask, sm_scale)
        ctx = AttentionContext(layer=layer, step=self.step, chunk=0, is_clean=False, timestep=self.timestep,
                               scale=sm_scale, grid=self.grid, query_frames=(0, self.grid[0]),
                               key_frames=(0, self.grid[0]), extra_lse=extra_lse)
        try:
            res = seam(query[:, :, video].transpose(1, 2), key[:, :, video].transpose(1, 2),
                       value[:, :, video].transpose(1, 2), ctx)
        finally:
            self._out = None
        return out if out is not None else res.transpose(1, 2)


def _text_lse(q: torch.Tensor, key: torch.Tensor, video: slice, attn_mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """log Σ over the attended non-video keys of exp(scale · q·k), float32 ``b h i``: the part of each video
    query's softmax normaliser the seam does not see (-inf where no text key is attended)."""
    total = key.shape[-2]
    keep = torch.ones(total, dtype=torch.bool, device=key.device)
    keep[video] = False
    kt = key[:, :, keep].float()  # b h t d
    mask = None
    if attn_mask is not None:  # b|1, h|1, 1, total: key-only, checked by _video_slice
        mask = attn_mask[..., keep]
        mask = torch.zeros(mask.shape, device=key.device).masked_fill(~mask, float("-inf")) \
            if mask.dtype == torch.bool else mask.float()
    blocks = []
    for a in range(0, q.shape[-2], _QUERY_BLOCK):
        logits = torch.matmul(q[:, :, a:a + _QUERY_BLOCK].float(), kt.transpose(-1, -2)) * scale  # b h i t
        if mask is not None:
            logits = logits + mask
        blocks.append(torch.logsumexp(logits, dim=-1))
    return torch.cat(blocks, dim=-1)
