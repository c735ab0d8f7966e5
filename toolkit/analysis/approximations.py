"""Every approximation family on the same captured attention: map and output error against density.

The question this answers is the paper's: at a given budget, which approximation of the exact map ``A`` holds up?
Each *family* (``docs/approximation-families.md``) is evaluated at each requested *density* (fraction of the
query–key pairs the exact attention computes that the approximation computes; for Monarch, 1 − the layout's
effective sparsity, its parameter fraction):

* ``topk`` — oracle top-k per row, softmax over the kept logits (``toolkit.analysis.topk``, renormalised variant),
  kept = density · keys;
* ``blocktopk:TF,TH,TW`` / ``blocktopk-pred:TF,TH,TW`` — oracle / pooled-q·k block top-k keeping that fraction of
  key tiles per query tile;
* ``sta:TF,TH,TW`` — sliding tile attention, the 3-D window (in tiles) whose share of the key tiles is closest to
  the density;
* ``radial`` / ``radial:DENSE_FRAMES`` (default 0: only the same frame dense) — radial attention, the radius whose
  static mask is closest to the density
  on the capture's whole clip;
* ``monarch`` / ``monarch-projection`` — MonarchAttention (T = 1, what ``--attention monarch`` computes) and the
  exact Frobenius projection, on the aligned ``fh,w`` tiling closest to the density;
* ``svg`` — Sparse VideoGen: its bands cannot be set to a density, so its levels are a fixed ladder of bands
  (frame band, spatial band) = (0, 0), (1, 0), (1, 1), (2, 1), ... and its density is what it measures;
* any concrete backend spec (``sta:3,3,3:1,4,4``, ``py:module:function``, ...) — one point at its own density,
  repeated on every level.

Metrics (the top-k analysis's, per head with all queries of the record pooled): ``map_mse`` Σ (A − Â)² / (queries ·
keys), ``map_rel_fro`` ‖A − Â‖_F / ‖A‖_F, ``output_rel_l2`` ‖(A − Â)V‖_F / ‖AV‖_F and ``output_cosine`` (mean over
queries of cos(AV, ÂV)). A mask family's Â is the softmax restricted to its mask, Â = A·m / Σ A·m. A user callable
that returns an output (not a mask) has output metrics only. Streaming: one head's mask at a time (1 byte per
pair) and blocks of query rows of the exact map, as the other analyses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from typing import TYPE_CHECKING, Any

import torch

from toolkit.analysis.records import RecordSelection, RecordTensors
from toolkit.attention import exact
from toolkit.attention.families import (
    Family,
    RadialAttention,
    UserFamily,
    call_context,
    density,
    parse_family,
    tokens_context,
)
from toolkit.errors import ToolkitError
from toolkit.grid import TokenGrid, as_grid

if TYPE_CHECKING:
    import xarray as xr

DEFAULT_FAMILIES = ("topk", "blocktopk:1,4,4", "blocktopk-pred:1,4,4", "sta:1,4,4", "radial", "svg", "monarch",
                    "monarch-projection")
DEFAULT_DENSITIES = (0.05, 0.10, 0.15)  # 95, 90 and 85 % sparsity
METRICS = ("map_mse", "map_rel_fro", "output_rel_l2", "output_cosine")
SVG_BANDS = ((0, 0), (1, 0), (1, 1), (2, 1), (2, 2), (3, 2))
SVG_ROWS = 16
BLOCK_ENTRIES = 2**25  # exact-map entries per query block (one head)


@dataclass(frozen=True)
class Level:
    """One evaluated point: ``family`` (its template) at ``target`` density (NaN: not set by density), as the
    concrete ``spec`` that computes it."""

    family: str
    target: float
    spec: str


@dataclass(frozen=True)
class ApproximationOptions:
    """``families``: templates or concrete specs (module docstring); ``densities``: targets in (0, 1]."""

    families: tuple[str, ...] = DEFAULT_FAMILIES
    densities: tuple[float, ...] = DEFAULT_DENSITIES

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", tuple(f.strip() for f in self.families))
        object.__setattr__(self, "densities", tuple(float(d) for d in self.densities))
        bad = [d for d in self.densities if not 0 < d <= 1]
        if bad or not self.densities:
            raise ToolkitError(f"densities must lie in (0, 1], got {bad or 'none'}")
        if not self.families or len(set(self.families)) != len(self.families):
            raise ToolkitError(f"families must be given once each, got {', '.join(self.families) or 'none'}")


# ---- families at densities ------------------------------------------------------------------------------------
def _tile(text: str, family: str) -> tuple[int, int, int]:
    try:
        tile = tuple(int(x) for x in text.split(","))
    except ValueError:
        tile = ()
    if len(tile) != 3 or min(tile) < 1:
        raise ToolkitError(f"family {family!r}: expected a tile TF,TH,TW such as 1,4,4")
    return tile  # type: ignore[return-value]


def _sta_window(grid, tile: tuple[int, int, int], target: float) -> tuple[int, int, int]:
    """The window (tiles per axis, each at most the axis' tile count) whose share of the clip's key tiles is
    closest to ``target``; ties: the most even per-axis shares."""
    counts = [math.ceil(n / t) for n, t in zip(as_grid(grid), tile)]
    total = math.prod(counts)

    def cost(w):
        shares = [x / c for x, c in zip(w, counts)]
        return abs(math.prod(w) / total - target), max(shares) - min(shares)

    return min(product(*(range(1, c + 1) for c in counts)), key=cost)


@functools.lru_cache(maxsize=64)
def _radial_densities(grid: tuple[int, int, int], dense_frames: int) -> tuple[float, ...]:
    """Density of the radial mask over the whole clip for radius 1, 2, 4, ... up to the larger side (radial
    attention halves its radius with each doubling of the frame distance, so powers of two are its natural
    steps; cached: every record asks again)."""
    grid = as_grid(grid)
    ctx = call_context(grid, 1.0)
    n = grid.frames * grid.tokens_per_frame
    empty = torch.empty(1, n, 1)
    return tuple(float(density(RadialAttention(dense_frames, r).mask(empty, empty, empty, ctx), ctx).mean())
                 for r in _radii(grid))


def _radii(grid) -> list[int]:
    return [2**i for i in range(max(grid.height, grid.width).bit_length() + 1)]


def _radial_radius(grid, dense_frames: int, target: float) -> int:
    """The radius whose radial mask over the whole clip has the density closest to ``target``."""
    grid = as_grid(grid)
    found = _radial_densities(tuple(grid), dense_frames)
    return _radii(grid)[min(range(len(found)), key=lambda i: abs(found[i] - target))]


def _monarch_layout(grid, target: float, query_frames=None, key_frames=None) -> str:
    from toolkit.analysis.monarch import tiling_sweep_layouts

    layouts = tiling_sweep_layouts(grid, query_frames, key_frames)  # those that fit the record's frames
    if not layouts:
        raise ToolkitError(f"no aligned fh,w Monarch tiling fits grid {tuple(grid)}")
    best = min(layouts, key=lambda lay: (abs(1 - lay.effective_sparsity - target), lay.name))
    return "fh,w:" + ",".join(map(str, best.tiling))


UNKNOWN = ("templates: topk, blocktopk:TF,TH,TW, blocktopk-pred:TF,TH,TW, sta:TF,TH,TW, radial[:DENSE_FRAMES], svg, "
           "monarch, monarch-projection, or a concrete --attention family spec")


def template_kind(fam: str) -> str:
    """What a ``--families`` entry is: ``topk``, ``blocktopk``, ``sta``, ``radial``, ``monarch``, ``svg`` (templates
    set by density) or ``spec`` (a concrete family spec); a one-line `ToolkitError` for anything else."""
    name, _, rest = fam.partition(":")
    if fam in ("topk", "svg"):
        return fam
    if fam in ("monarch", "monarch-projection"):
        return "monarch"
    if name in ("blocktopk", "blocktopk-pred", "sta") and rest and ":" not in rest:
        _tile(rest, fam)
        return "blocktopk" if name != "sta" else "sta"
    if name == "radial" and (not rest or rest.isdigit()):
        return "radial"
    if parse_family(fam) is not None:  # bad parameters of a real family are refused there, in one line
        return "spec"
    raise ToolkitError(f"unknown family {fam!r}; {UNKNOWN}")


def expand_levels(families: tuple[str, ...], densities: tuple[float, ...], grid: TokenGrid | Sequence[int],
                  query_frames: tuple[int, int] | None = None,
                  key_frames: tuple[int, int] | None = None) -> list[list[Level]]:
    """Per family, one `Level` per density (see the module docstring); ``grid`` = the capture's (frames, height,
    width), ``query_frames`` / ``key_frames`` the record's (Monarch tilings must fit them; None: the whole clip).
    Bad templates and specs are refused in one line before anything is computed."""
    out = []
    for fam in families:
        kind, (name, _, rest) = template_kind(fam), fam.partition(":")
        levels = []
        for i, d in enumerate(densities):
            if kind == "topk":
                levels.append(Level(fam, d, f"topk:{d:g}"))
            elif kind == "blocktopk":
                levels.append(Level(fam, d, f"{name}:{d:g}:{','.join(map(str, _tile(rest, fam)))}"))
            elif kind == "sta":
                tile = _tile(rest, fam)
                window = _sta_window(grid, tile, d)
                levels.append(Level(fam, d, f"sta:{','.join(map(str, window))}:{','.join(map(str, tile))}"))
            elif kind == "radial":
                dense = int(rest) if rest else 0  # the same frame dense: the sparsest radial mask
                levels.append(Level(fam, d, f"radial:{dense},{_radial_radius(grid, dense, d)}"))
            elif kind == "monarch":
                levels.append(Level(fam, d, f"{fam}:{_monarch_layout(grid, d, query_frames, key_frames)}"))
            elif kind == "svg":
                bands = SVG_BANDS[min(i, len(SVG_BANDS) - 1)]
                levels.append(Level(fam, math.nan, f"svg:{SVG_ROWS}:{bands[0]},{bands[1]}"))
            else:  # a concrete spec: one point, on every level
                levels.append(Level(fam, math.nan, fam))
        out.append(levels)
    return out


# ---- metrics --------------------------------------------------------------------------------------------------
def masked_metrics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, lse: torch.Tensor, scale: float,
                   mask: torch.Tensor) -> dict[str, float]:
    """Metrics of the softmax restricted to ``mask`` for one head: q ``i d``, k/v ``j d``, lse ``i``, mask
    ``i j`` (every row keeps a key); float64 sums."""
    f64 = torch.float64
    n_q, n_k = q.shape[0], k.shape[0]
    sums = dict(map_sq=0.0, ref_sq=0.0, out_sq=0.0, out_ref=0.0, cosine=0.0)
    rows = max(1, BLOCK_ENTRIES // max(n_k, 1))
    for start in range(0, n_q, rows):
        sl = slice(start, min(start + rows, n_q))
        p = exact.probs(q[sl], k, lse[sl], scale)  # r j, rows sum to 1
        pm = p * mask[sl]
        approx = pm / pm.sum(-1, keepdim=True)
        sums["map_sq"] += float((p - approx).square().sum(dtype=f64))
        sums["ref_sq"] += float(p.square().sum(dtype=f64))
        if v is not None:
            out, out_hat = (torch.matmul(a, v.to(a.dtype)).to(f64) for a in (p, approx))
            sums["out_sq"] += float((out - out_hat).square().sum())
            sums["out_ref"] += float(out.square().sum())
            sums["cosine"] += float(torch.nn.functional.cosine_similarity(out, out_hat, dim=-1).sum())
    res = {"map_mse": sums["map_sq"] / (n_q * n_k), "map_rel_fro": math.sqrt(sums["map_sq"] / sums["ref_sq"])}
    if v is not None:
        res["output_rel_l2"] = math.sqrt(sums["out_sq"] / sums["out_ref"])
        res["output_cosine"] = sums["cosine"] / n_q
    return res


def output_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Output metrics of an approximate output ``i e`` against the exact ``i e`` (no map: a callable's output)."""
    out, ref = out.double(), ref.double()
    return {"output_rel_l2": float((out - ref).norm() / ref.norm()),
            "output_cosine": float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean())}


def _family_point(family: Family, t: RecordTensors, h: int, ctx, lse: torch.Tensor) -> dict[str, float]:
    """Density and metrics of ``family`` on head ``h`` of a record."""
    q, k = t.q[h : h + 1], t.k[h : h + 1]  # 1 i d: families take leading dims
    v = t.v[h : h + 1] if t.v is not None else torch.zeros_like(k[..., :1])
    if isinstance(family, UserFamily):  # its answer may be an output rather than a mask
        approx = family.evaluate(q, k, v, ctx)
        if approx.mask is None:
            if t.v is None:
                return {}
            return output_metrics(approx.out[0], exact.attention_output(t.q[h], t.k[h], t.v[h], t.scale))
        mask = approx.mask
    else:
        mask = family.mask(q, k, v, ctx)
    mask = torch.broadcast_to(mask, (1, q.shape[1], k.shape[1]))[0]
    res = masked_metrics(t.q[h], t.k[h], t.v[h] if t.v is not None else None, lse, t.scale, mask)
    res["density"] = float(density(mask, ctx))
    return res


def analyze_record(tensors: RecordTensors, options: ApproximationOptions | None = None) -> xr.Dataset:
    """Every family of ``options`` at every density on one record: a Dataset with dims ``head, family, level``
    (variables ``density`` and the metrics; coordinates ``spec`` and ``target_density`` per family and level)."""
    import numpy as np
    import xarray as xr

    from toolkit.analysis import monarch as monarch_analysis
    from toolkit.analysis.topk import keep_counts, topk_tensors

    o = options or ApproximationOptions()
    query_tokens, key_tokens, grid = tensors.require_positions("approximations")
    grid = as_grid(grid)
    ctx = tokens_context(grid, tensors.scale, query_tokens, key_tokens)
    levels = expand_levels(o.families, o.densities, grid, ctx.query_frames, ctx.key_frames)
    n_heads, n_fam, n_lev = tensors.q.shape[0], len(levels), len(o.densities)
    names = ("density", *METRICS)
    res = {m: np.full((n_heads, n_fam, n_lev), np.nan) for m in names}
    lse = tensors.lse if tensors.lse is not None else exact.logsumexp(tensors.q, tensors.k, tensors.scale)
    n_k = tensors.k.shape[-2]
    for f, fam_levels in enumerate(levels):
        fam = fam_levels[0].family
        if fam == "topk":
            sparsities = [1 - lv.target for lv in fam_levels]
            t = topk_tensors(tensors.q, tensors.k, tensors.v, tensors.scale, lse, masses=(0.5,),
                             sparsities=sparsities)
            res["density"][:, f] = np.asarray(keep_counts(n_k, sparsities), dtype=float)[None] / n_k
            for m in METRICS:
                if m in t:
                    res[m][:, f] = t[m][..., 0].numpy()  # variant 0 = renormalized
        elif fam in ("monarch", "monarch-projection"):
            layouts = [lv.spec.partition(":")[2] for lv in fam_levels]
            proj = fam == "monarch-projection"
            ds = monarch_analysis.analyze_record(tensors, monarch_analysis.MonarchOptions(
                layouts=tuple(dict.fromkeys(layouts)), iters=0 if proj else 1, projection=proj, topk_baseline=False))
            prefix = "projection_" if proj else "variational_"
            for lv_i, lay in enumerate(layouts):
                cfg = monarch_analysis.parse_layout(lay, grid).name
                sel = ds.sel(config=cfg)
                if not proj:
                    sel = sel.sel(iters=1)
                res["density"][:, f, lv_i] = 1 - float(sel["effective_sparsity"])
                for ours, theirs in (("map_mse", "map_mse"), ("map_rel_fro", "rel_fro"),
                                     ("output_rel_l2", "out_rel_l2")):
                    if prefix + theirs in sel:
                        res[ours][:, f, lv_i] = sel[prefix + theirs].values
        else:
            for lv_i, lv in enumerate(fam_levels):
                family = parse_family(lv.spec)
                for h in range(n_heads):
                    point = _family_point(family, tensors, h, ctx, lse[h])
                    for m, val in point.items():
                        res[m][h, f, lv_i] = val
    units = "1"
    long_names = {
        "density": "computed query-key pairs / pairs of the exact attention (Monarch: 1 - effective sparsity)",
        "map_mse": "mean over all map entries of (A - A_approx)^2",
        "map_rel_fro": "|A - A_approx|_F / |A|_F",
        "output_rel_l2": "|(A - A_approx) V|_F / |A V|_F",
        "output_cosine": "mean over queries of cos(A V, A_approx V)",
    }
    data = {m: (("head", "family", "level"), res[m], {"long_name": long_names[m], "units": units}) for m in names}
    coords = {
        "head": tensors.head_labels,
        "family": list(o.families),
        "level": np.arange(n_lev),
        "spec": (("family", "level"), np.array([[lv.spec for lv in fl] for fl in levels], dtype=str)),
        "target_density": (("family", "level"), np.array([[lv.target for lv in fl] for fl in levels]),
                           {"long_name": "requested density (NaN: not set by density)", "units": units}),
    }
    attrs = {"analysis": "approximations", "grid": list(grid), "n_queries": int(tensors.q.shape[-2]),
             "n_keys": int(n_k), "scale": float(tensors.scale),
             "description": "approximation families vs the exact attention map (toolkit.analysis.approximations)"}
    return xr.Dataset(data, coords=coords, attrs=attrs)


def analyze(
    cap: Any,
    records: RecordSelection | None = None,
    options: ApproximationOptions | None = None,
    *,
    device: Any = None,
    progress: bool = True,
    progress_position: int | None = None,
) -> xr.Dataset:
    """The approximation analysis for every selected record of an opened capture, along ``record``."""
    from toolkit.analysis import analyze_records

    options = options or ApproximationOptions()
    expand_levels(options.families, options.densities, cap.grid)  # bad families: refused before any record
    with_v, with_lse = "v" in cap.stored, "lse" in cap.stored

    def one(rec, heads, dev):
        return analyze_record(RecordTensors.read(rec, heads, dev, v=with_v, lse=with_lse), options)

    return analyze_records(cap, records, one, needs=("q", "k"), name="approximations", device=device,
                           progress=progress, progress_position=progress_position)


__all__ = ["ApproximationOptions", "DEFAULT_DENSITIES", "DEFAULT_FAMILIES", "Level", "analyze", "analyze_record",
           "expand_levels", "masked_metrics", "output_metrics"]
