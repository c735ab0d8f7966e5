"""Train the bundled model on procedural sprite videos, in the regime Self-Forcing samples in.

    python -m toolkit.train --out data/bundled --minutes 6 --seed 0        (one GPU; `toolkit train` is the same)

Objective: flow matching (x_t = (1 − σ)·x0 + σ·ε, target v = ε − x0) with σ drawn from the shift-5 warp
σ = 5u / (1 + 4u), u ~ U(0, 1), independently per 3-frame chunk; a quarter of the chunks instead take one of the four
warped timesteps the sampler uses (1000, 937.5, 833.3, 625), where the rollout needs accuracy.
Teacher forcing on clean context: the model sees the clean clip and its noisy copy in one sequence of 2F frames,

    frames   [clean 0 .. F−1 | noisy 0 .. F−1]     RoPE frame_index = [0 .. F−1, 0 .. F−1]   t = [0 .. 0 | 1000·σ]

under a block-causal mask (3-frame chunks): clean chunk c attends clean chunks ≤ c; noisy chunk c attends
clean chunks < c and itself. That is exactly what each query sees at inference in ``self_forcing_rollout``
(clean-pass K/V of earlier chunks in the cache + the current chunk), so the loss on the noisy half is the
sampler's per-step denoising loss. The masked attention is computed chunk by chunk over the allowed keys only
(``chunked_attention``, a seam backend; tested equal to the masked dense path).
bf16 autocast on GPU, AdamW, linear warm-up + cosine decay, EMA of the weights (the better of raw / EMA on the
held-out loss is shipped as float16; all numbers are recorded).

Time box: with ``--minutes`` the run times its first steps, then fixes the total step count so that training,
evaluation and the artifacts fit the budget; the schedule is then purely step-based and the card records the
count, so ``--steps N --seed S`` reproduces the run (bitwise only up to GPU kernel nondeterminism).

Artifacts in ``--out``: model.safetensors (float16), config.json (WanConfig + training summary), loss.png,
rollout.png (rollouts next to ground-truth clips with the same prompts), rollout.gif, train_log.json, MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from toolkit import procedural
from toolkit.models import bundled
from toolkit.models.sampling import self_forcing_timesteps, shift_sigma
from toolkit.models.seam import AttentionContext, Backend, dense_attention, seams
from toolkit.models.wan import WanConfig, WanModel

HELDOUT_SEED = 1_000_003  # held-out clips, noise and σ: never drawn by training (training uses seed, seed + 1)
SHOWCASE_PROMPTS = (
    "1 sprite: red circle",
    "2 sprites: blue square, yellow triangle; pan left",
    "3 sprites: green diamond, magenta ring, white circle",
    "4 sprites: orange square, cyan triangle, red ring, blue circle; pan up",
)


# ----------------------------------------------------------------------------------------------------------------
# The teacher-forced flow-matching loss


def teacher_forcing_mask(frames: int, tokens_per_frame: int, frames_per_chunk: int, device=None) -> torch.Tensor:
    """Bool [2L, 2L] (True = attend), L = frames·tokens_per_frame, over the sequence [clean clip | noisy clip].

    Clean chunk c attends clean chunks ≤ c (as the clean pass at inference); noisy chunk c attends clean
    chunks < c and noisy chunk c (as a denoising step at inference)."""
    chunk = torch.arange(frames, device=device) // frames_per_chunk
    cq, ck = chunk[:, None], chunk[None, :]
    clean_clean = ck <= cq
    noisy_clean = ck < cq
    noisy_noisy = ck == cq
    no = torch.zeros_like(clean_clean)
    frame_mask = torch.cat([torch.cat([clean_clean, no], 1), torch.cat([noisy_clean, noisy_noisy], 1)], 0)
    return frame_mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def chunked_attention(frames: int, tokens_per_frame: int, frames_per_chunk: int) -> Backend:
    """Seam backend that computes exactly the ``teacher_forcing_mask`` attention without a mask: per chunk, one
    dense SDPA call over the keys that chunk may see (contiguous clean prefix, plus the noisy chunk itself for
    noisy queries). Only the allowed ~30 % of query-key pairs are computed and the unmasked (flash) kernels apply.
    Calls of any other shape (the KV-cache sampler) fall through to ``dense_attention``."""
    n = frames * tokens_per_frame  # tokens of one copy of the clip
    size = frames_per_chunk * tokens_per_frame

    def backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if ctx.attn_mask is None or q.shape[1] != 2 * n or k.shape[1] != 2 * n:
            return dense_attention(q, k, v, ctx)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # b h l d
        clean, noisy = [], []
        for start in range(0, n, size):
            end = min(start + size, n)
            clean.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end],
                                                        scale=ctx.scale))
            keys = torch.cat([k[:, :, :start], k[:, :, n + start : n + end]], dim=2)
            values = torch.cat([v[:, :, :start], v[:, :, n + start : n + end]], dim=2)
            noisy.append(F.scaled_dot_product_attention(q[:, :, n + start : n + end], keys, values, scale=ctx.scale))
        return torch.cat(clean + noisy, dim=2).transpose(1, 2)

    backend.__name__ = "chunked_teacher_forcing_attention"
    return backend


@contextmanager
def attention_backend(model: WanModel, backend: Backend | None):
    """Temporarily set ``backend`` on every seam of ``model``."""
    previous = [(seam, seam.backend) for seam in seams(model)]
    for seam, _ in previous:
        seam.backend = backend
    try:
        yield
    finally:
        for seam, old in previous:
            seam.backend = old


def sample_sigma(
    batch: int,
    frames: int,
    frames_per_chunk: int,
    generator: torch.Generator,
    shift: float = 5.0,
    sampler_frac: float = 0.0,
) -> torch.Tensor:
    """σ [batch, frames], one value per chunk (CPU generator, float32): the shift warp of U(0, 1), except that a
    fraction ``sampler_frac`` of the chunks takes one of the sampler's four warped timesteps (1000, 937.5, 833.3,
    625)/1000, the only noise levels the Self-Forcing rollout evaluates."""
    chunks = frames // frames_per_chunk
    sigma = shift_sigma(torch.rand(batch, chunks, generator=generator, dtype=torch.float64), shift)
    if sampler_frac > 0:
        table = self_forcing_timesteps(shift) / 1000
        pick = table[torch.randint(len(table), (batch, chunks), generator=generator)]
        sigma = torch.where(torch.rand(batch, chunks, generator=generator) < sampler_frac, pick, sigma)
    return sigma.float().repeat_interleave(frames_per_chunk, 1)


def flow_matching_loss(
    model: WanModel,
    x0: torch.Tensor,
    context: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    mask: torch.Tensor,
    per_sample: bool = False,
) -> torch.Tensor:
    """Teacher-forced flow-matching MSE on the noisy half. x0, noise [b c F H W]; sigma [b F]; mask from
    ``teacher_forcing_mask``. Returns the mean (or [b] with ``per_sample``), float32."""
    b, _, frames = x0.shape[:3]
    s = sigma.view(b, 1, frames, 1, 1).to(x0.dtype)
    pred = teacher_forced_flow(model, x0, (1 - s) * x0 + s * noise, context, sigma, mask)
    err = (pred.float() - (noise - x0).float()).pow(2)
    return err.flatten(1).mean(1) if per_sample else err.mean()


def teacher_forced_flow(
    model: WanModel, x0: torch.Tensor, x_t: torch.Tensor, context: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Flow prediction for every chunk of ``x_t`` (noise level ``sigma`` [b F]) given the clean clip ``x0`` as the
    context of earlier chunks: one forward over [x0 | x_t] (2F frames) under ``mask``; returns the noisy half."""
    frames = x0.shape[2]
    t_in = torch.cat([torch.zeros_like(sigma), 1000 * sigma], dim=1)
    frame_index = torch.arange(frames, device=x0.device).repeat(2)
    out = model(torch.cat([x0, x_t], dim=2), t_in, context, frame_index=frame_index, attn_mask=mask)
    return out[:, :, frames:]


@torch.no_grad()
def teacher_ode_x0(
    teacher: WanModel,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    context: torch.Tensor,
    sigma: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    shift: float = 5.0,
) -> torch.Tensor:
    """Endpoint of the teacher's flow ODE dx/dσ = v from each chunk's ``sigma`` [b F] down to 0 (Euler, ``steps``
    steps spaced by the shift warp), all chunks at once, clean context ``x0``: a sharp sample near ``x_t``."""
    b, _, frames = x0.shape[:3]
    u0 = sigma.double() / (shift - (shift - 1) * sigma.double())  # inverse of the shift warp
    x = x_t
    for k in range(steps):
        s_now = shift_sigma(u0 * (1 - k / steps), shift).to(x_t.dtype)
        s_next = shift_sigma(u0 * (1 - (k + 1) / steps), shift).to(x_t.dtype)
        v = teacher_forced_flow(teacher, x0, x, context, s_now, mask).to(x_t.dtype)  # bf16 under autocast
        x = x + (s_next - s_now).view(b, 1, frames, 1, 1) * v
    return x


def heldout_set(n: int, cfg: WanConfig, seed: int = HELDOUT_SEED) -> dict:
    """Fixed held-out clips, prompts, noise and per-chunk σ (CPU, float32), from ``seed`` only."""
    frames, height, width = bundled.clip_shape(cfg)
    chunk = cfg.extra.get("frames_per_chunk", bundled.FRAMES_PER_CHUNK)
    g = torch.Generator().manual_seed(seed)
    video, context, prompts = procedural.sample_batch(n, g, frames=frames, height=height, width=width)
    noise = torch.randn(video.shape, generator=g)
    sigma = sample_sigma(n, frames, chunk, g)
    return dict(x0=bundled.to_model_space(video), context=context, noise=noise, sigma=sigma, prompts=prompts)


@torch.no_grad()
def heldout_loss(model: WanModel, data: dict, batch: int = 16, sigma: float | None = None) -> float:
    """Mean teacher-forced flow-matching loss of ``model`` on a ``heldout_set`` (optionally at one fixed σ)."""
    device = next(model.parameters()).device
    cfg = model.cfg
    frames = data["x0"].shape[2]
    grid = model.grid_size(data["x0"][:1])
    chunk = cfg.extra.get("frames_per_chunk", bundled.FRAMES_PER_CHUNK)
    mask = teacher_forcing_mask(frames, grid[1] * grid[2], chunk, device)
    total, n = 0.0, data["x0"].shape[0]
    for i in range(0, n, batch):
        sl = slice(i, i + batch)
        sig = data["sigma"][sl] if sigma is None else torch.full_like(data["sigma"][sl], sigma)
        with _autocast(device):
            loss = flow_matching_loss(
                model,
                data["x0"][sl].to(device),
                data["context"][sl].to(device),
                data["noise"][sl].to(device),
                sig.to(device),
                mask,
                per_sample=True,
            )
        total += float(loss.sum())
    return total / n


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ----------------------------------------------------------------------------------------------------------------
# Training


def lr_at(step: int, total: int, lr: float, warmup: int, final_frac: float = 0.05) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine from ``lr`` to ``final_frac·lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    out: str | Path,
    *,
    minutes: float | None = 6.0,
    steps: int | None = None,
    seed: int = 0,
    batch: int = 16,
    lr: float = 8e-4,
    warmup: int = 100,
    weight_decay: float = 0.01,
    ema_decay: float = 0.998,
    sampler_frac: float = 0.25,
    distill_minutes: float = 0.0,
    distill_steps: int | None = None,
    ode_steps: int = 8,
    grad_clip: float = 1.0,
    eval_clips: int = 64,
    log_every: int = 25,
    device: str | None = None,
    model_overrides: dict | None = None,
    clip: tuple[int, int, int] | None = None,
    write_artifacts: bool = True,
    quiet: bool = False,
) -> dict:
    """Train from ``seed`` and write the artifacts to ``out``; returns the training summary (also in config.json).

    ``minutes`` is the wall budget of the whole run (calibrated into a step count); ``steps`` fixes the count
    instead (reproduction). ``model_overrides`` / ``clip`` shrink the model / clip for CPU smoke tests."""
    t_start = time.perf_counter()
    out = Path(out)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if steps is None and minutes is None:
        raise ValueError("give --minutes or --steps")
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))

    overrides = dict(model_overrides or {})
    cfg = bundled.bundled_config(**overrides)
    if clip is not None:
        cfg.extra["clip"] = dict(frames=clip[0], height=clip[1], width=clip[2])
    frames, height, width = bundled.clip_shape(cfg)
    chunk = cfg.extra["frames_per_chunk"]

    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    model = WanModel(cfg).to(dev)
    data_gen = torch.Generator().manual_seed(seed + 1)
    noise_gen = torch.Generator(dev).manual_seed(seed + 2)
    grid = model.grid_size(torch.empty(1, cfg.in_dim, frames, height, width))
    mask = teacher_forcing_mask(frames, grid[1] * grid[2], chunk, dev)
    # Same attention as the mask, computed chunk by chunk (only allowed pairs, flash kernels): all of this run's
    # teacher-forced forwards, training and held-out, go through it; the sampler's cached calls fall through.
    backend = chunked_attention(frames, grid[1] * grid[2], chunk)
    for seam in seams(model):
        seam.backend = backend

    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)],
        lr=lr,
        betas=(0.9, 0.99),
        **({"fused": True} if dev.type == "cuda" else {}),
    )
    ema = [p.detach().clone() for p in model.parameters()]

    heldout = heldout_set(eval_clips, cfg)
    t0 = time.perf_counter()
    loss_init = heldout_loss(model, heldout)
    eval_seconds = time.perf_counter() - t0
    say(f"device {dev} | {model.num_parameters() / 1e6:.2f} M params | grid {grid} | "
        f"held-out loss at init {loss_init:.4f}")

    # Budget: training gets what remains after the later held-out evaluations (raw, EMA, float16; 4 sampler
    # timesteps with the artifacts) and ~30 s for rollouts, pictures and files.
    reserve = (3 + 4 * write_artifacts) * eval_seconds + 30 * write_artifacts
    deadline = None if minutes is None else t_start + 60 * minutes - reserve
    total = steps if steps is not None else 10**9
    calibrate_at = (5, 25)
    history: list[tuple[int, float, float]] = []  # step, loss, lr
    pending: list[torch.Tensor] = []
    step = 0
    model.train()
    requested_batch = batch
    if dev.type == "cuda":
        batch = _fitting_batch(model, batch, cfg, mask, say)
    t_train = time.perf_counter()
    while step < total:
        video, context, _ = procedural.sample_batch(
            batch, data_gen, frames=frames, height=height, width=width, device=dev
        )
        x0 = bundled.to_model_space(video)
        noise = torch.randn(x0.shape, generator=noise_gen, device=dev)
        sigma = sample_sigma(batch, frames, chunk, data_gen, sampler_frac=sampler_frac).to(dev)
        cur_lr = lr_at(step, total if steps is not None else max(total, warmup + 1), lr, warmup)
        for group in opt.param_groups:
            group["lr"] = cur_lr
        with _autocast(dev):
            loss = flow_matching_loss(model, x0, context, noise, sigma, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - d)
        pending.append(loss.detach())
        step += 1

        if steps is None and step in calibrate_at:  # fix the step count from the measured step time
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if step == calibrate_at[0]:
                t_cal = time.perf_counter()
            else:
                per_step = (time.perf_counter() - t_cal) / (calibrate_at[1] - calibrate_at[0])
                total = max(step + 1, step + int((deadline - time.perf_counter()) / per_step))
                say(f"calibrated: {per_step * 1000:.0f} ms/step -> {total} steps in the budget")
        if step % log_every == 0 or step == total:
            losses = torch.stack(pending).float().cpu().tolist()
            history += [(step - len(losses) + i + 1, v, cur_lr) for i, v in enumerate(losses)]
            pending = []
            rate = step / (time.perf_counter() - t_train)
            say(f"step {step:5d}/{total} | loss {sum(losses) / len(losses):.4f} | lr {cur_lr:.2e} | {rate:.2f} it/s")
            if deadline is not None and steps is None and time.perf_counter() > deadline + 60:
                say("time box exceeded by a minute: stopping early")
                break
    if dev.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - t_train
    model.eval()

    loss_raw = heldout_loss(model, heldout)
    raw = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, e in zip(model.parameters(), ema):
            p.copy_(e)
    loss_ema = heldout_loss(model, heldout)
    shipped = "ema" if loss_ema <= loss_raw else "raw"
    if shipped == "raw":
        with torch.no_grad():
            for p, r in zip(model.parameters(), raw):
                p.copy_(r)
    with torch.no_grad():  # evaluate exactly what is shipped: float16 weights
        for p in model.parameters():
            p.copy_(p.half().float())
    loss_end = heldout_loss(model, heldout)
    say(f"held-out loss: init {loss_init:.4f} -> end {loss_end:.4f} (float16 {shipped}; raw {loss_raw:.4f}, "
        f"ema {loss_ema:.4f})")

    distill = {}
    if distill_minutes or distill_steps:
        distill = _distill(model, cfg, mask, batch, data_gen, noise_gen, distill_minutes, distill_steps, ode_steps,
                           say)
        if distill["shipped_stage"] == "distilled":
            loss_end = heldout_loss(model, heldout)
            distill["heldout_loss_distilled"] = round(loss_end, 5)

    summary = dict(
        seed=seed,
        steps=step,
        batch=batch,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        ema_decay=ema_decay,
        sampler_frac=sampler_frac,
        grad_clip=grad_clip,
        minutes_budget=minutes,
        train_seconds=round(train_seconds, 1),
        clips_seen=step * batch,
        shipped_weights=shipped,
        batch_requested=requested_batch,
        peak_gpu_memory_gb=round(torch.cuda.max_memory_allocated(dev) / 1e9, 2) if dev.type == "cuda" else None,
        heldout_clips=eval_clips,
        heldout_seed=HELDOUT_SEED,
        heldout_loss_init=round(loss_init, 5),
        heldout_loss_end=round(loss_end, 5),
        heldout_loss_end_raw=round(loss_raw, 5),
        heldout_loss_end_ema=round(loss_ema, 5),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        precision="bf16 autocast" if dev.type == "cuda" else "float32",
        command=f"python -m toolkit.train --out {out} --steps {step} --seed {seed} --batch {batch} --lr {lr}"
        + (f" --distill-steps {distill['distill_steps']}" if distill else ""),
        **distill,
    )
    if write_artifacts:
        _write_artifacts(out, model, cfg, summary, history, heldout, say, t_start)
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return summary


def _distill(
    model: WanModel, cfg: WanConfig, mask, batch, data_gen, noise_gen, minutes, steps, ode_steps, say, eval_prompts=32
):
    """Few-step distillation for Self-Forcing's 4-step loop (optional second stage).

    The loop's x0 at each of its timesteps is, for a flow-matching model, a posterior mean (blurry where the clip
    is uncertain). Here the model (student, initialised from the trained teacher) learns to predict instead the
    endpoint of the teacher's flow ODE started at x_t (``teacher_ode_x0``): a deterministic function of x_t, so
    regression on it stays sharp. x_t = (1 − σ)·x0 + σ·ε with σ one of the sampler's 4 timesteps per chunk, clean
    ground-truth context as in stage 1; loss = MSE in x0 space; AdamW 1e-4, constant after 20 warm-up steps (so
    ``--distill-steps N`` reproduces a time-boxed run). The student is shipped only if its 4-step rollouts match
    their prompts' colours more often than the teacher's (32 prompts, ``procedural.detect_colours``)."""
    import copy

    dev = mask.device
    frames, height, width = bundled.clip_shape(cfg)
    chunk = cfg.extra["frames_per_chunk"]
    table = (self_forcing_timesteps() / 1000).float()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    g_eval = torch.Generator().manual_seed(HELDOUT_SEED + 2)
    prompts = procedural.random_prompts(eval_prompts, g_eval)

    def colour_match(m: WanModel) -> float:
        found = procedural.detect_colours(bundled.generate(m, prompts, seed=HELDOUT_SEED))
        return sum(f == {s.colour for s in p.sprites} for p, f in zip(prompts, found)) / len(prompts)

    before = colour_match(teacher)
    t0 = time.perf_counter()
    deadline = t0 + 60 * minutes if minutes else None
    step, losses = 0, []
    model.train()
    while (steps is not None and step < steps) or (steps is None and time.perf_counter() < deadline):
        video, context, _ = procedural.sample_batch(
            batch, data_gen, frames=frames, height=height, width=width, device=dev
        )
        x0 = bundled.to_model_space(video)
        pick = torch.randint(len(table), (batch, frames // chunk), generator=data_gen)
        sigma = table[pick].repeat_interleave(chunk, 1).to(dev)
        s = sigma.view(batch, 1, frames, 1, 1)
        x_t = (1 - s) * x0 + s * torch.randn(x0.shape, generator=noise_gen, device=dev)
        with _autocast(dev):
            target = teacher_ode_x0(teacher, x0, x_t, context, sigma, mask, ode_steps)
            pred = x_t - s * teacher_forced_flow(model, x0, x_t, context, sigma, mask).float()
            loss = (pred.float() - target.float()).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = 1e-4 * min(1.0, (step + 1) / 20)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())
        step += 1
        if step % 25 == 0:
            say(f"distill step {step:5d} | x0 loss {float(torch.stack(losses[-25:]).mean()):.4f}")
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    after = colour_match(model)
    shipped = "distilled" if after > before else "teacher"
    if shipped == "teacher":
        model.load_state_dict(teacher.state_dict())
    say(f"distillation: {step} steps in {seconds:.0f} s; 4-step colour match {before:.0%} (teacher) -> "
        f"{after:.0%} (student); shipping the {shipped}")
    return dict(
        distill_steps=step,
        distill_seconds=round(seconds, 1),
        distill_ode_steps=ode_steps,
        distill_x0_loss_end=round(float(torch.stack(losses[-25:]).mean()), 5) if losses else None,
        colour_match_4_steps_teacher=round(before, 3),
        colour_match_4_steps_student=round(after, 3),
        shipped_stage=shipped,
    )


def _fitting_batch(model: WanModel, batch: int, cfg: WanConfig, mask: torch.Tensor, say) -> int:
    """Largest batch <= ``batch`` (halving) whose forward + backward fits in GPU memory; probe data come from a
    separate generator and the gradients are discarded, so a run that fits is unaffected."""
    frames, height, width = bundled.clip_shape(cfg)
    dev = mask.device
    while True:
        try:
            x0 = torch.zeros(batch, cfg.in_dim, frames, height, width, device=dev)
            context = torch.zeros(batch, cfg.text_len, cfg.text_dim, device=dev)
            sigma = torch.full((batch, frames), 0.5, device=dev)
            with _autocast(dev):
                loss = flow_matching_loss(model, x0, context, torch.randn_like(x0), sigma, mask)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return batch
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if batch <= 2:
                raise
            say(f"batch {batch} does not fit in GPU memory; trying {batch // 2}")
            batch //= 2


# ----------------------------------------------------------------------------------------------------------------
# Artifacts


@torch.no_grad()
def _write_artifacts(out: Path, model: WanModel, cfg: WanConfig, summary: dict, history, heldout, say, t_start):
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    dev = next(model.parameters()).device

    def save_metadata() -> None:
        (out / bundled.CONFIG_FILE).write_text(json.dumps({**cfg.to_dict(), "training": summary}, indent=2) + "\n")
        (out / "train_log.json").write_text(json.dumps(dict(summary=summary, loss=history), indent=1) + "\n")

    # Weights and config first: nothing below may lose them.
    state = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / bundled.WEIGHTS_FILE), metadata={"format": "pt", "model": "bundled"})
    save_metadata()

    # Loss at each of the sampler's four timesteps (what the rollout actually evaluates).
    per_t = {}
    for t in self_forcing_timesteps().tolist():
        per_t[f"{t:.1f}"] = round(heldout_loss(model, heldout, sigma=t / 1000), 5)
    summary["heldout_loss_at_sampler_timesteps"] = per_t

    # Does a rollout show the prompted sprites? Fraction of clips whose palette colours equal the prompt's,
    # with Self-Forcing's 4 steps and with MANY_STEPS of the same loop.
    g = torch.Generator().manual_seed(HELDOUT_SEED + 1)
    prompts = procedural.random_prompts(32, g)
    for key, steps in (("rollout_colour_match", bundled.SELF_FORCING_STEPS),
                       ("rollout_colour_match_many_steps", bundled.MANY_STEPS)):
        found = procedural.detect_colours(bundled.generate(model, prompts, seed=HELDOUT_SEED, denoising_steps=steps))
        match = sum(f == {s.colour for s in p.sprites} for p, f in zip(prompts, found))
        summary[key] = round(match / len(prompts), 3)
    save_metadata()

    # Showcase: rollouts next to a ground-truth clip of the same prompt.
    frames, height, width = bundled.clip_shape(cfg)
    prompts = [procedural.parse_prompt(p) for p in SHOWCASE_PROMPTS]
    truth = procedural.render(prompts, torch.Generator().manual_seed(0), frames=frames, height=height, width=width)
    four = bundled.generate(model, prompts, seed=0).cpu()
    many = bundled.generate(model, prompts, seed=0, denoising_steps=bundled.MANY_STEPS).cpu()
    rows, labels = [], []
    for p, a, b, c in zip(prompts, truth, four, many):
        rows += [a, b, c]
        labels += [f"ground truth: {p}", f"rollout, 4 steps (Self-Forcing), seed 0: {p}",
                   f"rollout, {len(bundled.MANY_STEPS)} steps, seed 0: {p}"]
    try:
        bundled.save_strip(rows, out / "rollout.png", labels, title="Self-Forcing loop, 4 chunks x 3 frames")
        bundled.save_gif(torch.cat([truth[1], four[1], many[1]], dim=-1), out / "rollout.gif")
        _plot_loss(out / "loss.png", history, summary)
    except Exception as err:  # a missing plotting library must not cost the trained weights
        say(f"warning: pictures not written ({err!r})")
    _write_card(out, cfg, summary, model, dev)
    say(f"wrote {out} ({time.perf_counter() - t_start:.0f} s since start)")


def _plot_loss(path: Path, history, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h[0] for h in history]
    loss = torch.tensor([h[1] for h in history])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss.numpy(), lw=0.5, alpha=0.4, label="training loss (batch)")
    k = max(1, len(loss) // 50)
    if len(loss) > k:
        smooth = loss.unfold(0, k, 1).mean(1)
        ax.plot(steps[k - 1 :], smooth.numpy(), lw=1.5, label=f"running mean ({k} steps)")
    ax.scatter([0, summary["steps"]], [summary["heldout_loss_init"], summary["heldout_loss_end"]], color="red",
               zorder=3, label="held-out (init, end)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_title(f"bundled model: {summary['steps']} steps, {summary['train_seconds']:.0f} s on {summary['device']}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_card(out: Path, cfg: WanConfig, s: dict, model: WanModel, dev) -> None:
    frames, height, width = bundled.clip_shape(cfg)
    per_t = ", ".join(f"t={k}: {v}" for k, v in s["heldout_loss_at_sampler_timesteps"].items())
    distill = ""
    if "shipped_stage" in s:
        distill = (
            f"Few-step distillation stage: {s['distill_steps']} steps in {s['distill_seconds']:.0f} s "
            f"({s['distill_ode_steps']} teacher ODE steps per target); 4-step colour match "
            f"{s['colour_match_4_steps_teacher']:.0%} (teacher) -> {s['colour_match_4_steps_student']:.0%} "
            f"(student); shipped: the {s['shipped_stage']}.\n\n"
        )
    text = f"""# Bundled model card

A {cfg.num_layers}-layer Wan DiT (width {cfg.dim}, {cfg.num_heads} heads x {cfg.head_dim}, FFN {cfg.ffn_dim},
{model.num_parameters() / 1e6:.2f} M parameters, float16 safetensors) trained on procedural sprite videos
(`toolkit.procedural`). Pixel space: RGB in [-1, 1], patch {tuple(cfg.patch_size)}, clips of {frames} frames x
{height} x {width} pixels = token grid {frames} x {height // cfg.patch_size[1]} x {width // cfg.patch_size[2]}.
Prompt = {cfg.text_len} tokens x {cfg.text_dim} (`procedural.encode_prompts`) through Wan's text MLP and
cross-attention.
Sampled with the Self-Forcing loop (`toolkit.models.sampling.self_forcing_rollout`): chunks of
{cfg.extra['frames_per_chunk']} frames, timesteps 1000, 937.5, 833.3, 625, clean pass, KV cache.

## Training

Teacher-forced flow matching on [clean clip | noisy clip] under a block-causal chunk mask, σ per chunk from the
shift-5 warp ({s['sampler_frac']:.0%} of chunks at the sampler's four timesteps); see the `toolkit/train.py` docstring.

| item | value |
|---|---|
| device | {s['device']} ({s['precision']}, torch {s['torch']}) |
| steps x batch | {s['steps']} x {s['batch']} = {s['clips_seen']} clips |
| training time | {s['train_seconds']:.0f} s (budget {s['minutes_budget']} min for the whole run) |
| optimiser | AdamW lr {s['lr']}, warm-up {s['warmup']}, cosine to 5 %, wd {s['weight_decay']}, clip {s['grad_clip']} |
| shipped weights | {s['shipped_weights']} (EMA decay {s['ema_decay']}) |
| seed | {s['seed']} |
| reproduce | `{s['command']}` |

## Evidence it learned

Held-out flow-matching loss ({s['heldout_clips']} clips, seed {s['heldout_seed']}, same noise and σ):
**{s['heldout_loss_init']:.4f} at initialisation -> {s['heldout_loss_end']:.4f} after training**
(x{s['heldout_loss_init'] / s['heldout_loss_end']:.1f}). At the sampler's timesteps: {per_t}.

{distill}Rollouts whose visible palette colours equal the prompt's (32 random prompts, `procedural.detect_colours`):
{s['rollout_colour_match']:.0%} with Self-Forcing's 4 steps, {s['rollout_colour_match_many_steps']:.0%} with
{len(bundled.MANY_STEPS)} steps of the same loop. (Ground-truth clips: 100 %.) Why 4 steps are blurry for this model:
see the `toolkit/models/bundled.py` docstring ("Sampling").

![loss](loss.png)

![rollout](rollout.png)
"""
    (out / "MODEL_CARD.md").write_text(text)


# ----------------------------------------------------------------------------------------------------------------
# Command line (also `toolkit train`)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``toolkit train`` and ``python -m toolkit.train`` (arguments: ``toolkit.commands.train``)."""
    tiny = dict(model_overrides=dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2), clip=(6, 16, 24))
    summary = train(
        args.out or bundled.DEFAULT_DIR,
        minutes=None if args.steps is not None else args.minutes,
        steps=args.steps,
        seed=args.seed,
        batch=args.batch,
        lr=args.lr,
        device=args.device,
        eval_clips=args.eval_clips,
        distill_minutes=args.distill_minutes,
        distill_steps=args.distill_steps,
        ode_steps=args.ode_steps,
        **(tiny if args.tiny else {}),
    )
    print(json.dumps(summary, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    from toolkit.commands.train import add_arguments

    parser = argparse.ArgumentParser(prog="python -m toolkit.train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
