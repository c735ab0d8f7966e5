"""Is a bundled teacher limited by its sampler? Its many-step Euler samples on the 64 held-out prompts (one seed),
scored by the sprite evaluator, for several step grids at one CFG scale, in one process.

    python benchmarks/teacher_sampler_probe.py TEACHER.safetensors --out probe.json     # on a GPU, about 1 min

Grids: the recipe's 40 uniform pre-warp steps (shift 5 after the warp), 100 of them, and 40 / 100 steps whose shift-5
warp approximates a shift-2 or shift-1 grid (more steps at low noise, where outlines are decided). Every grid is a
list of integer pre-warp steps, as ``bundled.generate`` takes them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from toolkit.models.bundled import evaluate
from toolkit.models.bundled.config import MANY_STEPS
from toolkit.models.bundled.model import load_weights
from toolkit.models.bundled.recipe import evaluate_model
from toolkit.models.bundled.teacher import SHIFT
from toolkit.models.sampling import shift_sigma

KEYS = ("score", "colour_match", "count_match", "count_error", "persistence", "teleports")


def grid_for_shift(shift: float, n: int) -> tuple[int, ...]:
    """Integer pre-warp steps (1000 → 1) whose shift-5 warp approximates ``n`` uniform steps warped with ``shift``."""
    steps: list[int] = []
    for i in range(n):
        sigma = shift_sigma(torch.tensor(1 - i / n, dtype=torch.float64), shift)
        u = round(1000 * float(shift_sigma(sigma, 1 / SHIFT)))  # the warp with 1/s inverts the warp with s
        if u >= 1 and (not steps or u < steps[-1]):
            steps.append(u)
    return tuple(steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher", type=Path, help="a teacher stage's safetensors (config in its metadata)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_weights(args.teacher, None, device).eval().requires_grad_(False)
    prompts = evaluate.heldout_prompts(64)
    grids = {
        "40 steps, shift 5 (the recipe's)": MANY_STEPS,
        "100 steps, shift 5": tuple(range(1000, 0, -10)),
        "40 steps, shift 2": grid_for_shift(2.0, 40),
        "40 steps, shift 1": grid_for_shift(1.0, 40),
        "100 steps, shift 2": grid_for_shift(2.0, 100),
    }
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    results = {}
    for name, steps in grids.items():
        start = time.perf_counter()
        summary = evaluate_model(teacher, prompts, denoising_steps=steps, solver="euler", guidance_scale=args.cfg)
        results[name] = {**{k: summary[k] for k in KEYS}, "steps": len(steps),
                         "seconds": round(time.perf_counter() - start, 1)}
        print(name, results[name], flush=True)
        args.out.write_text(json.dumps(dict(gpu=device_name, torch=torch.__version__, prompts=len(prompts),
                                            cfg=args.cfg, results=results), indent=1) + "\n")


if __name__ == "__main__":
    main()
