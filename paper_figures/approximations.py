"""Error vs density, one curve per approximation family (``toolkit analyze approximations``): the Fig. 1 analogue
generalised to every family.

    from toolkit.analysis import open_results
    from toolkit.paper_figures import approximations
    approximations.plot(open_results("approx.nc"), "out", heads=[(1, 2)])   # -> approximations.png/.pdf

Left: the summary, the mean over every analysed (record, head); then one panel per selected (layer, head), the mean
over its records. y: ``metric`` (default the output
relative L2, log scale), x: the measured density (log scale).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
from toolkit.paper_figures import style

NAME = "approximations"
LABELS = {"output_rel_l2": "output rel. L2  |(A − Â)V| / |AV|", "map_rel_fro": "map rel. Frobenius  |A − Â| / |A|",
          "map_mse": "map MSE per entry"}


def _curve(ds: xr.Dataset, family: str, metric: str, dims: tuple[str, ...]):
    d = ds.sel(family=family)
    x = d["density"].mean(dims).values
    y = d[metric].mean(dims).values
    order = np.argsort(x)
    return x[order], y[order]


@style.use_style
def plot(ds: xr.Dataset, out_dir: str | Path, heads: list[tuple[int, int]] | None = None,
         metric: str = "output_rel_l2", name: str = NAME) -> dict:
    """Write ``name.png`` / ``name.pdf`` (``heads``: (layer, head) panels besides the summary; default none)."""
    if "record" not in ds.dims:
        ds = ds.expand_dims("record")
    heads = heads or []
    families = [str(f) for f in ds["family"].values]
    fig, axes = style.subplots(1, 1 + len(heads), width=4.0, height=3.2, sharey=True)  # one error scale
    panels = [("every record and head", ds, ("record", "head"))]
    for layer, head in heads:
        sel = ds.isel(record=np.flatnonzero(ds["layer"].values == layer)).sel(head=head)
        panels.append((style.head_label(layer, head), sel.expand_dims("head"), ("record", "head")))
    drawn = {}
    for ax, (title, part, dims) in zip(axes[0], panels):
        for fam in families:
            x, y = _curve(part, fam, metric, dims)
            colour, label = style.family_style(fam)
            style_kw = dict(ls="--" if fam == "monarch" else "-", marker="s" if fam.startswith("monarch") else "o")
            ax.plot(x, y, color=colour, ms=3.5, lw=1.3, label=label, **style_kw)
            drawn[(title, fam)] = dict(density=x.tolist(), value=y.tolist())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("density (Monarch: parameter fraction)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].set_ylabel(LABELS.get(metric, metric))
    fig.legend(*axes[0, 0].get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    steps = sorted({int(s) for s in np.atleast_1d(ds["step"].values)}) if "step" in ds else []
    where = f", step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))}" if steps else ""
    n = ds.sizes["record"]
    fig.suptitle(f"approximation families vs the exact attention: first panel the mean over {n} record"
                 f"{'s' if n > 1 else ''} × {ds.sizes['head']} heads{where}; the others one head each", fontsize=9)
    paths = style.save(fig, out_dir, name)
    return {"curves": drawn, "files": [str(p) for p in paths]}
