"""``toolkit inspect FILE``: human summary of a capture file (model, prompt, records, sizes, completeness);
``--verify`` adds an integrity check of the stored tensors on a sample of records."""

from __future__ import annotations

import argparse


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        epilog=(
            'examples:\n'
            '  toolkit inspect run.h5              model, prompt, grid, selection, sizes, completeness\n'
            '  toolkit inspect run.h5 --records    also one line per complete record\n'
            '  toolkit inspect run.h5 --verify     rows rebuilt from the stored q, k and lse must sum to 1\n'
        ),
        help="summarise a capture file",
        description="Print what a capture file holds: model, checkpoint, prompt, seed, grid, selection, complete "
                    "and missing records, dataset sizes, versions. Works on interrupted (incomplete) files, and calls "
                    "a capture whose attention calls matched nothing EMPTY (with what it watched). A "
                    "damaged file (missing attributes or datasets, shapes that disagree with its layout) is refused "
                    "in one line.",
    )
    p.add_argument("file", help="capture .h5 file")
    p.add_argument("--records", action="store_true", help="also list every complete record (step, chunk, layer)")
    p.add_argument("--verify", action="store_true",
                   help="integrity check: on a sample of records, attention rows recomputed from the stored q and k "
                        "must sum to 1 against the stored lse (catches overwritten or zeroed values); exit 2 naming "
                        "the first bad record")
    p.add_argument("--verify-records", type=_count, default=None, metavar="N",
                   help="records --verify checks, spread evenly over the complete ones (default: as many as 1 GiB of "
                        "stored keys allows, at least 8; 0 = all)")
    p.add_argument("--verify-rows", type=_count, default=64, metavar="N",
                   help="random stored queries per record --verify checks, every head (default 64; 0 = all)")
    p.add_argument("--device", default=None, help="device --verify computes on (default: cuda if available, else cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from toolkit.capture import open_capture

    with open_capture(args.file) as cap:
        print(cap.summary())
        a = cap.attrs
        for key in ("pipeline", "model_class", "diffusers_version"):  # captures of other DiTs (adapters)
            if key in a:
                print(f"  {key:18s} {a[key]}")
        if args.records:
            for r in cap.records:
                print(f"  record step={r.step} chunk={r.chunk} layer={r.layer}")
        if args.verify:
            print(cap.verify(args.verify_records, args.verify_rows, device=args.device), flush=True)
    return 0
