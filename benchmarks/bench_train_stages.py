"""Seconds per step of each stage of the bundled recipe at the shipped size, before committing a GPU budget to it.

    python benchmarks/bench_train_stages.py --out results/train_stages.json [--budget teacher=420,ode=150,sf=150]

Times a few steps of (a) teacher flow matching, the (b) ODE-pair solver and ODE regression, and (c) Self-Forcing
generator updates (with their critic updates), each after warm-up steps that are reported separately, and prints
the step counts that fit the optional per-stage budgets (seconds). Random weights: cost does not depend on them.
"""

from __future__ import annotations

import argparse
import copy
import json
from functools import partial
from pathlib import Path

import torch
from timing import wall_seconds

from toolkit.models.bundled import bundled_config, tiny_config
from toolkit.models.bundled.ode_init import ODESettings, make_pool, ode_regression_loss
from toolkit.models.bundled.self_forcing import SelfForcingSettings, train_self_forcing
from toolkit.models.bundled.teacher import ClipSetup, TeacherSettings, train_teacher
from toolkit.models.seam import use_backend
from toolkit.models.wan import WanModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher-batch", type=int, default=TeacherSettings().batch)
    p.add_argument("--ode-batch", type=int, default=ODESettings().batch)
    p.add_argument("--pair-batch", type=int, default=ODESettings().pair_batch)
    p.add_argument("--sf-batch", type=int, default=SelfForcingSettings().batch)
    p.add_argument("--tiny", action="store_true", help="tiny config (a CPU smoke run of this script)")
    p.add_argument("--budget", default="", help="e.g. teacher=420,ode=150,sf=150 (seconds per stage)")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    quiet = lambda *_: None  # noqa: E731
    cfg = tiny_config() if args.tiny else bundled_config()
    setup = ClipSetup.of(cfg, dev)
    torch.manual_seed(0)
    model = WanModel(cfg).to(dev)
    rows = {}
    timed = partial(wall_seconds, device=dev)

    with use_backend(model, setup.backend):
        def eager(steps: int) -> TeacherSettings:
            return TeacherSettings(steps=steps, batch=args.teacher_batch, compile=False)

        warm = timed(lambda: train_teacher(model, eager(3), log=quiet))
        t = timed(lambda: train_teacher(model, eager(13), log=quiet))
        t3 = timed(lambda: train_teacher(model, eager(3), log=quiet))
        rows["teacher_step"] = dict(seconds=(t - t3) / 10, warmup_seconds=warm, batch=args.teacher_batch)
    teacher = model.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    with use_backend(student, setup.backend), use_backend(teacher, setup.backend):
        settings = ODESettings(pairs=args.pair_batch, pair_batch=args.pair_batch)
        warm = timed(lambda: make_pool(teacher, ODESettings(pairs=8, pair_batch=8), seed=0, log=quiet))
        pool = {}
        t = timed(lambda: pool.update(make_pool(teacher, settings, seed=1, log=quiet)))
        rows["ode_pair"] = dict(seconds=t / args.pair_batch, warmup_seconds=warm, batch=args.pair_batch)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
        g = torch.Generator().manual_seed(0)

        def ode_steps(n: int) -> None:
            for _ in range(n):
                idx = torch.randint(args.pair_batch, (args.ode_batch,), generator=g)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    loss = ode_regression_loss(student, pool, idx, g, setup)
                opt.zero_grad()
                loss.backward()
                opt.step()

        warm = timed(lambda: ode_steps(2))
        rows["ode_step"] = dict(seconds=timed(lambda: ode_steps(10)) / 10, warmup_seconds=warm, batch=args.ode_batch)
    sf = SelfForcingSettings(steps=1, batch=args.sf_batch)
    warm = timed(lambda: train_self_forcing(student, teacher, sf, log=quiet))
    sf = SelfForcingSettings(steps=3, batch=args.sf_batch)
    rows["self_forcing_update"] = dict(seconds=timed(lambda: train_self_forcing(student, teacher, sf, log=quiet)) / 3,
                                       warmup_seconds=warm, batch=args.sf_batch, critic_ratio=sf.critic_ratio)
    result = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__,
                  params=model.num_parameters(), stages=rows,
                  peak_gpu_gb=round(torch.cuda.max_memory_allocated() / 1e9, 1) if dev.type == "cuda" else None)
    budgets = dict(kv.split("=") for kv in args.budget.split(",") if kv)
    per = dict(teacher=rows["teacher_step"]["seconds"], ode=rows["ode_step"]["seconds"],
               sf=rows["self_forcing_update"]["seconds"])
    result["steps_in_budget"] = {k: int(float(v) / per[k]) for k, v in budgets.items()}
    print(f"{'stage':22} {'s/step':>8} {'warm-up s':>10} batch")
    for name, r in rows.items():
        print(f"{name:22} {r['seconds']:8.3f} {r['warmup_seconds']:10.1f} {r['batch']}")
    print("steps in budget:", result["steps_in_budget"], "| peak GPU GB:", result["peak_gpu_gb"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
