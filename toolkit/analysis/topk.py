"""Oracle top-k: how many keys a query needs, and what dropping the rest costs — exact, at full scale.

For every query row of the exact map ``A = P / Σ_j P`` (``P = exp(s·q·kᵀ − lse)`` from `toolkit.attention.exact`):

* **Coverage**: the smallest number of keys whose largest weights reach a fraction ``p`` of the row's mass
  (``docs/metrics.md`` "Coverage"), reported as a fraction of the attended keys, per query.
* **Oracle top-k error vs sparsity** (sparsity = fraction of keys dropped; ``kept = max(1, round((1 − s)·n))``
  largest entries per row are kept). Two variants, because the paper's exact definition is unconfirmed
  (``docs/metrics.md`` "What the paper leaves unconfirmed"):

  - ``renormalized``: softmax over the kept logits, ``Â = A·w / Σ A·w`` (the top-k baseline of MonarchRT's code);
  - ``truncated``:    ``Â = A·w`` (the kept entries of the exact map, rows no longer sum to 1).

  Metrics per head (all queries of the record pooled): map MSE per entry ``Σ (A − Â)² / (n_queries · n_keys)``
  (Fig. 1's y-axis under the per-entry-mean reading), relative Frobenius error ``‖A − Â‖_F / ‖A‖_F``, output
  relative L2 ``‖(A − Â)V‖_F / ‖AV‖_F`` and the mean over queries of the cosine between ``AV`` and ``ÂV``
  (identical for both variants, which differ by a per-row factor; reported for both for a uniform layout).

Ties at the k-th largest value are shared: each of the ``n_eq`` tied entries is kept with weight
``(kept − n_greater) / n_eq``, which makes every metric independent of an arbitrary tie order.

Per query block only the probability tile and same-sized temporaries are in memory. Row thresholds are found
either by sorting each row (``method="sort"``, simple, used as the reference) or without a full sort
(``method="radix"``, float32 only): a per-row histogram over the top bits of the float32 bit pattern (monotone for
non-negative floats) locates the bin holding each threshold, then only the entries of those few bins are
sorted, exactly. Both give identical thresholds and counts on the same float32 tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from toolkit.analysis.records import RecordSelection, RecordTensors
from toolkit.attention import exact
from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    import xarray as xr

COVERAGE_MASSES = (0.5, 0.9, 0.95, 0.99)
SPARSITIES = (0.0, 0.5, 0.75, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99)
VARIANTS = ("renormalized", "truncated")
# Probability entries per query block (all heads together); P, the dropped map and the radix indices are
# blocks of this size.
BLOCK_ENTRIES = 2**26
# float32 bits kept by the radix histogram: sign (always 0) + 8 exponent + 5 mantissa bits, i.e. bins that are
# 2^(1/32) ≈ 2.2 % wide in probability.
_RADIX_SHIFT = 18


def keep_counts(n_keys: int, sparsities: tuple[float, ...] | list[float]) -> list[int]:
    """Keys kept per row at each sparsity: ``max(1, round((1 − s) · n_keys))`` (half rounds up)."""
    return [max(1, min(n_keys, math.floor((1.0 - s) * n_keys + 0.5))) for s in sparsities]


def check_levels(masses: tuple[float, ...] | list[float], sparsities: tuple[float, ...] | list[float]) -> None:
    """Raise `ToolkitError` for a coverage mass outside (0, 1) or a sparsity outside [0, 1)."""
    for p in masses:
        if not 0.0 < p < 1.0:
            raise ToolkitError(f"coverage mass p={p} is impossible: it must lie strictly between 0 and 1")
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise ToolkitError(f"sparsity {s} is impossible: it must lie in [0, 1) (fraction of keys dropped)")


@dataclass
class RowSelection:
    """Per-row thresholds of one probability block; leading dims ``... r`` as the block's rows.

    ``threshold[..., l]`` is the ``keep[l]``-th largest entry, ``n_greater`` / ``n_equal`` count entries above /
    equal to it; ``coverage_keys[..., c]`` is the smallest number of keys reaching mass ``masses[c]`` of the row.
    """

    threshold: torch.Tensor  # ... r L   (block dtype)
    n_greater: torch.Tensor  # ... r L   int64
    n_equal: torch.Tensor  # ... r L   int64
    coverage_keys: torch.Tensor  # ... r C   int64


def select_sort(p: torch.Tensor, keep: list[int], masses: tuple[float, ...]) -> RowSelection:
    """Row thresholds by sorting every row (reference). ``p`` is ``... r n`` with non-negative entries."""
    n = p.shape[-1]
    asc = torch.sort(p, dim=-1).values
    keep_t = torch.tensor(keep, device=p.device)
    thr = asc[..., n - keep_t]  # ... r L
    lo = torch.searchsorted(asc, thr.contiguous(), right=False)
    hi = torch.searchsorted(asc, thr.contiguous(), right=True)
    # Coverage: first position where the descending cumulative mass reaches p · total.
    cum = torch.cumsum(asc.flip(-1), dim=-1, dtype=torch.float64)
    target = cum[..., -1:] * torch.tensor(masses, dtype=torch.float64, device=p.device)
    cover = torch.searchsorted(cum, target.contiguous(), right=False) + 1
    return RowSelection(thr, n - hi, hi - lo, cover.clamp_(max=n))


def select_radix(p: torch.Tensor, keep: list[int], masses: tuple[float, ...]) -> RowSelection:
    """Same result as `select_sort` without sorting whole rows (float32 ``p`` only); see the module docstring.

    1. Per-row histogram (count and float64 mass) over ``bits >> 18`` of the float32 entries.
    2. From the cumulative histograms, the bin ``b*`` holding each top-k threshold / coverage crossing.
    3. The entries of the rows' ``b*`` bins (a few per cent of the row) are sorted once, keyed by
       ``row << 31 | bits``; ranks and partial sums inside the bin are then exact.
    """
    if p.dtype != torch.float32:
        raise TypeError("select_radix needs a float32 block; use select_sort")
    shape, n = p.shape[:-1], p.shape[-1]
    dev = p.device
    pf = p.reshape(-1, n)
    m = pf.shape[0]
    rows = torch.arange(m, device=dev)
    coarse = pf.view(torch.int32) >> _RADIX_SHIFT
    lo, hi = (int(x) for x in torch.aminmax(coarse))
    nb = hi - lo + 1
    if m * nb < 2**31:  # int32 arithmetic, one conversion for bincount / indexing
        idx = coarse.sub_(lo).add_(rows[:, None].to(torch.int32) * nb).view(-1).long()
    else:
        idx = coarse.long().sub_(lo).add_(rows[:, None] * nb).view(-1)
    del coarse  # idx: flat (row, bin) of every entry
    counts = torch.bincount(idx, minlength=m * nb).view(m, nb)
    mass = torch.bincount(idx, weights=pf.reshape(-1).double(), minlength=m * nb).view(m, nb)
    count_le = counts.cumsum(-1)  # entries in bins <= b
    mass_le = mass.cumsum(-1)
    total = mass_le[:, -1:]

    # Bin of the keep-th largest entry: the highest bin b with (entries in bins >= b) >= keep.
    keep_t = torch.tensor(keep, device=dev).expand(m, -1)
    b_keep = torch.searchsorted(count_le, (n - keep_t).contiguous(), right=True).clamp_(max=nb - 1)
    rank_in_bin = keep_t - (n - count_le.gather(1, b_keep))  # 1 = largest entry of the bin
    # Bin where the descending cumulative mass crosses p · total: the highest b with (mass in bins >= b) >= target.
    target = total * torch.tensor(masses, dtype=torch.float64, device=dev)
    b_cov = torch.searchsorted(mass_le, (total - target).contiguous(), right=True).clamp_(max=nb - 1)
    need = target - (total - mass_le.gather(1, b_cov))  # mass still needed from inside bin b_cov

    # Sort the entries of all boundary bins at once, grouped by row.
    cand_bin = torch.zeros(m, nb, dtype=torch.bool, device=dev)
    cand_bin.scatter_(1, torch.cat([b_keep, b_cov], dim=1), True)
    cand_counts = counts * cand_bin
    cand_le = cand_counts.cumsum(-1)
    n_cand = cand_le[:, -1]
    elem = cand_bin.view(-1)[idx]
    del idx
    vals = pf.reshape(-1)[elem]
    row_of = torch.repeat_interleave(rows, n_cand)
    keys = torch.sort((row_of << 31) | vals.view(torch.int32).long()).values
    del vals, row_of, elem
    sorted_vals = (keys & 0x7FFFFFFF).to(torch.int32).view(torch.float32)
    row_start = (n_cand.cumsum(0) - n_cand)[:, None]

    # Top-k threshold: rank_in_bin-th largest of bin b_keep; ties counted by searching its key.
    end = row_start + cand_le.gather(1, b_keep)  # one past the bin's largest entry
    thr = sorted_vals[end - rank_in_bin]
    thr_key = (rows[:, None] << 31) | thr.view(torch.int32).long()
    lo = torch.searchsorted(keys, thr_key, right=False)
    hi = torch.searchsorted(keys, thr_key, right=True)
    n_greater = (n - count_le.gather(1, b_keep)) + (end - hi)

    # Coverage: fewest of bin b_cov's largest entries whose sum reaches `need` (exclusive prefix sums).
    csum = torch.cat([sorted_vals.new_zeros(1, dtype=torch.float64), sorted_vals.double().cumsum(0)])
    end = row_start + cand_le.gather(1, b_cov)
    start = end - counts.gather(1, b_cov)
    j = torch.searchsorted(csum, (csum[end] - need).contiguous(), right=True) - 1
    j = torch.minimum(torch.maximum(j, start), end - 1)
    cover = (n - count_le.gather(1, b_cov)) + (end - j)
    return RowSelection(
        thr.view(*shape, -1), n_greater.view(*shape, -1), (hi - lo).view(*shape, -1), cover.view(*shape, -1)
    )


def select_rows(p: torch.Tensor, keep: list[int], masses: tuple[float, ...], method: str = "auto") -> RowSelection:
    """Dispatch: ``auto`` = sort on GPU (measured faster on an H100: 1.36 s vs 1.46 s for the full-scale record of
    benchmarks/results/bench_analysis_h100.json), radix for float32 blocks on CPU, sort otherwise."""
    if method == "auto":
        method = "radix" if p.dtype == torch.float32 and p.device.type == "cpu" else "sort"
    if method == "radix":
        return select_radix(p, keep, masses)
    if method == "sort":
        return select_sort(p, keep, masses)
    raise ValueError(f"unknown selection method {method!r} (auto, radix, sort)")


def _block_metrics(
    p: torch.Tensor, v: torch.Tensor | None, sel: RowSelection, keep: list[int]
) -> dict[str, torch.Tensor]:
    """Per-row sums for one block ``... r n``; see `topk_tensors` for how they are pooled.

    With total = Σ P, δ = dropped mass (ties shared), kept = total − δ, the errors are
    truncated: (A − Â) = D / total;   renormalized: kept entries P(1/total − 1/kept), dropped P / total.
    """
    f64 = torch.float64
    total = p.sum(-1, dtype=f64)  # ... r
    sq_total = (p * p).sum(-1, dtype=f64)
    pv = torch.matmul(p, v.to(p.dtype)) if v is not None else None
    out = {name: [] for name in ("kept_mass", "map_sq_renorm", "map_sq_trunc", "out_sq_renorm", "out_sq_trunc",
                                 "cosine")}
    for level, k in enumerate(keep):
        t = sel.threshold[..., level]
        n_gt, n_eq = sel.n_greater[..., level], sel.n_equal[..., level]
        frac = (k - n_gt).to(f64) / n_eq.to(f64)  # kept share of each tied entry, in (0, 1]
        t64 = t.to(f64)
        d = torch.where(p < t.unsqueeze(-1), p, 0.0)  # dropped entries strictly below the threshold
        tie_drop = n_eq * (1 - frac) * t64  # dropped mass of the ties
        dropped = d.sum(-1, dtype=f64) + tie_drop
        sq_below = (d * d).sum(-1, dtype=f64)
        sq_above = sq_total - sq_below - n_eq * t64 * t64
        kept = total - dropped
        trunc = (sq_below + n_eq * ((1 - frac) * t64) ** 2) / total**2
        renorm = (sq_below / total**2 + (dropped / (total * kept)) ** 2 * sq_above.clamp(min=0)
                  + n_eq * (t64 / total - frac * t64 / kept) ** 2)
        out["kept_mass"].append(kept / total)
        out["map_sq_trunc"].append(trunc)
        out["map_sq_renorm"].append(renorm)
        if pv is not None:
            dv = torch.matmul(d, v.to(d.dtype)).to(f64)
            partial = (frac < 1).nonzero(as_tuple=True)
            if partial[0].numel():  # rows whose tie group is split: add the dropped share of the ties
                tied = (p[partial] == t[partial].unsqueeze(-1)).to(f64)  # n_partial n
                v_rows = v[partial[:-1]].to(f64)  # n_partial n e
                tie_v = torch.matmul(tied.unsqueeze(-2), v_rows).squeeze(-2)
                dv[partial] += ((1 - frac[partial]) * t64[partial]).unsqueeze(-1) * tie_v
            pv64 = pv.to(f64)
            err_renorm = (total.unsqueeze(-1) * dv - dropped.unsqueeze(-1) * pv64) / (total * kept).unsqueeze(-1)
            out["out_sq_trunc"].append((dv / total.unsqueeze(-1)).square().sum(-1))
            out["out_sq_renorm"].append(err_renorm.square().sum(-1))
            kv = pv64 - dv
            out["cosine"].append((pv64 * kv).sum(-1) / (pv64.norm(dim=-1) * kv.norm(dim=-1)))
    res = {name: torch.stack(vals, dim=-1) for name, vals in out.items() if vals}
    res["map_sq"] = sq_total / total**2
    if pv is not None:
        res["out_sq"] = (pv.to(f64) / total.unsqueeze(-1)).square().sum(-1)
    return res


def topk_tensors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    scale: float,
    lse: torch.Tensor | None = None,
    *,
    masses: tuple[float, ...] = COVERAGE_MASSES,
    sparsities: tuple[float, ...] = SPARSITIES,
    query_chunk: int | None = None,
    method: str = "auto",
) -> dict[str, torch.Tensor]:
    """Coverage and oracle top-k errors as tensors (CPU, float64 / int64), streaming over query blocks.

    q ``h i d``, k and v ``h j d``, lse ``h i`` (computed when None). Returns
    ``coverage_keys h i C``, ``kept_mass h i L``, and per head ``map_mse, map_rel_fro, output_rel_l2,
    output_cosine`` of shape ``h L V`` (V = `VARIANTS`; the output metrics only when v is given).
    """
    masses, sparsities = tuple(masses), tuple(sparsities)
    check_levels(masses, sparsities)
    n_heads, n_q, n_k = q.shape[0], q.shape[-2], k.shape[-2]
    keep = keep_counts(n_k, sparsities)
    if lse is None:
        lse = exact.logsumexp(q, k, scale)
    if query_chunk is None:
        query_chunk = exact.default_query_chunk(n_k, n_heads, BLOCK_ENTRIES)
    cover, kept, sums = [], [], {}
    for _, p in exact.iter_query_blocks(q, k, scale, lse, query_chunk=query_chunk):
        sel = select_rows(p, keep, masses, method)
        cover.append(sel.coverage_keys.cpu())
        met = _block_metrics(p, v, sel, keep)
        kept.append(met.pop("kept_mass").cpu())
        del p
        for name, val in met.items():
            sums[name] = sums.get(name, 0) + val.sum(dim=1).cpu()  # over the block's rows
    res = {"coverage_keys": torch.cat(cover, dim=-2), "kept_mass": torch.cat(kept, dim=-2)}
    n_var = len(VARIANTS)

    def by_variant(renorm: torch.Tensor, trunc: torch.Tensor) -> torch.Tensor:
        return torch.stack([renorm, trunc], dim=-1)  # order = VARIANTS

    res["map_mse"] = by_variant(sums["map_sq_renorm"], sums["map_sq_trunc"]) / (n_q * n_k)
    res["map_rel_fro"] = (by_variant(sums["map_sq_renorm"], sums["map_sq_trunc"])
                          / sums["map_sq"][:, None, None]).sqrt()
    if v is not None:
        res["output_rel_l2"] = (by_variant(sums["out_sq_renorm"], sums["out_sq_trunc"])
                                / sums["out_sq"][:, None, None]).sqrt()
        res["output_cosine"] = (sums["cosine"] / n_q)[..., None].expand(-1, -1, n_var).clone()
    return res


@dataclass(frozen=True)
class TopkOptions:
    """Options of the top-k analysis (defaults = ``toolkit analyze topk``'s).

    ``masses``: coverage masses, each in (0, 1); ``sparsities``: fractions of keys dropped, each in [0, 1);
    ``method``: row threshold search (``auto``, ``radix``, ``sort``; see `select_rows`); ``query_chunk``: query
    rows per exact-attention block (None: sized to a fixed memory budget)."""

    masses: tuple[float, ...] = COVERAGE_MASSES
    sparsities: tuple[float, ...] = SPARSITIES
    method: str = "auto"
    query_chunk: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "masses", tuple(float(p) for p in self.masses))
        object.__setattr__(self, "sparsities", tuple(float(s) for s in self.sparsities))


def analyze_record(tensors: RecordTensors, options: TopkOptions | None = None) -> xr.Dataset:
    """`topk_tensors` of one record as a labelled ``xarray.Dataset``: dims ``head, query, mass, sparsity,
    variant`` (``tensors.v`` None: no output errors; ``tensors.lse`` None: recomputed by a streaming pass).

    Positions are not needed (top-k ignores them): ``tensors.query_tokens`` becomes the ``query_token``
    coordinate and ``tensors.grid`` an attribute when given.
    """
    import numpy as np
    import xarray as xr

    o = options or TopkOptions()
    masses, sparsities = o.masses, o.sparsities
    q, k, v, scale, query_tokens, grid = tensors.q, tensors.k, tensors.v, tensors.scale, tensors.query_tokens, \
        tensors.grid
    heads = tensors.heads
    t = topk_tensors(q, k, v, scale, tensors.lse, masses=masses, sparsities=sparsities, query_chunk=o.query_chunk,
                     method=o.method)
    n_heads, n_q, n_k = q.shape[0], q.shape[-2], k.shape[-2]
    fraction = t["coverage_keys"].double() / n_k
    quantiles = (0.1, 0.25, 0.5, 0.75, 0.9)
    cover_q = torch.quantile(fraction.transpose(1, 2), torch.tensor(quantiles, dtype=torch.float64), dim=-1)
    cover_q = cover_q.permute(1, 2, 0)  # head mass quantile
    one = "1"
    data = {
        "coverage_fraction": (("head", "query", "mass"), fraction.numpy(), {
            "long_name": "fraction of keys whose largest weights reach the mass p of the query's row", "units": one}),
        "coverage_keys": (("head", "query", "mass"), t["coverage_keys"].numpy(), {
            "long_name": "number of keys whose largest weights reach the mass p", "units": "keys"}),
        "coverage_mean": (("head", "mass"), fraction.mean(1).numpy(), {
            "long_name": "mean over queries of coverage_fraction", "units": one}),
        "coverage_quantile": (("head", "mass", "quantile"), cover_q.numpy(), {
            "long_name": "quantiles over queries of coverage_fraction", "units": one}),
        "kept_mass": (("head", "query", "sparsity"), t["kept_mass"].numpy(), {
            "long_name": "attention mass of the kept (largest) keys: the sorted mass curve at 1 - sparsity",
            "units": one}),
        "map_mse": (("head", "sparsity", "variant"), t["map_mse"].numpy(), {
            "long_name": "mean over all map entries of (A - A_topk)^2", "units": one}),
        "map_rel_fro": (("head", "sparsity", "variant"), t["map_rel_fro"].numpy(), {
            "long_name": "|A - A_topk|_F / |A|_F", "units": one}),
    }
    if v is not None:
        data["output_rel_l2"] = (("head", "sparsity", "variant"), t["output_rel_l2"].numpy(), {
            "long_name": "|(A - A_topk) V|_F / |A V|_F", "units": one})
        data["output_cosine"] = (("head", "sparsity", "variant"), t["output_cosine"].numpy(), {
            "long_name": "mean over queries of cos(A V, A_topk V)", "units": one})
    keep = keep_counts(n_k, sparsities)
    coords = {
        "head": list(range(n_heads)) if heads is None else list(heads),
        "query": np.arange(n_q),
        "mass": ("mass", np.asarray(masses, dtype=np.float64), {"long_name": "covered attention mass p"}),
        "sparsity": ("sparsity", np.asarray(sparsities, dtype=np.float64), {
            "long_name": "fraction of keys dropped per query row (asked)", "units": one}),
        "kept_keys": ("sparsity", np.asarray(keep, dtype=np.int64), {"long_name": "keys kept per row"}),
        "actual_sparsity": ("sparsity", 1 - np.asarray(keep, dtype=np.float64) / n_k, {"units": one}),
        "variant": list(VARIANTS),
        "quantile": np.asarray(quantiles),
    }
    if query_tokens is not None:
        coords["query_token"] = ("query", np.asarray(query_tokens, dtype=np.int64))
    attrs = {
        "analysis": "topk", "n_keys": n_k, "n_queries": n_q, "scale": float(scale),
        "renormalized": "softmax over the kept logits (the paper's oracle top-k baseline)",
        "truncated": "kept entries of the exact map, not renormalised",
        "kept_rule": "kept = max(1, round((1 - sparsity) * n_keys)); ties at the threshold shared equally",
    }
    if grid is not None:
        attrs["grid"] = list(grid)
    return xr.Dataset(data, coords=coords, attrs=attrs)


def analyze(
    cap: Any,
    records: RecordSelection | None = None,
    options: TopkOptions | None = None,
    *,
    device: Any = None,
    progress: bool = True,
    progress_position: int | None = None,
) -> xr.Dataset:
    """Coverage and oracle top-k errors for every selected record of an opened capture, along ``record``.

    ``device``: where attention is recomputed (None: the GPU when present); the stored lse and v are used when
    the capture has them."""
    from toolkit.analysis import analyze_records

    options = options or TopkOptions()
    check_levels(options.masses, options.sparsities)
    with_v, with_lse = "v" in cap.stored, "lse" in cap.stored

    def one(rec, heads, dev):  # without a stored lse it is recomputed by a streaming pass
        return analyze_record(RecordTensors.read(rec, heads, dev, v=with_v, lse=with_lse), options)

    return analyze_records(cap, records, one, needs=("q", "k"), name="topk", device=device, progress=progress,
                           progress_position=progress_position)
