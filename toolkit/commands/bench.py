"""`toolkit bench`: benchmark the Monarch Triton kernels against PyTorch SDPA backends (GPU)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        epilog=(
            'examples:\n'
            '  toolkit bench --tiny --out /tmp/bench                  CPU smoke run through the Triton interpreter\n'
            '  toolkit bench --out out/bench --shapes full-111 ar-111\n'
            '  toolkit bench --backward --out out/bwd                 forward + backward against SDPA\n'
        ),
        help="benchmark the Monarch Triton kernels against PyTorch SDPA (cuDNN, flash, efficient)",
        description=(
            "Check, then time Monarch attention kernels at the MonarchRT shapes (full 480p clip, last "
            "autoregressive chunk, 720p clip) against PyTorch SDPA backends in the same process. Reports median "
            "ms, real and dense-equivalent TFLOP/s, peak extra memory and cold-start (compile + tuning) time; "
            "writes bench_kernels.json and bench_kernels.md to --out. With --backward: forward + backward "
            "(training) of the Monarch op against SDPA cuDNN and flash forward + backward instead, medians of "
            "--repeats calls, to bench_backward.json / .md. Needs a CUDA GPU (--tiny runs a CPU smoke test "
            "through the Triton interpreter)."
        ),
    )
    from toolkit.kernels.bench import build_parser  # light: torch is imported lazily inside run

    build_parser(p)
    p.add_argument("--backward", action="store_true",
                   help="time forward + backward (gradients for training) against SDPA forward + backward; "
                        "default shapes full-111 full-311 ar-111")
    p.add_argument("--repeats", type=int, default=10, help="--backward: timed calls per variant (median reported)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.backward:
        return run_backward(args)
    from toolkit.kernels.bench import main

    return main(args=args)


def run_backward(args: argparse.Namespace) -> int:
    import os
    import sys

    from toolkit.errors import ToolkitError, check_output, prepare_output_dir

    if args.repeats < 1:
        raise ToolkitError("--repeats must be >= 1")
    from toolkit.kernels.bench import check_args

    check_args(args, backward=True)
    if args.tiny:  # before the kernels are first imported: Triton reads it when it decorates them
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from toolkit.kernels import bench_backward

    note = check_output(args.out, force=args.force, folder=True, outputs=bench_backward.OUTPUTS)
    if note:
        print(f"toolkit bench: {note}", file=sys.stderr)
    prepare_output_dir(args.out, folder=True)
    bench_backward.run(args.out, args.shapes, tiny=args.tiny, repeats=args.repeats, autotune=not args.no_autotune)
    return 0
