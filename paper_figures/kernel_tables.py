"""Kernel tables: the paper's kernel latency tables (``docs/metrics.md`` "Kernel latency") from ``toolkit bench`` JSON,
with the GPU that produced them named.

Per benchmark file: median ms of every variant (Monarch Triton kernels, SDPA cuDNN / flash / efficient) at every
shape, the Monarch kernel's speedup over the fastest dense backend at that shape, and a bar chart of the same
numbers. Also writes ``kernel_tables.md``. Each shape's Monarch tiling is part of the shape's name (``ar-121``), so
all ``monarch(...)`` variants share one column. Input: ``kernels/bench.py``'s ``bench_kernels.json`` (``environment``
with ``gpu``/``torch``/``triton``; ``shapes``; ``rows`` of ``shape, variant, ok, ms, error``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from toolkit.paper_figures import style
from toolkit.paper_figures.common import Context

from toolkit.errors import ToolkitError

NAME = "kernel_tables"
TITLE = "kernel latency tables from benchmark JSON"


def check(ctx: Context) -> None:
    if not ctx.settings.bench:
        raise ToolkitError(f"figure '{NAME}' needs benchmark results: pass --bench bench_kernels.json "
                           "(written by `toolkit bench --out DIR`)")
    for path in ctx.settings.bench:
        if not Path(path).is_file():
            raise ToolkitError(f"figure '{NAME}': benchmark file {path} not found")


def card_name(result: dict) -> str:
    env = result.get("environment", {})
    gpu = env.get("gpu") or "no GPU (Triton interpreter on CPU: timings meaningless)"
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "cuda") if env.get(k))
    return f"{gpu}" + (f" ({versions})" if versions else "")


def load(path: str | Path) -> dict:
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ToolkitError(f"cannot read benchmark JSON {path}: {err}") from None
    if not isinstance(result, dict) or "rows" not in result:
        raise ToolkitError(f"{path} is not a `toolkit bench` result (no 'rows')")
    return result


def column(variant: str) -> str:
    """Table column of a benchmark variant: each shape has one Monarch tiling (named in the shape), so
    ``monarch(1, 2, 1)`` and ``monarch(3, 1, 1)`` share the column ``monarch`` (likewise ``-lowmem``)."""
    if variant.startswith("monarch"):
        return "monarch-lowmem" if variant.endswith("lowmem") else "monarch"
    return variant


def table(result: dict) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """(shapes, columns, ms[shape, column] with NaN for failed / missing, speedup text per shape)."""
    rows = [r for r in result["rows"] if r.get("variant") != "(shape)"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    variants = list(dict.fromkeys(column(r["variant"]) for r in rows))
    ms = np.full((len(shapes), len(variants)), np.nan)
    for r in rows:
        if r.get("ok") and r.get("ms") is not None:
            ms[shapes.index(r["shape"]), variants.index(column(r["variant"]))] = float(r["ms"])
    speedups = []
    dense = [j for j, v in enumerate(variants) if v.startswith("sdpa")]
    monarch = [j for j, v in enumerate(variants) if v == "monarch"]
    for i in range(len(shapes)):
        best_dense = np.nanmin(ms[i, dense]) if dense and np.isfinite(ms[i, dense]).any() else np.nan
        best_monarch = np.nanmin(ms[i, monarch]) if monarch and np.isfinite(ms[i, monarch]).any() else np.nan
        speedups.append(f"{best_dense / best_monarch:.2f}×" if np.isfinite(best_dense / best_monarch) else "–")
    return shapes, variants, ms, speedups


def data(ctx: Context) -> dict:
    return dict(results=[(str(p), load(p)) for p in ctx.settings.bench])


def markdown(results: list[tuple[str, dict]]) -> str:
    lines = []
    for path, result in results:
        shapes, variants, ms, speedups = table(result)
        lines += [f"### {card_name(result)}", "", f"source: `{Path(path).name}`; median ms "
                  "(triton.testing.do_bench), cold start excluded", "",
                  "| shape | " + " | ".join(variants) + " | Monarch vs best dense |",
                  "|---|" + "---|" * (len(variants) + 1)]
        for i, shape in enumerate(shapes):
            cells = [f"{x:.3f}" if np.isfinite(x) else "–" for x in ms[i]]
            lines.append(f"| {shape} | " + " | ".join(cells) + f" | {speedups[i]} |")
        lines.append("")
    return "\n".join(lines)


@style.use_style
def plot(d: dict, out_dir: str | Path) -> dict:
    results = d["results"]
    fig, ax = style.subplots(len(results), 2, width=5.0, height=2.2 + 0.25 * max(
        len(table(r)[0]) for _, r in results))
    plotted = {}
    for row, (path, result) in enumerate(results):
        shapes, variants, ms, speedups = table(result)
        t, b = ax[row]
        t.axis("off")
        cells = [[f"{x:.3f}" if np.isfinite(x) else "–" for x in ms[i]] + [speedups[i]] for i in range(len(shapes))]
        tab = t.table(cellText=cells, rowLabels=shapes, colLabels=[*variants, "Monarch vs\nbest dense"],
                      loc="center", cellLoc="right")
        tab.auto_set_font_size(False)
        tab.set_fontsize(6.5)
        tab.scale(1.0, 1.3)
        t.set_title(f"median ms on {card_name(result)}", fontsize=8)
        width = 0.8 / max(1, len(variants))
        others = iter(c for c in style.CYCLE if c not in (style.COLORS["monarch"], style.COLORS["variational"]))
        for j, variant in enumerate(variants):
            color = {"monarch": style.COLORS["monarch"], "monarch-lowmem": style.COLORS["variational"]}.get(
                variant) or next(others)
            b.bar(np.arange(len(shapes)) + (j - (len(variants) - 1) / 2) * width, ms[:, j], width, label=variant,
                  color=color)
        b.set_xticks(range(len(shapes)), shapes, rotation=20)
        b.set(ylabel="median latency (ms)", yscale="log", title=Path(path).name)
        b.legend(fontsize=6)
        plotted[f"{row}/ms"] = ms
    style.save(fig, out_dir, NAME)
    (Path(out_dir) / f"{NAME}.md").write_text(markdown(results))
    return plotted
