"""Continue a pretraining stage in a recipe folder for a time budget, in place: ``DIR/stages/<stage>.safetensors``
(the stage-(a) teacher, or with ``--stage base`` the student's base) is trained further with ``train_teacher``
(current settings: compiled blocks, shift-3 σ, batch 16) and the run is recorded under
``stages.<stage>.continued`` of ``DIR/stages/log.json`` (the model card shows it). Then
``toolkit train --out DIR --stages ode_init,self_forcing`` takes over.

    python benchmarks/continue_teacher.py --out DIR --seconds 240 [--stage base] [--lr 1e-3] [--seed 1]
    python benchmarks/continue_teacher.py --out DIR --seconds 480 --widen 2      # the teacher, 2x as wide first

``--widen K`` / ``--deepen K`` first replace the teacher by a copy K x as wide / deep that computes the same function
(``toolkit/models/bundled/grow.py``), so the run tests what more capacity gives a trained teacher; the record keeps
the sizes before and after and ``teacher_config`` follows the new size.

How the shipped teacher and base were made when one GPU session (or one 10-minute device call) could not hold a
from-scratch run (MODEL_CARD.md says so).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from toolkit.models.bundled.grow import deepened, function_change, model_size, widened
from toolkit.models.bundled.model import load_weights, save_weights
from toolkit.models.bundled.recipe import git_commit, stage_path
from toolkit.models.bundled.teacher import ClipSetup, TeacherSettings, train_teacher
from toolkit.models.seam import use_backend


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="recipe folder holding stages/<stage>.safetensors")
    p.add_argument("--stage", choices=("teacher", "base"), default="teacher",
                   help="which pretraining stage to continue (both use the teacher's objective)")
    p.add_argument("--seconds", type=float, required=True, help="training budget (after compiling)")
    p.add_argument("--steps", type=int, default=100_000, help="at most this many steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=1, help="data and noise seed (not the first run's)")
    p.add_argument("--min-sprites", type=int, default=1, metavar="N",
                   help="train on clips of at least N sprites only (crowded scenes; default 1: every count)")
    p.add_argument("--placed", type=float, default=0.0, metavar="P",
                   help="fraction of training prompts that name each sprite's start place (default 0: none)")
    p.add_argument("--widen", type=int, default=1, metavar="K",
                   help="first make the teacher K x as wide, the same function (default 1: as it is)")
    p.add_argument("--deepen", type=int, default=1, metavar="K",
                   help="first give the teacher K x as many blocks, the same function (default 1: as it is)")
    args = p.parse_args(argv)
    if (args.widen, args.deepen) != (1, 1) and args.stage != "teacher":
        p.error("--widen/--deepen grow the teacher only (the student stages: toolkit train --widen)")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    log_file = args.out / "stages" / "log.json"
    record = json.loads(log_file.read_text())
    model = load_weights(stage_path(args.out, args.stage), None, "cpu")  # the architecture from the file's metadata
    grown = None
    if (args.widen, args.deepen) != (1, 1):
        before = model
        if args.widen > 1:
            model = widened(model, args.widen, seed=args.seed)
        if args.deepen > 1:
            model = deepened(model, args.deepen)
        grown = dict(widen=args.widen, deepen=args.deepen, seed=args.seed, from_size=model_size(before.cfg),
                     to_size=model_size(model.cfg),
                     max_relative_difference=round(function_change(before, model, args.seed), 6))
        print(f"grown {grown['from_size']} -> {grown['to_size']}; one forward differs by at most "
              f"{grown['max_relative_difference']:.1e} of its largest value", flush=True)
    model = model.to(dev)
    settings = TeacherSettings(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup,
                               seconds=args.seconds, min_sprites=args.min_sprites, placed=args.placed)
    with use_backend(model, ClipSetup.of(model.cfg, dev).backend):
        run = train_teacher(model, settings, seed=args.seed, log=lambda m: print(m, flush=True), every=100,
                            name=args.stage)
    run["commit"] = git_commit()
    if grown:
        run["grown"] = grown
        record["teacher_config"] = model.cfg.to_dict()
    record["stages"][args.stage].setdefault("continued", []).append(run)
    if args.stage == "teacher":
        record.pop("guidance", None)  # a new teacher: its CFG scale is chosen again
    save_weights(model, stage_path(args.out, args.stage), stage=args.stage)
    log_file.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
