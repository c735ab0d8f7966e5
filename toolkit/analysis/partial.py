"""Analysis results written record by record, so an interrupted analysis keeps what it finished.

While an analysis runs into ``OUT`` (``toolkit analyze --out OUT`` or a ``toolkit figures`` cache file), every
finished record is written to its own small NetCDF file in the folder ``OUT.parts/`` (under a temporary name,
fsynced, then renamed: a record is visible only once fully written, as in the capture store), and ``OUT`` itself is
rewritten (temporary name + rename) as the stack of the records finished so far, in the final format with the
attribute ``complete = 0``. A killed run therefore leaves an ``OUT`` that opens with ``xarray.open_dataset`` /
`toolkit.analysis.open_results`; ``--resume`` reads the records back from ``OUT.parts/`` and computes only the
missing ones. The finished file has ``complete = 1`` and the folder is removed. Files written before this existed
have no ``complete`` attribute and count as complete.

Both the partial and the final file carry ``resume_key`` (JSON: analysis, options, record selection, inputs,
device); a resume with a different key is refused, naming each differing setting.

The record loop (`toolkit.analysis.analyze_records`) finds the current writer through a context variable set by
`recording`, so the analyses' own ``analyze()`` functions need no extra argument.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from toolkit.errors import ToolkitError

PARTS_SUFFIX = ".parts"
KEY_FILE = "key.json"
RECORD_ATTRS = "toolkit_record_attrs"  # a part's attributes, JSON with numpy types tagged (exact round trip)
# Test hook: exit the process (as a kill would, no cleanup) after this many newly computed records.
EXIT_AFTER_ENV = "TOOLKIT_TEST_EXIT_AFTER_RECORDS"

_SINK: ContextVar[RecordSink | None] = ContextVar("toolkit_analysis_record_sink", default=None)


def current_sink() -> RecordSink | None:
    """The record writer `analyze_records` reports to (None: results only in memory)."""
    return _SINK.get()


@contextlib.contextmanager
def recording(sink: RecordSink | None) -> Iterator[None]:
    """Within this block (this thread / task), `analyze_records` writes each finished record through ``sink``."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


# ---- exact attribute round trip -------------------------------------------------------------------------------
def _encode(value: Any) -> Any:
    if isinstance(value, np.generic):
        return {"__numpy__": value.dtype.str, "value": value.item()}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.dtype.str, "value": value.tolist()}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"__dict__": {str(k): _encode(v) for k, v in value.items()}}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if "__numpy__" in value:
            return np.dtype(value["__numpy__"]).type(value["value"])
        if "__ndarray__" in value:
            return np.asarray(value["value"], dtype=np.dtype(value["__ndarray__"]))
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
        return {k: _decode(v) for k, v in value["__dict__"].items()}
    return value


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """A temporary name next to ``path``, unique per process and thread (several writers never share one)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def write_atomic(ds: xr.Dataset, path: Path) -> None:
    """``ds`` to ``path`` as NetCDF (h5netcdf) under a temporary name, fsynced, then renamed over ``path``."""
    tmp = temporary_name(path)
    try:
        ds.to_netcdf(tmp, engine="h5netcdf")
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_part(ds: xr.Dataset, path: Path) -> None:
    """One record's Dataset; its attributes go into one JSON attribute so they read back with their types."""
    from toolkit.analysis.records import netcdf_attrs

    out = ds.copy()
    out.attrs = {}
    netcdf_attrs(out)  # variable attributes (the final file converts them the same way)
    out.attrs[RECORD_ATTRS] = json.dumps(_encode(dict(ds.attrs)))
    write_atomic(out, path)


def read_part(path: Path) -> xr.Dataset:
    """A record written by `write_part`, loaded into memory, without file encodings (the stacked result is written
    as a straight run's is)."""
    with xr.open_dataset(path, engine="h5netcdf", decode_times=False, decode_timedelta=False) as f:
        ds = f.load()
    attrs = _decode(json.loads(ds.attrs[RECORD_ATTRS]))
    ds = ds.drop_encoding()
    ds.attrs = attrs
    return ds


# ---- keys ------------------------------------------------------------------------------------------------------
def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def key_differences(was: dict, now: dict) -> list[str]:
    """``setting: was → now`` for every leaf setting that differs between two (nested) keys."""
    a, b = _flatten(was), _flatten(now)
    return [f"{k}: {json.dumps(a.get(k, '(none)'))} → {json.dumps(b.get(k, '(none)'))}"
            for k in sorted(set(a) | set(b), key=lambda k: (list(a) + list(b)).index(k)) if a.get(k) != b.get(k)]


def read_key(path: Path) -> tuple[dict | None, bool | None, str | None]:
    """(resume key, complete, analysis) from a result file's attributes (h5py: cheap, no xarray decoding); raises
    OSError / ValueError for a file that is not HDF5."""
    import h5py

    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)

    def text(v: Any) -> str | None:
        return None if v is None else (v.decode() if isinstance(v, bytes) else str(v))

    raw = text(attrs.get("resume_key"))
    key = json.loads(raw) if raw else None
    complete = attrs.get("complete")
    return key, (True if complete is None else bool(int(np.asarray(complete).ravel()[0]))), text(attrs.get("analysis"))


# ---- the writer --------------------------------------------------------------------------------------------------
def parts_folder(out: str | os.PathLike) -> Path:
    return Path(str(out) + PARTS_SUFFIX)


@dataclass
class RecordSink:
    """Writes the finished records of one capture (``run``: its index among the inputs) into the parts folder and
    reports them to ``owner`` (which rewrites the partial result file). Pickled to another process (a dask cluster)
    it keeps writing parts but has no owner there: the partial file is then written at the end only."""

    folder: str
    run: int = 0
    owner: PartialResults | None = None

    def _path(self, key: tuple[int, int, int]) -> Path:
        step, chunk, layer = (int(x) for x in key)
        return Path(self.folder) / f"run{self.run}_step{step}_chunk{chunk}_layer{layer}.nc"

    def done(self, key: tuple[int, int, int]) -> xr.Dataset | None:
        """The record's Dataset if a previous run finished it, else None (an unreadable part is recomputed)."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            ds = read_part(path)
        except Exception:  # noqa: BLE001 - a damaged part is only a lost record: recompute it
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        if self.owner is not None:
            self.owner.added(self.run, ds, new=False)
        return ds

    def add(self, key: tuple[int, int, int], ds: xr.Dataset) -> xr.Dataset:
        """Write a finished record; returns it as read back, so straight and resumed runs stack the same data."""
        path = self._path(key)
        write_part(ds, path)
        back = read_part(path)
        if self.owner is not None:
            self.owner.added(self.run, back, new=True)
        return back

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "run": self.run, "owner": None}


@dataclass
class PartialResults:
    """The partial / final result file ``out`` and its parts folder (see the module docstring).

    ``key``: the resume key (JSON-ready); ``attrs``: attributes of the stacked file; ``combine``: per-run lists of
    record Datasets -> the stacked Dataset (the same function the caller uses for its final result)."""

    out: Path
    key: dict
    attrs: dict
    combine: Callable[[dict[int, list[xr.Dataset]]], xr.Dataset]
    log: Callable[[str], None] = print
    records: dict[int, list[xr.Dataset]] = field(default_factory=dict)
    new: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last_write: float = 0.0
    _write_cost: float = 0.0

    @property
    def folder(self) -> Path:
        return parts_folder(self.out)

    def sink(self, run: int = 0) -> RecordSink:
        return RecordSink(str(self.folder), run, self)

    def folder_key(self) -> dict | None:
        """The key of an existing parts folder (None: no folder, or one without a readable key)."""
        try:
            return json.loads((self.folder / KEY_FILE).read_text())
        except (OSError, ValueError):
            return None

    def prepare(self, *, resume: bool) -> int:
        """Create the parts folder (``resume``: keep the records of a folder with the same key; otherwise start
        empty). Returns how many record files it holds. Refuses a folder of that name that is not ours."""
        folder = self.folder
        if folder.exists() and not (folder.is_dir() and (folder / KEY_FILE).is_file()):
            raise ToolkitError(f"{folder} exists and is not a parts folder of toolkit analyze; move it away")
        if folder.exists() and not (resume and self.folder_key() == self.key):
            shutil.rmtree(folder)
        folder.mkdir(exist_ok=True)
        key_file = folder / KEY_FILE
        if not key_file.is_file():
            tmp = temporary_name(key_file)
            tmp.write_text(json.dumps(self.key))
            os.replace(tmp, key_file)
        return sum(1 for p in folder.glob("run*.nc"))

    def added(self, run: int, ds: xr.Dataset, *, new: bool) -> None:
        with self._lock:
            self.records.setdefault(run, []).append(ds)
            if not new:
                return
            self.new += 1
            exit_after = os.environ.get(EXIT_AFTER_ENV)
            stop = exit_after is not None and self.new >= int(exit_after)
            # Rewriting the stack costs O(records): at most ~20 % of the time goes to it; the parts always hold
            # every finished record, so a lagging partial file loses nothing for --resume.
            if stop or time.monotonic() - self._last_write >= 4 * self._write_cost:
                self._write(complete=False)
            if stop:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(75)  # as a kill: no cleanup, no final file

    def _write(self, *, complete: bool, ds: xr.Dataset | None = None) -> None:
        from toolkit.analysis.records import netcdf_attrs

        t0 = time.monotonic()
        ds = self.combine(self.records) if ds is None else ds
        ds.attrs.update(self.attrs, complete=int(complete), resume_key=json.dumps(self.key))
        netcdf_attrs(ds)
        write_atomic(ds, self.out)
        self._last_write, self._write_cost = time.monotonic(), time.monotonic() - t0

    def write_partial(self) -> int:
        """Rewrite ``out`` with every record finished so far (complete = 0); returns their number. With none (a
        refusal before the first record) the empty parts folder is removed: nothing is left behind."""
        with self._lock:
            n = sum(len(v) for v in self.records.values())
            if n:
                self._write(complete=False)
            elif not any(self.folder.glob("run*.nc")):
                shutil.rmtree(self.folder, ignore_errors=True)
            return n

    def finish(self, ds: xr.Dataset) -> xr.Dataset:
        """Write the final result (complete = 1) over ``out`` and remove the parts folder."""
        with self._lock:
            self._write(complete=True, ds=ds)
        shutil.rmtree(self.folder, ignore_errors=True)
        return ds
