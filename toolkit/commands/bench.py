"""`toolkit bench`: benchmark the Monarch Triton kernels against PyTorch SDPA backends (GPU)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark the Monarch Triton kernels against PyTorch SDPA (cuDNN, flash, efficient)",
        description=(
            "Check, then time Monarch attention kernels at the MonarchRT shapes (full 480p clip, last "
            "autoregressive chunk, 720p clip) against PyTorch SDPA backends in the same process. Reports median "
            "ms, real and dense-equivalent TFLOP/s, peak extra memory and cold-start (compile + tuning) time; "
            "writes bench_kernels.json and bench_kernels.md to --out. Needs a CUDA GPU (--tiny runs a CPU "
            "smoke test through the Triton interpreter)."
        ),
    )
    from toolkit.kernels.bench import build_parser  # light: torch is imported lazily inside run

    build_parser(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from toolkit.kernels.bench import main

    return main(args=args)
