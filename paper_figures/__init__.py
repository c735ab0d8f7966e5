"""Paper figures (imported as ``toolkit.paper_figures``): one small module per figure, a shared style, and
``make_figures`` behind ``toolkit figures RUN.h5 --out figs/``.

    from toolkit.paper_figures import FigureSettings, make_figures
    manifest = make_figures("run.h5", "figs/", FigureSettings(figures=("fig1", "coverage")))

Figures only plot Datasets returned by the analyses (``toolkit.analysis.periodic/topk/monarch``), which run on
demand and are cached as ``analysis_*.nc`` in the output folder (``results.py``). ``manifest.json`` records the
input file's SHA-256, the toolkit version, the resolved settings and every file written. Figures the capture
cannot make are skipped, one line each naming the capture option that would enable it (and listed under
``skipped``); only when no asked figure can be made is the run refused.

Modules (each: ``NAME``, ``TITLE``, ``check``, ``data``, ``plot``; see ``common.py``):
``fig1_mse_sparsity`` (Fig. 1), ``fig2_structure`` (Fig. 2), ``coverage``, ``alignment``, ``kernel_tables``,
``offsets``, ``spectra``, ``head_types``.

``semantic`` is the one figure made from a model instead of a capture (it needs the bundled model's ground-truth
sprite masks): ``semantic.make(model, out_dir, prompt=..., seed=...)`` or ``toolkit figures --figures semantic``.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from toolkit.paper_figures.common import Context, FigureSettings, default_focus, default_pairs

from toolkit.errors import ToolkitError

# short name -> module, in the order figures are made
FIGURES = {
    "fig1": "fig1_mse_sparsity",
    "fig2": "fig2_structure",
    "coverage": "coverage",
    "alignment": "alignment",
    "offsets": "offsets",
    "spectra": "spectra",
    "head-types": "head_types",
    "kernels": "kernel_tables",
}
# Figures that need no capture data: part of "all" only when their input is given.
OPTIONAL = {"kernels": lambda s: bool(s.bench)}

__all__ = ["FIGURES", "FigureSettings", "figure_module", "make_figures", "resolve_figures"]


def figure_module(name: str) -> ModuleType:
    return importlib.import_module(f"toolkit.paper_figures.{FIGURES[name]}")


def resolve_figures(settings: FigureSettings) -> list[str]:
    """Short names of the figures to make, in order (``all`` = every capture figure, plus the optional ones whose
    input was given)."""
    asked = [x.strip() for item in settings.figures for x in item.split(",") if x.strip()]
    by_module = {module: short for short, module in FIGURES.items()}
    names = []
    for x in asked:
        if x == "all":
            names += [n for n in FIGURES if n not in OPTIONAL or OPTIONAL[n](settings)]
        elif x in FIGURES or x in by_module:
            names.append(by_module.get(x, x))
        else:
            raise ToolkitError(f"unknown figure '{x}' (choose from all, {', '.join(FIGURES)})")
    return [n for n in FIGURES if n in set(names)]


def _versions() -> dict[str, str]:
    import matplotlib
    import numpy
    import torch
    import xarray

    from toolkit._version import __version__

    return {"toolkit": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": numpy.__version__, "xarray": xarray.__version__, "matplotlib": matplotlib.__version__}


def make_figures(capture_path: str | os.PathLike, out_dir: str | os.PathLike, settings: FigureSettings | None = None,
                 *, log: Callable[[str], None] = print, progress: bool = True,
                 plotted: dict | None = None) -> dict[str, Any]:
    """Make the selected figures of one capture into ``out_dir``; returns the manifest (also written as
    ``manifest.json``). Every figure's requirements are checked before any analysis runs. ``plotted``, if given,
    receives each figure's plotted arrays (``{NAME: {label: array}}``) for checks against the analyses. A figure
    this capture cannot make is skipped with one logged line naming the capture option that would enable it."""
    from toolkit.paper_figures.results import ResultCache

    from toolkit.capture import open_capture
    from toolkit.models.checkpoints import file_sha256

    settings = settings or FigureSettings()
    names = resolve_figures(settings)
    if not 0.0 < settings.mass < 1.0:
        raise ToolkitError(f"coverage mass {settings.mass} is impossible: it must lie strictly between 0 and 1")
    out = Path(out_dir)
    with open_capture(capture_path) as cap:
        if not cap.complete:
            raise ToolkitError(f"{cap.path} is incomplete (interrupted capture): finish it with `toolkit capture "
                               "--resume` and the same options, then make the figures")
        if settings.layouts:  # a bad spec, or one no asked figure reads, is one line before any analysis runs
            from toolkit.analysis.monarch import parse_layout

            for spec in settings.layouts:
                parse_layout(spec, cap.grid)
            readers = [n for n in FIGURES if getattr(figure_module(n), "READS_LAYOUTS", False)]
            if not set(readers) & set(names):
                raise ToolkitError(f"--layout sets the Monarch layouts of {' and '.join(readers)}; neither is asked "
                                   "for")
        focus = default_focus(cap)
        step = settings.step if settings.step is not None else focus[0]
        chunk = settings.chunk if settings.chunk is not None else focus[1]
        pairs = ([tuple(p) for p in settings.pairs] if settings.pairs
                 else default_pairs(cap, settings.heads, settings.layers))
        if settings.heads is not None and any(h not in settings.heads for _, h in pairs):
            raise ToolkitError(f"the pairs' heads {sorted({h for _, h in pairs})} must be among the analysed heads "
                               f"{settings.heads} (--heads)")
        if settings.layers is not None and any(layer not in settings.layers for layer, _ in pairs):
            raise ToolkitError(f"the pairs' layers {sorted({a for a, _ in pairs})} must be among the analysed "
                               f"layers {settings.layers} (--layers)")
        sha = file_sha256(cap.path, cache=False)
        results = ResultCache(cap, out, sha, log=log, progress=progress, device=settings.device)
        ctx = Context(cap, results, settings, step, chunk, pairs, log)
        modules, skipped = {}, {}
        for n in names:  # check every figure before spending any time; skip those this capture cannot make
            module = figure_module(n)
            try:
                module.check(ctx)
            except ToolkitError as e:
                skipped[module.NAME] = str(e)
            else:
                modules[n] = module
        if not modules:
            if len(skipped) == 1:
                raise ToolkitError(next(iter(skipped.values())))
            raise ToolkitError(f"no figure can be made from {cap.path}: " + "; ".join(skipped.values()))
        out.mkdir(parents=True, exist_ok=True)
        log(f"figures of {cap.path} -> {out}/ (step {step}, chunk {chunk}, pairs "
            f"{', '.join(f'L{a}H{b}' for a, b in pairs)})")
        for name, reason in skipped.items():
            log(f"skipped {name}: {reason}")
        made = {}
        for i, module in enumerate(modules.values(), 1):
            log(f"[{i}/{len(modules)}] {module.NAME}: {module.TITLE}")
            arrays = module.plot(module.data(ctx), out)
            if plotted is not None:
                plotted[module.NAME] = arrays
            files = sorted(p.name for p in out.glob(f"{module.NAME}.*"))
            made[module.NAME] = {"title": module.TITLE, "files": files}
        manifest = {
            "input": {"path": os.path.abspath(cap.path), "sha256": sha, "bytes": os.path.getsize(cap.path),
                      "provenance": {k: v for k, v in cap.attrs.items()
                                     if k in ("model", "checkpoint", "checkpoint_sha256", "prompt", "seed",
                                              "sampler", "toolkit_version", "date_created")}},
            "versions": _versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": {**settings.to_dict(), "figures": names, "step": step, "chunk": chunk,
                         "pairs": [list(p) for p in pairs]},
            "figures": made,
            "skipped": skipped,
            "analyses": results.used,
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    log(f"wrote {sum(len(m['files']) for m in made.values())} files and manifest.json to {out}/")
    return manifest
