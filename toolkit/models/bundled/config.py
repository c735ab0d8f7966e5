"""The bundled model's facts: architecture, clip and token grid, sampler timesteps, where its files live.

Why this grid (12 frames × 80 × 128 pixels, patch (1, 4, 4) → token grid **12 × 20 × 32**, 7,680 tokens):

* **The paper's regime.** Aligned Monarch tilings reach ≥ 95 % effective sparsity only when b1·b2/(b1 + b2) ≥ 20;
  with the ``fh,w`` base a 3-frame chunk tile has b1 = 3·20 = 60, b2 = 32, so tiling (3, 1, 1) is at
  1 − 92/1920 = 95.2 % and the Fig. 1 sweep spans 0.90–0.95 ((3,4,1) 90.2 %, (1,1,1) 91.9 %, (3,2,1) 93.5 %).
  The 12 × 12 × 20 grid the toolkit shipped before stopped at 92 %.
* **Awkward on purpose.** Height 20 is not a power of two, height ≠ width, and 12 frames are 4 chunks of 3 (as
  Self-Forcing's 21 latent frames are 7 chunks of 3), so aligned and misaligned layouts differ and chunk
  boundaries fall inside every analysis.
* **Pixel space, no autoencoder.** A token is a literal 4 × 4 pixel patch, so an attention map can be read against
  the pixels and against the renderer's sprite masks; one trained network instead of two.
* **Laptop-sized.** Self-attention is ~70 % of a CPU rollout (19 DiT forwards over up to 7,680 keys), and on the
  CPU its cost per call hardly depends on the head dim (the softmax dominates), so depth sets the time. A size
  sweep on 2 cores (random weights) put 6 layers of width 160 at 17 s per rollout against a 20 s budget (8 × 128:
  22 s, 8 × 256: 33 s); the shipped weights measured 19–26 s on different days of the same machine, 18.6–19.7 s
  once ``generate`` skipped the unread clean pass after the last chunk (``docs/bundled-model.md``, "CPU cost").

Why a different, larger **teacher** (``teacher_config``: 8 layers × width 320, 5 heads × 64, patch (1, 8, 8) →
token grid 12 × 10 × 16): the teacher only has to be good, never cheap on a CPU, and it is sampled on the GPU. As
Self-Forcing distils Wan2.1-14B's score into a 1.3B student, the recipe distils a 5× larger model into the shipped
one. A coarser patch makes its teacher-forced sequence (clean + noisy copy) 3,840 tokens instead of 15,360, so
attention costs 16× less and the model can be wide: on one H200 a compiled training step of 32 clips took 0.096 s
(333 clips/s) against 66 clips/s for the shipped architecture eager and 131 compiled
(``benchmarks/results/bundled_training_h200/teacher_arch_probe_h200.json``). Pixel-space diffusion with 8 × 8 × 3
= 192-value patches stays well below the width (320), where velocity prediction still works. The student keeps the
4 × 4 patch, so its attention is on the grid the analyses need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.models.bundled import data
from toolkit.models.wan import WanConfig

FRAMES, HEIGHT, WIDTH = 12, 80, 128  # pixels = latents (no VAE)
PATCH = (1, 4, 4)  # token grid 12 x 20 x 32
TEACHER_PATCH = (1, 8, 8)  # the teacher's grid 12 x 10 x 16 (see above)
FRAMES_PER_CHUNK = 3  # Self-Forcing chunk: 4 chunks of 3 frames
DEFAULT_DIR = Path(__file__).resolve().parents[3] / "data" / "bundled"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
SELF_FORCING_STEPS = (1000, 750, 500, 250)  # warped to t = 1000, 937.5, 833.3, 625 (the released Self-Forcing)
MANY_STEPS = tuple(range(1000, 0, -25))  # 40 steps: the teacher's ODE grid, which contains SELF_FORCING_STEPS
TEACHER_EVAL = "teacher_40_euler_steps"  # the teacher's row in a training record's evaluation
# the training stages in order; each leaves out/stages/<stage>.safetensors (``recipe.py``)
STAGES = ("base", "teacher", "ode_init", "self_forcing")
# the flags that choose the weights stage (b) or (c) starts from; starting from its own or a later stage's weights
# continues the lineage recorded in the folder (``recipe.check_output``)
START_FLAGS = {"ode_init": "--ode-start", "self_forcing": "--sf-start"}


def bundled_config(**overrides: Any) -> WanConfig:
    """The bundled architecture (``overrides`` e.g. ``dim=64, num_layers=2`` for tiny CPU tests)."""
    kwargs = dict(
        dim=160,  # 4 heads x 40
        ffn_dim=640,
        num_heads=4,
        num_layers=6,  # CPU attention costs per call almost regardless of head dim: depth sets the rollout time
        in_dim=3,
        out_dim=3,
        patch_size=PATCH,
        text_dim=data.TEXT_DIM,
        text_len=data.TEXT_LEN,
        freq_dim=256,
        eps=1e-6,
        extra=dict(
            model="bundled",
            space="pixels",
            pixel_range=[-1.0, 1.0],
            clip=dict(frames=FRAMES, height=HEIGHT, width=WIDTH),
            frames_per_chunk=FRAMES_PER_CHUNK,
            prompt_encoding="toolkit.models.bundled.data.encode_prompts",
        ),
    )
    kwargs.update(overrides)
    return WanConfig(**kwargs)


def teacher_config(**overrides: Any) -> WanConfig:
    """The recipe's teacher (stage (a)): the same clip and prompt encoding, wider and with 8 × 8 patches (module
    docstring)."""
    kwargs = dict(dim=320, ffn_dim=1280, num_heads=5, num_layers=8, patch_size=TEACHER_PATCH)
    kwargs.update(overrides)
    cfg = bundled_config(**kwargs)
    cfg.extra["role"] = "teacher"
    return cfg


def tiny_config(clip: tuple[int, int, int] = (6, 16, 24), **overrides: Any) -> WanConfig:
    """A few-thousand-parameter config of the same family, for CPU tests and ``toolkit train --tiny``."""
    cfg = bundled_config(**{**dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2), **overrides})
    cfg.extra["clip"] = dict(frames=clip[0], height=clip[1], width=clip[2])
    return cfg


def tiny_teacher_config(clip: tuple[int, int, int] = (6, 16, 24), **overrides: Any) -> WanConfig:
    """``teacher_config`` at ``tiny_config`` scale (same clip, 8 × 8 patches)."""
    cfg = teacher_config(**{**dict(dim=48, ffn_dim=96, num_heads=2, num_layers=2), **overrides})
    cfg.extra["clip"] = dict(frames=clip[0], height=clip[1], width=clip[2])
    return cfg


def clip_shape(cfg: WanConfig) -> tuple[int, int, int]:
    """(frames, height, width) in pixels of the clips a bundled config generates."""
    clip = cfg.extra.get("clip", {})
    return clip.get("frames", FRAMES), clip.get("height", HEIGHT), clip.get("width", WIDTH)


def frames_per_chunk(cfg: WanConfig) -> int:
    return cfg.extra.get("frames_per_chunk", FRAMES_PER_CHUNK)


def reads_places(cfg: WanConfig) -> bool:
    """Whether the model has trained on prompts that name start places (``data.PLACES``): the stages that train on
    them say so in its config (``learned_places``), which its weights file keeps."""
    return bool(cfg.extra.get("prompt_places", False))


def learned_places(cfg: WanConfig) -> None:
    """Record in ``cfg`` that its model has now trained on prompts that name start places (``reads_places``)."""
    cfg.extra["prompt_places"] = True
