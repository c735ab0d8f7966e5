"""CPU time of one full bundled-model rollout: 4 chunks x (4 denoising steps + clean pass) = 20 DiT forwards over a
12 x 12 x 20 token grid (48 x 80 pixels, 12 frames), float32, with the Self-Forcing KV cache.

    python benchmarks/bench_bundled_cpu.py --out benchmarks/results/          # goal (issue 3): <= 20 s on 2 cores

Uses the shipped weights (data/bundled) when present, else random weights of the same config (same cost).
Reports the median over --videos timed rollouts after one warm-up rollout, per-chunk times, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import toolkit
from toolkit.errors import WeightsNotFound
from toolkit.models import bundled
from toolkit.models.wan import WanModel

GOAL_S = 20.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--videos", type=int, default=3, help="timed rollouts after one warm-up rollout")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        model, info = bundled.load_bundled("cpu", torch.float32)
        weights = info["path"]
    except WeightsNotFound:
        torch.manual_seed(0)
        model, weights = WanModel(bundled.bundled_config()).eval(), "random (data/bundled/model.safetensors absent)"
    prompt = "2 sprites: red circle, blue square; pan left"

    def one_rollout(seed: int) -> tuple[float, list[float]]:
        from toolkit.models import sampling

        marks = [time.perf_counter()]
        real = sampling.self_forcing_rollout

        def timed(*a, **kw):
            return real(*a, **kw, on_chunk=lambda c, _: marks.append(time.perf_counter()))

        sampling.self_forcing_rollout = timed
        try:
            bundled.generate(model, prompt, seed=seed)
        finally:
            sampling.self_forcing_rollout = real
        end = time.perf_counter()
        return end - marks[0], [b - a for a, b in zip(marks, marks[1:])]

    warm_s, _ = one_rollout(0)
    runs = [one_rollout(1 + i) for i in range(args.videos)]
    totals = [r[0] for r in runs]
    median = statistics.median(totals)
    per_chunk = [statistics.median(r[1][c] for r in runs) for c in range(len(runs[0][1]))]
    frames, height, width = bundled.clip_shape(model.cfg)
    result = dict(
        benchmark="bundled full rollout on CPU",
        goal_s=GOAL_S,
        median_s=round(median, 3),
        meets_goal=median <= GOAL_S,
        runs_s=[round(t, 3) for t in totals],
        warmup_s=round(warm_s, 3),
        per_chunk_median_s=[round(t, 3) for t in per_chunk],
        forwards=len(per_chunk) * 5,
        clip=dict(frames=frames, height=height, width=width),
        token_grid=list(model.grid_size(torch.empty(1, 3, frames, height, width))),
        params=model.num_parameters(),
        weights=weights,
        dtype="float32",
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        cpu=platform.processor() or platform.machine(),
        torch=torch.__version__,
        toolkit=toolkit.__version__,
        python=platform.python_version(),
    )
    label = f"rollout (median of {len(totals)})"
    print(f"{label:<28} {median:8.2f} s   goal <= {GOAL_S:.0f} s")
    print(f"{'warm-up rollout':<28} {warm_s:8.2f} s")
    for c, t in enumerate(per_chunk):
        print(f"  chunk {c} (5 forwards)       {t:8.2f} s")
    print(f"threads {result['threads']}, grid {result['token_grid']}, {result['params'] / 1e6:.2f} M params, {weights}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_bundled_cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
