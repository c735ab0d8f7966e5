"""``toolkit capture``: run a model and record its self-attention (q, k, v, LSE, pooled views) to HDF5."""

from __future__ import annotations

import argparse

from toolkit.commands.generate import add_run_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "capture",
        help="run a model and record its attention to an HDF5 file",
        description=(
            "Sample a clip while recording, for the selected (step, chunk, layer, head): post-RoPE q of the "
            "queries, k and v of the attended keys (each chunk's K/V stored once per step, never the whole "
            "cache), the exact softmax LSE per query row, optional pooled views (frame x frame mass, offset "
            "profiles) and small maps. Any attention map of the run can then be recomputed exactly with "
            "toolkit.capture.open_capture(FILE). Selections are checked before the model loads."
        ),
        epilog="Index lists: all | 0,3,8-10 (inclusive ranges). Steps of a causal model: 0..3 denoising, "
               "4 or 'clean' = clean-context pass. Example: toolkit capture --layers 8 --steps 3 --out run.h5",
    )
    add_run_arguments(p)
    g = p.add_argument_group("what to record")
    g.add_argument("--out", default="capture.h5", help="HDF5 file to write (must not exist unless --resume)")
    g.add_argument("--layers", default="all", help="layers (default all)")
    g.add_argument("--heads", default="all", help="heads (default all)")
    g.add_argument("--steps", default="all", help="sampler steps; 'clean' = the clean pass (default all)")
    g.add_argument("--chunks", default="all", help="autoregressive chunks (default all)")
    g.add_argument("--queries", default="all", metavar="all|stride:N|random:N",
                   help="stored query rows: all, every N-th token of each frame, or N random tokens per frame")
    g.add_argument("--query-seed", type=int, default=0, help="seed of random:N queries (default 0)")
    g.add_argument("--store", default="q,k,v,lse",
                   help="comma list of q,k,v,lse,maps,pooled (default q,k,v,lse; maps only under --max-map-bytes)")
    g.add_argument("--storage-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="q/k/v on disk: auto = the model's dtype (bf16 as lossless uint16 bits)")
    g.add_argument("--compression", default="none", choices=["none", "gzip", "lzf"],
                   help="none (default: fastest, crash-safe), gzip (portable, ~1.4x smaller for bf16), lzf (h5py only)")
    g.add_argument("--max-map-bytes", default="4GB", help="size guard for --store maps (default 4GB)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted capture of the same run in --out")
    g.add_argument("--dry-run", action="store_true", help="check the selection, print what would be written, stop")
    p.set_defaults(func=run)


def parse_bytes(text: str) -> int:
    from toolkit.errors import SelectionError

    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    try:
        return int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise SelectionError(f"cannot read size '{text}' (e.g. 4GB, 512MiB)") from None


def describe_plan(plan, model_dtype=None) -> str:
    from toolkit.capture.selection import human_bytes

    est = plan.estimate_bytes(model_dtype)
    parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in est.items())
    return (f"{len(plan.records)} records ({len(plan.steps)} steps × {len(plan.chunks)} chunks × "
            f"{len(plan.layers)} layers × {len(plan.heads)} heads, {len(plan.queries)} query rows of "
            f"{plan.layout.num_tokens}); about {human_bytes(sum(est.values()))}: {parts}")


def run(args: argparse.Namespace) -> int:
    import time

    from toolkit.attention.backends import parse_attention
    from toolkit.capture import Selection, capture, resolve
    from toolkit.errors import ToolkitError
    from toolkit.models import registry

    parse_attention(args.attention)
    select = Selection(layers=args.layers, heads=args.heads, steps=args.steps, chunks=args.chunks,
                       queries=args.queries, seed=args.query_seed,
                       store=tuple(s.strip() for s in args.store.split(",") if s.strip()),
                       dtype=args.storage_dtype, compression=args.compression,
                       max_map_bytes=parse_bytes(args.max_map_bytes))
    layout = registry.get_spec(args.model).layout()  # the sampler's own schedule and grid; no weights
    plan = resolve(select, layout)  # refuses bad selections before any weights load
    say = (lambda *a: None) if args.quiet else print
    from toolkit.device import resolve_device
    from toolkit.pipeline import DTYPES

    model_dtype = DTYPES[args.dtype] or registry.default_dtype(resolve_device(args.device))
    say(f"capture plan: {describe_plan(plan, model_dtype)}")
    if args.dry_run:
        return 0
    import os

    if os.path.exists(args.out) and not args.resume:
        raise ToolkitError(f"{args.out} exists; pass --resume to continue it or choose a new --out")
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)  # like any writer: `--out runs/x.h5` just works
    from toolkit.capture.store import CaptureLock

    with CaptureLock(args.out):  # refuse a second writer now, not after loading the model (capture locks again)
        pass

    from toolkit.pipeline import prepare_run, sample

    t0 = time.perf_counter()
    r = prepare_run(args.model, prompt=args.prompt, prompt_embeds=args.prompt_embeds, seed=args.seed,
                    checkpoint=args.checkpoint, device=args.device, dtype=args.dtype, attention=args.attention,
                    noise=args.noise)
    if r.layout() != layout:  # a --checkpoint whose config differs from the registry's: check the plan again
        layout = r.layout()
        resolve(select, layout)
    provenance = {**r.provenance(), "history_command": "toolkit capture " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items())
        if k not in ("func", "command") and v not in (None, False))}
    t1 = time.perf_counter()
    with capture(r.model, select, args.out, layout=layout, provenance=provenance, resume=args.resume,
                 progress=not args.quiet) as rec:
        sample(r, progress=not args.quiet)
    t2 = time.perf_counter()
    from toolkit.capture.selection import human_bytes

    say(f"{r.name}: {r.prompt!r} seed {r.seed} on {r.device}: {rec.records_written} records, "
        f"{human_bytes(rec.bytes_written)} written to {args.out} in {t2 - t1:.1f} s "
        f"(model load {t1 - t0:.1f} s)")
    return 0
