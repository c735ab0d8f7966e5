"""`toolkit train`: train the bundled model on procedural videos (one GPU, minutes) and write its artifacts."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``toolkit train`` and ``python -m toolkit.train``."""
    parser.add_argument("--out", default=None, help="output folder (default: data/bundled of the repository)")
    parser.add_argument("--minutes", type=float, default=6.0, help="wall budget of the whole run (default 6)")
    parser.add_argument("--steps", type=int, default=None, help="fixed step count, e.g. to reproduce a run "
                        "(overrides --minutes; the model card records the count)")
    parser.add_argument("--distill-minutes", type=float, default=0.0, help="optional second stage: few-step "
                        "distillation for the 4-step Self-Forcing loop, time box in minutes (default 0 = off)")
    parser.add_argument("--distill-steps", type=int, default=None, help="fixed distillation step count (reproduction)")
    parser.add_argument("--ode-steps", type=int, default=8, help="teacher ODE steps per distillation target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16, help="clips per step (default 16)")
    parser.add_argument("--lr", type=float, default=8e-4, help="peak AdamW learning rate (default 8e-4)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--eval-clips", type=int, default=64, help="held-out clips for the loss at init / end")
    parser.add_argument("--tiny", action="store_true", help="tiny model and clip: CPU smoke test only")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the bundled model on procedural sprite videos (reproduces data/bundled)",
        description=(
            "Train the bundled Wan DiT on procedural sprite videos with teacher-forced, block-causal flow matching "
            "(the regime the Self-Forcing sampler runs in), then write model.safetensors, config.json, loss.png, "
            "rollout.png/gif, train_log.json and MODEL_CARD.md. The shipped weights: "
            "`toolkit train --out data/bundled --minutes 6 --seed 0` on one H100."
        ),
    )
    add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from toolkit.train import run

    return run(args)
