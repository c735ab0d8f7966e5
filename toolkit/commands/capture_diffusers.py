"""``toolkit capture --diffusers PATH``: capture a diffusers pipeline saved in a local folder (offline, its own
scheduler) through ``SDPAAdapter.for_diffusers``; the flags map to ``load_pipeline`` / ``probe`` and ``capture``."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    import torch

    from toolkit.capture.selection import Plan, Selection


def pipeline_arg(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as JSON when it is (numbers, true/false, lists), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. num_inference_steps=4), got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def run(args: argparse.Namespace, select: Selection, describe_plan: Callable[[Plan, torch.dtype | None], str]) -> int:
    """The capture of ``args.diffusers`` with ``select``; ``describe_plan(plan, dtype)`` words the plan (the
    ``toolkit capture`` line, passed in so this module does not import its caller)."""
    import sys
    import time

    import torch

    from toolkit.capture import capture, resolve
    from toolkit.capture.adapters import SDPAAdapter, diffusers_spec
    from toolkit.capture.selection import human_bytes
    from toolkit.capture.store import CaptureLock
    from toolkit.device import resolve_device
    from toolkit.errors import check_output, prepare_output_dir
    from toolkit.models.diffusers_folder import load_pipeline, probe
    from toolkit.pipeline import DTYPES

    given = [f for f in ("checkpoint", "prompt_embeds", "resume") if getattr(args, f, None)]
    if args.model != "bundled" or given or args.attention != "dense":
        raise ToolkitError("--diffusers PATH is the model: leave out --model, --checkpoint, --prompt-embeds, "
                           "--attention and --resume")
    if not args.prompt or not args.prompt.strip():
        raise ToolkitError("--diffusers needs --prompt")
    say = (lambda *a: None) if args.quiet else print
    note = check_output(args.out, force=args.force)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    pipe = load_pipeline(args.diffusers, device=device, dtype=DTYPES[args.dtype])
    extra = dict(args.pipeline_arg or [])

    def call() -> dict:  # a fresh generator each time: the probe and the run draw the same noise
        return {"prompt": args.prompt, "generator": torch.Generator(device).manual_seed(args.seed),
                "output_type": "latent", **extra}

    first = probe(pipe, call())
    # under batched classifier-free guidance the batch is [unconditional, conditional]: capture the conditional
    guided = diffusers_spec(pipe.transformer).cfg == "batched" and (first.guidance_scale or 0) > 1
    batch_index = first.latent_shape[0] // 2 if guided else 0
    adapter = SDPAAdapter.for_diffusers(pipe.transformer, first.latent_shape, batch_index=batch_index,
                                        **first.kwargs)
    layout = adapter.layout(first.timesteps)
    plan = resolve(select, layout)
    say(f"capture plan: {describe_plan(plan, pipe.transformer.dtype)}")
    if args.dry_run:
        return 0
    prepare_output_dir(args.out)
    if note:
        print(f"toolkit capture: {note}", file=sys.stderr)
    if args.force and os.path.exists(args.out):
        with CaptureLock(args.out):
            os.remove(args.out)
    folder = os.path.abspath(args.diffusers)
    provenance = {"model": f"diffusers:{folder}", "checkpoint": folder,
                  "prompt": args.prompt, "seed": args.seed, "pipeline": type(pipe).__name__,
                  "sampler": type(pipe.scheduler).__name__,
                  "scheduler_config": json.loads(json.dumps(dict(pipe.scheduler.config), default=str)),
                  "pipeline_args": extra, "pipeline_batch_index": batch_index}
    t1 = time.perf_counter()
    with torch.no_grad(), adapter, capture(adapter, select, args.out, layout=layout, provenance=provenance,
                                           progress=not args.quiet) as rec:
        pipe(**call())
    say(f"{type(pipe).__name__} ({args.diffusers}): {args.prompt!r} seed {args.seed} on {device}: "
        f"{rec.records_written} records, {human_bytes(rec.bytes_written)} written to {args.out} in "
        f"{time.perf_counter() - t1:.1f} s (load and probe {t1 - t0:.1f} s)")
    return 0
