"""Reading a capture: ``open_capture(path)`` -> ``Capture`` with records, a lazy xarray view and exact maps.

    cap = open_capture("run.h5")
    rec = cap.record(step=3, chunk=6, layer=8)
    q, k, lse = rec.q(), rec.k(), rec.lse()           # h i d, h j d, h i  (float32)
    cap.rows(rec, head=0, queries=rec.query_tokens[:4])  # exact probability rows, labelled (query, key)
    cap.tile(rec, head=0, q_range=(t0, t1), k_range=(u0, u1))
    cap.pooled(rec)                                   # frame×frame mass and (Δt, Δh, Δw) profiles
    cap.dataset                                       # lazy xarray view, bf16/float16 decoded to float32
    cap.attended(rec)                                 # lazy q, lse and the attended k, v with token coordinates
    cap.verify()                                      # sampled rows recomputed from q/k must sum to 1 against lse

Attention probabilities are recomputed as ``exp(scale·q·k − lse)`` by ``toolkit.attention.exact`` on the GPU if
one is present (else the CPU), one bounded tile at a time. A record's keys are reassembled from the per-step
K/V slices: keys before the chunk come from the clean pass (``context_step``), the chunk's own from its step.
Opening checks attributes and dataset shapes against the layout (no tensor reads): a damaged file is one
``ToolkitError`` line naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

import h5py
import numpy as np
import torch

from toolkit.attention import exact
from toolkit.capture.pooled import pooled_sums, tf32_for_bf16_values
from toolkit.capture.selection import RunLayout, chunk_query_range, human_bytes
from toolkit.capture.store import (
    LSE_FROM,
    LSE_FROM_STORED,
    check_format,
    check_format_version,
    from_storage,
)
from toolkit.device import resolve_device
from toolkit.errors import ToolkitError
from toolkit.models.layout import check_window

if TYPE_CHECKING:
    import xarray as xr

# Largest probability block rows()/tile() return (float32 entries).
MAX_TILE_ENTRIES = exact.DEFAULT_BLOCK_ENTRIES
# Stored k values (float32 entries, 1 GiB) ``Capture.verify`` reads by default: small captures are checked whole.
VERIFY_BUDGET = 2**28


class RecordKey(NamedTuple):
    step: int
    chunk: int
    layer: int


class Record:
    """One self-attention call of the run; tensors are read (and decoded to float32) on request."""

    def __init__(self, cap: Capture, key: RecordKey) -> None:
        self.cap, self.key = cap, key
        self.step, self.chunk, self.layer = key
        lay = cap.layout
        self._s = cap.step_index[self.step]
        self._l = cap.layer_index[self.layer]
        self.grid: tuple[int, int, int] = lay.grid
        self.scale: float = cap.scale
        self.is_clean: bool = self.step == lay.clean_step
        self.timestep: float = float(cap.file["record_timestep"][self._s, self.chunk])
        self.query_frames: tuple[int, int] = lay.chunk_frames(self.chunk)
        start = int(cap.file["record_key_start_frame"][self._s, self.chunk])
        # Attended key frames in key order: a rolling cache's sink and window (the layout's), else a run from the
        # recorded first key frame to the chunk's end.
        self.key_spans: tuple[tuple[int, int], ...] = (
            lay.key_frame_spans(self.chunk) if lay.local_attn_size != -1 else ((start, self.query_frames[1]),))
        self.key_frames: tuple[int, int] = self.key_spans[-1]  # the run of key frames that ends with the chunk
        self.sink_frames: int = self.key_spans[0][1] if len(self.key_spans) > 1 else 0  # frames [0, n) before it
        self._qa, self._qb = cap.chunk_queries(self.chunk)

    def __repr__(self) -> str:
        return (f"Record(step={self.step}, chunk={self.chunk}, layer={self.layer}, timestep={self.timestep:g}, "
                f"queries={self._qb - self._qa}, keys={len(self.key_tokens)}, heads={len(self.heads)})")

    @property
    def heads(self) -> list[int]:
        return list(self.cap.heads)

    @cached_property
    def query_tokens(self) -> torch.Tensor:
        """Clip raster indices of the stored queries of this record (``i``)."""
        return self.cap.queries[self._qa:self._qb].clone()

    @cached_property
    def key_tokens(self) -> torch.Tensor:
        """Clip raster indices of the attended keys (``j``), in the order of ``k()``."""
        tpf = self.cap.layout.tokens_per_frame
        return torch.cat([torch.arange(a * tpf, b * tpf) for a, b in self.key_spans])

    def _head_positions(self, heads) -> list[int]:
        if heads is None:
            return list(range(len(self.cap.heads)))
        heads = [heads] if isinstance(heads, int) else list(heads)
        missing = [h for h in heads if h not in self.cap.head_index]
        if missing:
            raise ToolkitError(f"heads {missing} were not captured (stored heads: {self.cap.heads})")
        return [self.cap.head_index[h] for h in heads]

    def _read(self, name: str, index: tuple, heads, device=None) -> torch.Tensor:
        if name not in self.cap.file:
            raise ToolkitError(f"this capture did not store '{name}' (stored: {', '.join(self.cap.stored)})")
        ds = self.cap.file[name]
        pos = self._head_positions(heads)
        order = np.argsort(pos)
        try:
            data = ds[index[:2] + (sorted(pos),) + index[2:]]  # h5py needs increasing indices
        except (OSError, RuntimeError) as err:  # a damaged chunk (bad checksum, truncated file)
            raise ToolkitError(f"{self.cap.path}: damaged capture file: cannot read {name} of record "
                               f"step={self.step} chunk={self.chunk} layer={self.layer} ({_first_line(err)})") from None
        data = data[np.argsort(order)] if len(pos) > 1 else data
        return from_storage(data, str(ds.attrs.get("dtype_logical", "float32")), device)

    def q(self, heads: int | Sequence[int] | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Post-RoPE queries ``h i d`` of the stored query tokens (float32, on ``device``, default CPU)."""
        return self._read("q", (self._s, self._l, slice(self._qa, self._qb)), heads, device)

    def lse(self, heads: int | Sequence[int] | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Natural-log LSE of ``scale·q·k`` over the attended keys, ``h i``."""
        return self._read("lse", (self._s, self._l, slice(self._qa, self._qb)), heads, device)

    def text_mass(
        self, heads: int | Sequence[int] | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Attention mass of each stored query on the text tokens of a joint text+video attention (0 for a model
        without them), ``h i``: its row over the video keys sums to 1 minus this (``store`` ``text_mass``)."""
        return self._read("text_mass", (self._s, self._l, slice(self._qa, self._qb)), heads, device)

    def context_spans(self) -> list[tuple[int, int]]:
        """Attended frames before the chunk, as runs ``[a, b)``: keys written by the clean pass of their chunks."""
        f0 = self.query_frames[0]
        return [(a, min(b, f0)) for a, b in self.key_spans if a < f0]

    def _keys(self, name: str, heads, device) -> torch.Tensor:
        cap, tpf = self.cap, self.cap.layout.tokens_per_frame
        f0 = self.query_frames[0]
        parts = []
        for a, b in self.context_spans():  # earlier chunks: their clean-pass slices
            cap.require_context_kv(a, b, self.layer, name)
            parts.append(self._read(name, (cap.step_index[cap.context_step], self._l, slice(a * tpf, b * tpf)),
                                    heads, device))
        cap.require_kv(self.step, self.chunk, self.layer, name)
        parts.append(self._read(name, (self._s, self._l, slice(f0 * tpf, self.query_frames[1] * tpf)), heads,
                                device))
        return torch.cat(parts, dim=-2)

    def k(self, heads: int | Sequence[int] | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Post-RoPE keys ``h j d`` the record attended (``key_tokens``), reassembled from per-step slices."""
        return self._keys("k", heads, device)

    def v(self, heads: int | Sequence[int] | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """Values ``h j d`` the record attended."""
        return self._keys("v", heads, device)


class Capture:
    """An opened capture file (read-only). Use as a context manager or call ``close()``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.live = False  # opened while a capture is still writing it
        if os.path.isdir(self.path):
            raise ToolkitError(f"{self.path} is a folder, not a capture file (a prompt set's captures are the "
                               "files its index.json lists)")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as err:
            if "lock" not in str(err) or not os.path.exists(self.path):
                raise ToolkitError(f"cannot open {self.path}: {str(err).splitlines()[0]}") from None
            # A running capture holds the write lock. Its HDF5 metadata is fixed once created (uncompressed
            # files), so reading without the lock is safe; records appear as their flags are flushed.
            try:
                self.file = h5py.File(self.path, "r", locking=False)
            except OSError as err2:
                raise ToolkitError(f"cannot open {self.path}: {str(err2).splitlines()[0]}") from None
            self.live = True
        try:
            self._load_metadata()
        except BaseException as err:
            self.file.close()
            if isinstance(err, ToolkitError):
                raise
            if isinstance(err, (OSError, KeyError, ValueError, TypeError, RuntimeError)):  # h5py on broken metadata
                raise ToolkitError(f"{self.path}: damaged capture file: {_first_line(err)}") from None
            raise

    def _load_metadata(self) -> None:
        """Read and check the attributes and the small index datasets; shapes of every tensor against the layout.
        Cheap (no tensor data is read), so a damaged file is refused here in one line instead of failing later in
        an analysis with a traceback or, worse, giving numbers from a grid that is not the data's."""
        a = self.file.attrs
        check_format(_text(a.get("format")), self.path)
        check_format_version(_int_attr(self, "format_version"), self.path)
        complete = _int_attr(self, "complete")
        if complete not in (0, 1):
            raise _damaged(self, f"attribute 'complete' is {complete}, not 0 or 1")
        self.layout = _layout(self, _json_attr(self, "layout", dict))
        self.selection = _json_attr(self, "selection", dict)
        self.context_step = _int_attr(self, "context_step")
        self.scale = self.layout.softmax_scale
        self.steps = _index(self, "step", self.layout.num_steps)
        self.layers = _index(self, "layer", self.layout.num_layers)
        self.heads = _index(self, "head", self.layout.num_heads)
        self.step_index = {s: i for i, s in enumerate(self.steps)}
        self.layer_index = {layer: i for i, layer in enumerate(self.layers)}
        self.head_index = {h: i for i, h in enumerate(self.heads)}
        queries = _dataset(self, "query", None)[...]
        if queries.ndim != 1 or queries.dtype.kind not in "iu":
            raise _damaged(self, f"dataset 'query' has shape {queries.shape} and dtype {queries.dtype} "
                                 "(expected 1-D integers)")
        self.queries = torch.from_numpy(queries.astype(np.int64))
        self._check_shapes()
        self._record_flags = self.file["record_complete"][...]
        self._kv_flags = self.file["kv_complete"][...]
        self._check_records()

    def _check_shapes(self) -> None:
        lay, q = self.layout, self.queries
        n = lay.num_tokens
        if len(q) and (int(q.min()) < 0 or int(q.max()) >= n or bool((q[1:] <= q[:-1]).any())):
            raise _damaged(self, f"stored query tokens are not increasing clip tokens in 0..{n - 1} (layout grid "
                                 f"{list(lay.grid)})")
        ns, nc, nl, nh, nq, d = (len(self.steps), lay.num_chunks, len(self.layers), len(self.heads), len(q),
                                 lay.head_dim)
        f, h, w = lay.grid
        expected = {
            "key": (n,), "record_complete": (ns, nc, nl), "kv_complete": (ns, nc, nl), "record_timestep": (ns, nc),
            "record_key_start_frame": (ns, nc),
        }
        optional = {
            "q": (ns, nl, nh, nq, d), "k": (ns, nl, nh, n, d), "v": (ns, nl, nh, n, d), "lse": (ns, nl, nh, nq),
            "maps": (ns, nl, nh, nq, n), "frame_mass": (ns, nl, nh, f, f), "offset_t": (ns, nc, nl, nh, 2 * f - 1),
            "offset_h": (ns, nc, nl, nh, 2 * h - 1), "offset_w": (ns, nc, nl, nh, 2 * w - 1),
            "query_frame": (nq,), "query_row": (nq,), "query_col": (nq,), "key_frame": (n,), "key_row": (n,),
            "key_col": (n,),
        }
        for name, shape in expected.items():
            _dataset(self, name, shape)
        for name, shape in optional.items():
            if name in self.file:
                _dataset(self, name, shape)
        for name in ("q", "k", "v"):
            if name in self.file:
                ds = self.file[name]
                logical = _text(ds.attrs.get("dtype_logical", "float32"))
                allowed = {"bfloat16": "u", "float16": "f", "float32": "f"}
                if logical not in allowed or ds.dtype.kind not in allowed[logical] + "i":
                    raise _damaged(self, f"dataset '{name}' stores {ds.dtype} as '{logical}'")
        # The grid coordinates the writer derived from the grid must agree with the layout's grid (a grid of the
        # same token count but other proportions passes every shape check).
        tpf = lay.tokens_per_frame
        for name, tokens in (("query", q.numpy()), ("key", np.arange(n))):
            for coord, values in (("frame", tokens // tpf), ("row", (tokens // w) % h), ("col", tokens % w)):
                var = f"{name}_{coord}"
                if var in self.file and not np.array_equal(self.file[var][...], values):
                    raise _damaged(self, f"'{var}' disagrees with the layout grid {list(lay.grid)}")
        grid_attr = self.file.attrs.get("grid")
        if grid_attr is not None and [int(x) for x in np.ravel(grid_attr)] != list(lay.grid):
            raise _damaged(self, f"attribute 'grid' {np.ravel(grid_attr).tolist()} disagrees with the layout grid "
                                 f"{list(lay.grid)}")
        if not 0 <= self.context_step < lay.num_steps:
            raise _damaged(self, f"context_step {self.context_step} is not a step of the layout "
                                 f"(0..{lay.num_steps - 1})")

    def _check_records(self) -> None:
        """The first attended key frame of every complete record lies in ``[0, chunk start]``; with a rolling cache
        it is where the layout's window starts (the reader rebuilds the sink and window from the layout)."""
        lay = self.layout
        start = self.file["record_key_start_frame"][...]
        for s, c in {(int(s), int(c)) for s, c, _ in zip(*np.nonzero(self._record_flags))}:
            window = lay.key_frame_spans(c)[-1][0] if lay.local_attn_size != -1 else None
            if not 0 <= int(start[s, c]) <= lay.chunk_frames(c)[0] or window not in (None, int(start[s, c])):
                expected = window if window is not None else f"0..{lay.chunk_frames(c)[0]}"
                raise _damaged(self, f"record_key_start_frame of step {self.steps[s]}, chunk {c} is "
                                     f"{int(start[s, c])} (expected {expected})")

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if "dataset" in self.__dict__:
            self.__dict__.pop("dataset").close()
        if self.file.id.valid:
            self.file.close()

    # -------------------------------------------------------------------------------------------- metadata
    @property
    def grid(self) -> tuple[int, int, int]:
        return self.layout.grid

    @property
    def complete(self) -> bool:
        return bool(int(self.file.attrs["complete"]))

    @property
    def stored(self) -> list[str]:
        return [n for n in ("q", "k", "v", "lse", "text_mass", "maps", "frame_mass") if n in self.file]

    @property
    def attrs(self) -> dict:
        """Global attributes (provenance) with JSON strings decoded."""
        out = {}
        for k, v in self.file.attrs.items():
            if isinstance(v, bytes):
                v = v.decode()
            if isinstance(v, str) and v[:1] in "[{":
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            out[k] = v.tolist() if isinstance(v, np.ndarray) else v
        return out

    @property
    def records(self) -> list[RecordKey]:
        """Records that were completely written, in (chunk, step, layer) order."""
        found = [RecordKey(self.steps[s], int(c), self.layers[l]) for s, c, l in zip(*np.nonzero(self._record_flags))]
        return sorted(found, key=lambda r: (r.chunk, r.step, r.layer))

    def chunk_queries(self, chunk: int) -> tuple[int, int]:
        """Positions ``[a, b)`` along the stored query axis that belong to ``chunk``."""
        return chunk_query_range(self.layout, self.queries, chunk)

    def require_context_kv(self, start: int, end: int, layer: int, name: str) -> None:
        """The clean-pass K/V of every chunk overlapping frames ``[start, end)`` are in the file."""
        for c in range(self.layout.num_chunks):
            c0, c1 = self.layout.chunk_frames(c)
            if c1 > start and c0 < end:
                self.require_kv(self.context_step, c, layer, name)

    def require_kv(self, step: int, chunk: int, layer: int, name: str) -> None:
        if name not in self.file:
            raise ToolkitError(f"this capture did not store '{name}' (stored: {', '.join(self.stored)})")
        s = self.step_index.get(step)
        if s is None or not self._kv_flags[s, chunk, self.layer_index[layer]]:
            raise ToolkitError(f"{name} of chunk {chunk} at step {step}, layer {layer} is missing from {self.path} "
                               "(interrupted capture?)")

    def record(self, step: int, chunk: int, layer: int) -> Record:
        key = RecordKey(int(step), int(chunk), int(layer))
        s, l = self.step_index.get(key.step), self.layer_index.get(key.layer)
        if s is None or l is None or not 0 <= key.chunk < self.layout.num_chunks or not self._record_flags[
                s, key.chunk, l]:
            raise ToolkitError(f"record step={step} chunk={chunk} layer={layer} is not in {self.path} "
                               f"({len(self.records)} complete records: steps {self.steps}, layers {self.layers}, "
                               f"chunks 0-{self.layout.num_chunks - 1})")
        return Record(self, key)

    def _as_record(self, record) -> Record:
        return record if isinstance(record, Record) else self.record(*record)

    @cached_property
    def dataset(self) -> xr.Dataset:
        """The whole file as a lazy xarray Dataset (the ``toolkit`` engine: h5netcdf with bf16 bits and float16
        decoded to float32, so ``q``/``k``/``v`` equal ``Record.q()``/``k()``/``v()``; dask chunks = storage
        chunks). ``k``/``v`` are indexed by the step that *wrote* each token: a record's keys are ``attended``.
        Coordinates (``key_frame``, ``query_row``, ``timestep``, ...) are numpy arrays, not dask, so
        ``ds.k.groupby("key_frame")`` works."""
        import xarray as xr

        from toolkit.capture.xarray_backend import ToolkitBackendEntrypoint

        ds = xr.open_dataset(self.path, engine=ToolkitBackendEntrypoint, chunks={})
        # grid coordinates are 1-D and small; dask-backed ones cannot be grouped by (xarray needs their labels)
        out = ds.assign_coords({n: c.variable.load() for n, c in ds.coords.items() if n not in ds.xindexes})
        out.set_close(ds._close)  # closing the view closes the file
        return out

    def attended(self, record: Record | tuple[int, int, int], heads: int | Sequence[int] | None = None) -> xr.Dataset:
        """Lazy view of exactly what ``record``'s queries attended, as an ``xarray.Dataset``: ``k`` and ``v``
        (``head, key, dim``) over the attended keys — the clean-pass (``context_step``) K/V of the frames before the
        record's chunk, then the chunk's own K/V at the record's step, read by reference as ``Record.k()`` does —
        and the record's ``q`` (``head, query, dim``) and ``lse`` (``head, query``), whichever are stored.

        Coordinates: ``key`` (clip raster index, equal to ``Record.key_tokens``), ``key_frame``, ``key_row``,
        ``key_col``, ``key_step`` (the step each key was written at); ``query`` and ``query_frame``/``row``/``col``.
        Values are float32 dask arrays equal to ``Record.k()``/``v()``/``q()``/``lse()``; probabilities are
        ``exp(sm_scale · q·k − lse)`` and each row sums to 1. (``dataset.k.sel(step=s)`` is *not* what step ``s``
        attended in a causal run: its earlier frames hold the K of their own step ``s``, not the clean pass.)"""
        import xarray as xr

        rec = self._as_record(record)
        ds = self.dataset
        pos = rec._head_positions(heads)
        tpf = self.layout.tokens_per_frame
        f0, f1 = rec.query_frames
        ctx = self.context_step
        scalar = ["step", "timestep", "layer"]
        out = {}
        for name in ("k", "v"):
            if name not in self.file:
                continue
            parts = []
            for a, b in rec.context_spans():  # earlier chunks: their clean-pass slices
                self.require_context_kv(a, b, rec.layer, name)
                parts.append((ctx, ds[name].isel(step=self.step_index[ctx], layer=rec._l, head=pos,
                                                 key=slice(a * tpf, b * tpf))))
            self.require_kv(rec.step, rec.chunk, rec.layer, name)
            parts.append((rec.step, ds[name].isel(step=rec._s, layer=rec._l, head=pos,
                                                  key=slice(f0 * tpf, f1 * tpf))))
            parts = [p.drop_vars(scalar, errors="ignore").assign_coords(key_step=("key", np.full(p.sizes["key"], s)))
                     for s, p in parts]
            out[name] = xr.concat(parts, dim="key", coords="minimal", compat="override", join="exact")
        for name in ("q", "lse"):
            if name in self.file:
                out[name] = ds[name].isel(step=rec._s, layer=rec._l, head=pos,
                                          query=slice(rec._qa, rec._qb)).drop_vars(scalar, errors="ignore")
        if not out:
            raise ToolkitError(f"this capture stored none of q, k, v, lse (stored: {', '.join(self.stored)})")
        result = xr.Dataset(out)
        # token coordinates are small: materialised, so groupby(att.key_frame) and friends work
        result = result.assign_coords({n: (c.dims, np.asarray(c.values), c.attrs) for n, c in result.coords.items()
                                       if n not in result.indexes})
        return result.assign_attrs({
            "step": rec.step, "chunk": rec.chunk, "layer": rec.layer, "timestep": rec.timestep,
            "is_clean": int(rec.is_clean), "sm_scale": rec.scale, "key_start_frame": rec.key_frames[0],
            "sink_frames": rec.sink_frames, "context_step": ctx})

    # -------------------------------------------------------------------------------------------- exact maps
    def _qk(self, rec: Record, head: int, device):
        device = resolve_device(device)
        return rec.q(head, device)[0], rec.k(head, device)[0], rec.lse(head, device)[0]

    def _labelled(self, p: torch.Tensor, rec: Record, head: int, q_tok: torch.Tensor, k_tok: torch.Tensor):
        import xarray as xr

        tpf, w = self.layout.tokens_per_frame, self.layout.grid[2]
        h = self.layout.grid[1]
        coords = {"query": q_tok.numpy(), "key": k_tok.numpy(),
                  "query_frame": ("query", (q_tok // tpf).numpy()), "key_frame": ("key", (k_tok // tpf).numpy()),
                  "query_row": ("query", ((q_tok // w) % h).numpy()), "key_row": ("key", ((k_tok // w) % h).numpy()),
                  "query_col": ("query", (q_tok % w).numpy()), "key_col": ("key", (k_tok % w).numpy())}
        return xr.DataArray(p.cpu().numpy(), dims=("query", "key"), coords=coords, name="probability", attrs={
            "long_name": "attention probability", "units": "1", "step": rec.step, "chunk": rec.chunk,
            "layer": rec.layer, "head": head, "timestep": rec.timestep})

    def _bf16_on_gpu(self, t: torch.Tensor) -> bool:
        """Stored values are bf16 (exact in TF32) and we compute on a GPU."""
        return t.is_cuda and self.file.attrs.get("storage_dtype") == "bfloat16"

    @staticmethod
    def _guard(rows: int, cols: int) -> None:
        if rows * cols > MAX_TILE_ENTRIES:
            raise ToolkitError(f"{rows} × {cols} probabilities ({human_bytes(rows * cols * 4)}) exceed the tile limit "
                               f"of {MAX_TILE_ENTRIES} entries; ask for fewer queries or a smaller tile")

    def rows(
        self, record: Record | tuple[int, int, int], head: int, queries: torch.Tensor | Sequence[int] | None = None, *,
        device: torch.device | str | None = None,
    ) -> xr.DataArray:
        """Exact probability rows ``P[query, key]`` of stored ``queries`` (clip token ids; None = all) over all
        attended keys, as a labelled ``xarray.DataArray``."""
        rec = self._as_record(record)
        q, k, lse = self._qk(rec, head, device)
        q_tok = rec.query_tokens
        if queries is not None:
            want = torch.as_tensor(queries, dtype=torch.long).flatten()
            pos = torch.searchsorted(q_tok, want.contiguous()).clamp(max=len(q_tok) - 1)
            if len(q_tok) == 0 or not torch.equal(q_tok[pos], want):
                raise ToolkitError("some requested queries were not stored for this record (see rec.query_tokens)")
            q, lse, q_tok = q[pos.to(q.device)], lse[pos.to(q.device)], want
        self._guard(len(q_tok), k.shape[0])
        with tf32_for_bf16_values(self._bf16_on_gpu(q)):
            p = exact.probs(q, k, lse, rec.scale)
        return self._labelled(p, rec, head, q_tok, rec.key_tokens)

    def tile(
        self, record: Record | tuple[int, int, int], head: int, q_range: tuple[int, int], k_range: tuple[int, int], *,
        device: torch.device | str | None = None,
    ) -> xr.DataArray:
        """Exact probabilities of the stored queries with clip token in ``[q_range)`` on the attended keys in
        ``[k_range)`` (clip token ids), labelled."""
        rec = self._as_record(record)
        q, k, lse = self._qk(rec, head, device)
        q_tok, k_tok = rec.query_tokens, rec.key_tokens
        qsel = (q_tok >= q_range[0]) & (q_tok < q_range[1])
        ksel = (k_tok >= k_range[0]) & (k_tok < k_range[1])
        self._guard(int(qsel.sum()), int(ksel.sum()))
        qd, kd = qsel.to(q.device), ksel.to(k.device)
        with tf32_for_bf16_values(self._bf16_on_gpu(q)):
            p = exact.probs(q[qd], k[kd], lse[qd], rec.scale)
        return self._labelled(p, rec, head, q_tok[qsel], k_tok[ksel])

    def pooled(
        self, record: Record | tuple[int, int, int], heads: int | Sequence[int] | None = None, *, source: str = "auto",
        device: torch.device | str | None = None,
    ) -> xr.Dataset:
        """Frame×frame mass and (Δt, Δh, Δw) offset profiles of a record as an ``xarray.Dataset``.

        ``source``: ``recompute`` from q/k/lse (exact, streamed), ``stored`` (pooled views written during
        capture), ``auto`` = recompute when q, k and lse are stored, else stored."""
        import xarray as xr

        rec = self._as_record(record)
        pos = rec._head_positions(heads)
        head_ids = [self.heads[p] for p in pos]
        can_recompute = all(n in self.file for n in ("q", "k", "lse"))
        if source == "auto":
            source = "recompute" if can_recompute else "stored"
        f, h, w = self.grid
        f0, f1 = rec.query_frames
        if source == "recompute":
            device = resolve_device(device)
            q, k, lse = rec.q(head_ids, device), rec.k(head_ids, device), rec.lse(head_ids, device)
            with tf32_for_bf16_values(self._bf16_on_gpu(q)):
                tokens, tpf, at = rec.query_tokens.to(device), self.layout.tokens_per_frame, 0
                parts = []  # sums are additive over key spans, each normalised by the row LSE over all keys
                for a, b in rec.key_spans:
                    n = (b - a) * tpf
                    parts.append(pooled_sums(q, k[:, at:at + n], lse, rec.scale, tokens, (a, b), self.grid))
                    at += n
            means = {n: sum(p.means()[n] for p in parts).cpu().numpy() for n in parts[0].means()}
            means["frame_mass"] = means["frame_mass"][:, f0:f1]
        elif source == "stored":
            if "frame_mass" not in self.file:
                raise ToolkitError("this capture stored no pooled views and no q/k/lse to recompute them")
            sel = sorted(pos)
            means = {"frame_mass": self.file["frame_mass"][rec._s, rec._l, sel, f0:f1]}
            for axis in "thw":
                means[f"offset_{axis}"] = self.file[f"offset_{axis}"][rec._s, rec.chunk, rec._l, sel]
            head_ids = [self.heads[p] for p in sel]
        else:
            raise ToolkitError(f"pooled source '{source}' unknown (auto, recompute, stored)")
        return xr.Dataset(
            {"frame_mass": (("head", "from_frame", "to_frame"), means["frame_mass"],
                            {"long_name": "mean attention mass of a query frame on a key frame", "units": "1"}),
             "offset_t": (("head", "dt"), means["offset_t"], {"long_name": "mean mass at frame offset", "units": "1"}),
             "offset_h": (("head", "dh"), means["offset_h"], {"long_name": "mean mass at row offset", "units": "1"}),
             "offset_w": (("head", "dw"), means["offset_w"], {"long_name": "mean mass at column offset",
                                                              "units": "1"})},
            coords={"head": head_ids, "from_frame": np.arange(f0, f1), "to_frame": np.arange(f),
                    "dt": np.arange(-(f - 1), f), "dh": np.arange(-(h - 1), h), "dw": np.arange(-(w - 1), w)},
            attrs={"step": rec.step, "chunk": rec.chunk, "layer": rec.layer, "timestep": rec.timestep,
                   "source": source})

    # -------------------------------------------------------------------------------------------- integrity
    def verify(
        self, records: int | None = None, rows: int = 64, *, seed: int = 0, device: torch.device | str | None = None
    ) -> str:
        """Integrity check on a sample: for ``records`` complete records (evenly spread; 0 = all; None = as many as
        about ``VERIFY_BUDGET`` keys × heads × channels allow, at least 8) and ``rows``
        stored queries of each (random with ``seed``; 0 = all), every head's row recomputed from the stored q and
        k must sum to 1 against the stored LSE, i.e. ``logsumexp(scale·q·k) == lse``. An overwritten or zeroed q,
        k or lse value breaks that equality, so damage HDF5's own checks cannot see (raw data carries no checksum)
        is found. Returns a one-line report; raises ``ToolkitError`` naming the first bad record."""
        missing = [n for n in ("q", "k", "lse") if n not in self.file]
        if missing:
            raise ToolkitError(f"{self.path}: --verify needs q, k and lse; this capture did not store "
                               f"{', '.join(missing)} (stored: {', '.join(self.stored)})")
        found = self.records
        if not found:
            return "verify: no complete records to check"
        if records is None:
            lay = self.layout
            records = max(8, VERIFY_BUDGET // (len(self.heads) * lay.num_tokens * lay.head_dim))
        picks = (range(len(found)) if records <= 0 or records >= len(found)
                 else sorted({int(round(x)) for x in np.linspace(0, len(found) - 1, records)}))
        tol = self._verify_tolerance()
        device = resolve_device(device)
        gen = torch.Generator().manual_seed(seed)
        worst, checked, bad = 0.0, 0, []
        for i in picks:
            rec = Record(self, found[i])
            n = rec._qb - rec._qa
            if n == 0:
                continue
            sel = (torch.arange(n) if rows <= 0 or rows >= n else torch.randperm(n, generator=gen)[:rows].sort().values)
            q, lse = rec.q(device=device)[:, sel.to(device)], rec.lse(device=device)[:, sel.to(device)]
            k = rec.k(device=device)
            with tf32_for_bf16_values(self._bf16_on_gpu(q)):
                dev = (exact.logsumexp(q, k, rec.scale) - lse).exp()  # row sum over the stored keys, h r
            if "text_mass" in self.file:  # joint text+video attention: the rest of the row is on text
                dev = dev + rec.text_mass(device=device)[:, sel.to(device)]
            elif self.attrs.get("adapter_text_tokens") in ("first", "last"):  # unstored text mass: only > 1 is bad
                dev = dev.clamp(min=1)
            dev = dev.sub(1).abs()  # |row sum - 1|
            dev = torch.where(torch.isfinite(dev), dev, torch.full_like(dev, float("inf")))
            checked += dev.numel()
            top = float(dev.max())
            worst = max(worst, top)
            if top > tol:
                h, r = divmod(int(dev.argmax()), dev.shape[1])
                what = f"sums to {1 + top:.6g}" if np.isfinite(top) else "is not finite"
                bad.append(f"record step={rec.step} chunk={rec.chunk} layer={rec.layer}: head {self.heads[h]}, query "
                           f"token {int(rec.query_tokens[sel[r]])} {what}")
        if bad:
            more = f" (and {len(bad) - 1} more of {len(picks)} sampled records)" if len(bad) > 1 else ""
            raise ToolkitError(f"{self.path}: verification failed: {bad[0]} against its stored lse (should be 1; "
                               f"tolerance {tol:g}): q, k or lse damaged{more}")
        return (f"verify: ok, {checked} rows of {len(picks)} records sum to 1 against the stored lse "
                f"(max |sum - 1| = {worst:.2e}, tolerance {tol:g})")

    def _verify_tolerance(self) -> float:
        """Rows of a file whose LSE comes from its own stored q/k sum to 1 up to float32 rounding. Older files
        computed it from the model's q/k: stored values narrower than the model's (e.g. bf16 of a float32 model) move
        logits by up to ~2^-9 of their size, so their rows may miss 1 by a few percent."""
        if _text(self.file.attrs.get(LSE_FROM, "")) == LSE_FROM_STORED:
            return 1e-3
        stored = str(_text(self.file.attrs.get("storage_dtype", "float32")))
        model = str(_text(self.file.attrs.get("model_dtype", stored)))
        return 0.25 if stored not in ("float32", model) else 1e-3

    # -------------------------------------------------------------------------------------------- summary
    def summary(self) -> str:
        """Human-readable description (``toolkit inspect``)."""
        a = self.attrs
        lay = self.layout
        total = len(self.steps) and int(np.count_nonzero(self._record_flags))
        sel = self.selection
        state = "complete" if self.complete else (
            "being written (open in another process)" if self.live else
            f"EMPTY ({a['nothing_matched']})" if "nothing_matched" in a else "INCOMPLETE (interrupted)")
        lines = [f"{self.path}: toolkit capture format {a.get('format_version')}, {state}"]
        for key in ("model", "checkpoint", "checkpoint_sha256", "prompt", "seed", "sampler"):
            if key in a:
                lines.append(f"  {key:18s} {a[key]}")
        kind = f"causal, {lay.num_chunks} chunks × {lay.frames_per_chunk} frames" if lay.causal else "bidirectional"
        if lay.local_attn_size != -1:
            kind += f", rolling KV cache of {lay.local_attn_size} frames, sink {lay.sink_size}"
        lines.append(f"  {'grid':18s} {lay.grid[0]} frames × {lay.grid[1]} × {lay.grid[2]} = {lay.num_tokens} tokens"
                     f" ({kind})")
        lines.append(f"  {'model shape':18s} {lay.num_layers} layers × {lay.num_heads} heads × {lay.head_dim} dims, "
                     f"model dtype {a.get('model_dtype')}, stored as {a.get('storage_dtype')}")
        lines.append(f"  {'timesteps':18s} " + ", ".join(f"{t:g}" for t in lay.timesteps)
                     + (f" (step {lay.clean_step} = clean pass)" if lay.clean_step is not None else ""))
        lines.append(f"  {'selection':18s} layers {_ranges(self.layers)}, heads {_ranges(self.heads)}, "
                     f"steps {_ranges(self.steps)} (stored axis), queries {sel.get('queries')} "
                     f"({len(self.queries)} of {lay.num_tokens}), store {','.join(sel.get('store', []))}")
        n_expected = _expected_records(sel, lay)
        lines.append(f"  {'records':18s} {total} complete of {n_expected} selected")
        sizes = []
        for name in ("q", "k", "v", "lse", "text_mass", "maps", "frame_mass", "offset_t"):
            if name in self.file:
                ds = self.file[name]
                sizes.append(f"{name} {tuple(ds.shape)} {human_bytes(ds.id.get_storage_size())}")
        lines.append(f"  {'datasets':18s} " + "; ".join(sizes))
        lines.append(f"  {'file size':18s} {human_bytes(os.path.getsize(self.path))} apparent, "
                     f"{human_bytes(_disk_usage(self.path))} on disk")
        for key in ("toolkit_version", "torch_version", "date_created"):
            if key in a:
                lines.append(f"  {key:18s} {a[key]}")
        return "\n".join(lines)


def _expected_records(sel: dict, lay: RunLayout) -> int:
    from toolkit.capture.selection import Selection, resolve

    known = {k: v for k, v in sel.items() if k in Selection.__dataclass_fields__}
    known["store"] = tuple(known.get("store", ()))
    known["max_map_bytes"] = 1 << 62
    try:
        return len(resolve(Selection(**known), lay).records)
    except ToolkitError:
        return -1


def _ranges(values: list[int]) -> str:
    if not values:
        return "-"
    out, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(out)


def _disk_usage(path: str) -> int:
    st = os.stat(path)
    return getattr(st, "st_blocks", 0) * 512 or st.st_size


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0].strip("'\"")


def _damaged(cap: Capture, what: str) -> ToolkitError:
    return ToolkitError(f"{cap.path}: damaged capture file: {what}")


def _text(value) -> object:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _int_attr(cap: Capture, name: str) -> int:
    if name not in cap.file.attrs:
        raise _damaged(cap, f"attribute '{name}' is missing")
    value = cap.file.attrs[name]
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise _damaged(cap, f"attribute '{name}' is {_text(value)!r}, not an integer")
    return int(value)


def _json_attr(cap: Capture, name: str, kind: type):
    if name not in cap.file.attrs:
        raise _damaged(cap, f"attribute '{name}' is missing")
    text = _text(cap.file.attrs[name])
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as err:
        raise _damaged(cap, f"attribute '{name}' is not valid JSON ({_first_line(err)})") from None
    if not isinstance(value, kind):
        raise _damaged(cap, f"attribute '{name}' is a JSON {type(value).__name__}, not a {kind.__name__}")
    return value


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _layout(cap: Capture, d: dict) -> RunLayout:
    """``RunLayout`` of the ``layout`` attribute, every field checked (it sizes everything the reader computes)."""
    missing = [k for k in ("grid", "num_layers", "num_heads", "head_dim", "timesteps") if k not in d]
    if missing:
        raise _damaged(cap, f"attribute 'layout' lacks {', '.join(missing)}")
    grid, ts = d["grid"], d["timesteps"]
    problems = []
    if not (isinstance(grid, list) and len(grid) == 3 and all(_positive_int(x) for x in grid)):
        problems.append(f"grid {grid!r} is not 3 positive integers")
    for k in ("num_layers", "num_heads", "head_dim"):
        if not _positive_int(d[k]):
            problems.append(f"{k} {d[k]!r} is not a positive integer")
    if not (isinstance(ts, list) and ts and all(isinstance(t, (int, float)) and not isinstance(t, bool)
                                                 for t in ts)):
        problems.append(f"timesteps {ts!r} are not a list of numbers")
    fpc, clean, scale = d.get("frames_per_chunk"), d.get("clean_step"), d.get("scale")
    if fpc is not None and not _positive_int(fpc):
        problems.append(f"frames_per_chunk {fpc!r} is not a positive integer")
    if clean is not None and not (isinstance(clean, int) and isinstance(ts, list) and 0 <= clean < len(ts)):
        problems.append(f"clean_step {clean!r} is not a step")
    if scale is not None and not (isinstance(scale, (int, float)) and np.isfinite(scale) and scale > 0):
        problems.append(f"scale {scale!r} is not a positive number")
    window, sink = d.get("local_attn_size", -1), d.get("sink_size", 0)
    if not problems and (window != -1 or sink):
        if fpc is None:
            problems.append("a local attention window without chunks")
        else:
            try:
                check_window(window, sink, fpc)
            except ToolkitError as err:
                problems.append(str(err))
    if problems:
        raise _damaged(cap, "attribute 'layout': " + "; ".join(problems))
    return RunLayout(tuple(grid), d["num_layers"], d["num_heads"], d["head_dim"], tuple(float(t) for t in ts), fpc,
                     clean, scale, window, sink)


def _dataset(cap: Capture, name: str, shape: tuple[int, ...] | None) -> h5py.Dataset:
    if name not in cap.file:
        raise _damaged(cap, f"dataset '{name}' is missing")
    ds = cap.file[name]
    if not isinstance(ds, h5py.Dataset):
        raise _damaged(cap, f"'{name}' is not a dataset")
    if shape is not None and tuple(ds.shape) != tuple(shape):
        raise _damaged(cap, f"dataset '{name}' has shape {tuple(ds.shape)}, the layout and index axes give "
                            f"{tuple(shape)}")
    return ds


def _index(cap: Capture, name: str, size: int) -> list[int]:
    """An index axis (``step``/``layer``/``head``): distinct integers in ``0..size-1``."""
    values = _dataset(cap, name, None)[...]
    if values.ndim != 1 or values.dtype.kind not in "iu":
        raise _damaged(cap, f"dataset '{name}' has shape {values.shape} and dtype {values.dtype} (expected 1-D "
                            "integers)")
    out = [int(x) for x in values]
    if len(set(out)) != len(out) or any(not 0 <= x < size for x in out):
        raise _damaged(cap, f"dataset '{name}' holds {out}, expected distinct values in 0..{size - 1}")
    return out


def open_capture(path: str | os.PathLike) -> Capture:
    """Open a capture file for reading (see module docstring)."""
    return Capture(path)
