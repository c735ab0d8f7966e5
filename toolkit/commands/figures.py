"""``toolkit figures RUN.h5 --out figs/``: the MonarchRT analysis figures (and beyond) from one capture; ``toolkit
figures --figures semantic`` makes the one figure that needs the bundled model instead of a capture."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from toolkit.commands.generate import seed_type

FIGURE_NAMES = ("fig1", "fig2", "coverage", "alignment", "offsets", "spectra", "head-types", "kernels")
MODEL_FIGURES = ("semantic",)  # made by running the bundled model on a rendered clip, not from a capture
# What an earlier `figures` run left in --out that a new one would replace: figures (PNG/PDF, the semantic figure's
# numbers) and the manifest. Cached analyses (analysis_*.nc) are not among them: they are reused when they match.
FIGURE_OUTPUTS = ("manifest.json", "*.png", "*.pdf", "semantic_correspondence.json")


def _ints(text: str) -> list[int] | None:
    from toolkit.commands.analyze import index_list

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
                    "already cached in --out (analysis_*.nc) and writes manifest.json. Figures the capture cannot make "
                    "(e.g. Fig. 1 from a --queries random:16 capture) are skipped with one line each naming the "
                    "capture option that would enable them; the run fails only when none can be made. "
                    "`--figures semantic` needs no capture: it runs the bundled model over a rendered clip of "
                    "--prompt/--seed (teacher-forced KV cache, last chunk at --step) and shows one sprite token's "
                    "attention over earlier frames with the sprite's ground-truth mask outlined, e.g. "
                    "`toolkit figures --figures semantic --prompt '2 sprites: red circle, blue square' --seed 3`.",
    )
    p.add_argument("run", metavar="RUN.h5", nargs="?", default=None,
                   help="capture file (toolkit capture); not needed for --figures semantic alone")
    p.add_argument("--out", default="figs",
                   help="output folder (default: figs); one holding figures or a manifest.json of an earlier run is "
                        "refused unless --force. Cached analyses there (analysis_*.nc) are reused when they match")
    p.add_argument("--force", action="store_true",
                   help="replace the figures and manifest.json of an earlier run in --out (its matching cached "
                        "analyses are still reused: delete analysis_*.nc to recompute them)")
    p.add_argument("--figures", default="all", metavar="LIST",
                   help=f"comma list of {', '.join(FIGURE_NAMES + MODEL_FIGURES)} or all (default: every capture "
                        "figure; kernels only with --bench; semantic only when named)")
    p.add_argument("--pairs", type=_pairs, default=None, metavar="L:H,...",
                   help="(layer, head) pairs of Fig. 1/2, offsets, spectra (default: 0:0,8:7 on Self-Forcing; "
                        "the analogues at the same depth otherwise)")
    p.add_argument("--step", type=int, default=None,
                   help="focus step (default: last denoising step); for semantic: the last chunk's denoising step "
                        "(0-3; 4 = its clean pass)")
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
    p.add_argument("--device", default=None,
                   help="device of the analyses and of the semantic figure's model (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    g = p.add_argument_group("semantic correspondence (--figures semantic: from the bundled model, no capture)")
    g.add_argument("--checkpoint", metavar="PATH",
                   help="bundled-architecture weights file or folder (default: data/bundled; `toolkit models`)")
    g.add_argument("--prompt", default=None,
                   help="toy prompt of the rendered clip, e.g. '2 sprites: red circle, blue square; pan left' "
                        "(default: the bundled default prompt)")
    g.add_argument("--seed", type=seed_type, default=0,
                   help="seed of the rendered clip and its noise, a 64-bit integer (default 0)")
    g.add_argument("--sprite", default=None, metavar="SLOT|COLOUR",
                   help="sprite holding the query: prompt slot (0 = first) or colour (default: the one covering "
                        "most tokens of the last frame)")
    g.add_argument("--query-head", type=_pairs, default=None, metavar="L:H",
                   help="(layer, head) shown (default: the head with the most attention mass on the sprite in "
                        "earlier frames)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window (SSH, CI); notebooks keep their inline backend
    import sys
    from pathlib import Path

    from toolkit.device import check_device
    from toolkit.errors import ToolkitError, check_output, prepare_output_dir
    from toolkit.paper_figures import FigureSettings, make_figures, resolve_figures

    asked = [x.strip() for x in args.figures.split(",") if x.strip()]
    semantic = "semantic" in asked
    capture_figures = [x for x in asked if x not in MODEL_FIGURES]
    log = (lambda *a, **k: None) if args.quiet else print
    if capture_figures:
        settings = FigureSettings(figures=(",".join(capture_figures),), pairs=args.pairs, step=args.step,
                                  chunk=args.chunk, layers=args.layers, heads=args.heads, steps=args.steps,
                                  chunks=args.chunks, mass=args.mass, frame_pair=args.frame_pair,
                                  bench=tuple(args.bench), device=args.device,
                                  layouts=tuple(args.layout) if args.layout else None)
        resolve_figures(settings)  # unknown names fail before the capture is opened
        if args.run is None:
            raise ToolkitError(f"--figures {','.join(capture_figures)} needs a capture: toolkit figures RUN.h5 "
                               "--out DIR (only --figures semantic is made without one, from the model)")
    if semantic:
        semantic_options(args)  # a bad prompt or head fails before anything loads or runs
    if args.device is not None:
        check_device(args.device)
    note = check_output(args.out, force=args.force, folder=True, outputs=FIGURE_OUTPUTS)
    if capture_figures and not Path(args.run).is_file():
        raise ToolkitError(f"{args.run}: no such capture file")
    # A read-only or uncreatable --out fails now, not after hours of analyses; a refusal below leaves no folder.
    prepare_output_dir(args.out, folder=True, keep=False)
    if note:
        print(f"toolkit figures: {note}", file=sys.stderr)
    if capture_figures:
        make_figures(args.run, args.out, settings, log=log, progress=not args.quiet)
    if semantic:
        if args.run is not None and not capture_figures:
            log(f"note: {args.run} is not used: the semantic figure is made from the model")
        make_semantic(args, log)
    return 0


def semantic_options(args: argparse.Namespace) -> dict:
    from toolkit.errors import ToolkitError
    from toolkit.models.bundled import SELF_FORCING_STEPS, data
    from toolkit.models.registry import get_spec

    if args.query_head is not None and len(args.query_head) != 1:
        raise ToolkitError("--query-head takes one LAYER:HEAD pair")
    if args.step is not None and not 0 <= args.step <= len(SELF_FORCING_STEPS):
        raise ToolkitError(f"--step {args.step}: the semantic figure takes the last chunk's denoising step "
                           f"0..{len(SELF_FORCING_STEPS) - 1}, or {len(SELF_FORCING_STEPS)} for its clean pass")
    if args.prompt is not None and not args.prompt.strip():
        raise ToolkitError(f"--prompt is empty; leave it out to use the bundled default prompt "
                           f"({get_spec('bundled').default_prompt!r})")
    layer, head = args.query_head[0] if args.query_head else (None, None)
    prompt = data.parse_prompt(args.prompt or get_spec("bundled").default_prompt)
    return dict(prompt=prompt, seed=args.seed, step=args.step, layer=layer, head=head, sprite=args.sprite)


def make_semantic(args: argparse.Namespace, log: Callable[[str], None]) -> None:
    import torch

    from toolkit.device import resolve_device
    from toolkit.models.registry import load_model
    from toolkit.paper_figures import semantic

    options = semantic_options(args)
    model, _ = load_model("bundled", args.checkpoint, device=resolve_device(args.device or "auto"),
                          dtype=torch.float32, sha256=False)  # float32: exact rows, and the model is small
    paths = semantic.make(model, args.out, log=log, **options)
    log(f"wrote {', '.join(p.name for p in paths)} to {args.out}/")
