"""Quality vs density per family: PSNR and SSIM of each ``--attention`` spec against dense (``toolkit compare``).

    from toolkit.paper_figures import quality
    quality.plot(ds, "out/compare")          # ds from toolkit.analysis.quality.compare_attention -> quality.png/.pdf

x is the spec's density (fraction of the dense attention entries it keeps) when every spec's family reports one,
else the specs on a categorical axis; y: mean PSNR over the frames that differ from dense and mean SSIM, with
whiskers from the lowest to the highest per-video mean. Specs identical to dense (PSNR inf) are listed, not drawn,
on the PSNR panel. Needs a dataset with pixel metrics.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
from toolkit.paper_figures import style

from toolkit.analysis.quality import REFERENCE, mean_psnr

NAME = "quality"
LABELLED_SPECS = 6  # above this many specs, points are not named (the legend names families)
TITLE = "quality vs density per family"


def points(ds: xr.Dataset) -> list[dict]:
    """Per spec (reference left out): family, density, label and PSNR / SSIM mean, lowest and highest video mean."""
    out = []
    for label in ds["spec"].values.tolist():
        if label == REFERENCE:
            continue
        d = ds.sel(spec=label)
        psnr_v = [mean_psnr(d["psnr"].sel(prompt=p, seed=s).values) for p in d["prompt"].values
                  for s in d["seed"].values]
        ssim_v = d["ssim"].mean("frame").values.ravel()
        finite = [v for v in psnr_v if math.isfinite(v)]
        out.append(dict(
            spec=label, family=str(d["family"].values), density=float(d["density"]),
            psnr=mean_psnr(d["psnr"].values), psnr_lo=min(finite, default=math.inf),
            psnr_hi=max(finite, default=math.inf),
            ssim=float(ssim_v.mean()), ssim_lo=float(ssim_v.min()), ssim_hi=float(ssim_v.max()),
        ))
    return out


@style.use_style
def plot(ds: xr.Dataset, out_dir: str | Path, name: str = NAME) -> dict:
    """Write ``name.png`` / ``name.pdf``; returns the plotted points (and the files) for tests."""
    if "psnr" not in ds:
        raise ValueError("the dataset has latent metrics only: no PSNR / SSIM to plot")
    pts = points(ds)
    numeric = bool(pts) and all(math.isfinite(p["density"]) for p in pts)
    families = list(dict.fromkeys(p["family"] for p in pts))
    colours = {f: style.family_style(f)[0] for f in families}
    if not numeric:
        xs = {p["spec"]: i for i, p in enumerate(pts)}
    fig, axes = style.subplots(1, 2, width=3.9, height=3.0)
    identical = [p["spec"] for p in pts if math.isinf(p["psnr"])]
    # many specs: per-point names would overlap, so the legend names families and table.txt the specs; families
    # are nudged apart along x (a few % on the log axis) so that whiskers at the same density stay visible
    named = len(pts) <= LABELLED_SPECS
    nudge = {f: 1.0 + 0.025 * (i - (len(families) - 1) / 2) for i, f in enumerate(families)}
    for ax, key, ylabel in ((axes[0, 0], "psnr", "PSNR vs dense (dB)"), (axes[0, 1], "ssim", "SSIM vs dense")):
        for fam in families:
            sel = [p for p in pts if p["family"] == fam and math.isfinite(p[key])]
            if numeric:
                sel.sort(key=lambda p: p["density"])
            if not sel:
                continue
            x = np.array([p["density"] * (nudge[fam] if not named else 1.0) if numeric else xs[p["spec"]]
                          for p in sel], dtype=float)
            y = np.array([p[key] for p in sel])
            err = np.array([[p[key] - p[f"{key}_lo"] for p in sel], [p[f"{key}_hi"] - p[key] for p in sel]])
            ax.errorbar(x, y, yerr=np.clip(err, 0, None), color=colours[fam], marker="o", ms=4, capsize=2,
                        lw=1.2 if numeric else 0, elinewidth=0.8, label=style.family_style(fam)[1])
            if numeric and named:  # labels on the PSNR panel; on the SSIM panel only for specs it lacks
                for i, (p, xi, yi) in enumerate(zip(sel, x, y)):
                    if key == "psnr" or p["spec"] in identical:
                        ax.annotate(p["spec"], (xi, yi), textcoords="offset points", xytext=(5, 4 - 12 * (i % 2)),
                                    fontsize=6.5, color=colours[fam], ha="right" if xi > 0.9 else "left")
        ax.set_ylabel(ylabel)
        if numeric:
            ax.set_xlabel("density (Monarch: its parameter fraction)")
            lo, hi = min(p["density"] for p in pts), max(p["density"] for p in pts)
            if lo < 0.2:  # densities spanning a decade or more (Monarch on real grids: 0.05-0.1): log axis
                ax.set_xscale("log")
                ax.set_xlim(lo / 1.5, min(1.6, hi * 1.5))
                ax.xaxis.set_major_locator(FixedLocator([0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            else:
                ax.set_xlim(max(0.0, lo - 0.08), 1.05)
        else:
            ticks = [p["spec"] + (f"\n{p['density']:.3g}" if math.isfinite(p["density"]) else "") for p in pts]
            ax.set_xticks(range(len(pts)), ticks, rotation=30, ha="right", fontsize=7)
            missing = ", ".join(p["spec"] for p in pts if not math.isfinite(p["density"]))
            ax.set_xlabel(f"spec (density below it; none reported for {missing})", fontsize=8)
        if key == "ssim":
            ax.ticklabel_format(axis="y", useOffset=False)
    if identical:
        axes[0, 0].set_title("not drawn, identical to dense (∞ dB): " + ", ".join(identical), fontsize=7)
    if families:  # beside the panels: with many specs, inside it would cover points
        axes[0, 1].legend(title="family", loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7)
    clips = f"{ds.sizes['prompt']} prompt(s) × {ds.sizes['seed']} seed(s)"
    nudged = "; families drawn a few % apart along x" if numeric and not named else ""
    fig.suptitle(f"{ds.attrs.get('model', '')}: {TITLE} (mean over {clips}; whiskers: min–max per video{nudged})",
                 fontsize=9)
    paths = style.save(fig, out_dir, name)
    return {"points": pts, "numeric": numeric, "files": [str(p) for p in paths]}
