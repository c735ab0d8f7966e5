"""Alignment and tiling: Monarch approximation error vs effective sparsity for the six aligned bases, the
paper's tilings of ``fh,w`` and misaligned (contiguous-block) controls, with oracle top-k at the same parameter
count — all from ``toolkit.analysis.monarch`` on the focus record.

(a) exact projection (the best any Monarch map of the layout can do), (b) variational MonarchAttention T = 1.
Relative Frobenius error ‖A − M‖_F / ‖A‖_F, median over the heads of the analysed layers (bars: min–max); bases
at the same sparsity are drawn a little apart (``DODGE``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from toolkit.paper_figures import style
from toolkit.paper_figures.common import Context, require_all_queries, require_records, require_stored
from toolkit.paper_figures.fig1_mse_sparsity import monarch_selection

if TYPE_CHECKING:
    import xarray as xr

NAME = "alignment_tiling"
TITLE = "error vs effective sparsity: aligned bases, tilings, misaligned controls"
READS_LAYOUTS = True  # --layout chooses its Monarch layouts (monarch_selection)
METRIC = "rel_fro"
BASE_MARKERS = {"fh,w": "s", "w,fh": "D", "f,hw": "^", "hw,f": "v", "fw,h": "<", "h,fw": ">", "contiguous": "X"}
# Horizontal offsets in sparsity so that bases sharing a sparsity (e.g. fh,w and w,fh at 95.2 %) do not hide each
# other's bars; the paper's fh,w stays at its true x.
DODGE = {"fh,w": 0.0, "w,fh": 0.003, "f,hw": -0.003, "hw,f": 0.003, "fw,h": -0.003, "h,fw": 0.006, "contiguous": -0.006}


def check(ctx: Context) -> None:
    require_stored(ctx.cap, NAME, ("q", "k", "lse"))
    require_all_queries(ctx.cap, NAME)
    require_records(ctx.cap, NAME, layers=ctx.pair_layers(), **ctx.focus)


def data(ctx: Context) -> dict:
    mon = ctx.results.get("monarch", **monarch_selection(ctx))
    sel = (mon["step"].values == ctx.step) & (mon["chunk"].values == ctx.chunk)
    return dict(monarch=mon.isel(record=np.nonzero(sel)[0]), step=ctx.step, chunk=ctx.chunk)


def per_config(mon: xr.Dataset, name: str) -> np.ndarray:
    """A per-config property (``effective_sparsity``, ``base``): identical in every record, stored per record."""
    v = mon[name]
    return (v.isel(record=0) if "record" in v.dims else v).values


def summary(mon: xr.Dataset, var: str) -> dict[str, np.ndarray]:
    """Median, min and max of ``var`` over records × heads, per config."""
    v = mon[var]
    if "iters" in v.dims:
        v = v.sel(iters=1)
    if "variant" in v.dims:
        v = v.sel(variant="renormalized")
    flat = v.stack(sample=("record", "head")).transpose("config", "sample").values
    return {"median": np.nanmedian(flat, axis=1), "min": np.nanmin(flat, axis=1), "max": np.nanmax(flat, axis=1)}


@style.use_style
def plot(d: dict, out_dir: str | Path) -> dict:
    mon = d["monarch"]
    x = per_config(mon, "effective_sparsity")
    bases = [str(b) for b in per_config(mon, "base")]
    names = [str(n) for n in mon["config"].values]
    layers = sorted({int(v) for v in mon["layer"].values})
    fig, ax = style.subplots(1, 2, width=3.8, height=3.2, sharey=True)
    plotted = {"sparsity": x, "config": np.array(names)}
    topk = summary(mon, f"topk_{METRIC}") if f"topk_{METRIC}" in mon else None
    for a, kind, title in ((ax[0][0], "projection", "(a) exact projection"),
                           (ax[0][1], "variational", "(b) MonarchAttention, T = 1")):
        var = f"{kind}_{METRIC}"
        if var not in mon:
            a.set_title(f"{title}: not computed")
            continue
        s = summary(mon, var)
        plotted[f"{kind}_median"] = s["median"]
        for base in BASE_MARKERS:
            sel = np.array([b == base for b in bases])
            if not sel.any():
                continue
            color = (style.COLORS["misaligned"] if base == "contiguous" else
                     style.COLORS["monarch"] if base == "fh,w" else style.COLORS["tiled"])
            order = np.argsort(x[sel])
            xs, med = x[sel][order], s["median"][sel][order]
            err = np.vstack([med - s["min"][sel][order], s["max"][sel][order] - med])
            a.errorbar(xs + DODGE[base], med, yerr=err, marker=BASE_MARKERS[base], ms=5,
                       ls="-" if base == "fh,w" else "none", color=color, capsize=2, lw=0.9,
                       label="contiguous blocks (misaligned)" if base == "contiguous" else f"{base} aligned")
        if topk is not None:
            order = np.argsort(x)
            a.plot(x[order], topk["median"][order], marker=".", ls=":", color=style.COLORS["topk"],
                   label="oracle top-k, same parameters")
            plotted["topk_median"] = topk["median"]
        a.set(xlabel="effective sparsity 1 − (b1+b2)/(b1·b2)", title=title, yscale="log")
    ax[0][0].set_ylabel("relative Frobenius error ‖A − M‖/‖A‖")
    handles, labels = ax[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=7)  # below both panels, over no data
    fig.suptitle(f"median over {mon.sizes['head']} heads × layers {layers}, step {d['step']}, chunk {d['chunk']} "
                 f"\nbars: min–max; bases that share a sparsity are drawn up to {max(DODGE.values()):.3f} apart",
                 fontsize=9)
    style.save(fig, out_dir, NAME)
    return plotted
