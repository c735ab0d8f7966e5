"""One look for every figure: Okabe–Ito colours (colour-blind safe), viridis/cividis maps, labelled axes, PNG + PDF.

    from toolkit.paper_figures import style
    fig, ax = style.subplots(1, 2)
    ax[0].plot(x, y, color=style.COLORS["monarch"])
    style.save(fig, out_dir, "fig1_mse_vs_sparsity")   # -> fig1_mse_vs_sparsity.png and .pdf

Colours have fixed meanings across figures (``COLORS``), so "Monarch" is the same blue everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from typing import ParamSpec, TypeVar

    import numpy as np
    import numpy.typing as npt
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    _P = ParamSpec("_P")
    _R = TypeVar("_R")

# Okabe & Ito (2008), "Color Universal Design".
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}
CYCLE = [OKABE_ITO[c] for c in ("blue", "orange", "bluish_green", "vermillion", "reddish_purple", "sky_blue",
                                "yellow", "black")]
# Meaning -> colour, shared by all figures (the paper's Fig. 1 draws Monarch blue and top-k orange).
COLORS = {
    "monarch": OKABE_ITO["blue"],  # exact projection onto Monarch
    "variational": OKABE_ITO["sky_blue"],  # MonarchAttention, T iterations
    "topk": OKABE_ITO["orange"],  # oracle top-k
    "misaligned": OKABE_ITO["vermillion"],
    "tiled": OKABE_ITO["bluish_green"],
    "spike": OKABE_ITO["vermillion"],
    "reference": OKABE_ITO["black"],
}
# Approximation family (``toolkit/attention/families.py``, the part of a spec before its first ":") -> colour and
# legend label, for every figure that compares families (approximations, quality): one family, one colour.
FAMILIES = {
    "dense": (OKABE_ITO["black"], "dense"),
    "topk": (COLORS["topk"], "oracle top-k"),
    "monarch": (COLORS["variational"], "MonarchAttention, T = 1"),
    "monarch-projection": (COLORS["monarch"], "Monarch, exact projection"),
    "blocktopk": (OKABE_ITO["vermillion"], "oracle block top-k"),
    "blocktopk-pred": (OKABE_ITO["reddish_purple"], "predicted block top-k"),
    "sta": (OKABE_ITO["bluish_green"], "sliding tile attention"),
    "radial": ("#B8A200", "radial"),  # Okabe-Ito yellow, darkened to show on white
    "svg": ("#7F7F7F", "Sparse VideoGen"),
}


def family_style(family: str) -> tuple[str, str]:
    """(colour, label) of an approximation family or spec (``blocktopk:1,4,4`` -> oracle block top-k, 1,4,4): the
    README's names, so a legend reads as its tables do."""
    name, _, params = family.partition(":")
    colour, label = FAMILIES.get(name, ("#444444", name))
    return colour, f"{label}, {params}" if params else label


SEQUENTIAL = "viridis"  # magnitudes (attention mass, power)
SEQUENTIAL_ALT = "cividis"  # a second sequential map where two magnitudes sit side by side
HEAD_TYPE_COLORS = {"spatial": OKABE_ITO["blue"], "temporal": OKABE_ITO["orange"], "global": OKABE_ITO["bluish_green"],
                    "dense": OKABE_ITO["bluish_green"], "mixed": OKABE_ITO["reddish_purple"],
                    "other": OKABE_ITO["sky_blue"]}
FORMATS = ("png", "pdf")

RC = {
    "figure.dpi": 100,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.prop_cycle": matplotlib.cycler(color=CYCLE),
    "image.cmap": SEQUENTIAL,
    "pdf.fonttype": 42,  # embed TrueType: text stays editable in Illustrator/Inkscape
    "ps.fonttype": 42,
}


@contextmanager
def styled() -> Iterator[None]:
    """Apply the toolkit style inside a ``with`` block (leaves the caller's rcParams alone)."""
    with plt.rc_context(RC):
        yield


def use_style(plot: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorator: run a figure's ``plot`` function inside the toolkit style (rcParams apply when artists are made)."""

    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with styled():
            return plot(*args, **kwargs)

    return wrapper


def subplots(
    nrows: int = 1, ncols: int = 1, *, width: float = 3.2, height: float = 2.6, **kw: Any
) -> tuple[Figure, np.ndarray]:
    """``plt.subplots`` in the toolkit style; ``width``/``height`` are per panel, in inches."""
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                        constrained_layout=True, **kw)


def save(fig: Figure, out_dir: str | Path, name: str, *, close: bool = True) -> list[Path]:
    """Write ``name.png`` and ``name.pdf`` into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with styled():
        for ext in FORMATS:
            path = out_dir / f"{name}.{ext}"
            fig.savefig(path, metadata={"Creator": "toolkit figures"} if ext == "pdf" else None)
            paths.append(path)
    if close:
        plt.close(fig)
    return paths


def log_norm(values: npt.ArrayLike, dynamic_range: float = 1e4) -> LogNorm | None:
    """LogNorm over the positive finite ``values``, clipped to ``dynamic_range`` below the maximum (None if none)."""
    import numpy as np
    from matplotlib.colors import LogNorm

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if not v.size:
        return None
    return LogNorm(vmin=max(v.min(), v.max() / dynamic_range), vmax=v.max())


def head_label(layer: int, head: int) -> str:
    """The paper's naming: ``L8H7``."""
    return f"L{layer}H{head}"
