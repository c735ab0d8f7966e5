"""`toolkit` command line.

Each subcommand lives in ``toolkit/commands/<name>.py`` and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed args; returns an exit code). Commands import heavy
modules (torch, h5py) inside ``func`` so that ``toolkit --help`` and argument errors stay instant.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from toolkit.commands import OneLineParser
from toolkit.errors import ToolkitError

# Order = order in `toolkit --help`.
COMMANDS = (
    "models",
    "generate",
    "compare",
    "capture",
    "inspect",
    "analyze",
    "figures",
    "train",
    "bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="toolkit",
        description=(
            "Attention-analysis toolkit for video diffusion transformers: run Self-Forcing / Wan2.1 / the "
            "bundled model, capture attention to HDF5, analyse periodic structure, oracle top-k and Monarch "
            "approximations, benchmark Triton Monarch kernels, and reproduce the MonarchRT figures."
        ),
    )
    from toolkit import __version__

    parser.add_argument("--version", action="version", version=f"toolkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"toolkit.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["toolkit", *argv])  # as typed, quoted: what a capture's provenance records
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except ToolkitError as err:
        print(f"toolkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"toolkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
