"""Fig. 1 analogue: attention-map MSE vs sparsity — Monarch (exact projection and variational T = 1) vs oracle
top-k — for chosen (layer, head) pairs at the focus record.

Monarch points are the ``fh,w`` tilings of ``toolkit.analysis.monarch`` at their effective sparsity
1 − (b1+b2)/(b1·b2); top-k is ``toolkit.analysis.topk``'s renormalised variant (the paper's baseline) at its
sparsity levels. MSE is per map entry (the paper's mean/sum convention is unconfirmed: ``docs/metrics.md``
"What the paper leaves unconfirmed").

Each Monarch point is labelled with its (f, h, w) tiling; the y axis is logarithmic when the plotted positive
MSEs span more than ``LOG_RANGE`` (zero MSEs, e.g. top-k at low sparsity, then fall off the axis); with the
default pairs on a model other than Self-Forcing the title names the head standing in for the paper's L8H7.
Where Monarch's error drops below top-k's at the same number of kept entries for good (``crossing``), a dotted line
marks it; ``NAME.json`` beside the figure lists both errors per tiling.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from toolkit.paper_figures import style
from toolkit.paper_figures.common import PAPER_PAIRS, Context, require_all_queries, require_pair_records, require_stored
from toolkit.paper_figures.results import record_of

from toolkit.analysis.monarch import MonarchOptions
from toolkit.analysis.records import RecordSelection

if TYPE_CHECKING:
    import numpy.typing as npt
    import xarray as xr

NAME = "fig1_mse_vs_sparsity"
TITLE = "map MSE vs sparsity: Monarch (projection, variational T=1) vs oracle top-k"
READS_LAYOUTS = True  # --layout chooses its Monarch layouts (monarch_selection)
BASE = "fh,w"  # the paper's layout
TOPK_VARIANT = "renormalized"
LOG_RANGE = 100.0  # log-scale y when the plotted positive values span more than this factor


def check(ctx: Context) -> None:
    require_stored(ctx.cap, NAME, ("q", "k", "lse"))
    require_all_queries(ctx.cap, NAME)
    require_pair_records(ctx, NAME)


def monarch_selection(ctx: Context) -> dict:
    """Monarch sweep shared with the alignment figure: the pair layers at the focus record, the analysed heads,
    T = 1 (the kernels' and the paper's iteration count), the analysis' default layouts unless chosen:
    ``records`` and ``options`` of `ResultCache.get`."""
    records = RecordSelection(steps=[ctx.step], chunks=[ctx.chunk], layers=ctx.pair_layers(),
                              heads=ctx.settings.heads)
    layouts = tuple(ctx.settings.layouts) if ctx.settings.layouts else None
    return dict(records=records, options=MonarchOptions(layouts=layouts, iters=1))


def data(ctx: Context) -> dict:
    mon = ctx.results.get("monarch", **monarch_selection(ctx))
    topk = ctx.results.get("topk", RecordSelection(steps=[ctx.step], chunks=[ctx.chunk], layers=ctx.pair_layers(),
                                                   heads=sorted({h for _, h in ctx.pairs})), tag="pairs")
    pairs = {}
    for layer, head in ctx.pairs:
        m = record_of(mon, layer=layer, **ctx.focus).sel(head=head)
        t = record_of(topk, layer=layer, **ctx.focus).sel(head=head, variant=TOPK_VARIANT)
        pairs[(layer, head)] = dict(monarch=m, topk=t)
    return dict(pairs=pairs, step=ctx.step, chunk=ctx.chunk, stand_ins=stand_ins(ctx))


def stand_ins(ctx: Context) -> dict:
    """``{(layer, head): paper pair}`` for the default pairs that are analogues of the paper's L0H0 / L8H7 (pairs
    chosen with --pairs, or the paper's own, stand in for nothing)."""
    if ctx.settings.pairs is not None:
        return {}
    return {pair: paper for pair, paper in zip(ctx.pairs, PAPER_PAIRS) if tuple(pair) != paper}


def pair_title(layer: int, head: int, stand_in: tuple[int, int] | None) -> str:
    label = style.head_label(layer, head)
    if stand_in is not None:
        return f"{label} (stands in for the paper's {style.head_label(*stand_in)})"
    return label


def tiling_label(config: str) -> str:
    """A config name without its base: ``fh,w (1,2,1)`` -> ``(1,2,1)``, the (f, h, w) tiling of the point."""
    config = config.strip()
    return config[len(BASE):].strip() if config.startswith(BASE) else config


def needs_log(*arrays: npt.ArrayLike) -> bool:
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    values = values[np.isfinite(values) & (values > 0)]
    return values.size > 1 and values.max() / values.min() > LOG_RANGE


def monarch_curve(m: xr.Dataset, var: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(effective sparsity, value, config names) of the ``BASE`` configs, sorted by sparsity."""
    sel = (m["base"].values == BASE) & (m["effective_sparsity"].values >= 0)
    x = m["effective_sparsity"].values[sel]
    y = m[var].values[sel] if var in m else np.full(x.shape, np.nan)
    names = [str(n) for n in m["config"].values[sel]]
    order = np.argsort(x)
    return x[order], y[order], [names[i] for i in order]


def crossing(m: xr.Dataset) -> dict:
    """Monarch's exact projection against oracle top-k (``TOPK_VARIANT``) keeping as many entries as each ``BASE``
    tiling has parameters (the Monarch analysis' ``topk_map_mse``): per tiling by effective sparsity both map MSEs,
    and ``monarch_lower_from``, the lowest sparsity from which Monarch is lower at every sparser tiling (None when
    top-k is lower at the sparsest one, or the analysis ran without its top-k baseline)."""
    if "topk_map_mse" not in m:
        return dict(tilings=[], monarch_lower_from=None)
    x, y, names = monarch_curve(m, "projection_map_mse")
    t = monarch_curve(m.assign(topk_at_budget=m["topk_map_mse"].sel(variant=TOPK_VARIANT)), "topk_at_budget")[1]
    rows = [dict(tiling=tiling_label(n), sparsity=float(s), monarch_mse=float(a), topk_mse=float(b))
            for n, s, a, b in zip(names, x, y, t)]
    lower_from = None
    for row in reversed(rows):  # from the sparsest tiling down, while Monarch stays lower
        if not row["monarch_mse"] < row["topk_mse"]:
            break
        lower_from = row["sparsity"]
    return dict(tilings=rows, monarch_lower_from=lower_from)


def drawable(x: np.ndarray, y: np.ndarray, log_y: bool) -> tuple[np.ndarray, np.ndarray]:
    """The points an axis can show: finite, and positive on a log axis (top-k's error is 0 at sparsity 0, which a
    log axis would clip into a vertical cliff)."""
    keep = np.isfinite(y) & ((y > 0) if log_y else True)
    return x[keep], y[keep]


@style.use_style
def plot(d: dict, out_dir: str | Path) -> dict:
    pairs = d["pairs"]
    fig, ax = style.subplots(1, len(pairs), width=3.4, height=2.8)
    plotted, crossings = {}, {}
    for a, ((layer, head), r) in zip(ax[0], pairs.items()):
        label = style.head_label(layer, head)
        t = r["topk"]
        xs, ys = t["sparsity"].values, t["map_mse"].values
        m = r["monarch"]
        x, y, names = monarch_curve(m, "projection_map_mse")
        tilings = [tiling_label(n) for n in names]
        series = [ys, y]
        var = m["variational_map_mse"].sel(iters=1) if "variational_map_mse" in m else None
        yv = monarch_curve(m.assign(variational_t1=var), "variational_t1")[1] if var is not None else None
        if yv is not None:
            series.append(yv)
        log_y = needs_log(*series)
        drawn = functools.partial(drawable, log_y=log_y)

        topk_points, monarch_points = drawn(xs, ys), drawn(x, y)
        a.plot(*topk_points, marker="o", ms=3, color=style.COLORS["topk"], label="oracle top-k (renormalised)")
        plotted[f"{label}/topk_sparsity"], plotted[f"{label}/topk_mse"] = xs, ys
        a.plot(*monarch_points, marker="s", ms=4, color=style.COLORS["monarch"],
               label="Monarch, exact projection\n(top axis: its f,h,w tiling)")
        plotted[f"{label}/monarch_sparsity"], plotted[f"{label}/projection_mse"] = x, y
        plotted[f"{label}/monarch_tiling"] = tilings
        if yv is not None:
            a.plot(*drawn(x, yv), marker="^", ms=4, ls="--", color=style.COLORS["variational"],
                   label="MonarchAttention, T = 1")
            plotted[f"{label}/variational_mse"] = yv
        cross = crossings[label] = plotted[f"{label}/crossing"] = crossing(m)
        at = cross["monarch_lower_from"]
        if at is not None:  # the paper's contrast: from here on Monarch wins at equal budget
            a.axvline(at, color=style.COLORS["monarch"], lw=0.8, ls=":", zorder=0)
            right = at > 0.85  # the label on the side of the line with room for it
            a.text(at, 0.02, "Monarch below top-k \nat equal budget from here " if right
                   else " Monarch below top-k\n at equal budget from here", transform=a.get_xaxis_transform(),
                   fontsize=6, color=style.COLORS["monarch"], va="bottom", ha="right" if right else "left")
        if log_y:
            a.set_yscale("log")
        else:
            a.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        plotted[f"{label}/yscale"] = a.get_yscale()
        shown = np.concatenate([topk_points[0], monarch_points[0]])
        if shown.size:  # the sparsities that have points, not an empty half of the axis
            a.set_xlim(max(0.0, shown.min() - 0.04), min(1.0, shown.max() + 0.02) + 0.01)
        # each Monarch point's (f, h, w) tiling on a top axis: neighbours 1.6 points of sparsity apart stay legible
        top = a.secondary_xaxis("top")
        top.set_xticks(x, tilings, rotation=90, fontsize=6, color=style.COLORS["monarch"])
        top.tick_params(length=2, color=style.COLORS["monarch"])
        title = (f"{pair_title(layer, head, d.get('stand_ins', {}).get((layer, head)))}\n"
                 f"step {d['step']}, chunk {d['chunk']}")
        a.set(xlabel="sparsity (top-k: keys dropped; Monarch: 1 − (b1+b2)/(b1·b2))",
              ylabel="map MSE per entry" + (" (log)" if log_y else ""), title=title)
        plotted[f"{label}/title"] = title
        a.xaxis.label.set_fontsize(7)
        a.title.set_fontsize(8)
    ax[0][0].legend(fontsize=7)
    style.save(fig, out_dir, NAME)
    # the crossing as numbers, for a README or a paper's text
    table = {"step": d["step"], "chunk": d["chunk"], "topk_variant": TOPK_VARIANT, "metric": "map MSE per entry",
             "pairs": crossings}
    (Path(out_dir) / f"{NAME}.json").write_text(json.dumps(table, indent=1) + "\n")
    return plotted
