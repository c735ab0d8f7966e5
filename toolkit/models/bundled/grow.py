"""Bigger copies of a Wan DiT that compute the same function: wider (Net2Net's "wider" operation, exact for Wan's
blocks) and deeper (identity blocks), so that a trained model can be given capacity and trained on from where it is.

**Wider.** Every hidden stream of width n becomes ``factor`` copies of itself side by side, x' = [x, x, …]: the
residual stream and the time and text embeddings (``dim``), each block's FFN hidden layer (``ffn_dim``), and q, k, v
(``num_heads`` × ``head_dim``). A layer that writes a stream writes every copy (its output rows repeated; the time
projection's six modulation vectors each repeated on their own). A layer that reads a stream splits its weight over
the copies,

    W'_c = W ⊙ R_c,   Σ_c R_c = 1   ⇒   Σ_c W'_c x = W x        (R_c ≥ 0, elementwise, drawn at random)

so it computes W x exactly. Everything else in the block commutes with the copying: LayerNorm and the q/k RMSNorm
see the same mean and mean square over [x, x] as over x; heads are contiguous ``head_dim`` slices, so the copied
q, k, v are heads H … 2H − 1 repeating heads 0 … H − 1 with the head dim, hence RoPE and the softmax scale,
unchanged, and their outputs are copies too; GELU and SiLU act elementwise.

Why the split is random and not W / factor: with equal shares every copy receives the same gradient for ever, so
the copies — the new capacity — would never separate. Unequal shares keep the function and give each copy its own
gradient from the first step.

**Deeper.** Block i becomes blocks factor·i … factor·i + factor − 1: the first is block i, the others copies of it
whose three residual writers (self-attention's and cross-attention's output projections, the FFN's second layer)
are zero, so each adds exactly 0 to the residual stream. Their other weights are block i's, so the features a new
block's writers start to read are already meaningful ones; their writers get a gradient from the first step
(the loss's gradient at the residual times those features), the rest of the block from the second.

    wide = widened(model, factor=2, seed=0)      # 6 × 160, 4 heads of 40 -> 6 × 320, 8 heads of 40
    deep = deepened(model, factor=2)             # 6 × 160 -> 12 × 160

Used by ``toolkit train --widen`` to continue the bundled student's stages at a larger width
(``recipe.widen_students``) and by ``benchmarks/continue_teacher.py --widen/--deepen`` to continue the teacher.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from toolkit.models.bundled import data
from toolkit.models.bundled.config import clip_shape
from toolkit.models.bundled.model import as_stored, to_model_space
from toolkit.models.wan import LayerNorm, RMSNorm, WanConfig, WanModel

# A block's writers into the residual stream; zero, they make the block the identity.
RESIDUAL_WRITERS = ("self_attn.o", "cross_attn.o", "ffn.2")

# Layers that read a model input (pixels, text features, the timestep's sinusoid) instead of a hidden stream, the one
# that writes the model output, and the layer whose output is several hidden-width vectors side by side.
READS_INPUT = ("patch_embedding", "text_embedding.0", "time_embedding.0")
WRITES_OUTPUT = ("head.head",)
OUTPUT_CHUNKS = {"time_projection.1": 6}  # shift, scale, gate of self-attention and of the FFN, per block
SPREAD = 0.5  # the split's shares are u_c / Σ u with u_c uniform in [1 − SPREAD, 1 + SPREAD]


def widened(model: WanModel, factor: int = 2, *, seed: int = 0) -> WanModel:
    """A copy of ``model`` ``factor`` × as wide (``dim``, ``ffn_dim``, ``num_heads``; ``head_dim`` kept) that
    computes the same function (module docstring), in ``model``'s dtype and on its device."""
    if not isinstance(factor, int) or factor < 2:
        raise ValueError(f"the widening factor is an integer >= 2, not {factor!r}")
    cfg = model.cfg
    wide_cfg = replace(cfg, dim=factor * cfg.dim, ffn_dim=factor * cfg.ffn_dim, num_heads=factor * cfg.num_heads,
                       extra=dict(cfg.extra))
    gen = torch.Generator().manual_seed(seed)

    def shares(shape: torch.Size) -> list[torch.Tensor]:  # R_c: nonnegative, summing to 1 elementwise
        u = 1 + SPREAD * (2 * torch.rand((factor, *shape), generator=gen, dtype=torch.float64) - 1)
        return list(u / u.sum(0))

    def copies(t: torch.Tensor, dim: int, chunks: int = 1) -> torch.Tensor:  # [x, x, …] along dim (per chunk)
        parts = t.chunk(chunks, dim)
        return torch.cat([torch.cat([p] * factor, dim) for p in parts], dim)

    def split(w: torch.Tensor) -> torch.Tensor:  # (out, in) -> (out, factor · in): W ⊙ R_c per input copy
        return torch.cat([(w.double() * r.to(w.device)).to(w.dtype) for r in shares(w.shape)], 1)

    state = {}
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        if isinstance(module, (nn.Linear, nn.Conv3d)):
            w, b = module.weight.detach(), module.bias.detach()
            writes = name not in WRITES_OUTPUT
            chunks = OUTPUT_CHUNKS.get(name, 1)
            if writes:  # one split per output copy: the copies stay equal in value, their weights differ
                w = copies(w, 0, chunks)
                b = copies(b, 0, chunks)
            if name not in READS_INPUT:
                if not isinstance(module, nn.Linear):
                    raise ValueError(f"{name}: only a Linear layer can read a widened stream")
                w = split(w)
            state[f"{name}.weight"], state[f"{name}.bias"] = w, b
        elif isinstance(module, (LayerNorm, RMSNorm)):  # per-channel affine over a hidden stream
            for key, p in params.items():
                state[f"{name}.{key}"] = copies(p.detach(), 0)
        elif set(params) == {"modulation"}:  # the blocks' and the head's learned modulation, [..., dim]
            state[f"{name}.modulation"] = copies(params["modulation"].detach(), -1)
        else:
            raise ValueError(f"{name} ({type(module).__name__}): no widening rule for its parameters {sorted(params)}")
    p0 = next(model.parameters())
    wide = WanModel(wide_cfg).to(device=p0.device, dtype=p0.dtype)
    wide.load_state_dict(state, strict=True)  # every parameter of the wide model, each of the right shape
    return wide.train(model.training)


def deepened(model: WanModel, factor: int = 2) -> WanModel:
    """A copy of ``model`` with ``factor`` × as many blocks that computes the same function (module docstring), in
    ``model``'s dtype and on its device."""
    if not isinstance(factor, int) or factor < 2:
        raise ValueError(f"the deepening factor is an integer >= 2, not {factor!r}")
    cfg = model.cfg
    deep_cfg = replace(cfg, num_layers=factor * cfg.num_layers, extra=dict(cfg.extra))
    state = {}
    for name, p in model.state_dict().items():
        if not name.startswith("blocks."):
            state[name] = p
            continue
        _, layer, rest = name.split(".", 2)
        writer = rest.rsplit(".", 1)[0] in RESIDUAL_WRITERS
        for copy in range(factor):  # load_state_dict copies each tensor into its own parameter
            state[f"blocks.{factor * int(layer) + copy}.{rest}"] = torch.zeros_like(p) if copy and writer else p
    p0 = next(model.parameters())
    deep = WanModel(deep_cfg).to(device=p0.device, dtype=p0.dtype)
    deep.load_state_dict(state, strict=True)
    return deep.train(model.training)


def model_size(cfg: WanConfig) -> dict:
    """The fields growing changes: depth, width, heads, FFN width."""
    return dict(num_layers=cfg.num_layers, dim=cfg.dim, num_heads=cfg.num_heads, ffn_dim=cfg.ffn_dim)


@torch.no_grad()
def function_change(before: WanModel, after: WanModel, seed: int = 0) -> float:
    """How far ``after``, as its file will hold it (``as_stored``), is from ``before`` (as given: a model just loaded
    from its file is that file): the largest difference of one forward of a procedural clip at σ = 0.5, relative to
    ``before``'s largest output value. 0 for a deepened copy; float16 rounding for a widened one."""
    gen = torch.Generator().manual_seed(seed)
    frames, height, width = clip_shape(before.cfg)
    video, context, _ = data.sample_batch(1, gen, frames=frames, height=height, width=width, device="cpu")
    x, t = (to_model_space(video) + torch.randn(video.shape, generator=gen)) / 2, torch.tensor([500.0])
    device = next(before.parameters()).device
    x, t, context = x.to(device), t.to(device), context.to(device)
    reference = before(x, t, context)
    return float((as_stored(after)(x, t, context) - reference).abs().max() / reference.abs().max())
