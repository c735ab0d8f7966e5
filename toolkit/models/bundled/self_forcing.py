"""Stage (c) of the bundled recipe: **Self-Forcing** — the student rolls itself out with the KV cache exactly as it
samples (``self_forcing_rollout``) and is trained by distribution matching (DMD) against the teacher.

Per generator update (Self-Forcing ``model/dmd.py``, ``pipeline/self_forcing_training.py``):

1. Rollout: noise → 4 chunks, each denoised with the 4-step loop (fresh re-noising), a clean pass after each
   chunk; one exit step s ~ U{0..3} shared by all chunks; only the exit-step forward of each chunk carries
   gradient (``self_forcing_rollout(exit_step=s)``). The video x is the exit steps' x0 predictions.
2. Noise levels: u ~ U(0, 1) per clip, σ = shift-5 warp of u clamped to [0.02, 0.98]; x_t = (1 − σ)·x + σ·ε.
3. Scores: x̂0_real from the frozen teacher with classifier-free guidance (null prompt),
   x̂0_real = x̂0_u + g·(x̂0_c − x̂0_u); x̂0_fake from the critic (conditional). Both teacher-forced on the video's
   own clean chunks ([sg(x) | x_t]): for a block-causal teacher that is the score of each chunk's conditional
   given the earlier chunks, so matching it matches the rollout's chunk-by-chunk distribution.
4. Gradient: grad = (x̂0_fake − x̂0_real) / mean|x − x̂0_real| (per clip, DMD's normaliser);
   L_G = ½·‖x − sg(x − grad)‖² (its gradient with respect to x is grad / N).

The teacher may have another architecture than the student (the recipe's teacher is wider, with 8 × 8 patches, as
Self-Forcing's real score is Wan2.1-14B for a 1.3B student): it sees the same pixels through its own patches and its
own teacher-forcing mask. The critic ("fake score", initialised from the teacher) learns the student's current
distribution with the flow-matching loss on fresh no-grad rollouts, ``critic_ratio`` updates per generator update
(two time-scale rule). β1 = 0 for both optimisers and an EMA of the generator, as Self-Forcing.

A run can be split over processes (a device call is limited in time): ``train_self_forcing(state=...)`` fills a
dict with everything the run's next update would need (the student's live weights, whose EMA the stage file
holds, the EMA, the critic, both optimisers' moments and both random streams), and a later call given that dict
continues from there, so N updates and then M resumed ones are the N + M updates of one run."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from toolkit.models.bundled.config import SELF_FORCING_STEPS, learned_places
from toolkit.models.bundled.teacher import (
    SHIFT,
    ClipSetup,
    Ema,
    Log,
    adamw,
    autocast,
    fit_to_budget,
    flow_matching_loss,
    optimizer_step,
    synchronize,
    teacher_forced_flow,
    warped_timesteps,
)
from toolkit.models.sampling import guidance_at, self_forcing_rollout, shift_sigma
from toolkit.models.seam import Backend, use_backend
from toolkit.models.wan import WanModel

# the weights stage (c) may start from (``SelfForcingSettings.start``)
SF_STARTS = ("ode_init", "self_forcing")


@dataclass(frozen=True)
class SelfForcingSettings:
    steps: int = 178  # generator updates, at most (the shipped run's: 440 s); ``seconds`` may stop the plan earlier
    batch: int = 16
    critic_ratio: int = 5  # critic updates per generator update
    lr: float = 2e-5
    critic_lr: float = 2e-5
    sigma_range: tuple[float, float] = (0.02, 0.98)
    grad_clip: float = 10.0
    ema_decay: float = 0.99
    seconds: float | None = None  # time budget (``teacher.fit_to_budget``)
    # the student's starting weights: "ode_init" (the recipe), or "self_forcing" to train an earlier stage-(c)
    # student further, e.g. against a teacher trained longer since (a fresh critic, initialised from that teacher)
    start: str = "ode_init"
    # with start "self_forcing": continue the earlier run exactly (its saved state: critic, optimisers, live
    # weights, EMA, random streams) instead of from its EMA weights with a fresh critic
    resume: bool = False
    placed: float = 0.0  # fraction of the rollouts' prompts that name each sprite's start place (data.PLACES)
    # rollouts of prompts with at least this many sprites (1: every count, as the recipe); more trains a student
    # further on crowded prompts, where it trails the teacher (docs/bundled-model.md, run 25)
    min_sprites: int = 1


def student_rollout(
    student: WanModel, context: torch.Tensor, noise: torch.Tensor, setup: ClipSetup, generator: torch.Generator,
    exit_step: int, on_step: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The sampler's rollout with the stochastic exit step (gradient through one forward per chunk); ``on_step``
    sees each forward's input, as ``self_forcing_rollout``'s."""
    return self_forcing_rollout(
        student, noise, context, frames_per_chunk=setup.chunk, timesteps=warped_timesteps(SELF_FORCING_STEPS),
        generator=generator, exit_step=exit_step, on_step=on_step,
    )


def _dmd_sigma(batch: int, frames: int, settings: SelfForcingSettings, g: torch.Generator) -> torch.Tensor:
    sigma = shift_sigma(torch.rand(batch, generator=g, dtype=torch.float64), SHIFT).clamp(*settings.sigma_range)
    return sigma.float()[:, None].expand(batch, frames).contiguous()


def dmd_gradient(
    x: torch.Tensor, context: torch.Tensor, real: WanModel, fake: WanModel, setup: ClipSetup,
    settings: SelfForcingSettings, generator: torch.Generator, guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
) -> torch.Tensor:
    """DMD's gradient direction for videos ``x`` [b c F H W] (detached; see the module docstring, items 2–4);
    ``setup``: the score models' (real and fake share an architecture); ``guidance_scale``: the classifier-free
    guidance g of the real score, applied where σ (one per clip) lies in ``guidance_interval`` (everywhere if
    None)."""
    b = x.shape[0]
    sigma = _dmd_sigma(b, setup.frames, settings, generator).to(x.device)  # b F
    s = sigma.view(b, 1, setup.frames, 1, 1)
    eps = torch.randn(x.shape, generator=generator).to(x.device)
    x = x.detach().float()
    x_t = (1 - s) * x + s * eps
    with torch.no_grad():
        flow_c = teacher_forced_flow(real, x, x_t, context, sigma, setup.mask).float()
        if guidance_scale != 1.0:
            flow_u = teacher_forced_flow(real, x, x_t, torch.zeros_like(context), sigma, setup.mask).float()
            g = guidance_at(sigma, guidance_scale, guidance_interval).view(b, 1, setup.frames, 1, 1)
            flow_c = flow_u + g * (flow_c - flow_u)
        x0_real = x_t - s * flow_c
        x0_fake = x_t - s * teacher_forced_flow(fake, x, x_t, context, sigma, setup.mask).float()
        norm = (x - x0_real).abs().flatten(1).mean(1).clamp_min(1e-6).view(b, 1, 1, 1, 1)
        return torch.nan_to_num((x0_fake - x0_real) / norm)


def train_self_forcing(
    student: WanModel, teacher: WanModel, settings: SelfForcingSettings, *, seed: int = 0,
    guidance_scale: float = 1.0, guidance_interval: tuple[float, float] | None = None, log: Log = print,
    every: int = 5, student_backend: Backend | None = None, state: dict | None = None,
) -> dict:
    """Stage (c): train ``student`` in place (ending with its EMA weights); ``teacher`` is the real score (with
    classifier-free guidance ``guidance_scale``, in ``guidance_interval`` of σ if given) and the critic's
    initialisation. ``student_backend``: what the
    student's seams compute (default: dense; finetuning passes another attention, ``finetune.py``). ``state``: a
    dict that holds this run's end state on return (module docstring); if it already holds one, the run resumes
    from it (``seed`` is then unused: the random streams continue)."""
    device = next(student.parameters()).device
    setup = ClipSetup.of(student.cfg, device, settings.placed, settings.min_sprites)
    scores = ClipSetup.of(teacher.cfg, device)  # the teacher's and the critic's patches and mask
    if (scores.frames, scores.height, scores.width, scores.chunk) != (setup.frames, setup.height, setup.width,
                                                                        setup.chunk):
        raise ValueError("teacher and student must share the clip and its chunking")
    critic = copy.deepcopy(teacher).train().requires_grad_(True)
    teacher = teacher.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 21)
    g_dev = torch.Generator(device).manual_seed(seed + 22)
    opt_g = adamw(student, settings.lr, (0.0, 0.999), 0.01)
    opt_c = adamw(critic, settings.critic_lr, (0.0, 0.999), 0.01)
    ema = Ema(student)
    resumed = bool(state)
    if resumed:
        _resume(state, student, critic, opt_g, opt_c, ema, g, g_dev, settings)
        log(f"self-forcing: resumed after {state['updates']} updates (critic, optimisers, live weights, EMA)")

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return setup.prompts_and_noise(settings.batch, student.cfg.in_dim, g, device)

    def exit_step() -> int:
        return int(torch.randint(len(SELF_FORCING_STEPS), (), generator=g))

    curve, critic_losses, grad_norms = [], [], []
    start = time.perf_counter()
    with (use_backend(student, student_backend or setup.backend), use_backend(critic, scores.backend),
          use_backend(teacher, scores.backend)):
        total, step = settings.steps, 0
        while step < total:
            # critic: flow matching on the student's current rollouts (no gradient into the student)
            student.eval()
            for _ in range(settings.critic_ratio):
                context, noise = batch()
                with torch.no_grad(), autocast(device):
                    x = student_rollout(student, context, noise, setup, g_dev, exit_step()).float()
                sigma = _dmd_sigma(settings.batch, setup.frames, settings, g).to(device)
                eps = torch.randn(x.shape, generator=g).to(device)
                with autocast(device):
                    loss_c = flow_matching_loss(critic, x, context, eps, sigma, scores.mask)
                optimizer_step(opt_c, loss_c, critic, settings.grad_clip)
                critic_losses.append(loss_c.detach())
            # generator: DMD through the exit-step forwards of its own rollout
            student.train()
            context, noise = batch()
            with autocast(device):
                x = student_rollout(student, context, noise, setup, g_dev, exit_step()).float()
                grad = dmd_gradient(x, context, teacher, critic, scores, settings, g, guidance_scale,
                                    guidance_interval)
            loss_g = 0.5 * (x - (x - grad).detach()).pow(2).mean()
            optimizer_step(opt_g, loss_g, student, settings.grad_clip)
            ema.update(settings.ema_decay)
            grad_norms.append(grad.pow(2).mean().sqrt().detach())
            step += 1
            total = fit_to_budget(step, total, settings.seconds, start, device, "self-forcing", log)
            if step % every == 0 or step == total:
                c = float(torch.stack(critic_losses[-settings.critic_ratio * every:]).mean())
                gn = float(torch.stack(grad_norms[-every:]).mean())
                curve.append((step, c, gn))
                rate = step / (time.perf_counter() - start)
                log(f"self-forcing step {step}/{total} | critic loss {c:.4f} | dmd grad rms {gn:.4f} | "
                    f"{rate:.2f} it/s")
    synchronize(device)
    seconds = time.perf_counter() - start
    if state is not None:
        updates = state.get("updates", 0) + total
        state.clear()
        state.update(_end_state(student, critic, opt_g, opt_c, ema, g, g_dev, updates))
    ema.copy_to_model()
    student.eval()
    if settings.placed > 0:
        learned_places(student.cfg)
    log(f"self-forcing: {total} generator updates in {seconds:.0f} s")
    return dict(stage="self_forcing", settings=asdict(settings), guidance_scale=guidance_scale, steps_run=total,
                seconds=round(seconds, 1), curve=curve, resumed=resumed,
                **({"guidance_interval": list(guidance_interval)} if guidance_interval else {}))


def _cpu(tree: Any) -> Any:
    """A copy of nested dicts / lists of tensors with every tensor on the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().clone()
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu(v) for v in tree)
    return tree


def _end_state(student: WanModel, critic: WanModel, opt_g: torch.optim.Optimizer, opt_c: torch.optim.Optimizer,
               ema: Ema, g: torch.Generator, g_dev: torch.Generator, updates: int) -> dict:
    """What the next update needs, as CPU tensors and plain values (``torch.load(weights_only=True)`` reads it)."""
    return dict(student=_cpu(student.state_dict()), ema=_cpu(ema.shadow), critic=_cpu(critic.state_dict()),
                student_optimizer=_cpu(opt_g.state_dict()), critic_optimizer=_cpu(opt_c.state_dict()),
                generator=g.get_state(), device_generator=g_dev.get_state().cpu(),
                device_type=g_dev.device.type, updates=updates)


def _resume(state: dict, student: WanModel, critic: WanModel, opt_g: torch.optim.Optimizer,
            opt_c: torch.optim.Optimizer, ema: Ema, g: torch.Generator, g_dev: torch.Generator,
            settings: SelfForcingSettings) -> None:
    if state.get("device_type") != g_dev.device.type:
        raise ValueError(f"a stage-(c) state saved on {state.get('device_type')} resumes on that kind of device, "
                         f"not on {g_dev.device.type}")
    student.load_state_dict(state["student"])
    critic.load_state_dict(state["critic"])
    opt_g.load_state_dict(state["student_optimizer"])
    opt_c.load_state_dict(state["critic_optimizer"])
    for opt, lr in ((opt_g, settings.lr), (opt_c, settings.critic_lr)):  # this run's settings, not the saved ones
        for group in opt.param_groups:
            group["lr"] = lr
    with torch.no_grad():
        for shadow, saved in zip(ema.shadow, state["ema"], strict=True):
            shadow.copy_(saved)
    g.set_state(state["generator"])
    g_dev.set_state(state["device_generator"])
