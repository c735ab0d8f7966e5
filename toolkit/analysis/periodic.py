"""Periodic spatiotemporal structure of attention: positional kernel, semantic spikes, spectra, head types.

MonarchRT's picture (``docs/metrics.md`` "Periodic structure"): a video attention map is ``A ≈ D + S`` with ``D``
a positional kernel that depends only on the key − query offset ``(Δt, Δh, Δw)`` on the (frame, row, col) token
grid, close to separable ``D = d_f ⊗ d_h ⊗ d_w``, and ``S`` sparse semantic spikes; the rest is dense mixing.
Everything below is exact (tiles from `toolkit.attention.exact`), streamed over query blocks, per head:

* **Offset profile** ``profile[Δt, Δh, Δw]``: mean attention weight over all (query, key) pairs with that offset
  (sum of weights / number of such pairs; NaN where no pair has it), plus ``pair_count``.
* **Frame × frame mass** ``frame_mass[from_frame, to_frame]``: mean over the queries of a frame of their mass on
  each key frame (rows sum to 1; NaN for frames without stored queries; equals ``Capture.pooled``'s
  ``frame_mass``).
* **Separable fit** of the profile, weighted by pair counts (so it fits the map entries, not the sparse offsets
  at the grid's edges): rank-1 alternating least squares for ``d_f(Δt) d_h(Δh) d_w(Δw)`` (``d_h``, ``d_w`` scaled
  to peak 1), refitted (``robust_refits``, default 1) on the map with entries above kernel + spike threshold
  clipped, so that spikes do not bend the kernel. Reported: ``profile_r2`` (weighted R² on the profile); on
  the map, with ``D_ij = d(offset_ij)``: ``explained_mass = Σ min(A, D) / Σ A`` (the share of attention
  mass the positional model accounts for) and ``map_r2 = 1 − ‖A − D‖²_F / ‖A‖²_F``.
* **Spikes**: entries with residual ``A − D > spike_factor / n_keys`` (default: ten times the uniform weight);
  per query their count and attention mass, and the ``n_spikes`` largest residuals with their key tokens.
* **Spectra**: mean over queries of the power spectrum ``|rfft(A_i,:)|²`` along the raster key axis. A query's
  alignment (rolling the row so the query sits at 0) only changes phases, so the power needs no shift. Frame
  period h·w tokens ↔ frequency bin ``n_keys / (h·w)``, row period w ↔ ``n_keys / w``;
  ``frame_periodicity`` / ``row_periodicity`` = share of non-DC power at that frequency and its harmonics,
  divided by the share a flat (white) spectrum would put there (1 = no periodicity, ≫ 1 = periodic).
* **Head types** (thresholds are arguments, defaults stated here): per query the ``spatial_mass`` (keys in the
  query's own frame) and ``temporal_mass`` (keys at the query's own (row, col) in the other frames).
  A head is ``temporal`` if its mean temporal mass ≥ 0.2, else ``spatial`` if its mean spatial mass ≥ 0.5,
  else ``global`` (dense mixing; see ``entropy``, the per-query entropy divided by log n_keys).

Keys must be whole frames in raster order (as every seam call attends); queries any subset of the key frames.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from toolkit.analysis.records import RecordSelection, RecordTensors
from toolkit.attention import exact
from toolkit.errors import ToolkitError
from toolkit.grid import TokenGrid

if TYPE_CHECKING:
    import xarray as xr

# Probability entries per query block (all heads together).
BLOCK_ENTRIES = 2**25
SPIKE_FACTOR = 10.0
N_SPIKES = 8
SPATIAL_THRESHOLD = 0.5
TEMPORAL_THRESHOLD = 0.2
HEAD_TYPES = ("spatial", "temporal", "global")


def _offset_geometry(grid: tuple[int, int, int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Shape (2F−1, 2H−1, 2W−1) of the offset cube and the flat strides of (Δt, Δh, Δw)."""
    f, h, w = grid
    shape = (2 * f - 1, 2 * h - 1, 2 * w - 1)
    return shape, (shape[1] * shape[2], shape[2], 1)


def _linear(coords: tuple[torch.Tensor, torch.Tensor, torch.Tensor], strides: tuple[int, int, int]) -> torch.Tensor:
    return coords[0] * strides[0] + coords[1] * strides[1] + coords[2] * strides[2]


def fit_separable(
    profile: torch.Tensor, counts: torch.Tensor, iters: int = 100, tol: float = 1e-9
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-1 fit ``profile ≈ d_f ⊗ d_h ⊗ d_w`` minimising ``Σ counts · (profile − D)²`` (per head).

    profile ``h T H W`` (NaN where counts = 0), counts ``T H W``. Alternating least squares in float64, started
    from the count-weighted marginals (non-negative data stays non-negative), at most ``iters`` sweeps, stopping
    once the shapes of ``d_h`` and ``d_w`` move less than ``tol``. Returns ``h T``, ``h H``, ``h W``
    with ``d_h`` and ``d_w`` scaled to a maximum of 1.
    """
    w = counts.to(torch.float64)
    m = torch.nan_to_num(profile.to(torch.float64), nan=0.0)
    wm = w * m  # h T H W

    def marginal(dims: tuple[int, ...]) -> torch.Tensor:
        return wm.sum(dims) / w.sum([d - 1 for d in dims]).clamp(min=1e-300)

    d_h, d_w = marginal((1, 3)), marginal((1, 2))
    d_f = torch.zeros(m.shape[:2], dtype=torch.float64, device=m.device)
    tiny = 1e-300

    def shape_of(d: torch.Tensor) -> torch.Tensor:
        return d / d.abs().amax(-1, keepdim=True).clamp(min=tiny)

    for _ in range(iters):
        before = (shape_of(d_h), shape_of(d_w))
        d_f = torch.einsum("xabc,xb,xc->xa", wm, d_h, d_w) / torch.einsum(
            "abc,xb,xc->xa", w, d_h**2, d_w**2).clamp(min=tiny)
        d_h = torch.einsum("xabc,xa,xc->xb", wm, d_f, d_w) / torch.einsum(
            "abc,xa,xc->xb", w, d_f**2, d_w**2).clamp(min=tiny)
        d_w = torch.einsum("xabc,xa,xb->xc", wm, d_f, d_h) / torch.einsum(
            "abc,xa,xb->xc", w, d_f**2, d_h**2).clamp(min=tiny)
        change = max(float((shape_of(d_h) - before[0]).abs().max()), float((shape_of(d_w) - before[1]).abs().max()))
        if change < tol:
            break
    s_h = d_h.abs().amax(-1, keepdim=True).clamp(min=tiny)
    s_w = d_w.abs().amax(-1, keepdim=True).clamp(min=tiny)
    factors = [d_f * s_h * s_w, d_h / s_h, d_w / s_w]
    # Offsets no (query, key) pair has (e.g. odd column offsets when only even columns are queried) are
    # not determined by the data: NaN.
    for axis, dims in enumerate(((1, 2), (0, 2), (0, 1))):
        factors[axis][:, w.sum(dims) == 0] = float("nan")
    return tuple(factors)


def _harmonic_share(power: torch.Tensor, n_keys: int, period: int) -> tuple[torch.Tensor, float]:
    """Share of non-DC power at multiples of ``n_keys / period`` (rounded bins) and the flat-spectrum share."""
    n_bins = power.shape[-1]
    base = n_keys / period
    bins = sorted({round(m * base) for m in range(1, int((n_bins - 1) / base) + 1)} - {0})
    bins = [b for b in bins if b < n_bins]
    non_dc = power[..., 1:].sum(-1)
    share = power[..., bins].sum(-1) / non_dc if bins else torch.zeros_like(non_dc)
    return share, len(bins) / max(1, n_bins - 1)


def periodic_tensors(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    lse: torch.Tensor | None,
    query_tokens: torch.Tensor,
    key_tokens: torch.Tensor,
    grid: tuple[int, int, int],
    *,
    spike_factor: float = SPIKE_FACTOR,
    n_spikes: int = N_SPIKES,
    spatial_threshold: float = SPATIAL_THRESHOLD,
    temporal_threshold: float = TEMPORAL_THRESHOLD,
    query_chunk: int | None = None,
    fit_iters: int = 100,
    robust_refits: int = 1,
) -> dict[str, torch.Tensor | float]:
    """All periodic statistics of one record as CPU tensors (see the module docstring).

    q ``h i d`` for clip tokens ``query_tokens`` (``i``), k ``h j d`` for ``key_tokens`` (``j``, whole frames in
    raster order), lse ``h i`` (computed when None). Passes over the map: statistics; ``robust_refits`` refits of
    the kernel on the map with spikes clipped; the residual against the final kernel.
    """
    tg = TokenGrid(*grid)
    frames, height, width = grid
    tpf = tg.tokens_per_frame
    n_heads, n_q, n_k = q.shape[0], q.shape[-2], k.shape[-2]
    dev, dt = q.device, exact.compute_dtype(q, k)
    key_tokens = torch.as_tensor(key_tokens, dtype=torch.long).cpu()
    query_tokens = torch.as_tensor(query_tokens, dtype=torch.long).cpu()
    if key_tokens.numel() != n_k or query_tokens.numel() != n_q:
        raise ToolkitError(f"token lists ({query_tokens.numel()} queries, {key_tokens.numel()} keys) do not match "
                           f"q/k ({n_q}, {n_k})")
    kf0 = int(key_tokens[0]) // tpf if n_k else 0
    n_kf = n_k // tpf
    if n_k % tpf or not torch.equal(key_tokens, torch.arange(kf0 * tpf, (kf0 + n_kf) * tpf)):
        raise ToolkitError("periodic analysis needs keys that are whole frames in raster order")
    qf, qh, qw = (c.to(dev) for c in tg.coords(query_tokens))
    if n_q and (int(qf.min()) < kf0 or int(qf.max()) >= kf0 + n_kf):
        raise ToolkitError("periodic analysis needs queries inside the attended key frames")
    if not spike_factor > 0 or n_spikes < 0:
        raise ToolkitError(f"spike_factor must be > 0 and n_spikes >= 0 (got {spike_factor}, {n_spikes})")
    if lse is None:
        lse = exact.logsumexp(q, k, scale)
    if query_chunk is None:
        query_chunk = exact.default_query_chunk(n_k, n_heads, BLOCK_ENTRIES)

    shape, strides = _offset_geometry(grid)
    n_bins = math.prod(shape)
    centre = _linear((frames - 1, height - 1, width - 1), strides)
    key_lin = _linear(tg.coords(key_tokens), strides).to(dev)
    query_lin = _linear((qf, qh, qw), strides)
    own_pixel = (qh * width + qw)  # i: index of the query's (row, col) within a frame

    def offset_index(rows: slice) -> torch.Tensor:  # r j flat offset bin of every pair
        return key_lin[None, :] - query_lin[rows, None] + centre

    f64 = torch.float64
    off_sum = torch.zeros(n_heads, n_bins, dtype=dt, device=dev)
    pair_count = torch.zeros(n_bins, dtype=torch.int64, device=dev)
    frame_mass = torch.zeros(n_heads, frames, frames, dtype=f64, device=dev)
    power = torch.zeros(n_heads, n_k // 2 + 1, dtype=f64, device=dev)
    spatial, temporal, entropy = (torch.empty(n_heads, n_q, dtype=f64) for _ in range(3))
    for rows, p in exact.iter_query_blocks(q, k, scale, lse, query_chunk=query_chunk):
        r = rows.stop - rows.start
        idx = offset_index(rows)
        off_sum.scatter_add_(1, idx.reshape(1, -1).expand(n_heads, -1), p.reshape(n_heads, -1))
        pair_count += torch.bincount(idx.reshape(-1), minlength=n_bins)
        per_frame = p.reshape(n_heads, r, n_kf, tpf)
        s_f = per_frame.sum(-1, dtype=f64)  # h r kf
        frame_mass[:, :, kf0:kf0 + n_kf].index_add_(1, qf[rows], s_f)
        own_frame = (qf[rows] - kf0).view(1, r, 1).expand(n_heads, -1, -1)
        spatial[:, rows] = s_f.gather(2, own_frame).squeeze(-1).cpu()
        same_pixel = per_frame.gather(3, own_pixel[rows].view(1, r, 1, 1).expand(n_heads, -1, n_kf, -1))
        temporal[:, rows] = (same_pixel.sum((2, 3), dtype=f64) - same_pixel.squeeze(-1).gather(
            2, own_frame).squeeze(-1)).cpu()
        entropy[:, rows] = (-torch.special.xlogy(p, p).sum(-1, dtype=f64) / math.log(n_k)).cpu()
        power += torch.fft.rfft(p, dim=-1).abs().square().sum(1, dtype=f64)
        del p

    counts = pair_count.cpu()
    weights = counts.view(shape).to(f64)

    def mean_profile(sums: torch.Tensor) -> torch.Tensor:  # h n_bins -> h T H W, NaN where no pair
        return (sums.to(f64).cpu() / counts.clamp(min=1)).masked_fill(counts == 0, float("nan")).view(
            n_heads, *shape)

    def fit(target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # on q's device: at 480p the offset cube is 41 × 59 × 103 per head
        d_f, d_h, d_w = fit_separable(target.to(dev), counts.view(shape).to(dev), iters=fit_iters)
        kernel = torch.nan_to_num(torch.einsum("xa,xb,xc->xabc", d_f, d_h, d_w))  # 0 where undetermined
        return d_f.cpu(), d_h.cpu(), d_w.cpu(), kernel.reshape(n_heads, n_bins).to(dt)

    profile = mean_profile(off_sum)
    d_f, d_h, d_w, kernel_flat = fit(profile)
    threshold = spike_factor / n_k
    for _ in range(robust_refits):
        # Refit on the map with spikes clipped to kernel + threshold, so that a few strong semantic matches
        # at rarely occurring offsets do not bend the positional kernel.
        clipped = torch.zeros_like(off_sum)
        for rows, p in exact.iter_query_blocks(q, k, scale, lse, query_chunk=query_chunk):
            idx = offset_index(rows)
            p = torch.minimum(p, kernel_flat[:, idx] + threshold)
            clipped.scatter_add_(1, idx.reshape(1, -1).expand(n_heads, -1), p.reshape(n_heads, -1))
        d_f, d_h, d_w, kernel_flat = fit(mean_profile(clipped))
    observed = torch.nan_to_num(profile, nan=0.0)
    kernel = kernel_flat.to(f64).cpu().view(n_heads, *shape)
    profile_r2 = 1 - (weights * (observed - kernel) ** 2).sum((1, 2, 3)) / (weights * observed**2).sum((1, 2, 3))

    # Last pass: residual against the kernel, spikes.
    n_top = min(n_spikes, n_k)
    sq_map, sq_res, overlap, mass = (torch.zeros(n_heads, dtype=f64, device=dev) for _ in range(4))
    spike_count = torch.empty(n_heads, n_q, dtype=torch.int64)
    spike_mass = torch.empty(n_heads, n_q, dtype=f64)
    top_value = torch.full((n_heads, n_q, n_top), float("nan"), dtype=f64)
    top_key = torch.full((n_heads, n_q, n_top), -1, dtype=torch.int64)
    for rows, p in exact.iter_query_blocks(q, k, scale, lse, query_chunk=query_chunk):
        d = kernel_flat[:, offset_index(rows)]  # h r j
        res = p - d
        sq_map += p.square().sum((1, 2), dtype=f64)
        sq_res += res.square().sum((1, 2), dtype=f64)
        overlap += torch.minimum(p, d).sum((1, 2), dtype=f64)
        mass += p.sum((1, 2), dtype=f64)
        spike = res > threshold
        spike_count[:, rows] = spike.sum(-1).cpu()
        spike_mass[:, rows] = (p * spike).sum(-1, dtype=f64).cpu()
        if n_top:
            val, pos = torch.topk(res, n_top, dim=-1)
            hit = val > threshold
            top_value[:, rows] = torch.where(hit, val, float("nan")).to(f64).cpu()
            top_key[:, rows] = torch.where(hit, key_tokens.to(dev)[pos], -1).cpu()
        del p, d, res

    spatial_mean, temporal_mean = spatial.mean(-1), temporal.mean(-1)
    head_type = [
        "temporal" if t >= temporal_threshold else "spatial" if s >= spatial_threshold else "global"
        for s, t in zip(spatial_mean.tolist(), temporal_mean.tolist())
    ]
    power = power.cpu() / max(1, n_q)
    frame_share, frame_flat = _harmonic_share(power, n_k, tpf)
    row_share, row_flat = _harmonic_share(power, n_k, width)
    q_per_frame = torch.bincount(qf.cpu(), minlength=frames).to(f64)
    return {
        "profile": profile, "pair_count": counts.view(shape),
        "frame_mass": (frame_mass.cpu() / q_per_frame[None, :, None]).masked_fill(q_per_frame[None, :, None] == 0,
                                                                                float("nan")),
        "queries_per_frame": q_per_frame,
        "d_f": d_f, "d_h": d_h, "d_w": d_w, "profile_r2": profile_r2,
        "explained_mass": (overlap / mass).cpu(), "map_r2": (1 - sq_res / sq_map).cpu(),
        "spike_count": spike_count, "spike_mass": spike_mass, "spike_value": top_value, "spike_key": top_key,
        "spike_threshold": threshold,
        "power": power, "frame_periodicity": frame_share / frame_flat, "row_periodicity": row_share / row_flat,
        "frame_power_share": frame_share, "row_power_share": row_share,
        "spatial_mass": spatial, "temporal_mass": temporal, "entropy": entropy, "head_type": head_type,
    }


@dataclass(frozen=True)
class PeriodicOptions:
    """Options of the periodic analysis (defaults = ``toolkit analyze periodic``'s; see the module docstring).

    ``spike_factor``: a spike is a residual A − D above this many times the uniform weight 1/n_keys;
    ``n_spikes``: largest spikes kept per query; ``spatial_threshold`` / ``temporal_threshold``: head-type rule;
    ``query_chunk``: query rows per exact-attention block (None: sized to a fixed memory budget);
    ``fit_iters``: ALS sweeps of the separable fit; ``robust_refits``: refits with spikes clipped."""

    spike_factor: float = SPIKE_FACTOR
    n_spikes: int = N_SPIKES
    spatial_threshold: float = SPATIAL_THRESHOLD
    temporal_threshold: float = TEMPORAL_THRESHOLD
    query_chunk: int | None = None
    fit_iters: int = 100
    robust_refits: int = 1


def analyze_record(tensors: RecordTensors, options: PeriodicOptions | None = None) -> xr.Dataset:
    """`periodic_tensors` of one record as a labelled ``xarray.Dataset`` (dims head, dt, dh, dw, query, spike,
    freq, frames). Needs ``tensors.query_tokens``, ``key_tokens`` and ``grid``; ``tensors.lse`` None: recomputed."""
    import xarray as xr

    o = options or PeriodicOptions()
    query_tokens, key_tokens, grid = tensors.require_positions("periodic")
    q, k, scale, heads = tensors.q, tensors.k, tensors.scale, tensors.head_labels
    t = periodic_tensors(q, k, scale, tensors.lse, query_tokens, key_tokens, grid, **asdict(o))
    frames, height, width = grid
    n_q, n_k = q.shape[-2], k.shape[-2]
    one = "1"

    def var(dims, value, long_name, units=one, **attrs):
        value = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        return dims, value, {"long_name": long_name, "units": units, **attrs}

    hq = ("head", "query")
    data = {
        "profile": var(("head", "dt", "dh", "dw"), t["profile"],
                       "mean attention weight at key-minus-query offset (sum / pair count)"),
        "pair_count": var(("dt", "dh", "dw"), t["pair_count"], "number of (query, key) pairs with the offset"),
        "frame_mass": var(("head", "from_frame", "to_frame"), t["frame_mass"],
                          "mean attention mass of a query frame's queries on a key frame"),
        "queries_per_frame": var(("from_frame",), t["queries_per_frame"], "stored queries in the frame"),
        "d_f": var(("head", "dt"), t["d_f"], "separable kernel factor along frames (carries the scale)"),
        "d_h": var(("head", "dh"), t["d_h"], "separable kernel factor along rows (max 1)"),
        "d_w": var(("head", "dw"), t["d_w"], "separable kernel factor along columns (max 1)"),
        "profile_r2": var(("head",), t["profile_r2"], "pair-weighted R^2 of the separable fit on the profile"),
        "explained_mass": var(("head",), t["explained_mass"], "sum min(A, D) / sum A: mass the separable kernel "
                              "explains"),
        "map_r2": var(("head",), t["map_r2"], "1 - |A - D|_F^2 / |A|_F^2"),
        "spike_count": var(hq, t["spike_count"], "entries with residual A - D above the spike threshold"),
        "spike_mass": var(hq, t["spike_mass"], "attention mass on the query's spikes"),
        "spike_value": var(("head", "query", "spike"), t["spike_value"], "largest residuals A - D above the "
                           "threshold (NaN: fewer spikes)"),
        "spike_key": var(("head", "query", "spike"), t["spike_key"], "clip token of the spike's key (-1: none)"),
        "power": var(("head", "freq"), t["power"], "mean power spectrum of attention rows along the raster key "
                     "axis", units="1"),
        "frame_periodicity": var(("head",), t["frame_periodicity"], "non-DC power share at the frame period "
                                 "(h*w tokens) and harmonics, relative to a flat spectrum"),
        "row_periodicity": var(("head",), t["row_periodicity"], "non-DC power share at the row period (w tokens)"
                               " and harmonics, relative to a flat spectrum"),
        "frame_power_share": var(("head",), t["frame_power_share"], "non-DC power share at frame harmonics"),
        "row_power_share": var(("head",), t["row_power_share"], "non-DC power share at row harmonics"),
        "spatial_mass": var(hq, t["spatial_mass"], "attention mass on keys in the query's frame"),
        "temporal_mass": var(hq, t["temporal_mass"], "attention mass on the query's (row, col) in other frames"),
        "entropy": var(hq, t["entropy"], "row entropy / log(n_keys)"),
        "head_type": (("head",), np.array(t["head_type"], dtype=str),
                      {"long_name": "head type", "flag_meanings": " ".join(HEAD_TYPES)}),
    }
    coords = {
        "head": heads,
        "dt": np.arange(-(frames - 1), frames), "dh": np.arange(-(height - 1), height),
        "dw": np.arange(-(width - 1), width),
        "query": np.arange(n_q), "query_token": ("query", np.asarray(query_tokens, dtype=np.int64)),
        "spike": np.arange(t["spike_value"].shape[-1]),
        "freq": ("freq", np.arange(n_k // 2 + 1) / n_k, {"long_name": "frequency along the key axis",
                                                       "units": "cycles per token"}),
        "from_frame": np.arange(frames), "to_frame": np.arange(frames),
    }
    attrs = {
        "analysis": "periodic", "n_keys": n_k, "n_queries": n_q, "grid": list(grid), "scale": float(scale),
        "spike_threshold": float(t["spike_threshold"]),
        "spike_factor": float(o.spike_factor),
        "spatial_threshold": float(o.spatial_threshold),
        "temporal_threshold": float(o.temporal_threshold),
        "head_type_rule": "temporal if mean temporal_mass >= temporal_threshold, else spatial if mean "
                          "spatial_mass >= spatial_threshold, else global",
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def analyze(
    cap: Any,
    records: RecordSelection | None = None,
    options: PeriodicOptions | None = None,
    *,
    device: Any = None,
    progress: bool = True,
    progress_position: int | None = None,
) -> xr.Dataset:
    """Periodic analysis of every selected record of an opened capture, stacked along ``record``.

    ``device``: where attention is recomputed (None: the GPU when present); the stored lse is used when the
    capture has it."""
    from toolkit.analysis import analyze_records

    options = options or PeriodicOptions()
    with_lse = "lse" in cap.stored

    def one(rec, heads, dev):  # without a stored lse it is recomputed by a streaming pass
        return analyze_record(RecordTensors.read(rec, heads or rec.heads, dev, v=False, lse=with_lse), options)

    return analyze_records(cap, records, one, needs=("q", "k"), name="periodic", device=device, progress=progress,
                           progress_position=progress_position)
