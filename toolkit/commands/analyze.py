"""``toolkit analyze NAME RUN.h5 [RUN.h5 ...] --out results.nc``: one generic dispatcher for every analysis.

An analysis is a module ``toolkit.analysis.NAME`` with an options dataclass and ``analyze(cap, records, options,
device=..., progress=...) -> xr.Dataset`` (see ``toolkit/analysis/__init__.py``); this module owns its command
line: ``ARGUMENTS[NAME]`` adds its options to a parser and `options_from_args` maps the parsed arguments onto the
dataclasses. Its options are parsed after the name, so ``toolkit --help`` never imports torch. One RUN file runs
in this process; several are mapped over with dask (threads here, or the cluster at ``--scheduler ADDRESS``) and
stacked along ``record`` with a ``run`` coordinate: the shortest trailing path that tells the files apart (the
basename, or ``a/run.h5`` and ``b/run.h5``); the ``runs`` attribute lists their absolute paths. A prompt-set folder
(``toolkit capture --prompts FILE --seeds LIST --out DIR``, docs/prompt-sets.md) stands for the captures its index
lists, and their records also carry ``prompt`` (position in the set's list) and ``seed``. Captures of different
token grids or analysed heads are refused (they would be NaN-padded) unless ``--stack-mismatched``. The result's
``record`` dim is indexed by ``run, (prompt, seed,) step, chunk, layer`` in memory; the file stores those
coordinates unindexed (``toolkit.analysis.open_results`` restores the index).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType

    import xarray as xr

    from toolkit.analysis.approximations import ApproximationOptions
    from toolkit.analysis.monarch import MonarchOptions
    from toolkit.analysis.partial import RecordSink
    from toolkit.analysis.periodic import PeriodicOptions
    from toolkit.analysis.records import RecordSelection
    from toolkit.analysis.topk import TopkOptions

    AnalysisOptions = TopkOptions | PeriodicOptions | MonarchOptions | ApproximationOptions

# name -> module; order = order in the help text.
ANALYSES = {
    "periodic": "toolkit.analysis.periodic",
    "topk": "toolkit.analysis.topk",
    "monarch": "toolkit.analysis.monarch",
    "approximations": "toolkit.analysis.approximations",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        epilog=(
            'examples:\n'
            '  toolkit analyze topk run.h5 --out topk.nc                    oracle top-k error and coverage\n'
            '  toolkit analyze monarch run.h5 --out monarch.nc --layers 0   Monarch error per tiling, one layer\n'
            '  toolkit analyze approximations run.h5 --out approx.nc        every approximation family per map\n'
            '  toolkit analyze periodic runs/set/ --out periodic.nc         every capture of a prompt set\n'
        ),
        help="analyse captured attention (periodic structure, oracle top-k, Monarch error, every approximation family)",
        description="Recompute exact attention from a capture's q/k(/v) and analyse it record by record. "
                    "`toolkit analyze NAME --help` lists the options of one analysis.",
        usage="toolkit analyze {" + ",".join(ANALYSES) + "} RUN.h5 [RUN.h5 ...] | SET_DIR --out RESULTS.nc "
              "[options]",
    )
    p.add_argument("analysis", choices=list(ANALYSES), help="which analysis")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def index_list(text: str) -> list[int] | None:
    """argparse type of ``--steps/--chunks/--layers/--heads``: ``"all"`` -> None, ``"0,3,8-10"`` -> ints."""
    text = str(text).strip()
    if text == "all":
        return None
    from toolkit.indices import index_range

    out: set[int] = set()
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            values = index_range(part)  # the capture selection's grammar; sizes are checked against the file later
            if values.start < 0:
                raise ValueError(part)
            out.update(values)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not 'all' or a list like 0,3,8-10") from None
    if not out:
        raise argparse.ArgumentTypeError("empty selection")
    return sorted(out)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive integer")
    return value


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every analysis shares (record selection, device, output, parallelism)."""
    parser.add_argument("runs", nargs="+", metavar="RUN.h5", help="capture file(s), or one prompt-set folder of "
                                                                    "toolkit capture --prompts (its index.json)")
    parser.add_argument("--out", required=True, help="results file (.nc, NetCDF4/HDF5); written record by record "
                                                      "(an interrupted run leaves a partial file, complete = 0)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--force", action="store_true",
                          help="replace an existing result of this analysis in --out")
    existing.add_argument("--resume", action="store_true",
                          help="continue an interrupted run into --out (same analysis, options and inputs): "
                               "finished records are kept, missing ones computed")
    sel = parser.add_argument_group("record selection (default: everything stored)")
    for flag, what in (("--steps", "steps"), ("--chunks", "chunks"), ("--layers", "layers"), ("--heads", "heads")):
        sel.add_argument(flag, type=index_list, default=None, metavar="LIST", help=f"{what}: 'all' or e.g. 0,3,8-10")
    sel.add_argument("--allow-incomplete", action="store_true",
                     help="analyse the complete records of an interrupted capture")
    run_opts = parser.add_argument_group("execution")
    run_opts.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    run_opts.add_argument("--query-chunk", type=positive_int, default=None, metavar="N",
                          help="query rows per exact-attention block (default: sized to a fixed memory budget)")
    run_opts.add_argument("--scheduler", default=None, metavar="ADDRESS",
                          help="dask.distributed scheduler for several RUN files (default: local threads)")
    run_opts.add_argument("--workers", type=positive_int, default=None,
                          help="local dask threads (default: #RUN files, ≤ 4)")
    run_opts.add_argument("--quiet", "--no-progress", dest="progress", action="store_false",
                          help="no progress bars (as `toolkit capture --quiet`)")
    run_opts.add_argument("--stack-mismatched", action="store_true",
                          help="stack RUN files whose token grids or analysed heads differ (the result is NaN-padded "
                               "where a run has no such head / offset; default: refuse)")


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma list of numbers") from None
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def add_topk_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``toolkit analyze topk`` (defaults from `toolkit.analysis.topk.TopkOptions`)."""
    from toolkit.analysis.topk import TopkOptions

    d = TopkOptions()
    g = parser.add_argument_group("topk")
    g.add_argument("--masses", type=_float_list, default=d.masses, metavar="P,P,...",
                   help="coverage masses, each in (0, 1) (default " + ",".join(map(str, d.masses)) + ")")
    g.add_argument("--sparsities", type=_float_list, default=d.sparsities, metavar="S,S,...",
                   help="fractions of keys dropped, each in [0, 1) (default " + ",".join(map(str, d.sparsities))
                        + ")")
    g.add_argument("--method", choices=("auto", "radix", "sort"), default=d.method,
                   help="row threshold search: radix (histogram + exact refinement, float32) or full sort")


def add_periodic_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``toolkit analyze periodic`` (defaults from `toolkit.analysis.periodic.PeriodicOptions`)."""
    from toolkit.analysis.periodic import PeriodicOptions

    d = PeriodicOptions()
    g = parser.add_argument_group("periodic")
    g.add_argument("--spike-factor", type=float, default=d.spike_factor,
                   help=f"spike = residual A - D above this many times the uniform weight 1/n_keys "
                        f"(default {d.spike_factor:g})")
    g.add_argument("--n-spikes", type=int, default=d.n_spikes,
                   help=f"largest spikes kept per query (default {d.n_spikes})")
    g.add_argument("--spatial-threshold", type=float, default=d.spatial_threshold,
                   help=f"mean own-frame mass for a spatial head (default {d.spatial_threshold:g})")
    g.add_argument("--temporal-threshold", type=float, default=d.temporal_threshold,
                   help=f"mean same-(row,col) other-frame mass for a temporal head (default "
                        f"{d.temporal_threshold:g})")


def add_monarch_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``toolkit analyze monarch`` (defaults from `toolkit.analysis.monarch.MonarchOptions`)."""
    from toolkit.analysis.monarch import MonarchOptions
    from toolkit.attention.monarch import R_STEPS

    d = MonarchOptions()
    g = parser.add_argument_group("Monarch")
    g.add_argument("--layout", action="append", default=None, metavar="SPEC",
                   help="Monarch layout, repeatable: BASE:F,H,W (bases fh,w w,fh f,hw hw,f fw,h h,fw; tiling "
                        "f_tied,h_reduce,w_reduce), contiguous:B1xB2 (misaligned control), or a preset: 'default' "
                        "(the paper's tilings, all aligned bases, two contiguous controls) or 'fh,w:all' (every "
                        "fh,w tiling: error-vs-sparsity curves); presets keep what fits the records")
    g.add_argument("--iters", type=int, default=None,
                   help=f"variational MonarchAttention iterations T=1..N (0: skip; default {d.iters})")
    g.add_argument("--full", action="store_true",
                   help="on the CPU, the full sweep: every record, the default layouts, T = 1..3 (without it, a "
                        "CPU run given no --layout/--iters/--steps/--chunks/--layers analyses one step of the last "
                        "chunk with fh,w (1,1,1) and (3,1,1) at T = 1, which finishes the default bundled capture "
                        "in minutes)")
    g.add_argument("--no-projection", action="store_true", help="skip the exact Frobenius projection")
    g.add_argument("--no-topk", action="store_true", help="skip the oracle top-k baseline")
    g.add_argument("--rank1", choices=("auto", "eigh", "power"), default=d.rank1,
                   help="rank-1 solver of the exact projection (auto = power: repeated squaring + power "
                        "iteration with an eigh fallback)")
    g.add_argument("--r-step", choices=R_STEPS, default=d.r_step,
                   help="variational R-step for T > 1: 'exact' (the exact maximiser; objective never decreases) "
                        "or 'monarchrt' (the MonarchRT authors' update, R-logits scaled by "
                        "min(1/(c_R + 1e-6), 1e4), to reproduce their T = 10/20 numbers; up to ~0.5 relative "
                        "apart on sharp maps). Same at T = 1; stored as the result's r_step attribute (default "
                        f"{d.r_step})")




def add_approximations_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``toolkit analyze approximations`` (defaults from `ApproximationOptions`)."""
    from toolkit.analysis.approximations import ApproximationOptions

    d = ApproximationOptions()
    g = parser.add_argument_group("approximations (docs/approximation-families.md)")
    g.add_argument("--families", type=_family_list, default=d.families, metavar="LIST",
                   help="';'-separated families: templates set to each density (topk; blocktopk:TF,TH,TW; "
                        "blocktopk-pred:TF,TH,TW; sta:TF,TH,TW; radial[:DENSE_FRAMES]; monarch; "
                        "monarch-projection), svg (a ladder of bands), or concrete --attention family specs "
                        f"(one point each, e.g. py:mymodule:myfn); default {';'.join(d.families)}")
    g.add_argument("--densities", type=_float_list, default=d.densities, metavar="LIST",
                   help="target densities, fraction of the exact attention's query-key pairs computed (default "
                        f"{','.join(f'{x:g}' for x in d.densities)}: 95, 90, 85 %% sparsity)")
    g.add_argument("--full", action="store_true",
                   help="on the CPU, every record (without it, a CPU run given no --steps/--chunks/--layers analyses "
                        "the last chunk's last denoising step, every layer)")


def _family_list(text: str) -> tuple[str, ...]:
    from toolkit.analysis.approximations import template_kind
    from toolkit.errors import ToolkitError

    items = tuple(x.strip() for x in text.split(";") if x.strip())
    if not items:
        raise argparse.ArgumentTypeError("empty family list")
    try:
        for item in items:
            template_kind(item)
    except ToolkitError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return items


def apply_cpu_default(name: str, opts: argparse.Namespace) -> str | None:
    """``toolkit analyze monarch`` on the CPU with no layout, iteration or record choice: the last chunk's last
    denoising step, every layer, fh,w tilings (1,1,1) (the paper's) and (c,1,1) with c the frames of a chunk (the
    bundled grid's 95 % one) at T = 1 — the full sweep of the default bundled capture takes hours on 2 cores;
    ``--full`` asks for it. Sets ``opts`` in place; returns the line saying so, or None."""
    if name == "approximations":
        return _last_step_on_cpu(opts)
    if name != "monarch":
        return None
    from toolkit.analysis.monarch import MonarchOptions
    from toolkit.device import resolve_device

    chosen = (opts.layout, opts.iters, opts.steps, opts.chunks, opts.layers)
    if opts.full or resolve_device(opts.device).type != "cpu" or any(x is not None for x in chosen):
        opts.iters = MonarchOptions().iters if opts.iters is None else opts.iters
        return None
    chunk, step, frames_per_chunk = _last_chunk_step(opts)
    layouts = list(dict.fromkeys(["fh,w:1,1,1", f"fh,w:{frames_per_chunk or 1},1,1"]))
    opts.layout, opts.iters = layouts, 1
    return (f"CPU default: step {step}, chunk {chunk}, every layer; layouts {', '.join(layouts)}; T = 1 "
            "(--full: every record, the default layouts, T = 1..3)")


def _last_chunk_step(opts: argparse.Namespace) -> tuple[int, int | None, int | None]:
    """Select the first RUN file's last chunk and its last denoising step (``opts.chunks`` / ``opts.steps``, every
    layer); returns (chunk, step or None when it has no denoising step, frames per chunk)."""
    from toolkit.capture import open_capture

    with open_capture(opts.runs[0]) as cap:
        keys = list(cap.records)
        clean = cap.layout.clean_step
        chunk = max(k.chunk for k in keys) if keys else 0
        steps = sorted({k.step for k in keys if k.chunk == chunk and k.step != clean}) or [None]
        frames_per_chunk = cap.layout.frames_per_chunk
    opts.chunks = [chunk]
    opts.steps = None if steps[-1] is None else [steps[-1]]
    return chunk, steps[-1], frames_per_chunk


def _last_step_on_cpu(opts: argparse.Namespace) -> str | None:
    """The approximations' CPU default: the last chunk's last denoising step, every layer (unless --full or a
    record choice)."""
    from toolkit.device import resolve_device

    if opts.full or resolve_device(opts.device).type != "cpu" or any(
            x is not None for x in (opts.steps, opts.chunks, opts.layers)):
        return None
    chunk, step, _ = _last_chunk_step(opts)
    return f"CPU default: step {step}, chunk {chunk}, every layer (--full: every record)"


# name -> function adding the analysis' own options
ARGUMENTS = {"periodic": add_periodic_arguments, "topk": add_topk_arguments, "monarch": add_monarch_arguments,
             "approximations": add_approximations_arguments}


def build_parser(name: str, module: ModuleType | None = None) -> argparse.ArgumentParser:
    """Parser of ``toolkit analyze NAME`` (``module``: the loaded analysis, for its description)."""
    module = module or _load(name)
    from toolkit.commands import OneLineParser

    parser = OneLineParser(prog=f"toolkit analyze {name}",
                                     description=(module.__doc__ or "").strip().split("\n\n")[0])
    add_common_arguments(parser)
    ARGUMENTS[name](parser)
    return parser


def records_from_args(args: argparse.Namespace) -> RecordSelection:
    """``--steps/--chunks/--layers/--heads/--allow-incomplete`` -> `RecordSelection`."""
    from toolkit.analysis.records import RecordSelection

    return RecordSelection(steps=args.steps, chunks=args.chunks, layers=args.layers, heads=args.heads,
                           allow_incomplete=args.allow_incomplete)


def options_from_args(
    name: str, args: argparse.Namespace
) -> AnalysisOptions:
    """Parsed ``toolkit analyze NAME`` arguments -> the analysis' options dataclass."""
    if name == "topk":
        from toolkit.analysis.topk import TopkOptions

        return TopkOptions(masses=args.masses, sparsities=args.sparsities, method=args.method,
                           query_chunk=args.query_chunk)
    if name == "periodic":
        from toolkit.analysis.periodic import PeriodicOptions

        return PeriodicOptions(spike_factor=args.spike_factor, n_spikes=args.n_spikes,
                               spatial_threshold=args.spatial_threshold, temporal_threshold=args.temporal_threshold,
                               query_chunk=args.query_chunk)
    if name == "monarch":
        from toolkit.analysis.monarch import MonarchOptions

        return MonarchOptions(layouts=tuple(args.layout) if args.layout else None, iters=args.iters,
                              projection=not args.no_projection, topk_baseline=not args.no_topk, rank1=args.rank1,
                              r_step=args.r_step)
    if name == "approximations":
        from toolkit.analysis.approximations import ApproximationOptions

        return ApproximationOptions(families=args.families, densities=args.densities)
    raise KeyError(name)


def _load(name: str):
    try:
        module = importlib.import_module(ANALYSES[name])
    except ImportError as err:
        from toolkit.errors import ToolkitError

        raise ToolkitError(f"analysis '{name}' is not available: {err}") from None
    if not callable(getattr(module, "analyze", None)):
        from toolkit.errors import ToolkitError

        raise ToolkitError(f"{ANALYSES[name]} does not provide analyze()")
    return module


def analyze_file(name: str, path: str, records: RecordSelection | None,
                 options: AnalysisOptions | None, *,
                 device: str | None = None, progress: bool = True,
                 progress_position: int | None = None, label: str | None = None, coords: dict | None = None,
                 sink: RecordSink | None = None) -> xr.Dataset:
    """One RUN file -> Dataset with coordinate ``run`` = ``label`` (default: the basename) and ``coords`` (a prompt
    set's ``prompt`` and ``seed``) on every record (the unit of work dask schedules; it re-imports by name so it
    pickles). ``sink``: a `toolkit.analysis.partial.RecordSink` each finished record is written through (None:
    memory only)."""
    from toolkit.analysis.partial import recording
    from toolkit.capture import open_capture

    module = _load(name)
    with open_capture(path) as cap, recording(sink):
        ds = module.analyze(cap, records, options, device=device, progress=progress,
                            progress_position=progress_position)
        return label_run(ds.load(), label or os.path.basename(path), coords)


def label_run(ds: xr.Dataset, label: str, coords: dict | None = None) -> xr.Dataset:
    """The ``run`` coordinate (and ``coords``: name -> value, e.g. a prompt set's ``prompt`` and ``seed``) on every
    record of one capture's result, record index set."""
    from toolkit.analysis import index_records

    n = ds.sizes["record"]
    return index_records(ds.assign_coords(run=("record", [label] * n),
                                          **{k: ("record", [v] * n) for k, v in (coords or {}).items()}))


def combine_runs(parts: list) -> xr.Dataset:
    """Per-capture results -> one Dataset along ``record`` (numbered 0..n-1)."""
    import xarray as xr

    # "outer": records of different chunks have different query counts (padded as within one run); mismatched
    # grids / heads were refused before unless --stack-mismatched
    if len(parts) > 1:  # a record field constant in one run is an attribute there, a coordinate in another
        per_record = {c for ds in parts for c in ds.coords if ds[c].dims == ("record",) and c != "record"}
        parts = [ds.assign_coords({c: ("record", [ds.attrs.get(c, float("nan"))] * ds.sizes["record"])
                                   for c in per_record if c not in ds.coords}) for ds in parts]
    result = parts[0] if len(parts) == 1 else xr.concat(parts, dim="record", join="outer",
                                                        combine_attrs="drop_conflicts")
    return result.assign_coords(record=range(result.sizes["record"]))


def run_names(paths: list[str]) -> list[str]:
    """Short labels of ``paths``: the fewest trailing path components that tell them apart (``a/run.h5``,
    ``b/run.h5``); the basename when the basenames differ."""
    parts = [os.path.abspath(p).split(os.sep) for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = [os.sep.join(p[-n:]) for p in parts]
        if len(set(names)) == len(set(map(tuple, parts))):
            return names
    return [os.path.abspath(p) for p in paths]


def check_stackable(runs: list[str], records: RecordSelection | None) -> None:
    """Refuse, in one line, RUN files whose results would be NaN-padded against each other when stacked: different
    token grids (offsets, frames, Monarch layouts differ) or different analysed heads. Checked on the captures, before
    any analysis runs."""
    from toolkit.analysis import select_heads
    from toolkit.capture import open_capture
    from toolkit.errors import ToolkitError

    first = None
    for path in runs:
        with open_capture(path) as cap:
            facts = {"token grid": tuple(int(x) for x in cap.layout.grid), "heads": select_heads(cap, records)}
        if first is None:
            first = (path, facts)
            continue
        for what, value in facts.items():
            if value != first[1][what]:
                raise ToolkitError(f"cannot stack {first[0]} and {path}: {what} {list(first[1][what])} vs "
                                   f"{list(value)} (stacking would NaN-pad); pass --stack-mismatched to stack anyway")


def expand_prompt_set(opts: argparse.Namespace) -> tuple[str, list[str]] | None:
    """A prompt-set folder (``toolkit capture --prompts``) in place of RUN files: ``opts.runs`` becomes the captures
    its index lists, in the set's order, and ``opts.run_coords`` their ``prompt`` (position in the set's list) and
    ``seed``; returns (the folder, its prompts), or None for plain RUN files (``opts.run_coords`` None)."""
    from toolkit.capture.prompt_set import index_files, is_prompt_set, read_index
    from toolkit.errors import ToolkitError

    opts.run_coords = None
    folders = [p for p in opts.runs if os.path.isdir(p)]
    if not folders:
        return None
    if len(opts.runs) > 1:
        raise ToolkitError(f"{folders[0]} is a folder: give one prompt-set folder alone, or capture files")
    folder = folders[0]
    if not is_prompt_set(folder):
        raise ToolkitError(f"{folder} is a folder without a prompt-set index.json (toolkit capture --prompts "
                           "--out FOLDER writes one)")
    found = index_files(folder, allow_incomplete=opts.allow_incomplete)
    opts.runs = [path for path, _ in found]
    opts.run_coords = [{"prompt": int(entry["prompt_index"]), "seed": int(entry["seed"])} for _, entry in found]
    return os.path.abspath(folder), list(read_index(folder)["prompts"])


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _check_files(runs: list[str], out: str) -> None:
    from toolkit.errors import ToolkitError, prepare_output_dir

    for path in runs:
        if not os.path.isfile(path):
            raise ToolkitError(f"{path}: no such capture file")
    if any(_same_file(out, p) for p in runs):  # also through a link or another spelling of the path
        raise ToolkitError(f"--out {out} would overwrite an input capture")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ToolkitError(f"--out {out}: folder {folder} does not exist")
    if os.path.isdir(out):
        raise ToolkitError(f"--out {out} is a folder; --out takes a file name")
    prepare_output_dir(out)  # a read-only folder fails now, not after the analysis


def resume_key(name: str, runs: list[str], records: RecordSelection | None,
               options: AnalysisOptions | None,
               device: str | None) -> dict:
    """Everything that decides the numbers of a result: the analysis, its options, the record selection, the
    inputs (path, size, modification time) and the device type. ``--resume`` refuses a different key."""
    import datetime

    from toolkit.analysis.records import options_dict
    from toolkit.device import resolve_device

    inputs = {}
    for path in runs:
        st = os.stat(path)
        modified = datetime.datetime.fromtimestamp(st.st_mtime_ns / 1e9, datetime.UTC).isoformat()
        inputs[os.path.abspath(path)] = {"size": st.st_size, "modified": modified}
    return {"analysis": name, "options": options_dict(options), "records": options_dict(records),
            "inputs": inputs, "device": resolve_device(device).type}


def check_out(out: str, name: str, key: dict, *, force: bool, resume: bool) -> tuple[str, str | None]:
    """What to do with ``--out``: ("new" | "resume" | "complete", the line to show). The overwrite policy of every
    command (`toolkit.errors.check_output`: --force replaces, --resume continues), and on top of it: the file is
    replaced or continued only when it is a result of this analysis; anything else there (a capture, another
    analysis' result, any other file) is never touched, even with --force."""
    from toolkit.analysis.partial import key_differences, read_key
    from toolkit.errors import ToolkitError, check_output

    was, complete = None, False
    if os.path.isfile(out):
        try:
            was, complete, analysis = read_key(out)
        except (OSError, ValueError, KeyError):
            analysis, what = None, "not an analysis result"
        else:
            what = f"a '{analysis}' result" if analysis else _describe_file(out)
        if analysis != name:
            raise ToolkitError(f"--out {out} exists and is {what}; refusing to overwrite it (even with --force): "
                               "choose another --out")
    note = check_output(out, force=force, resume=resume, can_resume=True)
    if not os.path.lexists(out) or force:
        return ("resume" if resume else "new"), note  # resume: a parts folder of a run killed before its first write
    if was is None:
        raise ToolkitError(f"--out {out} was written without a resume key (an older toolkit); pass --force to "
                           "recompute it")
    diff = key_differences(was, key)
    if diff:
        raise ToolkitError(f"--resume: {out} was computed with different settings ({'; '.join(diff)}); use the "
                           "same ones, --force to replace it, or another --out")
    return ("complete" if complete else "resume"), note


def _describe_file(path: str) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        return "a capture file" if "format_version" in f.attrs or "record_complete" in f else "not an analysis result"


def _compute_many(name: str, args: argparse.Namespace, records, options, partial) -> list:
    """Several RUN files through dask: delayed analyze_file per file, local threads or a distributed cluster."""
    import dask

    from toolkit.errors import ToolkitError

    labels = run_names(args.runs)
    coords = getattr(args, "run_coords", None) or [None] * len(args.runs)
    tasks = [dask.delayed(analyze_file, pure=False)(name, path, records, options, device=args.device,
                                                    progress=args.progress, progress_position=i, label=labels[i],
                                                    coords=coords[i], sink=partial.sink(i))
             for i, path in enumerate(args.runs)]
    if args.scheduler:
        try:
            from dask.distributed import Client
        except ImportError:
            raise ToolkitError("--scheduler needs dask.distributed (pip install distributed)") from None
        try:  # fail fast on a wrong address instead of dask's long default wait
            client = Client(args.scheduler, timeout="10s")
        except (OSError, TimeoutError, ValueError) as err:  # ValueError: not an address (no port, no host)
            raise ToolkitError(f"--scheduler {args.scheduler}: cannot reach it ({err})") from None
        with client:
            return list(client.compute(tasks, sync=True))
    workers = args.workers or min(len(tasks), 4)
    return list(dask.compute(*tasks, scheduler="threads", num_workers=workers))


def _command_line(name: str, rest: list[str]) -> str:
    """The command recorded in the result: without --force / --resume, so a resumed result equals a straight one."""
    return "toolkit analyze " + " ".join([name, *(a for a in rest if a not in ("--force", "--resume"))])


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from toolkit.analysis import stack_records
    from toolkit.analysis.partial import PartialResults
    from toolkit.errors import ToolkitError

    name = args.analysis
    module = _load(name)
    opts = build_parser(name, module).parse_args(args.rest)
    prompt_set = expand_prompt_set(opts)
    _check_files(opts.runs, opts.out)
    if getattr(opts, "scheduler", None) and len(opts.runs) == 1:
        raise ToolkitError("--scheduler maps several RUN files over a dask cluster; one RUN file is analysed here")
    quick = apply_cpu_default(name, opts)
    if quick:
        print(f"toolkit analyze: {quick}", file=sys.stderr)
    records, options = records_from_args(opts), options_from_args(name, opts)
    key = resume_key(name, opts.runs, records, options, opts.device)
    action, note = check_out(opts.out, name, key, force=opts.force, resume=opts.resume)
    if action == "complete":
        print(f"toolkit analyze: {opts.out} is complete ({name}, same settings): nothing to do", file=sys.stderr)
        return 0
    if len(opts.runs) > 1 and not opts.stack_mismatched:
        check_stackable(opts.runs, records)
    labels = run_names(opts.runs) if len(opts.runs) > 1 else [os.path.basename(opts.runs[0])]
    attrs = dict(analysis=name, runs=[os.path.abspath(p) for p in opts.runs], command=_command_line(name, args.rest))
    if prompt_set is not None:
        attrs.update(prompt_set=prompt_set[0], prompts=prompt_set[1])
    coords = opts.run_coords or [None] * len(opts.runs)

    def combine(per_run: dict) -> object:  # the partial file: the stack of the records finished so far
        return combine_runs([label_run(stack_records(per_run[i]), labels[i], coords[i]) for i in sorted(per_run)])

    partial = PartialResults(Path(opts.out), key, attrs, combine)
    done = partial.prepare(resume=action == "resume")  # a parts folder of other settings is discarded
    if action == "resume" and (note or done):
        print(f"toolkit analyze: resuming {opts.out} ({done} records already done)", file=sys.stderr)
    elif note:
        print(f"toolkit analyze: {note}", file=sys.stderr)
    finished = False
    try:
        if len(opts.runs) == 1:
            parts = [analyze_file(name, opts.runs[0], records, options, device=opts.device, progress=opts.progress,
                                  coords=coords[0], sink=partial.sink(0))]
        else:
            parts = _compute_many(name, opts, records, options, partial)
        result = combine_runs(parts)
        result.attrs.update(attrs)
        partial.finish(result)
        finished = True
    finally:
        if not finished:  # interrupted or failed: keep what finished, openable, for --resume
            n = partial.write_partial()
            if n:
                print(f"toolkit analyze: {opts.out} holds a partial result, {n} records (complete = 0); run "
                      "again with --resume to continue", file=sys.stderr)
    dims = ", ".join(f"{k} {v}" for k, v in result.sizes.items())
    print(f"wrote {opts.out}: {name}, {result.sizes['record']} records ({dims})", file=sys.stderr)
    return 0
