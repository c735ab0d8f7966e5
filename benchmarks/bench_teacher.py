"""How good does the stage-(a) teacher get per GPU minute? Train it (optionally continuing from saved weights,
optionally with ``torch.compile``) for a time budget, then score its many-step samples with the sprite evaluator.

    python benchmarks/bench_teacher.py --out results/teacher --seconds 360 [--init stages/teacher.safetensors]
                                       [--batch 16] [--lr 1e-3] [--compile]

Prints and writes ``teacher.json`` (seconds per step eager and compiled, warm-up and compile time separately, steps
trained, held-out loss, evaluator summary of 40-step Euler samples on 64 held-out prompts), ``teacher.png``
(ground truth next to teacher samples) and ``teacher.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from timing import wall_seconds

from toolkit.models.bundled import (
    MANY_STEPS,
    bundled_config,
    clip_shape,
    data,
    evaluate,
    generate,
    save_strip,
    tiny_config,
)
from toolkit.models.bundled.card import SHOWCASE_PROMPTS, format_summary
from toolkit.models.bundled.model import load_weights, save_weights
from toolkit.models.bundled.recipe import evaluate_model
from toolkit.models.bundled.teacher import ClipSetup, TeacherSettings, autocast, compile_blocks, train_teacher
from toolkit.models.seam import use_backend
from toolkit.models.wan import WanModel


def seconds_per_step(model: WanModel, settings: TeacherSettings, steps: int = 10) -> tuple[float, float]:
    """(warm-up seconds for 3 steps, seconds per step over ``steps`` more), held-out loss overhead subtracted."""
    quiet = lambda *_: None  # noqa: E731

    def run(n: int) -> float:
        return wall_seconds(lambda: train_teacher(model, replace(settings, steps=n, warmup=1), log=quiet,
                                                  every=10**9), next(model.parameters()).device)

    warm = run(3)
    return warm, (run(3 + steps) - run(3)) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=360.0, help="training budget (after the timing probes)")
    p.add_argument("--init", type=Path, default=None, help="continue from these teacher weights")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks; train with the faster")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU: a smoke run of this script")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = tiny_config() if args.tiny else bundled_config()
    setup = ClipSetup.of(cfg, dev)
    torch.manual_seed(args.seed)
    model = load_weights(args.init, cfg, dev) if args.init else WanModel(cfg).to(dev)
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TeacherSettings(batch=args.batch, lr=args.lr, warmup=args.warmup, compile=False)  # see below
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    result = dict(device=device_name, torch=torch.__version__, settings=vars(args) | {"out": str(args.out),
                                                                                      "init": str(args.init)})
    with use_backend(model, setup.backend):
        warm, eager = seconds_per_step(model, settings)
        result["eager"] = dict(seconds_per_step=eager, warmup_seconds=warm)
        print(f"eager: {eager:.3f} s/step (warm-up {warm:.1f} s)", flush=True)
        per_step = eager
        if args.compile:
            try:
                compile_blocks(model, True)
                warm, compiled = seconds_per_step(model, settings)
                result["compiled"] = dict(seconds_per_step=compiled, warmup_seconds=warm)
                print(f"compiled: {compiled:.3f} s/step (compile + warm-up {warm:.1f} s)", flush=True)
                per_step = min(eager, compiled)
                if compiled >= eager:
                    compile_blocks(model, False)
            except Exception as err:  # a compiler failure must not cost the run
                result["compiled"] = dict(error=repr(err)[:500])
                print(f"compile failed: {err!r}"[:300], flush=True)
        model.load_state_dict(start_state)  # the probes trained it: start again from the same weights
        steps = max(1, int(args.seconds / per_step))
        record = train_teacher(model, replace(settings, steps=steps), seed=args.seed,
                               log=lambda m: print(m, flush=True), every=100)
    result["training"] = record
    compile_blocks(model, False)  # sample eagerly (KV-cache shapes vary per chunk)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    save_weights(model, args.out / "teacher.safetensors", stage="teacher")
    (args.out / "teacher.json").write_text(json.dumps(result, indent=1) + "\n")
    prompts = evaluate.heldout_prompts(4 if args.tiny else 64)
    start = time.perf_counter()
    summary = evaluate_model(model, prompts, denoising_steps=MANY_STEPS, solver="euler")
    result["evaluation_40_euler_steps"] = summary
    result["evaluation_seconds"] = time.perf_counter() - start
    (args.out / "teacher.json").write_text(json.dumps(result, indent=1) + "\n")
    print("teacher, 40 Euler steps:", format_summary(summary), flush=True)
    shown = [data.parse_prompt(t) for t in SHOWCASE_PROMPTS]
    frames, height, width = clip_shape(cfg)
    truth = data.render(shown, torch.Generator().manual_seed(0), frames=frames, height=height, width=width)
    with torch.no_grad(), autocast(dev):
        video = generate(model, shown, seed=0, denoising_steps=MANY_STEPS, solver="euler").float().cpu()
    rows = [x for pair in zip(truth, video) for x in pair]
    labels = [f"{kind}: {t}" for t in SHOWCASE_PROMPTS for kind in ("ground truth", "teacher, 40 Euler steps")]
    save_strip(rows, args.out / "teacher.png", labels, title=f"teacher after {record['settings']['steps']} steps")


if __name__ == "__main__":
    main()
