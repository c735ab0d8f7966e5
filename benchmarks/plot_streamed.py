"""Time against extra memory of every Monarch forward in one ``bench_kernels.json`` (``toolkit bench
--low-memory``), with each ring the streamed kernel's tuner timed: where the streamed kernel sits between the
two-stage kernel (fast, 11 × size(q) at the full clip) and its low-memory mode.

    python benchmarks/plot_streamed.py benchmarks/results/streamed_h100/bench_kernels.json [--out PNG]

Extra memory of a tuner timing is computed, not measured: the output plus the ring (slots × query tiles per group
× α, Y in the input dtype and c in fp32 per (query tile, key slot)), cut by the launcher's ``streamed_ring`` to the
budget of the run that tuned it. The benchmark rows' own points are the measured peaks. The colour is the lag
that rule gives; the committed H100 run predates its "slots − 2" cap, so there a config cut to 5 slots ran with
lag 4 where the plot says 3.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from toolkit.kernels.monarch import intermediate_bytes_per_tile, streamed_ring  # noqa: E402

ELEMENT_BYTES = 2  # bf16 q, k, v, α, Y


def ring_points(shape: dict, rows: list[dict]) -> list[tuple[float, float, int]]:
    """(extra memory / size(q), ms, lag) of every streamed config the tuner timed at this shape, for each budget."""
    grid, tiling = shape["grid"], shape["tiling"]
    b1, b2 = tiling[0] * grid[1] // tiling[1], grid[2] // tiling[2]
    n_key_tiles = (shape["key_frames"][1] - shape["key_frames"][0]) // tiling[0] * tiling[1] * tiling[2]
    n_query_tiles = (shape["query_frames"][1] - shape["query_frames"][0]) // tiling[0] * tiling[1] * tiling[2]
    per_tile = intermediate_bytes_per_tile(b1, b2, n_key_tiles, shape["head_dim"], ELEMENT_BYTES)
    q_bytes = shape["q_bytes"]
    points = []
    for row in rows:
        if row.get("version") != "streamed":
            continue
        budget = q_bytes if row["variant"].endswith("-lowmem") else 1 << 30  # the benchmark's two budgets
        for tuning in row.get("tuning") or []:
            for cfg, ms in tuning.get("timings", []):
                tiles = cfg["BLOCK_M"] // b2
                groups = shape["heads"] * -(-n_query_tiles // tiles)
                slots, lag = streamed_ring(cfg["SLOTS"], cfg["LAG"], groups, budget // (tiles * per_tile))
                points.append((1 + slots * tiles * per_tile / q_bytes, ms, lag))
    return points


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path, help="bench_kernels.json of a `toolkit bench --low-memory` run")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: time_vs_memory.png beside it)")
    args = p.parse_args(argv)
    result = json.loads(args.json.read_text())
    shapes = result["shapes"]
    n_cols = min(2, len(shapes))
    n_rows = -(-len(shapes) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(6.4 * n_cols, 4.8 * n_rows), squeeze=False)
    for ax in axes.flat[len(shapes):]:
        ax.set_visible(False)
    for ax, (name, shape) in zip(axes.flat, shapes.items()):
        rows = [r for r in result["rows"] if r["shape"] == name]
        pts = ring_points(shape, rows)
        if pts:
            sc = ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], c=[lag for *_, lag in pts], cmap="viridis",
                            s=14, alpha=0.7, label="streamed, tuner's configs")
            fig.colorbar(sc, ax=ax, label="lag (groups)", fraction=0.05)
        styles = {"": ("two-stage", "s", "C3"), "-lowmem": ("two-stage low-memory", "v", "C1"),
                  "-fused": ("fused CUDA", "D", "C7"), "-streamed": ("streamed (tuned)", "o", "C0"),
                  "-streamed-lowmem": ("streamed within size(q)", "*", "C2")}
        for row in rows:
            if not row.get("ok") or row.get("peak_extra_over_q") is None:
                continue
            if row["variant"] == "sdpa-cudnn":
                ax.axhline(row["ms"], color="k", ls="--", lw=1, label="cuDNN SDPA")
                continue
            suffix = row["variant"].split(")", 1)[-1] if row["variant"].startswith("monarch") else None
            if suffix in styles:
                label, marker, color = styles[suffix]
                ax.scatter(row["peak_extra_over_q"], row["ms"], marker=marker, s=90, color=color, edgecolor="k",
                           zorder=3, label=f"{label}: {row['ms']:.2f} ms")
        ax.set_xscale("log")
        # plain numbers (1, 2, 5, 10 …) on the log axis, also where it spans less than a decade
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([x for x in (1, 1.5, 2, 3, 5, 8, 12, 20, 50) if ax.get_xlim()[0] <= x <= ax.get_xlim()[1]])
        ax.set_xlabel("extra memory / size(q)")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{name}  tiling {tuple(shape['tiling'])}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7.5, loc="upper right", framealpha=0.85)
    env = result.get("environment", {})
    fig.suptitle(f"Monarch forward, time against extra memory ({env.get('gpu', '?')}, bf16, 12 heads, d = 128)")
    fig.tight_layout()
    out = args.out or args.json.with_name("time_vs_memory.png")
    fig.savefig(out, dpi=110)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
