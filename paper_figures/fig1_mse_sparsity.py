"""Fig. 1 analogue: attention-map MSE vs sparsity — Monarch (exact projection and variational T = 1) vs oracle
top-k — for chosen (layer, head) pairs at the focus record.

Monarch points are the ``fh,w`` tilings of ``toolkit.analysis.monarch`` at their effective sparsity
1 − (b1+b2)/(b1·b2); top-k is ``toolkit.analysis.topk``'s renormalised variant (the paper's baseline) at its
sparsity levels. MSE is per map entry (the paper's mean/sum convention is unconfirmed: ``docs/metrics.md``
"What the paper leaves unconfirmed").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from toolkit.paper_figures import style
from toolkit.paper_figures.common import Context, require_all_queries, require_pair_records, require_stored
from toolkit.paper_figures.results import record_of

from toolkit.analysis.monarch import MonarchOptions
from toolkit.analysis.records import RecordSelection

NAME = "fig1_mse_vs_sparsity"
TITLE = "map MSE vs sparsity: Monarch (projection, variational T=1) vs oracle top-k"
BASE = "fh,w"  # the paper's layout
TOPK_VARIANT = "renormalized"


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
    return dict(pairs=pairs, step=ctx.step, chunk=ctx.chunk)


def monarch_curve(m, var: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(effective sparsity, value, config names) of the ``BASE`` configs, sorted by sparsity."""
    sel = (m["base"].values == BASE) & (m["effective_sparsity"].values >= 0)
    x = m["effective_sparsity"].values[sel]
    y = m[var].values[sel] if var in m else np.full(x.shape, np.nan)
    names = [str(n) for n in m["config"].values[sel]]
    order = np.argsort(x)
    return x[order], y[order], [names[i] for i in order]


@style.use_style
def plot(d: dict, out_dir: str | Path) -> dict:
    pairs = d["pairs"]
    fig, ax = style.subplots(1, len(pairs), width=3.4, height=2.8)
    plotted = {}
    for a, ((layer, head), r) in zip(ax[0], pairs.items()):
        label = style.head_label(layer, head)
        t = r["topk"]
        xs, ys = t["sparsity"].values, t["map_mse"].values
        a.plot(xs, ys, marker="o", ms=3, color=style.COLORS["topk"], label="oracle top-k (renormalised)")
        plotted[f"{label}/topk_sparsity"], plotted[f"{label}/topk_mse"] = xs, ys
        m = r["monarch"]
        x, y, _ = monarch_curve(m, "projection_map_mse")
        a.plot(x, y, marker="s", ms=4, color=style.COLORS["monarch"], label="Monarch, exact projection")
        plotted[f"{label}/monarch_sparsity"], plotted[f"{label}/projection_mse"] = x, y
        var = m["variational_map_mse"].sel(iters=1) if "variational_map_mse" in m else None
        if var is not None:
            x, y, _ = monarch_curve(m.assign(variational_t1=var), "variational_t1")
            a.plot(x, y, marker="^", ms=4, ls="--", color=style.COLORS["variational"],
                   label="MonarchAttention, T = 1")
            plotted[f"{label}/variational_mse"] = y
        a.set(xlabel="sparsity (top-k: keys dropped; Monarch: 1 − (b1+b2)/(b1·b2))", ylabel="map MSE per entry",
              title=f"{label}, step {d['step']}, chunk {d['chunk']}")
        a.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        a.xaxis.label.set_fontsize(7)
    ax[0][0].legend(fontsize=7)
    style.save(fig, out_dir, NAME)
    return plotted
