"""The recorder: a hook on the attention seams that writes the selected records while the sampler runs.

    with capture(model, select=Selection(layers="8", steps="3"), out="run.h5", layout=layout) as rec:
        self_forcing_rollout(model, noise, context)

Hooks go only on the seams of selected layers and are removed on exit, so a model outside the ``with`` costs
nothing (the seam checks an empty list). Install capture before ``torch.compile`` (hooks added to compiled modules
may be ignored). Per call the hook slices the selected heads and stored queries on the device, computes the exact
row LSE (``toolkit.attention.exact.logsumexp``, float32) and, if asked, pooled views and maps, then hands copies to
the writer thread; the sampler keeps running while the file is written.

Pooled views are the one selection recorded for every layer at once, so their per-record host cost decides the
overhead: on CUDA one fused Triton kernel per record (``toolkit.kernels.pooled``, which also returns the row LSE)
adds the sums into a device buffer of the whole (step, chunk), ``layer head bins``; when the last selected layer
of that (step, chunk) is done the buffer is turned into means and written with one ``put`` per variable, and the
records' ``record_complete`` flags follow (a record counts as written only once its pooled views are).

Repeated calls of a record already written in this run (e.g. the unconditional half of classifier-free guidance
with the same ``step``) are ignored: the first call of each (step, chunk, layer) is the one recorded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from toolkit.attention import exact
from toolkit.capture.pooled import accumulate_pooled, packed_bins, tf32_for_bf16_values, unpack
from toolkit.capture.selection import Plan, RunLayout, Selection, resolve
from toolkit.capture.store import (
    AsyncWriter,
    CaptureLock,
    CaptureStore,
    CaptureWriteError,
    as_stored,
    to_storage,
)
from toolkit.errors import ToolkitError
from toolkit.models.seam import AttentionContext, seams


class Recorder:
    """State of one capture; ``hook`` is attached to the selected seams."""

    def __init__(self, plan: Plan, store: CaptureStore, writer: AsyncWriter,
                 done_records: set, done_kv: set) -> None:
        self.plan, self.store, self.writer = plan, store, writer
        self.pending = set(plan.records) - done_records
        self.kv_pending = {(s, c, l) for (s, c) in plan.kv_cells for l in plan.layers} - done_kv
        self.seen: set = set()
        self.calls = 0  # seam calls of hooked layers, wanted or not
        self.all_heads = plan.heads == list(range(plan.layout.num_heads))
        self._heads: dict[torch.device, torch.Tensor] = {}
        self._queries: dict[torch.device, torch.Tensor] = {}
        self._chunk_queries: dict[int, tuple[int, int]] = {}
        self._local: dict[tuple, torch.Tensor] = {}  # (device, chunk, query offset) -> chunk-local query rows
        self._inv_counts: dict[torch.device, torch.Tensor] = {}
        self.cells: dict[tuple[int, int], _Cell] = {}  # (step, chunk) -> records waiting to be written
        self._cell_layers: dict[tuple[int, int], int] = {}
        for s, c, _ in self.pending:
            self._cell_layers[s, c] = self._cell_layers.get((s, c), 0) + 1

    @property
    def path(self) -> str:
        return self.store.path

    @property
    def records_written(self) -> int:
        return self.writer.records_written

    @property
    def bytes_written(self) -> int:
        return self.writer.bytes_written

    def _on(self, table: dict, device: torch.device, make) -> torch.Tensor:
        """``make()`` moved to ``device`` once (a host-to-device copy synchronises, so never per record)."""
        if device not in table:
            table[device] = make().to(device)
        return table[device]

    def _check(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> None:
        lay = self.plan.layout
        if ctx.attn_mask is not None:
            raise ToolkitError("capture does not record masked attention (the no-cache training path); "
                               "capture a KV-cache rollout instead")
        if ctx.extra_lse is not None and "pooled" in self.plan.store:
            raise ToolkitError("pooled views are over the video keys only; for a joint text+video attention store "
                               "q,k,v,lse (and text_mass) and pool from the capture")
        if tuple(ctx.grid) != tuple(lay.grid):
            raise ToolkitError(f"capture layout has grid {lay.grid} but the model ran grid {tuple(ctx.grid)}")
        if tuple(ctx.query_frames) != lay.chunk_frames(ctx.chunk):
            raise ToolkitError(
                f"chunk {ctx.chunk} queried frames {ctx.query_frames}, the capture layout expects "
                f"{lay.chunk_frames(ctx.chunk)} (frames_per_chunk={lay.frames_per_chunk})")
        if q.shape[2] != lay.num_heads or q.shape[3] != lay.head_dim:
            raise ToolkitError(f"model has {q.shape[2]} heads × {q.shape[3]} dims, layout says "
                               f"{lay.num_heads} × {lay.head_dim}")
        if ctx.key_frames[1] != ctx.query_frames[1] or k.shape[1] != (
                ctx.sink_frames + ctx.key_frames[1] - ctx.key_frames[0]) * ctx.tokens_per_frame:
            raise ToolkitError(f"attended keys {ctx.key_frames} must end with the query chunk {ctx.query_frames}")
        spans = ((0, ctx.sink_frames), ctx.key_frames) if ctx.sink_frames else (tuple(ctx.key_frames),)
        if lay.local_attn_size != -1 and spans != lay.key_frame_spans(ctx.chunk):  # the reader rebuilds them
            raise ToolkitError(f"chunk {ctx.chunk} attended frames {spans}, the capture layout's rolling cache "
                               f"gives {lay.key_frame_spans(ctx.chunk)}")
        if abs(ctx.scale - lay.softmax_scale) > 1e-12 * lay.softmax_scale:
            raise ToolkitError(f"seam softmax scale {ctx.scale} differs from the layout's {lay.softmax_scale}")
        if self.plan.selection.batch_index >= q.shape[0]:
            raise ToolkitError(f"batch index {self.plan.selection.batch_index} but the batch has {q.shape[0]}")

    def _extra_lse(self, ctx: AttentionContext, b: int, heads: torch.Tensor,
                   local: torch.Tensor) -> torch.Tensor | None:
        """``ctx.extra_lse`` of the stored heads and queries, ``h i`` float32 (None without one)."""
        if ctx.extra_lse is None:
            return None
        extra = ctx.extra_lse[b] if self.all_heads else ctx.extra_lse[b].index_select(0, heads)
        return extra.index_select(1, local).float()

    def _queries_of(self, chunk: int, device: torch.device, t0: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """(qa, qb, tokens, rows): the chunk's stored queries are ``plan.queries[qa:qb]`` (clip tokens, on
        ``device``), ``rows`` the same relative to token t0 (cached: no per-record ops)."""
        if chunk not in self._chunk_queries:
            self._chunk_queries[chunk] = self.plan.chunk_queries(chunk)
        qa, qb = self._chunk_queries[chunk]
        tokens = self._on(self._queries, device, lambda: self.plan.queries)[qa:qb]
        key = (device, chunk, t0)
        if key not in self._local:
            self._local[key] = tokens - t0
        return qa, qb, tokens, self._local[key]

    def _cell(self, ctx: AttentionContext, s_i: int, device: torch.device) -> _Cell:
        key = (ctx.step, ctx.chunk)
        cell = self.cells.get(key)
        if cell is None:
            bins = None
            if "pooled" in self.plan.store:
                shape = (len(self.plan.layers), len(self.plan.heads), packed_bins(ctx.grid))
                bins = torch.zeros(shape, dtype=torch.float32, device=device)
            cell = self.cells[key] = _Cell(s_i, ctx.chunk, tuple(ctx.query_frames), tuple(ctx.grid),
                                           ctx.timestep, ctx.key_frames[0], self._cell_layers.get(key, 0), bins)
        return cell

    @torch.no_grad()
    def hook(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             ctx: AttentionContext) -> None:
        self.calls += 1
        key = (ctx.step, ctx.chunk, ctx.layer)
        want_kv = key in self.kv_pending
        want_record = key in self.pending
        if not (want_kv or want_record) or key in self.seen:
            return
        self.writer.check()
        self._check(q, k, ctx)
        self.seen.add(key)
        plan, store, put = self.plan, self.store, self.writer.put
        s_i, l_i = store.step_index[ctx.step], store.layer_index[ctx.layer]
        b = plan.selection.batch_index
        heads = self._on(self._heads, q.device, lambda: torch.tensor(plan.heads))
        # position of the chunk's first token among the keys (after the sink's, if any)
        first = ctx.query_offset - ctx.key_offset + ctx.sink_frames * ctx.tokens_per_frame
        n = q.shape[1]
        t0 = ctx.query_offset

        if want_kv:
            for name, t in (("k", k), ("v", v)):
                if name in plan.store:
                    slab = t[b, first:first + n].index_select(1, heads).transpose(0, 1)  # h i d
                    put(name, (s_i, l_i, slice(None), slice(t0, t0 + n)), to_storage(slab, store.storage))
            self.writer.mark("kv_complete", (s_i, ctx.chunk, l_i))
            self.kv_pending.discard(key)

        if want_record:
            qa, qb, tokens, local = self._queries_of(ctx.chunk, q.device, t0)
            qs = q[b].index_select(0, local)
            qs = (qs if self.all_heads else qs.index_select(1, heads)).transpose(0, 1)  # h i d
            if "q" in plan.store:
                put("q", (s_i, l_i, slice(None), slice(qa, qb)), to_storage(qs, store.storage))
            cell = self._cell(ctx, s_i, q.device)
            if {"lse", "maps", "pooled", "text_mass"} & plan.store:
                ks = (k[b] if self.all_heads else k[b].index_select(1, heads)).transpose(0, 1)  # h j d, all keys
                if store.lse_from_stored:  # identity unless the storage rounds (store.LSE_FROM)
                    qs, ks = as_stored(qs, store.storage), as_stored(ks, store.storage)
                if "pooled" in plan.store:  # the pooled kernel's pass 1 is the row LSE
                    lse = accumulate_pooled(qs, ks, ctx.scale, tokens, ctx.key_frames, ctx.grid, cell.bins[l_i])
                else:
                    with tf32_for_bf16_values(q.is_cuda and q.dtype == torch.bfloat16):
                        lse = exact.logsumexp(qs, ks, ctx.scale)  # h i, float32
                text_lse = self._extra_lse(ctx, b, heads, local)
                if text_lse is not None:  # keys the seam did not get (joint attention's text): lse over all keys
                    lse = torch.logaddexp(lse.float(), text_lse)
                if "text_mass" in plan.store:
                    mass = torch.zeros_like(lse, dtype=torch.float32) if text_lse is None else (text_lse - lse).exp()
                    put("text_mass", (s_i, l_i, slice(None), slice(qa, qb)), mass)
                if "lse" in plan.store:
                    put("lse", (s_i, l_i, slice(None), slice(qa, qb)), lse.float())
                if "maps" in plan.store:
                    sink = ctx.sink_frames * ctx.tokens_per_frame  # keys [0, sink) ‖ [key_offset, ...)
                    cols = [(0, 0, sink), (sink, ctx.key_offset, ks.shape[1] - sink)] if sink else \
                        [(0, ctx.key_offset, ks.shape[1])]
                    with tf32_for_bf16_values(q.is_cuda and q.dtype == torch.bfloat16):
                        for rows, p in exact.iter_query_blocks(qs, ks, ctx.scale, lse):
                            for j, k0, n in cols:
                                put("maps", (s_i, l_i, slice(None), slice(qa + rows.start, qa + rows.stop),
                                             slice(k0, k0 + n)), p[..., j:j + n].float())
            cell.layers.append(l_i)
            if len(cell.layers) >= cell.expected:
                self._write_cell((ctx.step, ctx.chunk))

    def _write_cell(self, key: tuple[int, int]) -> None:
        """Queue a (step, chunk)'s pooled means, its timestep and key start, then its records' flags."""
        cell = self.cells.pop(key)
        if not cell.layers:
            return
        put, s_i, chunk = self.writer.put, cell.s_i, cell.chunk
        layers = sorted(cell.layers)
        runs = [slice(layers[0], layers[-1] + 1)] if layers == list(range(layers[0], layers[-1] + 1)) \
            else layers  # a resumed run may miss layers: then one layer at a time
        if cell.bins is not None:
            f0, f1 = cell.query_frames
            qa, qb = self._chunk_queries[chunk]
            inv = self._inverse_frame_counts(cell.bins.device, cell.grid)
            frame_mass = unpack(cell.bins, cell.grid)[0][:, :, f0:f1] * inv[f0:f1, None]  # layer head from to
            offsets = dict(zip("thw", unpack(cell.bins * (1.0 / max(qb - qa, 1)), cell.grid)[1:]))
            for sel in runs:
                put("frame_mass", (s_i, sel, slice(None), slice(f0, f1)), frame_mass[sel])
                for axis, values in offsets.items():
                    put(f"offset_{axis}", (s_i, chunk, sel), values[sel])
        put("record_timestep", (s_i, chunk), torch.tensor(cell.timestep, dtype=torch.float64))
        put("record_key_start_frame", (s_i, chunk), torch.tensor(cell.key_start_frame, dtype=torch.int32))
        # one flag write and one flush per run of layers, not per record (the writer thread holds the GIL in h5py)
        for sel in runs:
            n = sel.stop - sel.start if isinstance(sel, slice) else 1
            self.writer.mark("record_complete", (s_i, chunk, sel), records=n)
        step = self.plan.stored_steps[s_i]
        for l_i in cell.layers:
            self.pending.discard((step, chunk, self.plan.layers[l_i]))

    def _inverse_frame_counts(self, device: torch.device, grid: tuple[int, int, int]) -> torch.Tensor:
        """1 / (stored queries in each frame), 1 where a frame has none: ``F`` float32 on ``device``."""
        if device not in self._inv_counts:
            frames = self._on(self._queries, device, lambda: self.plan.queries) // (grid[1] * grid[2])
            ones = torch.ones_like(frames, dtype=torch.float32)
            counts = torch.zeros(grid[0], device=device).index_add_(0, frames, ones)
            self._inv_counts[device] = 1.0 / counts.clamp(min=1)  # index_add_, not bincount: no host sync
        return self._inv_counts[device]

    def flush(self) -> None:
        """Write every (step, chunk) still collecting layers (the run stopped early); called on exit."""
        for key in list(self.cells):
            self._write_cell(key)


@dataclass
class _Cell:
    """Records of one (step, chunk) computed but not yet written; ``bins``: ``layer head packed_bins`` sums."""

    s_i: int
    chunk: int
    query_frames: tuple[int, int]
    grid: tuple[int, int, int]
    timestep: float
    key_start_frame: int
    expected: int  # selected layers still to record in this (step, chunk)
    bins: torch.Tensor | None
    layers: list[int] = field(default_factory=list)  # store indices of the layers recorded so far


def runtime_provenance(model: torch.nn.Module) -> dict:
    """What the environment contributes to a capture's provenance (the caller's dict wins on conflicts)."""
    import subprocess

    import h5py

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    found = seams(model)
    backends = sorted({getattr(s.backend, "__name__", repr(s.backend)) if s.backend else "dense_attention"
                       for s in found})
    out = {"attention_backend": ",".join(backends), "device": str(device), "torch_version": str(torch.__version__),
           "cuda_version": str(torch.version.cuda or ""), "h5py_version": h5py.version.version}
    describe = getattr(model, "provenance", None)  # an adapter names the model it wraps (class, config, versions)
    if callable(describe):
        out.update(describe())
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["cudnn_version"] = str(torch.backends.cudnn.version())
    try:
        import triton

        out["triton_version"] = triton.__version__
    except ImportError:
        pass
    try:  # toolkit git commit when running from a checkout
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            out["toolkit_git_commit"] = commit.stdout.strip()
            # tracked files edited since that commit: the commit alone would not say what ran
            changed = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                     capture_output=True, text=True, timeout=5)
            if changed.returncode == 0:
                out["toolkit_git_modified"] = int(bool(changed.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def check_free_space(path: str, needed: int) -> None:
    """Refuse up front when the file system cannot hold the planned capture (one line, no traceback)."""
    import shutil

    from toolkit.capture.selection import human_bytes

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ToolkitError(f"directory does not exist for {path}")
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ToolkitError(f"this capture needs about {human_bytes(needed)} but {folder} has {human_bytes(free)} "
                           "free; select less (--layers/--heads/--steps/--chunks/--queries) or write elsewhere")


@contextmanager
def capture(
    model: torch.nn.Module,
    select: Selection | None = None,
    out: str | os.PathLike = "run.h5",
    *,
    layout: RunLayout,
    provenance: dict | None = None,
    resume: bool = False,
    progress: bool = True,
    max_inflight_bytes: int | None = None,
) -> Iterator[Recorder]:
    """Record attention of ``model`` (anything holding ``AttentionSeam``s) into ``out`` while the body runs.

    ``layout`` says what the run looks like (``RunLayout.self_forcing(cfg, grid, timesteps)`` or
    ``RunLayout.bidirectional``); the selection is checked against it before anything is written. ``out`` must
    not exist unless ``resume`` (then it must be an interrupted capture of the same run: its finished records are
    kept, missing ones written). The file is marked ``complete`` only if every selected record was written."""
    plan = resolve(select or Selection(), layout)
    if "pooled" in plan.store and layout.sink_size and layout.rolling:
        raise ToolkitError("pooled views are recorded over one run of key frames; with an attention sink store "
                           "q,k,v,lse and pool from the capture (Capture.pooled recomputes them exactly)")
    found = seams(model)
    if len(found) != layout.num_layers:
        raise ToolkitError(f"model has {len(found)} attention seams, the capture layout says {layout.num_layers}")
    path = os.fspath(out)
    provenance = {**runtime_provenance(model), **(provenance or {})}
    with CaptureLock(path):  # one writer per file, whatever HDF5's own locking does (often off on NFS/Lustre)
        yield from _capture_locked(model, plan, found, path, provenance, resume=resume, progress=progress,
                                   max_inflight_bytes=max_inflight_bytes)


def _capture_locked(model: torch.nn.Module, plan: Plan, found: list, path: str, provenance: dict, *, resume: bool,
                    progress: bool, max_inflight_bytes: int | None) -> Iterator[Recorder]:
    model_dtype = next((p.dtype for p in model.parameters()), None)
    if resume and os.path.exists(path):
        store, done, done_kv = CaptureStore.reopen(path, plan, provenance, model_dtype)
    else:
        if os.path.exists(path):
            raise ToolkitError(f"{path} exists; pass --resume to continue it or choose a new --out")
        check_free_space(path, sum(plan.estimate_bytes(model_dtype).values()))
        store, done, done_kv = CaptureStore.create(path, plan, model_dtype, provenance), set(), set()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan.records), initial=len(done & set(plan.records)), desc="capture", unit="rec")
    if max_inflight_bytes is None:
        on_gpu = any(p.is_cuda for p in model.parameters())
        max_inflight_bytes = (2 << 30) if on_gpu else (256 << 20)
    writer = AsyncWriter(store, max_inflight_bytes=max_inflight_bytes, progress=bar)
    recorder = Recorder(plan, store, writer, done, done_kv)
    hooked = [s for s in found if s.layer in set(plan.layers)]
    # Keep the hook out of compiled graphs (it does host-side bookkeeping and queues writes).
    hook = torch.compiler.disable(recorder.hook) if hasattr(torch, "compiler") else recorder.hook
    for s in hooked:
        s.hooks.append(hook)
    ok = False
    try:
        yield recorder
        ok = True
    finally:
        for s in hooked:
            s.hooks.remove(hook)
        flush_error = None
        try:
            recorder.flush()  # records finished before an early stop are kept
        except Exception as err:  # noqa: BLE001 - reported below unless the body's own exception is
            flush_error = err
        try:
            writer.close(complete=ok and flush_error is None and not recorder.pending)
        except CaptureWriteError:
            if ok:
                raise
            # the body already failed; its exception is the one to report (the writer error is usually its cause)
        if ok and flush_error is not None:
            raise flush_error
        # the model ran (a seam or, for an adapter, the wrapped model was called) yet nothing was recorded
        if ok and recorder.pending and not recorder.seen and (recorder.calls or getattr(model, "ran", False)):
            raise _nothing_matched(model, hooked, path)


class EmptyCaptureError(ToolkitError):
    """The capture's body ran the model but no selected attention call reached the hooked seams."""


def _nothing_matched(model: torch.nn.Module, hooked: list, path: str) -> EmptyCaptureError:
    """The error of a capture that recorded nothing, naming what was watched; the file (schema only, complete = 0)
    is kept and says so in ``nothing_matched``, so ``toolkit inspect`` does not call it interrupted."""
    import h5py

    looked_at = getattr(model, "looked_at", None)
    where = looked_at() if callable(looked_at) else (
        f"the attention seams of layers {', '.join(str(s.layer) for s in hooked)}")
    message = f"capture recorded nothing: no selected attention call reached {where}"
    with h5py.File(path, "a") as f:
        f.attrs["nothing_matched"] = message
    return EmptyCaptureError(f"{message} ({path} is kept, marked empty)")
