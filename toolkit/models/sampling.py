"""Flow-matching schedules and the two sampling loops: Self-Forcing (causal, chunked, few-step) and Wan (bidirectional).

Flow matching: x_t = (1 − σ)·x0 + σ·ε with σ = t / 1000; the model predicts v = ε − x0, so x0 = x_t − σ·v.

Self-Forcing loop (``docs/self-forcing.md`` "Inference loop"), per chunk of ``frames_per_chunk`` latent frames:
  for each of the 4 timesteps (1000, 937.5, 833.3, 625 = the shift-5 warp of 1000, 750, 500, 250):
      v = model(x, t) with the KV cache; x0 = x − σ·v (float64); unless last: x = (1 − σ')·x0 + σ'·ε' (fresh ε')
  clean pass: model(x0, t = 0) once more, which overwrites the chunk's K/V in the cache with clean K/V.
That is 5 forwards per chunk (35 for 7 chunks). The seam sees ``step`` 0..3 and ``step == 4`` (is_clean) for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from toolkit.models.layout import RunLayout, check_window
from toolkit.models.wan import KVCache, WanConfig, WanModel


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

    For the released Self-Forcing config this is [1000, 937.5, 833.33…, 625] (its ``warp_denoising_step``)."""
    table = torch.cat([training_timesteps(shift, num_train_timesteps), torch.zeros(1, dtype=torch.float64)])
    return table[num_train_timesteps - torch.as_tensor(denoising_steps)]


def official_noise(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device | str, *, merge_batch_and_frames: bool = False
) -> torch.Tensor:
    """Gaussian noise for a ``[b c f h w]`` tensor drawn as the released Self-Forcing pipeline draws it, from the
    device's global generator: the initial noise as ``[b f c h w]``, the re-noising noise (``merge_batch_and_frames``)
    as ``[(b f) c h w]``; returned in the toolkit's ``[b c f h w]`` layout."""
    b, c, f, h, w = shape
    drawn = (b * f, c, h, w) if merge_batch_and_frames else (b, f, c, h, w)
    return torch.randn(drawn, dtype=dtype, device=device).view(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def flow_to_x0(x_t: torch.Tensor, flow: torch.Tensor, timestep: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """x0 = x_t − σ·v in float64 (as Self-Forcing), returned in x_t's dtype."""
    sigma = timestep / num_train_timesteps
    return (x_t.double() - sigma * flow.double()).to(x_t.dtype)


def guidance_at(sigma: float | torch.Tensor, scale: float, interval: tuple[float, float] | None = None
                ) -> float | torch.Tensor:
    """The classifier-free guidance scale at noise level σ (a float, or a tensor of them): ``scale`` where σ lies in
    ``interval`` = (σ_lo, σ_hi), 1 (the conditional flow alone) elsewhere; ``scale`` everywhere without one."""
    if isinstance(sigma, torch.Tensor):
        inside = torch.ones_like(sigma, dtype=torch.bool) if interval is None else (
            (sigma >= interval[0]) & (sigma <= interval[1]))
        return torch.where(inside, scale, 1.0).to(sigma.dtype)
    return scale if interval is None or interval[0] <= sigma <= interval[1] else 1.0


def _ancestral_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, eta: float,
                    generator: torch.Generator | None) -> torch.Tensor:
    """x_σ -> x_σ' (σ' < σ) given the predicted x0: DDIM's step with stochasticity ``eta`` (``self_forcing_rollout``).

    For x_σ = α_σ·x0 + σ·ε with α_σ = 1 − σ, the forward transition σ' -> σ has α_{σ|σ'} = α_σ / α_σ' and variance
    σ² − α_{σ|σ'}²·σ'², and the posterior q(x_σ' | x_σ, x0) has variance τ² = (σ² − α_{σ|σ'}²·σ'²)·σ'² / σ²."""
    alpha, alpha_next = 1 - sigma, 1 - sigma_next
    tau2 = (sigma**2 - (alpha / alpha_next) ** 2 * sigma_next**2) * sigma_next**2 / sigma**2
    c = eta * math.sqrt(max(tau2, 0.0))
    x0 = x0.double()
    eps = (x.double() - alpha * x0) / sigma  # the ε the prediction implies
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)
    return (alpha_next * x0 + math.sqrt(sigma_next**2 - c * c) * eps + c * z).to(x.dtype)


def self_forcing_rollout(
    model: WanModel,
    noise: torch.Tensor,
    context: torch.Tensor,
    *,
    frames_per_chunk: int = 3,
    timesteps: torch.Tensor | Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    solver: str = "renoise",
    noise_layout: str = "toolkit",
    exit_step: int | None = None,
    local_attn_size: int = -1,
    sink_size: int = 0,
    guidance_scale: float = 1.0,
    negative_context: torch.Tensor | None = None,
    guidance_interval: tuple[float, float] | None = None,
    guide: WanModel | None = None,
    guide_scale: float = 1.0,
    eta: float = 1.0,
    progress: bool = False,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
    final_clean_pass: bool = True,
) -> torch.Tensor:
    """Generate a clip autoregressively, chunk by chunk, with the KV cache. noise [b c F Hl Wl] -> latents, same shape.

    ``solver``: ``"renoise"`` is Self-Forcing's loop (x0 re-noised to the next timestep with fresh noise from
    ``generator``); ``"euler"`` integrates the flow ODE deterministically (x += (σ' − σ)·v), the many-step sampler
    of a flow-matching teacher; ``"ancestral"`` is DDIM's step with stochasticity ``eta`` on the path
    x_σ = (1 − σ)·x0 + σ·ε: the predicted x0 and ε are recombined at σ' with a part of ε replaced by fresh noise of
    standard deviation c = eta·τ, where τ² is the variance of the true posterior q(x_σ' | x_σ, x0)
    (eta = 1: the DDPM posterior step, eta = 0: exactly the Euler step). All end each chunk with the x0 predicted at
    the last timestep.

    ``noise_layout``: how the re-noising noise is drawn. ``"toolkit"``: shaped like the chunk, ``[b c f h w]``, from
    ``generator``; ``"official"``: as the released Self-Forcing pipeline, ``[(b f) c h w]`` in the chunk's dtype from
    the global generator of its device (seed it with ``torch.manual_seed``), so a run seeded like the official one
    draws the same numbers (``official_noise``).

    ``exit_step`` (training, Self-Forcing's stochastic truncation): every chunk stops at that step and returns its
    x0 prediction; that one forward per chunk runs with autograd on, everything else (earlier steps, clean passes)
    without, so gradients reach the model through exactly one forward per chunk and never through the cache (the
    prompt's cross-attention K/V, cached by the first forward, carry gradient only when that forward is the exit
    step, as in Self-Forcing's training rollout).

    ``local_attn_size`` / ``sink_size`` (Self-Forcing's options, for clips longer than its 21 frames): each chunk
    attends at most that many frames — the first ``sink_size`` and the most recent ones — through a KV cache of that
    size that rolls (``toolkit.models.layout.attended_frames``); -1 (default): every earlier frame.

    ``guidance_scale`` g ≠ 1 (classifier-free guidance, the many-step sampler of a teacher): every forward runs the
    batch twice, with ``context`` and with ``negative_context`` (the bundled model's null prompt is all zeros), each
    half with its own KV cache (clean passes included), and the flow is v_u + g·(v_c − v_u). Several negative
    prompts, ``negative_context`` [m b L D], each with its own cache: v_c + (g − 1)·Σ_j (v_c − v_j) (for m = 1 the
    same flow), e.g. the prompt with each of its sprites left out in turn, so that the guidance asks for every
    sprite rather than for the prompt as a whole (``bundled.data.leave_one_out_contexts``).
    ``guidance_interval`` (σ_lo, σ_hi): guide only the steps whose σ lies in it and take the conditional flow v_c
    elsewhere (both halves still run, so both caches stay filled) — guidance in a limited interval, as Kynkäänniemi
    et al. 2024 found better than guiding every step (at high noise guidance sets the layout, at low noise little).
    ``guide`` with ``guide_scale`` w ≠ 1 (autoguidance, Karras et al. 2024, "Guiding a diffusion model with a bad
    version of itself"): a weaker model of the same clip (fewer steps trained, or smaller; any patch size) runs
    beside with the conditional prompt and its own KV cache, and the flow becomes v_g + w·(v − v_g), v the flow
    above (classifier-free guided or not): the sample is pushed away from the errors the weaker model makes more
    often, rather than away from the unconditional model.

    ``on_step(chunk, step, x)`` sees each model input before its forward (ODE trajectories); ``on_chunk(chunk, x0)``
    each finished chunk (streaming consumers, progress).

    ``final_clean_pass=False`` skips the clean pass after the last chunk: it only refreshes a cache no later chunk
    reads, so the video is the same with one forward fewer (generation). The released loop runs it, and a capture
    records it, so it is on by default."""
    if solver not in ("renoise", "euler", "ancestral"):
        raise ValueError(f"unknown solver {solver!r}: renoise, euler or ancestral")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], not {eta}")
    timesteps = self_forcing_timesteps() if timesteps is None else torch.as_tensor(timesteps, dtype=torch.float64)
    b, _, frames, _, _ = noise.shape
    pt = model.cfg.patch_size[0]
    latent_per_chunk = frames_per_chunk * pt
    if frames % latent_per_chunk:
        raise ValueError(f"{frames} latent frames do not split into chunks of {latent_per_chunk}")
    grid = model.grid_size(noise)
    layout = RunLayout.self_forcing(model.cfg, grid, timesteps.tolist(), frames_per_chunk, local_attn_size, sink_size)
    guided = guidance_scale != 1.0
    copies = 1  # prompts per clip in one batch: the conditional, then the negatives
    if guided:
        if negative_context is None:
            raise ValueError("guidance_scale != 1 needs a negative_context")
        negatives = negative_context if negative_context.dim() == 4 else negative_context.unsqueeze(0)
        copies += negatives.shape[0]
        context = torch.cat([context, *negatives.expand(-1, *context.shape)])  # [cond | neg_1 | ... ] of one batch
    cache = KVCache(model.cfg, b * copies, layout.max_key_frames() * layout.tokens_per_frame,
                    noise.device, model.dtype, local_attn_size=local_attn_size, sink_size=sink_size)
    auto = guide is not None and guide_scale != 1.0
    if auto:
        if guide.cfg.patch_size[0] != pt:
            raise ValueError(f"the guide's temporal patch {guide.cfg.patch_size[0]} differs from the model's {pt}")
        guide_layout = RunLayout.self_forcing(guide.cfg, guide.grid_size(noise), timesteps.tolist(), frames_per_chunk,
                                              local_attn_size, sink_size)
        guide_cache = KVCache(guide.cfg, b, guide_layout.max_key_frames() * guide_layout.tokens_per_frame,
                              noise.device, guide.dtype, local_attn_size=local_attn_size, sink_size=sink_size)
        guide_context = context[:b]  # the conditional prompt

    def flow_of(x: torch.Tensor, t: torch.Tensor, scale: float = 1.0, *, kv_cache: KVCache, **kwargs) -> torch.Tensor:
        xs, ts = (x, t) if copies == 1 else (torch.cat([x] * copies), torch.cat([t] * copies))  # once per prompt
        cond, *negs = model(xs, ts, context, kv_cache=kv_cache, **kwargs).chunk(copies)
        if not negs or scale == 1.0:
            flow = cond
        elif len(negs) == 1:  # written as CFG always was, so one null prompt samples bit for bit as before
            flow = negs[0] + scale * (cond - negs[0])
        else:
            flow = cond + (scale - 1) * sum(cond - neg for neg in negs)
        if not auto:
            return flow
        weak = guide(x.to(guide.dtype), t, guide_context, kv_cache=guide_cache, **kwargs).to(flow.dtype)
        return weak + guide_scale * (flow - weak)

    num_chunks = frames // latent_per_chunk
    steps = len(timesteps) if exit_step is None else exit_step + 1
    outputs = []

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_chunks * (steps + 1) - (not final_clean_pass), desc="self-forcing", unit="fwd")
    for chunk in range(num_chunks):
        sl = slice(chunk * latent_per_chunk, (chunk + 1) * latent_per_chunk)
        x = noise[:, :, sl]
        token_frame = chunk * frames_per_chunk
        common = dict(kv_cache=cache, start_frame=token_frame, chunk=chunk, clip_frames=grid[0])
        for s in range(steps):
            if on_step:
                on_step(chunk, s, x)
            t = torch.full((b, frames_per_chunk), float(timesteps[s]), device=noise.device)
            with torch.set_grad_enabled(s == exit_step and torch.is_grad_enabled()):
                flow = flow_of(x, t, guidance_at(float(timesteps[s]) / 1000, guidance_scale, guidance_interval),
                               step=s, **common)
                x0 = flow_to_x0(x, flow, float(timesteps[s]))
            if s < steps - 1:
                with torch.no_grad():
                    sigma, sigma_next = float(timesteps[s]) / 1000, float(timesteps[s + 1]) / 1000
                    if solver == "euler":
                        x = (x.double() + (sigma_next - sigma) * flow.double()).to(x.dtype)
                    elif solver == "ancestral":
                        x = _ancestral_step(x, x0, sigma, sigma_next, eta, generator)
                    else:
                        if noise_layout == "official":
                            eps = official_noise(x0.shape, x0.dtype, x0.device, merge_batch_and_frames=True)
                        else:
                            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
                        x = (1 - sigma_next) * x0 + sigma_next * eps
            if bar:
                bar.update()
        outputs.append(x0)
        if final_clean_pass or chunk < num_chunks - 1:
            with torch.no_grad():  # rewrites this chunk's K/V with clean ones; output unused
                t0 = torch.zeros(b, frames_per_chunk, device=noise.device)
                flow_of(x0.detach(), t0, step=len(timesteps), is_clean=True, **common)
            if bar:
                bar.update()
        if on_chunk:
            on_chunk(chunk, x0)
    if bar:
        bar.close()
    return torch.cat(outputs, dim=2)


def _wan_float64_sigmas(steps: int, shift: float, num_train_timesteps: int) -> np.ndarray:
    """Wan's ``FlowUniPCMultistepScheduler.set_timesteps``: σ_max is its float32 training table's first entry
    (float32(1 − 1/N) = 0.99900001…, not 0.999), spaced by ``np.linspace`` down to σ_min = 0 (exclusive) and
    shifted, in float64."""
    sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
    sigmas = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def wan_sigmas(steps: int, shift: float = 5.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Wan2.1's sampling schedule as its solver uses it: ``steps`` shifted σ (``_wan_float64_sigmas``) with σ = 0
    appended (``final_sigmas_type = "zero"``), rounded to float32 as Wan stores them; a float64 tensor of length
    steps + 1."""
    sigmas = np.concatenate([_wan_float64_sigmas(steps, shift, num_train_timesteps), [0.0]]).astype(np.float32)
    return torch.from_numpy(sigmas).double()


def wan_model_timesteps(steps: int, shift: float = 5.0, num_train_timesteps: int = 1000) -> list[float]:
    """The integer timesteps Wan feeds its model, one per step: the float64 σ·N truncated to int64, as Wan does
    before its sigmas are rounded to float32."""
    t = _wan_float64_sigmas(steps, shift, num_train_timesteps) * num_train_timesteps
    return [float(x) for x in torch.from_numpy(t).to(torch.int64)]


class UniPC:
    """UniPC-bh2 multistep solver for flow matching (Wan2.1's default ``FlowUniPCMultistepScheduler``: order 2,
    x0-prediction, corrector on every step, first and last steps first order).

    With λ = log((1 − σ)/σ) and h = λ_next − λ, the predictor from σ to σ' with x0 estimates m0 (now) and m1
    (previous step) is
        x' = (σ'/σ)·x − (1 − σ')·(e^{−h} − 1)·m0 − (1 − σ')·(e^{−h} − 1)·½·(m1 − m0)/r,   r = (λ_prev − λ)/h
    (the last term only at order 2). The corrector re-does the step that produced x once the model has been
    evaluated there, with weights from the 2×2 system of UniC. Sample arithmetic runs in float32.
    """

    def __init__(self, sigmas: torch.Tensor) -> None:
        self.sigmas = sigmas
        self.lambdas = torch.log1p(-sigmas) - torch.log(sigmas)  # +inf at σ = 0
        self.x0s: list[torch.Tensor] = []  # x0 estimates of the last two steps, oldest first
        self.last_x: torch.Tensor | None = None
        self.last_order = 0

    def _coefficients(self, i: int, j: int) -> tuple[float, float, float]:
        """Step σ_i -> σ_j: (σ_j/σ_i, α_j·(e^{−h} − 1), B(h) = e^{−h} − 1) with h = λ_j − λ_i, in float64."""
        hh = -float(self.lambdas[j] - self.lambdas[i])
        phi1 = math.expm1(hh)
        alpha_j = 1.0 - float(self.sigmas[j])
        return float(self.sigmas[j] / self.sigmas[i]), alpha_j * phi1, phi1

    def step(self, i: int, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """Given the model's flow at step i (sample x at σ_i), return the sample at σ_{i+1}."""
        x, flow = x.float(), flow.float()
        x0 = x - float(self.sigmas[i]) * flow
        if i > 0:  # UniC: redo the step i-1 -> i with the new x0 at σ_i
            x = self._correct(i, x0)
        self.x0s = (self.x0s + [x0])[-2:]
        order = min(2, len(self.sigmas) - 1 - i, len(self.x0s))
        self.last_x, self.last_order = x, order
        ratio, a_phi, b_h = self._coefficients(i, i + 1)
        m0 = self.x0s[-1]
        out = ratio * x - a_phi * m0
        if order == 2:
            r = float((self.lambdas[i - 1] - self.lambdas[i]) / (self.lambdas[i + 1] - self.lambdas[i]))
            alpha = 1.0 - float(self.sigmas[i + 1])
            out = out - alpha * b_h * 0.5 * (self.x0s[-2] - m0) / r
        return out

    def _correct(self, i: int, x0_now: torch.Tensor) -> torch.Tensor:
        ratio, a_phi, b_h = self._coefficients(i - 1, i)
        m0 = self.x0s[-1]  # x0 at σ_{i-1}
        alpha = 1.0 - float(self.sigmas[i])
        base = ratio * self.last_x - a_phi * m0
        d_now = x0_now - m0
        if self.last_order == 1:
            return base - alpha * b_h * 0.5 * d_now
        h = float(self.lambdas[i] - self.lambdas[i - 1])
        hh = -h
        r = float(self.lambdas[i - 2] - self.lambdas[i - 1]) / h
        phi_k = b_h / hh - 1  # h·φ_2 / h terms of UniC's b vector, as in the UniPC paper
        b1 = phi_k / b_h
        phi_k = phi_k / hh - 0.5
        b2 = phi_k * 2 / b_h
        rho = torch.linalg.solve(torch.tensor([[1.0, 1.0], [r, 1.0]], dtype=torch.float64),
                                 torch.tensor([b1, b2], dtype=torch.float64))
        d_prev = (self.x0s[-2] - m0) / r
        return base - alpha * b_h * (float(rho[0]) * d_prev + float(rho[1]) * d_now)


def wan_sample(
    model: WanModel,
    noise: torch.Tensor,
    context: torch.Tensor,
    *,
    negative_context: torch.Tensor | None = None,
    steps: int = 50,
    shift: float = 5.0,
    guidance_scale: float = 5.0,
    solver: str = "unipc",
    progress: bool = False,
) -> torch.Tensor:
    """Bidirectional Wan2.1 sampling as Wan's defaults: shift-5 schedule (``wan_sigmas``), UniPC (``solver="euler"``
    for first-order flow integration on the same schedule), classifier-free guidance with two forwards a step when
    ``negative_context`` is given and ``guidance_scale != 1``. The model sees integer timesteps ⌊1000·σ⌋ as in Wan.
    The seam sees ``step`` = sampler step, ``chunk`` = 0."""
    sigmas = wan_sigmas(steps, shift)
    model_timesteps = wan_model_timesteps(steps, shift)
    unipc = UniPC(sigmas) if solver == "unipc" else None
    if solver not in ("unipc", "euler"):
        raise ValueError(f"unknown solver {solver!r}")
    x = noise.float()
    b = noise.shape[0]
    cfg_on = negative_context is not None and guidance_scale != 1.0
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="wan", unit="step")
    with torch.no_grad():
        for s in iterator:
            t = torch.full((b,), model_timesteps[s], device=noise.device)
            x_in = x.to(noise.dtype)
            flow = model(x_in, t, context, step=s).float()
            if cfg_on:
                uncond = model(x_in, t, negative_context, step=s).float()
                flow = uncond + guidance_scale * (flow - uncond)
            if unipc:
                x = unipc.step(s, x, flow)
            else:
                x = x + float(sigmas[s + 1] - sigmas[s]) * flow
    return x.to(noise.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Samplers: one object per sampling loop, owning its schedule; the loop and the capture layout both read it


@dataclass(frozen=True)
class SelfForcingSampler:
    """Self-Forcing's chunked few-step loop (``self_forcing_rollout``) with its warped schedule."""

    frames_per_chunk: int = 3
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    local_attn_size: int = -1  # rolling KV cache window in frames (-1: global, as released)
    sink_size: int = 0  # first frames the rolling cache keeps

    name = "self-forcing"

    def __post_init__(self) -> None:
        check_window(self.local_attn_size, self.sink_size, self.frames_per_chunk)

    def timesteps(self) -> torch.Tensor:
        """Warped denoising timesteps, float64 (the clean pass at t = 0 follows them)."""
        return self_forcing_timesteps(self.shift, self.denoising_steps)

    def layout(self, cfg: WanConfig, grid: tuple[int, int, int]) -> RunLayout:
        """Steps 0..n−1 at ``timesteps()``, then the clean pass (step n, t = 0), chunk by chunk."""
        return RunLayout.self_forcing(cfg, grid, self.timesteps().tolist(), self.frames_per_chunk,
                                      self.local_attn_size, self.sink_size)

    def sample(self, model: WanModel, noise: torch.Tensor, context: torch.Tensor, *,
               generator: torch.Generator | None = None, noise_layout: str = "toolkit", progress: bool = False,
               on_chunk: Callable[[int, torch.Tensor], None] | None = None, final_clean_pass: bool = True,
               **_: Any) -> torch.Tensor:
        return self_forcing_rollout(model, noise, context, frames_per_chunk=self.frames_per_chunk,
                                    timesteps=self.timesteps(), generator=generator, noise_layout=noise_layout,
                                    local_attn_size=self.local_attn_size, sink_size=self.sink_size,
                                    progress=progress, on_chunk=on_chunk, final_clean_pass=final_clean_pass)


@dataclass(frozen=True)
class WanSampler:
    """Wan2.1's bidirectional sampler (``wan_sample``): shifted schedule, UniPC, classifier-free guidance."""

    steps: int = 50
    shift: float = 5.0
    guidance_scale: float = 5.0

    name = "wan"

    def timesteps(self) -> list[float]:
        """The integer timesteps the model receives, one per step."""
        return wan_model_timesteps(self.steps, self.shift)

    def layout(self, cfg: WanConfig, grid: tuple[int, int, int]) -> RunLayout:
        return RunLayout.bidirectional(cfg, grid, self.timesteps())

    def sample(self, model: WanModel, noise: torch.Tensor, context: torch.Tensor, *,
               negative_context: torch.Tensor | None = None, progress: bool = False, **_: Any) -> torch.Tensor:
        return wan_sample(model, noise, context, negative_context=negative_context, steps=self.steps,
                          shift=self.shift, guidance_scale=self.guidance_scale, progress=progress)


Sampler = SelfForcingSampler | WanSampler


def sampler_from(settings: dict[str, Any]) -> Sampler:
    """The sampler a model spec's settings name (``{"sampler": "self-forcing" | "wan", ...}``); other keys (clip
    size, fps) belong to the model and are ignored here."""
    kind = settings["sampler"]
    if kind == SelfForcingSampler.name:
        return SelfForcingSampler(settings.get("frames_per_chunk", 3),
                                  tuple(settings.get("denoising_steps", (1000, 750, 500, 250))),
                                  settings.get("shift", 5.0), settings.get("local_attn_size", -1),
                                  settings.get("sink_size", 0))
    if kind == WanSampler.name:
        return WanSampler(settings.get("steps", 50), settings.get("shift", 5.0), settings.get("guidance_scale", 5.0))
    raise ValueError(f"unknown sampler {kind!r}")
