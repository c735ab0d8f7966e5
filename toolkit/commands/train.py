"""`toolkit train`: train the bundled model with Self-Forcing's recipe (base, teacher → ODE init → Self-Forcing/DMD)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import replace

from toolkit.commands.generate import seed_type
from toolkit.errors import ToolkitError
from toolkit.models.bundled import DEFAULT_DIR, data, tiny_config
from toolkit.models.bundled.config import STAGES, bundled_config, teacher_config, tiny_teacher_config
from toolkit.models.bundled.finetune import OBJECTIVES, FinetuneSettings
from toolkit.models.bundled.ode_init import ODE_STARTS
from toolkit.models.bundled.recipe import Recipe, train_bundled, with_places
from toolkit.models.bundled.self_forcing import SF_STARTS
from toolkit.models.bundled.teacher import TeacherSettings
from toolkit.models.wan import PREDICTIONS, WanConfig


def _stages(text: str) -> tuple[str, ...]:
    stages = tuple(s.strip().replace("-", "_") for s in text.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {', '.join(bad) or '(none)'}; choose from "
                                         f"{', '.join(STAGES)}")
    return stages


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1]")
    return value


def _student_size(text: str) -> dict:
    """``LAYERSxWIDTH[/HEADS]`` (e.g. ``6x256``, ``8x160/4``) -> bundled_config overrides; FFN = 4 × width."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*(?:/\s*(\d+))?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not LAYERSxWIDTH[/HEADS], e.g. 6x256 or 6x256/4")
    layers, width, heads = int(m.group(1)), int(m.group(2)), int(m.group(3) or 4)
    size = dict(num_layers=layers, dim=width, ffn_dim=4 * width, num_heads=heads)
    try:
        bundled_config(**size)
    except ToolkitError as err:  # the config's own check (heads divide the width into even head dims, bounds)
        raise argparse.ArgumentTypeError(f"{text}: {err}") from None
    return size


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = Recipe()
    p = subparsers.add_parser(
        "train",
        help="train the bundled model (its recipe; data/bundled took about an hour of training on one H200)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""Train the bundled Wan DiT on procedural sprite videos the way Self-Forcing was made:
  base              the shipped architecture pretrained by flow matching (the student's starting point)
  (a) teacher       a 5x larger block-causal flow-matching model, sampled with 40 Euler steps
  (b) ode_init      the causal 4-step student regresses the teacher's ODE solutions
  (c) self_forcing  the student rolls itself out with the KV cache; DMD against the teacher
then evaluate (b) and (b)+(c) on held-out prompts and ship the better one: model.safetensors, config.json,
MODEL_CARD.md, train_log.json, curves.png, rollout.png/gif, stages/*.safetensors.

Refuses to write into a folder that already holds a model unless --force.

examples:
  toolkit train --out runs/bundled                       all four stages (what data/bundled ships)
  toolkit train --out runs/bundled --stages base,teacher then: --stages ode_init,self_forcing
  toolkit train --tiny --out /tmp/tiny                   a CPU smoke run of every stage (seconds)
  toolkit train --out DIR --widen 2 --force              the student stages in DIR, 2x as wide, same function
  toolkit train --out DIR --stages self_forcing --sf-start self_forcing --sf-resume --force
                                                         stage (c) resumed where its last run stopped

defaults: base {defaults.base.steps} steps x {defaults.base.batch}; teacher {defaults.teacher.steps} steps x \
{defaults.teacher.batch}; ODE pool {defaults.ode_init.pairs} pairs, {defaults.ode_init.steps} x \
{defaults.ode_init.batch};
Self-Forcing {defaults.self_forcing.steps} generator updates x \
{defaults.self_forcing.batch} (critic ratio {defaults.self_forcing.critic_ratio}).""",
    )
    p.add_argument("--out", default=str(DEFAULT_DIR),
                   help="output folder (default: data/bundled of the repository); one holding a model is refused "
                        "unless --force")
    p.add_argument("--stages", type=_stages, default=STAGES, metavar="LIST",
                   help="comma-separated stages to run, in order (default: all); later stages load earlier ones "
                        "from --out/stages/")
    p.add_argument("--force", action="store_true",
                   help="replace a model (or the stages asked for) already in --out; later stages continue from "
                        "earlier ones in --out/stages/ without it")
    p.add_argument("--seed", type=seed_type, default=0, help="seed of data, initialisation and sampling (64-bit)")
    p.add_argument("--student-size", type=_student_size, default=None, metavar="LxW[/H]",
                   help="the student's architecture for the base stage: layers x width (heads, default 4; FFN 4 x "
                        "width), e.g. 6x256; default the shipped 6x160/4. Later stages take it from "
                        "--out/stages/base.safetensors")
    p.add_argument("--widen", type=int, default=None, metavar="F",
                   help="only widen: replace the student stages in --out/stages (base, ode_init, self_forcing) by "
                        "copies F x as wide (width, FFN and heads; head dim kept) that compute the same function, "
                        "then stop (needs --force); continue them with e.g. --stages self_forcing --sf-start "
                        "self_forcing --force (toolkit/models/bundled/grow.py)")
    p.add_argument("--base-steps", type=int, default=defaults.base.steps)
    p.add_argument("--base-batch", type=int, default=defaults.base.batch)
    p.add_argument("--base-lr", type=float, default=defaults.base.lr)
    p.add_argument("--base-seconds", type=float, default=None, metavar="S",
                   help="time budget of the base stage (as --teacher-seconds)")
    p.add_argument("--teacher-steps", type=int, default=defaults.teacher.steps)
    p.add_argument("--teacher-batch", type=int, default=defaults.teacher.batch)
    p.add_argument("--teacher-lr", type=float, default=defaults.teacher.lr)
    p.add_argument("--teacher-seconds", type=float, default=None, metavar="S",
                   help="time budget of stage (a): after 20 timed steps, train only the steps that fit (the cosine "
                        "schedule spans them); the card records the steps run")
    p.add_argument("--teacher-prediction", choices=PREDICTIONS, default=teacher_config().prediction,
                   help="what the teacher's head outputs: flow (v = noise - clean, as Wan) or x0 (the clean clip; "
                        "the model still returns the flow it implies); docs/bundled-model.md compares them")
    p.add_argument("--ode-pairs", type=int, default=defaults.ode_init.pairs, help="teacher ODE trajectories")
    p.add_argument("--ode-pair-batch", type=int, default=defaults.ode_init.pair_batch,
                   help="trajectories solved together (GPU memory: about 40 MB each)")
    p.add_argument("--ode-grid", type=int, default=defaults.ode_init.grid_steps, metavar="N",
                   help="the teacher's Euler steps per chunk for the pairs (a multiple of 4 dividing 1000)")
    p.add_argument("--ode-steps", type=int, default=defaults.ode_init.steps)
    p.add_argument("--ode-batch", type=int, default=defaults.ode_init.batch)
    p.add_argument("--ode-lr", type=float, default=defaults.ode_init.lr)
    p.add_argument("--ode-seconds", type=float, default=None, metavar="S",
                   help="time budget of the regression of stage (b), pool not counted (as --teacher-seconds)")
    p.add_argument("--ode-keep-prompted", action="store_true",
                   help="pool only the teacher trajectories whose clip shows the prompt's colours and sprite count "
                        "(the sprite evaluator's match); --ode-pairs are drawn, fewer kept")
    p.add_argument("--ode-start", choices=ODE_STARTS, default=defaults.ode_init.start,
                   help="the student's starting weights in stage (b): base; ode_init to train the stage-(b) "
                        "student already in --out/stages further; self_forcing to start a second round from the "
                        "stage-(c) student there, e.g. on pairs of a teacher trained longer since (both with "
                        "--stages ode_init[,self_forcing] and --force; another --seed draws new pairs)")
    p.add_argument("--sf-start", choices=SF_STARTS, default=defaults.self_forcing.start,
                   help="the student's starting weights in stage (c): ode_init, or self_forcing to train the "
                        "stage-(c) student already in --out/stages further, e.g. against a teacher trained longer "
                        "since (with --stages self_forcing and --force; a fresh critic from that teacher)")
    p.add_argument("--sf-resume", action="store_true",
                   help="with --sf-start self_forcing: continue the earlier stage-(c) run exactly where it stopped "
                        "(its critic, both optimisers' moments, the live weights, the EMA and the random streams, "
                        "from --out/stages/self_forcing_state.pt, which every stage-(c) run leaves), so one long run "
                        "can be split over processes")
    p.add_argument("--sf-steps", type=int, default=defaults.self_forcing.steps, help="Self-Forcing generator updates")
    p.add_argument("--sf-batch", type=int, default=defaults.self_forcing.batch)
    p.add_argument("--sf-lr", type=float, default=defaults.self_forcing.lr,
                   help="the student's learning rate in stage (c) (AdamW, β1 = 0, constant)")
    p.add_argument("--sf-critic-lr", type=float, default=defaults.self_forcing.critic_lr,
                   help="the critic's (DMD's fake score's) learning rate")
    p.add_argument("--sf-critic-ratio", type=int, default=defaults.self_forcing.critic_ratio, metavar="K",
                   help="critic updates per generator update (the two time-scale rule)")
    p.add_argument("--sf-seconds", type=float, default=None, metavar="S",
                   help="time budget of stage (c) (as --teacher-seconds)")
    p.add_argument("--sf-min-sprites", type=int, default=defaults.self_forcing.min_sprites,
                   choices=range(1, data.MAX_SPRITES + 1), metavar="N",
                   help=f"stage (c)'s rollouts from prompts of N..{data.MAX_SPRITES} sprites only (default 1: every "
                        "count), to train a student further where it trails the teacher: crowded prompts")
    p.add_argument("--guidance", type=float, default=None, metavar="G",
                   help="the teacher's classifier-free guidance in the ODE pairs, DMD's real score and its own "
                        "samples (default: the best of " + ", ".join(f"{g:g}" for g in defaults.guidance_candidates)
                        + " on validation prompts, chosen after stage (a))")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only where the noise level σ is in [LO, HI] (sampler steps, DMD's noise levels) and "
                        "take the conditional flow elsewhere, e.g. 0 0.8: the layout, set at high σ, unguided "
                        "(default: every σ); kept in the folder's record for later stages")
    p.add_argument("--placed", type=_fraction, default=defaults.placed, metavar="P",
                   help="fraction of every stage's training prompts that name where each sprite starts, e.g. 'red "
                        "circle top-left' (default 0: none); above 0 the validation and evaluation prompts name "
                        "places too")
    p.add_argument("--eval-prompts", type=int, default=defaults.eval_prompts)
    p.add_argument("--eval-seeds", type=int, default=defaults.eval_seeds,
                   help="noise seeds per held-out prompt (the first is the one-seed evaluation's); each candidate is "
                        "also compared with the first clip by clip (gained / lost clips, sign test)")
    f = p.add_argument_group(
        "finetuning with another attention (--finetune)",
        "Continue training a bundled model with --attention at every seam (gradients through the Triton Monarch "
        "op's backward kernels on a GPU, through the PyTorch references elsewhere): the paper's finetuning with "
        "Monarch attention, at toy scale (toolkit/models/bundled/finetune.py). Writes --out/model.safetensors, "
        "config.json, finetune_log.json. "
        "Example: toolkit train --finetune --attention monarch:3,1,1 --out runs/ft_311",
    )
    f.add_argument("--finetune", action="store_true", help="finetune instead of running the recipe's stages")
    f.add_argument("--attention", metavar="SPEC",
                   help="what every seam computes while finetuning: an --attention spec of toolkit generate "
                        "(monarch:F,H,W[:T=N], monarch-contiguous:B1,B2, a family, rules with @)")
    f.add_argument("--from", dest="source", default=None, metavar="DIR",
                   help="the model folder to start from (default: the shipped data/bundled)")
    f.add_argument("--objective", default=FinetuneSettings.objective, choices=OBJECTIVES,
                   help="distill: regress onto the dense model's predictions along the student's own rollout "
                        "(no teacher needed; default); self_forcing: stage (c), DMD against --teacher")
    f.add_argument("--teacher", metavar="FILE",
                   help="teacher weights for --objective self_forcing: data/teacher/teacher.safetensors, or "
                        "stages/teacher.safetensors of a recipe run")
    f.add_argument("--ft-steps", type=int, default=None,
                   help=f"student updates (default {FinetuneSettings.steps}; {TINY_FT_STEPS} with --tiny)")
    f.add_argument("--ft-batch", type=int, default=FinetuneSettings.batch)
    f.add_argument("--ft-lr", type=float, default=FinetuneSettings.lr)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--tiny", action="store_true",
                   help="tiny model, clip and step counts: CPU smoke run only (the stage size flags do not apply)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run, stage_defaults={name: p.get_default(name) for name in STAGE_FLAGS})


TINY_FT_STEPS = 4  # --finetune --tiny: a smoke run

# Each stage's size flags: positive, and fixed by --tiny (which is refused with any of them changed).
STAGE_FLAGS = (
    "base_steps", "base_batch", "base_lr", "base_seconds",
    "teacher_steps", "teacher_batch", "teacher_lr", "teacher_seconds",
    "ode_pairs", "ode_pair_batch", "ode_steps", "ode_batch", "ode_lr", "ode_seconds",
    "sf_steps", "sf_batch", "sf_lr", "sf_critic_lr", "sf_critic_ratio", "sf_seconds",
)


def check_stage_flags(args: argparse.Namespace) -> None:
    """One line for a stage flag that is not positive, or one that --tiny would silently replace."""
    for name in STAGE_FLAGS:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ToolkitError(f"--{name.replace('_', '-')} {value}: must be positive")
    if args.tiny:
        changed = [name for name in STAGE_FLAGS if getattr(args, name) != args.stage_defaults[name]]
        if changed:
            raise ToolkitError(f"--tiny fixes every stage's size and steps; leave out "
                               f"{', '.join('--' + n.replace('_', '-') for n in changed)}")


def recipe_from(args: argparse.Namespace) -> Recipe:
    r = Recipe()
    recipe = Recipe(
        base=replace(r.base, steps=args.base_steps, batch=args.base_batch, lr=args.base_lr, seconds=args.base_seconds),
        teacher=replace(r.teacher, steps=args.teacher_steps, batch=args.teacher_batch, lr=args.teacher_lr,
                        seconds=args.teacher_seconds),
        ode_init=replace(r.ode_init, pairs=args.ode_pairs, pair_batch=args.ode_pair_batch, grid_steps=args.ode_grid,
                         steps=args.ode_steps, batch=args.ode_batch, lr=args.ode_lr, seconds=args.ode_seconds,
                         keep_prompted=args.ode_keep_prompted, start=args.ode_start),
        self_forcing=replace(r.self_forcing, steps=args.sf_steps, batch=args.sf_batch, lr=args.sf_lr,
                             critic_lr=args.sf_critic_lr, critic_ratio=args.sf_critic_ratio,
                             seconds=args.sf_seconds, start=args.sf_start, resume=args.sf_resume,
                             min_sprites=args.sf_min_sprites),
        guidance_scale=args.guidance,
        guidance_interval=args.guidance_interval and tuple(args.guidance_interval),
        seed=args.seed,
        eval_prompts=args.eval_prompts,
        eval_seeds=args.eval_seeds,
    )
    if args.tiny:
        recipe = Recipe(
            base=TeacherSettings(steps=6, batch=2, warmup=2),
            teacher=TeacherSettings(steps=6, batch=2, warmup=2),
            ode_init=replace(r.ode_init, pairs=4, pair_batch=4, steps=4, batch=2, warmup=2, start=args.ode_start),
            self_forcing=replace(r.self_forcing, steps=2, batch=2, critic_ratio=1, start=args.sf_start,
                                 resume=args.sf_resume, min_sprites=args.sf_min_sprites),
            guidance_scale=args.guidance,
            guidance_interval=args.guidance_interval and tuple(args.guidance_interval),
            guidance_candidates=(1.0, 3.0),
            validation_prompts=2,
            seed=args.seed,
            eval_prompts=4,
            eval_seeds=args.eval_seeds,
        )
    return with_places(recipe, args.placed)


def run_finetune(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    """``--finetune``: everything checked (spec, folders, teacher) before the model trains."""
    from pathlib import Path

    import torch

    from toolkit.attention.backends import backend_for, check_attention
    from toolkit.device import resolve_device
    from toolkit.errors import prepare_output_dir
    from toolkit.models.bundled import WEIGHTS_FILE, load_bundled
    from toolkit.models.bundled.finetune import save_finetuned, train_finetune
    from toolkit.models.bundled.model import load_weights
    from toolkit.models.bundled.recipe import refuse_overwrite
    from toolkit.models.wan import WanModel

    if not args.attention:
        raise ToolkitError("--finetune needs --attention SPEC (e.g. monarch:3,1,1)")
    check_attention(args.attention)  # the grammar, before anything loads
    if args.objective == "self_forcing" and not args.teacher:
        raise ToolkitError("--objective self_forcing needs --teacher FILE (data/teacher/teacher.safetensors, or "
                           "stages/teacher.safetensors of a `toolkit train --stages teacher` run)")
    if args.teacher and not Path(args.teacher).is_file():
        raise ToolkitError(f"--teacher {args.teacher}: no such file")
    if args.ft_steps is None:
        args.ft_steps = TINY_FT_STEPS if args.tiny else FinetuneSettings.steps
    if min(args.ft_steps, args.ft_batch) < 1 or not args.ft_lr > 0:
        raise ToolkitError("--ft-steps and --ft-batch must be >= 1 and --ft-lr > 0")
    if args.tiny and args.source is not None:
        raise ToolkitError("--tiny finetunes a random tiny model; leave out --from")
    if args.source is not None and not Path(args.source).is_dir():
        raise ToolkitError(f"--from {args.source}: no such model folder")
    out = Path(args.out)
    if (out / "train_log.json").exists():  # replacing only the weights would leave the card describing others
        raise ToolkitError(f"{out} holds a recipe's model with its card and stages; finetune into another --out")
    refuse_overwrite(out, [out / WEIGHTS_FILE], args.force)
    dev = resolve_device(args.device)
    if args.tiny:
        torch.manual_seed(args.seed)
        model, source = WanModel(tiny_config()).to(dev).eval(), "random init (tiny)"
    else:
        model, info = load_bundled(dev, path=args.source)
        source = info["path"]
    check_attention(args.attention, num_layers=model.cfg.num_layers, num_heads=model.cfg.num_heads)
    teacher = load_weights(args.teacher, None, dev) if args.teacher else None
    prepare_output_dir(args.out, folder=True, keep=True)
    settings = FinetuneSettings(objective=args.objective, steps=args.ft_steps, batch=args.ft_batch, lr=args.ft_lr)
    backend = backend_for(args.attention, dev)
    student, record = train_finetune(model, settings, backend, teacher=teacher, seed=args.seed, log=log)
    record.update(attention=args.attention, source=source, seed=args.seed, device=str(dev))
    save_finetuned(out, student, record)
    log(f"wrote {out} (sample it with --checkpoint {out} --attention {args.attention})")
    return 0


def student_config(args: argparse.Namespace) -> WanConfig | None:
    """The base stage's architecture from --tiny and --student-size (None: the shipped one)."""
    size = args.student_size or {}
    if args.tiny:
        return tiny_config(**size)
    return bundled_config(**size) if size else None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from toolkit.device import check_device
    from toolkit.errors import check_output, prepare_output_dir
    from toolkit.models.bundled.config import WEIGHTS_FILE
    from toolkit.models.bundled.ode_init import ode_grid
    from toolkit.models.bundled.recipe import check_output as check_model_output
    from toolkit.models.bundled.recipe import stage_path, widen_students

    if args.device is not None:
        check_device(args.device)
    check_output(args.out, folder=True)  # a file, a folder under a file, an unwritable place: one line
    log = (lambda *_: None) if args.quiet else (lambda m: print(m, flush=True))
    if args.finetune:
        return run_finetune(args, log)
    if args.attention:
        raise ToolkitError("--attention is for --finetune; the recipe's stages train with dense attention")
    if args.widen is not None:
        if args.widen < 2:
            raise ToolkitError(f"--widen {args.widen}: the factor is an integer >= 2")
        if args.student_size:
            raise ToolkitError("--widen takes the size from the stages in --out; leave out --student-size")
        widen_students(args.out, args.widen, seed=args.seed, force=args.force, log=log)
        return 0
    if args.eval_prompts < 1 or args.eval_seeds < 1:
        raise ToolkitError("--eval-prompts and --eval-seeds must be >= 1")
    if args.guidance_interval and not 0 <= args.guidance_interval[0] <= args.guidance_interval[1]:
        raise ToolkitError("--guidance-interval LO HI: noise levels with 0 <= LO <= HI (σ is 1 at pure noise)")
    check_stage_flags(args)
    if args.student_size and "base" not in args.stages:
        raise ToolkitError("--student-size sets the base stage's architecture (later stages take it from "
                           "stages/base.safetensors): add base to --stages")
    try:
        ode_grid(args.ode_grid)
    except ValueError as err:
        raise ToolkitError(f"--ode-grid {args.ode_grid}: {err}") from None
    # a model there: refused unless --force
    check_model_output(args.out, args.stages, args.force, args.ode_start, args.sf_start, args.sf_resume)
    prepare_output_dir(args.out, folder=True, keep=False)  # read-only or uncreatable: now, not after a stage
    out = Path(args.out)
    if args.force and any(p.exists() for p in [out / WEIGHTS_FILE, *(stage_path(out, s) for s in args.stages)]):
        print(f"toolkit train: replacing {args.out} (--force)", file=sys.stderr)
    record = train_bundled(
        args.out, recipe_from(args), stages=args.stages, cfg=student_config(args),
        teacher_cfg=(tiny_teacher_config if args.tiny else teacher_config)(prediction=args.teacher_prediction),
        device=args.device, force=args.force, log=log,
    )
    if not args.quiet:  # the card and train_log.json in --out hold the same
        print(json.dumps({k: record[k] for k in ("shipped", "evaluation") if k in record}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m toolkit.commands.train``: the same as ``toolkit train`` without loading the other commands."""
    from toolkit.commands import OneLineParser
    from toolkit.errors import ToolkitError

    parser = OneLineParser(prog="toolkit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except ToolkitError as err:  # one line, exit 2, as `toolkit train`
        print(f"toolkit train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
