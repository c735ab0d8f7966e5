"""A recipe folder's teacher on the 64 held-out prompts (one seed, its 40-step CFG sampler), and an int8 copy of it
small enough to leave a GPU machine (``save_weights(int8=True)``, under 16 MB for the recipe's teacher).

    python benchmarks/teacher_heldout.py --recipe DIR [--cfg G] [--int8 FILE] --out result.json    # GPU: ~1 min

The CFG scale defaults to the one stage (a) chose on the validation prompts (``DIR/stages/log.json``); a teacher
trained further (``continue_teacher.py`` drops that choice) has it chosen again here, as stage (a) does, and written
back to the log.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from toolkit.models.bundled import evaluate
from toolkit.models.bundled.model import load_weights, save_weights
from toolkit.models.bundled.recipe import Recipe, choose_guidance, evaluate_model, stage_path
from toolkit.models.bundled.teacher import teacher_sampler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, required=True, help="recipe folder holding stages/teacher.safetensors")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the stage's validation choice)")
    p.add_argument("--int8", type=Path, default=None, help="also write an int8 copy of the teacher here")
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log_file = args.recipe / "stages" / "log.json"
    record = json.loads(log_file.read_text())
    teacher = load_weights(stage_path(args.recipe, "teacher"), None, device).eval().requires_grad_(False)
    if args.cfg is None and "guidance" not in record:
        record["guidance"] = choose_guidance(teacher, Recipe(), log=lambda m: print(m, flush=True))
        log_file.write_text(json.dumps(record, indent=1) + "\n")
    scale = args.cfg if args.cfg is not None else record["guidance"]["scale"]
    prompts = evaluate.heldout_prompts(64)
    start = time.perf_counter()
    summary = evaluate_model(teacher, prompts, **teacher_sampler(scale))
    result = dict(gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                  prompts=len(prompts), cfg=scale, prediction=teacher.cfg.prediction,
                  seconds=round(time.perf_counter() - start, 1), summary=summary,
                  guidance=record.get("guidance"), teacher=record["stages"]["teacher"])
    print(json.dumps({k: summary[k] for k in ("colour_match", "count_match", "persistence", "score")}), flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.int8:
        save_weights(teacher, args.int8, int8=True, stage="teacher")


if __name__ == "__main__":
    main()
