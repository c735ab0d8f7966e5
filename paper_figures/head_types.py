"""Beyond the paper: a layer × head map of head types at the focus record.

Types and thresholds are the periodic analysis' (``toolkit.analysis.periodic``: temporal if the mean mass on the
query's own (row, col) in other frames ≥ ``temporal_threshold``, else spatial if the mean mass inside the query's
frame ≥ ``spatial_threshold``, else global). Left: the map, each cell coloured by its spatial mass and lettered with
its type and both masses. Right: every head's two mean masses with the thresholds drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from toolkit.paper_figures import style
from toolkit.paper_figures.common import Context, require_stored
from toolkit.paper_figures.fig2_structure import periodic_selection
from toolkit.paper_figures.results import layer_head_table

NAME = "head_types"
TITLE = "layer × head map of head types"


def check(ctx: Context) -> None:
    require_stored(ctx.cap, NAME, ("q", "k", "lse"))


def data(ctx: Context) -> dict:
    per = ctx.results.get("periodic", **periodic_selection(ctx))
    tables = {v: layer_head_table(per, v, **ctx.focus) for v in ("head_type", "spatial_mass", "temporal_mass")}
    types = tuple(per["head_type"].attrs.get("flag_meanings", "spatial temporal global").split())
    return dict(tables=tables, types=types, spatial_threshold=per.attrs.get("spatial_threshold"),
                temporal_threshold=per.attrs.get("temporal_threshold"), step=ctx.step, chunk=ctx.chunk)


@style.use_style
def plot(d: dict, out_dir: str | Path) -> dict:
    t = d["tables"]
    types = list(d["types"])
    kind = t["head_type"].astype(str).values
    code = np.vectorize(types.index)(kind)
    # mean over the record's stored queries (NaN = padding where chunks hold fewer queries)
    spatial = t["spatial_mass"].mean("query", skipna=True).values
    temporal = t["temporal_mass"].mean("query", skipna=True).values
    colors = [style.HEAD_TYPE_COLORS.get(x, style.OKABE_ITO["black"]) for x in types]
    fig, ax = style.subplots(1, 2, width=3.6, height=3.0)
    a, b = ax[0]
    # (a) the spatial mass as the colour, each cell lettered with its type and both masses: when every head has
    # one type, a map of types alone would be a single flat colour
    im = a.imshow(spatial, cmap=style.SEQUENTIAL, vmin=0, vmax=1, aspect="auto", origin="lower")
    fig.colorbar(im, ax=a, shrink=0.85, label="mean mass in the query's frame")
    for (layer, head), name in np.ndenumerate(kind):
        a.text(head, layer, f"{name[0].upper()}\n{spatial[layer, head]:.2f} / {temporal[layer, head]:.2f}",
               ha="center", va="center", fontsize=5.5, color="white" if spatial[layer, head] < 0.6 else "black")
    heads, layers = t["head_type"]["head"].values, t["head_type"]["layer"].values
    a.set(xlabel="head", ylabel="layer", xticks=range(len(heads)), xticklabels=heads, yticks=range(len(layers)),
          yticklabels=layers,
          title=f"(a) head types, step {d['step']}, chunk {d['chunk']}\n"
                f"{', '.join(f'{n[0].upper()} {n}' for n in types)}; spatial / temporal mass")
    a.grid(False)
    for i, name in enumerate(types):
        sel = code == i
        b.scatter(spatial[sel], temporal[sel], s=16, color=colors[i], label=name)
    if d["spatial_threshold"] is not None:
        b.axvline(d["spatial_threshold"], color=style.COLORS["reference"], lw=0.7, ls="--",
                  label=f"spatial threshold {d['spatial_threshold']:g}")
    if d["temporal_threshold"] is not None:
        b.axhline(d["temporal_threshold"], color=style.COLORS["reference"], lw=0.7, ls=":",
                  label=f"temporal threshold {d['temporal_threshold']:g}")
    b.legend(loc="upper right", fontsize=7)
    b.set(xlabel="mean mass in the query's frame", ylabel="mean mass at its (row, col), other frames",
          xlim=(0, 1), ylim=(0, max(1e-3, float(np.nanmax(temporal)) * 1.1, (d["temporal_threshold"] or 0) * 1.2)),
          title="(b) spatial vs temporal mass per head")
    style.save(fig, out_dir, NAME)
    return {"head_type": kind, "spatial_mass": spatial, "temporal_mass": temporal}
