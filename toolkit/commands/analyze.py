"""``toolkit analyze NAME RUN.h5 [RUN.h5 ...] --out results.nc``: one generic dispatcher for every analysis.

An analysis is a module ``toolkit.analysis.NAME`` with ``add_arguments(parser)`` and
``analyze_capture(cap, args) -> xr.Dataset`` (see ``toolkit/analysis/__init__.py``). Its options are parsed after
the name, so ``toolkit --help`` never imports torch. One RUN file runs in this process; several are mapped over
with dask (threads here, or the cluster at ``--scheduler ADDRESS``) and stacked along ``record`` with a ``run``
coordinate.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> module; order = order in the help text.
ANALYSES = {
    "periodic": "toolkit.analysis.periodic",
    "topk": "toolkit.analysis.topk",
    "monarch": "toolkit.analysis.monarch",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="analyse captured attention (periodic structure, oracle top-k, Monarch error)",
        description="Recompute exact attention from a capture's q/k(/v) and analyse it record by record. "
                    "`toolkit analyze NAME --help` lists the options of one analysis.",
        usage="toolkit analyze {" + ",".join(ANALYSES) + "} RUN.h5 [RUN.h5 ...] --out RESULTS.nc [options]",
    )
    p.add_argument("analysis", choices=list(ANALYSES), help="which analysis")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


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
    from toolkit.analysis import index_list

    parser.add_argument("runs", nargs="+", metavar="RUN.h5", help="capture file(s)")
    parser.add_argument("--out", required=True, help="results file (.nc, NetCDF4/HDF5)")
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


def build_parser(name: str, module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"toolkit analyze {name}",
                                     description=(module.__doc__ or "").strip().split("\n\n")[0])
    add_common_arguments(parser)
    module.add_arguments(parser)
    return parser


def _load(name: str):
    try:
        module = importlib.import_module(ANALYSES[name])
    except ImportError as err:
        from toolkit.errors import ToolkitError

        raise ToolkitError(f"analysis '{name}' is not available: {err}") from None
    for fn in ("add_arguments", "analyze_capture"):
        if not callable(getattr(module, fn, None)):
            from toolkit.errors import ToolkitError

            raise ToolkitError(f"{ANALYSES[name]} does not provide {fn}()")
    return module


def analyze_file(name: str, path: str, args: argparse.Namespace):
    """One RUN file -> Dataset (the unit of work dask schedules; it re-imports by name so it pickles)."""
    from toolkit.capture import open_capture

    module = _load(name)
    with open_capture(path) as cap:
        ds = module.analyze_capture(cap, args)
        ds = ds.assign_coords(run=("record", [os.path.basename(path)] * ds.sizes["record"]))
        return ds.load()


def _check_files(runs: list[str], out: str) -> None:
    from toolkit.errors import ToolkitError

    for path in runs:
        if not os.path.isfile(path):
            raise ToolkitError(f"{path}: no such capture file")
    if os.path.abspath(out) in {os.path.abspath(p) for p in runs}:
        raise ToolkitError(f"--out {out} would overwrite an input capture")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ToolkitError(f"--out {out}: folder {folder} does not exist")


def _compute_many(name: str, args: argparse.Namespace) -> list:
    """Several RUN files through dask: delayed analyze_file per file, local threads or a distributed cluster."""
    import dask

    from toolkit.errors import ToolkitError

    tasks = []
    for i, path in enumerate(args.runs):
        file_args = argparse.Namespace(**{**vars(args), "progress_position": i})
        tasks.append(dask.delayed(analyze_file, pure=False)(name, path, file_args))
    if args.scheduler:
        try:
            from dask.distributed import Client
        except ImportError:
            raise ToolkitError("--scheduler needs dask.distributed (pip install distributed)") from None
        with Client(args.scheduler) as client:
            return list(client.compute(tasks, sync=True))
    workers = args.workers or min(len(tasks), 4)
    return list(dask.compute(*tasks, scheduler="threads", num_workers=workers))


def run(args: argparse.Namespace) -> int:
    import xarray as xr

    from toolkit.analysis import netcdf_attrs

    name = args.analysis
    module = _load(name)
    opts = build_parser(name, module).parse_args(args.rest)
    opts.command = "analyze"
    _check_files(opts.runs, opts.out)
    if len(opts.runs) == 1:
        parts = [analyze_file(name, opts.runs[0], opts)]
    else:
        parts = _compute_many(name, opts)
    result = parts[0] if len(parts) == 1 else xr.concat(parts, dim="record", join="outer",
                                                        combine_attrs="drop_conflicts")
    result = result.assign_coords(record=range(result.sizes["record"]))
    result.attrs.update(analysis=name, runs=[os.path.abspath(p) for p in opts.runs],
                        command="toolkit analyze " + " ".join([name, *args.rest]))
    netcdf_attrs(result)
    result.to_netcdf(opts.out, engine="h5netcdf")
    dims = ", ".join(f"{k} {v}" for k, v in result.sizes.items())
    print(f"wrote {opts.out}: {name}, {result.sizes['record']} records ({dims})", file=sys.stderr)
    return 0
