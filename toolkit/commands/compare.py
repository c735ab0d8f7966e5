"""``toolkit compare``: end-to-end quality of attention approximations against dense, from the same noise."""

from __future__ import annotations

import argparse

from toolkit.models.registry import DEFAULT_MODEL, MODELS

# What `compare` writes into --out; only these count as existing output there.
COMPARE_OUTPUTS = ("quality.nc", "quality.png", "quality.pdf", "table.txt")


def seeds_type(text: str) -> list[int]:
    """``0-2`` / ``0,3,8-10``: the index-list grammar (``toolkit.indices``), seeds >= 0."""
    from toolkit.indices import index_range

    seeds: list[int] = []
    try:
        for part in text.split(","):
            values = index_range(part)
            if values.start < 0 or len(values) > 10_000:
                raise ValueError(part)
            seeds += [s for s in values if s not in seeds]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a seed list such as 0-2 or 0,3,8-10") from None
    return seeds


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        epilog=(
            'examples:\n'
            '  toolkit compare --attention monarch:3,1,1 blocktopk:0.05:1,4,4 --out out/compare\n'
            '  toolkit compare --prompts heldout:6 --seeds 0,1 --attention monarch:3,4,1 sta:4,2,4:1,4,4 \\\n'
            '      --out out/cmp\n'
            '  toolkit compare --frames 6 --attention monarch:1,1,1 --out out/quick      two chunks: a quick look\n'
        ),
        help="quality of attention approximations vs dense (same noise): rel L2, PSNR, SSIM, adherence, time",
        description="Generate the dense video and each --attention spec from the same noise (same seed, same "
                    "re-noising draws) for every prompt x seed and measure them against dense: latent relative L2 "
                    "per chunk, per-frame PSNR / SSIM (scikit-image; bundled pixels, Wan through its VAE when "
                    "available), the bundled sprite evaluator's adherence, wall time. Writes quality.nc (xarray), "
                    "table.txt and the figure quality.png / .pdf into --out. See docs/compare.md.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODELS),
                   help=f"model to run (default: {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", metavar="PATH", help="weights file or folder (as for toolkit generate)")
    p.add_argument("--prompts", nargs="+", metavar="PROMPT", default=None,
                   help="text prompts, or heldout:N for the bundled evaluator's first N held-out prompts "
                        "(default: the model's default prompt)")
    p.add_argument("--prompt-embeds", nargs="+", metavar="FILE",
                   help="umT5 embeddings, one file per prompt (skips the text encoder; Wan / Self-Forcing)")
    p.add_argument("--seeds", type=seeds_type, default=[0], metavar="LIST",
                   help="noise seeds as an index list, e.g. 0-2 or 0,3,8-10 (default: 0)")
    p.add_argument("--attention", nargs="+", required=True, metavar="SPEC",
                   help="one or more --attention specs to compare with dense, e.g. monarch:1,1,1 monarch:3,1,1 "
                        "'dense@layers=0+monarch' (grammar: docs/attention-rules.md)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--frames", type=int, metavar="N",
                   help="latent frames of the clip (default: the model's); a causal model takes whole chunks, e.g. "
                        "--frames 6 for a quick two-chunk look at the bundled model")
    p.add_argument("--no-decode", action="store_true", help="Wan models: latent metrics only, skip the Wan VAE")
    p.add_argument("--out", default="out/compare",
                   help="output folder (default: out/compare); results already there are refused unless --force")
    p.add_argument("--force", action="store_true", help="replace the results of an earlier compare in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import time
    from pathlib import Path

    from toolkit.analysis.quality import (
        compare_attention,
        parse_prompts,
        quality_table,
        require_metrics,
        write_quality,
    )
    from toolkit.attention.backends import check_attention
    from toolkit.device import check_device
    from toolkit.errors import ToolkitError, check_output, prepare_output_dir
    from toolkit.models.registry import get_spec
    from toolkit.pipeline import spec_layout

    # everything refusable from the flags alone, before any model loads
    check_device(args.device)
    spec = get_spec(args.model)
    layout = spec_layout(args.model, frames=args.frames) if args.checkpoint is None else None
    for attention in args.attention:
        check_attention(attention, layout)
    if len(set(args.attention)) != len(args.attention):
        raise ToolkitError("--attention: a spec is given twice")
    prompts = parse_prompts(args.prompts) if args.prompts else [spec.default_prompt]
    if args.prompt_embeds and len(args.prompt_embeds) != len(prompts):
        raise ToolkitError(f"--prompt-embeds: {len(args.prompt_embeds)} files for {len(prompts)} prompts")
    require_metrics()
    note = check_output(args.out, force=args.force, folder=True, outputs=COMPARE_OUTPUTS)
    if note:
        print(f"toolkit compare: {note}", file=sys.stderr)
    prepare_output_dir(args.out, folder=True)

    def report(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    ds = compare_attention(args.model, prompts, args.seeds, args.attention, checkpoint=args.checkpoint,
                           prompt_embeds=args.prompt_embeds, device=args.device, dtype=args.dtype,
                           decode=not args.no_decode, frames=args.frames, report=None if args.quiet else report)
    out = Path(args.out)
    if args.force:
        for name in COMPARE_OUTPUTS:
            (out / name).unlink(missing_ok=True)
    table = quality_table(ds)
    paths = [write_quality(ds, out / "quality.nc")]
    (out / "table.txt").write_text(table + "\n")
    paths.append(out / "table.txt")
    if "psnr" in ds:
        from toolkit.paper_figures import quality as quality_figure

        paths += [Path(p) for p in quality_figure.plot(ds, out)["files"]]
    else:
        print(f"toolkit compare: {ds.attrs['pixels']}; no PSNR / SSIM figure", file=sys.stderr)
    print(table)
    if not args.quiet:
        print(f"{len(prompts)} prompt(s) x {len(args.seeds)} seed(s) x {len(args.attention) + 1} videos "
              f"in {time.perf_counter() - t0:.1f} s")
        for path in paths:
            print(f"  wrote {path}")
    return 0
