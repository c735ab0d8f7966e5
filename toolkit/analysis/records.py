"""What every analysis takes: which records (`RecordSelection`), one record's tensors (`RecordTensors`), and a
stable serialisation of options dataclasses (`options_dict`, the key ``toolkit figures`` caches results on).

    from toolkit.analysis import topk
    from toolkit.analysis.records import RecordSelection, RecordTensors

    ds = topk.analyze(cap, records=RecordSelection(steps=(3,), layers=(0, 8)), options=topk.TopkOptions())
    t = RecordTensors.read(cap.record(3, 6, 8), heads=[0, 7])   # q, k, v, lse, tokens, grid, scale
    one = topk.analyze_record(t, topk.TopkOptions(sparsities=(0.5, 0.9)))

A result's ``record`` dim is indexed by `RecordIndex` over its ``step, chunk, layer`` (and ``run``) coordinates, so
``ds.sel(layer=0)`` / ``ds.sel(step=3, chunk=1)`` select records; `index_records` sets it (e.g. on a results file
opened with plain ``xarray.open_dataset``; ``toolkit.analysis.open_results`` does it for you).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    import torch
    from xarray.core.indexing import IndexSelResult

# The coordinates that identify a record of a result (``run`` only when several captures are stacked).
RECORD_KEY = ("run", "prompt", "seed", "step", "chunk", "layer")  # prompt, seed: a prompt set's captures


def _ints(values: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(int(v) for v in values)


@dataclass(frozen=True)
class RecordSelection:
    """Which complete records (and heads) of a capture an analysis runs on; None = everything stored.

    ``allow_incomplete``: analyse the complete records of an interrupted capture instead of refusing it."""

    steps: tuple[int, ...] | None = None
    chunks: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    allow_incomplete: bool = False

    def __post_init__(self) -> None:  # lists are accepted; stored as tuples (hashable, stable to serialise)
        for name in ("steps", "chunks", "layers", "heads"):
            object.__setattr__(self, name, _ints(getattr(self, name)))


@dataclass(kw_only=True)
class RecordTensors:
    """One attention record as the analyses read it: q ``h i d``, k ``h j d``, optional v ``h j d`` and lse
    ``h i`` (natural-log LSE of ``scale·q·kᵀ`` over the attended keys; recomputed where an analysis needs it and
    it is None), the clip raster indices of the queries (``i``) and keys (``j``), the clip's token ``grid``
    (frames, height, width), the softmax ``scale`` and the head labels of the leading dim (None = 0..h-1).

    Top-k needs only q, k (and v for output errors); the periodic and Monarch analyses also need the tokens and
    the grid."""

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    v: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    query_tokens: torch.Tensor | None = None
    key_tokens: torch.Tensor | None = None
    grid: tuple[int, int, int] | None = None
    heads: list[int] | None = None

    @classmethod
    def read(cls, rec: Any, heads: Sequence[int] | None = None, device: Any = None, *, v: bool = True,
             lse: bool = True) -> RecordTensors:
        """The tensors of a capture record (``toolkit.capture.Record``) for ``heads`` (None = every stored head)
        on ``device``; ``v`` / ``lse``: read them (False: left None)."""
        heads = None if heads is None else list(heads)
        return cls(q=rec.q(heads, device), k=rec.k(heads, device), scale=rec.scale,
                   v=rec.v(heads, device) if v else None, lse=rec.lse(heads, device) if lse else None,
                   query_tokens=rec.query_tokens, key_tokens=rec.key_tokens, grid=tuple(rec.grid),
                   heads=list(rec.heads) if heads is None else heads)

    @property
    def head_labels(self) -> list[int]:
        return list(range(self.q.shape[0])) if self.heads is None else list(self.heads)

    def require_positions(self, analysis: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """(query_tokens, key_tokens, grid), or a `ToolkitError` naming the analysis that needs them."""
        if self.query_tokens is None or self.key_tokens is None or self.grid is None:
            raise ToolkitError(f"the {analysis} analysis needs the record's query_tokens, key_tokens and grid")
        return self.query_tokens, self.key_tokens, tuple(self.grid)


def _plain(value: Any) -> Any:
    if hasattr(value, "name") and hasattr(value, "grid"):  # a MonarchLayout: its name on its grid
        return {"layout": str(value.name), "grid": [int(x) for x in value.grid]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if callable(getattr(value, "tolist", None)):  # tensors, arrays, numpy scalars
        return value.tolist()
    return repr(value)


def _netcdf_attr(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple, str)) for v in value):
        return json.dumps(list(value))
    return value


def netcdf_attrs(ds: xr.Dataset) -> xr.Dataset:
    """Make every attribute of ``ds`` and its variables storable in NetCDF (bools -> int, dicts / nested or
    string lists -> JSON), in place; returns ``ds``."""
    for obj in [ds, *ds.variables.values()]:
        obj.attrs = {k: _netcdf_attr(v) for k, v in obj.attrs.items() if v is not None}
    return ds


def options_dict(options: Any) -> dict:
    """A JSON-ready dict of an options / selection dataclass (tuples as lists, a Monarch layout as its name and
    grid, tensors as lists, other objects by repr): equal options give equal dicts, in every process."""
    out = _plain(options)
    json.dumps(out)  # fails here, not in a cache, if something is not serialisable
    return out


class RecordIndex(xr.Index):
    """Label index of the ``record`` dim over several 1-D coordinates at once (``step, chunk, layer`` and ``run``).

    Why not a pandas MultiIndex: it cannot be written to NetCDF, hides the ``record`` positions and drops levels on
    selection. This index keeps the coordinates as plain arrays (a result saves as is) and selects by mask: every
    given coordinate must match (a scalar or a list of labels). The ``record`` dim is kept, except when every
    indexed coordinate is given a scalar and one record matches (``ds.sel(step=3, chunk=1, layer=0)`` is that
    record, as for a MultiIndex)."""

    def __init__(self, labels: dict[str, np.ndarray], dim: str) -> None:
        self.labels, self.dim = labels, dim

    @classmethod
    def from_variables(cls, variables: Mapping[Any, xr.Variable], *, options: Mapping[str, Any]) -> RecordIndex:
        dims = {v.dims for v in variables.values()}
        if len(dims) != 1 or len(next(iter(dims))) != 1:
            raise ValueError(f"RecordIndex needs 1-D coordinates of one dim, got {sorted(map(str, dims))}")
        return cls({str(k): np.asarray(v.values) for k, v in variables.items()}, next(iter(dims))[0])

    @classmethod
    def concat(
        cls, indexes: Sequence[RecordIndex], dim: Hashable, positions: Iterable[Iterable[int]] | None = None
    ) -> RecordIndex:
        names = list(indexes[0].labels)
        if any(list(i.labels) != names for i in indexes):
            raise ValueError("cannot concatenate record indexes over different coordinates")
        labels = {n: np.concatenate([i.labels[n] for i in indexes]) for n in names}
        if positions is not None:
            order = np.argsort(np.concatenate([np.asarray(p) for p in positions]))
            labels = {n: v[order] for n, v in labels.items()}
        return cls(labels, dim)

    def create_variables(self, variables: Mapping[Any, xr.Variable] | None = None) -> dict[Any, xr.Variable]:
        variables = variables or {}
        out = {}
        for name, values in self.labels.items():  # input variables may be stale (before isel): metadata only
            old = variables.get(name)
            out[name] = xr.Variable((self.dim,), values, None if old is None else old.attrs,
                                    None if old is None else old.encoding)
        return out

    def isel(self, indexers: Mapping[Any, int | slice | np.ndarray | xr.Variable]) -> RecordIndex | None:
        where = indexers.get(self.dim, slice(None))
        if isinstance(where, xr.Variable):
            where = where.values
        if np.ndim(where) == 0 and not isinstance(where, slice):
            return None  # one record left: no dim to index
        return type(self)({n: v[where] for n, v in self.labels.items()}, self.dim)

    def sel(self, labels: dict[Any, Any], method: str | None = None, tolerance: Any = None) -> IndexSelResult:
        from xarray.core.indexing import IndexSelResult

        if method is not None or tolerance is not None:
            raise ValueError("record coordinates select exact labels only (no method / tolerance)")
        mask = np.ones(len(next(iter(self.labels.values()))), dtype=bool)
        for name, wanted in labels.items():
            if isinstance(wanted, slice):
                raise ValueError(f"select records by {name} labels (a value or a list), not a slice")
            wanted = wanted.values if isinstance(wanted, (xr.DataArray, xr.Variable)) else wanted
            mask &= np.isin(self.labels[name], np.asarray(wanted).ravel())
        found = np.flatnonzero(mask)
        if not len(found):
            raise KeyError(f"no record with {', '.join(f'{k}={v!r}' for k, v in labels.items())}")
        one = set(labels) == set(self.labels) and all(np.ndim(v) == 0 for v in labels.values()) and len(found) == 1
        return IndexSelResult({self.dim: int(found[0]) if one else found})

    def equals(self, other: xr.Index, *, exclude: frozenset[Hashable] | None = None) -> bool:
        return (isinstance(other, RecordIndex) and list(self.labels) == list(other.labels)
                and all(np.array_equal(v, other.labels[n]) for n, v in self.labels.items()))

    def rename(self, name_dict: Mapping[Any, Hashable], dims_dict: Mapping[Any, Hashable]) -> RecordIndex:
        labels = {str(name_dict.get(n, n)): v for n, v in self.labels.items()}
        return type(self)(labels, dims_dict.get(self.dim, self.dim))

    def _repr_inline_(self, max_width: int) -> str:
        return f"RecordIndex({', '.join(self.labels)})"


def index_records(ds: xr.Dataset, dim: str = "record") -> xr.Dataset:
    """``ds`` with `RecordIndex` on the `RECORD_KEY` coordinates it has along ``dim`` (any index they had is
    replaced), so ``ds.sel(layer=0)`` works; unchanged when it has none (e.g. a single record)."""
    names = [n for n in RECORD_KEY if n in ds.coords and ds[n].dims == (dim,)]
    if not names:
        return ds
    ds = ds.drop_indexes([n for n in names if n in ds.xindexes], errors="ignore")
    return ds.set_xindex(names, RecordIndex)
