"""The capture file: one HDF5 file per run, written by one background thread.

Layout (all variables share dimension scales, so ``xarray.open_dataset(path, engine="h5netcdf")`` shows named dims)::

    q      (step, layer, head, query, dim)   post-RoPE queries of the stored query tokens
    k, v   (step, layer, head, key, dim)     post-RoPE K / raw V of each chunk's *new* tokens at that step
    lse    (step, layer, head, query)        natural-log softmax normaliser of scale·q·k over the attended keys
    maps   (step, layer, head, query, key)   probabilities (only under the size guard; 0 = not attended)
    frame_mass (step, layer, head, from_frame, to_frame); offset_t/h/w (step, chunk, layer, head, dt|dh|dw)
    record_complete, kv_complete (step, chunk, layer) uint8 flags; record_timestep, record_key_start_frame (step, chunk)

``key`` indexes every clip token (raster order) and ``query`` the stored query tokens, so each token's K/V at a step
is stored once: a record's attended keys are reassembled by reference (see ``reader.Record.k``). The ``step``,
``layer`` and ``head`` axes hold only the selected (and context) values; their coordinates give the true ids.

**Measured choices** (this 2-core CPU box, h5py 3.16 / HDF5 2.0, 4 × 12 × 4680 × 128 bf16-bits blocks of
Gaussian data with per-channel scales, write to page cache):

=================  =======  ============  ==========
codec              ratio    write MB/s    read MB/s
=================  =======  ============  ==========
none               1.00     420–2500      380–690
gzip-1 + shuffle   1.37     24–39         170–220
gzip-4 + shuffle   1.39     19–26         180–190
lzf + shuffle      1.19     80–93         160–270
=================  =======  ============  ==========

Capturing one full-size layer at generation speed needs ≈ 0.3–1 GB/s, so the default is **uncompressed** (opens
everywhere); ``gzip`` (portable, 1.37× smaller for bf16) and ``lzf`` (h5py-only readers) are opt-in for archives.
Storage chunks are one frame of one head, ``(1, 1, 1, height·width, dim)`` (390 KiB at 480p, inside h5py's
10 KiB–1 MiB advice): analyses read one head at a time, and a record's keys are whole frames.

**Crash safety.** Uncompressed datasets are allocated when created (``H5D_ALLOC_TIME_EARLY``, fill never: sparse
on disk until written), so after the file is set up no HDF5 metadata changes until the final ``complete``
attribute: a record is raw data plus one flag byte, flushed in that order (the flags of one (step, chunk) are set
and flushed together: per-record flushes made pooled captures of all layers 1.24× slower on the H100, one per
(step, chunk) 1.05×). A killed run leaves a file that opens, has ``complete = 0`` and whose flagged records are
intact. Compressed datasets allocate chunks as they are written (metadata changes), so their crash safety is
best-effort (a flush after every (step, chunk)).

**Write errors** (disk full, quota, file-size limit). Files are opened without HDF5's chunk cache, so each
write reaches the OS (or fails) inside the write call: a chunk left in a cache is written only on eviction, flush
or close, and a failed close is reported nowhere useful (in a ``__del__`` it is only printed) and leaves HDF5 with a
freed dataset that crashes the process later (SIGBUS/SIGSEGV). The store keeps one Dataset handle per variable
for its lifetime (no per-write temporaries) and flushes before setting flags, so a flag reaches the file only
after its data did. An error in the writer thread is raised by the main thread's next call and stops the
capture; the file keeps ``complete = 0`` and is closed without further metadata writes.

**Creation and writers.** The file is built under a temporary name in the same folder and renamed into place when
its schema is written, so an interrupted start leaves no file under the final name (a re-run or ``--resume``
just starts again). One process writes a capture at a time: ``CaptureLock`` holds ``flock`` on ``<file>.lock``
for the whole capture (HDF5's own file locking is often disabled on NFS/Lustre with
``HDF5_USE_FILE_LOCKING=FALSE``); the lock dies with its process, so a lock file left by a killed run is reused.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import queue
import re
import socket
import threading
import warnings
from dataclasses import asdict
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch

from toolkit._version import __version__
from toolkit.capture.selection import Plan, resolve_storage_dtype
from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    from tqdm import tqdm

FORMAT_NAME = "toolkit-capture"
# Version 2 = key sets with an attention sink (rolling KV cache); files without one are still written as 1, which
# every earlier reader understands. Readers refuse versions above FORMAT_VERSION.
FORMAT_VERSION = 2
BF16_DECODE = "float32 bits = uint32(x) << 16"
# Where lse (and maps, pooled views) come from. Stored q/k narrower than the model's (bf16 of a float32 model) are
# rounded; computing lse from the rounded values keeps every row of the file's maps an exact softmax of its own q
# and k (rows sum to 1). Files without the attribute computed it from the model's unrounded q/k.
LSE_FROM = "lse_computed_from"
LSE_FROM_STORED = "the stored q and k"
NO_CHUNK_CACHE = {"rdcc_nbytes": 0, "rdcc_nslots": 1}  # writes are synchronous: see "Write errors" above


class CaptureWriteError(ToolkitError):
    """Writing the capture file failed (disk full, permissions, ...)."""


def describe_os_error(err: BaseException, path: str) -> str:
    """One line for the user from an OSError raised by HDF5 or the OS."""
    code = getattr(err, "errno", None)
    text = str(err)
    m = re.search(r"errno = (\d+)", text)  # HDF5 reports failed writes as RuntimeError text with the errno
    if code is None and m:
        code = int(m.group(1))
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text:
        return f"disk full while writing {path}"
    if code == errno.EFBIG or "File too large" in text:
        return f"file size limit reached while writing {path}"
    if code in (errno.EACCES, errno.EPERM) or "ermission denied" in text:
        return f"permission denied: cannot write {path}"
    if code == errno.ENOENT or "No such file" in text:
        return f"directory does not exist for {path}"
    return f"cannot write {path}: {text.splitlines()[0] if text else type(err).__name__}"


def _attr(value):
    """Attribute values: str/int/float/1-D numeric arrays only (CF advice); everything else as JSON."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        return str(value)  # plain str: h5py cannot store str subclasses such as torch's TorchVersion
    if isinstance(value, (int, float, np.integer, np.floating)):
        return value
    return json.dumps(value, default=str)


def storage_numpy_dtype(storage: str) -> np.dtype:
    return {"bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}[storage]


def to_storage(x: torch.Tensor, storage: str) -> torch.Tensor:
    """Cast to the storage representation (bf16 -> its raw bits as int16, viewed as uint16 on disk)."""
    if storage == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16)
    return x.to(torch.float16 if storage == "float16" else torch.float32)


def check_format(name: object, source: object) -> None:
    """Refuse a file whose ``format`` attribute is not a capture's (``open_capture`` and the xarray engine)."""
    if name != FORMAT_NAME:
        raise ToolkitError(f"{source} is not a toolkit capture file (format attribute {name!r})")


def check_format_version(version: int, source: object) -> None:
    """Refuse a capture of a newer format than this toolkit reads, or a version number that is none."""
    if version > FORMAT_VERSION:
        raise ToolkitError(f"{source} has format version {version}; this toolkit reads <= {FORMAT_VERSION} "
                           "(upgrade the toolkit)")
    if version < 1:
        raise ToolkitError(f"{source}: damaged capture file: format_version {version} is not a version")


def as_stored(x: torch.Tensor, storage: str) -> torch.Tensor:
    """``x`` rounded to the storage precision, in ``x``'s dtype: the values a reader of the file gets back."""
    if storage == "bfloat16":
        return x.to(torch.bfloat16).to(x.dtype)
    return x.to(torch.float16).to(x.dtype) if storage == "float16" else x


def from_storage(arr: np.ndarray, dtype_logical: str, device: torch.device | str | None = None) -> torch.Tensor:
    """Decode stored values to float32 on ``device`` (default CPU). The stored representation travels and is
    decoded there: bf16 bits move at half the bytes of float32 and the GPU widens them (CPU decoding and float32
    host-to-device copies dominated reading a 32,760-key record)."""
    raw = torch.from_numpy(np.ascontiguousarray(arr).view(np.int16) if dtype_logical == "bfloat16"
                           else np.ascontiguousarray(arr))
    if device is not None:
        raw = raw.to(device)
    return raw.view(torch.bfloat16).float() if dtype_logical == "bfloat16" else raw.float()


def temporary_path(path: str) -> str:
    """Where ``CaptureStore.create`` builds the file before renaming it to ``path`` (same folder: same file system)."""
    return f"{path}.creating"


def lock_path(path: str) -> str:
    return f"{path}.lock"


class CaptureLock:
    """Exclusive right to write the capture at ``path``: ``flock`` on ``<path>.lock``, which holds the owner's pid
    and host for the refusal message. The lock dies with the process (a leftover file does not block) and the file
    is removed on release. Use as a context manager."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = lock_path(path)
        self.fd: int | None = None

    def __enter__(self) -> CaptureLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise CaptureWriteError(describe_os_error(err, self.path)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown pid"
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ToolkitError(f"{self.path} is being written by another capture ({holder}; lock "
                                       f"{self.file}); wait for it to finish or choose a new --out") from None
                if err.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):  # e.g. Lustre without -o flock
                    warnings.warn(f"cannot lock {self.file} ({os.strerror(err.errno)}): nothing stops a second "
                                  f"writer of {self.path}", stacklevel=3)
                    return
                raise CaptureWriteError(describe_os_error(err, self.path)) from None
            # A releasing owner unlinks the file: if that happened after our open, we locked an orphan; retry.
            try:
                st, mine = os.stat(self.file), os.fstat(fd)
                if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.file)  # still locked: a waiting opener sees the inode change and retries
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


class CaptureStore:
    """Creates (or reopens for ``--resume``) the file and performs writes; used only from the writer thread
    after construction."""

    def __init__(self, path: str, plan: Plan, file: h5py.File, storage: str) -> None:
        self.path, self.plan, self.file, self.storage = path, plan, file, storage
        self.lse_from_stored = True  # lse / maps / pooled from the q, k as stored (see LSE_FROM)
        self.resumed = False
        self.datasets: dict[str, h5py.Dataset] = {}  # opened once: see "Write errors" above
        self.step_index = {s: i for i, s in enumerate(plan.stored_steps)}
        self.layer_index = {layer: i for i, layer in enumerate(plan.layers)}

    # ------------------------------------------------------------------------------------------------ creation
    @classmethod
    def create(cls, path: str, plan: Plan, model_dtype: torch.dtype | None, provenance: dict) -> CaptureStore:
        """Build the file under ``temporary_path(path)`` and rename it to ``path`` once its schema is flushed: a
        kill or Ctrl-C during creation leaves nothing under ``path``. The caller holds ``CaptureLock(path)``,
        so the temporary name is ours (a leftover of a killed start is overwritten)."""
        storage = resolve_storage_dtype(plan.selection.dtype, model_dtype)
        if os.path.exists(path):
            raise ToolkitError(f"{path} exists; pass --resume to continue it or choose a new --out")
        tmp = temporary_path(path)
        try:
            f = h5py.File(tmp, "w", track_order=True, **NO_CHUNK_CACHE)
        except (OSError, ValueError) as err:
            raise CaptureWriteError(describe_os_error(err, path)) from None
        try:
            store = cls(path, plan, f, storage)
            store._build(model_dtype, provenance)
            f.flush()
            os.replace(tmp, path)  # the open file follows its inode
        except BaseException as err:
            try:
                f.close()
            except (OSError, RuntimeError):
                pass
            try:
                os.remove(tmp)  # our own half-created file: nothing in it is usable
            except OSError:
                pass
            if isinstance(err, (OSError, RuntimeError)):
                raise CaptureWriteError(describe_os_error(err, path)) from None
            raise
        return store

    @classmethod
    def reopen(cls, path: str, plan: Plan, provenance: dict,
               model_dtype: torch.dtype | None = None) -> tuple[CaptureStore, set, set]:
        """Reopen an interrupted capture to fill in missing records; refuses a file from a different run (any
        setting that changes the numbers: `resume_mismatches`)."""
        try:
            f = h5py.File(path, "r+", **NO_CHUNK_CACHE)
        except OSError as err:
            raise CaptureWriteError(describe_os_error(err, path)) from None
        try:
            if f.attrs.get("format") != FORMAT_NAME:
                raise ToolkitError(f"{path} is not a toolkit capture file; refusing to resume into it")
            differ = resume_mismatches(f.attrs, plan, provenance, model_dtype)
            if differ:
                raise ToolkitError(f"{path} was captured with a different {', '.join(differ)}; --resume needs the "
                                   "same run (use a new --out, or --force to replace it)")
            store = cls(path, plan, f, str(f.attrs["storage_dtype"]))
            store.lse_from_stored = f.attrs.get(LSE_FROM) == LSE_FROM_STORED  # a file keeps its first run's rule
            done = {_key(store, idx) for idx in zip(*np.nonzero(f["record_complete"][...]))}
            kv = {_key(store, idx) for idx in zip(*np.nonzero(f["kv_complete"][...]))}
            # No metadata is touched here (an interrupted file already says complete = 0): a kill while
            # resuming cannot damage the records already in the file. History is appended on close.
            store.resumed = True
        except BaseException:
            f.close()
            raise
        return store, done, kv

    def _build(self, model_dtype: torch.dtype | None, provenance: dict) -> None:
        plan, lay, f = self.plan, self.plan.layout, self.file
        frames, height, width = lay.grid
        tpf = lay.tokens_per_frame
        f.attrs.update({
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION if lay.sink_size else 1, "complete": 0,
            "Conventions": "CF-1.11",
            "title": "attention capture (post-RoPE q/k, v, softmax LSE) of a video diffusion transformer",
            "references": "arXiv 2602.12271 (MonarchRT); github.com/guandeh17/Self-Forcing",
            "comment": ("Any attention probability is exp(sm_scale * q.k - lse). Keys attended by record (step s, "
                        "chunk c): tokens from record_key_start_frame up to chunk c's start at step context_step "
                        "(the clean pass), then chunk c's own tokens at step s; with a rolling KV cache (layout "
                        "local_attn_size, sink_size) the first sink_size frames come first. Records are valid where "
                        "record_complete == 1."),
            "date_created": _now(),
            "history": f"{_now()}: " + str(provenance.get("history_command",
                                                          f"created by toolkit {__version__}")),
            "toolkit_version": __version__, "torch_version": str(torch.__version__),
            "h5py_version": h5py.version.version, "hdf5_version": h5py.version.hdf5_version,
            "layout": _attr(lay.to_attrs()), "selection": _attr(_selection_attrs(plan)),
            "storage_dtype": self.storage, "model_dtype": str(model_dtype).replace("torch.", ""),
            LSE_FROM: LSE_FROM_STORED,
            "context_step": lay.clean_step if lay.clean_step is not None else lay.num_steps - 1,
            "grid": np.array(lay.grid, dtype=np.int64), "batch_index": plan.selection.batch_index,
            "sm_scale": lay.softmax_scale,
        })
        for key, value in provenance.items():
            f.attrs[key] = _attr(value)

        steps = np.array(plan.stored_steps, dtype=np.int64)
        queries = plan.queries.numpy().astype(np.int64)
        keys = np.arange(lay.num_tokens, dtype=np.int64)
        qf, qh, qw = queries // tpf, (queries // width) % height, queries % width
        kf, kh, kw = keys // tpf, (keys // width) % height, keys % width
        fpc = lay.frames_per_chunk or frames
        scales = {
            "step": (steps, "denoising step (last = clean-context pass for causal models)", "1"),
            "chunk": (np.arange(lay.num_chunks), "autoregressive chunk", "1"),
            "layer": (np.array(plan.layers), "transformer block", "1"),
            "head": (np.array(plan.heads), "attention head", "1"),
            "dim": (np.arange(lay.head_dim), "head channel", "1"),
            "query": (queries, "clip raster token index of a stored query", "1"),
            "key": (keys, "clip raster token index of a key", "1"),
        }
        if "pooled" in plan.store:
            scales.update({
                "from_frame": (np.arange(frames), "query frame", "1"),
                "to_frame": (np.arange(frames), "key frame", "1"),
                "dt": (np.arange(-(frames - 1), frames), "key frame minus query frame", "1"),
                "dh": (np.arange(-(height - 1), height), "key row minus query row", "1"),
                "dw": (np.arange(-(width - 1), width), "key column minus query column", "1"),
            })
        for name, (values, long_name, units) in scales.items():
            ds = f.create_dataset(name, data=values)
            ds.make_scale(name)
            ds.attrs.update({"long_name": long_name, "units": units})
        aux = {
            "timestep": (("step",), np.array([lay.timesteps[s] for s in plan.stored_steps]), "flow-matching timestep"),
            "is_clean": (("step",), np.array([int(s == lay.clean_step) for s in plan.stored_steps], dtype=np.int8),
                         "1 for the clean-context pass"),
            "chunk_start_frame": (("chunk",), np.array([lay.chunk_frames(c)[0] for c in range(lay.num_chunks)]),
                                  "first query frame of the chunk"),
            "query_frame": (("query",), qf, "frame of the query token"),
            "query_row": (("query",), qh, "latent row of the query token"),
            "query_col": (("query",), qw, "latent column of the query token"),
            "query_chunk": (("query",), np.minimum(qf // fpc, lay.num_chunks - 1), "chunk of the query token"),
            "key_frame": (("key",), kf, "frame of the key token"),
            "key_row": (("key",), kh, "latent row of the key token"),
            "key_col": (("key",), kw, "latent column of the key token"),
        }
        for name, (dims, values, long_name) in aux.items():
            self._var(name, dims, data=values, long_name=long_name, units="1", early=False)

        nsteps, nl, nh, nq, d = len(steps), len(plan.layers), len(plan.heads), len(queries), lay.head_dim
        nchunk = lay.num_chunks
        flag_dims = ("step", "chunk", "layer")
        self._var("record_complete", flag_dims, shape=(nsteps, nchunk, nl), dtype=np.uint8,
                  long_name="1 where the record (step, chunk, layer) is fully written", units="1", fill=0)
        self._var("kv_complete", flag_dims, shape=(nsteps, nchunk, nl), dtype=np.uint8,
                  long_name="1 where the K/V slice of the chunk's new tokens at this step is written", units="1",
                  fill=0)
        self._var("record_timestep", ("step", "chunk"), shape=(nsteps, nchunk), dtype=np.float64,
                  long_name="timestep seen by the seam", units="1", fill=np.nan)
        self._var("record_key_start_frame", ("step", "chunk"), shape=(nsteps, nchunk), dtype=np.int32,
                  long_name="first attended key frame", units="1", fill=-1)

        sdt = storage_numpy_dtype(self.storage)
        codec = plan.selection.compression
        tensor_attrs = dict(units="1", dtype_logical=self.storage, storage_dtype=self.storage,
                            model_dtype=str(model_dtype).replace("torch.", ""))
        if self.storage == "bfloat16":
            tensor_attrs["decode"] = BF16_DECODE
        qcoords = "timestep query_frame query_row query_col query_chunk"
        kcoords = "timestep key_frame key_row key_col"
        q_chunk_rows = max(1, min(nq, tpf))
        if "q" in plan.store:
            self._var("q", ("step", "layer", "head", "query", "dim"), shape=(nsteps, nl, nh, nq, d), dtype=sdt,
                      chunks=(1, 1, 1, q_chunk_rows, d), codec=codec, long_name="post-RoPE query",
                      post_rope=1, coordinates=qcoords, **tensor_attrs)
        for name, long_name, post in (("k", "post-RoPE key", 1), ("v", "value", 0)):
            if name in plan.store:
                self._var(name, ("step", "layer", "head", "key", "dim"), shape=(nsteps, nl, nh, lay.num_tokens, d),
                          dtype=sdt, chunks=(1, 1, 1, tpf, d), codec=codec, long_name=long_name, post_rope=post,
                          coordinates=kcoords, **tensor_attrs)
        if "lse" in plan.store:
            self._var("lse", ("step", "layer", "head", "query"), shape=(nsteps, nl, nh, nq), dtype=np.float32,
                      chunks=(1, 1, nh, max(1, min(nq, 16 * tpf))), codec=codec,
                      long_name="log-sum-exp of sm_scale*q.k over the attended keys", units="1", lse_base="e",
                      coordinates=qcoords)
        if "text_mass" in plan.store:  # joint text+video attention: rows over the video keys sum to 1 - text_mass
            self._var("text_mass", ("step", "layer", "head", "query"), shape=(nsteps, nl, nh, nq), dtype=np.float32,
                      chunks=(1, 1, nh, max(1, min(nq, 16 * tpf))), codec=codec,
                      long_name="attention mass of the query on non-video (text) tokens", units="1",
                      coordinates=qcoords)
        if "maps" in plan.store:
            self._var("maps", ("step", "layer", "head", "query", "key"), shape=(nsteps, nl, nh, nq, lay.num_tokens),
                      dtype=np.float32, chunks=(1, 1, 1, max(1, min(nq, 64)), max(1, min(lay.num_tokens, 4096))),
                      codec=codec, long_name="attention probability (0 where not attended)", units="1",
                      coordinates="timestep")
        if "pooled" in plan.store:
            self._var("frame_mass", ("step", "layer", "head", "from_frame", "to_frame"),
                      shape=(nsteps, nl, nh, frames, frames), dtype=np.float32, codec=codec,
                      long_name="mean attention mass of a query frame's stored queries on a key frame", units="1",
                      coordinates="timestep")
            for axis, size in (("t", frames), ("h", height), ("w", width)):
                self._var(f"offset_{axis}", ("step", "chunk", "layer", "head", f"d{axis}"),
                          shape=(nsteps, nchunk, nl, nh, 2 * size - 1), dtype=np.float32, codec=codec,
                          long_name=f"mean attention mass at key-query offset d{axis}", units="1",
                          coordinates="timestep")

    def _var(self, name, dims, *, data=None, shape=None, dtype=None, chunks=None, codec="none", early=True,
             fill=None, **attrs) -> h5py.Dataset:
        kw: dict = {}
        if data is None:
            kw["chunks"] = tuple(chunks) if chunks else True
            if codec == "gzip":
                kw.update(compression="gzip", compression_opts=1, shuffle=True)
            elif codec == "lzf":
                kw.update(compression="lzf", shuffle=True)
            elif early:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                kw["dcpl"] = dcpl
                if fill is None:
                    kw["fill_time"] = "never"  # sparse on disk; validity comes from the flags
            if fill is not None:
                kw["fillvalue"] = fill
            ds = self.file.create_dataset(name, shape=shape, dtype=dtype, **kw)
        else:
            ds = self.file.create_dataset(name, data=data)
        for i, dim in enumerate(dims):
            ds.dims[i].attach_scale(self.file[dim])
        ds.attrs.update({k: _attr(v) for k, v in attrs.items()})
        return ds

    # ------------------------------------------------------------------------------------------------ writes
    def dataset(self, name: str) -> h5py.Dataset:
        ds = self.datasets.get(name)
        if ds is None:
            ds = self.datasets[name] = self.file[name]
        return ds

    def write(self, name: str, index: tuple, array: np.ndarray) -> None:
        self.dataset(name)[index] = array

    def flush(self) -> None:
        """Write out whatever HDF5 still buffers (metadata; chunk index of compressed data); raises on failure."""
        self.file.flush()

    def set_flags(self, name: str, index: tuple) -> None:
        """``name[index] = 1``, written out now; call after ``flush``: the data they vouch for is in the file."""
        self.write(name, index, np.uint8(1))
        self.dataset(name).id.flush()

    def close(self, complete: bool, failed: bool = False) -> None:
        """Set ``complete`` and close. After a write error (``failed``) nothing more is written: the file keeps
        what was flushed, flags included, and ``complete = 0``."""
        if not self.file.id.valid:
            return
        self.datasets.clear()
        try:
            if not failed:
                if self.resumed:
                    history = str(self.file.attrs.get("history", ""))
                    self.file.attrs["history"] = history + f"\n{_now()}: resumed, complete={int(complete)}"
                if int(self.file.attrs["complete"]) != int(complete):
                    self.file.flush()  # everything else first: complete = 1 only on top of written records
                    self.file.attrs["complete"] = int(complete)
                self.file.flush()
        finally:
            self.file.close()


def _key(store: CaptureStore, idx) -> tuple[int, int, int]:
    s, c, l = (int(x) for x in idx)
    return store.plan.stored_steps[s], c, store.plan.layers[l]


# Provenance that decides the numbers of a record: a resume must match each one the new run provides (plus the
# layout, the selection and the model / storage dtypes, `resume_mismatches`). Versions, paths and the GPU name are
# left out: the same run resumed elsewhere is still the same computation.
RESUME_KEYS = ("model", "checkpoint_sha256", "checkpoint_entry", "config", "prompt", "seed", "sampler", "attention",
               "attention_backend", "noise", "compute_dtype", "latent_shape")


def _leaves(value, prefix: str) -> dict[str, object]:
    """A stored JSON attribute as ``{dotted.key: value}`` (a non-JSON value as itself)."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError:
            return {prefix: value}
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            out.update(_leaves(v if not isinstance(v, str) else json.dumps(v), f"{prefix}.{k}"))
        return out
    return {prefix: value.tolist() if hasattr(value, "tolist") else value}


def resume_mismatches(attrs: h5py.AttributeManager, plan: Plan, provenance: dict,
                      model_dtype: torch.dtype | None) -> list[str]:
    """``setting (was → now)`` for each setting of the file that differs from the new run's (empty: same run)."""
    now = {"layout": _attr(plan.layout.to_attrs()), "selection": _attr(_selection_attrs(plan))}
    now.update({k: _attr(v) for k, v in provenance.items() if k in RESUME_KEYS})
    if model_dtype is not None:
        now["model_dtype"] = str(model_dtype).replace("torch.", "")
        now["storage_dtype"] = resolve_storage_dtype(plan.selection.dtype, model_dtype)
    if "device" in provenance and "device" in attrs:  # cuda:0 vs cuda:1 is the same computation, cpu vs cuda not
        now["device type"] = str(provenance["device"]).split(":")[0]
    out = []
    for key, value in now.items():
        stored = attrs.get("device") if key == "device type" else attrs.get(key)
        if key == "device type" and stored is not None:
            stored = (stored.decode() if isinstance(stored, bytes) else str(stored)).split(":")[0]
        if str(stored) == str(value):
            continue
        was, new = _leaves(stored, key), _leaves(value, key)
        for name in [*was, *(k for k in new if k not in was)]:
            if str(was.get(name)) != str(new.get(name)):
                out.append(f"{name} ({_short(was.get(name))} → {_short(new.get(name))})")
    return out


def _short(value: object) -> str:
    text = "(none)" if value is None else (value.decode() if isinstance(value, bytes) else str(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _selection_attrs(plan: Plan) -> dict:
    sel = asdict(plan.selection)
    sel["store"] = sorted(plan.store)
    return sel


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class AsyncWriter:
    """One writer thread behind a queue bounded in bytes (h5py serialises HDF5 calls behind one lock anyway).

    ``put`` copies a tensor into a host buffer — pinned and non-blocking on CUDA, ordered on the current stream
    so later in-place writes to the KV cache cannot race it — and returns; the thread waits for the copy's event
    and writes. ``mark`` sets flags (one index, or a slice: one HDF5 write and one flush for a whole (step, chunk)
    of records) once every write queued before it is flushed to the file. A write error is kept,
    later items are dropped, and it is re-raised (one line) by the next ``check``/``put``/``mark``/``close`` in
    the main thread (the recorder's hook checks on every seam call, so the sampler stops)."""

    def __init__(self, store: CaptureStore, *, max_inflight_bytes: int = 2 << 30,
                 progress: tqdm | None = None) -> None:
        self.store = store
        self.max_inflight = max_inflight_bytes
        self.inflight = 0
        self.cond = threading.Condition()
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: str | None = None
        self.bytes_written = 0
        self.records_written = 0
        self.progress = progress
        self.thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self.thread.start()

    def check(self) -> None:
        if self.error:
            raise CaptureWriteError(self.error)

    def put(self, name: str, index: tuple, tensor: torch.Tensor) -> None:
        self.check()
        nbytes = tensor.numel() * tensor.element_size()
        with self.cond:
            while self.inflight and self.inflight + nbytes > self.max_inflight and not self.error:
                self.cond.wait()
            self.inflight += nbytes
        if tensor.is_cuda:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = torch.empty(tensor.shape, dtype=tensor.dtype)
            host.copy_(tensor)  # a copy: the KV cache slot may be overwritten by the next forward
            event = None
        self.queue.put(("data", name, index, host, event, nbytes))

    def mark(self, name: str, index: tuple, records: int = 0) -> None:
        """Set ``name[index] = 1`` once every earlier write is done, then flush; ``records`` = how many records
        these flags complete (progress and ``records_written``)."""
        self.check()
        self.queue.put(("mark", name, index, records))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            try:
                if self.error:
                    continue
                if item[0] == "data":
                    _, name, index, host, event, _ = item
                    if event is not None:
                        event.synchronize()
                    arr = host.numpy()
                    if arr.dtype == np.int16:
                        arr = arr.view(np.uint16)
                    self.store.write(name, index, arr)
                    self.bytes_written += arr.nbytes
                else:
                    _, name, index, records = item
                    self.store.flush()  # the data first: a flag must never reach the file before its data
                    self.store.set_flags(name, index)
                    if records:
                        self.records_written += records
                        if self.progress is not None:
                            self.progress.update(records)
                            self.progress.set_postfix_str(f"{self.bytes_written / 1e9:.2f} GB", refresh=False)
            except Exception as err:  # noqa: BLE001 - reported to the main thread as one line
                self.error = describe_os_error(err, self.store.path) if isinstance(err, (OSError, RuntimeError)) \
                    else f"writing {self.store.path} failed: {type(err).__name__}: {err}"
            finally:
                if item[0] == "data":
                    with self.cond:
                        self.inflight -= item[5]
                        self.cond.notify_all()

    def close(self, complete: bool) -> None:
        """Drain the queue, set the ``complete`` attribute (only if nothing failed) and close the file."""
        self.queue.put(None)
        self.thread.join()
        try:
            self.store.close(complete and self.error is None, failed=self.error is not None)
        except (OSError, RuntimeError) as err:
            self.error = self.error or describe_os_error(err, self.store.path)
        if self.progress is not None:
            self.progress.close()
        self.check()
