"""What a trained folder ships beside its weights: ``config.json``, ``MODEL_CARD.md``, ``train_log.json``,
``curves.png`` and the showcase strip ``rollout.png``/``.gif`` — all written from the training record that
``recipe.train_bundled`` keeps, so every number on the card is one the run measured. Scripts that redraw the strip or
add a table to the card after training (``benchmarks/bundled_showcase.py``, ``benchmarks/compare_failures.py``) use
the same functions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from toolkit.models.bundled import data
from toolkit.models.bundled.config import (
    CONFIG_FILE,
    MANY_STEPS,
    STAGES,
    START_FLAGS,
    TEACHER_EVAL,
    WEIGHTS_FILE,
    clip_shape,
    frames_per_chunk,
)
from toolkit.models.bundled.model import generate, save_weights
from toolkit.models.bundled.pictures import save_gif, save_strip
from toolkit.models.bundled.teacher import TEACHER_SHIFT, Log, autocast, teacher_sampler
from toolkit.models.wan import WanConfig, WanModel

SHOWCASE_PROMPTS = (
    "1 sprite: red circle",
    "2 sprites: blue square, yellow triangle; pan left",
    "3 sprites: green diamond, magenta ring, white circle",
    "4 sprites: orange square, cyan triangle, red ring, blue circle; pan up",
)
# the same sprites with start places: the showcase of a model trained on prompts that name them (``showcase_prompts``)
SHOWCASE_PLACES = (("centre",), ("left", "right"), ("top-left", "top-right", "bottom"),
                   ("top-left", "top-right", "bottom-left", "bottom-right"))


def showcase_prompts(placed: bool = False) -> list[data.Prompt]:
    """``SHOWCASE_PROMPTS`` parsed, with ``SHOWCASE_PLACES`` named if ``placed``."""
    prompts = [data.parse_prompt(p) for p in SHOWCASE_PROMPTS]
    if not placed:
        return prompts
    return [data.placed_at(p, cells) for p, cells in zip(prompts, SHOWCASE_PLACES, strict=True)]


def guidance_of(record: dict) -> tuple[float, tuple[float, float] | None]:
    """(scale, interval or None) of the teacher's guidance a recipe folder's record holds."""
    interval = record["guidance"].get("interval")
    return record["guidance"]["scale"], None if interval is None else tuple(interval)


def cfg_label(scale: float, interval: tuple[float, float] | None = None) -> str:
    """"2", or "4 for σ in [0, 0.8]" for guidance in an interval."""
    return f"{scale:g}" + ("" if interval is None else " for σ in [{:g}, {:g}]".format(*interval))


# what the card and the log show of a summary: (key, column title, format)
SUMMARY_COLUMNS = (
    ("score", "score", "{:.0%}"),
    ("colour_match", "colours = prompt", "{:.0%}"),
    ("count_match", "count = prompt", "{:.0%}"),
    ("persistence", "persistence", "{:.0%}"),
    ("boundary_persistence", "at chunk starts", "{:.0%}"),
    ("within_jump", "jump in chunk (px/frame)", "{:.2f}"),
    ("boundary_jump", "jump at chunk boundary", "{:.2f}"),
    ("teleports", "clips with a teleport", "{:.0%}"),
    ("place_match", "sprites start in place", "{:.0%}"),
)


def format_summary(summary: dict, markdown: bool = False) -> str:
    cells = [("-" if summary.get(k) is None else fmt.format(summary[k])) for k, _, fmt in SUMMARY_COLUMNS]
    if markdown:
        return " | ".join(cells)
    return ", ".join(f"{title} {c}" for (_, title, _), c in zip(SUMMARY_COLUMNS, cells))


# What scripts add to a folder's record after training, about the weights then in it (a redrawn strip:
# bundled_showcase.py; a table of more clips: compare_failures.py --card); new weights drop them.
AFTER_TRAINING_NOTES = ("showcase", "clip_comparison")


def write_artifacts(out: Path, model: WanModel, teacher: WanModel, record: dict, log: Log) -> None:
    """model.safetensors + config.json first (nothing below may lose them), then pictures and the card."""
    cfg = model.cfg
    for key in AFTER_TRAINING_NOTES:  # e.g. carried in from a kept model's record: they describe other weights
        record.pop(key, None)
    # the stage whose weights these are ("self_forcing_start": stage (c)'s, before its continued run)
    save_weights(model, out / WEIGHTS_FILE, stage=record["shipped"].removesuffix("_start"))
    (out / CONFIG_FILE).write_text(json.dumps({**cfg.to_dict(), "training": _summary(record)}, indent=2) + "\n")
    (out / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")
    save_rollouts(out, model, teacher, *guidance_of(record), placed=bool(record.get("eval_placed")))
    plot_curves(out / "curves.png", record)
    (out / "MODEL_CARD.md").write_text(model_card(record, model))
    log(f"wrote {out}")


def save_rollouts(out: Path, model: WanModel, teacher: WanModel, guidance: float,
                  interval: tuple[float, float] | None = None, teacher_label: str = "teacher",
                  placed: bool = False) -> None:
    """``out``/rollout.png (the showcase prompts, with start places if ``placed``: ground truth, the 4-step
    ``model``, the 40-step ``teacher`` at CFG ``guidance``, in ``interval`` of σ if given) and rollout.gif (the
    second prompt's ground truth beside the model's rollout)."""
    label = f"{teacher_label}, {len(MANY_STEPS)} Euler steps, CFG {cfg_label(guidance, interval)}"
    truth, videos = save_showcase(out / "rollout.png", [
        ("bundled model, 4 steps (Self-Forcing loop)", model, {}),
        (label, teacher, teacher_sampler(guidance, interval)),
    ], placed=placed)
    save_gif(torch.cat([truth[1], videos[0][1]], dim=-1), out / "rollout.gif")


def showcase_truth(cfg: WanConfig, placed: bool = False) -> torch.Tensor:
    """Ground-truth clips of ``showcase_prompts(placed)`` (render seed 0): [4, 3, frames, height, width]."""
    frames, height, width = clip_shape(cfg)
    return data.render(showcase_prompts(placed), torch.Generator().manual_seed(0), frames=frames, height=height,
                       width=width)


def save_showcase(
    path: Path, samplers: list[tuple[str, WanModel, dict]], placed: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A strip of ``showcase_prompts(placed)``: per prompt the ground truth, then each (label, model, ``generate``
    options) sampled from seed 0; returns the ground truth and each sampler's videos."""
    prompts = showcase_prompts(placed)
    videos = []
    for _, model, sampler in samplers:
        with autocast(next(model.parameters()).device):
            videos.append(generate(model, prompts, seed=0, **sampler).float().cpu())
    truth = showcase_truth(samplers[0][1].cfg, placed)
    rows, labels = [], []
    for i, (p, clip) in enumerate(zip(prompts, truth)):
        rows.append(clip)
        labels.append(f"ground truth: {p}")
        for (label, _, _), video in zip(samplers, videos):
            rows.append(video[i])
            labels.append(f"{label}, seed 0: {p}")
    cfg = samplers[0][1].cfg
    chunk = frames_per_chunk(cfg)
    save_strip(rows, path, labels, frames_per_chunk=chunk,
               title=f"{clip_shape(cfg)[0] // chunk} chunks × {chunk} frames; same prompts, independent samples")
    return truth, videos


def _summary(record: dict) -> dict:
    keep = ("seed", "device", "torch", "precision", "shipped", "eval_prompts", "eval_seeds", "paired")
    out = {k: record[k] for k in keep if k in record}
    out["stages"] = {k: {x: v for x, v in s.items() if x != "curve"} for k, s in record["stages"].items()}
    out["evaluation"] = record.get("evaluation", {})
    return out


def showcase_note(record: dict) -> str:
    """A line under the rollout strip when it was redrawn after training (``benchmarks/bundled_showcase.py``
    records how in ``record["showcase"]``); empty for the strip the recipe drew."""
    s = record.get("showcase")
    if not s:
        return ""
    return (f"\nThe strip was redrawn after training at `{s['commit']}` by `benchmarks/bundled_showcase.py` "
            f"(on {s['device']}, {s['precision']}; the teacher's rows: {s['teacher']}), so its pixels differ a "
            "little from the training machine's rollouts of the same prompts and noise.\n")


def clip_comparison_text(record: dict) -> str:
    """The card's table of models scored on more held-out clips than the recipe's evaluation, each against the first
    clip by clip (``benchmarks/compare_failures.py --card`` writes ``record["clip_comparison"]``); empty without."""
    c = record.get("clip_comparison")
    if not c:
        return ""
    rows = []
    for r in c["rows"]:
        lo, hi = r["interval"]
        p = r.get("paired")
        against = "" if p is None else f"+{p['gained']} −{p['lost']} of {p['clips']} (p = {p['p_value']:.2g})"
        four = "-" if r["four_sprites"] is None else "{} / {}".format(*r["four_sprites"])
        rows.append(f"| {r['name']} | `{r['weights']}` | {r['sampler']} | {r['match']} / {r['clips']} "
                    f"({lo:.0%}–{hi:.0%}) | {four} | {r['count_low']} / {r['count_high']} | {against} |")
    return f"""
### Colour match on more clips

From `benchmarks/compare_failures.py --card` at `{c['commit']}` on the results in `{c['source']}`
(`benchmarks/bundled_failures.py`: the first held-out prompts × noise seeds, float32, on {', '.join(c['devices'])}).
Colour match with its 95 % Wilson interval; against the first row, on the clips both scored (same prompt, same
initial noise): the clips gained and lost and the exact sign test's p.

| model | weights | sampler | colour match | 4-sprite prompts | count too low / high | against {c['paired_with']} |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def wide_label(record: dict, stage: str, run: int) -> str:
    """", 2× wide" for run ``run`` of ``stage`` (0: its first run, then each continued one) if it trained student
    weights widened before it (``widen_students``); "" otherwise."""
    factor = math.prod(w["factor"] for w in record.get("widened", [])
                       if stage in w["runs_before"] and run >= w["runs_before"][stage])
    return f", {factor}× wide" if factor > 1 else ""


def stage_cfg(run: dict) -> str:
    """The teacher guidance a stage's run used, as the card writes it ("?" if its record has none)."""
    if "guidance_scale" not in run:
        return "?"
    interval = run.get("guidance_interval")
    return cfg_label(run["guidance_scale"], None if interval is None else tuple(interval))


def grown_text(grown: dict | None) -> str:
    """", first grown to L × width (H heads), the same function" for a continued teacher run that grew it
    (``continue_teacher.py --widen/--deepen``); "" otherwise."""
    if not grown:
        return ""
    a, b = grown["from_size"], grown["to_size"]
    return (f", first grown from {a['num_layers']} × {a['dim']} ({a['num_heads']} heads) to {b['num_layers']} × "
            f"{b['dim']} ({b['num_heads']} heads), the same function (`toolkit/models/bundled/grow.py`)")


def curve_stages(record: dict) -> dict:
    """The stage records the curves draw: the record's own, and where (b) was given a second round from a stage-(c)
    student and (c) has not run since, that earlier (c) run (kept under the continued run's ``start_record``)."""
    stages = dict(record["stages"])
    earlier = [more["start_record"] for more in stages.get("ode_init", {}).get("continued", [])
               if "start_record" in more]
    if "self_forcing" not in stages and earlier:
        stages["self_forcing"] = earlier[-1]
    return stages


def plot_curves(path: Path, record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def marker(points: list) -> str | None:  # a short run (a smoke test) has one or two points per curve
        return "o" if len(points) < 3 else None

    stages = curve_stages(record)
    # legends of continued runs go under their panels, where no curve runs
    most = max((len(s.get("continued", [])) for s in stages.values()), default=0)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4 + (0.25 * (most + 1) if most else 0)), layout="constrained")
    titles = {"base": "base (student architecture): flow matching", "teacher": "(a) teacher: flow matching",
              "ode_init": "(b) ODE regression", "self_forcing": "(c) Self-Forcing (DMD)"}
    ylabels = {"base": "flow-matching loss", "teacher": "flow-matching loss", "ode_init": "x0 loss",
               "self_forcing": "critic loss"}
    thousands = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}")
    for ax, stage in zip(axes, STAGES):
        ax.set_title(titles[stage], fontsize=9)
        ax.set_xlabel("step")
        curve = stages.get(stage, {}).get("curve")
        if not curve:
            ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        ax.set_ylabel(ylabels[stage] + ", training batches", fontsize=8)
        ax.xaxis.set_major_formatter(thousands)  # 15,000 steps would otherwise run their tick labels together
        steps = [c[0] for c in curve]
        ax.plot(steps, [c[1] for c in curve], label=stage.replace("_", " "), marker=marker(curve))
        runs = [(0, curve)]  # (steps before it, curve) of the first run and each continued one
        continued = stages[stage].get("continued", [])
        for i, more in enumerate(continued):
            offset = runs[-1][0] + runs[-1][1][-1][0]
            shift = f", σ shift {TEACHER_SHIFT:g}" if stage in ("base", "teacher") else ""
            shift += ", from the (c) student" if "start_record" in more else ""
            shift += wide_label(record, stage, i + 1)
            if dropped_as := dropped(record, stage, stages[stage], i):
                shift += f", {dropped_as}"
            ax.plot([offset + c[0] for c in more["curve"]], [c[1] for c in more["curve"]], color=f"C{i + 2}",
                    label=f"continued ({more['seconds']:.0f} s{shift})",
                    marker=marker(more["curve"]))
            runs.append((offset, more["curve"]))
        if stage == "self_forcing":
            twin = ax.twinx()
            for offset, run in runs:
                twin.plot([offset + c[0] for c in run], [c[2] for c in run], color="C1", ls=":" if offset else "-")
            twin.set_ylabel("DMD grad rms (orange; continued runs dotted)", color="C1", fontsize=8)
            ax.set_ylabel("critic loss (blue)", fontsize=8)
        else:
            ax.set_yscale("log")
        if stages[stage].get("continued"):
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
        s = stages[stage]
        seconds = s["seconds"] + sum(more["seconds"] for more in s.get("continued", []))
        before = ", before (b)'s second round" if stage not in record["stages"] else ""  # from curve_stages
        ax.set_title(f"{titles[stage]}, {seconds:.0f} s in all{before}", fontsize=9)
    fig.suptitle(f"bundled model training (the last run on {record['device']})", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dropped(record: dict, stage: str, stage_record: dict, run: int) -> str:
    """"not shipped" or "not kept" (the stage's last run or an earlier one) if continued run ``run`` of ``stage`` (its
    record ``stage_record``) trained weights the evaluation after it dropped for the student from before it
    (``kept`` false, or, in records written before that flag, the last stage-(c) run of a record that shipped
    "self_forcing_start"), so the shipped student and later fresh runs do not descend from it; else ""."""
    runs = stage_record.get("continued", [])
    last = run == len(runs) - 1
    legacy = stage == "self_forcing" and last and record.get("shipped") == "self_forcing_start"
    if runs[run].get("kept") is False or legacy:
        return "not shipped" if last else "not kept"
    return ""


def stage_guidances(record: dict) -> set[str]:
    """The teacher guidance of every run of stages (b) and (c) in ``record``, as the card writes it."""
    runs = []
    for name in ("ode_init", "self_forcing"):
        if name in record["stages"]:
            s = record["stages"][name]
            runs += [s, *s.get("continued", [])]
            runs += [more["start_record"] for more in s.get("continued", []) if "start_record" in more]
    return {stage_cfg(run) for run in runs if "guidance_scale" in run}


def crowded(settings: dict) -> str:
    """The clause a stage's row gains when it trained on crowded prompts only (``min_sprites`` above 1)."""
    n = settings.get("min_sprites", 1)
    return f", clips of {n}+ sprites only" if n > 1 else ""


def model_card(record: dict, model: WanModel) -> str:
    """MODEL_CARD.md from the training record (every number measured by the run that wrote it)."""
    cfg = model.cfg
    frames, height, width = clip_shape(cfg)
    grid = (frames // cfg.patch_size[0], height // cfg.patch_size[1], width // cfg.patch_size[2])
    st = record["stages"]

    def stage_rows(name: str, s: dict) -> list[str]:  # a stage's first run, then each continued one
        cfgs = s["settings"]
        if name in ("base", "teacher"):
            extra = f"lr {cfgs['lr']} (cosine), cond. dropout {cfgs['cond_dropout']}, EMA {cfgs['ema_decay']}"
        elif name == "ode_init":
            kept = f" ({s['pool_kept']} kept: prompt matched)" if cfgs.get("keep_prompted") else ""
            extra = (f"{cfgs['pairs']} ODE pairs{kept}, teacher CFG {stage_cfg(s)} "
                     f"({s.get('pool_seconds', 0):.0f} s to solve), lr {cfgs['lr']}")
        else:
            extra = (f"critic ratio {cfgs['critic_ratio']}, lr {cfgs['lr']} / {cfgs['critic_lr']}, "
                     f"teacher CFG {stage_cfg(s)}, EMA {cfgs['ema_decay']}{crowded(cfgs)}")
        loss = (f"{s['heldout_loss_init']:.4f} → {s['heldout_loss_end']:.4f}" if "heldout_loss_end" in s
                else f"critic {s['curve'][-1][1]:.4f}" if s.get("curve") else "")
        steps = s.get("steps_run", cfgs["steps"])
        rows = [f"| {name}{wide_label(record, name, 0)} | {steps} × {cfgs['batch']} | {s['seconds']:.0f} s | "
                f"{loss} | {extra} | `{s.get('commit', '?')}` |"]
        # the same weights trained further (continue_teacher.py, --*-start); run 0 was the first
        for run, more in enumerate(s.get("continued", []), 1):
            c = more["settings"]
            trained_by = f", teacher at {more['teacher_steps']} steps" if more.get("teacher_steps") else ""
            if name == "self_forcing":
                loss = f"critic {more['curve'][-1][1]:.4f}" if more.get("curve") else ""
                how = (f"critic ratio {c['critic_ratio']}, lr {c['lr']} / {c['critic_lr']}, teacher CFG "
                       f"{stage_cfg(more)}{trained_by}{crowded(c)}, "
                       + ("resumed: the run above's critic, optimisers, EMA and random streams" if more.get("resumed")
                          else f"seed {more.get('seed', '?')}, a fresh critic"))
            else:
                loss = f"{more['heldout_loss_init']:.4f} → {more['heldout_loss_end']:.4f}"
                mode = "compiled" if more.get("compile_seconds") else "eager"  # the teacher's continuations
                fresh = "new" if more.get("seed") != s.get("seed", record["seed"]) else "the same"
                how = (f"{c['pairs']} {fresh} ODE pairs (seed {more.get('seed', '?')}), teacher CFG "
                       f"{stage_cfg(more)} ({more.get('pool_seconds', 0):.0f} s to solve), "
                       f"lr {c['lr']}{trained_by}" if name == "ode_init"
                       else f"lr {c['lr']} (cosine), shift-{TEACHER_SHIFT:g} σ, {mode}"
                       + crowded(c)
                       + grown_text(more.get("grown")))
            if "start_record" in more:  # a second round of (b), from the stage-(c) student of the first
                rows += stage_rows("self_forcing", more["start_record"])
                how += ", from the self_forcing student above"
            if dropped_as := dropped(record, name, s, run - 1):
                how += f", {dropped_as}: " + ("the evaluation kept the student from before it"
                                              if dropped_as == "not shipped"
                                              else "the runs below start from the student before it")
            rows.append(f"| {name}, continued{wide_label(record, name, run)} | {more['steps_run']} × {c['batch']} | "
                        f"{more['seconds']:.0f} s | "
                        f"{loss} | {how} | `{more.get('commit', '?')}` |")
        return rows

    rows = [row for name in STAGES if st.get(name) for row in stage_rows(name, st[name])]
    guidance = record.get("guidance", {})
    guidance_text = cfg_label(*guidance_of(record)) if guidance else "?"
    ev = record.get("evaluation", {})
    ev_rows = []
    for name, r in ev.items():
        label = (f"teacher, {len(MANY_STEPS)} Euler steps, CFG {guidance_text}" if name == TEACHER_EVAL
                 else name.replace("_", " ")) + (f" (evaluated {r['evaluated']})" if r.get("evaluated") else "")
        ev_rows.append(f"| {label} | {format_summary(r, markdown=True)} |")
    header = " | ".join(title for _, title, _ in SUMMARY_COLUMNS)
    seeds = record.get("eval_seeds", 1)
    rollouts = "one rollout each" if seeds == 1 else f"{seeds} rollouts each (noise seeds `evaluate.heldout_seeds`)"
    placed_text = ", each sprite's start place named: `placed=True`" if record.get("eval_placed") else ""
    paired = "".join(
        f"\nClip by clip, {label.replace('_', ' ')}: "
        + "; ".join(f"{key.replace('_', ' ')} +{c['gained']} / −{c['lost']} clips (sign test p = {c['p_value']:.2g})"
                    for key, c in by_key.items()) + ".\n"
        for label, by_key in record.get("paired", {}).items())
    validation = "\n".join(f"| {g} | {format_summary(r, markdown=True)} |"
                           for g, r in guidance.get("validation", {}).items())
    if validation:
        validation = (f"; its 40-step samples on validation prompts, seeds disjoint from the evaluation's):\n\n"
                      f"| CFG scale | {header} |\n|---|{'---|' * len(SUMMARY_COLUMNS)}\n{validation}")
    else:  # a kept teacher: its guidance was chosen by an earlier run, whose record holds the table
        validation = ")."
    guidance_sentence = ("The teacher's classifier-free guidance (null prompt = all-zero context), used for its ODE "
                         "pairs, as DMD's real\nscore and for its own samples:")
    if len(stage_guidances(record)) > 1:
        guidance_sentence = ("The runs of (b) and (c) used the teacher's classifier-free guidance (null prompt = "
                             "all-zero context) their\nrows name, for the ODE pairs and as DMD's real score; the last "
                             "run's, which the teacher's own samples in the\nevaluation use:")
    if st.get("self_forcing", {}).get("continued"):
        choice = "the better of the stage-(c) student before and after its last continued run, on the evaluation below"
    elif "self_forcing" in st:
        choice = "the better of (b) and (b)+(c) on the evaluation below"
    else:
        choice = "stage (c) was not run for these weights"
    shipped_text = f"**{record.get('shipped', '?')}** student ({choice})"
    if record.get("shipped") == "self_forcing_start":  # the candidate the evaluation calls "self forcing start"
        shipped_text = (f"**stage-(c) student before its last continued run** (\"self forcing start\" below: "
                        f"{choice})")
    default_reproduce = (
        f"`toolkit train --out DIR --seed {record['seed']}` runs the four stages with the settings above (`toolkit "
        "train --help`; `--base-seconds` and `--teacher-seconds` give the pretraining stages a time budget, which "
        "fixes their step count after 20 timed steps); `--stages base`, `--stages teacher` and then `--stages "
        "ode_init,self_forcing` split it over processes (a command on the GPU machine may run 10 minutes): "
        "`benchmarks/train_bundled.sh`.")
    varied_guidance = len(stage_guidances(record)) > 1  # then each command names its run's --guidance
    for stage, label in (("ode_init", "(b)"), ("self_forcing", "(c)")):
        # the continued runs in the order they ran, consecutive ones of the same command together
        # (start, the command's other flags, seeds, (position in the group, label) of the runs not kept)
        groups: list[tuple[str, str, list[str], list[tuple[int, str]]]] = []
        continued = st.get(stage, {}).get("continued", [])
        for run, more in enumerate(continued):
            start = "self_forcing" if "start_record" in more else stage
            flags = " --sf-resume" if more.get("resumed") else ""
            if varied_guidance and "guidance_scale" in more:
                flags = f" --guidance {stage_cfg(more)}{flags}"
            if more["settings"].get("min_sprites", 1) > 1:
                flags += f" --sf-min-sprites {more['settings']['min_sprites']}"
            if not (groups and groups[-1][:2] == (start, flags) and start == stage):
                groups.append((start, flags, [], []))
            groups[-1][2].append(str(more.get("seed", "?")))
            if dropped_as := dropped(record, stage, st[stage], run):
                groups[-1][3].append((len(groups[-1][2]), dropped_as))
        sentences: list[str] = []
        in_second_round = False  # whether the last sentence is about (b)'s second round
        for i, (start, flags, run_seeds, not_kept) in enumerate(groups):
            if not_kept:
                which = ("" if len(run_seeds) == 1 else
                         " and ".join(("the first", "the second", "the third")[n - 1] if n <= 3 else f"run {n}"
                                  for n, _ in not_kept) + " ")
                dropped_as = not_kept[-1][1]
                not_kept_text = f"; {which}{dropped_as}: " + ("the student before it is" if dropped_as == "not shipped"
                                                              else "later runs start from the student before it")
            else:
                not_kept_text = ""
            command = (f"`--stages {stage} {START_FLAGS[stage]} {start}{flags} --force --seed S` "
                       f"(S = {', '.join(run_seeds)}{not_kept_text})")
            if start != stage:
                sentences.append(f"After stage (c), stage {label} started a second round from the stage-(c) "
                                 f"student with {command}")
                in_second_round = True
            elif i and groups[i - 1][0] != stage:
                sentences[-1] += f"; it was trained further with {command}"
            else:
                before = ", before stage (c)" if stage == "ode_init" and "self_forcing" in st else ""
                sentences.append(f"Stage {label} was then trained further with {command}{before}")
                in_second_round = False
        if in_second_round and "self_forcing" in st:
            sentences[-1] += ", then stage (c) again"
        default_reproduce += "".join(f" {sentence}." for sentence in sentences)
    widenings = record.get("widened", [])
    first = widenings[0]["from_size"] if widenings else dict(num_layers=cfg.num_layers, dim=cfg.dim)
    base_size = f"{first['num_layers']} × {first['dim']}"
    widen_text = ""
    for w in widenings:
        a, b = w["from_size"], w["to_size"]
        widen_text += (
            f"\n\nWidened at `{w['commit']}`: the student stages {', '.join(w['stages'])} were replaced by copies "
            f"{w['factor']}× as wide that compute the same function ({a['num_layers']} × {a['dim']}, {a['num_heads']} "
            f"heads → {b['num_layers']} × {b['dim']}, {b['num_heads']} heads; `toolkit/models/bundled/grow.py`; one "
            f"forward of each file changed by at most {max(w['max_relative_difference'].values()):.1e} of its "
            "largest value); the runs recorded after it trained the wide copies.")
        default_reproduce += (f" The student stages were widened with `toolkit train --out DIR --widen {w['factor']} "
                              f"--seed {w['seed']} --force` at `{w['commit']}`.")
    tc = record.get("teacher_config")
    if tc:
        t = WanConfig.from_dict(tc)
        t_grid = (frames // t.patch_size[0], height // t.patch_size[1], width // t.patch_size[2])
        teacher_text = (f"{t.num_layers} layers × width {t.dim} ({t.num_heads} heads × {t.head_dim}), patch "
                        f"{tuple(t.patch_size)} (grid {t_grid[0]} × {t_grid[1]} × {t_grid[2]}), "
                        f"{WanModel(t).num_parameters() / 1e6:.1f} M parameters")
    else:
        teacher_text = "the student's architecture"
    return f"""# Bundled model card

A {cfg.num_layers}-layer Wan DiT (width {cfg.dim}, {cfg.num_heads} heads × {cfg.head_dim}, FFN {cfg.ffn_dim},
{model.num_parameters() / 1e6:.2f} M parameters, float16 safetensors) trained on procedural sprite videos
(`toolkit/models/bundled/data.py`). Pixel space: RGB in [-1, 1], patch {tuple(cfg.patch_size)}, clips of
{frames} frames × {height} × {width} pixels = token grid {grid[0]} × {grid[1]} × {grid[2]}
({grid[0] * grid[1] * grid[2]} tokens); why this grid and size: `toolkit/models/bundled/config.py`.
Sampled with the Self-Forcing loop (`toolkit.models.sampling.self_forcing_rollout`): 4 chunks of 3 frames,
timesteps 1000, 937.5, 833.3, 625, a clean pass after each chunk, KV cache.

## Training: Self-Forcing's recipe at toy scale

`toolkit/models/bundled/recipe.py`; seed {record['seed']}, {record['device']}, {record['precision']},
torch {record['torch']}.

| stage | steps × batch | time | held-out loss | settings | commit |
|---|---|---|---|---|---|
{chr(10).join(rows)}

{guidance_sentence} **{guidance_text}** ({guidance.get('chosen_by', '?')}{validation}

The student starts from **base** (the shipped architecture, {base_size}, pretrained by the same
flow-matching objective as the teacher); the **teacher** is {teacher_text}: its 40-step samples are the ODE pairs'
source and it is DMD's real score (Self-Forcing's roles of Wan2.1-1.3B and Wan2.1-14B).{widen_text}

Shipped: the {shipped_text}. {record.get('stages_note', '')}

![training curves](curves.png)

## Evaluation

{record.get('eval_prompts', '?')} held-out prompts (`evaluate.heldout_prompts`{placed_text}), {rollouts} from the same
noise for every model, scored by the sprite evaluator (`toolkit/models/bundled/evaluate.py`, whose docstring
defines each column; "ground truth" is procedural clips of the same prompts). Score = colours and count right,
prompted sprites seen in ≥ 90 % of frames, no teleport. Random init and the teacher (40 Euler steps, not a
4-step sampler) are shown for scale.

| model | {header} |
|---|{'---|' * len(SUMMARY_COLUMNS)}
{chr(10).join(ev_rows)}
{paired}{clip_comparison_text(record)}
![rollouts next to ground truth](rollout.png)
{showcase_note(record)}
## Reproduce

{record.get('reproduce') or default_reproduce}
"""
