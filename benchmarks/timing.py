"""Timing and result files shared by the benchmarks (imported as ``timing``; scripts run as
``python benchmarks/x.py``)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one synchronised call of ``fn`` (long runs such as training steps, where one call is the
    measurement)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median_ms(fn: Callable[[], object], device: torch.device, rep_ms: float = 100) -> float:
    """Median ms of ``fn``: ``triton.testing.do_bench(..., return_mode="median")`` on CUDA (L2 flushed, warm-up
    excluded), else the median of 3 wall-clock calls with synchronisation."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=1, rep=rep_ms, return_mode="median"))
        except ImportError:
            pass
    times = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def write_result(out: Path, name: str, result: dict) -> Path:
    """Write a benchmark's ``result`` as ``out/name`` (indented JSON; ``out`` created) and say where."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), so runs on different machines are told apart."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
