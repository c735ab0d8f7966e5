"""Stage (b) of the bundled recipe: **ODE-regression initialisation** of the causal 4-step student (Self-Forcing's
``ode_init``, the CausVid stage).

ODE pairs: from pure noise, the teacher's many-step sampler — ``self_forcing_rollout(solver="euler")`` over
``ode_grid(n)`` (``n`` uniform steps before the shift-5 warp: 20 in the recipe, 40 = ``MANY_STEPS`` for the
teacher's own samples), chunk by chunk with the KV cache and a clean pass after each chunk — and its trajectory
states kept at the four warped timesteps the student samples with (1000, 937.5, 833.3, 625), which every grid of a
multiple of 4 steps contains exactly (uniform steps 1000, 750, 500, 250 before the warp). One shift (5) throughout,
unlike the released Self-Forcing script (pairs at shift 8, student at shift 5). 20 steps halve the pool's cost of
40: the teacher's samples did not change measurably between 40 and 100 steps (``docs/bundled-model.md``).

Regression: per chunk a random k ∈ {0..3} (independent across chunks); the chunk's input is its trajectory state k
at t_k, the earlier chunks' context is the clean ODE output (teacher forcing over [x0 | x_t], which is the KV-cache
rollout's attention exactly: ``teacher.teacher_forced_flow``); the target is the ODE output x0 and the loss
‖x̂0 − x0‖² with x̂0 = x_t − σ_k·v. Because the teacher is block-causal, each chunk's ODE solution is a function of
the student's inputs (earlier clean chunks, this chunk's state), so the regression has a sharp target.

The pairs are drawn once into a pool (``ODESettings.pairs``) and the student samples batches from it, as
Self-Forcing trains from a fixed LMDB of pairs. With ``ODESettings.keep_prompted`` the pool keeps only the
trajectories whose teacher output shows what its prompt asks for (the sprite evaluator's colour and count match,
``evaluate.py``): the teacher's failures — mostly a prompted sprite left out — are not regressed onto. Self-Forcing
keeps every pair; this filter is the bundled recipe's own, possible because its prompts can be checked.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from toolkit.errors import ToolkitError
from toolkit.models.bundled import evaluate
from toolkit.models.bundled.config import MANY_STEPS, SELF_FORCING_STEPS, learned_places
from toolkit.models.bundled.model import to_pixels
from toolkit.models.bundled.teacher import (
    ClipSetup,
    Log,
    adamw,
    autocast,
    compile_blocks,
    fit_to_budget,
    lr_at,
    optimizer_step,
    synchronize,
    teacher_forced_flow,
    try_compile,
    warped_timesteps,
)
from toolkit.models.sampling import self_forcing_rollout
from toolkit.models.wan import WanModel


@torch.no_grad()
def ode_pairs(
    teacher: WanModel,
    context: torch.Tensor,
    noise: torch.Tensor,
    *,
    frames_per_chunk: int,
    ode_steps: Sequence[int] = MANY_STEPS,
    keep: Sequence[int] = SELF_FORCING_STEPS,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher ODE trajectories from ``noise`` [b c F H W]: (states [len(keep), b, c, F, H, W] — each chunk's sampler
    input at the warped timesteps of ``keep`` —, x0 [b c F H W] the sampler's output). ``keep`` ⊂ ``ode_steps``;
    ``guidance_scale``: the teacher's classifier-free guidance against the null prompt (as Self-Forcing's pairs come
    from Wan sampled with CFG), applied at the steps whose σ lies in ``guidance_interval`` (every step if None)."""
    missing = [k for k in keep if k not in ode_steps]
    if missing:
        raise ValueError(f"steps {missing} are not on the ODE grid")
    slots = {list(ode_steps).index(k): i for i, k in enumerate(keep)}
    states = torch.empty((len(keep), *noise.shape), dtype=noise.dtype, device=noise.device)

    def record(chunk: int, step: int, x: torch.Tensor) -> None:
        if step in slots:
            sl = slice(chunk * frames_per_chunk, (chunk + 1) * frames_per_chunk)
            states[slots[step], :, :, sl] = x

    x0 = self_forcing_rollout(
        teacher, noise, context, frames_per_chunk=frames_per_chunk, timesteps=warped_timesteps(ode_steps),
        solver="euler", guidance_scale=guidance_scale, negative_context=torch.zeros_like(context),
        guidance_interval=guidance_interval, on_step=record,
    )
    return states, x0


def ode_grid(steps: int) -> tuple[int, ...]:
    """``steps`` uniform denoising steps from 1000 (before the warp); ``ode_grid(40) == MANY_STEPS``. It has to
    contain the student's ``SELF_FORCING_STEPS``, so ``steps`` is a multiple of 4 that divides 1000."""
    if steps < 1 or 1000 % steps or steps % len(SELF_FORCING_STEPS):
        raise ValueError(f"an ODE grid of {steps} steps does not contain the student's steps "
                         f"{', '.join(map(str, SELF_FORCING_STEPS))}: use a multiple of 4 that divides 1000 "
                         "(e.g. 20, 40)")
    return tuple(range(1000, 0, -1000 // steps))


# the weights stage (b) may start from (``ODESettings.start``)
ODE_STARTS = ("base", "ode_init", "self_forcing")


@dataclass(frozen=True)
class ODESettings:
    # defaults: the shipped run's (run 6 of docs/bundled-model.md, where a 300 s budget fitted 1452 steps)
    pairs: int = 3072  # teacher trajectories in the pool
    pair_batch: int = 256  # trajectories generated per teacher rollout
    grid_steps: int = 20  # the teacher's Euler steps per chunk (``ode_grid``)
    steps: int = 1452  # at most; ``seconds`` may stop the plan earlier
    batch: int = 32
    lr: float = 3e-4
    warmup: int = 20
    grad_clip: float = 1.0
    seconds: float | None = None  # time budget of the regression (the pool not counted; ``teacher.fit_to_budget``)
    compile: bool = True  # torch.compile the student's blocks on CUDA for the regression
    keep_prompted: bool = False  # pool only trajectories whose teacher output matches its prompt (module docstring)
    # the student's starting weights: "base"; "ode_init" to train an earlier stage-(b) student further on a fresh
    # pool (a run split over several 10-minute device calls; the record lists the later runs under "continued");
    # "self_forcing" to start a second round from the stage-(c) student, e.g. on pairs of a teacher trained longer
    # since (listed under "continued" too, with the record of the stage-(c) student it started from)
    start: str = "base"
    placed: float = 0.0  # fraction of the pool's prompts that name each sprite's start place (data.PLACES)


def make_pool(
    teacher: WanModel, settings: ODESettings, *, seed: int, guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None, log: Log = print
) -> dict:
    """Draw ``settings.pairs`` prompts and noises and solve the teacher ODE for each (states, x0, context on the
    teacher's device; states and x0 in bfloat16 on CUDA to halve the pool). With ``settings.keep_prompted`` only
    the trajectories whose x0 the sprite evaluator scores as showing the prompt's colours and sprite count are
    kept (``kept`` of ``drawn``)."""
    device = next(teacher.parameters()).device
    setup = ClipSetup.of(teacher.cfg, device, settings.placed)
    g = torch.Generator().manual_seed(seed)
    store = torch.bfloat16 if device.type == "cuda" else torch.float32
    states, x0s, contexts = [], [], []
    start = time.perf_counter()
    for i in range(0, settings.pairs, settings.pair_batch):
        n = min(settings.pair_batch, settings.pairs - i)
        prompts, context, noise = setup.prompts_context_noise(n, teacher.cfg.in_dim, g, device)
        with autocast(device):
            s, x0 = ode_pairs(teacher, context, noise, frames_per_chunk=setup.chunk,
                              ode_steps=ode_grid(settings.grid_steps), guidance_scale=guidance_scale,
                              guidance_interval=guidance_interval)
        if settings.keep_prompted:
            scores = evaluate.evaluate_clips(to_pixels(x0).cpu(), prompts, frames_per_chunk=setup.chunk)
            keep = torch.tensor([m.colour_match and m.count_match for m in scores], device=x0.device)
            s, x0, context = s[:, keep], x0[keep], context[keep]
        states.append(s.to(store))
        x0s.append(x0.to(store))
        contexts.append(context)
        kept = sum(len(x) for x in x0s)
        log(f"ode pairs {i + n}/{settings.pairs}" + (f", {kept} kept" if settings.keep_prompted else "")
            + f" ({time.perf_counter() - start:.0f} s)")
    synchronize(device)
    if not kept:
        raise ToolkitError(f"none of the teacher's {settings.pairs} ODE solutions showed its prompt; "
                           "train the teacher further or turn keep_prompted off")
    return dict(states=torch.cat(states, 1), x0=torch.cat(x0s), context=torch.cat(contexts),
                seconds=time.perf_counter() - start, drawn=settings.pairs, kept=kept)


def ode_regression_loss(
    student: WanModel, pool: dict, index: torch.Tensor, generator: torch.Generator, setup: ClipSetup
) -> torch.Tensor:
    """‖x̂0 − x0‖² for the pool entries ``index``, one random trajectory state per chunk (see module docstring)."""
    device = next(student.parameters()).device
    b = len(index)
    chunks = setup.frames // setup.chunk
    k = torch.randint(pool["states"].shape[0], (b, chunks), generator=generator).repeat_interleave(setup.chunk, 1)
    idx = index.to(pool["states"].device)
    frames = torch.arange(setup.frames)
    # x_t [b c F H W]: per (clip, frame) the state k of that frame's chunk
    x_t = pool["states"][k.to(idx.device), idx[:, None], :, frames[None, :].to(idx.device)]  # b F c H W
    x_t = x_t.permute(0, 2, 1, 3, 4).to(device).float()
    x0 = pool["x0"][idx].to(device).float()
    table = torch.tensor(warped_timesteps(SELF_FORCING_STEPS), dtype=torch.float32)
    sigma = (table[k] / 1000).to(device)  # b F
    flow = teacher_forced_flow(student, x0, x_t, pool["context"][idx].to(device), sigma, setup.mask)
    pred = x_t - sigma.view(b, 1, setup.frames, 1, 1) * flow.float()
    return (pred - x0).pow(2).mean()


def train_ode_init(
    student: WanModel, teacher: WanModel, settings: ODESettings, *, seed: int = 0, guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None, log: Log = print, every: int = 50,
) -> dict:
    """Stage (b): fill the ODE pool from ``teacher`` (sampled with ``guidance_scale``, in ``guidance_interval`` of
    σ if given) and regress ``student`` (in place) onto it."""
    device = next(student.parameters()).device
    setup = ClipSetup.of(student.cfg, device)
    guidance = dict(guidance_scale=guidance_scale, guidance_interval=guidance_interval)
    pool = make_pool(teacher, settings, seed=seed + 11, log=log, **guidance)
    heldout = make_pool(teacher, ODESettings(pairs=16, pair_batch=16, grid_steps=settings.grid_steps,
                                             placed=settings.placed),
                        seed=seed + 12, log=lambda *_: None, **guidance)
    g = torch.Generator().manual_seed(seed + 13)
    g_eval = torch.Generator().manual_seed(seed + 14)

    def heldout_loss() -> float:
        with torch.no_grad(), autocast(device):
            return float(ode_regression_loss(student, heldout, torch.arange(16), g_eval.manual_seed(0), setup))

    loss_init = heldout_loss()
    compile_seconds = None
    if settings.compile and device.type == "cuda":
        compile_seconds = try_compile(student, setup, settings.batch, log)
    opt = adamw(student, settings.lr, (0.9, 0.99), 0.0)
    curve, pending = [], []
    student.train()
    total, step = settings.steps, 0
    start = time.perf_counter()
    while step < total:
        index = torch.randint(pool["kept"], (settings.batch,), generator=g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, settings.lr, settings.warmup)
        with autocast(device):
            loss = ode_regression_loss(student, pool, index, g, setup)
        optimizer_step(opt, loss, student, settings.grad_clip)
        pending.append(loss.detach())
        step += 1
        total = fit_to_budget(step, total, settings.seconds, start, device, "ode-init", log)
        if step % every == 0 or step == total:
            mean = float(torch.stack(pending).mean())
            curve.append((step, mean))
            pending = []
            log(f"ode-init step {step}/{total} | x0 loss {mean:.4f}")
    synchronize(device)
    seconds = time.perf_counter() - start
    compile_blocks(student, False)  # the rollouts after this stage are eager (KV-cache shapes change)
    student.eval()
    if settings.placed > 0:
        learned_places(student.cfg)
    loss_end = heldout_loss()
    log(f"ode-init: pool {pool['seconds']:.0f} s, {total} steps in {seconds:.0f} s; held-out x0 loss "
        f"{loss_init:.4f} -> {loss_end:.4f}")
    return dict(
        stage="ode_init", settings=asdict(settings), guidance_scale=guidance_scale, steps_run=total,
        **({"guidance_interval": list(guidance_interval)} if guidance_interval else {}),
        pool_seconds=round(pool["seconds"], 1), pool_kept=pool["kept"], seconds=round(seconds, 1),
        compile_seconds=None if compile_seconds is None else round(compile_seconds, 1),
        curve=curve, heldout_loss_init=round(loss_init, 5), heldout_loss_end=round(loss_end, 5),
    )
