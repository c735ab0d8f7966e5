"""Beyond the paper: power spectra of attention rows along the raster key axis, and periodicity scores.

Left: the mean power spectrum (``toolkit.analysis.periodic`` ``power``) of the chosen heads on log axes, with the
frame period (h·w tokens) and its first harmonics and the row period (w tokens) and all its harmonics marked.
Right: the analysis' ``frame_periodicity`` and ``row_periodicity`` (power share at those harmonics relative to a
flat spectrum; 1 = no periodicity) for every layer × head at the focus record.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from toolkit.paper_figures import style
from toolkit.paper_figures.common import Context, require_pair_records, require_stored
from toolkit.paper_figures.fig2_structure import periodic_selection
from toolkit.paper_figures.results import layer_head_table, record_of

NAME = "spectra"
TITLE = "attention-row power spectra and periodicity scores"


def check(ctx: Context) -> None:
    require_stored(ctx.cap, NAME, ("q", "k", "lse"))
    require_pair_records(ctx, NAME)


def data(ctx: Context) -> dict:
    per = ctx.results.get("periodic", **periodic_selection(ctx))
    power = {pair: record_of(per, layer=pair[0], **ctx.focus)["power"].sel(head=pair[1]) for pair in ctx.pairs}
    scores = {v: layer_head_table(per, v, **ctx.focus) for v in ("frame_periodicity", "row_periodicity")}
    return dict(power=power, scores=scores, grid=tuple(ctx.cap.grid), step=ctx.step, chunk=ctx.chunk)


@style.use_style
def plot(d: dict, out_dir: str | Path) -> dict:
    _, height, width = d["grid"]
    fig, ax = style.subplots(1, 3, width=3.3, height=2.7)
    a = ax[0][0]
    plotted = {}
    for (layer, head), pw in d["power"].items():
        valid = np.isfinite(pw.values)
        freq, p = pw["freq"].values[valid][1:], pw.values[valid][1:]  # drop DC (the row sum, always 1)
        a.loglog(freq, p, lw=0.9, label=style.head_label(layer, head))
        plotted[f"{style.head_label(layer, head)}/power"] = p
    # log frequency: the frame period (1 / h·w) sits two decades below the row harmonics; every harmonic marked
    for period, harmonics, color, name in (
            (height * width, 3, style.OKABE_ITO["vermillion"], "frame period h·w and 2 harmonics"),
            (width, width // 2, style.OKABE_ITO["bluish_green"], "row period w and its harmonics")):
        for m in range(1, harmonics + 1):
            a.axvline(m / period, color=color, lw=0.6, ls="--", alpha=0.8, label=name if m == 1 else None)
    a.set(xlabel="frequency along the key axis (cycles / token, log)", ylabel="mean power |FFT(row)|²",
          title=f"(a) row spectra, step {d['step']}, chunk {d['chunk']}")
    lowest = min((float(np.nanmin(v)) for k, v in plotted.items() if k.endswith("/power") and v.size), default=None)
    if lowest is not None and lowest > 0:
        a.set_ylim(bottom=lowest / 100)  # two empty decades below the spectra hold the legend
    a.legend(fontsize=6, loc="lower left")
    for a, (var, table) in zip(ax[0][1:], d["scores"].items()):
        im = a.imshow(table.values, cmap=style.SEQUENTIAL, aspect="auto",
                      origin="lower")
        a.set(xlabel="head", ylabel="layer", xticks=range(table.sizes["head"]), yticks=range(table.sizes["layer"]),
              xticklabels=table["head"].values, yticklabels=table["layer"].values,
              title=f"({'b' if var.startswith('frame') else 'c'}) {var.replace('_', ' ')}")
        a.grid(False)
        fig.colorbar(im, ax=a, shrink=0.8, label="harmonics' power ÷ flat spectrum's")
        plotted[var] = table.values
    style.save(fig, out_dir, NAME)
    return plotted
