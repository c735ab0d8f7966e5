"""From a model name and a prompt to a sampled clip: the glue shared by ``toolkit generate`` and ``toolkit capture``.

    run = prepare_run("self-forcing", prompt="a corgi surfing", seed=0)   # finds weights, conditions, draws noise
    layout = run.layout()                                                # what the seams will see (for capture)
    latents = sample(run, progress=True)                                 # the model's own sampler
    paths = save_outputs(run, latents, "out/")                           # PNG/GIF, mp4 or latents

Everything a capture file needs as provenance is in ``run.provenance()``. What differs between models (default
prompt, conditioning, clip shape, sampler, output) is read from the model's ``registry.ModelSpec``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit._version import __version__
from toolkit.attention.backends import check_attention, set_attention
from toolkit.device import resolve_device
from toolkit.errors import ToolkitError
from toolkit.models import registry, text_encoder
from toolkit.models.bundled import encode_prompt, save_gif, save_strip, to_pixels
from toolkit.models.layout import RunLayout
from toolkit.models.sampling import Sampler, official_noise, sampler_from
from toolkit.models.vae import decode_to_mp4
from toolkit.models.wan import WanConfig

# Wan2.1's standard negative prompt (wan/configs/shared_config.py), used for classifier-free guidance.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


NOISE_MODES = ("toolkit", "official")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Run:
    """A prepared sampling run: loaded model, conditioning and initial noise."""

    model: torch.nn.Module
    spec: registry.ModelSpec
    info: registry.ModelInfo
    prompt: str
    seed: int
    context: torch.Tensor  # b L text_dim
    negative_context: torch.Tensor | None
    noise: torch.Tensor  # b c F H W (latents, or pixels in [-1, 1] for a model without an autoencoder)
    sampler: Sampler
    device: torch.device
    attention: str = "dense"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.name

    def layout(self) -> RunLayout:
        """The run's shape as the seams will see it: grid of this run's noise, the sampler's schedule."""
        return self.sampler.layout(self.model.cfg, self.model.grid_size(self.noise))

    def provenance(self) -> dict[str, Any]:
        import platform

        return {
            **self.info.to_dict(),
            "prompt": self.prompt,
            "seed": self.seed,
            "attention": self.attention,
            "noise": self.extra.get("noise", "toolkit"),
            "device": str(self.device),
            "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "",
            "compute_dtype": str(self.model.dtype).removeprefix("torch."),
            "latent_shape": list(self.noise.shape),
            "toolkit_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
        }


def load_prompt_embeds(path: str, text_dim: int | None) -> torch.Tensor:
    """``--prompt-embeds FILE`` checked as an argument: one prompt's embeddings ``[L, text_dim]`` or
    ``[1, L, text_dim]`` (any width when ``text_dim`` is None; entries that are not floating-point tensors are
    refused by the loader); anything else is one line naming the file, not a shape error deep inside the model."""
    file = Path(path)
    if not file.is_file():
        raise ToolkitError(f"--prompt-embeds {path}: no such file")
    context = text_encoder.load_prompt_embeds(file)
    width = context.shape[-1] if text_dim is None else text_dim
    if not context.is_floating_point() or context.shape[0] != 1 or context.shape[-1] != width:
        raise ToolkitError(f"--prompt-embeds {path}: expected one prompt's embeddings [L, {width}], got "
                           f"[{context.shape[0]}, L, {context.shape[-1]}]")
    return context


def condition(spec: registry.ModelSpec, prompt: str, *, prompt_embeds: str | torch.Tensor | None,
              device: torch.device, cfg: WanConfig | None = None) -> torch.Tensor:
    """Prompt -> context [1, L, text_dim] as the model is conditioned: the bundled model's structured toy prompt
    (checked against the model's ``cfg`` if given: ``encode_prompt``), else umT5-XXL embeddings (cached on disk) or
    a user-supplied ``--prompt-embeds`` file (or its loaded tensor)."""
    if spec.conditioning == "toy":
        if prompt_embeds is not None:
            raise ToolkitError(f"--prompt-embeds is for models conditioned on umT5; {spec.name} takes a toy prompt")
        return encode_prompt(prompt, cfg).to(device)
    if isinstance(prompt_embeds, torch.Tensor):
        return prompt_embeds.to(device)
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
    noise: str = "toolkit",
    frames: int | None = None,
    local_attn_size: int | None = None,
    sink_size: int | None = None,
) -> Run:
    """Find and load the model, encode the prompt, draw the initial noise from ``seed``.

    ``frames`` (latent frames; default the model's clip), ``local_attn_size`` and ``sink_size`` (the causal
    model's rolling KV cache, for clips longer than it was trained on) override the spec's sampler settings
    (`sampling_settings`).

    ``noise``: ``"toolkit"`` (default) draws float32 ``[b c f h w]`` noise from a generator of its own, seeded with
    ``seed`` on the run's device, and re-noises from it, independent of any global random state. ``"official"``
    draws as the released Self-Forcing code does after ``set_seed(seed)``: the global generators seeded, the
    initial noise ``[b f c h w]`` in the model's dtype, the re-noising noise ``[(b f) c h w]`` from the global
    generator — so a capture corresponds to the video the official code makes for the same seed on the same GPU."""
    if noise not in NOISE_MODES:
        raise ToolkitError(f"--noise {noise!r}: choose {' or '.join(NOISE_MODES)}")
    spec = registry.get_spec(model)  # unknown names fail here, before anything loads
    dev = resolve_device(device)
    if prompt is not None and not prompt.strip():
        raise ToolkitError(f"--prompt is empty; leave it out to use {spec.name}'s default prompt "
                           f"({spec.default_prompt!r})")
    prompt = prompt or spec.default_prompt
    if not -(2**63) <= seed < 2**63:
        raise ToolkitError(f"--seed {seed}: a seed is an integer that fits 64 bits (-2^63 .. 2^63-1)")
    embeds = None
    if prompt_embeds and spec.conditioning != "toy":  # a bad file fails before the weights are even looked for
        embeds = load_prompt_embeds(prompt_embeds, spec.config().text_dim if checkpoint is None else None)
    # a rule naming a layer, step, chunk or head the run lacks: refused before loading (a checkpoint's config.json
    # may change the sizes, so then they are checked once it loads)
    overrides = sampling_settings(spec, frames=frames, local_attn_size=local_attn_size, sink_size=sink_size,
                                  attention=attention)
    check_attention(attention, spec_layout(model, frames=frames, local_attn_size=local_attn_size,
                                           sink_size=sink_size) if checkpoint is None else None)
    registry.find_weights(model, checkpoint)  # missing weights: fail in seconds, before loading anything
    if spec.uses_wan_assets and not prompt_embeds:
        registry.wan_file(registry.T5_FILE)  # likewise the text encoder, before loading 3 GB of DiT weights
    net, info = registry.load_model(model, checkpoint, device=dev, dtype=DTYPES[dtype])
    set_attention(net, attention)
    info.sampler.update(overrides)  # provenance (and --resume) see the run's own clip length and cache
    sampler = sampler_from(info.sampler)
    if embeds is not None and embeds.shape[-1] != net.cfg.text_dim:  # a --checkpoint config.json may differ
        raise ToolkitError(f"--prompt-embeds {prompt_embeds}: width {embeds.shape[-1]}, but {model} from "
                           f"{info.checkpoint} takes text_dim {net.cfg.text_dim}")
    context = condition(spec, prompt, prompt_embeds=embeds if embeds is not None else prompt_embeds,
                        device=dev, cfg=net.cfg).to(net.dtype)
    negative = None
    if getattr(sampler, "guidance_scale", 1.0) != 1.0:
        negative = condition(spec, WAN_NEGATIVE_PROMPT, prompt_embeds=None, device=dev).to(net.dtype)
    channels, _, height, width = spec.latent_shape(net.cfg)
    shape = (1, channels, info.sampler["latent_frames"], height, width)
    initial, g = draw_noise(shape, net.dtype, dev, seed, noise)
    run = Run(net, spec, info, prompt, seed, context, negative, initial, sampler, dev, attention,
              {"generator": g, "noise": noise})
    check_attention(attention, run.layout())
    return run


def sampling_settings(spec: registry.ModelSpec, *, frames: int | None = None, local_attn_size: int | None = None,
                      sink_size: int | None = None, attention: str = "dense") -> dict[str, Any]:
    """The sampler settings a run changes from its spec's (``{}``: none), checked in one line before anything
    loads: ``frames`` latent frames (whole chunks for a causal model, within the RoPE table), and the causal
    model's rolling KV cache (``toolkit.models.layout.check_window``)."""
    out: dict[str, Any] = {}
    settings = spec.sampler()
    if frames is not None:
        cfg = spec.config()
        per_chunk = settings.get("frames_per_chunk", 1) * cfg.patch_size[0] if spec.causal else cfg.patch_size[0]
        if frames < 1 or frames % per_chunk:
            raise ToolkitError(f"--frames {frames}: {spec.name} takes a positive multiple of {per_chunk} latent frames"
                               + (" (whole chunks)" if spec.causal else ""))
        if frames // cfg.patch_size[0] > cfg.rope_max_positions:
            raise ToolkitError(f"--frames {frames}: {spec.name} has RoPE positions for "
                               f"{cfg.rope_max_positions} frames")
        out["latent_frames"] = frames
    window = {k: v for k, v in (("local_attn_size", local_attn_size), ("sink_size", sink_size)) if v is not None}
    if window and not spec.causal:
        raise ToolkitError(f"--{next(iter(window)).replace('_', '-')} is the causal model's rolling KV cache; "
                           f"{spec.name} is bidirectional")
    if window.get("sink_size") and attention != "dense":
        raise ToolkitError(f"--sink-size needs --attention dense (the other backends take one run of key frames, "
                           f"not the sink and the window); got --attention {attention}")
    out.update(window)
    sampler_from({**settings, **out})  # an impossible window is refused here
    return out


def spec_layout(model: str, *, frames: int | None = None, local_attn_size: int | None = None,
                sink_size: int | None = None) -> RunLayout:
    """The layout of a run of ``model`` with `sampling_settings`' overrides, from the spec alone (no weights):
    what ``toolkit capture`` checks a selection against before loading."""
    spec = registry.get_spec(model)
    overrides = sampling_settings(spec, frames=frames, local_attn_size=local_attn_size, sink_size=sink_size)
    cfg = spec.config()
    base = spec.layout(cfg)
    frames = overrides.get("latent_frames", spec.sampler()["latent_frames"]) // cfg.patch_size[0]
    return sampler_from({**spec.sampler(), **overrides}).layout(cfg, (frames, *base.grid[1:]))


def draw_noise(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int,
               noise: str) -> tuple[torch.Tensor, torch.Generator]:
    """The initial noise of ``seed`` and the run's generator (see `prepare_run` for the two ``noise`` modes)."""
    g = torch.Generator(device).manual_seed(seed)
    if noise == "official":
        random.seed(seed)  # Self-Forcing's set_seed: every global generator
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return official_noise(shape, dtype, device), g
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype), g


def redraw(run: Run, *, prompt: str, seed: int, prompt_embeds: Any = None) -> Run:
    """``run``'s loaded model with another prompt and seed: conditioning (from ``prompt_embeds`` when given) and
    initial noise exactly as `prepare_run` draws them, so a model loaded once serves a whole prompt set
    (`toolkit.capture.prompt_set`) or comparison (`toolkit.analysis.quality`)."""
    import dataclasses

    if not prompt.strip():
        raise ToolkitError("an empty prompt")
    if not -(2**63) <= seed < 2**63:
        raise ToolkitError(f"seed {seed}: a seed is an integer that fits 64 bits (-2^63 .. 2^63-1)")
    noise = run.extra.get("noise", "toolkit")
    context = condition(run.spec, prompt, prompt_embeds=prompt_embeds, device=run.device,
                        cfg=run.model.cfg).to(run.model.dtype)
    initial, g = draw_noise(tuple(run.noise.shape), run.model.dtype, run.device, seed, noise)
    return dataclasses.replace(run, prompt=prompt, seed=seed, context=context, noise=initial,
                               extra={**run.extra, "generator": g, "noise": noise})


def sample(run: Run, *, progress: bool = True, on_chunk: Callable[[int, torch.Tensor], None] | None = None,
           video_only: bool = False) -> torch.Tensor:
    """Run the model's own sampler; returns latents (pixels in [-1, 1] for a model without an autoencoder).
    ``video_only``: skip forwards that cannot change the video (Self-Forcing's clean pass after the last chunk);
    a capture keeps them, since it records every forward the released loop runs."""
    return run.sampler.sample(run.model, run.noise, run.context, negative_context=run.negative_context,
                              generator=run.extra["generator"], noise_layout=run.extra.get("noise", "toolkit"),
                              progress=progress, on_chunk=on_chunk, final_clean_pass=not video_only)


def save_outputs(run: Run, latents: torch.Tensor, out_dir: str | Path) -> list[Path]:
    """Write what the run produced, as the model's spec says: pixels -> PNG strip + GIF; latents -> mp4 through the
    Wan VAE when the ``[video]`` extra and VAE weights are present, else the latents (and a note saying why)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    meta = {k: v for k, v in run.provenance().items() if k != "config"}
    if run.spec.output == "pixels":
        video = to_pixels(latents)[0]
        chunk = run.info.sampler.get("frames_per_chunk") if run.spec.causal else None
        written.append(save_strip([video], out / "video.png", labels=[run.prompt], frames_per_chunk=chunk))
        written.append(save_gif(video, out / "video.gif"))
    else:
        from safetensors.torch import save_file

        path = out / "latents.safetensors"
        save_file({"latents": latents.float().cpu().contiguous()}, str(path), metadata={"prompt": run.prompt})
        written.append(path)
        try:
            written.append(decode_to_mp4(latents, out / "video.mp4", fps=run.info.sampler.get("fps", 16)))
        except ToolkitError as err:  # no [video] extra or no VAE weights: the latents are the result
            meta["pixels"] = f"not decoded: {err}"
    (out / "run.json").write_text(json.dumps(meta, indent=2, default=str))
    written.append(out / "run.json")
    return written
