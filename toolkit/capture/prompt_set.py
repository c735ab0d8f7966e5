"""Prompt sets: one capture per (prompt, seed) in a folder, with an index, resumable, sharded over ranks.

    prompts = read_prompts("vbench.txt")                              # one prompt per line
    plan = PromptSet(prompts, seeds=range(5))                         # items in a fixed order: prompt-major
    index = capture_prompt_set("runs/set", plan, Selection(layers="0,8", steps="3"), RunSettings("self-forcing"))

The folder holds ``p{prompt:04d}_s{seed:04d}.h5`` per item (the prompt's position in the list, the seed itself:
appending prompts or seeds keeps every name) and ``index.json`` (`INDEX_FILE`: prompts, seeds, settings, and per
capture its file, status, rank, device, seconds, size). Under ``torchrun`` (``WORLD_SIZE`` > 1) rank r captures the
items i with i % world == r on device ``cuda:LOCAL_RANK`` (when the run asks for a GPU), loading the model once;
rank 0 writes the index before the work starts (so an interrupted set is recognised and resumed) and again after
every rank has finished (``gather``: the ranks' timings reach rank 0, and rank 0 then reads every file's status
itself). Only a few kilobytes of Python objects cross ranks, so the process group is ``gloo`` on every machine.

Resuming (``resume=True``): a complete capture of the same run (`finished_records`) is skipped without loading
the model; an interrupted one is continued through the capture store's own resume (its finished records kept);
a missing one is captured. ``force=True`` replaces each item's file when its new capture is ready to start.
Everything that can be refused is checked identically on every rank before any rank writes, so a refusal stops
all ranks with the same one line. The design is in ``docs/prompt-sets.md``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from toolkit.capture.selection import Plan, Selection, resolve
from toolkit.errors import OutputError, ToolkitError
from toolkit.models import registry

INDEX_FILE = "index.json"
INDEX_FORMAT = "toolkit-prompt-set"
INDEX_VERSION = 1
FILE_PATTERN = "p*_s*.h5"  # what counts as existing output of a set in a folder (with INDEX_FILE)
# Ranks finish at different times (a resumed set can leave one rank nothing to do), and the final gather waits for
# the slowest: gloo's default 30 minutes would abort a long set. A crashed rank is caught by torchrun, which stops
# the others.
GATHER_TIMEOUT = datetime.timedelta(days=2)
ENCODE_BATCH = 32  # umT5 prompts encoded per call before the captures start (the embeddings cache serves the rest)


class PromptSetError(ToolkitError):
    """A prompt set that cannot be run as asked (bad prompt file or seeds, an index of another set)."""


def item_file(prompt_index: int, seed: int) -> str:
    """The capture file of one (prompt, seed): the prompt's position in the set's list and the seed itself."""
    return f"p{prompt_index:04d}_s{seed:04d}.h5"


@dataclass(frozen=True)
class SetItem:
    """One capture of a set: ``index`` is its position in the set's fixed order (prompt-major)."""

    index: int
    prompt_index: int
    prompt: str
    seed: int

    @property
    def file(self) -> str:
        return item_file(self.prompt_index, self.seed)


@dataclass(frozen=True)
class PromptSet:
    """Prompts × seeds, in a fixed order: every seed of prompt 0, then of prompt 1, ..."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]

    def __init__(self, prompts: Iterable[str], seeds: Iterable[int]) -> None:
        prompts, seeds = tuple(str(p) for p in prompts), tuple(int(s) for s in seeds)
        if not prompts or not seeds:
            raise PromptSetError("a prompt set needs at least one prompt and one seed")
        if any(not p.strip() for p in prompts):
            raise PromptSetError("a prompt set holds an empty prompt")
        if len(set(prompts)) != len(prompts):
            raise PromptSetError(f"prompt {next(p for p in prompts if prompts.count(p) > 1)!r} is given twice")
        if len(set(seeds)) != len(seeds):
            raise PromptSetError("a seed is given twice")
        if any(not 0 <= s < 2**63 for s in seeds):  # file names carry the seed: non-negative, 64-bit
            raise PromptSetError("seeds of a prompt set are integers in 0 .. 2^63-1")
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "seeds", seeds)

    @property
    def items(self) -> tuple[SetItem, ...]:
        return tuple(SetItem(i * len(self.seeds) + j, i, p, s)
                     for i, p in enumerate(self.prompts) for j, s in enumerate(self.seeds))

    def shard(self, rank: int, world: int) -> list[SetItem]:
        """The items rank ``rank`` of ``world`` captures: position i with i % world == rank."""
        return [it for it in self.items if it.index % world == rank]


def read_prompts(path: str | os.PathLike) -> list[str]:
    """A prompt file: one prompt per line (VBench's format); blank lines are skipped, surrounding spaces kept off."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptSetError(f"--prompts {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PromptSetError(f"--prompts {path}: cannot read it ({err})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptSetError(f"--prompts {path} holds no prompt (one per line)")
    if len(set(prompts)) != len(prompts):
        twice = next(p for p in prompts if prompts.count(p) > 1)
        raise PromptSetError(f"--prompts {path}: {twice!r} is given twice")
    return prompts


@dataclass(frozen=True)
class RunSettings:
    """What every capture of a set shares (the `toolkit.pipeline.prepare_run` arguments besides prompt and seed)."""

    model: str = registry.DEFAULT_MODEL
    checkpoint: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "dense"
    noise: str = "toolkit"
    sampling: dict[str, Any] = field(default_factory=dict)  # clip length / rolling cache (`pipeline.spec_layout`)


# ---- ranks ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of a set (``torchrun``'s RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        try:
            rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
            local = int(os.environ.get("LOCAL_RANK", rank))
        except ValueError:
            raise PromptSetError("RANK / WORLD_SIZE / LOCAL_RANK are not integers") from None
        if not 0 <= rank < world:
            raise PromptSetError(f"RANK {rank} is not in 0..WORLD_SIZE-1 ({world})")
        return cls(rank, world, local)

    def device(self, requested: str) -> str:
        """One GPU per rank: ``auto`` / ``cuda`` become ``cuda:LOCAL_RANK`` when there are several ranks and CUDA;
        an explicit ``cuda:N`` or ``cpu`` is kept."""
        import torch

        if self.world > 1 and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` on rank 0 (in rank order), None elsewhere; also a barrier."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(value, out, dst=0)
        return out


@contextlib.contextmanager
def process_group(ranks: Ranks) -> Iterator[Ranks]:
    """Join the ranks' ``gloo`` group for the body (nothing for a single process); torchrun's environment
    (MASTER_ADDR, MASTER_PORT) says where to meet."""
    if ranks.world == 1:
        yield ranks
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world, timeout=GATHER_TIMEOUT)
    try:
        yield ranks
        # every rank's sends are finished before any rank tears the group down: a gloo worker thread still
        # holding the last gather_object's work aborts the process ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---- one item's state on disk --------------------------------------------------------------------------------------
def finished_records(path: str | os.PathLike, plan: Plan, settings: RunSettings, *, prompt: str,
                     seed: int) -> int | None:
    """The number of records of the capture at ``path`` if it is complete and was made with these settings (those
    known without loading the model: layout or checkpoint path, selection, model, prompt, seed, attention, noise,
    dtype), else None (missing, interrupted, another run, not a capture). The check of ``toolkit capture --resume``
    and of a prompt set's items; the store's own resume check (`store.resume_mismatches`) follows when a run
    continues a file."""
    import h5py
    import numpy as np

    from toolkit.capture.store import FORMAT_NAME, _attr, _selection_attrs

    try:
        f = h5py.File(path, "r")
    except OSError:
        return None
    with f:
        a = f.attrs
        if a.get("format") != FORMAT_NAME or str(a.get("complete")) != "1" or "record_complete" not in f:
            return None
        expected = {"selection": _attr(_selection_attrs(plan)), "model": settings.model, "prompt": prompt,
                    "seed": seed, "attention": settings.attention, "noise": settings.noise}
        if settings.checkpoint is None:
            expected["layout"] = _attr(plan.layout.to_attrs())
        else:  # its config.json decides the layout: the same weights path, no weights read
            expected["checkpoint"] = str(registry.find_weights(settings.model, settings.checkpoint))
        if settings.dtype != "auto":
            expected["compute_dtype"] = settings.dtype
        if any(str(a.get(k)) != str(v) for k, v in expected.items()):
            return None
        return int(np.count_nonzero(f["record_complete"][...]))


def _file_status(path: Path, plan: Plan, settings: RunSettings, item: SetItem) -> str:
    if finished_records(path, plan, settings, prompt=item.prompt, seed=item.seed) is not None:
        return "complete"
    return "incomplete" if path.exists() else "missing"


# ---- the index -----------------------------------------------------------------------------------------------------
def settings_key(plan: Plan, settings: RunSettings) -> dict:
    """What makes two sets' captures comparable: the run settings, the selection and (without a checkpoint) the
    registry layout. A resumed set must have the same key. The device is left out, as for one capture's resume:
    a set started on 8 GPUs may be finished on 4, or ``--device auto`` resumed with ``--device cuda``."""
    from toolkit.capture.store import _selection_attrs

    run = {k: v for k, v in asdict(settings).items() if k != "device"}
    key = {"run": run, "selection": _selection_attrs(plan)}
    if settings.checkpoint is None:
        key["layout"] = plan.layout.to_attrs()
    return json.loads(json.dumps(key, default=str))


def read_index(folder: str | os.PathLike) -> dict:
    """``folder``/index.json, checked to be a prompt set's index (`PromptSetError` otherwise)."""
    path = Path(folder) / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptSetError(f"{folder}: no {INDEX_FILE} (not a prompt-set folder of toolkit capture)") from None
    except (OSError, ValueError) as err:
        raise PromptSetError(f"{path}: cannot read it as a prompt-set index ({err})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("captures"),
                                                                                              list):
        raise PromptSetError(f"{path} is not a prompt-set index")
    return index


def is_prompt_set(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX_FILE))


def _write_index(folder: Path, index: dict) -> None:
    """Atomically: a temporary file, fsynced, renamed over the old index."""
    tmp = folder / f".{INDEX_FILE}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / INDEX_FILE)
    except OSError as err:
        raise OutputError(f"cannot write {folder / INDEX_FILE}: {err.strerror or err}") from None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_resumable(folder: Path, prompt_set: PromptSet, key: dict) -> dict | None:
    """Under ``resume``: the folder's index must be of a set with the same settings, and every file name both sets
    use must mean the same (prompt, seed). Returns the old index (None when there is none)."""
    if not (folder / INDEX_FILE).exists():
        return None
    old = read_index(folder)
    if old.get("settings") != key:
        was = old.get("settings") if isinstance(old.get("settings"), dict) else {}
        diff = [f"{group}.{name}" for group in sorted(set(was) | set(key))
                for name in sorted(set(was.get(group) or {}) | set(key.get(group) or {}))
                if (was.get(group) or {}).get(name) != (key.get(group) or {}).get(name)]
        raise PromptSetError(f"--resume: {folder} holds a set captured with different settings "
                             f"({', '.join(diff) or 'settings'}); use the same ones, --force to replace it, or "
                             "another --out")
    ours = {it.file: (it.prompt, it.seed) for it in prompt_set.items}
    for entry in old["captures"]:
        mine = ours.get(entry.get("file"))
        if mine is not None and mine != (entry.get("prompt"), entry.get("seed")):
            raise PromptSetError(f"--resume: {folder}/{entry['file']} is prompt {entry.get('prompt')!r} seed "
                                 f"{entry.get('seed')} in the existing index, but {mine[0]!r} seed {mine[1]} here "
                                 "(the prompt list changed order?); use --force or another --out")
    return old


# ---- the run -------------------------------------------------------------------------------------------------------
@dataclass
class ItemResult:
    """What one rank did with one item (gathered on rank 0 for the index)."""

    file: str
    action: str  # "captured" | "resumed" | "replaced" | "skipped"
    rank: int
    device: str = ""
    seconds: float | None = None  # sampling + writing, model load excluded
    records: int | None = None


@dataclass
class RankReport:
    rank: int
    device: str = ""
    load_seconds: float | None = None  # model load (+ prompt encoding), once per rank; None: nothing to capture
    items: list[ItemResult] = field(default_factory=list)
    provenance: dict | None = None  # of the rank's first capture, prompt and seed left out


def capture_prompt_set(folder: str | os.PathLike, prompt_set: PromptSet, select: Selection, settings: RunSettings,
                       *, resume: bool = False, force: bool = False, ranks: Ranks | None = None,
                       command: str = "", say: Callable[[str], None] | None = None,
                       progress: bool = False) -> dict | None:
    """Capture every item of ``prompt_set`` this rank owns into ``folder``; returns the final index on rank 0
    (None on the other ranks). ``ranks``: default from the environment (torchrun), joining the process group for
    the call. ``say``: where progress lines go (default: nowhere)."""
    from toolkit.errors import check_output, prepare_output_dir
    from toolkit.pipeline import spec_layout

    ranks = ranks or Ranks.from_env()
    say = say or (lambda line: None)
    folder = Path(folder)
    plan = resolve(select, spec_layout(settings.model, **settings.sampling))  # refused before anything loads
    key = settings_key(plan, settings)
    with process_group(ranks):
        # the same checks on every rank, before any rank writes: a refusal stops them all with the same line
        note = check_output(folder, force=force, resume=resume, folder=True, outputs=(INDEX_FILE, FILE_PATTERN),
                            can_resume=True)
        old = check_resumable(folder, prompt_set, key) if resume else None
        prepare_output_dir(folder, folder=True)
        ranks.barrier()  # every rank has read the old index before rank 0 replaces it
        if note and ranks.rank == 0:
            say(note)
        started = _now()
        if ranks.rank == 0:
            _write_index(folder, _index(folder, prompt_set, plan, settings, key, old, ranks, command, started,
                                        reports=None))
        report = _run_shard(folder, prompt_set.shard(ranks.rank, ranks.world), select, plan, settings, ranks,
                            resume=resume, force=force, command=command, say=say, progress=progress)
        reports = ranks.gather(report)
        if ranks.rank != 0:
            return None
        index = _index(folder, prompt_set, plan, settings, key, old, ranks, command, started, reports=reports)
        _write_index(folder, index)
        return index


def _encode_ahead(spec: registry.ModelSpec, prompts: Sequence[str], device: str) -> None:
    """Fill the umT5 embeddings cache for ``prompts`` in a few batches, so the per-item conditioning reads the
    cache instead of loading the encoder (11 GB) once per prompt. Toy-prompt models need nothing."""
    if spec.conditioning != "umt5" or not prompts:
        return
    from toolkit.device import resolve_device
    from toolkit.models import text_encoder

    for i in range(0, len(prompts), ENCODE_BATCH):
        text_encoder.encode_prompts(list(prompts[i:i + ENCODE_BATCH]), device=resolve_device(device))


def _run_shard(folder: Path, items: list[SetItem], select: Selection, plan: Plan, settings: RunSettings,
               ranks: Ranks, *, resume: bool, force: bool, command: str, say: Callable[[str], None],
               progress: bool) -> RankReport:
    from toolkit.capture.recorder import capture
    from toolkit.capture.store import CaptureLock
    from toolkit.pipeline import prepare_run, redraw, sample

    device = ranks.device(settings.device)
    report = RankReport(ranks.rank, device)
    todo = []
    for it in items:
        path = folder / it.file
        if resume and finished_records(path, plan, settings, prompt=it.prompt, seed=it.seed) is not None:
            report.items.append(ItemResult(it.file, "skipped", ranks.rank, device))
        else:
            todo.append(it)
    tag = f"rank {ranks.rank}: " if ranks.world > 1 else ""
    if len(todo) < len(items):
        say(f"{tag}{len(items) - len(todo)} of {len(items)} captures already complete")
    if not todo:
        return report
    t0 = time.perf_counter()
    _encode_ahead(registry.get_spec(settings.model), list(dict.fromkeys(it.prompt for it in todo)), device)
    base = prepare_run(settings.model, prompt=todo[0].prompt, seed=todo[0].seed, checkpoint=settings.checkpoint,
                       device=device, dtype=settings.dtype, attention=settings.attention, noise=settings.noise,
                       **settings.sampling)
    layout = base.layout()
    if layout != plan.layout:  # a --checkpoint whose config differs from the registry's: check the plan again
        resolve(select, layout)
    report.load_seconds = time.perf_counter() - t0
    report.device = str(base.device)
    for n, it in enumerate(todo, 1):
        run = redraw(base, prompt=it.prompt, seed=it.seed)
        path = folder / it.file
        provenance = {**run.provenance(), "history_command": f"{command} (prompt set item {it.file})".strip(),
                      "prompt_set_index": it.index, "prompt_index": it.prompt_index}
        exists = path.exists()
        if exists and force:
            with CaptureLock(str(path)):  # the old file goes only now that its replacement is ready to start
                path.unlink()
        action = "replaced" if exists and force else ("resumed" if exists else "captured")
        t1 = time.perf_counter()
        with capture(run.model, select, path, layout=layout, provenance=provenance, resume=exists and resume,
                     progress=progress) as rec:
            sample(run, progress=False)
        seconds = time.perf_counter() - t1
        report.items.append(ItemResult(it.file, action, ranks.rank, str(run.device), round(seconds, 3),
                                       rec.records_written))
        if report.provenance is None:
            report.provenance = {k: v for k, v in provenance.items()
                                 if k not in ("prompt", "seed", "history_command", "prompt_set_index", "prompt_index")}
        say(f"{tag}[{n}/{len(todo)}] {it.file} ({action}, seed {it.seed}): {rec.records_written} records in "
            f"{seconds:.1f} s")
    return report


def _index(folder: Path, prompt_set: PromptSet, plan: Plan, settings: RunSettings, key: dict, old: dict | None,
           ranks: Ranks, command: str, started: str, *, reports: list[RankReport] | None) -> dict:
    """The index: before the work (``reports`` None: statuses read from the files, nothing timed yet) or after it
    (every file's status read again by rank 0; timings from the ranks, earlier ones kept for skipped items)."""
    from toolkit._version import __version__

    before = {e.get("file"): e for e in (old or {}).get("captures", [])}
    done = {r.file: r for rep in (reports or []) for r in rep.items}
    captures = []
    for it in prompt_set.items:
        path = folder / it.file
        entry: dict[str, Any] = {"file": it.file, "prompt_index": it.prompt_index, "prompt": it.prompt,
                                 "seed": it.seed, "status": _file_status(path, plan, settings, it)}
        r = done.get(it.file)
        earlier = before.get(it.file, {})
        if r is not None and r.action != "skipped":
            entry.update(action=r.action, rank=r.rank, device=r.device, seconds=r.seconds, records=r.records)
        else:  # skipped, or not yet run: what an earlier run measured, if anything
            entry.update({k: earlier[k] for k in ("action", "rank", "device", "seconds", "records") if k in earlier})
            if r is not None:
                entry["action"] = "skipped"
        entry["bytes"] = path.stat().st_size if path.exists() else 0
        captures.append(entry)
    timed = [c["seconds"] for c in captures if c.get("seconds") is not None and c.get("action") != "skipped"]
    provenance = next((rep.provenance for rep in (reports or []) if rep.provenance), None)
    index = {
        "format": INDEX_FORMAT, "format_version": INDEX_VERSION,
        "complete": all(c["status"] == "complete" for c in captures),
        "prompts": list(prompt_set.prompts), "seeds": list(prompt_set.seeds),
        "settings": key, "world_size": ranks.world, "command": command, "toolkit_version": __version__,
        "started": started, "updated": _now(),
        "provenance": provenance if provenance is not None else (old or {}).get("provenance"),
        "ranks": [{"rank": rep.rank, "device": rep.device, "load_seconds": rep.load_seconds,
                   "captured": sum(r.action != "skipped" for r in rep.items)} for rep in reports or []],
        "seconds_per_capture": round(sum(timed) / len(timed), 3) if timed else None,
        "captures": captures,
    }
    return index


def index_files(folder: str | os.PathLike, *, allow_incomplete: bool = False) -> list[tuple[str, dict]]:
    """The captures a prompt set's index lists, as (path, entry), in the set's order. A capture that is not
    complete on disk is refused (one line, how many) unless ``allow_incomplete``: then interrupted ones are kept
    (their complete records are analysed) and missing ones left out."""
    index = read_index(folder)
    out, missing, incomplete = [], [], []
    for entry in index["captures"]:
        path = os.path.join(folder, entry["file"])
        if not os.path.isfile(path):
            missing.append(entry["file"])
            continue
        if entry.get("status") != "complete" and not _complete_on_disk(path):
            incomplete.append(entry["file"])
        out.append((path, entry))
    if (missing or incomplete) and not allow_incomplete:
        raise PromptSetError(f"{folder}: {len(missing) + len(incomplete)} of {len(index['captures'])} captures are "
                             f"not finished (e.g. {(missing or incomplete)[0]}); finish them with toolkit capture "
                             "--resume, or pass --allow-incomplete to analyse what is there")
    if not out:
        raise PromptSetError(f"{folder}: no capture of the set is on disk yet")
    return out


def _complete_on_disk(path: str) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs.get("complete")) == "1"
    except OSError:
        return False


def print_index_summary(index: dict, out: TextIO = sys.stderr) -> None:
    """One line: how many captures are complete, the mean time per capture and where."""
    n = len(index["captures"])
    ok = sum(c["status"] == "complete" for c in index["captures"])
    per = index.get("seconds_per_capture")
    devices = sorted({r["device"] for r in index.get("ranks", []) if r.get("device")})
    print(f"prompt set: {ok} of {n} captures complete ({len(index['prompts'])} prompts × {len(index['seeds'])} "
          f"seeds)" + (f"; {per:.1f} s per capture on {', '.join(devices)}" if per else ""), file=out)
