"""From a model name and a prompt to a sampled clip: the glue shared by ``toolkit generate`` and ``toolkit capture``.

    run = prepare_run("self-forcing", prompt="a corgi surfing", seed=0)   # finds weights, conditions, draws noise
    latents = sample(run, progress=True)                                 # Self-Forcing rollout or Wan sampler
    paths = save_outputs(run, latents, "out/")                           # PNG/GIF (bundled), mp4 or latents

Everything a capture file needs as provenance is in ``run.provenance()``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import ToolkitError
from toolkit.models import registry

BUNDLED_DEFAULT_PROMPT = "3 sprites: red circle, blue square, yellow triangle; pan left"
SELF_FORCING_DEFAULT_PROMPT = "A white SUV drives along a winding mountain road at sunset, cinematic, high detail"
# Wan2.1's standard negative prompt (wan/configs/shared_config.py), used for classifier-free guidance.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def default_prompt(model: str) -> str:
    return BUNDLED_DEFAULT_PROMPT if model == "bundled" else SELF_FORCING_DEFAULT_PROMPT


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ToolkitError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(device)


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Run:
    """A prepared sampling run: loaded model, conditioning and initial noise."""

    model: torch.nn.Module
    info: registry.ModelInfo
    prompt: str
    seed: int
    context: torch.Tensor  # b L text_dim
    negative_context: torch.Tensor | None
    noise: torch.Tensor  # b c F H W (latent or, for the bundled model, pixels in [-1, 1])
    sampler: dict[str, Any]
    device: torch.device
    attention: str = "dense"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.name

    def provenance(self) -> dict[str, Any]:
        import platform

        import toolkit

        return {
            **self.info.to_dict(),
            "prompt": self.prompt,
            "seed": self.seed,
            "attention": self.attention,
            "device": str(self.device),
            "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "",
            "compute_dtype": str(self.model.dtype).removeprefix("torch."),
            "latent_shape": list(self.noise.shape),
            "toolkit_version": toolkit.__version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
        }


def condition(name: str, prompt: str, *, prompt_embeds: str | None, device: torch.device) -> torch.Tensor:
    """Prompt -> context [1, L, text_dim]: the bundled model's structured toy prompt, else umT5-XXL embeddings
    (cached on disk) or a user-supplied ``--prompt-embeds`` file."""
    if name == "bundled":
        if prompt_embeds:
            raise ToolkitError("--prompt-embeds is for the real models; the bundled model takes a toy prompt")
        from toolkit.models.bundled import encode_prompt

        return encode_prompt(prompt).to(device)
    from toolkit.models import text_encoder

    if prompt_embeds:
        return text_encoder.load_prompt_embeds(prompt_embeds).to(device)
    return text_encoder.encode_prompts([prompt], device=device).to(device)


def prepare_run(
    model: str = registry.DEFAULT_MODEL,
    *,
    prompt: str | None = None,
    prompt_embeds: str | None = None,
    seed: int = 0,
    checkpoint: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    attention: str = "dense",
) -> Run:
    """Find and load the model, encode the prompt, draw the initial noise from ``seed``."""
    spec = registry.get_spec(model)  # unknown names fail here, before anything loads
    dev = resolve_device(device)
    prompt = prompt or default_prompt(model)
    registry.find_weights(model, checkpoint)  # missing weights: fail in seconds, before loading anything
    if model != "bundled" and not prompt_embeds:
        registry.wan_file(registry.T5_FILE)  # likewise the text encoder, before loading 3 GB of DiT weights
    net, info = registry.load_model(model, checkpoint, device=dev, dtype=DTYPES[dtype])
    from toolkit.attention_backends import install_backend

    install_backend(net, attention)
    sampler = dict(info.sampler)
    context = condition(model, prompt, prompt_embeds=prompt_embeds, device=dev).to(net.dtype)
    negative = None
    if not spec.causal and sampler.get("guidance_scale", 1.0) != 1.0:
        negative = condition(model, WAN_NEGATIVE_PROMPT, prompt_embeds=None, device=dev).to(net.dtype)
    g = torch.Generator(dev).manual_seed(seed)
    cfg = net.cfg
    if model == "bundled":
        shape = (1, cfg.in_dim, sampler["latent_frames"], sampler["height"], sampler["width"])
    else:  # Wan VAE: 4x temporal, 8x spatial compression
        shape = (1, cfg.in_dim, sampler["latent_frames"], sampler["height"] // 8, sampler["width"] // 8)
    noise = torch.randn(shape, generator=g, device=dev, dtype=torch.float32).to(net.dtype)
    return Run(net, info, prompt, seed, context, negative, noise, sampler, dev, attention, {"generator": g})


def sample(run: Run, *, progress: bool = True, on_chunk: Callable[[int, torch.Tensor], None] | None = None):
    """Run the model's own sampler; returns latents (pixels in [-1, 1] for the bundled model)."""
    from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps, wan_sample

    s = run.sampler
    if s["sampler"] == "self-forcing":
        timesteps = self_forcing_timesteps(s.get("shift", 5.0), s.get("denoising_steps", (1000, 750, 500, 250)))
        return self_forcing_rollout(
            run.model, run.noise, run.context, frames_per_chunk=s["frames_per_chunk"], timesteps=timesteps,
            generator=run.extra["generator"], progress=progress, on_chunk=on_chunk,
        )
    return wan_sample(
        run.model, run.noise, run.context, negative_context=run.negative_context, steps=s["steps"],
        shift=s["shift"], guidance_scale=s["guidance_scale"], progress=progress,
    )


def save_outputs(run: Run, latents: torch.Tensor, out_dir: str | Path) -> list[Path]:
    """Write what the run produced: bundled -> PNG strip + GIF; real models -> mp4 through the Wan VAE when the
    ``[video]`` extra and VAE weights are present, else the latents (and a note saying why)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    meta = {k: v for k, v in run.provenance().items() if k != "config"}
    if run.name == "bundled":
        from toolkit.models.bundled import save_gif, save_strip, to_pixels

        video = to_pixels(latents)[0]
        written.append(save_strip([video], out / "video.png", labels=[run.prompt]))
        written.append(save_gif(video, out / "video.gif"))
    else:
        from safetensors.torch import save_file

        path = out / "latents.safetensors"
        save_file({"latents": latents.float().cpu().contiguous()}, str(path), metadata={"prompt": run.prompt})
        written.append(path)
        try:
            from toolkit.models.vae import decode_to_mp4

            written.append(decode_to_mp4(latents, out / "video.mp4", fps=run.sampler.get("fps", 16)))
        except ToolkitError as err:  # no [video] extra or no VAE weights: the latents are the result
            meta["pixels"] = f"not decoded: {err}"
    (out / "run.json").write_text(json.dumps(meta, indent=2, default=str))
    written.append(out / "run.json")
    return written
