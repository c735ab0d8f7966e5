"""Analysis results for the figures: run ``toolkit.analysis.<name>.analyze`` once, cache it as NetCDF.

The figures never compute attention statistics themselves; they plot the Datasets returned here. A cached file
``<out>/analysis_<name>.nc`` is reused when its ``figures_cache_key`` attribute matches the input file's SHA-256,
the analysis name, its record selection, its options (a stable serialisation of the options dataclass,
`toolkit.analysis.options_dict`) and the device; otherwise the analysis runs again (with its own progress bars)
and the file is replaced. The analysis writes the cache record by record (`toolkit.analysis.partial`): a partial
cache (``complete = 0``, left by an interrupted run) with the same key is continued, and an unreadable one
(truncated, garbage) is recomputed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xarray as xr

from toolkit.analysis import RECORD_KEY, open_results, stack_records
from toolkit.analysis.partial import PartialResults, read_key, recording
from toolkit.analysis.records import RecordSelection, options_dict

if TYPE_CHECKING:
    from toolkit.capture.reader import Capture

ANALYSES = ("periodic", "topk", "monarch")


def _options_class(name: str):
    if name not in ANALYSES:
        raise KeyError(f"unknown analysis {name!r} (one of {', '.join(ANALYSES)})")
    module = importlib.import_module(f"toolkit.analysis.{name}")
    return module, getattr(module, {"periodic": "PeriodicOptions", "topk": "TopkOptions",
                                    "monarch": "MonarchOptions"}[name])


class ResultCache:
    """Analysis Datasets of one capture, cached in ``out_dir`` (see module docstring)."""

    def __init__(self, cap: Capture, out_dir: str | os.PathLike, input_sha256: str, *,
                 log: Callable[[str], None] = print, progress: bool = True,
                 device: str | None = None) -> None:
        self.cap, self.out_dir, self.sha = cap, Path(out_dir), input_sha256
        self.log, self.progress, self.device = log, progress, device
        self.used: dict[str, dict] = {}  # name -> {"file", "cache_key", "args", "reused"} for the manifest
        self._memo: dict[str, xr.Dataset] = {}  # cache key -> Dataset already loaded in this run

    def get(self, name: str, records: RecordSelection | None = None, options: Any = None, *,
            tag: str = "") -> xr.Dataset:
        """Dataset of analysis ``name`` on the selected ``records`` with ``options`` (its options dataclass, e.g.
        `toolkit.analysis.topk.TopkOptions`; None = defaults), cached in ``analysis_<name>[_<tag>].nc`` (a tag
        keeps differently-selected runs of one analysis apart)."""
        module, options_class = _options_class(name)
        records = records or RecordSelection()
        options = options_class() if options is None else options
        if not isinstance(options, options_class):
            raise TypeError(f"{name} takes {options_class.__name__}, not {type(options).__name__}")
        settings = dict(records=options_dict(records), options=options_dict(options), device=self.device)
        key = hashlib.sha256(json.dumps([self.sha, name, settings], sort_keys=True).encode()).hexdigest()[:16]
        label = f"{name}_{tag}" if tag else name
        if key in self._memo:
            return self._memo[key]
        path = self.out_dir / f"analysis_{label}.nc"
        state = self._cached_state(path, key, label)
        if state == "complete":
            try:
                with open_results(path) as cached:
                    self._memo[key] = cached.load()
            except Exception as err:  # noqa: BLE001 - a damaged cache is recomputed, never fatal
                self.log(f"  {label}: {path.name} is unreadable ({type(err).__name__}); recomputing")
            else:
                self.log(f"  {label}: reusing {path.name}")
                self.used[label] = dict(file=path.name, cache_key=key, args=settings, reused=True)
                return self._memo[key]
        self.log(f"  {label}: running toolkit.analysis.{name} on {self._describe(records)}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Written record by record (toolkit.analysis.partial): an interrupted figures run leaves a partial cache
        # that the next run with the same key continues instead of starting over.
        partial = PartialResults(path, {"figures_cache_key": key},
                                 dict(analysis=name, figures_cache_key=key, figures_analysis_args=json.dumps(settings)),
                                 lambda per_run: stack_records(per_run[0]), log=self.log)
        done = partial.prepare(resume=state == "partial")
        if done:
            self.log(f"  {label}: continuing the partial {path.name} ({done} records already done)")
        finished = False
        try:
            with recording(partial.sink(0)):
                ds = module.analyze(self.cap, records, options, device=self.device, progress=self.progress)
            partial.finish(ds)
            finished = True
        finally:
            if not finished:
                partial.write_partial()
        self.used[label] = dict(file=path.name, cache_key=key, args=settings, reused=False)
        self._memo[key] = ds
        return ds

    def _cached_state(self, path: Path, key: str, label: str) -> str | None:
        """"complete" / "partial": ``path`` holds this key's result (a partial one is continued); None: compute
        afresh (no file, another key, or a damaged file — the cache is ours to replace)."""
        if not path.is_file():
            return None
        try:
            _, complete, _ = read_key(path)
            with open_results(path) as cached:
                cached_key = cached.attrs.get("figures_cache_key")
        except Exception as err:  # noqa: BLE001 - truncated / garbage file: recompute
            self.log(f"  {label}: {path.name} is unreadable ({type(err).__name__}); recomputing")
            return None
        if cached_key != key:
            return None
        return "complete" if complete else "partial"

    @staticmethod
    def _describe(records: RecordSelection) -> str:
        parts = [f"{k} {','.join(map(str, getattr(records, k)))}" for k in ("layers", "heads", "steps", "chunks")
                 if getattr(records, k) is not None]
        return "; ".join(parts) or "all stored records"


def record_of(ds: xr.Dataset, *, step: int, chunk: int, layer: int) -> xr.Dataset:
    """The one record ``(step, chunk, layer)`` of a Dataset stacked along ``record`` (coords step/chunk/layer)."""
    if "record" not in ds.dims:
        return ds
    mask = (ds["step"] == step) & (ds["chunk"] == chunk) & (ds["layer"] == layer)
    idx = [int(i) for i in mask.values.nonzero()[0]]
    if not idx:
        raise KeyError(f"record step={step} chunk={chunk} layer={layer} not in the analysis result")
    return ds.isel(record=idx[0])


def layer_head_table(ds: xr.Dataset, var: str, *, step: int, chunk: int) -> xr.DataArray:
    """``var`` (a per-head scalar) of every layer's record at (step, chunk) as a ``layer × head`` DataArray."""
    mask = (ds["step"] == step) & (ds["chunk"] == chunk)
    idx = [int(i) for i in mask.values.nonzero()[0]]
    if not idx:
        raise KeyError(f"no record at step={step} chunk={chunk} in the analysis result")
    sub = ds[var].isel(record=idx)
    sub = sub.drop_indexes([n for n in RECORD_KEY if n in sub.xindexes])  # ``layer`` becomes the dim's own index
    return sub.isel(record=sub["layer"].values.argsort()).swap_dims(record="layer")
