"""``toolkit generate``: sample a clip from a model (no capture)."""

from __future__ import annotations

import argparse

from toolkit.models.registry import DEFAULT_MODEL, MODELS

SEED_RANGE = (-(2**63), 2**63 - 1)  # torch generators and HDF5 attributes hold 64-bit seeds
# What `generate` writes into --out (pipeline.save_outputs); only these count as existing output there.
GENERATE_OUTPUTS = ("video.png", "video.gif", "video.mp4", "latents.safetensors", "run.json")


def seed_type(text: str) -> int:
    """argparse type of every seed option: an integer that fits 64 bits (a larger one is a traceback in torch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"{text} does not fit 64 bits (-2^63 .. 2^63-1)")
    return value


def check_run_arguments(args: argparse.Namespace) -> None:
    """What `generate` and `capture` can refuse from the flags alone (one line each), before any model loads."""
    from toolkit.device import check_device
    from toolkit.errors import ToolkitError
    from toolkit.models.registry import get_spec

    check_device(args.device)
    check_attention_argument(args)  # --frames, --local-attn-size and --sink-size too
    if args.prompt is not None and not args.prompt.strip():
        raise ToolkitError(f"--prompt is empty; leave it out to use {args.model}'s default prompt "
                           f"({get_spec(args.model).default_prompt!r})")
    # the registry model's prompt grammar; a --diffusers pipeline reads text, and a prompt set checks its own lines
    if args.prompt is not None and not getattr(args, "diffusers", None) and getattr(args, "prompts", None) is None:
        check_prompts(args.model, [args.prompt])


def check_prompts(model: str, prompts: list[str]) -> None:
    """Prompts a model cannot read, refused before it loads: the bundled model's toy grammar (a umT5 model reads any
    text)."""
    from toolkit.models.registry import get_spec

    if get_spec(model).conditioning == "toy":
        from toolkit.models.bundled.data import parse_prompt

        for prompt in prompts:
            parse_prompt(prompt)


def sampling_options(args: argparse.Namespace) -> dict:
    """``prepare_run``'s clip-length and rolling-cache options from the flags (only those given)."""
    names = ("frames", "local_attn_size", "sink_size")
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def check_attention_argument(args: argparse.Namespace) -> None:
    """Refuse an ``--attention`` rule naming a layer, step, chunk or head the run does not have, from the registry's
    layout with the run's ``--frames`` and rolling cache (no weights; impossible values of those are refused here
    too); with ``--checkpoint`` its config may differ, so sizes are checked once it loads."""
    from toolkit.attention.backends import check_attention
    from toolkit.models.registry import get_spec
    from toolkit.pipeline import sampling_settings, spec_layout

    sampling_settings(get_spec(args.model), attention=args.attention, **sampling_options(args))
    check_attention(args.attention, spec_layout(args.model, **sampling_options(args)) if args.checkpoint is None
                    else None)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``generate`` and ``capture``: which model, prompt, seed, device, attention backend."""
    g = p.add_argument_group("model and sampling")
    g.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODELS),
                   help=f"model to run (default: {DEFAULT_MODEL}, ships with the toolkit and runs on a laptop CPU)")
    g.add_argument("--checkpoint", metavar="PATH",
                   help="weights file or folder (default: look in the env var, the Hugging Face cache, local dirs; "
                        "`toolkit models` shows where)")
    g.add_argument("--prompt", help="text prompt; the bundled model takes toy prompts such as "
                                    "'2 sprites: red circle, blue square; pan left'")
    g.add_argument("--prompt-embeds", metavar="FILE",
                   help="precomputed umT5 embeddings (safetensors / .pt, [L, 4096]); skips the text encoder")
    g.add_argument("--seed", type=seed_type, default=0,
                   help="seed of the initial and re-noising noise, a 64-bit integer (default 0)")
    g.add_argument("--noise", choices=("toolkit", "official"), default="toolkit",
                   help="how noise is drawn: 'toolkit' (default) float32 [b c f h w] from a generator of the run's "
                        "own, independent of global random state; 'official' as the released Self-Forcing code after "
                        "set_seed(seed) ([b f c h w] in the model dtype, re-noise [(b f) c h w] from the global "
                        "generator), so a seed gives the official code's video on the same GPU")
    g.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1 ...")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--attention", default="dense", metavar="RULE[+RULE...]",
                   help="self-attention: 'dense' (SDPA) or 'monarch[:F,H,W]' (zero-shot MonarchAttention, T=1, "
                        "tiling f_tied,h_reduce,w_reduce) everywhere, or rules BACKEND[@KEY=LIST...] joined by '+', "
                        "KEY one of layers, steps, heads, chunks, LIST e.g. 0,3,8-10 (steps also: clean): per call "
                        "and head the first matching rule computes it, unmatched ones are dense; e.g. "
                        "'dense@layers=0+monarch:1,2,1@steps=0-1@heads=0-3+monarch' (default: dense)")
    g.add_argument("--frames", type=int, metavar="N",
                   help="latent frames of the clip (default: the model's, e.g. 21 for self-forcing); a causal model "
                        "takes whole chunks; beyond what it was trained on, add --local-attn-size")
    g.add_argument("--local-attn-size", type=int, metavar="FRAMES",
                   help="causal models: rolling KV cache, each chunk attends at most FRAMES latent frames (the sink "
                        "and the most recent ones), as Self-Forcing's local_attn_size (default -1: every earlier "
                        "frame)")
    g.add_argument("--sink-size", type=int, metavar="FRAMES",
                   help="with --local-attn-size: the first FRAMES frames stay in the rolling cache (attention "
                        "sink, Self-Forcing's sink_size; default 0)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        epilog=(
            'examples:\n'
            "  toolkit generate --out out/gen       the bundled model's default prompt, on a laptop CPU\n"
            '  toolkit generate --prompt "2 sprites: red circle, blue square; pan left" --seed 3 --out out/gen2\n'
            '  toolkit generate --attention monarch:3,1,1 --out out/gen_m    MonarchAttention (T = 1) at every seam\n'
            '  toolkit generate --model self-forcing --prompt "a fox runs through snow" --out out/sf\n'
            '      (its weights: see toolkit models)\n'
        ),
        help="sample a video from a model",
        description="Sample a video. Self-Forcing: 7 chunks x (4 denoising steps + clean pass) with a KV cache; "
                    "Wan2.1: bidirectional flow matching with classifier-free guidance; bundled: the Self-Forcing "
                    "loop on the small procedural-video model. Writes a PNG strip + GIF (bundled) or mp4 / latents.",
    )
    add_run_arguments(p)
    p.add_argument("--out", default="out/generate",
                   help="output folder (default: out/generate); a video or run.json already there is kept unless "
                        "--force")
    p.add_argument("--force", action="store_true",
                   help="replace the video / latents / run.json of an earlier run in --out (refused without it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import time
    from pathlib import Path

    from toolkit.errors import check_output, prepare_output_dir
    from toolkit.pipeline import prepare_run, sample, save_outputs

    check_run_arguments(args)  # a bad --attention too: refused before loading anything
    note = check_output(args.out, force=args.force, folder=True, outputs=GENERATE_OUTPUTS)
    if note:
        print(f"toolkit generate: {note}", file=sys.stderr)
    t0 = time.perf_counter()
    r = prepare_run(args.model, prompt=args.prompt, prompt_embeds=args.prompt_embeds, seed=args.seed,
                    checkpoint=args.checkpoint, device=args.device, dtype=args.dtype, attention=args.attention,
                    noise=args.noise, **sampling_options(args))
    prepare_output_dir(args.out, folder=True)  # a read-only --out fails now, not after sampling
    latents = sample(r, progress=not args.quiet, video_only=True)
    if args.force:  # an earlier run's files (e.g. its mp4 where this run writes a GIF) must not outlive it
        for name in GENERATE_OUTPUTS:
            (Path(args.out) / name).unlink(missing_ok=True)
    paths = save_outputs(r, latents, args.out)
    if not args.quiet:
        print(f"{r.name}: {r.prompt!r} seed {r.seed} on {r.device} in {time.perf_counter() - t0:.1f} s")
        for path in paths:
            print(f"  wrote {path}")
    return 0
