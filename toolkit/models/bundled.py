"""The bundled model: a small Wan DiT trained on procedural sprite videos (``toolkit.procedural``), shipped in
``data/bundled/`` so that every command runs offline, on a laptop CPU, with real learned attention.

It is a *config* of the one Wan implementation (``toolkit.models.wan``), not a fork: same blocks, 3-D RoPE,
per-frame modulation, cross-attention to the prompt, and sampled by the same Self-Forcing loop (3-frame chunks,
4 steps + clean pass, KV cache) as Self-Forcing on Wan2.1-T2V-1.3B.

Design choices (see ``data/bundled/MODEL_CARD.md`` for the trained numbers):

* **Pixel space with patches, no autoencoder.** ``in_dim = out_dim = 3`` (RGB scaled to [-1, 1]) and patch
  (1, 4, 4): a 12-frame 48×80 clip is a token grid of 12 × 12 × 20 (frames × height × width) = 2,880 tokens,
  240 per frame. Height 12 and width 20 are not powers of two and differ, so aligned and misaligned Monarch
  blocks differ in the analyses. Skipping a learned autoencoder keeps the pipeline to one trained network and
  makes every token a literal 4×4 pixel patch (attention maps can be read against the pixels).
* **Prompt = structured toy caption.** ``procedural.encode_prompts`` gives 5 tokens × 32 channels (a global
  token with sprite count and camera pan, one token per sprite with colour, shape, z-order), fed through Wan's
  text MLP and cross-attention exactly like umT5 embeddings (``text_len = 5``, so no padding rows).
* **Sampling.** The same Self-Forcing loop as the 1.3B model (``sampling.self_forcing_rollout``): per chunk, predict
  x0, re-noise with fresh noise to the next timestep, and a clean pass. With Self-Forcing's 4 steps the loop's
  output is x0 predicted at t = 625, which is sharp only for a *distilled* generator (Self-Forcing's DMD stage).
  The bundled model is a flow-matching model trained in the same causal regime (the teacher side of that recipe),
  so its x0 predictions are posterior means: 4-step rollouts are blurry where the clip is uncertain (where the
  sprites start), and more steps of the same loop (``MANY_STEPS``, ending at t = 208) give sharper clips. Attention
  analyses use the 4-step loop by default, like Self-Forcing; both are shown in ``data/bundled/rollout.png``.
* **Size.** 8 layers, width 256, 4 heads of 64 (RoPE split (24, 20, 20)), FFN 768: 8.0 M parameters,
  stored as float16 safetensors of 16 MB (the issue allows 25 MB; 16 MiB is what one file may weigh coming back
  from the GPU machine that trains it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from toolkit import procedural
from toolkit.errors import CheckpointError, WeightsNotFound
from toolkit.models.wan import WanConfig, WanModel

FRAMES, HEIGHT, WIDTH = 12, 48, 80  # pixel clip = latent clip (no VAE); token grid 12 x 12 x 20
FRAMES_PER_CHUNK = 3  # Self-Forcing chunk: 4 chunks of 3 frames
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "data" / "bundled"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
SELF_FORCING_STEPS = (1000, 750, 500, 250)  # warped to t = 1000, 937.5, 833.3, 625 (the released Self-Forcing)
MANY_STEPS = tuple(range(1000, 0, -50))  # 20 steps, warped down to t = 208: same loop, sharper clips


def bundled_config(**overrides) -> WanConfig:
    """The bundled architecture (``overrides`` e.g. ``dim=64, num_layers=2`` for tiny CPU smoke tests)."""
    kwargs = dict(
        dim=256,
        ffn_dim=768,
        num_heads=4,
        num_layers=8,
        in_dim=3,
        out_dim=3,
        patch_size=(1, 4, 4),
        text_dim=procedural.TEXT_DIM,
        text_len=procedural.TEXT_LEN,
        freq_dim=256,
        eps=1e-6,
        extra=dict(
            model="bundled",
            space="pixels",
            pixel_range=[-1.0, 1.0],
            clip=dict(frames=FRAMES, height=HEIGHT, width=WIDTH),
            frames_per_chunk=FRAMES_PER_CHUNK,
            prompt_encoding="toolkit.procedural.encode_prompts",
        ),
    )
    kwargs.update(overrides)
    return WanConfig(**kwargs)


def clip_shape(cfg: WanConfig) -> tuple[int, int, int]:
    """(frames, height, width) in pixels of the clips a bundled config generates."""
    clip = cfg.extra.get("clip", {})
    return clip.get("frames", FRAMES), clip.get("height", HEIGHT), clip.get("width", WIDTH)


def load_bundled(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, path: str | Path | None = None
) -> tuple[WanModel, dict]:
    """Load the shipped model from ``path`` (default ``data/bundled``), strictly: every tensor present and of the
    right shape. Returns ``(model in eval mode, info)``; info holds the config dict and the training summary."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else DEFAULT_DIR
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.is_file():
        raise WeightsNotFound(
            f"bundled weights not found at {weights}; train them with "
            f"`python -m toolkit.train --out {folder} --minutes 6 --seed 0` (one GPU) or pass the folder that has them"
        )
    # config.json = WanConfig.to_dict() plus a "training" summary (ignored by WanConfig.from_dict)
    meta = json.loads(config.read_text()) if config.is_file() else {}
    cfg = WanConfig.from_dict(meta) if meta else bundled_config()
    model = WanModel(cfg)
    state = load_file(str(weights))
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as err:  # missing / unexpected / mis-shaped tensors
        first = str(err).strip().splitlines()
        raise CheckpointError(f"{weights} does not match the bundled config: {' '.join(first[:3])[:400]}") from None
    model = model.to(device=device, dtype=dtype).eval()
    info = dict(name="bundled", path=str(weights), config=cfg.to_dict(), training=meta.get("training", {}))
    return model, info


def encode_prompt(prompts: str | procedural.Prompt | list) -> torch.Tensor:
    """Text (``"2 sprites: red circle, blue square; pan left"``), Prompt, or a list of either -> context
    [b, TEXT_LEN, TEXT_DIM] float32."""
    if not isinstance(prompts, list):
        prompts = [prompts]
    parsed = [procedural.parse_prompt(p) if isinstance(p, str) else p for p in prompts]
    return procedural.encode_prompts(parsed)


def to_model_space(video: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> model space [-1, 1]."""
    return video * 2 - 1


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Model space -> pixels in [0, 1] (clamped), float32."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def generate(
    model: WanModel,
    prompts: str | procedural.Prompt | list,
    *,
    seed: int = 0,
    denoising_steps: tuple[int, ...] = SELF_FORCING_STEPS,
    progress: bool = False,
) -> torch.Tensor:
    """Self-Forcing rollout of the bundled model: prompts -> video [b, 3, frames, height, width] in [0, 1].

    ``denoising_steps`` go through the shift-5 warp as in Self-Forcing (default: its 4 steps; ``MANY_STEPS`` for
    sharper clips, see the module docstring). Noise and re-noising noise come from one generator seeded with
    ``seed`` on the model's device."""
    from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps

    device = next(model.parameters()).device
    context = encode_prompt(prompts).to(device)
    frames, height, width = clip_shape(model.cfg)
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(context.shape[0], model.cfg.in_dim, frames, height, width, generator=g, device=device)
    noise = noise.to(model.dtype)
    chunk = model.cfg.extra.get("frames_per_chunk", FRAMES_PER_CHUNK)
    timesteps = self_forcing_timesteps(denoising_steps=denoising_steps)
    x = self_forcing_rollout(
        model, noise, context, frames_per_chunk=chunk, timesteps=timesteps, generator=g, progress=progress
    )
    return to_pixels(x)


# ----------------------------------------------------------------------------------------------------------------
# Pictures


def save_strip(
    rows: list[torch.Tensor], path: str | Path, labels: list[str] | None = None, scale: int = 3, title: str = ""
) -> Path:
    """PNG with one row per clip ([3, frames, h, w] in [0, 1]) and one column per frame, nearest-upscaled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames, h, w = rows[0].shape[1:]
    fig_w = frames * w * scale / 100
    fig, axes = plt.subplots(len(rows), 1, figsize=(fig_w + 0.2, len(rows) * (h * scale / 100 + 0.3) + 0.4))
    axes = [axes] if len(rows) == 1 else list(axes)
    for i, (ax, clip) in enumerate(zip(axes, rows)):
        strip = clip.float().cpu().permute(2, 1, 3, 0).reshape(h, frames * w, 3).clamp(0, 1)  # h (f w) c
        ax.imshow(strip.numpy(), interpolation="nearest")
        ax.set_xticks([(j + 0.5) * w for j in range(frames)], [str(j) for j in range(frames)], fontsize=6)
        ax.set_yticks([])
        for j in range(1, frames):
            ax.axvline(j * w - 0.5, color="black", lw=0.5)
        if labels:
            ax.set_title(labels[i], fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_gif(video: torch.Tensor, path: str | Path, scale: int = 4, fps: int = 6) -> Path:
    """Animated GIF of one clip [3, frames, h, w] in [0, 1] (Pillow, which matplotlib already depends on)."""
    from PIL import Image

    frames = (video.float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
