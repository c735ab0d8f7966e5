"""Redraw a bundled model folder's showcase strip (``rollout.png``) and GIF from its weights, without training:
the recipe's four showcase prompts, each as ground truth, the 4-step student and the teacher's 40-step sampler.

    python benchmarks/bundled_showcase.py --teacher data/teacher/teacher.safetensors   # the shipped student's teacher
    git show 9b17e03:data/teacher/teacher.safetensors > /tmp/teacher_run8.safetensors   # run 10's student's teacher
    python benchmarks/bundled_showcase.py --model DIR --teacher /tmp/teacher_run8.safetensors --teacher-label run-8

The recipe draws the same strip at the end of training (``card.save_rollouts``); this script redraws it when
only the drawing changed. Redrawn into the model folder itself, it records how in ``train_log.json``
(``showcase``) and regenerates ``MODEL_CARD.md``, which then says so under the strip. Rollouts run in float32 on
the CPU, most of the time in the teacher's 40-step samples (17 minutes on 2 shared cores); the recipe's ran in bf16
on the GPU, so pixels differ slightly from a strip drawn there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from timing import cpu_model

from toolkit.models import bundled
from toolkit.models.bundled.card import model_card, save_rollouts
from toolkit.models.bundled.model import load_weights
from toolkit.models.bundled.recipe import git_commit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the shipped data/bundled)")
    p.add_argument("--teacher", type=Path, required=True, help="the teacher's weights (a stage file, int8 or float)")
    p.add_argument("--teacher-label", default="teacher", help="how the strip names the teacher")
    p.add_argument("--guidance", type=float, default=2.0, help="the teacher's CFG scale (default 2, as shipped)")
    p.add_argument("--out", type=Path, default=None, help="folder for rollout.png/.gif (default: --model's)")
    p.add_argument("--placed", choices=("auto", "yes", "no"), default="auto",
                   help="showcase prompts with start places (card.SHOWCASE_PLACES); auto: if the model's record "
                        "was evaluated on such prompts")
    args = p.parse_args()

    torch.set_grad_enabled(False)
    commit = git_commit()  # the code that draws: the checkout may move on during the run
    start = time.perf_counter()
    model, _ = bundled.load_bundled(path=args.model)
    teacher = load_weights(args.teacher)
    folder = Path(args.model or bundled.DEFAULT_DIR)
    out = Path(args.out or folder)
    log_file = folder / "train_log.json"
    placed = args.placed == "yes" or (args.placed == "auto" and log_file.exists()
                                      and bool(json.loads(log_file.read_text()).get("eval_placed")))
    save_rollouts(out, model, teacher, args.guidance, teacher_label=args.teacher_label, placed=placed)
    seconds = time.perf_counter() - start
    if out.resolve() == folder.resolve() and log_file.exists():  # the card says how its strip was drawn
        record = json.loads(log_file.read_text())
        record["showcase"] = dict(commit=commit, device=f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)",
                                  precision="float32", teacher=f"{args.teacher_label}, CFG {args.guidance:g}",
                                  seconds=round(seconds, 1))
        log_file.write_text(json.dumps(record, indent=1) + "\n")
        (folder / "MODEL_CARD.md").write_text(model_card(record, model))
    print(f"wrote {out}/rollout.png and rollout.gif in {seconds:.0f} s")


if __name__ == "__main__":
    main()
