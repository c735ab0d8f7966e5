"""Latents -> pixels -> mp4 with the Wan2.1 VAE (optional extra ``[video]``: diffusers, imageio, imageio-ffmpeg).

The weights are Wan's ``Wan2.1_VAE.pth`` (module names of Wan's ``wan/modules/vae.py``); we decode with diffusers'
``AutoencoderKLWan`` after renaming. The rename table is *generated from the architecture* (``vae_key_pairs``),
walking Wan's module construction order, so it covers any (dim_mult, num_res_blocks, temporal flags).

Latents of the DiT are normalised per channel: z = (μ − mean) / std with Wan's 16 constants
(``docs/self-forcing.md`` "Text encoder and VAE"); decoding undoes that first. Without diffusers, ``save_video``
stores the latents and says which extra is missing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import CheckpointError, ToolkitError
from toolkit.models import checkpoints as ck
from toolkit.models import registry

# Wan2.1 VAE latent statistics (Self-Forcing utils/wan_wrapper.py WanVAEWrapper; same values in diffusers' config).
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# Wan2.1 VAE architecture (wan/modules/vae.py ``_video_vae``): compression 4 x 8 x 8.
WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                 temperal_downsample=(False, True, True))
VIDEO_EXTRA = "pip install 'toolkit[video]'  (diffusers, imageio, imageio-ffmpeg)"


def _residual(wan: str, df: str, has_shortcut: bool) -> list[tuple[str, str]]:
    # Wan ResidualBlock.residual = [RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d]
    pairs = [(f"{wan}.residual.0.gamma", f"{df}.norm1.gamma"), (f"{wan}.residual.3.gamma", f"{df}.norm2.gamma")]
    for p in ("weight", "bias"):
        pairs += [(f"{wan}.residual.2.{p}", f"{df}.conv1.{p}"), (f"{wan}.residual.6.{p}", f"{df}.conv2.{p}")]
        if has_shortcut:
            pairs.append((f"{wan}.shortcut.{p}", f"{df}.conv_shortcut.{p}"))
    return pairs


def _resample(wan: str, df: str, temporal: bool) -> list[tuple[str, str]]:
    # Resample.resample = [Upsample | ZeroPad2d, Conv2d]; 3-D modes add a causal time_conv
    pairs = [(f"{wan}.resample.1.{p}", f"{df}.resample.1.{p}") for p in ("weight", "bias")]
    if temporal:
        pairs += [(f"{wan}.time_conv.{p}", f"{df}.time_conv.{p}") for p in ("weight", "bias")]
    return pairs


def _middle(wan: str, df: str) -> list[tuple[str, str]]:
    # middle = [ResidualBlock, AttentionBlock (RMS_norm, to_qkv, proj), ResidualBlock]
    pairs = _residual(f"{wan}.0", f"{df}.resnets.0", False) + _residual(f"{wan}.2", f"{df}.resnets.1", False)
    pairs.append((f"{wan}.1.norm.gamma", f"{df}.attentions.0.norm.gamma"))
    for p in ("weight", "bias"):
        pairs += [(f"{wan}.1.to_qkv.{p}", f"{df}.attentions.0.to_qkv.{p}"),
                  (f"{wan}.1.proj.{p}", f"{df}.attentions.0.proj.{p}")]
    return pairs


def _conv(wan: str, df: str) -> list[tuple[str, str]]:
    return [(f"{wan}.{p}", f"{df}.{p}") for p in ("weight", "bias")]


def vae_key_pairs(base_dim: int = 96, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
                  num_res_blocks: int = 2, temperal_downsample: Sequence[bool] = (False, True, True),
                  **_: Any) -> list[tuple[str, str]]:
    """Every (Wan name, diffusers ``AutoencoderKLWan`` name) pair of a Wan 2.1 VAE, in Wan's construction order."""
    pairs = _conv("encoder.conv1", "encoder.conv_in")
    dims = [base_dim * u for u in (1, *dim_mult)]
    j = 0
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(num_res_blocks):
            pairs += _residual(f"encoder.downsamples.{j}", f"encoder.down_blocks.{j}", d_in != d_out)
            d_in, j = d_out, j + 1
        if i != len(dim_mult) - 1:
            pairs += _resample(f"encoder.downsamples.{j}", f"encoder.down_blocks.{j}", temperal_downsample[i])
            j += 1
    pairs += _middle("encoder.middle", "encoder.mid_block")
    pairs += [("encoder.head.0.gamma", "encoder.norm_out.gamma")] + _conv("encoder.head.2", "encoder.conv_out")
    pairs += _conv("conv1", "quant_conv") + _conv("conv2", "post_quant_conv")

    pairs += _conv("decoder.conv1", "decoder.conv_in")
    pairs += _middle("decoder.middle", "decoder.mid_block")
    dims = [base_dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
    temporal_up = list(temperal_downsample)[::-1]
    j = 0
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            d_in //= 2  # the previous stage's upsampling conv halves the channels
        for r in range(num_res_blocks + 1):
            pairs += _residual(f"decoder.upsamples.{j}", f"decoder.up_blocks.{i}.resnets.{r}", d_in != d_out)
            d_in, j = d_out, j + 1
        if i != len(dim_mult) - 1:
            pairs += _resample(f"decoder.upsamples.{j}", f"decoder.up_blocks.{i}.upsamplers.0", temporal_up[i])
            j += 1
    pairs += [("decoder.head.0.gamma", "decoder.norm_out.gamma")] + _conv("decoder.head.2", "decoder.conv_out")
    return pairs


def wan_vae_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
                         ) -> dict[str, torch.Tensor]:
    """Rename a Wan VAE state dict to diffusers names; names outside the architecture are kept (and then
    reported as unexpected by the strict load)."""
    table = dict(vae_key_pairs(**(config or WAN21_VAE)))
    return {table.get(k, k): v for k, v in state_dict.items()}


def diffusers_to_wan_vae(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
                         ) -> dict[str, torch.Tensor]:
    """Inverse of ``wan_vae_to_diffusers`` (writes Wan's layout, e.g. for tests)."""
    table = {d: w for w, d in vae_key_pairs(**(config or WAN21_VAE))}
    return {table[k]: v for k, v in state_dict.items()}


def have_video_extra() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def load_vae(path: str | os.PathLike[str] | None = None, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, config: Mapping[str, Any] | None = None) -> Any:
    """diffusers ``AutoencoderKLWan`` with the weights of Wan's ``Wan2.1_VAE.pth`` (found via the registry)."""
    if not have_video_extra():
        raise ToolkitError(f"decoding latents needs diffusers: {VIDEO_EXTRA}")
    from diffusers import AutoencoderKLWan

    path = Path(path) if path else registry.wan_file(registry.VAE_FILE)
    raw = ck.read_safetensors(path) if path.suffix == ".safetensors" else ck.read_torch_file(path)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(raw).__name__}")
    config = dict(config or WAN21_VAE)
    sd = wan_vae_to_diffusers(raw, config)
    with torch.device("meta"):
        vae = AutoencoderKLWan(**{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()})
    ck.validate_state_dict(sd, {k: tuple(v.shape) for k, v in vae.state_dict().items()}, path)
    vae.load_state_dict(sd, strict=True, assign=True)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Normalised DiT latents ``[B, 16, F, h, w]`` -> video ``[B, 3, 1 + 4(F-1), 8h, 8w]`` in [-1, 1] (float32)."""
    z_dim = latents.shape[1]
    mean = torch.tensor(LATENT_MEAN[:z_dim], dtype=torch.float32, device=latents.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENT_STD[:z_dim], dtype=torch.float32, device=latents.device).view(1, -1, 1, 1, 1)
    param = next(vae.parameters())
    z = (latents.float() * std + mean).to(device=param.device, dtype=param.dtype)
    return vae.decode(z).sample.float().clamp(-1, 1)


def write_mp4(video: torch.Tensor, path: str | os.PathLike[str], fps: int = 16) -> Path:
    """Write ``[3, T, H, W]`` in [-1, 1] as an H.264 mp4 (imageio + imageio-ffmpeg)."""
    try:
        import imageio.v2 as imageio
    except ImportError as err:
        raise ToolkitError(f"writing mp4 needs imageio and imageio-ffmpeg: {VIDEO_EXTRA}") from err
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    imageio.mimwrite(str(path), list(frames), fps=fps, macro_block_size=1)
    return path


def save_latents(latents: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.detach().float().cpu().contiguous()}, str(path))
    return path


def decode_to_mp4(latents: torch.Tensor, path: str | os.PathLike[str], *, fps: int = 16, vae: Any = None) -> Path:
    """Decode one clip's latents ``[1, 16, F, h, w]`` and write it as mp4. Raises ``ToolkitError`` without the
    ``[video]`` extra and ``WeightsNotFound`` without ``Wan2.1_VAE.pth`` (the caller keeps the latents)."""
    if latents.shape[0] != 1:
        raise ValueError(f"decode_to_mp4 takes one clip, got a batch of {latents.shape[0]}")
    vae = vae or load_vae(device=latents.device)
    return write_mp4(decode_latents(vae, latents)[0], path, fps=fps)


def save_video(latents: torch.Tensor, out: str | os.PathLike[str], *, vae: Any = None, fps: int = 16,
               device: torch.device | str = "cpu") -> tuple[list[Path], str]:
    """Decode ``[B, 16, F, h, w]`` latents and write ``out`` (``out_0.mp4``... for B > 1), or, without the
    ``[video]`` extra, save the latents next to it. Returns (paths written, a one-line message for the user)."""
    out = Path(out)
    if vae is None and not have_video_extra():
        path = save_latents(latents, out.with_suffix(".latents.safetensors"))
        return [path], f"diffusers not installed: saved latents to {path}; to get mp4 install the extra: {VIDEO_EXTRA}"
    vae = vae or load_vae(device=device)
    b = latents.shape[0]
    names = [out] if b == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(b)]
    paths = [decode_to_mp4(latents[i : i + 1], p, fps=fps, vae=vae) for i, p in enumerate(names)]
    return paths, f"wrote {', '.join(map(str, paths))}"
