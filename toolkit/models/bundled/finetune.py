"""Finetuning the bundled model with another attention at its seams: the paper's finetuning with Monarch attention
(MonarchRT's route to 95 % sparsity without quality loss), at toy scale.

The model's weights train; only its attention changes: every seam of the student computes ``backend`` (the caller
resolves an ``--attention`` spec to it with ``toolkit.attention.backends.backend_for``: on a GPU the Triton Monarch op
and its backward kernels, elsewhere the PyTorch references by autograd). Two objectives, both through the student's
own KV-cache rollout (``self_forcing_rollout`` with Self-Forcing's stochastic exit step s ~ U{0..3}: gradient
through the exit-step forward of every chunk, as the sampler runs it — the teacher-forced sequence of stages (a)/(b)
is not how a Monarch backend is ever called):

``distill`` (default; needs nothing but the model): regress the student's exit-step predictions onto what the
frozen dense model predicts from the same inputs and the same clean context,

    x_s       the student's input at step s of every chunk (its own rollout, re-noised with fresh noise)
    x̂0        = x_s − σ_s·v_student(x_s | KV cache of the student's own earlier chunks)         (gradient)
    x̂0_dense  = x_s − σ_s·v_dense(x_s | sg(x̂0) of earlier chunks)   (teacher forced: equal to the KV-cache call)
    L         = ‖x̂0 − x̂0_dense‖²

so at step 0 (student = dense model) L is exactly the zero-shot error the attention makes in the model's own
sampling distribution, and L = 0 for ``dense`` (tested). It asks "can this attention represent the function the
dense attention computed?" — the question of the paper's Fig. 7 — without a teacher.

``self_forcing``: stage (c) unchanged (``self_forcing.train_self_forcing``: DMD against the teacher's score, a
critic initialised from the teacher) with the student's seams computing ``backend``; what finetuning Self-Forcing
with MonarchRT does. Needs the teacher's weights (``toolkit train --stages teacher`` remakes them).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from toolkit.models.bundled.config import CONFIG_FILE, SELF_FORCING_STEPS, WEIGHTS_FILE
from toolkit.models.bundled.model import save_weights
from toolkit.models.bundled.self_forcing import SelfForcingSettings, student_rollout, train_self_forcing
from toolkit.models.bundled.teacher import (
    ClipSetup,
    Log,
    adamw,
    autocast,
    optimizer_step,
    synchronize,
    teacher_forced_flow,
    warped_timesteps,
)
from toolkit.models.seam import Backend, dense_attention, use_backend
from toolkit.models.wan import WanModel

OBJECTIVES = ("distill", "self_forcing")


@dataclass(frozen=True)
class FinetuneSettings:
    objective: str = "distill"
    steps: int = 200  # student updates
    batch: int = 8
    lr: float = 2e-5  # the shipped weights are a good start: small steps, as stage (c)
    warmup: int = 10
    grad_clip: float = 1.0
    critic_ratio: int = 5  # self_forcing only
    guidance_scale: float = 1.0  # self_forcing only: the teacher's CFG in DMD's real score

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}: {' or '.join(OBJECTIVES)}")


def distillation_loss(
    student: WanModel, reference: WanModel, context: torch.Tensor, noise: torch.Tensor, setup: ClipSetup,
    generator: torch.Generator, exit_step: int,
) -> torch.Tensor:
    """‖x̂0_student − x̂0_dense‖² over the exit-step predictions of the student's rollout (module docstring).
    ``reference`` computes with its own seams' backends (the teacher-forcing ``setup.backend`` for dense)."""
    timesteps = warped_timesteps(SELF_FORCING_STEPS)
    inputs = torch.empty_like(noise)

    def keep(chunk: int, step: int, x: torch.Tensor) -> None:
        if step == exit_step:
            inputs[:, :, chunk * setup.chunk : (chunk + 1) * setup.chunk] = x.detach()

    x0 = student_rollout(student, context, noise, setup, generator, exit_step, on_step=keep).float()
    sigma = torch.full((noise.shape[0], setup.frames), float(timesteps[exit_step]) / 1000, device=noise.device)
    with torch.no_grad():
        flow = teacher_forced_flow(reference, x0.detach(), inputs.float(), context, sigma, setup.mask).float()
        target = inputs.float() - sigma[:, None, :, None, None] * flow
    return (x0 - target).pow(2).mean()


def train_finetune(
    model: WanModel, settings: FinetuneSettings, backend: Backend | None, *, teacher: WanModel | None = None,
    reference: WanModel | None = None, seed: int = 0, log: Log = print, every: int = 10,
) -> tuple[WanModel, dict]:
    """A copy of ``model`` finetuned with ``backend`` at every seam (``None``: dense); returns (student in eval mode,
    the run's record). ``model`` itself is not changed. ``teacher``: the real score of the ``self_forcing``
    objective; ``reference``: the dense model ``distill`` regresses onto (default: ``model`` as it is now)."""
    device = next(model.parameters()).device
    setup = ClipSetup.of(model.cfg, device)
    student = copy.deepcopy(model).requires_grad_(True)
    student_backend = dense_attention if backend is None else backend
    if settings.objective == "self_forcing":
        if teacher is None:
            raise ValueError("the self_forcing objective needs the teacher (toolkit train --stages teacher)")
        sf = SelfForcingSettings(steps=settings.steps, batch=settings.batch, critic_ratio=settings.critic_ratio,
                                 lr=settings.lr, grad_clip=settings.grad_clip)
        run = train_self_forcing(student, teacher.eval().requires_grad_(False), sf, seed=seed,
                                 guidance_scale=settings.guidance_scale, log=log, every=every,
                                 student_backend=student_backend)
        return student.eval().requires_grad_(False), dict(run, stage="finetune", settings=asdict(settings))

    reference = copy.deepcopy(model if reference is None else reference).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 31)
    g_dev = torch.Generator(device).manual_seed(seed + 32)
    g_eval = torch.Generator().manual_seed(seed + 33)
    opt = adamw(student, settings.lr, (0.9, 0.99), 0.0)

    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return setup.prompts_and_noise(settings.batch, model.cfg.in_dim, gen, device)

    heldout = [(*batch(g_eval), s) for s in range(len(SELF_FORCING_STEPS))]  # one batch per exit step

    def heldout_loss() -> float:
        student.eval()
        with torch.no_grad(), autocast(device):
            losses = [distillation_loss(student, reference, c, n, setup, torch.Generator(device).manual_seed(s), s)
                      for c, n, s in heldout]
        student.train()
        return float(torch.stack(losses).mean())

    curve, pending = [], []
    start = time.perf_counter()
    with use_backend(student, student_backend), use_backend(reference, setup.backend):
        loss_init = heldout_loss()
        log(f"finetune ({settings.objective}): held-out loss at the start {loss_init:.5f} (the zero-shot error)")
        student.train()
        for step in range(settings.steps):
            for group in opt.param_groups:
                group["lr"] = settings.lr * min(1.0, (step + 1) / settings.warmup)
            context, noise = batch(g)
            exit_step = int(torch.randint(len(SELF_FORCING_STEPS), (), generator=g))
            with autocast(device):
                loss = distillation_loss(student, reference, context, noise, setup, g_dev, exit_step)
            optimizer_step(opt, loss, student, settings.grad_clip)
            pending.append(loss.detach())
            if (step + 1) % every == 0 or step + 1 == settings.steps:
                mean = float(torch.stack(pending).mean())
                curve.append((step + 1, mean))
                pending = []
                rate = (step + 1) / (time.perf_counter() - start)
                log(f"finetune step {step + 1}/{settings.steps} | loss {mean:.5f} | {rate:.2f} it/s")
        synchronize(device)
        seconds = time.perf_counter() - start
        loss_end = heldout_loss()
    log(f"finetune: {settings.steps} steps in {seconds:.0f} s; held-out loss {loss_init:.5f} -> {loss_end:.5f}")
    student.eval().requires_grad_(False)
    return student, dict(stage="finetune", settings=asdict(settings), seconds=round(seconds, 1), curve=curve,
                         heldout_loss_init=round(loss_init, 7), heldout_loss_end=round(loss_end, 7))


def save_finetuned(out: str | Path, model: WanModel, record: dict) -> Path:
    """``out/model.safetensors`` + ``config.json`` (with the run's record under ``"training"``, the attention it was
    finetuned with included) + ``finetune_log.json``: a folder ``load_bundled(out)`` and ``--checkpoint`` read."""
    out = Path(out)
    save_weights(model, out / WEIGHTS_FILE, stage="finetune", attention=str(record.get("attention", "")))
    (out / CONFIG_FILE).write_text(json.dumps({**model.cfg.to_dict(), "training": record}, indent=2) + "\n")
    (out / "finetune_log.json").write_text(json.dumps(record, indent=1) + "\n")
    return out
