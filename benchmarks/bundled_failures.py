"""Where the shipped bundled model's prompts fail: per prompted sprite count, how many rollouts match the prompt's
colours, and whether a failure is a prompted colour missing or an unprompted one added (and the count too low or
too high), by the sprite evaluator (``toolkit/models/bundled/evaluate.py``).

    python benchmarks/bundled_failures.py --prompts 32 --out benchmarks/results/bundled_training_h200/
    python benchmarks/bundled_failures.py --prompts 64 --weights DIR/stages/self_forcing.safetensors --name wide
    python benchmarks/bundled_failures.py --prompts 64 --weights data/teacher/teacher.safetensors --teacher-cfg 2 \
        --name teacher

The first ``--prompts`` held-out prompts (``evaluate.heldout_prompts``), one rollout each from the held-out noise
seed (``--seeds K``: from each of the first K held-out seeds, ``evaluate.heldout_seeds``), float32 on the CPU (about
19 s a rollout on 2 cores). One noise draw serves a batch, so a clip's noise depends on ``--batch`` too (default 8):
compare runs made with the same batch. ``--weights``: a stage file of a recipe folder (its own
config) instead of the shipped model; ``--teacher-cfg G`` samples it with the teacher's sampler instead of the
student's 4 steps (40 Euler steps, classifier-free guidance G: ``teacher.teacher_sampler``; ``--teacher-steps N``:
N uniform steps instead; ``--cfg-interval LO HI``: guidance only at the steps with σ in [LO, HI]; ``--teacher-eta
E``: DDIM's stochastic step with eta E, ``solver="ancestral"``, instead of Euler's; ``--guide WEIGHTS
--guide-scale W``: autoguidance by a weaker model, v_g + W·(v − v_g), beside the classifier-free guidance;
``--leave-one-out``: guidance against the prompt with each sprite left out in turn instead of the null prompt).
``--placed``: the same held-out prompts with a start place named for each sprite (the summary then has
``place_match``).
Prints the table and writes ``bundled_failures_cpu[_NAME].json``; ``--strip N`` also draws the first N rollouts of
three or more sprites, each under its prompt's ground truth, as ``bundled_failures[_NAME].png``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

import torch
from timing import cpu_model, write_result

from toolkit.models import bundled
from toolkit.models.bundled import data, evaluate
from toolkit.models.bundled.config import clip_shape, frames_per_chunk
from toolkit.models.bundled.model import load_weights
from toolkit.models.bundled.pictures import save_strip
from toolkit.models.bundled.teacher import teacher_sampler

COLUMNS = ("clips", "colour_match", "missing_any", "extra_any", "missing", "extra", "count_low", "count_high")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=32, help="first N held-out prompts (default 32)")
    p.add_argument("--batch", type=int, default=8, help="rollouts generated together")
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--weights", type=Path, default=None, help="a stage file (default: the shipped model)")
    p.add_argument("--name", default="", help="suffix of the JSON's name")
    p.add_argument("--device", default="cpu", help="where the rollouts run, float32 (default cpu)")
    p.add_argument("--teacher-cfg", type=float, default=None, metavar="G",
                   help="sample with the teacher's 40 Euler steps at classifier-free guidance G")
    p.add_argument("--teacher-steps", type=int, default=None, metavar="N",
                   help="with --teacher-cfg: N uniform steps instead of 40")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="with --teacher-cfg: guide only the steps with σ in [LO, HI], the conditional flow elsewhere")
    p.add_argument("--teacher-eta", type=float, default=None, metavar="E",
                   help="with --teacher-cfg: sample stochastically (DDIM's step with eta E in [0, 1]; 1: the DDPM "
                        "posterior) instead of the Euler ODE")
    p.add_argument("--guide", type=Path, default=None, metavar="WEIGHTS",
                   help="with --teacher-cfg and --guide-scale: autoguidance by this weaker model (a stage file, e.g. "
                        "an earlier teacher)")
    p.add_argument("--guide-scale", type=float, default=None, metavar="W",
                   help="autoguidance weight: the flow becomes v_g + W·(v − v_g) (W = 1: the model alone)")
    p.add_argument("--leave-one-out", action="store_true",
                   help="with --teacher-cfg: guide against the prompt with each sprite left out in turn, "
                        "v_c + (G − 1)·Σ_j (v_c − v_j), instead of against the null prompt")
    p.add_argument("--placed", action="store_true",
                   help="the held-out prompts with a start place named for each sprite (evaluate.heldout_prompts)")
    p.add_argument("--seeds", type=int, default=1, metavar="K", help="noise seeds per prompt (default 1)")
    p.add_argument("--strip", type=int, default=0, metavar="N",
                   help="draw the first N rollouts of 3+ sprites under their ground truth (default 0: none)")
    args = p.parse_args()
    if args.seeds < 1 or args.prompts < 1:
        p.error("--seeds and --prompts must be >= 1")
    sampler = {} if args.teacher_cfg is None else teacher_sampler(args.teacher_cfg)
    if args.teacher_steps is not None:
        if not sampler or not 1 <= args.teacher_steps <= 1000:
            p.error("--teacher-steps needs --teacher-cfg and a step count in 1..1000")
        n = args.teacher_steps  # 40: MANY_STEPS
        sampler["denoising_steps"] = tuple(round(1000 * (1 - k / n)) for k in range(n))
    if args.cfg_interval is not None:
        lo, hi = args.cfg_interval
        if not sampler or not 0 <= lo <= hi:
            p.error("--cfg-interval needs --teacher-cfg and 0 <= LO <= HI")
        sampler["guidance_interval"] = (lo, hi)
    if args.teacher_eta is not None:
        if not sampler or not 0 <= args.teacher_eta <= 1:
            p.error("--teacher-eta needs --teacher-cfg and 0 <= E <= 1")
        sampler.update(solver="ancestral", eta=args.teacher_eta)
    if args.leave_one_out:
        if not sampler:
            p.error("--leave-one-out needs --teacher-cfg")
        sampler["negatives"] = "leave_one_out"
    if (args.guide is None) != (args.guide_scale is None) or (args.guide is not None and not sampler):
        p.error("--guide and --guide-scale go together, with --teacher-cfg")
    if args.guide is not None and not args.guide.is_file():
        p.error(f"--guide {args.guide}: no such file")

    options = dict(sampler)  # generate's arguments; the record names the guide by its path
    if args.guide is not None:
        sampler.update(guide=short_path(str(args.guide)), guide_scale=args.guide_scale)
        options.update(guide=load_weights(args.guide, None, args.device).float().eval(), guide_scale=args.guide_scale)
    if args.weights is None:
        model, info = bundled.load_bundled(args.device, torch.float32)
        weights = info["path"]
    else:
        model, weights = load_weights(args.weights, None, args.device).float().eval(), str(args.weights)
    seeds = evaluate.heldout_seeds(args.seeds)
    prompts = evaluate.heldout_prompts(64, placed=args.placed)[: args.prompts]
    suffix = "_" + args.name if args.name else ""
    start = time.perf_counter()
    metrics, crowded = [], []
    for done, seed in enumerate(seeds, 1):
        for i in range(0, len(prompts), args.batch):
            part = prompts[i : i + args.batch]
            video = bundled.generate(model, part, seed=seed, **options).float().cpu()
            metrics += evaluate.evaluate_clips(video, part)
            for prompt, clip, m in zip(part, video, metrics[-len(part):]):
                if len(prompt.sprites) >= 3 and len(crowded) < args.strip:
                    crowded.append((prompt, clip, m))
            print(f"seed {seed}: {i + len(part)}/{len(prompts)} rollouts ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        # written after every seed, so a run cut short keeps the seeds it finished
        result = dict(
            weights=weights, sampler=sampler or "the student's 4 steps", prompts=args.prompts,
            seed=seeds[0], seeds=seeds[:done], seeds_asked=len(seeds), batch=args.batch, dtype="float32",
            device=args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            cpu=cpu_model(), torch=torch.__version__,
            seconds=round(time.perf_counter() - start, 1),
            by_sprite_count=by_sprite_count(metrics, prompts * done),
            # per clip, seed-major: for sign tests between models scored on the same clips (evaluate.paired)
            colour_match_outcomes="".join(str(int(m.colour_match)) for m in metrics),
            placed=args.placed, summary=asdict(evaluate.summarise(metrics)),
        )
        write_result(args.out, f"bundled_failures_cpu{suffix}.json", result)
    print(f"{'sprites':>7} " + " ".join(f"{c:>12}" for c in COLUMNS))
    for n, r in result["by_sprite_count"].items():
        print(f"{n:>7} " + " ".join(f"{r[c]:>12}" for c in COLUMNS))
    summary = result["summary"]
    print(f"all {summary['clips']} clips: colour match {summary['colour_match']:.3f}, count match "
          f"{summary['count_match']:.3f}, score {summary['score']:.3f}"
          + (f", place match {summary['place_match']:.3f}" if summary["place_match"] is not None else ""))
    if crowded:
        save_crowded(crowded, model.cfg, args.out / f"bundled_failures{suffix}.png", weights, sampler)


def by_sprite_count(metrics: list, prompts: list) -> dict[str, dict[str, int]]:
    """Per prompted sprite count: clips, colour matches, and how the others fail (``COLUMNS``)."""
    rows: dict[int, Counter] = defaultdict(Counter)
    for m, prompt in zip(metrics, prompts, strict=True):
        wanted, found = {s.colour for s in prompt.sprites}, set(m.colours)
        r = rows[len(prompt.sprites)]
        r.update(clips=1, colour_match=int(m.colour_match), missing_any=int(bool(wanted - found)),
                 extra_any=int(bool(found - wanted)), missing=len(wanted - found), extra=len(found - wanted),
                 count_low=int(m.count < len(prompt.sprites)), count_high=int(m.count > len(prompt.sprites)))
    return {str(n): {c: r[c] for c in COLUMNS} for n, r in sorted(rows.items())}


def save_crowded(crowded: list, cfg, path: Path, weights: str, sampler: dict) -> None:
    """Each crowded rollout under a ground-truth clip of its prompt (render seed 0: another scene of the same
    prompt, for what the sprites should look like), labelled with what the evaluator found."""
    frames, height, width = clip_shape(cfg)
    prompts = [prompt for prompt, _, _ in crowded]
    truth = data.render(prompts, torch.Generator().manual_seed(0), frames=frames, height=height, width=width)
    rows, labels = [], []
    for (prompt, clip, m), real in zip(crowded, truth):
        rows += [real, clip.clamp(0, 1)]
        labels += [f"ground truth: {prompt}",
                   f"rollout: colours found {sorted(m.colours)}, count {m.count}, "
                   f"{'match' if m.colour_match else 'no match'}"]
    save_strip(rows, path, labels, frames_per_chunk=frames_per_chunk(cfg),
               title=f"{short_path(weights)} ({sampler_text(sampler)}): held-out prompts of 3+ sprites")


def sampler_text(sampler: dict | str) -> str:
    """How a result was sampled, as strips and tables name it: "4 steps" (the student's), "40 Euler steps, CFG 2",
    "40 ancestral (η = 1) steps, CFG 2", "... for σ in [LO, HI]", "... against each sprite left out",
    "..., autoguided by a/b/c.safetensors at 2"."""
    if not isinstance(sampler, dict) or not sampler:  # results record the student's as a sentence
        return "4 steps"
    solver = "Euler" if sampler.get("solver", "euler") == "euler" else f"ancestral (η = {sampler['eta']:g})"
    how = f"{len(sampler['denoising_steps'])} {solver} steps, CFG {sampler['guidance_scale']:g}"
    if sampler.get("guidance_interval"):
        how += " for σ in [{:g}, {:g}]".format(*sampler["guidance_interval"])
    if sampler.get("negatives") == "leave_one_out":
        how += " against each sprite left out"
    if sampler.get("guide"):
        how += f", autoguided by {sampler['guide']} at {sampler['guide_scale']:g}"
    return how


def short_path(weights: str) -> str:
    """The last three parts of a weights path (data/teacher/teacher.safetensors, d/stages/teacher.safetensors):
    enough to tell runs apart, without the machine's folders."""
    return "/".join(Path(weights).parts[-3:])


if __name__ == "__main__":
    main()
