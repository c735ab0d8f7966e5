"""Coverage: how many keys a query needs for 95 % of its attention mass, per head, across layers and steps —
the paper's "48–84 % of tokens" statistic (reported by a secondary source; ``docs/metrics.md`` "Coverage").

(a) per head (grouped by layer) the distribution over every stored query of every selected step and chunk of
``coverage_fraction`` at mass p (``toolkit.analysis.topk``): box = quartiles, whiskers = 5–95 %, shades
alternating by layer; (b) its median as a layer × head map; (c) per layer and step the median over every query of
every head, pooled (the clean pass named "clean").
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from toolkit.paper_figures import style
from toolkit.paper_figures.common import Context, require_stored

from toolkit.analysis.records import RecordSelection
from toolkit.analysis.topk import COVERAGE_MASSES, TopkOptions

if TYPE_CHECKING:
    import xarray as xr

NAME = "coverage"
TITLE = "fraction of keys for 95 % of the attention mass, per head, across layers and steps"
PAPER_RANGE = (0.48, 0.84)  # secondary report, heads/steps unknown (docs/metrics.md "Coverage")


def check(ctx: Context) -> None:
    require_stored(ctx.cap, NAME, ("q", "k", "lse"))


def coverage_selection(ctx: Context) -> dict:
    """``records`` and ``options`` of the top-k analysis this figure plots (`ResultCache.get` arguments)."""
    s = ctx.settings
    return dict(records=RecordSelection(steps=s.steps, chunks=s.chunks, layers=s.layers, heads=s.heads),
                options=TopkOptions(masses=tuple(sorted(set(COVERAGE_MASSES) | {s.mass}))))


def data(ctx: Context) -> dict:
    tk = ctx.results.get("topk", **coverage_selection(ctx))
    return dict(topk=tk, mass=ctx.settings.mass)


def pooled(tk: xr.Dataset, mass: float, *, layer: int, head: int, step: int | None = None) -> np.ndarray:
    """All finite coverage fractions of ``head`` in the records of ``layer`` (and ``step``): the values one box
    of panel (a) summarises."""
    sel = tk["layer"].values == layer
    if step is not None:
        sel &= tk["step"].values == step
    cf = tk["coverage_fraction"].sel(mass=mass, head=head).isel(record=np.nonzero(sel)[0]).values
    return cf[np.isfinite(cf)]


def step_names(tk: xr.Dataset, steps: list[int]) -> str:
    """``"0, 1, 2, 3, clean"``: the steps' numbers, with the clean pass (KV-cache refresh) named."""
    clean = {int(s) for s, c in zip(tk["step"].values, tk["is_clean"].values) if c} if "is_clean" in tk else set()
    return ", ".join("clean" if s in clean else str(s) for s in steps)


@style.use_style
def plot(d: dict, out_dir: str | Path) -> dict:
    tk, mass = d["topk"], d["mass"]
    layers = sorted({int(x) for x in tk["layer"].values})
    heads = [int(h) for h in tk["head"].values]
    steps = sorted({int(x) for x in tk["step"].values})
    fig = matplotlib.pyplot.figure(figsize=(min(24.0, max(6.5, 0.16 * len(layers) * len(heads) + 1.5)), 5.6),
                                   constrained_layout=True)
    grid = fig.add_gridspec(2, 2)
    a, b, c = fig.add_subplot(grid[0, :]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    values, positions, colors = [], [], []
    median = np.full((len(layers), len(heads)), np.nan)
    for li, layer in enumerate(layers):
        for hi, head in enumerate(heads):
            v = pooled(tk, mass, layer=layer, head=head)
            values.append(v if v.size else np.array([np.nan]))
            positions.append(li * (len(heads) + 1) + hi)
            colors.append(style.CYCLE[li % 2 * 5])  # alternate blue / sky blue by layer
            median[li, hi] = np.median(v) if v.size else np.nan
    box = a.boxplot(values, positions=positions, widths=0.7, whis=(5, 95), showfliers=False, patch_artist=True,
                    medianprops={"color": style.OKABE_ITO["black"]})
    for patch, color in zip(box["boxes"], colors):
        patch.set(facecolor=color, alpha=0.6)
    a.axhspan(*PAPER_RANGE, color=style.COLORS["topk"], alpha=0.12, lw=0)  # named in the title, not over the boxes
    centres = [li * (len(heads) + 1) + (len(heads) - 1) / 2 for li in range(len(layers))]
    a.set_xticks(centres, [f"L{layer}" for layer in layers])
    a.set(ylim=(0, 1), xlabel="layer (one box per head, heads left to right; shades alternate by layer)",
          ylabel=f"fraction of keys for {mass:.0%} mass",
          title=f"(a) coverage per head, every query of steps {step_names(tk, steps)}: "
                "box = quartiles, whiskers = 5–95 %\n"
                f"shaded band: {PAPER_RANGE[0]:.0%}–{PAPER_RANGE[1]:.0%}, reported for some Self-Forcing heads")
    im = b.imshow(median, cmap=style.SEQUENTIAL, aspect="auto", origin="lower")  # colour range = data range
    b.set(xlabel="head", ylabel="layer", xticks=range(len(heads)), xticklabels=heads, yticks=range(len(layers)),
          yticklabels=layers, title="(b) median coverage")
    b.grid(False)
    fig.colorbar(im, ax=b, shrink=0.8, label="fraction of keys")
    per_step = np.full((len(layers), len(steps)), np.nan)
    cmap = matplotlib.colormaps[style.SEQUENTIAL]
    for li, layer in enumerate(layers):
        for si, step in enumerate(steps):
            v = np.concatenate([pooled(tk, mass, layer=layer, head=h, step=step) for h in heads])
            per_step[li, si] = np.median(v) if v.size else np.nan
        c.plot(steps, per_step[li], marker="o", ms=3, color=cmap(li / max(1, len(layers) - 1)), label=f"L{layer}")
    c.set(xlabel="step", ylabel="median fraction of keys", title="(c) per layer: median over its heads' queries")
    c.set_xticks(steps, step_names(tk, steps).split(", "))
    if len(layers) <= 10:
        c.legend(fontsize=6, ncol=2)
    else:  # too many lines for a legend: a layer colour bar
        sm = matplotlib.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(layers[0], layers[-1]))
        fig.colorbar(sm, ax=c, shrink=0.8, label="layer")
    style.save(fig, out_dir, NAME)
    return {"median": median, "per_step": per_step, "layers": np.array(layers), "heads": np.array(heads),
            "steps": np.array(steps)}
