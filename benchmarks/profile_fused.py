"""Where the fused Monarch forward's time goes: the kernel timed with one part left out at a time.

Without hardware counters (the device machine runs gVisor), the split comes from differences: the whole kernel,
then builds of it without the K/V copies (``MF_SKIP_LOAD``), without the R-step (``MF_SKIP_RSTEP``), without
the R-step's second phase (``MF_SKIP_PHASE2``) and without the L-step (``MF_SKIP_LSTEP``); those builds compute
a wrong result and are only timed. ``--timing`` adds the per-phase ``clock64`` cycles of a ``MF_TIMING`` build
(two blocks, every warp; the counters cost a few registers and instructions). The two-stage kernel and cuDNN
SDPA run in the same process for scale. Medians of ``triton.testing.do_bench``; compile excluded (each variant
is called once before timing).

    python benchmarks/profile_fused.py --out DIR [--shapes full-111 ar-111] [--timing]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import triton
import triton.testing
from toolkit.kernels.bench import SHAPES, _dense_fn, _inputs
from toolkit.kernels.monarch import _forward
from toolkit.kernels.monarch_fused import monarch_fused_forward

ABLATIONS = {
    "whole kernel": (),
    "no K/V copies": ("MF_SKIP_LOAD=1",),
    "no R-step": ("MF_SKIP_RSTEP=1",),
    "no R-step phase 2": ("MF_SKIP_PHASE2=1",),
    "no L-step": ("MF_SKIP_LSTEP=1",),
}


def time_shape(name: str, variants: list[str], q, k, v) -> list[dict]:
    """Median ms of every variant at one shape (rows of the JSON)."""
    grid, tiling, qf, kf = SHAPES[name]
    kw = dict(query_frames=qf, key_frames=kf, block_causal_frames=None, scale=q.shape[-1] ** -0.5)

    def fused(defines):
        return lambda: monarch_fused_forward(q, k, v, grid, tiling, **kw, _defines=defines)

    runs = {f"fused: {label}": fused(ABLATIONS[label]) for label in variants}
    runs["two-stage (default configs)"] = lambda: _forward(q, k, v, grid, tiling, **kw, autotune=False)
    q_bytes = q.numel() * q.element_size()  # the low-memory mode: scratch of size(q), extra memory ≤ 2 × size(q)
    runs["two-stage low-memory"] = lambda: _forward(q, k, v, grid, tiling, **kw, autotune=False, scratch_bytes=q_bytes)
    runs["cuDNN SDPA"] = _dense_fn("cudnn", *(x.transpose(1, 2).contiguous() for x in (q, k, v)), kw["scale"])
    rows = []
    for label, fn in runs.items():
        fn()  # compile
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
        rows.append({"shape": name, "variant": label, "median_ms": round(ms, 4)})
        print(f"{name:10s} {label:32s} {ms:8.3f} ms", flush=True)
    return rows


PHASES = ("wait + barrier + issue", "phase 1", "softmax", "phase 2", "chunk barrier", "L-step", "slab barrier")


def phase_cycles(name: str, q, k, v) -> dict:
    """Per-phase clock64 cycles of a ``MF_TIMING`` build at one shape: two blocks, mean and max over warps."""
    grid, tiling, qf, kf = SHAPES[name]
    timing = torch.zeros(2, 8, len(PHASES), dtype=torch.int64, device="cuda")
    monarch_fused_forward(q, k, v, grid, tiling, query_frames=qf, key_frames=kf, block_causal_frames=None,
                          scale=q.shape[-1] ** -0.5, _defines=("MF_TIMING=1",), _timing=timing)
    t = timing.double().cpu()
    blocks = {}
    for b, label in enumerate(("first block", "middle block")):
        blocks[label] = {ph: {"mean": round(t[b, :, i].mean().item()), "max": round(t[b, :, i].max().item())}
                         for i, ph in enumerate(PHASES)}
        total = t[b].sum(1)
        blocks[label]["total"] = {"mean": round(total.mean().item()), "max": round(total.max().item())}
        cycles = ", ".join(f"{ph} {v['mean']}" for ph, v in blocks[label].items())
        print(f"{name} {label}: {cycles}", flush=True)
    return {"shape": name, "cycles": blocks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--shapes", nargs="*", default=["full-111", "ar-111"], choices=sorted(SHAPES))
    parser.add_argument("--variants", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    parser.add_argument("--timing", action="store_true", help="also the per-phase cycles of a MF_TIMING build")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "heads": 12, "head_dim": 128, "dtype": "bf16", "rows": []}
    for name in args.shapes:
        grid, _, qf, kf = SHAPES[name]
        qkv = _inputs(grid, qf, kf, 12, 128, torch.bfloat16, "cuda")
        if args.timing:
            result.setdefault("phase_cycles", []).append(phase_cycles(name, *qkv))
        result["rows"] += time_shape(name, args.variants, *qkv)
        (args.out / "profile_fused.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
