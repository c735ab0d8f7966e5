"""Stage (b) of two students from the same start, the same teacher and the same pairs: the shipped 6 × 160 student
and its 2× widened copy (``toolkit train --widen 2``), x0 regression loss against steps and against seconds.

    python benchmarks/capacity_curves.py \
        --narrow benchmarks/results/bundled_training_h200/run13_log.json \
        --wide benchmarks/results/bundled_training_h200/run15_ode_init_log.json \
        --out benchmarks/results/bundled_training_h200/run15_capacity.png

Each log's newest stage-(b) run (the last ``continued`` entry, or the stage itself) is drawn; the plot's curves are
the training batches' loss averaged over each 50 steps, and the legend gives each run's held-out x0 loss at its
start and end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def newest_ode_run(log_file: Path) -> dict:
    """The last stage-(b) run recorded in a recipe log (``stages/log.json`` or ``train_log.json``)."""
    stage = json.loads(log_file.read_text())["stages"]["ode_init"]
    return (stage.get("continued") or [stage])[-1]


def plot(runs: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True, sharey=True)
    for (label, run), colour in zip(runs.items(), ("#4c72b0", "#dd8452")):
        every = run["curve"][0][0]  # the last point averages only the steps since the one before: left out
        steps, loss = zip(*(point for point in run["curve"] if point[0] % every == 0))
        seconds_per_step = run["seconds"] / run["steps_run"]
        name = (f"{label}: {run['steps_run']} steps in {run['seconds']:.0f} s, held-out "
                f"{run['heldout_loss_init']:.4f} → {run['heldout_loss_end']:.4f}")
        by_step.plot(steps, loss, color=colour, label=name)
        by_time.plot([s * seconds_per_step for s in steps], loss, color=colour)
    by_step.set_xlabel("regression step (batches of 32)")
    by_time.set_xlabel("seconds of regression (pool solving excluded)")
    by_step.set_ylabel("x0 loss, training batches")
    by_step.legend(fontsize=7.5, loc="upper right")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    fig.suptitle("Stage (b) from the same stage-(c) student and teacher pairs: shipped width vs 2× wide")
    fig.savefig(out, dpi=130)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--narrow", type=Path, required=True, help="recipe log holding the shipped-width run")
    p.add_argument("--wide", type=Path, required=True, help="recipe log holding the widened run")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args()
    plot({"6 × 160": newest_ode_run(args.narrow), "6 × 320 (widened)": newest_ode_run(args.wide)}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
