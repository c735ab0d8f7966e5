"""Fig. 2 analogue: the 3-D structure of one head's attention on a real capture.

(a) frame × frame mass (each query frame's mean mass on each key frame, all chunks of the focus step: the
block-causal staircase and its diagonal bands); (b) the exact map of one frame pair (queries of one frame × keys
of one frame, raster order), where the row period ``width`` shows as bands, with the semantic spikes of the
residual after the separable fit (``toolkit.analysis.periodic``: entries with A − D above its threshold) marked;
(c) the separable kernel factors d_h(Δh), d_w(Δw); (d) d_f(Δt).

Plotted data: ``frame_mass``, ``d_f``, ``d_h``, ``d_w``, ``spike_key`` of the periodic analysis and the reader's
exact tile ``Capture.tile`` (no statistics are computed here).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.ticker import MaxNLocator
from toolkit.paper_figures import style
from toolkit.paper_figures.common import Context, require_all_queries, require_records, require_stored
from toolkit.paper_figures.results import record_of

from toolkit.analysis.records import RecordSelection
from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    import xarray as xr

NAME = "fig2_structure"
TITLE = "3-D attention structure: frame blocks, frame-pair zoom, spikes, separable kernel"


def check(ctx: Context) -> None:
    require_stored(ctx.cap, NAME, ("q", "k", "lse"))
    require_all_queries(ctx.cap, NAME)
    layer, head = ctx.pairs[0]
    require_records(ctx.cap, NAME, layers=[layer], heads=[head], **ctx.focus)
    if ctx.settings.frame_pair is not None:
        rec = ctx.cap.record(ctx.step, ctx.chunk, layer)
        qf, kf = ctx.settings.frame_pair
        if not (rec.query_frames[0] <= qf < rec.query_frames[1] and rec.key_frames[0] <= kf < rec.key_frames[1]):
            raise ToolkitError(f"--frame-pair {qf},{kf}: chunk {ctx.chunk} has query frames {rec.query_frames[0]}-"
                               f"{rec.query_frames[1] - 1} and key frames {rec.key_frames[0]}-{rec.key_frames[1] - 1}")


def periodic_selection(ctx: Context) -> dict:
    """Periodic analysis records shared by Fig. 2, offsets, spectra and head types: every stored chunk and
    layer at the focus step, default options (``records`` of `ResultCache.get`)."""
    return dict(records=RecordSelection(steps=[ctx.step], layers=ctx.settings.layers, heads=ctx.settings.heads))


def default_frame_pair(query_frames: tuple[int, int]) -> tuple[int, int]:
    """Zoom on the first query frame of the chunk against itself (spatial bands are clearest there)."""
    return query_frames[0], query_frames[0]


def data(ctx: Context) -> dict:
    per = ctx.results.get("periodic", **periodic_selection(ctx))
    layer, head = ctx.pairs[0]
    rec = ctx.cap.record(ctx.step, ctx.chunk, layer)
    qf, kf = ctx.settings.frame_pair or default_frame_pair(rec.query_frames)
    tpf = ctx.cap.layout.tokens_per_frame
    tile = ctx.cap.tile(rec, head, q_range=(qf * tpf, (qf + 1) * tpf), k_range=(kf * tpf, (kf + 1) * tpf),
                        device=ctx.settings.device)
    # frame × frame rows of every chunk of this step and layer
    chunks = sorted({int(c) for c, s, l in zip(per["chunk"].values, per["step"].values, per["layer"].values)
                     if s == ctx.step and l == layer})
    parts = [record_of(per, step=ctx.step, chunk=c, layer=layer).sel(head=head) for c in chunks]
    return dict(layer=layer, head=head, step=ctx.step, chunk=ctx.chunk, frame_pair=(qf, kf), tile=tile,
                focus=record_of(per, layer=layer, **ctx.focus).sel(head=head), chunks=parts)


def block_view(parts: list) -> np.ndarray:
    """Stack the query-frame rows each chunk's record holds into one frame × frame array (NaN: no queries)."""
    first = parts[0]
    fm = np.full(first["frame_mass"].shape, np.nan)
    for p in parts:
        rows = p["queries_per_frame"].values > 0
        fm[rows] = p["frame_mass"].values[rows]
    return fm


def spike_threshold(focus: xr.Dataset) -> float:
    """The focus record's A − D spike threshold: a variable when it differs between the stacked records, the
    file attribute when it is the same for all (e.g. one bidirectional record, or equal key counts)."""
    if "spike_threshold" in focus.variables:
        return float(focus["spike_threshold"])
    if "spike_threshold" in focus.attrs:
        return float(focus.attrs["spike_threshold"])
    raise KeyError("the periodic analysis result has no spike_threshold (variable or attribute)")


@style.use_style
def plot(d: dict, out_dir: str | Path) -> dict:
    layer, head = d["layer"], d["head"]
    focus, tile = d["focus"], d["tile"]
    label = style.head_label(layer, head)
    fig, ax = style.subplots(1, 4, width=3.1, height=2.9)
    a, b, c, e = ax[0]

    fm = block_view(d["chunks"])
    im = a.imshow(np.ma.masked_invalid(fm), norm=style.log_norm(fm), cmap=style.SEQUENTIAL, origin="upper")
    a.set(xlabel="key frame", ylabel="query frame", title=f"(a) {label}, step {d['step']}: frame × frame mass")
    a.grid(False)
    fig.colorbar(im, ax=a, shrink=0.8, label="mean attention mass")

    p = tile.values
    qf, kf = d["frame_pair"]
    im = b.imshow(p, norm=style.log_norm(p), cmap=style.SEQUENTIAL, interpolation="nearest", aspect="auto")
    b.set(xlabel=f"key token in frame {kf} (raster, row-major)", ylabel=f"query token in frame {qf}",
          title=f"(b) exact map, frame {qf} → {kf}")
    b.grid(False)
    fig.colorbar(im, ax=b, shrink=0.8, label="attention probability")
    # spikes of the residual A − D inside this frame pair
    tpf = p.shape[1]
    q_tok = focus["query_token"].values  # padded with NaN / -1 where this record has fewer queries
    keys = np.nan_to_num(focus["spike_key"].values, nan=-1).astype(np.int64)  # query spike (-1: none)
    valid = np.isfinite(q_tok) & (q_tok >= 0)
    q_tok = np.where(valid, q_tok, -1).astype(np.int64)
    in_q = valid & ((q_tok // tpf) == qf)
    rows, cols = [], []
    for qi in np.nonzero(in_q)[0]:
        hit = keys[qi][(keys[qi] >= 0) & (keys[qi] // tpf == kf)]
        rows.extend([int(q_tok[qi] % tpf)] * len(hit))
        cols.extend((hit % tpf).tolist())
    rows, cols = np.asarray(rows, dtype=int), np.asarray(cols, dtype=int)
    thr = spike_threshold(focus)
    spike_label = f"residual spikes (A − D > {thr:.2g})"
    if rows.size:  # small dots: a frame pair can hold thousands of spikes, and rings would bury the map under them
        b.scatter(cols, rows, s=1.5, marker="o", lw=0, color=style.COLORS["spike"], label=spike_label)
        b.set_title(f"(b) exact map, frame {qf} → {kf}\ndots: {rows.size} {spike_label}")

    d_h, d_w, d_f = focus["d_h"], focus["d_w"], focus["d_f"]
    c.plot(d_h["dh"], d_h.values, marker=".", label="d_h(Δh)")
    c.plot(d_w["dw"], d_w.values, marker=".", label="d_w(Δw)")
    c.set(xlabel="row / column offset (tokens)", ylabel="kernel factor (max 1)",
          title=f"(c) separable kernel\n(explains {float(focus['explained_mass']):.0%} of the mass)")
    c.set_ylim(top=1.0 + 0.15 * (1.0 - min(float(np.nanmin(d_h.values)), float(np.nanmin(d_w.values)))))
    c.legend(loc="upper center", ncols=2, fontsize=7)  # in the headroom above the factors' maximum of 1
    e.plot(d_f["dt"], d_f.values, marker="o", color=style.COLORS["reference"])
    e.set(xlabel="frame offset Δt", ylabel="d_f(Δt)",
          title=f"(d) temporal factor\n(the fit's map R² {float(focus['map_r2']):.2f})")
    e.xaxis.set_major_locator(MaxNLocator(integer=True))  # frame offsets are whole numbers
    style.save(fig, out_dir, NAME)
    return {"frame_mass": fm, "tile": p, "spike_rows": rows, "spike_cols": cols, "spike_threshold": thr,
            "spike_label": spike_label, "d_h": d_h.values,
            "d_w": d_w.values, "d_f": d_f.values}
