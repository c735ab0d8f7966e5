"""Stage (a) of the bundled recipe: the **teacher**, a block-causal flow-matching model sampled with many steps.

Objective: flow matching, x_t = (1 − σ)·x0 + σ·ε, target v = ε − x0, with σ from the shift-3 warp
σ = 3u / (1 + 2u), u ~ U(0, 1), drawn independently per 3-frame chunk. The sampler's grid stays shift 5 (as
Self-Forcing's); training at shift 3 puts a quarter of the samples below σ = 0.5, where a sprite's outline and
texture are decided (shift 5: a sixth), and still a quarter above σ = 0.9 for the layout.

Teacher forcing on clean context: the model sees the clean clip and its noisy copy in one sequence of 2F frames,

    frames   [clean 0 .. F−1 | noisy 0 .. F−1]     RoPE frame_index = [0 .. F−1, 0 .. F−1]   t = [0 .. 0 | 1000·σ]

under a block-causal mask (3-frame chunks): clean chunk c attends clean chunks ≤ c; noisy chunk c attends clean
chunks < c and itself. That is exactly what a query sees in ``self_forcing_rollout`` (clean-pass K/V of earlier
chunks in the cache, then the current chunk), so one forward trains every chunk's denoiser as the sampler calls it
(tested equal in ``tests/test_bundled.py``). ``chunked_attention`` computes the masked attention chunk by chunk over
the allowed keys only (about 30 % of the pairs, unmasked flash kernels).

Why block-causal rather than bidirectional: the next stage regresses a causal student onto the teacher's ODE
solutions. A bidirectional teacher's solution for chunk c depends on the noise of later chunks, which the causal
student never sees, so the regression target is not a function of the student's inputs and the student learns
their average (blur). A block-causal teacher sampled chunk by chunk (``MANY_STEPS``, Euler, KV cache) makes the
solution of chunk c a deterministic function of the earlier clean chunks and chunk c's noise — exactly the
student's inputs.

A fraction ``cond_dropout`` of the clips is trained with the null prompt (all-zero context), so the teacher can
also give the unconditional flow for classifier-free guidance in stage (c).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from toolkit.models.bundled import data
from toolkit.models.bundled.config import MANY_STEPS, clip_shape, frames_per_chunk, learned_places
from toolkit.models.bundled.model import to_model_space
from toolkit.models.sampling import self_forcing_timesteps, shift_sigma
from toolkit.models.seam import AttentionContext, Backend, dense_attention
from toolkit.models.wan import WanConfig, WanModel

SHIFT = 5.0  # the samplers' warp, the ODE pairs' timesteps, the DMD noise levels
TEACHER_SHIFT = 3.0  # σ sampling of the teacher's flow-matching loss (see the module docstring)
X0_LOSS_SIGMA_MIN = 0.05  # x0-predicting models: the flow loss weighs x̂0's error by 1/max(σ, this)² (as JiT)
HELDOUT_SEED = 1_000_003  # held-out clips, noise and σ; training seeds are seed + small offsets
Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------------------------
# Teacher forcing: one forward over [clean | noisy] = every chunk's KV-cache denoising step


def teacher_forcing_mask(
    frames: int, tokens_per_frame: int, frames_per_chunk: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Bool [2L, 2L] (True = attend), L = frames·tokens_per_frame, over the sequence [clean clip | noisy clip].

    Clean chunk c attends clean chunks ≤ c (as the clean pass at inference); noisy chunk c attends clean
    chunks < c and noisy chunk c (as a denoising step at inference)."""
    chunk = torch.arange(frames, device=device) // frames_per_chunk
    cq, ck = chunk[:, None], chunk[None, :]
    no = torch.zeros_like(ck <= cq)
    frame_mask = torch.cat([torch.cat([ck <= cq, no], 1), torch.cat([ck < cq, ck == cq], 1)], 0)
    return frame_mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def chunked_attention(frames: int, tokens_per_frame: int, frames_per_chunk: int) -> Backend:
    """Seam backend that computes exactly the ``teacher_forcing_mask`` attention without a mask: per chunk, one
    dense SDPA call over the keys that chunk may see (contiguous clean prefix, plus the noisy chunk itself for
    noisy queries). Calls of any other shape (the KV-cache sampler) fall through to ``dense_attention``."""
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


@dataclass(frozen=True)
class ClipSetup:
    """Shapes every stage shares: the clip, its chunking, the teacher-forcing mask and its chunked backend."""

    frames: int
    height: int
    width: int
    chunk: int
    mask: torch.Tensor
    backend: Backend
    placed: float = 0.0  # fraction of random prompts that name each sprite's start place (data.random_prompts)
    min_sprites: int = 1  # fewest sprites in a random prompt (1: every count, as every held-out set)

    @classmethod
    def of(cls, cfg: WanConfig, device: torch.device | str, placed: float = 0.0, min_sprites: int = 1) -> ClipSetup:
        frames, height, width = clip_shape(cfg)
        chunk = frames_per_chunk(cfg)
        per_frame = (height // cfg.patch_size[1]) * (width // cfg.patch_size[2])
        mask = teacher_forcing_mask(frames, per_frame, chunk, device)
        return cls(frames, height, width, chunk, mask, chunked_attention(frames, per_frame, chunk), placed,
                   min_sprites)

    def prompts_and_noise(self, batch: int, channels: int, generator: torch.Generator, device: torch.device | str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random prompts' context [b L D] and sampler noise [b c F H W], drawn in that order from ``generator``
        (CPU), on ``device``: the inputs of every stage that samples from pure noise."""
        _, context, noise = self.prompts_context_noise(batch, channels, generator, device)
        return context, noise

    def prompts_context_noise(self, batch: int, channels: int, generator: torch.Generator, device: torch.device | str
                              ) -> tuple[list[data.Prompt], torch.Tensor, torch.Tensor]:
        """:meth:`prompts_and_noise` with the prompts themselves (same draws from ``generator``)."""
        prompts = data.random_prompts(batch, generator, min_sprites=self.min_sprites, placed=self.placed)
        noise = torch.randn(batch, channels, self.frames, self.height, self.width, generator=generator)
        return prompts, data.encode_prompts(prompts).to(device), noise.to(device)

    def sample(
        self, batch: int, generator: torch.Generator, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Procedural clips in model space: (x0 [b c F H W], context [b L D], prompts)."""
        video, context, prompts = data.sample_batch(
            batch, generator, frames=self.frames, height=self.height, width=self.width, device=device,
            min_sprites=self.min_sprites, placed=self.placed,
        )
        return to_model_space(video), context, prompts


def sample_sigma(
    batch: int, frames: int, frames_per_chunk: int, generator: torch.Generator, shift: float = SHIFT
) -> torch.Tensor:
    """σ [batch, frames] (CPU generator, float32): the shift warp of U(0, 1), one value per chunk."""
    chunks = frames // frames_per_chunk
    sigma = shift_sigma(torch.rand(batch, chunks, generator=generator, dtype=torch.float64), shift)
    return sigma.float().repeat_interleave(frames_per_chunk, 1)


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
    ``teacher_forcing_mask``. Returns the mean (or [b] with ``per_sample``), float32. For a model that predicts x0
    (``cfg.prediction``) the same flow error is (x̂0 − x0) / σ; its weight is capped below σ = X0_LOSS_SIGMA_MIN,
    where 1/σ² would let a few nearly clean samples dominate the batch."""
    b, _, frames = x0.shape[:3]
    s = sigma.view(b, 1, frames, 1, 1).to(x0.dtype)
    pred = teacher_forced_flow(model, x0, (1 - s) * x0 + s * noise, context, sigma, mask)
    err = pred.float() - (noise - x0).float()
    if model.cfg.prediction == "x0":  # err = (x̂0 − x0) / σ: cap its weight 1/σ² at σ = X0_LOSS_SIGMA_MIN
        s32 = s.float()
        err = err * (s32 / s32.clamp_min(X0_LOSS_SIGMA_MIN))
    err = err.pow(2)
    return err.flatten(1).mean(1) if per_sample else err.mean()


# ----------------------------------------------------------------------------------------------------------------
# Held-out loss, schedules, precision


def heldout_set(n: int, cfg: WanConfig, seed: int = HELDOUT_SEED) -> dict:
    """Fixed held-out clips, prompts, noise and per-chunk σ (CPU, float32), from ``seed`` only."""
    frames, height, width = clip_shape(cfg)
    g = torch.Generator().manual_seed(seed)
    video, context, prompts = data.sample_batch(n, g, frames=frames, height=height, width=width)
    x0 = to_model_space(video)
    noise = torch.randn(x0.shape, generator=g)
    sigma = sample_sigma(n, frames, frames_per_chunk(cfg), g, TEACHER_SHIFT)
    return dict(x0=x0, context=context, noise=noise, sigma=sigma, prompts=prompts)


@torch.no_grad()
def heldout_loss(model: WanModel, heldout: dict, setup: ClipSetup | None = None, batch: int = 16) -> float:
    """Mean teacher-forced flow-matching loss of ``model`` on a ``heldout_set`` (``setup``: the caller's, so the
    [2L, 2L] mask is not built again)."""
    device = next(model.parameters()).device
    setup = setup or ClipSetup.of(model.cfg, device)
    total, n = 0.0, heldout["x0"].shape[0]
    for i in range(0, n, batch):
        part = {k: v[i : i + batch].to(device) for k, v in heldout.items() if torch.is_tensor(v)}
        with autocast(device):
            loss = flow_matching_loss(model, part["x0"], part["context"], part["noise"], part["sigma"], setup.mask,
                                      per_sample=True)
        total += float(loss.sum())
    return total / n


def lr_at(step: int, total: int, lr: float, warmup: int, final_frac: float = 0.05) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine from ``lr`` to ``final_frac·lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(device: torch.device | str) -> torch.autocast:
    """bf16 autocast on CUDA (training and sampling there), full precision elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def adamw(model: WanModel, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms, modulation vectors)."""
    decay = [p for p in model.parameters() if p.dim() >= 2 and p.requires_grad]
    rest = [p for p in model.parameters() if p.dim() < 2 and p.requires_grad]
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **fused)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, model: WanModel, grad_clip: float) -> None:
    """One update: fresh gradients of ``loss``, norm clipped to ``grad_clip``, then the optimiser's step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()


class Ema:
    """Exponential moving average of a model's parameters (the weights a stage hands on)."""

    def __init__(self, model: WanModel) -> None:
        self.model = model
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.model.parameters()], 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, e in zip(self.model.parameters(), self.shadow):
            p.copy_(e)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class TeacherSettings:
    steps: int = 2400  # at most; ``seconds`` may stop the plan earlier
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    cond_dropout: float = 0.1  # null prompt for this fraction of clips: the unconditional flow for CFG
    ema_decay: float = 0.999
    seconds: float | None = None  # time budget: after ``PROBE_STEPS`` the plan shrinks to the steps that fit
    compile: bool = True  # torch.compile the blocks on CUDA (eager if compiling fails); ignored on the CPU
    # training clips of at least this many sprites (1: all counts, as the recipe); more trains a model further on
    # crowded scenes, where the teacher and the student fail (docs/bundled-model.md, run 15)
    min_sprites: int = 1
    # fraction of training prompts that name where each sprite starts (data.PLACES); 0: the recipe's prompts
    placed: float = 0.0


PROBE_STEPS = 20  # steps timed before a ``seconds`` budget fixes the number of steps (and the cosine's length)


def fit_to_budget(step: int, total: int, seconds: float | None, start: float, device: torch.device | str,
                  name: str, log: Log) -> int:
    """The stage's step count after ``step`` steps: ``total``, or — right after ``PROBE_STEPS`` timed steps, when
    the stage has a time budget of ``seconds`` — the steps that fit in it (never fewer than the probe's)."""
    if seconds is None or step != PROBE_STEPS:
        return total
    synchronize(device)
    elapsed = time.perf_counter() - start
    fit = PROBE_STEPS + int((seconds - elapsed) * PROBE_STEPS / elapsed)
    total = min(total, max(PROBE_STEPS, fit))
    log(f"{name}: {elapsed / PROBE_STEPS:.3f} s/step, {total} steps fit in {seconds:.0f} s")
    return total


def compile_blocks(model: WanModel, enabled: bool) -> None:
    """torch.compile each block in place (``enabled``), or return them to eager."""
    for block in model.blocks:
        if enabled:
            block.compile()
        else:
            block._compiled_call_impl = None


def try_compile(model: WanModel, setup: ClipSetup, batch: int, log: Log) -> float | None:
    """Compile the blocks and run one forward + backward on a throw-away batch (compiles both graphs); seconds it
    took, or None (blocks left eager) if the compiler fails."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    compile_blocks(model, True)
    try:
        x0, context, _ = setup.sample(batch, torch.Generator().manual_seed(0), device)
        sigma = torch.full((batch, setup.frames), 0.5, device=device)
        with autocast(device):
            flow_matching_loss(model, x0, context, torch.randn_like(x0), sigma, setup.mask).backward()
        model.zero_grad(set_to_none=True)
        synchronize(device)
    except Exception as err:  # a compiler failure costs speed, not the run
        compile_blocks(model, False)
        model.zero_grad(set_to_none=True)
        log(f"torch.compile failed, training eagerly ({err!r})"[:300])
        return None
    return time.perf_counter() - start


def train_teacher(
    model: WanModel, settings: TeacherSettings, *, seed: int = 0, log: Log = print, every: int = 50,
    name: str = "teacher",
) -> dict:
    """Train ``model`` in place with the teacher's objective (the recipe's ``base`` and ``teacher`` stages; ``name``
    labels the log and the record); returns the stage record (settings, time, loss curve, held-out loss before and
    after). The weights handed to the next stage are the EMA (exponential moving average)."""
    device = next(model.parameters()).device
    setup = ClipSetup.of(model.cfg, device, settings.placed, settings.min_sprites)
    heldout = heldout_set(32, model.cfg)
    loss_init = heldout_loss(model, heldout, setup)  # eager, before compiling (no graph for no-grad mode)
    compile_seconds = None
    if settings.compile and device.type == "cuda":
        compile_seconds = try_compile(model, setup, settings.batch, log)
    data_gen = torch.Generator().manual_seed(seed + 1)
    noise_gen = torch.Generator(device).manual_seed(seed + 2)
    opt = adamw(model, settings.lr, (0.9, 0.99), settings.weight_decay)
    ema = Ema(model)
    curve: list[tuple[int, float]] = []
    pending: list[torch.Tensor] = []
    model.train()
    total = settings.steps
    start = time.perf_counter()
    step = 0
    while step < total:
        x0, context, _ = setup.sample(settings.batch, data_gen, device)
        drop = torch.rand(settings.batch, generator=data_gen) < settings.cond_dropout
        context = torch.where(drop.to(device).view(-1, 1, 1), torch.zeros_like(context), context)
        noise = torch.randn(x0.shape, generator=noise_gen, device=device)
        sigma = sample_sigma(settings.batch, setup.frames, setup.chunk, data_gen, TEACHER_SHIFT).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, settings.lr, settings.warmup)
        with autocast(device):
            loss = flow_matching_loss(model, x0, context, noise, sigma, setup.mask)
        optimizer_step(opt, loss, model, settings.grad_clip)
        ema.update(min(settings.ema_decay, (1 + step) / (10 + step)))
        pending.append(loss.detach())
        step += 1
        total = fit_to_budget(step, total, settings.seconds, start, device, name, log)
        if step % every == 0 or step == total:
            mean = float(torch.stack(pending).mean())
            curve.append((step, mean))
            pending = []
            rate = step / (time.perf_counter() - start)
            log(f"{name} step {step}/{total} | flow loss {mean:.4f} | {rate:.2f} it/s")
    synchronize(device)
    seconds = time.perf_counter() - start
    compile_blocks(model, False)  # sampling is eager (the KV-cache shapes change every chunk)
    ema.copy_to_model()
    model.eval()
    if settings.placed > 0:
        learned_places(model.cfg)
    loss_end = heldout_loss(model, heldout, setup)
    log(f"{name}: {total} steps in {seconds:.0f} s; held-out flow loss {loss_init:.4f} -> {loss_end:.4f}")
    return dict(
        stage=name, settings=asdict(settings), steps_run=total, seconds=round(seconds, 1),
        compile_seconds=None if compile_seconds is None else round(compile_seconds, 1), curve=curve,
        heldout_loss_init=round(loss_init, 5), heldout_loss_end=round(loss_end, 5),
    )


def warped_timesteps(denoising_steps: Sequence[int]) -> list[float]:
    """The sampler's timesteps for a list of denoising steps (shift-5 warp)."""
    return self_forcing_timesteps(SHIFT, denoising_steps).tolist()


def teacher_sampler(guidance_scale: float, guidance_interval: tuple[float, float] | None = None) -> dict:
    """``generate`` options of the teacher's many-step sampler: 40 Euler steps of its flow ODE, with CFG (only at the
    steps with σ in ``guidance_interval``, if given)."""
    sampler = dict(denoising_steps=MANY_STEPS, solver="euler", guidance_scale=guidance_scale)
    if guidance_interval is not None:
        sampler["guidance_interval"] = tuple(guidance_interval)
    return sampler
