"""The bundled model's training recipe — Self-Forcing's, at toy scale — and the artifacts it ships.

    base           the student's architecture pretrained by flow matching           ``teacher.py``
    (a) teacher        a larger block-causal flow-matching model, 40 Euler steps     ``teacher.py``
    (b) ode_init       causal 4-step student (from base) regressed onto the teacher's ODE   ``ode_init.py``
    (c) self_forcing   the student's own KV-cache rollouts, DMD against the teacher  ``self_forcing.py``

The roles are Self-Forcing's: its student starts from Wan2.1-1.3B (our ``base``: same architecture, flow matching
on the data) and distils a stronger model (Wan2.1-14B's score; our ``teacher``: ``config.teacher_config``, 5× the
parameters on 8 × 8 patches — why: ``config.py``). Both pretraining stages use the same block-causal
teacher-forcing objective (``teacher.train_teacher``).

``train_bundled(out, Recipe())`` runs the stages in order from one seed (``toolkit train`` maps its flags onto
``Recipe``). Each stage leaves its weights, with their config, in ``out/stages/<stage>.safetensors``, so stages can
also be run in separate processes (``stages=("base",)``, ``("teacher",)``, then ``("ode_init", "self_forcing")``:
the later ones load the earlier weights from the folder). Stage (b) or (c) can also train its own earlier weights
further (``ODESettings.start == "ode_init"``, ``SelfForcingSettings.start == "self_forcing"``), and stage (b) can
start a second round from the stage-(c) student (``ODESettings.start == "self_forcing"``); the record keeps the
first run and lists the later ones under ``continued`` (a second round with the stage-(c) record it started from).
After the last stage the evaluator (``evaluate.py``) scores the student of (b) and of (b)+(c) (a continued (c):
before and after) on held-out prompts and seeds, as their float16 files hold them; the better one is shipped as
``out/model.safetensors`` with ``config.json``, ``MODEL_CARD.md`` (every stage's steps, batch, time, device, losses
and both evaluations), ``train_log.json``, ``curves.png`` and ``rollout.png``/``.gif``.

An existing model is never replaced without ``force=True``: ``check_output`` refuses before anything is trained.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from toolkit.device import resolve_device
from toolkit.errors import ToolkitError
from toolkit.models.bundled import data, evaluate
from toolkit.models.bundled.config import (
    CONFIG_FILE,
    MANY_STEPS,
    WEIGHTS_FILE,
    bundled_config,
    clip_shape,
    frames_per_chunk,
    teacher_config,
)
from toolkit.models.bundled.grow import function_change, model_size, widened
from toolkit.models.bundled.model import (
    as_stored,
    generate,
    load_weights,
    save_weights,
    stored_config,
)
from toolkit.models.bundled.ode_init import ODE_STARTS, ODESettings, train_ode_init
from toolkit.models.bundled.pictures import save_gif, save_strip
from toolkit.models.bundled.self_forcing import SF_STARTS, SelfForcingSettings, train_self_forcing
from toolkit.models.bundled.teacher import TEACHER_SHIFT, ClipSetup, Log, TeacherSettings, autocast, train_teacher
from toolkit.models.seam import use_backend
from toolkit.models.wan import WanConfig, WanModel

STAGES = ("base", "teacher", "ode_init", "self_forcing")
NEEDS = {"base": (), "teacher": (), "ode_init": ("base", "teacher"), "self_forcing": ("ode_init", "teacher")}
STUDENT_STAGES = ("base", "ode_init", "self_forcing")  # the student's architecture (``widen_students``)
# the flags that choose the weights stage (b) or (c) starts from; starting from its own or a later stage's weights
# continues the lineage recorded in the folder (``check_output``)
START_FLAGS = {"ode_init": "--ode-start", "self_forcing": "--sf-start"}
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


GUIDANCE_CANDIDATES = (1.0, 2.0, 3.0, 4.5)
VALIDATION_PROMPT_SEED, VALIDATION_NOISE_SEED = 1_000_303, 1_000_403  # not the evaluation's held-out seeds
TEACHER_EVAL = "teacher_40_euler_steps"  # the teacher's row in a record's evaluation


@dataclass(frozen=True)
class Recipe:
    base: TeacherSettings = field(default_factory=TeacherSettings)
    # the shipped teacher trained 4034 + 4041 steps of 32 in two runs (docs/bundled-model.md); one run here
    teacher: TeacherSettings = field(default_factory=lambda: TeacherSettings(steps=8000, batch=32, warmup=200))
    ode_init: ODESettings = field(default_factory=ODESettings)
    self_forcing: SelfForcingSettings = field(default_factory=SelfForcingSettings)
    # the teacher's classifier-free guidance in every later use (ODE pairs, DMD's real score, its own samples);
    # None: the candidate that scores best on validation prompts right after stage (a)
    guidance_scale: float | None = None
    guidance_candidates: tuple[float, ...] = GUIDANCE_CANDIDATES
    # (σ_lo, σ_hi): guide only the steps (ODE pairs, samples) and noise levels (DMD) with σ in it, the conditional
    # flow elsewhere (``sampling.guidance_at``); None: every σ
    guidance_interval: tuple[float, float] | None = None
    validation_prompts: int = 32
    seed: int = 0
    eval_prompts: int = 64  # held-out prompts
    # fraction of every stage's training prompts that name where each sprite starts (data.PLACES; set on each
    # stage's settings by ``with_places``); above 0 the validation and evaluation prompts name places too
    placed: float = 0.0
    eval_seeds: int = 1  # noise seeds per prompt (``evaluate.heldout_seeds``; the first is the one-seed protocol's)


def stage_path(out: Path, stage: str) -> Path:
    return out / "stages" / f"{stage}.safetensors"


def sf_state_path(out: Path) -> Path:
    """Where each stage-(c) run leaves its end state (``self_forcing.py``) for a later ``--sf-resume``: float32
    weights and moments of the student and of the teacher-sized critic, about 215 MB with the shipped sizes."""
    return out / "stages" / "self_forcing_state.pt"


def refuse_overwrite(out: Path, writes: Sequence[Path], force: bool) -> None:
    """One line, nothing written, if any of the files a run ``writes`` into ``out`` exists already (unless
    ``force``): ``toolkit train`` never silently replaces a model."""
    existing = [p for p in writes if p.exists()]
    if existing and not force:
        raise ToolkitError(f"{out} already holds a model ({existing[0].name}); pass --force to replace it")


def check_output(out: str | Path, stages: Sequence[str], force: bool, ode_start: str = "base",
                 sf_start: str = "ode_init", sf_resume: bool = False) -> Path:
    """Refuse (one line) to overwrite a model in ``out`` unless ``force``; check that the stages the ones asked for
    build on have left their weights there (or are asked for too; ``ode_start="ode_init"`` / ``sf_start=
    "self_forcing"``: stage (b) / (c) continues its own earlier weights; ``ode_start="self_forcing"``: stage (b)
    starts a second round from the stage-(c) student; ``sf_resume``: stage (c) continues from the state its
    earlier run left). Nothing is written."""
    out = Path(out)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ToolkitError(f"unknown stage(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(STAGES)}")
    if out.exists() and not out.is_dir():
        raise ToolkitError(f"{out} exists and is not a folder")
    ordered = [s for s in STAGES if s in stages]
    # a folder that holds a model is refused whatever the stages (they rewrite its stage log, and the default
    # --out is the shipped model's folder), as is one holding the weights these stages write
    writes = [out / WEIGHTS_FILE, *(stage_path(out, s) for s in ordered)]
    refuse_overwrite(out, writes, force)
    if ode_start not in ODE_STARTS:
        raise ToolkitError(f"the ODE stage starts from one of {', '.join(ODE_STARTS)}, not {ode_start!r}")
    if sf_start not in SF_STARTS:
        raise ToolkitError(f"the Self-Forcing stage starts from one of {', '.join(SF_STARTS)}, not {sf_start!r}")
    if sf_resume and sf_start != "self_forcing":
        raise ToolkitError("--sf-resume continues an earlier stage-(c) run: add --sf-start self_forcing")
    starts = {"ode_init": ode_start, "self_forcing": sf_start}
    # a stage that starts from its own or a later stage's weights continues the lineage recorded in the folder:
    # those weights, its own record and theirs must be there
    continued = {stage: start for stage, start in starts.items() if STAGES.index(start) >= STAGES.index(stage)}
    for stage, start in continued.items():
        if stage not in ordered:
            raise ToolkitError(f"{START_FLAGS[stage]} {start} continues stage {stage}: add it to the stages")
        earlier = STAGES[:STAGES.index(stage)]
        if any(s in ordered for s in earlier):
            named = f"{', '.join(earlier[:-1])} and {earlier[-1]}"
            raise ToolkitError(f"continuing stage {stage} runs without {named} (they would replace "
                               "the record and the weights it continues)")
        log_file = out / "stages" / "log.json"
        try:
            recorded = json.loads(log_file.read_text()).get("stages", {})
        except (OSError, ValueError, AttributeError):
            recorded = {}
        needed = dict.fromkeys((stage, start))
        if not stage_path(out, start).is_file() or any(s not in recorded for s in needed):
            records = "its record" if start == stage else f"the records of {' and '.join(needed)}"
            raise ToolkitError(f"continuing stage {stage} needs {stage_path(out, start)} and {records} in "
                               f"{log_file} (run stage {start} first)")
    for stage in ordered:
        needs = NEEDS[stage]
        if stage in continued:  # the weights it continues (checked above), not the stage before's
            needs = tuple(n for n in needs if n == "teacher")
        for earlier in needs:
            if earlier not in ordered and not stage_path(out, earlier).is_file():
                raise ToolkitError(f"stage {stage} needs {stage_path(out, earlier)} (run stage {earlier} first)")
    if sf_resume and not sf_state_path(out).is_file():
        raise ToolkitError(f"--sf-resume needs {sf_state_path(out)}, which every stage-(c) run leaves; this "
                           "folder's stage (c) left none (copied in, or widened since)")
    return out


def load_sf_state(out: Path, student: WanModel) -> dict:
    """The state the last stage-(c) run left in ``out``, checked against the stage file it continues (which holds
    that run's EMA weights, rounded to float16)."""
    state = torch.load(sf_state_path(out), map_location="cpu", weights_only=True)
    params = [p.detach().cpu() for p in student.parameters()]
    if len(params) != len(state["ema"]) or any(
            p.shape != e.shape or not torch.equal(p, e.half().to(p.dtype)) for p, e in zip(params, state["ema"])):
        raise ToolkitError(f"{sf_state_path(out)} is not the state of {stage_path(out, 'self_forcing')} (a later "
                           "stage-(c) file replaced it); run stage (c) without --sf-resume")
    return state


def save_sf_state(out: Path, state: dict) -> None:
    tmp = sf_state_path(out).with_name(sf_state_path(out).name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(sf_state_path(out))


def widen_students(out: str | Path, factor: int = 2, *, seed: int = 0, force: bool = False,
                   log: Log = print) -> dict:
    """Replace every student stage in ``out/stages`` (base, ode_init, self_forcing) by a copy ``factor`` × as wide
    that computes the same function (``grow.py``: ``dim``, ``ffn_dim`` and heads × ``factor``), so that a continued
    stage (``--ode-start self_forcing``, ``--sf-start self_forcing``, ``--ode-start ode_init``) trains it with more
    capacity; later stages take the new size from ``stages/base.safetensors``. Recorded under ``widened`` in the
    folder's record, with the largest difference of one forward of each file before and after, relative to the
    output's largest value (the card shows it). Replaces weights, so it needs ``force``; returns the record."""
    out = Path(out)
    students = [s for s in STUDENT_STAGES if stage_path(out, s).is_file()]
    if not students:
        raise ToolkitError(f"{out / 'stages'} holds no student stage to widen ({', '.join(STUDENT_STAGES)})")
    log_file = out / "stages" / "log.json"
    try:
        record = json.loads(log_file.read_text())
        recorded = set(record["stages"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ToolkitError(f"widening needs the stages' record {log_file}") from None
    if missing := [s for s in students if s not in recorded]:
        raise ToolkitError(f"{log_file} has no record of {', '.join(missing)}: the stage files and the record differ")
    refuse_overwrite(out, [stage_path(out, s) for s in students], force)
    narrow = {s: load_weights(stage_path(out, s), None, "cpu") for s in students}
    sizes = {tuple(model_size(m.cfg).values()) for m in narrow.values()}
    if len(sizes) > 1:
        raise ToolkitError(f"the student stages in {out / 'stages'} differ in size ({sorted(sizes)}): none widened")
    wide = {s: widened(m, factor, seed=seed + i) for i, (s, m) in enumerate(narrow.items())}
    cfg = next(iter(narrow.values())).cfg
    # each model as its file holds it (the narrow ones were just loaded from theirs)
    differences = {s: function_change(narrow[s], wide[s], seed) for s in students}
    for s in students:
        save_weights(wide[s], stage_path(out, s), stage=s)
    if sf_state_path(out).is_file():  # the narrow run's critic and moments: nothing to resume at the new width
        sf_state_path(out).unlink()
        log(f"removed {sf_state_path(out)} (a stage-(c) state of the narrow student)")
    w = wide[students[0]].cfg
    record.setdefault("widened", []).append(dict(
        factor=factor, seed=seed, stages=students, commit=git_commit(),
        # the runs of each stage so far: the card marks the later ones as trained wide
        runs_before={s: 1 + len(record["stages"][s].get("continued", [])) if s in record["stages"] else 0
                     for s in STUDENT_STAGES},
        from_size=model_size(cfg), to_size=model_size(w),
        max_relative_difference={s: round(d, 6) for s, d in differences.items()}))
    record["config"] = w.to_dict()
    log_file.write_text(json.dumps(record, indent=1) + "\n")
    log(f"widened {', '.join(students)}: {cfg.num_layers} × {cfg.dim} ({cfg.num_heads} heads) -> {w.num_layers} × "
        f"{w.dim} ({w.num_heads} heads); one forward differs by at most "
        + ", ".join(f"{d:.1e}" for d in differences.values()) + " of its largest value")
    return record


def teacher_steps(record: dict) -> int | None:
    """The teacher's optimizer steps in ``record``, its continued runs included (None: no teacher recorded)."""
    t = record.get("stages", {}).get("teacher")
    if not t:
        return None
    return t.get("steps_run", t["settings"]["steps"]) + sum(more["steps_run"] for more in t.get("continued", []))


def digest(content: bytes) -> str:
    """A short fingerprint of ``content`` (SHA-256, 16 hex digits): enough to tell two recorded inputs apart."""
    return hashlib.sha256(content).hexdigest()[:16]


def git_commit() -> str:
    """The checkout's short commit; ``TOOLKIT_COMMIT`` overrides it (a copy of the tree whose git is stale)."""
    if os.environ.get("TOOLKIT_COMMIT"):
        return os.environ["TOOLKIT_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[3]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def with_places(recipe: Recipe, placed: float) -> Recipe:
    """``recipe`` with ``placed`` as the prompt mix of every stage and of its evaluation."""
    return replace(recipe, base=replace(recipe.base, placed=placed), teacher=replace(recipe.teacher, placed=placed),
                   ode_init=replace(recipe.ode_init, placed=placed),
                   self_forcing=replace(recipe.self_forcing, placed=placed), placed=placed)


def train_bundled(
    out: str | Path,
    recipe: Recipe = Recipe(),
    *,
    stages: Sequence[str] = STAGES,
    cfg: WanConfig | None = None,
    teacher_cfg: WanConfig | None = None,
    device: str | None = None,
    force: bool = False,
    log: Log = print,
) -> dict:
    """Run ``stages`` of ``recipe`` into ``out`` (see the module docstring); returns the training record. ``cfg``:
    the student's architecture for the base stage (default: the shipped one), ``teacher_cfg`` the teacher's;
    stages loaded from ``out`` bring their own."""
    out = check_output(out, stages, force, recipe.ode_init.start, recipe.self_forcing.start,
                       recipe.self_forcing.resume)
    dev = resolve_device(device or None)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "base" not in stages and stage_path(out, "base").is_file():  # trained earlier: the student is its size
        cfg = stored_config(stage_path(out, "base"))
    cfg = cfg or bundled_config()
    teacher_cfg = teacher_cfg or teacher_config()
    if (clip_shape(cfg), frames_per_chunk(cfg)) != (clip_shape(teacher_cfg), frames_per_chunk(teacher_cfg)):
        raise ToolkitError("the teacher and the student must share the clip shape and its chunking")
    log_file = out / "stages" / "log.json"
    ordered = [s for s in STAGES if s in stages]
    record = json.loads(log_file.read_text()) if log_file.is_file() and ordered[0] != STAGES[0] else {}
    record.setdefault("seed", recipe.seed)  # the first stage's; each stage's summary records its own
    record.update(config=cfg.to_dict(), device=_device_name(dev), torch=torch.__version__,
                  precision="bf16 autocast" if dev.type == "cuda" else "float32")
    record.setdefault("stages", {})

    def save(stage: str, model: WanModel, summary: dict) -> None:
        summary.setdefault("commit", git_commit())  # a continued stage keeps its first run's
        summary.setdefault("seed", recipe.seed)
        record["stages"][stage] = summary
        if stage == "teacher":
            record["teacher_config"] = model.cfg.to_dict()
        save_weights(model, stage_path(out, stage), stage=stage)
        log_file.write_text(json.dumps(record, indent=1) + "\n")

    def pretrain(stage: str, model_cfg: WanConfig, settings: TeacherSettings, seed: int) -> WanModel:
        torch.manual_seed(seed)
        model = WanModel(model_cfg).to(dev)
        with use_backend(model, ClipSetup.of(model_cfg, dev).backend):
            save(stage, model, train_teacher(model, settings, seed=seed, log=log, name=stage))
        return model

    def load(stage: str) -> WanModel:
        return load_weights(stage_path(out, stage), None, dev)

    torch.manual_seed(recipe.seed)
    random_init = WanModel(cfg).to(dev)
    if "base" in stages:
        base = pretrain("base", cfg, recipe.base, recipe.seed)
    teacher = None
    if "teacher" in stages:
        teacher = pretrain("teacher", teacher_cfg, recipe.teacher, recipe.seed + 100)
    elif "ode_init" in stages or "self_forcing" in stages:
        teacher = load("teacher")
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    if teacher is not None and ("teacher" in stages or "guidance" not in record or recipe.guidance_scale is not None
                                or recipe.guidance_interval is not None):
        record["guidance"] = choose_guidance(teacher, recipe, log)
        log_file.write_text(json.dumps(record, indent=1) + "\n")
        guided = f"teacher, {len(MANY_STEPS)} Euler steps, CFG {cfg_label(*guidance_of(record))}"
        save_showcase(out / "stages" / "teacher.png", [(guided, teacher, teacher_sampler(*guidance_of(record)))],
                      placed=recipe.placed > 0)
    if "ode_init" not in stages and "self_forcing" not in stages:
        return record
    guidance, interval = guidance_of(record)
    setup, scores = ClipSetup.of(cfg, dev), ClipSetup.of(teacher.cfg, dev)

    def continued(stage: str, summary: dict) -> dict:  # as continue_teacher.py records the teacher's runs
        earlier = record["stages"][stage]
        more = {**summary, "commit": git_commit(), "seed": recipe.seed, "teacher_steps": teacher_steps(record)}
        return {**earlier, "continued": [*earlier.get("continued", []), more]}

    earlier_evaluation = record.get("evaluation", {})
    sf_continues = "self_forcing" in stages and recipe.self_forcing.start == "self_forcing"  # checked: check_output
    if "ode_init" in stages:
        start = recipe.ode_init.start
        student = copy.deepcopy(base if start == "base" and "base" in stages else load(start)).requires_grad_(True)
        with use_backend(student, setup.backend), use_backend(teacher, scores.backend):
            summary = train_ode_init(student, teacher, recipe.ode_init, seed=recipe.seed, guidance_scale=guidance,
                                     guidance_interval=interval, log=log)
        if start == "self_forcing":  # a second round: the stage-(c) student it started from goes into its record
            summary["start_record"] = record["stages"]["self_forcing"]
        save("ode_init", student, summary if start == "base" else continued("ode_init", summary))
        if "self_forcing" not in stages:  # a stage (c) recorded earlier was trained from the replaced student
            record["stages"].pop("self_forcing", None)
            sf_state_path(out).unlink(missing_ok=True)
    else:
        student = load("self_forcing" if sf_continues else "ode_init").requires_grad_(True)
    # the candidates as their files hold them (float16): the evaluation below is of the weights that ship
    candidates = {"self_forcing_start" if sf_continues else "ode_init": as_stored(student)}
    if "self_forcing" in stages:
        state = load_sf_state(out, student) if recipe.self_forcing.resume else {}
        summary = train_self_forcing(student, teacher, recipe.self_forcing, seed=recipe.seed,
                                     guidance_scale=guidance, guidance_interval=interval, log=log, state=state)
        save("self_forcing", student, continued("self_forcing", summary) if sf_continues else summary)
        save_sf_state(out, state)
        candidates["self_forcing"] = as_stored(student)

    # evaluation: the same held-out prompts and seeds for every model
    prompts = evaluate.heldout_prompts(recipe.eval_prompts, placed=recipe.placed > 0)
    seeds = evaluate.heldout_seeds(recipe.eval_seeds)
    results = {}
    start = time.perf_counter()
    # the teacher's 40-step samples are the slowest part: scored again only when something they depend on changed
    teacher_key = dict(weights=digest(stage_path(out, "teacher").read_bytes()),
                       guidance=[guidance, list(interval) if interval else None],
                       prompts=digest("\n".join(map(str, prompts)).encode()), seeds=list(seeds))
    kept_teacher = earlier_evaluation.get(TEACHER_EVAL)
    kept_teacher = kept_teacher if kept_teacher and kept_teacher.get("of") == teacher_key else None
    models = [("random_init", random_init.eval(), {}), *[(n, m, {}) for n, m in candidates.items()],
              *([] if kept_teacher else [(TEACHER_EVAL, teacher, teacher_sampler(guidance, interval))])]
    for name, model, sampler in models:  # ground truth depends only on the prompts and seeds: scored once
        results[name] = evaluate_model(model, prompts, seeds, reference=name == "random_init", **sampler)
        log(f"evaluation, {name}: {format_summary(results[name])}")
    if kept_teacher:
        results[TEACHER_EVAL] = {**kept_teacher, "evaluated": "by an earlier run (same weights, prompts and noise)"}
        log(f"evaluation, {TEACHER_EVAL} (kept: same weights, prompts and noise): {format_summary(kept_teacher)}")
    else:
        results[TEACHER_EVAL]["of"] = teacher_key
    first, *later = candidates  # each later candidate against the first, clip by clip (the same prompts and noise)
    comparisons = {f"{name} vs {first}": {key: evaluate.paired(results[first]["outcomes"][key],
                                                               results[name]["outcomes"][key])
                                          for key in evaluate.PAIRED} for name in later}
    for label, by_key in comparisons.items():
        log(f"paired, {label}: " + ", ".join(f"{key.replace('_', ' ')} +{c['gained']} −{c['lost']} clips "
                                            f"(p = {c['p_value']:.2g})" for key, c in by_key.items()))
    results["ground_truth"] = results["random_init"]["reference"]
    for r in results.values():
        r.pop("reference", None)
    if sf_continues and "ode_init" in earlier_evaluation:  # the (b) student is not loaded again: its earlier numbers
        ode = {**earlier_evaluation["ode_init"], "evaluated": "by the run that trained it"}
        results = {"random_init": results.pop("random_init"), "ode_init": ode, **results}
    shipped = max(candidates, key=lambda n: (results[n]["colour_match"], results[n]["score"]))
    record.update(evaluation=results, evaluation_seconds=round(time.perf_counter() - start, 1), shipped=shipped,
                  eval_prompts=len(prompts), eval_seeds=len(seeds), eval_placed=recipe.placed > 0,
                  paired=comparisons)
    log_file.write_text(json.dumps(record, indent=1) + "\n")  # a later continued stage reads the evaluation here
    log(f"shipping the {shipped} student")
    write_artifacts(out, candidates[shipped], teacher, record, log)
    return record


def teacher_sampler(guidance_scale: float, guidance_interval: tuple[float, float] | None = None) -> dict:
    """``generate`` options of the teacher's many-step sampler: 40 Euler steps of its flow ODE, with CFG (only at the
    steps with σ in ``guidance_interval``, if given)."""
    sampler = dict(denoising_steps=MANY_STEPS, solver="euler", guidance_scale=guidance_scale)
    if guidance_interval is not None:
        sampler["guidance_interval"] = tuple(guidance_interval)
    return sampler


def guidance_of(record: dict) -> tuple[float, tuple[float, float] | None]:
    """(scale, interval or None) of the teacher's guidance a recipe folder's record holds."""
    interval = record["guidance"].get("interval")
    return record["guidance"]["scale"], None if interval is None else tuple(interval)


def cfg_label(scale: float, interval: tuple[float, float] | None = None) -> str:
    """"2", or "4 for σ in [0, 0.8]" for guidance in an interval."""
    return f"{scale:g}" + ("" if interval is None else " for σ in [{:g}, {:g}]".format(*interval))


def choose_guidance(teacher: WanModel, recipe: Recipe, log: Log = print) -> dict:
    """The teacher's CFG scale: ``recipe.guidance_scale``, or the candidate whose 40-step samples score best
    (score, then colour match) on validation prompts (seeds disjoint from the evaluation's); returns the choice and
    the validation summaries."""
    interval = {} if recipe.guidance_interval is None else {"interval": list(recipe.guidance_interval)}
    if recipe.guidance_scale is not None:
        return dict(scale=recipe.guidance_scale, chosen_by="recipe", **interval)
    prompts = evaluate.heldout_prompts(recipe.validation_prompts, seed=VALIDATION_PROMPT_SEED,
                                       placed=recipe.placed > 0)
    results = {}
    for scale in recipe.guidance_candidates:
        results[scale] = evaluate_model(teacher, prompts, (VALIDATION_NOISE_SEED,),
                                        **teacher_sampler(scale, recipe.guidance_interval))
        log(f"teacher, guidance {scale:g}: {format_summary(results[scale])}")
    best = max(results, key=lambda g: (results[g]["score"], results[g]["colour_match"]))
    log(f"teacher guidance scale {best:g} (best of {', '.join(f'{g:g}' for g in results)} on "
        f"{len(prompts)} validation prompts)")
    return dict(scale=best, chosen_by=f"validation, {len(prompts)} prompts",
                validation={f"{g:g}": r for g, r in results.items()}, **interval)


@torch.no_grad()
def evaluate_model(model: WanModel, prompts: list, seeds: Sequence[int] = (evaluate.HELDOUT_NOISE_SEED,), *,
                   reference: bool = False, **sampler: Any) -> dict:
    """The evaluator's summary (a JSON-ready dict) for rollouts of ``model`` on ``prompts`` x ``seeds``; with
    ``reference``, also ground truth of the same prompts and seeds scored the same way (under ``"reference"``)."""
    device = next(model.parameters()).device

    def rollout(part: list, seed: int) -> torch.Tensor:
        with autocast(device):
            return generate(model, part, seed=seed, **sampler).float().cpu()

    summary = asdict(evaluate.evaluate_generator(rollout, prompts, seeds, reference=reference))
    if not reference:
        summary.pop("reference", None)
    return summary


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


# ----------------------------------------------------------------------------------------------------------------
# Artifacts


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


def plot_curves(path: Path, record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def marker(points: list) -> str | None:  # a short run (a smoke test) has one or two points per curve
        return "o" if len(points) < 3 else None

    stages = record["stages"]
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
        for i, more in enumerate(stages[stage].get("continued", [])):
            offset = runs[-1][0] + runs[-1][1][-1][0]
            shift = f", σ shift {TEACHER_SHIFT:g}" if stage in ("base", "teacher") else ""
            shift += ", from the (c) student" if "start_record" in more else ""
            shift += wide_label(record, stage, i + 1)
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
        ax.set_title(f"{titles[stage]}, {seconds:.0f} s in all", fontsize=9)
    fig.suptitle(f"bundled model training on {record['device']}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
                     f"teacher CFG {stage_cfg(s)}, EMA {cfgs['ema_decay']}")
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
                       f"{stage_cfg(more)}{trained_by}, "
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
                       + (f", clips of {c['min_sprites']}+ sprites only" if c.get("min_sprites", 1) > 1 else "")
                       + grown_text(more.get("grown")))
            if "start_record" in more:  # a second round of (b), from the stage-(c) student of the first
                rows += stage_rows("self_forcing", more["start_record"])
                how += ", from the self_forcing student above"
            rows.append(f"| {name}, continued{wide_label(record, name, run)} | {more['steps_run']} × {c['batch']} | "
                        f"{more['seconds']:.0f} s | "
                        f"{loss} | {how} | `{more.get('commit', '?')}` |")
        return rows

    rows = [row for name in STAGES if st.get(name) for row in stage_rows(name, st[name])]
    ev = record.get("evaluation", {})
    ev_rows = []
    for name, r in ev.items():
        label = name.replace("_", " ") + (f" (evaluated {r['evaluated']})" if r.get("evaluated") else "")
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
    guidance = record.get("guidance", {})
    guidance_text = cfg_label(*guidance_of(record)) if guidance else "?"
    validation = "\n".join(f"| {g} | {format_summary(r, markdown=True)} |"
                           for g, r in guidance.get("validation", {}).items())
    if validation:
        validation = (f"\n\n| CFG scale | {header} |\n|---|{'---|' * len(SUMMARY_COLUMNS)}\n{validation}")
    if st.get("self_forcing", {}).get("continued"):
        choice = "the better of the stage-(c) student before and after its last continued run, on the evaluation below"
    elif "self_forcing" in st:
        choice = "the better of (b) and (b)+(c) on the evaluation below"
    else:
        choice = "stage (c) was not run for these weights"
    default_reproduce = (
        f"`toolkit train --out DIR --seed {record['seed']}` runs the four stages with the settings above (`toolkit "
        "train --help`; `--base-seconds` and `--teacher-seconds` give the pretraining stages a time budget, which "
        "fixes their step count after 20 timed steps); `--stages base`, `--stages teacher` and then `--stages "
        "ode_init,self_forcing` split it over processes (a command on the GPU machine may run 10 minutes): "
        "`benchmarks/train_bundled.sh`.")
    for stage, label in (("ode_init", "(b)"), ("self_forcing", "(c)")):
        seeds_by_start: dict[str, list[str]] = {}  # start -> the seeds of the continued runs from it
        for more in st.get(stage, {}).get("continued", []):
            start = "self_forcing" if "start_record" in more else stage
            seeds_by_start.setdefault(start, []).append(str(more.get("seed", "?")))
        for start, run_seeds in seeds_by_start.items():
            command = f"`--stages {stage} {START_FLAGS[stage]} {start} --force --seed S` (S = {', '.join(run_seeds)})"
            if start == stage:
                then = ", before stage (c)" if stage == "ode_init" and "self_forcing" in st else ""
                default_reproduce += f" Stage {label} was then trained further with {command}{then}."
            else:
                then = ", then stage (c) again" if "self_forcing" in st else ""
                default_reproduce += (f" After stage (c), stage {label} started a second round from the stage-(c) "
                                      f"student with {command}{then}.")
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

The teacher's classifier-free guidance (null prompt = all-zero context), used for its ODE pairs, as DMD's real
score and for its own samples: **{guidance_text}** ({guidance.get('chosen_by', '?')}; its 40-step
samples on validation prompts, seeds disjoint from the evaluation's):{validation}

The student starts from **base** (the shipped architecture, {base_size}, pretrained by the same
flow-matching objective as the teacher); the **teacher** is {teacher_text}: its 40-step samples are the ODE pairs'
source and it is DMD's real score (Self-Forcing's roles of Wan2.1-1.3B and Wan2.1-14B).{widen_text}

Shipped: the **{record.get('shipped', '?')}** student ({choice}). {record.get('stages_note', '')}

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
