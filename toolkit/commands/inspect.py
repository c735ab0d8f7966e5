"""``toolkit inspect FILE``: human summary of a capture file (model, prompt, records, sizes, completeness)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarise a capture file",
        description="Print what a capture file holds: model, checkpoint, prompt, seed, grid, selection, complete "
                    "and missing records, dataset sizes, versions. Works on interrupted (incomplete) files.",
    )
    p.add_argument("file", help="capture .h5 file")
    p.add_argument("--records", action="store_true", help="also list every complete record (step, chunk, layer)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from toolkit.capture import open_capture

    with open_capture(args.file) as cap:
        print(cap.summary())
        if args.records:
            for r in cap.records:
                print(f"  record step={r.step} chunk={r.chunk} layer={r.layer}")
    return 0
