"""``toolkit capture``: run a model and record its self-attention (q, k, v, LSE, pooled views) to HDF5."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from toolkit.commands.compare import seeds_type
from toolkit.commands.generate import add_run_arguments, check_prompts, seed_type

if TYPE_CHECKING:
    import torch

    from toolkit.capture.prompt_set import RunSettings
    from toolkit.capture.selection import Plan, Selection
    from toolkit.models.layout import RunLayout


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
    g.add_argument("--out", default="capture.h5",
                   help="HDF5 file to write (default capture.h5); an existing one is refused unless --resume "
                        "(continue it) or --force (replace it)")
    g.add_argument("--layers", default="all", help="layers (default all)")
    g.add_argument("--heads", default="all", help="heads (default all)")
    g.add_argument("--steps", default="all", help="sampler steps; 'clean' = the clean pass (default all)")
    g.add_argument("--chunks", default="all", help="autoregressive chunks (default all)")
    g.add_argument("--queries", default="all", metavar="all|stride:N|random:N",
                   help="stored query rows: all, every N-th token of each frame, or N random tokens per frame")
    g.add_argument("--query-seed", type=seed_type, default=0,
                   help="seed of random:N queries, a 64-bit integer (default 0)")
    g.add_argument("--store", default="q,k,v,lse",
                   help="comma list of q,k,v,lse,maps,pooled,text_mass (default q,k,v,lse; maps only under "
                        "--max-map-bytes; text_mass: attention on a joint model's text tokens)")
    g.add_argument("--storage-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="q/k/v on disk: auto = the model's dtype, lossless (bf16 as uint16 bits); a narrower one "
                        "rounds them, and lse, maps and pooled views are then computed from the rounded values")
    g.add_argument("--compression", default="none", choices=["none", "gzip", "lzf"],
                   help="none (default: fastest, crash-safe), gzip (portable, ~1.4x smaller for bf16), lzf (h5py only)")
    g.add_argument("--max-map-bytes", default="4GB", help="size guard for --store maps (default 4GB)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted capture of the same run in --out (its finished records are kept; "
                        "a complete one is left as it is)")
    g.add_argument("--force", action="store_true", help="replace an existing --out with a new capture")
    g.add_argument("--dry-run", action="store_true", help="check the selection, print what would be written, stop")
    from toolkit.commands.capture_diffusers import pipeline_arg

    d = p.add_argument_group("a local diffusers pipeline instead of --model (docs/adapters.md)")
    d.add_argument("--diffusers", metavar="PATH",
                   help="capture the pipeline saved in folder PATH (save_pretrained; loaded offline, its own "
                        "scheduler): CogVideoX, HunyuanVideo, Mochi, LTX-Video, Wan, SkyReels-V2; needs --prompt")
    d.add_argument("--pipeline-arg", action="append", type=pipeline_arg, metavar="KEY=VALUE",
                   help="argument of the pipeline call, repeatable, VALUE as JSON when it parses "
                        "(e.g. num_inference_steps=4 num_frames=9 height=256 guidance_scale=1)")
    s = p.add_argument_group("prompt sets (docs/prompt-sets.md)")
    s.add_argument("--prompts", metavar="FILE",
                   help="capture every prompt of FILE (one per line) x every --seeds into the folder --out: "
                        "pPPPP_sSSSS.h5 per capture and index.json; under `torchrun --nproc-per-node N -m toolkit "
                        "capture` the captures are shared out over the ranks (one GPU each)")
    s.add_argument("--seeds", type=seeds_type, metavar="LIST",
                   help="seeds of a prompt set as an index list, e.g. 0-4 (default: --seed); with no --prompts, "
                        "the set of --prompt (or the model's default prompt)")
    p.set_defaults(func=run)


def parse_bytes(text: str) -> int:
    from toolkit.errors import SelectionError

    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    try:
        value = float(num) * units[t[len(num):]]
        if not 0 <= value < 2**63:  # inf, nan, negative: int() would raise or the guard would mean nothing
            raise ValueError
        return int(value)
    except (ValueError, KeyError):
        raise SelectionError(f"cannot read size '{text}' (a finite size such as 4GB or 512MiB)") from None


def describe_plan(plan: Plan, model_dtype: torch.dtype | None = None) -> str:
    from toolkit.capture.selection import human_bytes

    est = plan.estimate_bytes(model_dtype)
    parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in est.items())
    return (f"{len(plan.records)} records ({len(plan.steps)} steps × {len(plan.chunks)} chunks × "
            f"{len(plan.layers)} layers), each {len(plan.heads)} heads, {len(plan.queries)} query rows of "
            f"{plan.layout.num_tokens} tokens; about {human_bytes(sum(est.values()))}: {parts}")


def run(args: argparse.Namespace) -> int:
    import time

    from toolkit.capture import Selection, capture, resolve
    from toolkit.commands.generate import check_run_arguments
    from toolkit.errors import ToolkitError, check_output, prepare_output_dir
    from toolkit.models import registry

    check_run_arguments(args)  # --attention included
    if getattr(args, "pipeline_arg", None) and not getattr(args, "diffusers", None):
        raise ToolkitError("--pipeline-arg is for a --diffusers pipeline")
    select = Selection(layers=args.layers, heads=args.heads, steps=args.steps, chunks=args.chunks,
                       queries=args.queries, seed=args.query_seed,
                       store=tuple(s.strip() for s in args.store.split(",") if s.strip()),
                       dtype=args.storage_dtype, compression=args.compression,
                       max_map_bytes=parse_bytes(args.max_map_bytes))
    if getattr(args, "diffusers", None):
        from toolkit.commands import capture_diffusers

        return capture_diffusers.run(args, select, describe_plan)
    from toolkit.commands.generate import sampling_options
    from toolkit.pipeline import spec_layout

    layout = spec_layout(args.model, **sampling_options(args))  # the sampler's own schedule and grid; no weights
    plan = resolve(select, layout)  # refuses bad selections before any weights load
    if args.prompts is not None or args.seeds is not None:  # a folder of captures and its index
        return run_prompt_set(args, select, plan)
    say = (lambda *a: None) if args.quiet else print
    from toolkit.device import resolve_device
    from toolkit.pipeline import DTYPES

    model_dtype = DTYPES[args.dtype] or registry.default_dtype(resolve_device(args.device))
    # A dry run refuses what the run would refuse: an --out that exists or cannot be written.
    note = check_output(args.out, force=args.force, resume=args.resume, can_resume=True)
    say(f"capture plan: {describe_plan(plan, model_dtype)}")
    if args.dry_run:
        return 0
    import os
    import sys

    prepare_output_dir(args.out)  # `--out runs/x.h5` creates runs/; an unwritable place fails here, in one line
    from toolkit.capture.store import CaptureLock

    with CaptureLock(args.out):  # refuse a second writer now, not after loading the model (capture locks again)
        if args.resume and os.path.exists(args.out):
            done = complete_records(args.out, args, plan, layout)
            if done is not None:
                print(f"toolkit capture: {args.out} is already complete ({done} records of this run); "
                      "nothing to do", file=sys.stderr)
                return 0

    from toolkit.pipeline import prepare_run, sample

    t0 = time.perf_counter()
    r = prepare_run(args.model, prompt=args.prompt, prompt_embeds=args.prompt_embeds, seed=args.seed,
                    checkpoint=args.checkpoint, device=args.device, dtype=args.dtype, attention=args.attention,
                    noise=args.noise, **sampling_options(args))
    if r.layout() != layout:  # a --checkpoint whose config differs from the registry's: check the plan again
        layout = r.layout()
        plan = resolve(select, layout)
    provenance = {**r.provenance(), "history_command": command_line(args)}
    if note and not args.resume:  # said once the run is ready to write: refusals before this point stay one line
        print(f"toolkit capture: {note}", file=sys.stderr)
    if args.force and os.path.exists(args.out):
        with CaptureLock(args.out):  # the old capture goes only now that the new run is ready to write
            os.remove(args.out)
    t1 = time.perf_counter()
    with capture(r.model, select, args.out, layout=layout, provenance=provenance, resume=args.resume,
                 progress=not args.quiet) as rec:
        if note and args.resume:  # the store accepted this run's settings: a refusal stays one line
            print(f"toolkit capture: {note}", file=sys.stderr)
        try:
            sample(r, progress=not args.quiet, on_chunk=stop_after(max(plan.chunks), layout.num_chunks))
        except Captured:  # every selected record is written; later chunks would only be computed and dropped
            say(f"stopped after chunk {max(plan.chunks)}: no later chunk holds a selected record")
    t2 = time.perf_counter()
    from toolkit.capture.selection import human_bytes

    say(f"{r.name}: {r.prompt!r} seed {r.seed} on {r.device}: {rec.records_written} records, "
        f"{human_bytes(rec.bytes_written)} written to {args.out} in {t2 - t1:.1f} s "
        f"(model load {t1 - t0:.1f} s)")
    return 0


class Captured(Exception):
    """Raised from the sampler's ``on_chunk`` once the last chunk with a selected record is done."""


def stop_after(last: int, num_chunks: int) -> Callable[[int, torch.Tensor], None]:
    """An ``on_chunk`` that ends the rollout after chunk ``last`` (causal samplers call it after each chunk's clean
    pass, so every record and K/V of chunks up to ``last`` is written by then); nothing when ``last`` is the final
    chunk anyway."""

    def on_chunk(chunk: int, x0: torch.Tensor) -> None:
        if chunk == last < num_chunks - 1:
            raise Captured

    return on_chunk


def complete_records(path: str, args: argparse.Namespace, plan: Plan, layout: RunLayout) -> int | None:
    """The number of records of a capture in ``path`` that is complete and was made with these flags (those known
    without loading the model: layout or checkpoint path, selection, model, prompt, seed, attention, noise, dtype),
    else None: then resuming proceeds and the store's own checks say what differs."""
    from toolkit.capture.prompt_set import finished_records
    from toolkit.models import registry

    return finished_records(path, plan, run_settings(args), prompt=args.prompt or registry.get_spec(args.model)
                            .default_prompt, seed=args.seed)


def command_line(args: argparse.Namespace) -> str:
    """The command as typed, shell-quoted (``toolkit.cli.main`` keeps it), for the file's ``history``."""
    return getattr(args, "command_line", None) or "toolkit capture (arguments parsed outside toolkit.cli.main)"


def run_settings(args: argparse.Namespace) -> RunSettings:
    """The run flags (model, weights, device, dtype, attention, noise, clip length) -> `prompt_set.RunSettings`."""
    from toolkit.capture.prompt_set import RunSettings
    from toolkit.commands.generate import sampling_options

    return RunSettings(model=args.model, checkpoint=args.checkpoint, device=args.device, dtype=args.dtype,
                       attention=args.attention, noise=args.noise, sampling=sampling_options(args))


def run_prompt_set(args: argparse.Namespace, select: Selection, plan: Plan) -> int:
    """``--prompts FILE`` / ``--seeds LIST``: one capture per (prompt, seed) into the folder ``--out``, sharded over
    torchrun's ranks (`toolkit.capture.prompt_set`)."""
    import sys

    from toolkit.capture.prompt_set import PromptSet, Ranks, capture_prompt_set, print_index_summary, read_prompts
    from toolkit.errors import ToolkitError
    from toolkit.models import registry

    if args.prompts is not None and args.prompt is not None:
        raise ToolkitError("--prompt and --prompts: give one prompt or a prompt file, not both")
    if args.prompt_embeds:
        raise ToolkitError("--prompt-embeds is for one prompt; a prompt set encodes its prompts (cached per prompt)")
    if args.out.endswith(".h5"):
        raise ToolkitError(f"--out {args.out}: a prompt set writes a folder of captures (e.g. --out runs/set/)")
    prompts = read_prompts(args.prompts) if args.prompts else [args.prompt or registry.get_spec(args.model)
                                                                 .default_prompt]
    check_prompts(args.model, prompts)  # a bad line is refused before the set's folder or index exists
    prompt_set = PromptSet(prompts, args.seeds if args.seeds is not None else [args.seed])
    ranks = Ranks.from_env()
    say = (lambda line: None) if args.quiet else (lambda line: print(f"toolkit capture: {line}", file=sys.stderr))
    n = len(prompt_set.items)
    if ranks.rank == 0:
        print(f"prompt set: {len(prompts)} prompts × {len(prompt_set.seeds)} seeds = {n} captures into {args.out}"
              f"{f' over {ranks.world} ranks' if ranks.world > 1 else ''}; each {describe_plan(plan)}")
    if args.dry_run:
        return 0
    index = capture_prompt_set(args.out, prompt_set, select, run_settings(args), resume=args.resume,
                               force=args.force, ranks=ranks, command=command_line(args), say=say, progress=False)
    if index is not None and not args.quiet:
        print_index_summary(index, out=sys.stdout)
    if ranks.world > 1:
        # Every file is closed and the gloo group destroyed, yet a rank's interpreter shutdown can still abort in
        # torch's C++ teardown ("terminate called without an active exception", seen on loaded 2-core machines),
        # which torchrun reports as a failed run: a finished rank leaves without running the interpreter's teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
