"""CPU time of one full bundled-model rollout: 4 chunks x (4 denoising steps + clean pass), less the clean pass
after the last chunk that ``bundled.generate`` skips (nothing reads it) = 19 DiT forwards over the bundled token
grid, float32, with the Self-Forcing KV cache.

    python benchmarks/bench_bundled_cpu.py --out benchmarks/results/          # target: <= 20 s on 2 cores
    python benchmarks/bench_bundled_cpu.py --config dim=256,num_heads=4,ffn_dim=1024 --threads 2 --out /tmp/r

Uses the shipped weights (data/bundled) when present, else random weights of the same config (same cost);
``--config`` times random weights of the bundled architecture with those fields changed (a size sweep; the JSON
is then named after them).
Reports the median over --videos timed rollouts after one warm-up rollout, per-chunk times, and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from timing import cpu_model, write_result

import toolkit
from toolkit.errors import WeightsNotFound
from toolkit.models import bundled
from toolkit.models.wan import WanModel

GOAL_S = 20.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--videos", type=int, default=3, help="timed rollouts after one warm-up rollout")
    p.add_argument("--threads", default="1,2", help="torch CPU thread counts to time, comma-separated (default 1,2)")
    p.add_argument("--config", default="", help="comma-separated WanConfig fields to change, e.g. "
                   "dim=256,num_heads=4,ffn_dim=1024,num_layers=6: random weights of that size")
    args = p.parse_args()

    overrides = {key: int(value) for key, value in (item.split("=") for item in args.config.split(",") if item)}
    try:
        if overrides:
            torch.manual_seed(0)
            model = WanModel(bundled.bundled_config(**overrides)).eval()
            weights = f"random, bundled config with {args.config}"
        else:
            model, info = bundled.load_bundled("cpu", torch.float32)
            weights = info["path"]
    except WeightsNotFound:
        torch.manual_seed(0)
        model, weights = WanModel(bundled.bundled_config()).eval(), "random (data/bundled/model.safetensors absent)"
    prompt = "2 sprites: red circle, blue square; pan left"

    def one_rollout(seed: int) -> tuple[float, list[float], list[int]]:
        """(seconds, seconds per chunk, model forwards per chunk) of one ``bundled.generate``."""
        from toolkit.models.bundled import model as bundled_model

        marks, calls, counts = [time.perf_counter()], [], [0]
        real = bundled_model.self_forcing_rollout

        def chunk_done(*_) -> None:
            marks.append(time.perf_counter())
            counts.append(len(calls))

        def timed(*a, **kw):
            return real(*a, **kw, on_chunk=chunk_done)

        bundled_model.self_forcing_rollout = timed
        hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            bundled.generate(model, prompt, seed=seed)
        finally:
            bundled_model.self_forcing_rollout = real
            hook.remove()
        end = time.perf_counter()
        return end - marks[0], [b - a for a, b in zip(marks, marks[1:])], [b - a for a, b in zip(counts, counts[1:])]

    frames, height, width = bundled.clip_shape(model.cfg)
    result = dict(
        benchmark="bundled full rollout on CPU",
        goal_s=GOAL_S,
        prompt=prompt,
        clip=dict(frames=frames, height=height, width=width),
        token_grid=list(model.grid_size(torch.empty(1, 3, frames, height, width))),
        forwards_per_rollout=0,
        params=model.num_parameters(),
        weights=weights,
        dtype="float32",
        cpu_count=os.cpu_count(),
        cpu=platform.processor() or platform.machine(),
        cpu_model=cpu_model(),
        date=time.strftime("%Y-%m-%d"),
        torch=torch.__version__,
        toolkit=toolkit.__version__,
        python=platform.python_version(),
        by_threads={},
    )
    # With other processes on the cores, 2 OpenMP threads can be several times slower than 1 (spin-waiting),
    # so both are timed and the machine's load is recorded with each.
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        load_before = os.getloadavg()[0]
        warm_s, _, forwards = one_rollout(0)
        runs = [one_rollout(1 + i) for i in range(args.videos)]
        totals = [r[0] for r in runs]
        median = statistics.median(totals)
        per_chunk = [statistics.median(r[1][c] for r in runs) for c in range(len(runs[0][1]))]
        result["forwards_per_rollout"] = sum(forwards)
        result["by_threads"][str(threads)] = dict(
            median_s=round(median, 3),
            meets_goal=median <= GOAL_S,
            runs_s=[round(t, 3) for t in totals],
            warmup_s=round(warm_s, 3),
            per_chunk_median_s=[round(t, 3) for t in per_chunk],
            forwards_per_chunk=forwards,
            load_average_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
        )
        label = f"{threads} thread(s): rollout, median of {len(totals)}"
        print(f"{label:<36} {median:8.2f} s   goal <= {GOAL_S:.0f} s   (warm-up {warm_s:.2f} s, "
              f"1-min load {load_before:.1f} -> {os.getloadavg()[0]:.1f})")
        for c, (t, n) in enumerate(zip(per_chunk, forwards)):
            print(f"    chunk {c} ({n} forwards)             {t:8.2f} s")
    result["best_median_s"] = min(v["median_s"] for v in result["by_threads"].values())
    result["meets_goal"] = result["best_median_s"] <= GOAL_S
    print(f"grid {result['token_grid']}, {result['params'] / 1e6:.2f} M params, {weights}")
    result["config"] = {k: getattr(model.cfg, k) for k in ("num_layers", "dim", "num_heads", "ffn_dim")}
    name = "bench_bundled_cpu" + "".join(f"_{k}{v}" for k, v in overrides.items())
    write_result(args.out, f"{name}.json", result)


if __name__ == "__main__":
    main()
