"""Beyond the paper: (Δt, Δh, Δw) offset profiles as heat maps, for the chosen (layer, head) pairs.

The profile (``toolkit.analysis.periodic``: mean attention weight over all query/key pairs at a key − query
offset) is a 3-D array; each row of panels shows its three central slices — (Δh, Δw) within the query's frame
(Δt = 0), (Δt, Δw) on the query's row (Δh = 0) and (Δt, Δh) on its column (Δw = 0). Log colour scale; blank
where no pair has the offset, and the y axis cut to the offsets some pair has.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from toolkit.paper_figures import style
from toolkit.paper_figures.common import Context, require_pair_records, require_stored
from toolkit.paper_figures.fig2_structure import periodic_selection
from toolkit.paper_figures.results import record_of

NAME = "offset_profiles"
TITLE = "(Δt, Δh, Δw) offset-profile heat maps"
SLICES = (("dh", "dw", "dt"), ("dt", "dw", "dh"), ("dt", "dh", "dw"))  # (y axis, x axis, fixed at 0)
AXIS_LABEL = {"dt": "frame offset Δt", "dh": "row offset Δh", "dw": "column offset Δw"}


def check(ctx: Context) -> None:
    require_stored(ctx.cap, NAME, ("q", "k", "lse"))
    require_pair_records(ctx, NAME)


def data(ctx: Context) -> dict:
    per = ctx.results.get("periodic", **periodic_selection(ctx))
    profiles = {pair: record_of(per, layer=pair[0], **ctx.focus)["profile"].sel(head=pair[1]) for pair in ctx.pairs}
    return dict(profiles=profiles, step=ctx.step, chunk=ctx.chunk)


@style.use_style
def plot(d: dict, out_dir: str | Path) -> dict:
    profiles = d["profiles"]
    fig, ax = style.subplots(len(profiles), 3, width=3.0, height=2.5)
    plotted = {}
    for row, ((layer, head), prof) in enumerate(profiles.items()):
        norm = style.log_norm(prof.values)
        for col, (ydim, xdim, fixed) in enumerate(SLICES):
            sl = prof.sel({fixed: 0}).transpose(ydim, xdim)
            a = ax[row][col]
            im = a.pcolormesh(sl[xdim].values, sl[ydim].values, np.ma.masked_invalid(sl.values), norm=norm,
                              cmap=style.SEQUENTIAL, shading="nearest")
            a.set(xlabel=AXIS_LABEL[xdim], ylabel=AXIS_LABEL[ydim],
                  title=f"{style.head_label(layer, head)}: {AXIS_LABEL[fixed].split()[-1]} = 0")
            a.grid(False)
            rows = sl[ydim].values[np.isfinite(sl.values).any(axis=1)]
            if rows.size:  # offsets no pair has (Δt past the chunk in a causal run) would be a blank band
                a.set_ylim(rows.min() - 0.5, rows.max() + 0.5)
            plotted[f"{style.head_label(layer, head)}/{ydim}_{xdim}"] = sl.values
        fig.colorbar(im, ax=ax[row][-1], shrink=0.8, label="mean attention weight")
    fig.suptitle(f"offset profiles, step {d['step']}, chunk {d['chunk']}")
    style.save(fig, out_dir, NAME)
    return plotted
