"""The bundled model's training recipe — Self-Forcing's, at toy scale — and the evaluation that picks what ships.

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
and both evaluations), ``train_log.json``, ``curves.png`` and ``rollout.png``/``.gif`` (``card.py``). When a
continued (c) is not shipped, its record is marked ``kept: false`` and the next fresh (c) starts from the shipped
student; a resumed one continues the dropped run.

An existing model is never replaced without ``force=True``: ``check_output`` refuses before anything is trained.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from toolkit.device import resolve_device
from toolkit.errors import ToolkitError
from toolkit.models.bundled import evaluate
from toolkit.models.bundled.card import (
    cfg_label,
    format_summary,
    guidance_of,
    save_showcase,
    write_artifacts,
)
from toolkit.models.bundled.config import (
    MANY_STEPS,
    STAGES,
    START_FLAGS,
    TEACHER_EVAL,
    WEIGHTS_FILE,
    bundled_config,
    clip_shape,
    frames_per_chunk,
    teacher_config,
)
from toolkit.models.bundled.grow import function_change, model_size, widened
from toolkit.models.bundled.model import (
    UnreadPlacesWarning,
    as_stored,
    generate,
    load_weights,
    save_weights,
    stored_config,
)
from toolkit.models.bundled.ode_init import ODE_STARTS, ODESettings, train_ode_init
from toolkit.models.bundled.self_forcing import SF_STARTS, SelfForcingSettings, train_self_forcing
from toolkit.models.bundled.teacher import ClipSetup, Log, TeacherSettings, autocast, teacher_sampler, train_teacher
from toolkit.models.checkpoints import file_sha256
from toolkit.models.seam import use_backend
from toolkit.models.wan import WanConfig, WanModel

NEEDS = {"base": (), "teacher": (), "ode_init": ("base", "teacher"), "self_forcing": ("ode_init", "teacher")}
STUDENT_STAGES = ("base", "ode_init", "self_forcing")  # the student's architecture (``widen_students``)
GUIDANCE_CANDIDATES = (1.0, 2.0, 3.0, 4.5)
VALIDATION_PROMPT_SEED, VALIDATION_NOISE_SEED = 1_000_303, 1_000_403  # not the evaluation's held-out seeds


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


def last_run_dropped(record: dict) -> bool:
    """Whether the evaluation after the last stage-(c) run kept the student from before it (``kept`` false)."""
    runs = record["stages"].get("self_forcing", {}).get("continued", [])
    return bool(runs) and runs[-1].get("kept") is False


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
        runs = list(earlier.get("continued", []))
        if summary.get("resumed") and runs:  # it carries on the run before, whose weights are in the lineage again
            runs[-1] = {k: v for k, v in runs[-1].items() if k != "kept"}
        return {**earlier, "continued": [*runs, more]}

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
    elif sf_continues and not recipe.self_forcing.resume and last_run_dropped(record):
        # the stage file holds the dropped run's student (its state file resumes it); a fresh run starts from the
        # student the evaluation kept, which is the one shipped
        student = load_weights(out / WEIGHTS_FILE, None, dev).requires_grad_(True)
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
    teacher_key = dict(weights=file_sha256(stage_path(out, "teacher"), cache=False),
                       guidance=[guidance, list(interval) if interval else None],
                       prompts=hashlib.sha256("\n".join(map(str, prompts)).encode()).hexdigest()[:16],
                       seeds=list(seeds),
                       device=record["device"], precision=record["precision"])
    kept_teacher = earlier_evaluation.get(TEACHER_EVAL)
    kept_teacher = kept_teacher if kept_teacher and kept_teacher.get("of") == teacher_key else None
    models = [("random_init", random_init.eval(), {}), *[(n, m, {}) for n, m in candidates.items()],
              *([] if kept_teacher else [(TEACHER_EVAL, teacher, teacher_sampler(guidance, interval))])]
    for name, model, sampler in models:  # ground truth depends only on the prompts and seeds: scored once
        with warnings.catch_warnings():
            if name == "random_init":  # random weights read no channel: the places warning is for trained models
                warnings.simplefilter("ignore", UnreadPlacesWarning)
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
    if shipped == "self_forcing_start":  # this run's weights are dropped: a later fresh run starts from the shipped
        record["stages"]["self_forcing"]["continued"][-1]["kept"] = False  # ones (--sf-resume continues this run)
    record.update(evaluation=results, evaluation_seconds=round(time.perf_counter() - start, 1), shipped=shipped,
                  eval_prompts=len(prompts), eval_seeds=len(seeds), eval_placed=recipe.placed > 0,
                  paired=comparisons)
    log_file.write_text(json.dumps(record, indent=1) + "\n")  # a later continued stage reads the evaluation here
    log(f"shipping the {shipped} student")
    write_artifacts(out, candidates[shipped], teacher, record, log)
    return record


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


