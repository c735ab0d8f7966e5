"""Flow-matching schedules and the two sampling loops: Self-Forcing (causal, chunked, few-step) and Wan (bidirectional).

Flow matching: x_t = (1 − σ)·x0 + σ·ε with σ = t / 1000; the model predicts v = ε − x0, so x0 = x_t − σ·v.

Self-Forcing loop (``shared/docs/self-forcing.md`` §7), per chunk of ``frames_per_chunk`` latent frames:
  for each of the 4 timesteps (1000, 937.5, 833.3, 625 = the shift-5 warp of 1000, 750, 500, 250):
      v = model(x, t) with the KV cache; x0 = x − σ·v (float64); unless last: x = (1 − σ')·x0 + σ'·ε' (fresh ε')
  clean pass: model(x0, t = 0) once more, which overwrites the chunk's K/V in the cache with clean K/V.
That is 5 forwards per chunk (35 for 7 chunks). The seam sees ``step`` 0..3 and ``step == 4`` (is_clean) for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from toolkit.models.wan import KVCache, WanModel


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan / Self-Forcing timestep shift: σ' = shift·σ / (1 + (shift − 1)·σ)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def training_timesteps(shift: float = 5.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The scheduler's 1000-entry table t = 1000·σ', σ = 1 − k/1000 (k = 0..999), float64, descending."""
    sigma = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float64)[:-1]
    return num_train_timesteps * shift_sigma(sigma, shift)


def self_forcing_timesteps(
    shift: float = 5.0, denoising_steps: Sequence[int] = (1000, 750, 500, 250), num_train_timesteps: int = 1000
) -> torch.Tensor:
    """Warped denoising timesteps: entries ``num_train − step`` of the training table with t = 0 appended.

    For the released Self-Forcing config this is [1000, 937.5, 833.33…, 625] (SF ``warp_denoising_step``)."""
    table = torch.cat([training_timesteps(shift, num_train_timesteps), torch.zeros(1, dtype=torch.float64)])
    return table[num_train_timesteps - torch.as_tensor(denoising_steps)]


def flow_to_x0(x_t: torch.Tensor, flow: torch.Tensor, timestep: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """x0 = x_t − σ·v in float64 (as Self-Forcing), returned in x_t's dtype."""
    sigma = timestep / num_train_timesteps
    return (x_t.double() - sigma * flow.double()).to(x_t.dtype)


def self_forcing_rollout(
    model: WanModel,
    noise: torch.Tensor,
    context: torch.Tensor,
    *,
    frames_per_chunk: int = 3,
    timesteps: torch.Tensor | Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Generate a clip autoregressively, chunk by chunk, with the KV cache. noise [b c F Hl Wl] -> latents, same shape.

    ``generator`` drives the fresh re-noising noise (seed it for reproducible videos). ``on_chunk(chunk, x0)`` is
    called after each chunk (streaming consumers, progress)."""
    timesteps = self_forcing_timesteps() if timesteps is None else torch.as_tensor(timesteps, dtype=torch.float64)
    b, _, frames, _, _ = noise.shape
    pt = model.cfg.patch_size[0]
    latent_per_chunk = frames_per_chunk * pt
    if frames % latent_per_chunk:
        raise ValueError(f"{frames} latent frames do not split into chunks of {latent_per_chunk}")
    grid = model.grid_size(noise)
    cache = KVCache(model.cfg, b, grid[0] * grid[1] * grid[2], noise.device, model.dtype)
    out = torch.empty_like(noise)
    num_chunks = frames // latent_per_chunk
    steps = len(timesteps)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_chunks * (steps + 1), desc="self-forcing", unit="fwd")
    with torch.no_grad():
        for chunk in range(num_chunks):
            sl = slice(chunk * latent_per_chunk, (chunk + 1) * latent_per_chunk)
            x = noise[:, :, sl]
            token_frame = chunk * frames_per_chunk
            common = dict(kv_cache=cache, start_frame=token_frame, chunk=chunk, clip_frames=grid[0])
            for s in range(steps):
                t = torch.full((b, frames_per_chunk), float(timesteps[s]), device=noise.device)
                flow = model(x, t, context, step=s, **common)
                x0 = flow_to_x0(x, flow, float(timesteps[s]))
                if s < steps - 1:
                    sigma_next = float(timesteps[s + 1]) / 1000
                    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
                    x = (1 - sigma_next) * x0 + sigma_next * eps
                if bar:
                    bar.update()
            out[:, :, sl] = x0
            t0 = torch.zeros(b, frames_per_chunk, device=noise.device)
            model(x0, t0, context, step=steps, is_clean=True, **common)  # rewrites this chunk's K/V; output unused
            if bar:
                bar.update()
            if on_chunk:
                on_chunk(chunk, x0)
    if bar:
        bar.close()
    return out


def wan_sample(
    model: WanModel,
    noise: torch.Tensor,
    context: torch.Tensor,
    *,
    negative_context: torch.Tensor | None = None,
    steps: int = 50,
    shift: float = 5.0,
    guidance_scale: float = 5.0,
    progress: bool = False,
) -> torch.Tensor:
    """Bidirectional Wan2.1 sampling: shift-5 flow-matching schedule, classifier-free guidance (two forwards a
    step when ``negative_context`` is given and ``guidance_scale != 1``), first-order (Euler) flow integration.

    Wan's own default solver is UniPC (multistep, order 2) over the same shifted σ schedule; Euler on the same
    schedule needs more steps for the same quality but visits the same timesteps, which is what attention
    analyses index by. The seam sees ``step`` = sampler step, ``chunk`` = 0."""
    sigmas = shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
    x = noise
    b = noise.shape[0]
    cfg_on = negative_context is not None and guidance_scale != 1.0
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="wan", unit="step")
    with torch.no_grad():
        for s in iterator:
            t = torch.full((b,), float(sigmas[s]) * 1000, device=noise.device)
            flow = model(x, t, context, step=s)
            if cfg_on:
                uncond = model(x, t, negative_context, step=s)
                flow = uncond + guidance_scale * (flow - uncond)
            x = (x.double() + float(sigmas[s + 1] - sigmas[s]) * flow.double()).to(noise.dtype)
    return x
