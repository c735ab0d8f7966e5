"""One Wan2.1 diffusion transformer, used at every size (bundled toy model, Wan2.1-T2V-1.3B, Self-Forcing).

Bidirectional Wan2.1 and causal Self-Forcing share these weights and this forward; they differ only in how it is
called: bidirectional = all frames at once, no cache; causal = one chunk of frames at a time with a ``KVCache``
(keys/values of earlier chunks stay in the cache, already rotated by RoPE; a rolling cache keeps only a window of
recent frames and an attention sink). Training the causal model without a cache uses ``attn_mask`` (block-causal)
and ``frame_index`` (RoPE positions of a clean copy of the clip).

Forward, following the Self-Forcing / Wan2.1 reference code (``docs/self-forcing.md`` "Forward pass"):

    x  [b c F Hl Wl] --patch Conv3d--> [b (f h w) dim]                 tokens in raster order: (f*h + y)*w + x
    t  [b f] --sinusoid(256, float64)--> time MLP --> e [b f dim] --> e0 [b f 6 dim]   (per-frame modulation)
    context [b L_txt text_dim] --zero-pad to text_len--> text MLP --> [b text_len dim]
    block (x num_layers), with (shift, scale, gate) x 2 = block.modulation + e0:
        x += gate_sa * SelfAttn(LN1(x) * (1 + scale_sa) + shift_sa)      q, k: RMSNorm over dim, then 3-D RoPE
        x += CrossAttn(norm3(x), context)                                 no RoPE, no mask (padding is attended)
        x += gate_ff * FFN(LN2(x) * (1 + scale_ff) + shift_ff)
    head: Linear(LN(x) * (1 + scale) + shift), (shift, scale) = head.modulation + e  -> unpatchify -> flow v = eps - x0

``prediction="x0"`` (never a released Wan; the bundled recipe's teacher may use it): the head outputs the clean
sample x̂0 and the forward returns the flow it implies, v = (x − x̂0) / σ with σ = t / 1000, so every sampler, loss
and score reads a flow either way. The idea (Li & He, "Back to Basics: Let Denoising Generative Models Denoise",
2025: x-prediction with a v-loss): with 8 × 8 × 3 = 192 pixel values per token the noise a flow carries is
high-dimensional next to the width, while clean sprite videos are not. On the bundled teacher it gave a lower
loss but a worse prompt binding at equal steps (``docs/bundled-model.md``, run 8), so the recipe keeps "flow".

Parameter names equal the native Wan checkpoint names (``blocks.N.self_attn.q.weight`` ...), so a native
state dict loads with ``load_state_dict`` directly; other formats are mapped in ``checkpoints.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.errors import CheckpointError
from toolkit.models.layout import attended_frames
from toolkit.models.seam import AttentionContext, AttentionSeam

# Largest value of each integer field a config may hold: a few times the largest published Wan (14B: dim 5120,
# 40 layers, 40 heads), so every real checkpoint passes and a hostile config.json is refused before allocation.
CONFIG_BOUNDS = {"dim": 65536, "ffn_dim": 262144, "num_heads": 1024, "num_layers": 256, "in_dim": 4096,
                 "out_dim": 4096, "text_dim": 65536, "text_len": 65536, "freq_dim": 65536,
                 "rope_max_positions": 1 << 20}
PREDICTIONS = ("flow", "x0")  # WanConfig.prediction: the head's output (module docstring)
X0_SIGMA_FLOOR = 1e-3  # x0 prediction: σ below this (t = 0, the clean pass) divides by it; that output is unused


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class WanConfig:
    """Architecture of a Wan DiT. Defaults are Wan2.1-T2V-1.3B (HF ``config.json`` of Wan-AI/Wan2.1-T2V-1.3B)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    rope_max_positions: int = 1024
    prediction: str = "flow"  # what the head outputs: PREDICTIONS; forward always returns the flow
    extra: dict = field(default_factory=dict)  # free-form notes carried with the config (e.g. bundled model)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse, in one line, a config no real checkpoint has (``CheckpointError``) before anything is sized from
        it: a ``config.json`` with ``num_layers: 1e9`` would otherwise allocate until memory runs out and
        ``num_heads: 0`` would divide by zero."""
        problems = []
        for name, top in CONFIG_BOUNDS.items():
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= top:
                problems.append(f"{name} {value!r} is not an integer in 1..{top}")
        ps = self.patch_size
        if not (isinstance(ps, (tuple, list)) and len(ps) == 3 and all(_is_int(p) and 1 <= p <= 64 for p in ps)):
            problems.append(f"patch_size {ps!r} is not 3 integers in 1..64")
        if _is_int(self.dim) and _is_int(self.num_heads) and self.num_heads > 0 and self.dim > 0:
            if self.dim % self.num_heads:
                problems.append(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
            elif (self.dim // self.num_heads) % 2:
                problems.append(f"head dim {self.dim // self.num_heads} is odd (RoPE rotates channel pairs)")
        if _is_int(self.freq_dim) and self.freq_dim % 2:
            problems.append(f"freq_dim {self.freq_dim} is odd (sin and cos halves)")
        for name in ("eps", "rope_theta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0):
                problems.append(f"{name} {value!r} is not a positive number")
        for name in ("qk_norm", "cross_attn_norm"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} {getattr(self, name)!r} is not true/false")
        if self.prediction not in PREDICTIONS:
            problems.append(f"prediction {self.prediction!r} is not one of {', '.join(PREDICTIONS)}")
        if not isinstance(self.extra, dict):
            problems.append(f"extra {self.extra!r} is not a mapping")
        if problems:
            raise CheckpointError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Real channels of each head given to (time, height, width) RoPE: (44, 42, 42) for head dim 128."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WanConfig:
        """Accepts our own ``to_dict`` output and Wan's ``config.json`` (which has extra keys such as model_type)."""
        if not isinstance(d, dict):
            raise CheckpointError(f"invalid model config: expected a JSON object, found {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known}
        if isinstance(kwargs.get("patch_size"), list):
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Small pieces


class RMSNorm(nn.Module):
    """Wan's RMSNorm: normalise in float32, cast back to the input dtype, *then* scale by the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (as upstream Wan2.1 and diffusers do), result in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos ‖ sin] of t·10000^(−k/half), k = 0..half−1, computed in float64 (Wan). t [...] -> [..., dim]."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.double().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_frequencies(cfg: WanConfig) -> torch.Tensor:
    """Angles ω_j·pos for each axis, [rope_max_positions, head_dim/2] float64: slots (time 0..21, height, width)."""
    tables = []
    for n in cfg.rope_dims:
        omega = 1.0 / cfg.rope_theta ** (torch.arange(0, n, 2, dtype=torch.float64) / n)
        tables.append(torch.outer(torch.arange(cfg.rope_max_positions, dtype=torch.float64), omega))
    return torch.cat(tables, dim=1)


def rope_angles(
    freqs: torch.Tensor, frame_index: torch.Tensor, height: int, width: int, rope_dims: tuple[int, int, int]
) -> torch.Tensor:
    """Rotation angle of every (token, complex slot) for tokens in raster order: [f*h*w, head_dim/2] float64.

    frame_index [f] holds absolute frame positions (the chunk's start frame is added by the caller)."""
    nt, nh, nw = (n // 2 for n in rope_dims)
    f = frame_index.numel()
    ft = freqs[frame_index, :nt]  # f, nt
    fh = freqs[:height, nt : nt + nh]  # h, nh
    fw = freqs[:width, nt + nh : nt + nh + nw]  # w, nw
    angles = torch.cat(
        [
            ft[:, None, None, :].expand(f, height, width, nt),
            fh[None, :, None, :].expand(f, height, width, nh),
            fw[None, None, :, :].expand(f, height, width, nw),
        ],
        dim=-1,
    )
    return angles.reshape(f * height * width, -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of x [b l h d] by per-token angles (cos/sin [l, d/2]).

    Arithmetic in the dtype of cos/sin (float64 when the model runs in float32 — bit-faithful to Wan's
    complex128 multiply — float32 for bf16/fp16 runs, where rounding to the activation dtype dominates)."""
    xr = x.to(cos.dtype).unflatten(-1, (-1, 2))  # b l h d/2 2
    a, b = xr[..., 0], xr[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).type_as(x)


# ----------------------------------------------------------------------------------------------------------------
# Key/value cache of the causal model


class KVCache:
    """Self-attention K/V of every layer, holding exactly the frames the current chunk attends, in key order.

    ``k[layer]``, ``v[layer]``: [b, max_tokens, heads, head_dim]; K is stored after RoPE (at its absolute frame
    position), V raw. A chunk's K/V are written before its attention, so the chunk attends to itself; the clean pass
    of a chunk overwrites the slots its denoising steps wrote. ``cross[layer]`` caches the cross-attention K/V of the
    (fixed) text context.

    With ``local_attn_size`` frames (Self-Forcing's rolling cache; -1 = global, the released default) the cache needs
    only ``max_tokens`` = that many frames: when a new chunk does not fit, the frames it no longer attends are
    dropped and the rest moved down, the first ``sink_size`` frames staying in place (``layout.attended_frames``;
    ``docs/self-forcing.md`` "Rolling KV cache"). Without a window ``max_tokens`` must cover the clip.
    """

    def __init__(
        self,
        cfg: WanConfig,
        batch: int,
        max_tokens: int,
        device: torch.device | str,
        dtype: torch.dtype,
        *,
        local_attn_size: int = -1,
        sink_size: int = 0,
    ) -> None:
        shape = (batch, max_tokens, cfg.num_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * cfg.num_layers
        self.max_tokens = max_tokens
        self.local_attn_size, self.sink_size = local_attn_size, sink_size
        self.held: list[list[int]] = [[] for _ in range(cfg.num_layers)]  # frame of each slot run, in slot order

    def attended(self, start: int, end: int) -> tuple[tuple[int, int], ...]:
        """Key frame spans a chunk of query frames ``[start, end)`` attends through this cache."""
        return attended_frames(start, end, self.local_attn_size, self.sink_size)

    def write(
        self, layer: int, spans: tuple[tuple[int, int], ...], k: torch.Tensor, v: torch.Tensor, tokens_per_frame: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a chunk's new K/V ``[b, new tokens, h, d]`` (the last frames of ``spans``) and return the keys and
        values of every frame of ``spans``, in that order. Earlier frames of ``spans`` must be held already (chunks
        run in order).

        Under autograd (a training rollout) the cache keeps detached copies and the returned K/V are the cached past
        joined with the live new K/V: gradients reach this chunk's projections, and a later in-place write (the
        clean pass) cannot invalidate a tensor the backward pass needs."""
        tpf = tokens_per_frame
        frames = [f for a, b in spans for f in range(a, b)]
        past, held = frames[: len(frames) - k.shape[1] // tpf], self.held[layer]
        end = len(frames) * tpf
        if end > self.max_tokens:
            raise ValueError(f"KV cache holds {self.max_tokens} tokens; the attended frames need {end}")
        if held[:len(past)] != past:  # the window moved on: keep what is still attended, in order
            slot = {f: i for i, f in enumerate(held)}
            missing = [f for f in past if f not in slot]
            if missing:
                raise ValueError(f"frames {missing} are not in the KV cache (chunks must run in order)")
            src = (torch.tensor([slot[f] for f in past], device=k.device)[:, None] * tpf
                   + torch.arange(tpf, device=k.device)).flatten()
            for t in (self.k[layer], self.v[layer]):
                t[:, : len(past) * tpf] = t[:, src]  # advanced indexing reads a copy: overlapping moves are safe
        self.held[layer] = frames
        start = len(past) * tpf
        self.k[layer][:, start:end] = k.detach()
        self.v[layer][:, start:end] = v.detach()
        if k.requires_grad or v.requires_grad:
            return (torch.cat([self.k[layer][:, :start], k], dim=1), torch.cat([self.v[layer][:, :start], v], dim=1))
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def reset(self) -> None:
        """Start a new video: stale K/V are never read (attention stops at the current chunk), only cross K/V and
        the frame bookkeeping reset."""
        self.cross = [None] * len(self.cross)
        self.held = [[] for _ in self.held]


# ----------------------------------------------------------------------------------------------------------------
# Attention and the block


class Attention(nn.Module):
    """Projections shared by self- and cross-attention: q, k, v, o (with bias) and RMSNorm on q and k."""

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()


class SelfAttention(Attention):
    def __init__(self, cfg: WanConfig, layer: int) -> None:
        super().__init__(cfg)
        self.seam = AttentionSeam(layer)  # hook point blocks.{layer}.self_attn.seam
        self.layer = layer

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: AttentionContext,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        heads = (self.num_heads, self.head_dim)
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, heads), cos, sin)  # b i h d
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, heads), cos, sin)
        v = self.v(x).unflatten(-1, heads)
        if kv_cache is not None:
            spans = ((0, ctx.sink_frames), ctx.key_frames) if ctx.sink_frames else (ctx.key_frames,)
            k, v = kv_cache.write(self.layer, spans, k, v, ctx.tokens_per_frame)
        out = self.seam(q, k, v, ctx)
        return self.o(out.flatten(-2))


class CrossAttention(Attention):
    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = (self.num_heads, self.head_dim)
        return self.norm_k(self.k(context)).unflatten(-1, heads), self.v(context).unflatten(-1, heads)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, self.head_dim))
        k, v = kv
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).flatten(-2))


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg, layer)
        self.norm3 = LayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)
        self.layer = layer

    def forward(
        self,
        x: torch.Tensor,  # b (f hw) dim
        e0: torch.Tensor,  # b f 6 dim
        context: torch.Tensor,  # b text_len dim
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: AttentionContext,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        b, f = e0.shape[:2]
        mod = (self.modulation.unsqueeze(1) + e0).unsqueeze(3)  # b f 6 1 dim
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod.unbind(2)

        def per_frame(t: torch.Tensor) -> torch.Tensor:  # b (f hw) dim -> b f hw dim
            return t.view(b, f, -1, t.shape[-1])

        a = (per_frame(self.norm1(x)) * (1 + scale_sa) + shift_sa).flatten(1, 2)
        x = x + (per_frame(self.self_attn(a, cos, sin, ctx, kv_cache)) * gate_sa).flatten(1, 2)

        if kv_cache is not None:
            if kv_cache.cross[self.layer] is None:
                kv_cache.cross[self.layer] = self.cross_attn.context_kv(context)
            cross_kv = kv_cache.cross[self.layer]
        else:
            cross_kv = self.cross_attn.context_kv(context)
        x = x + self.cross_attn(self.norm3(x), cross_kv)

        c = (per_frame(self.norm2(x)) * (1 + scale_ff) + shift_ff).flatten(1, 2)
        return x + (per_frame(self.ffn(c)) * gate_ff).flatten(1, 2)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        b, f = e.shape[:2]
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).unsqueeze(3).unbind(2)  # b f 1 dim each
        y = self.norm(x).view(b, f, -1, x.shape[-1]) * (1 + scale) + shift
        return self.head(y.flatten(1, 2))


# ----------------------------------------------------------------------------------------------------------------
# The model


class WanModel(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(WanBlock(cfg, i) for i in range(cfg.num_layers))
        self.head = Head(cfg)
        # RoPE angle tables per device: float64 as in Wan, outside the state dict and untouched by .to(dtype)
        # (also correct after meta-device construction + to_empty, which would leave a buffer uninitialised).
        self._rope_tables: dict[torch.device, torch.Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def rope_table(self, device: torch.device) -> torch.Tensor:
        if device not in self._rope_tables:
            self._rope_tables[device] = rope_frequencies(self.cfg).to(device)
        return self._rope_tables[device]

    def grid_size(self, x: torch.Tensor) -> tuple[int, int, int]:
        """Token grid (frames, height, width) of a latent ``x`` [b c F Hl Wl]."""
        pt, ph, pw = self.cfg.patch_size
        return x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """[b L text_dim] -> [b text_len dim]; zero-padded rows become bias vectors, as in Wan (no padding mask)."""
        pad = self.cfg.text_len - context.shape[1]
        if pad < 0:
            raise ValueError(f"context has {context.shape[1]} tokens, model takes at most {self.cfg.text_len}")
        context = F.pad(context, (0, 0, 0, pad)).to(self.dtype)
        return self.text_embedding(context)

    def unpatchify(self, y: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[b (f h w) (pt ph pw c)] -> [b c (f pt) (h ph) (w pw)]; the c channels are fastest in a token's output."""
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        y = y.view(y.shape[0], f, h, w, pt, ph, pw, self.cfg.out_dim)
        return y.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(y.shape[0], self.cfg.out_dim, f * pt, h * ph, w * pw)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        start_frame: int = 0,
        step: int = 0,
        chunk: int = 0,
        is_clean: bool = False,
        clip_frames: int | None = None,
        frame_index: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow prediction v = ε − x0 for ``x`` [b c F Hl Wl] at timesteps ``t`` ([b] or per frame [b F]) (also
        with ``cfg.prediction == "x0"``: converted from the head's x̂0).

        Causal use: pass ``kv_cache`` and the chunk's ``start_frame``; the chunk's K/V go into the cache and its
        queries attend to the frames the cache keeps up to the chunk's end (all of them unless it rolls), each at its
        absolute RoPE frame position. ``step``/``chunk``/``is_clean`` only label the attention calls for the seam
        (capture); ``clip_frames`` is the whole clip's latent frame count (grid)."""
        cfg = self.cfg
        b = x.shape[0]
        grid = self.grid_size(x)
        f, h, w = grid
        if frame_index is None:
            frame_index = torch.arange(start_frame, start_frame + f, device=x.device)
        elif kv_cache is not None:
            raise ValueError("frame_index is for the no-cache training path")
        if int(frame_index.max()) >= cfg.rope_max_positions:  # absolute frame positions, also in a rolled cache
            raise ValueError(f"frame {int(frame_index.max())} is beyond the model's {cfg.rope_max_positions} RoPE "
                             "positions")

        tokens = self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2)  # b (f h w) dim

        if t.dim() == 1:
            t = t[:, None].expand(b, f)  # bidirectional: one timestep for every frame
        sinus = timestep_sinusoid(t, cfg.freq_dim).to(self.dtype)  # b f 256, cast before the MLP as Wan
        e = self.time_embedding(sinus)  # b f dim
        e0 = self.time_projection(e).unflatten(-1, (6, cfg.dim))  # b f 6 dim
        context = self.embed_text(context)

        rope_dtype = torch.float64 if tokens.dtype in (torch.float32, torch.float64) else torch.float32
        angles = rope_angles(self.rope_table(x.device), frame_index, h, w, cfg.rope_dims).to(rope_dtype)
        cos, sin = torch.cos(angles), torch.sin(angles)

        first = int(frame_index[0]) if kv_cache is not None else int(frame_index.min())
        last = first + f if kv_cache is not None else int(frame_index.max()) + 1
        spans = kv_cache.attended(first, last) if kv_cache is not None else ((first, last),)
        ctx = AttentionContext(
            layer=-1,
            step=step,
            chunk=chunk,
            is_clean=is_clean,
            timestep=float(t[0, 0]),
            scale=cfg.head_dim**-0.5,
            grid=(clip_frames or last, h, w),
            query_frames=(first, last),
            key_frames=spans[-1],
            attn_mask=attn_mask,
            sink_frames=spans[0][1] if len(spans) > 1 else 0,
        )
        for block in self.blocks:
            tokens = block(tokens, e0, context, cos, sin, ctx, kv_cache)
        out = self.unpatchify(self.head(tokens, e), grid)
        if cfg.prediction == "x0":  # out is x̂0; return the flow v = (x − x̂0) / σ (at least float32)
            wide = torch.promote_types(out.dtype, torch.float32)
            sigma = (t.to(wide) / 1000).clamp_min(X0_SIGMA_FLOOR).repeat_interleave(cfg.patch_size[0], 1)
            out = (x.to(wide) - out.to(wide)) / sigma.view(b, 1, -1, 1, 1)
        return out.to(x.dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
