"""Monarch approximation error sweeps: how well can (tiled, aligned or misaligned) Monarch maps represent a head?

For one attention record (q, k, v, lse of one layer / step / chunk) and a list of Monarch layouts
(``toolkit.grid.MonarchLayout``) this measures, per head and layout:

* **projection** — the Frobenius-optimal Monarch map (``docs/monarch.md`` "Exact projection"): the best any Monarch
  map of that layout can do on the map, a lower bound for the variational one;
* **variational** — MonarchAttention after T = 1 … N iterations (T = 1 is what the kernels run; ``docs/monarch.md``
  "MonarchAttention (variational)"), plus ``variational_kl``: the mean over queries of KL(M_row ‖ P_row) =
  lse − (⟨M_row, S_row⟩ + H(M_row)), i.e. how far the variational objective is from its dense optimum;
* **topk** — oracle top-k keeping the same number of parameters per query row, i.e. at sparsity = the layout's
  effective sparsity 1 − (b1+b2)/(b1·b2) (``toolkit.analysis.topk``, both its variants).

Errors against the exact map P (rows over the attended keys): map MSE per entry Σ(P − M)²/(N_q·N_k), relative
Frobenius ‖P − M‖_F/‖P‖_F and output relative L2 ‖(P − M)V‖_F/‖PV‖_F.

Monarch tiles need every query of a tile, so records must hold whole frames of queries (capture without query
stride). Entry points: :func:`analyze_record` (one record's `RecordTensors`, no model) and :func:`analyze`
(records of a capture, used by ``toolkit analyze monarch``), both with :class:`MonarchOptions`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xarray as xr

from toolkit.analysis import topk
from toolkit.analysis.records import RecordSelection, RecordTensors
from toolkit.attention import exact
from toolkit.attention.monarch import (
    MonarchErrors,
    allowed_tiles,
    check_r_step,
    exact_projection,
    map_errors,
    variational,
)
from toolkit.errors import ToolkitError
from toolkit.grid import ALIGNED_BASES, MonarchLayout, TokenGrid, as_grid

# The paper's tilings of the fh,w base (docs/monarch.md "Configurations") and the other aligned bases at 3 tied
# frames.
FH_W_TILINGS = ((1, 1, 1), (1, 2, 1), (1, 2, 4), (3, 1, 1), (3, 2, 1), (3, 6, 2))
CHUNK_FRAMES = 3

METRICS = {  # short name -> (long_name, units)
    "map_mse": ("map MSE per entry", "1"),
    "rel_fro": ("relative Frobenius error of the map", "1"),
    "out_rel_l2": ("relative L2 error of the attention output", "1"),
}


# ---- which layouts --------------------------------------------------------------------------------------------
def _misaligned_block(tile_tokens: int, width: int) -> tuple[int, int] | None:
    """Contiguous (b1, b2) with b1·b2 = tile_tokens, b2 ≈ √tile_tokens, b2 neither a multiple nor a divisor of
    the row width (so tiles cut rows between i and l: MonarchAttention's misaligned layout)."""
    divisors = [b for b in range(2, tile_tokens) if tile_tokens % b == 0 and b % width and width % b]
    if not divisors:
        return None
    b2 = min(divisors, key=lambda b: abs(math.log(b) - 0.5 * math.log(tile_tokens)))
    return tile_tokens // b2, b2


def default_layouts(
    grid: TokenGrid | Sequence[int], query_frames: tuple[int, int] | None = None,
    key_frames: tuple[int, int] | None = None, block_causal_frames: int | None = None,
) -> list[MonarchLayout]:
    """The paper's fh,w tilings; every aligned base framewise, per chunk and untiled; and misaligned contiguous
    controls (one chunk or one frame per tile). Only layouts valid for the given frame ranges, b1, b2 ≥ 2."""
    grid = as_grid(grid)
    chunk = CHUNK_FRAMES if query_frames is None else query_frames[1] - query_frames[0]
    candidates = [("fh,w", tiling) for tiling in FH_W_TILINGS]
    for base in ALIGNED_BASES:
        candidates += [(base, (f_t, 1, 1)) for f_t in sorted({1, CHUNK_FRAMES, chunk, grid.frames})]
    for frames in sorted({chunk, CHUNK_FRAMES, 1}, reverse=True):
        block = _misaligned_block(frames * grid.tokens_per_frame, grid.width)
        if block:
            candidates.append(("contiguous", block))
    layouts, seen = [], set()
    for kind, params in candidates:
        try:
            lay = MonarchLayout.contiguous(grid, *params) if kind == "contiguous" else MonarchLayout.aligned(
                grid, kind, params)
            _check_layout(lay, query_frames, key_frames, block_causal_frames)
        except ToolkitError:
            continue
        if lay.name not in seen and min(lay.b1, lay.b2) > 1:
            seen.add(lay.name)
            layouts.append(lay)
    return layouts


def _check_layout(layout: MonarchLayout, query_frames, key_frames, block_causal_frames) -> None:
    qf = (0, layout.grid.frames) if query_frames is None else query_frames
    kf = (0, layout.grid.frames) if key_frames is None else key_frames
    allowed_tiles(layout, qf, kf, block_causal_frames)


def parse_layout(spec: str, grid: TokenGrid | Sequence[int]) -> MonarchLayout:
    """``fh,w:1,2,1`` (aligned base : tiling) or ``contiguous:18x20`` (b1 x b2)."""
    name, _, params = spec.partition(":")
    try:
        if name == "contiguous":
            b1, b2 = (int(x) for x in params.split("x"))
            return MonarchLayout.contiguous(grid, b1, b2)
        tiling = tuple(int(x) for x in params.split(",")) if params else (1, 1, 1)
        if len(tiling) != 3:
            raise ValueError
    except ValueError:
        raise ToolkitError(f"bad Monarch layout {spec!r}: use e.g. fh,w:1,2,1 or contiguous:18x20") from None
    return MonarchLayout.aligned(grid, name, tiling)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tiling_sweep_layouts(
    grid: TokenGrid | Sequence[int], query_frames: tuple[int, int] | None = None,
    key_frames: tuple[int, int] | None = None,
) -> list[MonarchLayout]:
    """Every ``fh,w`` tiling (f_tied dividing the query frames or 3, any h_reduce | height, w_reduce | width) with
    b1, b2 ≥ 2, by effective sparsity: the points of a Fig. 1-style error-vs-sparsity curve (at 480p these
    include all the sweep points of ``docs/monarch.md`` "Configurations", from (2,2) at 0 % to (90,52) at 97 %)."""
    grid = as_grid(grid)
    chunk = CHUNK_FRAMES if query_frames is None else query_frames[1] - query_frames[0]
    f_ts = sorted(set(_divisors(chunk)) | ({CHUNK_FRAMES} if grid.frames % CHUNK_FRAMES == 0 else set()))
    layouts = []
    for f_t in f_ts:
        for c_h in _divisors(grid.height):
            for c_w in _divisors(grid.width):
                if f_t * grid.height // c_h < 2 or grid.width // c_w < 2 or grid.frames % f_t:
                    continue
                lay = MonarchLayout.aligned(grid, "fh,w", (f_t, c_h, c_w))
                try:
                    _check_layout(lay, query_frames, key_frames, None)
                except ToolkitError:
                    continue
                layouts.append(lay)
    return sorted(layouts, key=lambda lay: (lay.effective_sparsity, lay.name))


def resolve_layouts(
    specs: Sequence[str], grid: TokenGrid | Sequence[int], query_frames: tuple[int, int] | None = None,
    key_frames: tuple[int, int] | None = None,
) -> list[MonarchLayout]:
    """Layout specs -> layouts: ``default`` (:func:`default_layouts`), ``fh,w:all`` (:func:`tiling_sweep_layouts`),
    or single layouts as in :func:`parse_layout`; duplicates dropped, order kept."""
    out: dict[str, MonarchLayout] = {}
    for spec in specs:
        if spec == "default":
            found = default_layouts(grid, query_frames, key_frames)
        elif spec == "fh,w:all":
            found = tiling_sweep_layouts(grid, query_frames, key_frames)
        else:
            found = [parse_layout(spec, grid)]
        out.update((lay.name, lay) for lay in found if lay.name not in out)
    return list(out.values())


# ---- the sweep ------------------------------------------------------------------------------------------------
def _layout_coords(layouts: Sequence[MonarchLayout]) -> dict:
    return dict(
        config=[lay.name for lay in layouts],
        base=("config", [lay.base or "contiguous" for lay in layouts]),
        tiling=("config", [",".join(map(str, lay.tiling)) if lay.tiling else "" for lay in layouts]),
        b1=("config", [lay.b1 for lay in layouts]),
        b2=("config", [lay.b2 for lay in layouts]),
        aligned=("config", [lay.base is not None for lay in layouts]),
        effective_sparsity=("config", [lay.effective_sparsity for lay in layouts]),
        flop_ratio=("config", [lay.flop_ratio(1) for lay in layouts]),
    )


def _rank1_method(method: str, device: torch.device) -> str:
    """``auto`` -> power: batched eigh of ~10^5 tiny matrices is slow on GPUs and CPUs alike."""
    return "power" if method == "auto" else method


@dataclass(frozen=True)
class MonarchOptions:
    """Options of the Monarch sweep (defaults = ``toolkit analyze monarch``'s).

    ``layouts``: layout specs (:func:`resolve_layouts`: ``fh,w:1,2,1``, ``contiguous:18x20``, the presets
    ``default`` and ``fh,w:all``) and/or `MonarchLayout` objects; None = :func:`default_layouts` of the record.
    ``iters``: variational iterations T = 1..iters (0: skip); ``projection`` / ``topk_baseline``: compute the
    exact projection / the oracle top-k baseline; ``block_causal_frames``: block-causal mask of that many frames
    (needs the record's lse); ``rank1``: rank-1 solver of the projection (``auto``, ``eigh``, ``power``);
    ``compare``: how variational maps are compared with the exact map (``auto``, ``reference``, ``triton``);
    ``r_step``: the variational R-step for T > 1 — ``exact`` (the exact maximiser, objective monotone) or
    ``monarchrt`` (the MonarchRT authors' update, logits scaled by min(1/(c_R + 1e-6), 1e4), to reproduce their
    T = 10/20 numbers; ``toolkit.attention.monarch``). Identical at T = 1; recorded as the result's ``r_step``
    attribute."""

    layouts: tuple[str | MonarchLayout, ...] | None = None
    iters: int = 3
    projection: bool = True
    topk_baseline: bool = True
    block_causal_frames: int | None = None
    rank1: str = "auto"
    compare: str = "auto"
    r_step: str = "exact"

    def __post_init__(self) -> None:
        if self.layouts is not None:
            object.__setattr__(self, "layouts", tuple(self.layouts))
        if self.iters is not None and self.iters < 0:  # None: the command line's "default", resolved later
            raise ToolkitError(f"iters {self.iters}: the variational iterations run T = 1..iters (0 skips them)")
        check_r_step(self.r_step)


def _resolve(specs: Sequence[str | MonarchLayout], grid, query_frames, key_frames) -> list[MonarchLayout]:
    """Specs (as :func:`resolve_layouts`) and `MonarchLayout` objects -> layouts, duplicates dropped, order kept."""
    out: dict[str, MonarchLayout] = {}
    for spec in specs:
        found = [spec] if isinstance(spec, MonarchLayout) else resolve_layouts([spec], grid, query_frames, key_frames)
        out.update((lay.name, lay) for lay in found if lay.name not in out)
    return list(out.values())


def analyze_record(tensors: RecordTensors, options: MonarchOptions | None = None, *,
                   device: torch.device | str | None = None) -> xr.Dataset:
    """Monarch error sweep of one record: ``tensors.q`` ``h i d``, ``k``/``v`` ``h j d``, ``lse`` ``h i`` (over
    the attended keys; computed when None), clip raster ``query_tokens``/``key_tokens`` (whole frames), ``grid``
    of the clip; ``device``: where it runs (None: q's device).

    Returns a Dataset with dims ``head, config`` (+ ``iters`` for the variational, ``variant`` for top-k);
    ``iters=0`` skips the variational fit. ``tensors.heads`` labels the leading dim (default 0..h-1).
    ``options.compare``: how the variational maps are compared with the exact map — ``reference`` (PyTorch
    ``map_errors``, exact tiles in memory group by group), ``triton`` (the streaming kernel
    ``toolkit.kernels.monarch_compare``, which recomputes the dense LSE itself) or ``auto``: the kernel on CUDA
    for the layouts it supports (:func:`kernel_supports`), the reference otherwise."""
    o = options or MonarchOptions()
    query_tokens, key_tokens, grid = tensors.require_positions("monarch")
    q, k, v, lse, scale, heads = tensors.q, tensors.k, tensors.v, tensors.lse, tensors.scale, tensors.heads
    iters, projection, topk_baseline = o.iters, o.projection, o.topk_baseline
    block_causal_frames, rank1, compare = o.block_causal_frames, o.rank1, o.compare
    grid = as_grid(grid)
    qf, kf = grid.frame_range(query_tokens), grid.frame_range(key_tokens)
    device = torch.device(device) if device is not None else q.device
    layouts = (default_layouts(grid, qf, kf, block_causal_frames) if o.layouts is None
               else _resolve(o.layouts, grid, qf, kf))
    if not layouts:
        raise ToolkitError(f"no Monarch layout fits queries of frames {qf} and keys of frames {kf}")
    for lay in layouts:
        if tuple(lay.grid) != tuple(grid):
            raise ToolkitError(f"layout {lay.name} is for grid {tuple(lay.grid)}, not {tuple(grid)}")
        _check_layout(lay, qf, kf, block_causal_frames)
    n_heads = q.shape[0]
    heads = list(range(n_heads)) if heads is None else list(heads)
    method = _rank1_method(rank1, device)
    if compare not in ("auto", "reference", "triton"):
        raise ToolkitError(f"compare must be auto, reference or triton, not {compare!r}")
    nan = float("nan")
    shape_c, shape_t = (n_heads, len(layouts)), (n_heads, len(layouts), max(iters, 0))
    res = {f"projection_{m}": torch.full(shape_c, nan, dtype=torch.float64) for m in METRICS}
    res.update({f"variational_{m}": torch.full(shape_t, nan, dtype=torch.float64) for m in METRICS})
    res["variational_kl"] = torch.full(shape_t, nan, dtype=torch.float64)
    for h in range(n_heads):
        qh, kh = q[h].to(device), k[h].to(device)
        vh = None if v is None else v[h].to(device)
        lh = None if lse is None else lse[h].to(device)
        if lh is None:
            if block_causal_frames is not None:
                raise ToolkitError("block-causal sweeps need the record's lse (over the allowed keys)")
            lh = exact.logsumexp(qh, kh, scale)
        for c, lay in enumerate(layouts):
            common = dict(lse=lh, v=vh, block_causal_frames=block_causal_frames, scale=scale)
            if projection:
                err, _ = exact_projection(qh, kh, lay, query_frames=qf, key_frames=kf, method=method, **common)
                _store(res, "projection", err, (h, c))
            if iters > 0:
                use_kernel = compare == "triton" or (compare == "auto" and qh.is_cuda and kernel_supports(lay, qh))
                if use_kernel and not kernel_supports(lay, qh):
                    raise ToolkitError(f"the Triton comparison does not support layout {lay.name} with head dim "
                                       f"{qh.shape[-1]} {qh.dtype} on {qh.device}; use compare='reference'")
                trace = _variational_trace(qh, kh, vh, lay, qf, kf, iters, lse=lh, scale=scale,
                                           block_causal_frames=block_causal_frames, use_kernel=use_kernel,
                                           r_step=o.r_step)
                for t, (err, kl) in enumerate(trace):
                    _store(res, "variational", err, (h, c, t))
                    res["variational_kl"][h, c, t] = float(kl)
    ds = xr.Dataset(coords=dict(head=heads, **_layout_coords(layouts)))
    for name, val in res.items():
        dims = ("head", "config") if val.dim() == 2 else ("head", "config", "iters")
        ds[name] = (dims, val.numpy())
    if iters > 0:
        ds = ds.assign_coords(iters=list(range(1, iters + 1)))
    else:
        ds = ds.drop_vars([n for n in ds.data_vars if n.startswith("variational")])
    if not projection:
        ds = ds.drop_vars([n for n in ds.data_vars if n.startswith("projection")])
    if topk_baseline and block_causal_frames is None:  # top-k ranks all keys of a row: no block-causal mask
        ds = ds.merge(_topk_at_monarch_budget(q, k, v, lse, scale, layouts, heads, device))
    _label(ds)
    ds.attrs.update(
        grid=list(grid), query_start_frame=qf[0], query_end_frame=qf[1], key_start_frame=kf[0],
        key_end_frame=kf[1], scale=float(scale),
        block_causal_frames=-1 if block_causal_frames is None else int(block_causal_frames),
        n_queries=int(q.shape[-2]), n_keys=int(k.shape[-2]), rank1_method=method, r_step=o.r_step,
        description="Monarch approximation errors vs the exact attention map (toolkit.analysis.monarch)",
    )
    for name in ds.data_vars:
        if name.startswith("variational_"):
            ds[name].attrs["r_step"] = o.r_step
    return ds


def kernel_supports(layout: MonarchLayout, q: torch.Tensor) -> bool:
    """Whether the streaming Triton comparison handles this layout and these queries (``... i d``): the kernels'
    aligned ``fh,w`` base (tiles located by stride arithmetic), tile width b2 ≤ 128, a power-of-two head dim
    ≥ 16, and no float64 on the GPU (only the CPU interpreter takes it)."""
    d = q.shape[-1]
    return (layout.base == "fh,w" and layout.b2 <= 128 and d >= 16 and d & (d - 1) == 0
            and not (q.is_cuda and q.dtype == torch.float64))


def _kernel_map_errors(q, k, v, factors, *, block_causal_frames, scale) -> MonarchErrors:
    """``map_errors`` of one head (q ``i d``, k/v ``j d``) through ``toolkit.kernels.monarch_compare``: the same
    sums, streamed per query row in fp32 (nothing N×N in memory)."""
    from toolkit.kernels import monarch_compare

    lay = factors.layout
    seam = lambda t: t[None, :, None, :]  # noqa: E731 - i d -> b i h d (one batch, one head)
    lf, rf = factors.L[None, None], factors.R[None, None]  # b h a j i f k ; b h a f k j l
    rows = monarch_compare(seam(q), seam(k), seam(k if v is None else v), tuple(lay.grid), lay.tiling,
                           query_frames=factors.query_frames, key_frames=factors.key_frames,
                           block_causal_frames=block_causal_frames, scale=scale, factors=(lf, rf))
    e = rows.per_head()
    if v is None:  # the kernel needs values; without a stored v there is no output error
        return MonarchErrors(e.sq_error[0, 0], e.p_sq[0, 0], e.n_entries)
    return MonarchErrors(e.sq_error[0, 0], e.p_sq[0, 0], e.n_entries, e.out_sq_error[0, 0], e.out_sq[0, 0])


def _variational_trace(q, k, v, layout, query_frames, key_frames, iters, *, lse, scale, block_causal_frames,
                       use_kernel=False, r_step="exact"):
    """(errors, mean KL(M_row ‖ P_row)) after each of ``iters`` iterations (one run: iteration t of a T-run is the
    t-run). ``use_kernel``: errors from the streaming Triton comparison instead of ``map_errors``.

    ``r_step="monarchrt"``: iterations t ≥ 2 of one run are the authors' t-runs too, but their T = 1 is the exact
    one-step op while a T > 1 run scales its first R-step by 1/(1 + 1e-6), so T = 1 comes from its own run."""
    common = dict(block_causal_frames=block_causal_frames, scale=scale)
    trace = []

    def on_iteration(fac):
        kl = (lse.double().sum() - fac.objective(q, k, scale).double()) / q.shape[-2]
        if use_kernel:
            err = _kernel_map_errors(q, k, v, fac, **common)
        else:
            err = map_errors(q, k, fac, lse=lse, v=v, **common)
        trace.append((err, kl))

    run = dict(query_frames=query_frames, key_frames=key_frames, block_causal_frames=block_causal_frames,
               scale=scale, on_iteration=on_iteration)
    v_or_k = v if v is not None else k[..., :1]
    if r_step == "monarchrt" and iters > 1:
        variational(q, k, v_or_k, layout, iters=1, **run)  # the authors' T = 1: the exact one-step op
        variational(q, k, v_or_k, layout, iters=iters, r_step=r_step, **run)
        del trace[1]  # iteration 1 of the T > 1 run
    else:
        variational(q, k, v_or_k, layout, iters=iters, r_step=r_step, **run)
    return trace


def _store(res: dict, prefix: str, err, index: tuple) -> None:
    res[f"{prefix}_map_mse"][index] = float(err.map_mse)
    res[f"{prefix}_rel_fro"][index] = float(err.rel_frobenius)
    if err.out_rel_l2 is not None:
        res[f"{prefix}_out_rel_l2"][index] = float(err.out_rel_l2)


def _topk_at_monarch_budget(q, k, v, lse, scale, layouts, heads, device) -> xr.Dataset:
    """Oracle top-k at each layout's parameter count (sparsity = effective sparsity); NaN where that is < 0."""
    levels = sorted({lay.effective_sparsity for lay in layouts if lay.effective_sparsity >= 0})
    nan = torch.full((len(heads), len(layouts), len(topk.VARIANTS)), float("nan"), dtype=torch.float64)
    out = {"topk_map_mse": nan.clone(), "topk_rel_fro": nan.clone(), "topk_out_rel_l2": nan.clone()}
    if levels:
        dev = lambda t: None if t is None else t.to(device)  # noqa: E731
        res = topk.topk_tensors(dev(q), dev(k), dev(v), scale, dev(lse), masses=(0.95,), sparsities=tuple(levels))
        for c, lay in enumerate(layouts):
            if lay.effective_sparsity >= 0:
                lvl = levels.index(lay.effective_sparsity)
                out["topk_map_mse"][:, c] = res["map_mse"][:, lvl]
                out["topk_rel_fro"][:, c] = res["map_rel_fro"][:, lvl]
                if "output_rel_l2" in res:
                    out["topk_out_rel_l2"][:, c] = res["output_rel_l2"][:, lvl]
    ds = xr.Dataset(coords=dict(head=heads, config=[lay.name for lay in layouts], variant=list(topk.VARIANTS)))
    for name, val in out.items():
        ds[name] = (("head", "config", "variant"), val.numpy())
    return ds


def _label(ds: xr.Dataset) -> None:
    kinds = {"projection": "exact Monarch projection", "variational": "variational MonarchAttention",
             "topk": "oracle top-k at the Monarch parameter count"}
    for name in ds.data_vars:
        kind, _, metric = name.partition("_")
        if metric in METRICS:
            ds[name].attrs.update(long_name=f"{kinds[kind]}: {METRICS[metric][0]}", units=METRICS[metric][1])
    if "variational_kl" in ds:
        ds["variational_kl"].attrs.update(long_name="variational MonarchAttention: mean KL(M_row || P_row)",
                                          units="nat")
    ds["effective_sparsity"].attrs.update(long_name="1 - (b1+b2)/(b1*b2)", units="1")
    ds["flop_ratio"].attrs.update(long_name="Monarch / dense attention FLOPs at T = 1", units="1")
    if "iters" in ds.coords:
        ds["iters"].attrs.update(long_name="MonarchAttention iterations T")


# ---- capture entry point (toolkit analyze monarch) -------------------------------------------------------------
def analyze(
    cap: Any,
    records: RecordSelection | None = None,
    options: MonarchOptions | None = None,
    *,
    device: Any = None,
    progress: bool = True,
    progress_position: int | None = None,
) -> xr.Dataset:
    """Monarch sweep over the selected records of an open capture, stacked along ``record`` (coordinates
    ``step, chunk, layer, timestep, is_clean`` and the frame ranges). Needs q, k, lse (v for output errors).

    Layout presets (``options.layouts``; None = ``default``) keep the layouts that fit every selected record, so
    that records stack along one ``config`` dim."""
    from dataclasses import replace

    from toolkit.analysis import analyze_records, select_records

    options = options or MonarchOptions()
    grid = TokenGrid(*cap.grid)
    specs = options.layouts or ("default",)
    keys = select_records(cap, records)
    recs = [cap.record(*key) for key in keys]
    layouts = _resolve(specs, grid, recs[0].query_frames, recs[0].key_frames)
    for rec in recs[1:]:
        fit = {lay.name for lay in _resolve(specs, grid, rec.query_frames, rec.key_frames)}
        layouts = [lay for lay in layouts if lay.name in fit]
    per_record = replace(options, layouts=tuple(layouts))
    with_v = "v" in cap.stored

    def one(rec, heads, dev):
        t = RecordTensors.read(rec, heads, dev, v=with_v)
        return analyze_record(t, per_record, device=dev)

    return analyze_records(cap, records, one, needs=("q", "k", "lse"), name="monarch", device=device,
                           progress=progress, progress_position=progress_position)
