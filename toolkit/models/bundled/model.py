"""Loading, prompting and sampling the bundled model (a config of the one Wan DiT, ``toolkit.models.wan``).

It is not a fork: same blocks, 3-D RoPE, per-frame modulation, cross-attention to the prompt, sampled by the same
Self-Forcing loop (3-frame chunks, 4 steps + clean pass, KV cache) as Self-Forcing on Wan2.1-T2V-1.3B. The prompt is
a structured toy caption (``data.encode_prompts``: 5 tokens × 32 channels) fed through Wan's text MLP and
cross-attention exactly like umT5 embeddings. Why the grid and size: ``config.py``; how it was trained:
``recipe.py`` and ``data/bundled/MODEL_CARD.md``.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch

from toolkit.errors import CheckpointError, WeightsNotFound
from toolkit.models.bundled import data
from toolkit.models.bundled.config import (
    CONFIG_FILE,
    DEFAULT_DIR,
    SELF_FORCING_STEPS,
    WEIGHTS_FILE,
    bundled_config,
    clip_shape,
    frames_per_chunk,
    reads_places,
)
from toolkit.models.checkpoints import metadata_config, validate_state_dict
from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps
from toolkit.models.wan import WanConfig, WanModel

# int8 storage (``save_weights(int8=True)``): which tensors, and the name suffix of their per-row scales
INT8_MIN_NUMEL = 4096
INT8_SCALE = ".int8_row_scale"


def load_bundled(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, path: str | Path | None = None
) -> tuple[WanModel, dict]:
    """Load the shipped model from ``path`` (default ``data/bundled``), strictly: every tensor present and of the
    right shape. Returns ``(model in eval mode, info)``; info holds the config dict and the training summary."""
    folder = Path(path) if path is not None else DEFAULT_DIR
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.is_file():
        raise WeightsNotFound(
            f"bundled weights not found at {weights}; train them with `toolkit train --out {folder}` "
            "(one GPU; the shipped weights took about an hour of training on an H200) or pass the folder that has them"
        )
    # config.json = WanConfig.to_dict() plus a "training" summary (ignored by WanConfig.from_dict)
    try:
        meta = json.loads(config.read_text()) if config.is_file() else {}
        cfg = WanConfig.from_dict(meta) if meta else bundled_config()
    except (ValueError, TypeError, CheckpointError) as err:  # bad JSON, out-of-bounds sizes
        raise CheckpointError(f"{config}: {err}") from None
    model = load_weights(weights, cfg, device, dtype)
    info = dict(name="bundled", path=str(weights), config=cfg.to_dict(), training=meta.get("training", {}))
    return model, info


def stored_config(path: str | Path) -> WanConfig:
    """The config ``save_weights`` stored in the metadata of the weights at ``path``."""
    stored = metadata_config(path)
    if stored is None:
        raise CheckpointError(f"{path} holds no config in its metadata; pass the config it was trained with")
    return WanConfig.from_dict(stored)


def load_weights(
    path: str | Path, cfg: WanConfig | None = None, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WanModel:
    """``WanModel(cfg)`` with the safetensors weights at ``path``, strictly (every tensor, right shapes), eval mode.
    ``cfg=None``: the config ``save_weights`` stored in the file's metadata (a training stage's weights)."""
    from safetensors.torch import load_file

    model = WanModel(cfg or stored_config(path))
    state = _dequantized(load_file(str(path)), path)
    # names, shapes and dtypes (an int or bool tensor would be cast silently into float weights)
    validate_state_dict(state, {k: tuple(v.shape) for k, v in model.state_dict().items()}, path)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as err:  # missing / unexpected / mis-shaped tensors
        first = str(err).strip().splitlines()
        raise CheckpointError(f"{path} does not match the bundled config: {' '.join(first[:3])[:400]}") from None
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def as_stored(model: WanModel) -> WanModel:
    """A copy of ``model`` (eval mode, no gradients) with every float tensor rounded to float16, as
    :func:`save_weights` stores it: what :func:`load_weights` gives back from that file, so evaluating the copy
    evaluates the file (the rounding alone moves the held-out scores by a few rollouts)."""
    stored = copy.deepcopy(model).eval().requires_grad_(False)
    for value in stored.state_dict().values():
        if value.is_floating_point():
            value.copy_(value.half())
    return stored


def save_weights(model: WanModel, path: str | Path, *, int8: bool = False, **metadata: str) -> Path:
    """float16 safetensors (the shipped precision) with the model's config in the metadata, written to a temporary
    name and renamed: complete or absent. ``int8``: matrices of at least :data:`INT8_MIN_NUMEL` entries stored as
    int8 with one float16 scale per output row (absmax / 127; half the file — how the re-made teacher is kept in
    ``data/teacher``); :func:`load_weights` turns them back into floats."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, value in model.state_dict().items():
        value = value.detach().float().cpu()
        if int8 and value.dim() >= 2 and value.numel() >= INT8_MIN_NUMEL:
            rows = value.reshape(value.shape[0], -1)
            scale = (rows.abs().amax(1).clamp_min(1e-12) / 127).half()  # rounded first: the loader multiplies by it
            state[name] = (rows / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8).reshape(value.shape)
            state[name + INT8_SCALE] = scale
        else:
            state[name] = value.half().contiguous()
    precision = dict(precision="int8 per-row, float16 scales") if int8 else {}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "model": "bundled",
                                               "config": json.dumps(model.cfg.to_dict()), **precision, **metadata})
    umask = os.umask(0)  # safetensors writes 0600; weights get the mode any other file written here gets
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)
    tmp.replace(path)
    return path


def _dequantized(state: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """``state`` with every int8 tensor that has its ``INT8_SCALE`` partner turned into float32 (an int8 tensor
    without one stays int8, and strict validation rejects it; a scale without its tensor is an error here)."""
    out = {k: v for k, v in state.items() if not k.endswith(INT8_SCALE)}
    for key in state:
        if not key.endswith(INT8_SCALE):
            continue
        name, scale = key[: -len(INT8_SCALE)], state[key]
        q = state.get(name)
        if q is None or q.dtype != torch.int8 or scale.dim() != 1 or scale.numel() != q.shape[0]:
            raise CheckpointError(f"{path}: scale {key} has no int8 tensor {name} of {scale.numel()} rows")
        out[name] = q.float() * scale.float().view(-1, *([1] * (q.dim() - 1)))
    return out


def encode_prompt(prompts: str | data.Prompt | list, cfg: WanConfig | None = None) -> torch.Tensor:
    """Text (``"2 sprites: red circle, blue square; pan left"``), Prompt, or a list of either -> context
    [b, TEXT_LEN, TEXT_DIM] float32. With the config of the model that will read it, warns if a prompt names start
    places that model has not trained on (``warn_unread_places``)."""
    parsed = parse_prompts(prompts)
    if cfg is not None:
        warn_unread_places(cfg, parsed)
    return data.encode_prompts(parsed)


class UnreadPlacesWarning(UserWarning):
    """A prompt names start places for a model that has never trained on them (``warn_unread_places``)."""


def warn_unread_places(cfg: WanConfig, prompts: list[data.Prompt]) -> None:
    """A warning when a prompt names start places (``data.PLACES``) for a model that has never trained on them
    (``config.reads_places``): their channels were always zero in its training, so it reads them as noise."""
    if any(s.place for p in prompts for s in p.sprites) and not reads_places(cfg):
        warnings.warn("this bundled model was not trained on prompts that name start places (e.g. 'red circle "
                      "top-left'): it reads the places as noise; train with `toolkit train --placed`",
                      UnreadPlacesWarning, stacklevel=3)


def parse_prompts(prompts: str | data.Prompt | list) -> list[data.Prompt]:
    """Text, Prompt, or a list of either -> a list of Prompts."""
    if not isinstance(prompts, list):
        prompts = [prompts]
    return [data.parse_prompt(p) if isinstance(p, str) else p for p in prompts]


def to_model_space(video: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> model space [-1, 1]."""
    return video * 2 - 1


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Model space -> pixels in [0, 1] (clamped), float32."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def generate(
    model: WanModel,
    prompts: str | data.Prompt | list,
    *,
    seed: int = 0,
    denoising_steps: tuple[int, ...] = SELF_FORCING_STEPS,
    solver: str = "renoise",
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    eta: float = 1.0,
    guide: WanModel | None = None,
    guide_scale: float = 1.0,
    negatives: str = "null",
    progress: bool = False,
) -> torch.Tensor:
    """Self-Forcing rollout of the bundled model: prompts -> video [b, 3, frames, height, width] in [0, 1].

    ``denoising_steps`` go through the shift-5 warp as in Self-Forcing (default: its 4 steps). The teacher of the
    training recipe is sampled with ``MANY_STEPS``, ``solver="euler"`` (its flow ODE, chunk by chunk) and
    classifier-free guidance against the null prompt (all-zero context) when ``guidance_scale`` ≠ 1 (only at the
    steps whose σ lies in ``guidance_interval``, if given: ``self_forcing_rollout``); ``solver="ancestral"`` samples
    it stochastically instead, with DDIM's ``eta``; ``guide`` (a weaker bundled model) with ``guide_scale`` ≠ 1
    adds autoguidance (``self_forcing_rollout``). ``negatives="leave_one_out"`` guides against the prompt with each
    sprite left out in turn (``data.leave_one_out_contexts``) instead of against the null prompt. Noise and
    re-noising noise come from one generator seeded with ``seed`` on the model's device."""
    if negatives not in ("null", "leave_one_out"):
        raise ValueError(f"negatives must be 'null' or 'leave_one_out', not {negatives!r}")
    device = next(model.parameters()).device
    parsed = parse_prompts(prompts)
    context = encode_prompt(parsed, model.cfg).to(device)
    negative_context = torch.zeros_like(context)
    if negatives == "leave_one_out":
        negative_context = data.leave_one_out_contexts(parsed).to(device)
    frames, height, width = clip_shape(model.cfg)
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(context.shape[0], model.cfg.in_dim, frames, height, width, generator=g, device=device)
    noise = noise.to(model.dtype)
    chunk = frames_per_chunk(model.cfg)
    timesteps = self_forcing_timesteps(denoising_steps=denoising_steps)
    x = self_forcing_rollout(
        model, noise, context, frames_per_chunk=chunk, timesteps=timesteps, generator=g, solver=solver,
        guidance_scale=guidance_scale, negative_context=negative_context,
        guidance_interval=guidance_interval, guide=guide, guide_scale=guide_scale, eta=eta, progress=progress,
        final_clean_pass=False,  # nothing reads the cache after the last chunk
    )
    return to_pixels(x)
