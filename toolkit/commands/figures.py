"""``toolkit figures RUN.h5 --out figs/``: the MonarchRT analysis figures (and beyond) from one capture."""

from __future__ import annotations

import argparse

FIGURE_NAMES = ("fig1", "fig2", "coverage", "alignment", "offsets", "spectra", "head-types", "kernels")


def _ints(text: str) -> list[int] | None:
    from toolkit.analysis import index_list

    return index_list(text)


def _pairs(text: str) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple(tuple(int(x) for x in p.lower().lstrip("l").replace("h", ":").split(":"))
                      for p in text.split(",") if p.strip())
        if not pairs or any(len(p) != 2 for p in pairs):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of LAYER:HEAD pairs like 0:0,8:7 (or L0H0,L8H7)") \
            from None
    return pairs


def _frame_pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not QUERY_FRAME,KEY_FRAME") from None
    return a, b


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "figures",
        help="make the paper's analysis figures (PNG + PDF) from a capture",
        description="Make the MonarchRT analysis figures from one capture: Fig. 1 (map MSE vs sparsity, Monarch vs "
                    "oracle top-k), Fig. 2 (3-D structure), coverage, alignment & tiling, offset profiles, spectra, "
                    "head types, and kernel tables from `toolkit bench` JSON. Runs the analyses that are not "
                    "already cached in --out (analysis_*.nc) and writes manifest.json.",
    )
    p.add_argument("run", metavar="RUN.h5", help="capture file (toolkit capture)")
    p.add_argument("--out", default="figs", help="output folder (default: figs)")
    p.add_argument("--figures", default="all", metavar="LIST",
                   help=f"comma list of {', '.join(FIGURE_NAMES)} or all (default; kernels only with --bench)")
    p.add_argument("--pairs", type=_pairs, default=None, metavar="L:H,...",
                   help="(layer, head) pairs of Fig. 1/2, offsets, spectra (default: 0:0,8:7 on Self-Forcing; "
                        "the analogues at the same depth otherwise)")
    p.add_argument("--step", type=int, default=None, help="focus step (default: last denoising step)")
    p.add_argument("--chunk", type=int, default=None, help="focus chunk (default: last stored chunk)")
    p.add_argument("--frame-pair", type=_frame_pair, default=None, metavar="QF,KF",
                   help="Fig. 2 zoom: query frame, key frame (default: the chunk's first frame with itself)")
    p.add_argument("--layers", type=_ints, default=None, metavar="LIST",
                   help="layers of the across-layer figures (coverage, spectra, head types; default all stored)")
    p.add_argument("--heads", type=_ints, default=None, metavar="LIST",
                   help="heads analysed by every figure (default all stored; must include the pairs' heads)")
    p.add_argument("--steps", type=_ints, default=None, metavar="LIST", help="steps of the coverage figure")
    p.add_argument("--chunks", type=_ints, default=None, metavar="LIST", help="chunks of the coverage figure")
    p.add_argument("--mass", type=float, default=0.95, help="coverage mass (default 0.95)")
    p.add_argument("--layout", action="append", default=None, metavar="SPEC",
                   help="Monarch layout of Fig. 1 / alignment, repeatable: BASE:F,H,W (e.g. fh,w:1,2,1) or "
                        "contiguous:B1xB2 (default: the analysis' paper tilings, aligned bases and controls)")
    p.add_argument("--bench", nargs="+", default=(), metavar="JSON", help="bench_kernels.json file(s) (toolkit bench)")
    p.add_argument("--device", default=None, help="device of the analyses (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window (SSH, CI); notebooks keep their inline backend
    from toolkit.paper_figures import FigureSettings, make_figures, resolve_figures

    settings = FigureSettings(figures=(args.figures,), pairs=args.pairs, step=args.step, chunk=args.chunk,
                              layers=args.layers, heads=args.heads, steps=args.steps, chunks=args.chunks,
                              mass=args.mass,
                              frame_pair=args.frame_pair, bench=tuple(args.bench), device=args.device,
                              layouts=tuple(args.layout) if args.layout else None)
    resolve_figures(settings)  # unknown names fail before the capture is opened
    make_figures(args.run, args.out, settings, log=(lambda *a, **k: None) if args.quiet else print,
                 progress=not args.quiet)
    return 0
