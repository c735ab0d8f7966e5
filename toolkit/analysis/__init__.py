"""Analyses of captured attention: ``periodic`` (positional kernel, spikes, spectra, head types), ``topk`` (mass
coverage, oracle top-k error), ``monarch`` (Monarch approximation error).

Each analysis module ``toolkit.analysis.NAME`` has the same Python interface:

    NAMEOptions                                   # frozen dataclass of its options (defaults = the CLI's)
    analyze_record(tensors: RecordTensors, options) -> xr.Dataset  # one record's tensors
    analyze(cap, records=RecordSelection(...), options=..., device=None, progress=True) -> xr.Dataset
                                                  # every selected record of an opened capture, dim ``record``

`RecordTensors` / `RecordSelection` are in `toolkit.analysis.records`. `analyze_records` below does the record
loop for ``analyze``: selection (steps / chunks / layers / heads), input checks, device, progress bar, and
stacking per-record datasets along ``record`` with coordinates ``step, chunk, layer, timestep, is_clean``.
``toolkit analyze NAME`` (``toolkit/commands/analyze.py``) maps its command line onto these options.

Records are selected by label: ``step, chunk, layer`` (and ``run`` for several captures) carry one `RecordIndex`,
so ``ds.sel(layer=0)`` keeps the records of layer 0 and ``ds.sel(step=3, chunk=1, layer=0)`` is one record. NetCDF
stores no index: a results file opens with plain ``xarray.open_dataset(path, engine="h5netcdf")`` (the same
coordinates, unindexed) and `open_results` restores the index.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from toolkit.analysis.partial import current_sink
from toolkit.analysis.records import (  # noqa: F401 - re-exported
    RECORD_KEY,
    RecordIndex,
    RecordSelection,
    RecordTensors,
    _netcdf_attr,
    index_records,
    netcdf_attrs,
    options_dict,
)
from toolkit.device import resolve_device
from toolkit.errors import SelectionError, ToolkitError

if TYPE_CHECKING:
    import xarray as xr

# Attributes that describe one record; when they differ between records they become ``record`` coordinates.
RECORD_FIELDS = ("step", "chunk", "layer", "timestep", "is_clean")


def _pick(available: list[int], wanted: list[int] | None, what: str, path: str) -> list[int]:
    if wanted is None:
        return list(available)
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise SelectionError(f"{what} {missing} not captured in {path} (captured: {sorted(set(available))})")
    return [x for x in available if x in set(wanted)]


def select_records(cap: Any, selection: RecordSelection | None = None) -> list:
    """The capture's complete records matching ``selection.steps/chunks/layers`` (None = all).

    Raises `ToolkitError` for an incomplete capture (unless ``selection.allow_incomplete``) and `SelectionError`
    when an asked step / chunk / layer has no complete record.
    """
    selection = selection or RecordSelection()
    if not cap.complete and not selection.allow_incomplete:
        raise ToolkitError(f"{cap.path} is incomplete (interrupted or still being written); "
                           "pass --allow-incomplete to analyse its complete records")
    keys = list(cap.records)
    if not keys:
        raise ToolkitError(f"{cap.path} holds no complete record")
    steps = _pick(sorted({r.step for r in keys}), selection.steps, "steps", cap.path)
    chunks = _pick(sorted({r.chunk for r in keys}), selection.chunks, "chunks", cap.path)
    layers = _pick(sorted({r.layer for r in keys}), selection.layers, "layers", cap.path)
    records = [r for r in keys if r.step in steps and r.chunk in chunks and r.layer in layers]
    if not records:
        raise SelectionError(f"no complete record of {cap.path} has steps {steps}, chunks {chunks}, layers {layers}")
    return records


def select_heads(cap: Any, selection: RecordSelection | None = None) -> list[int]:
    """Heads asked by ``selection.heads`` (None = every stored head); each must have been captured."""
    return _pick(list(cap.heads), (selection or RecordSelection()).heads, "heads", cap.path)


def require_stored(cap: Any, names: tuple[str, ...], analysis: str) -> None:
    """One-line error when the capture lacks tensors the analysis recomputes attention from."""
    missing = [n for n in names if n not in cap.stored]
    if missing:
        raise ToolkitError(f"{cap.path} has no {'/'.join(missing)} (stored: {', '.join(cap.stored) or 'nothing'}); "
                           f"'{analysis}' needs {'/'.join(names)} — capture with --store q,k,v,lse")


def stack_records(datasets: list[xr.Dataset], fields: tuple[str, ...] = RECORD_FIELDS) -> xr.Dataset:
    """Concatenate per-record datasets along a new ``record`` dim.

    Dims whose length varies (e.g. ``query`` between chunks) are padded (NaN; ``query_token`` −1 becomes NaN).
    ``fields`` and any attribute whose value differs between records become ``record`` coordinates; ``step, chunk,
    layer`` are indexed (`index_records`), so ``out.sel(layer=0)`` works.
    """
    import numpy as np
    import xarray as xr

    if not datasets:
        raise ToolkitError("no records to stack")
    keys = set().union(*(d.attrs for d in datasets))
    varying = [k for k in sorted(keys) if k in fields or len({repr(d.attrs.get(k)) for d in datasets}) > 1]
    parts = []
    for ds in datasets:
        ds = ds.reset_coords([c for c in ds.coords if c not in ds.dims])  # per-record coordinates -> variables
        record_coords = {k: ("record", [ds.attrs.get(k, np.nan)]) for k in varying}
        parts.append(ds.expand_dims("record").assign_coords(record_coords))
    out = xr.concat(parts, dim="record", join="outer", combine_attrs="drop_conflicts")
    out.attrs = {k: _netcdf_attr(v) for k, v in datasets[0].attrs.items() if k not in varying}
    for k in varying:
        if out[k].dtype == bool:
            out = out.assign_coords({k: out[k].astype(np.int8)})
    return index_records(out)


def open_results(path: str | os.PathLike, **kwargs: Any) -> xr.Dataset:
    """A results file of ``toolkit analyze`` / the figures' cache, opened with h5netcdf (``kwargs`` go to
    ``xarray.open_dataset``) and its record index restored, so ``ds.sel(layer=0)`` works as on ``analyze()``'s
    result. (Plain ``xarray.open_dataset`` gives the same variables with unindexed record coordinates.)"""
    import xarray as xr

    ds = xr.open_dataset(path, **{"engine": "h5netcdf", **kwargs})
    out = index_records(ds)
    out.set_close(ds._close)  # ``with open_results(path) as ds`` closes the file
    return out


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only).

    Each record allocates key-sized temporaries whose sizes change from chunk to chunk; glibc keeps the freed blocks,
    so without a trim the process's resident memory grew with the number of records (measured: 1.9 GB for 40
    bundled records, 5.0 GB for 160, for a 68 MB result; with the trim 0.8 GB and 1.0 GB, same run time)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to do
            pass


def analyze_records(
    cap: Any,
    selection: RecordSelection | None,
    one: Callable[[Any, list[int], Any], xr.Dataset],
    *,
    needs: tuple[str, ...],
    name: str,
    device: Any = None,
    progress: bool = True,
    progress_position: int | None = None,
) -> xr.Dataset:
    """Run ``one(record, heads, device) -> Dataset`` over the selected records of ``cap`` with a progress bar.

    ``needs``: stored tensors the analysis reads (checked up front, one-line error). ``device``: as
    `resolve_device` (None = GPU when present); ``progress_position``: the bar's line (several files at once).
    Within `toolkit.analysis.partial.recording`, each finished record is written at once and records finished by
    an interrupted run are read back instead of recomputed.
    """
    from tqdm.auto import tqdm

    require_stored(cap, needs, name)
    records = select_records(cap, selection)
    heads = select_heads(cap, selection)
    device = resolve_device(device)
    out = []
    bar = tqdm(records, desc=f"{name} {os.path.basename(cap.path)}", unit="record", disable=not progress,
               position=progress_position, leave=True)
    sink = current_sink()  # set by `toolkit analyze` / the figures' cache: write each record as it finishes
    for key in bar:
        rec = cap.record(*key)
        bar.set_postfix(step=rec.step, chunk=rec.chunk, layer=rec.layer)
        ds = sink.done(key) if sink is not None else None  # finished by an interrupted run (--resume)
        if ds is None:
            ds = one(rec, heads, device)
            ds.attrs.update(step=rec.step, chunk=rec.chunk, layer=rec.layer, timestep=float(rec.timestep),
                            is_clean=bool(rec.is_clean))
            if sink is not None:
                ds = sink.add(key, ds)
        out.append(ds)
        release_freed_memory()
    return stack_records(out)
