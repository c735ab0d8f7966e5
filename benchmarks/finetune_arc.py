"""The paper's arc on the bundled model: dense -> zero-shot approximate attention -> finetuned with it.

For every approximation row: videos of held-out prompts from the same noise as the dense model's (one generator
per seed: the same initial and re-noising draws), scored by the sprite evaluator (prompt adherence, persistence) and
against the dense videos (per-frame PSNR / SSIM, scikit-image). Zero-shot rows sample the shipped weights with the
spec at every seam; finetuned rows first train a copy with it (``toolkit/models/bundled/finetune.py``, objective
``distill`` unless --objective; on a GPU Monarch trains through the Triton op's backward kernels, the rest
through their PyTorch references), then sample it with the same spec.

    python benchmarks/finetune_arc.py --out benchmarks/results/finetune_arc_h200 --capture   # on a GPU, ~12 min
    python benchmarks/finetune_arc.py --tiny --out /tmp/arc            # CPU smoke run (random tiny model)

Writes arc.json (every number, the GPU, versions, settings, times), arc.md (the table) and arc.png. With
``--capture``, each finetuned model is also saved (``models/``), captured under its attention at the last chunk's
last denoising step (q, k, v, lse: its maps are recomputed exactly) next to the dense model, and both go through
``toolkit analyze monarch``: does finetuning make the model's own attention logits more Monarch-representable
(``monarch.nc``, ``monarch.md``)?
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from toolkit.analysis.quality import backend_density, frame_metrics
from toolkit.attention.backends import backend_for
from toolkit.models.bundled import clip_shape, frames_per_chunk, generate, load_bundled, tiny_config
from toolkit.models.bundled import evaluate as ev
from toolkit.models.bundled.finetune import FinetuneSettings, save_finetuned, train_finetune
from toolkit.models.bundled.teacher import autocast
from toolkit.models.seam import use_backend
from toolkit.models.wan import WanModel

# (spec, zero-shot only?) — densities on the 12 x 20 x 32 grid: monarch (1,1,1) 91.9 %, (3,1,1) 95.2 % effective
# sparsity; contiguous 32 x 20 has the (1,1,1) parameter count on tiles that cut the grid's rows (misaligned);
# per-row oracle top-k is block top-k with 1-token tiles, kept at the Monarch densities.
ROWS = (
    ("monarch:1,1,1", False), ("monarch:1,1,1:T=10", True), ("monarch-contiguous:32,20", False),
    ("blocktopk:0.081:1,1,1", False),
    ("monarch:3,1,1", False), ("monarch:3,1,1:T=10", True), ("blocktopk:0.048:1,1,1", False),
)
TINY_ROWS = (("monarch:1,1,1", False), ("monarch:1,1,1:T=2", True), ("blocktopk:0.25:1,1,1", False))


def videos(model: WanModel, prompts: list, seed: int, spec: str | None, batch: int) -> torch.Tensor:
    """[n 3 f h w] in [0, 1]; every batch from the same seed, so row r of any spec shares its noise."""
    device = next(model.parameters()).device
    backend = None if spec is None else backend_for(spec, device)
    out = []
    with use_backend(model, backend), autocast(device), torch.no_grad():
        for i in range(0, len(prompts), batch):
            out.append(generate(model, prompts[i:i + batch], seed=seed + i).float().cpu())
    return torch.cat(out)


def score(video: torch.Tensor, dense: torch.Tensor, prompts: list) -> dict:
    summary = ev.summarise(ev.evaluate_clips(video, prompts))
    psnr, ssim = zip(*(frame_metrics(d.numpy(), v.numpy()) for d, v in zip(dense, video)))
    psnr = np.concatenate(psnr)
    finite = psnr[np.isfinite(psnr)]
    return dict(colour_match=summary.colour_match, score=summary.score, persistence=summary.persistence,
                psnr=float(finite.mean()) if finite.size else float("inf"), ssim=float(np.mean(ssim)),
                identical_frames=int((~np.isfinite(psnr)).sum()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts (one video each)")
    p.add_argument("--seed", type=int, default=ev.HELDOUT_NOISE_SEED)
    p.add_argument("--steps", type=int, default=120, help="finetuning updates per row")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=FinetuneSettings.lr)
    p.add_argument("--objective", default="distill", choices=("distill",))
    p.add_argument("--rows", default=None, help="';'-separated specs (default: the paper's set on this grid)")
    p.add_argument("--tiny", action="store_true", help="random tiny model on CPU: a smoke run of the script")
    p.add_argument("--capture", action="store_true",
                   help="also save, capture and Monarch-analyse each finetuned model beside the dense one")
    p.add_argument("--replot", action="store_true", help="only redraw arc.md / arc.png from --out's arc.json")
    args = p.parse_args()
    if args.replot:
        return replot(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        torch.manual_seed(0)
        model, rows = WanModel(tiny_config()).eval(), TINY_ROWS
    else:
        model, _ = load_bundled(dev)
        rows = ROWS
    if args.rows:
        rows = tuple((s.strip().removesuffix("!zero"), s.strip().endswith("!zero")) for s in args.rows.split(";"))
    cfg = model.cfg
    grid = tuple(n // p for n, p in zip(clip_shape(cfg), cfg.patch_size))
    prompts = ev.heldout_prompts(args.prompts)
    gen_batch = 16 if dev.type == "cuda" else 2
    log = lambda m: print(m, flush=True)  # noqa: E731

    t0 = time.perf_counter()
    dense = videos(model, prompts, args.seed, None, gen_batch)
    results = [dict(row="dense", spec="dense", density=1.0, finetuned=False, seconds=time.perf_counter() - t0,
                    **score(dense, dense, prompts))]
    log(f"dense: {results[-1]}")
    settings = FinetuneSettings(objective=args.objective, steps=args.steps, batch=args.batch, lr=args.lr)
    meta = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, model="tiny random" if args.tiny else "data/bundled",
                grid=grid, prompts=args.prompts, seed=args.seed, settings=asdict(settings))

    def save() -> None:  # after every row: a run cut short keeps what it measured
        (args.out / "arc.json").write_text(json.dumps(dict(meta=meta, rows=results), indent=1, default=str) + "\n")

    saved: dict[str, Path] = {}
    for spec, zero_only in rows:
        density = backend_density(spec, grid)
        t0 = time.perf_counter()
        zs = videos(model, prompts, args.seed, spec, gen_batch)
        results.append(dict(row=f"{spec} zero-shot", spec=spec, density=density, finetuned=False,
                            seconds=time.perf_counter() - t0, **score(zs, dense, prompts)))
        log(f"{spec} zero-shot: {results[-1]}")
        save()
        if zero_only:
            continue
        t0 = time.perf_counter()
        student, record = train_finetune(model, settings, backend_for(spec, dev), seed=0,
                                         log=log, every=max(1, args.steps // 5))
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ft = videos(student, prompts, args.seed, spec, gen_batch)
        results.append(dict(row=f"{spec} finetuned", spec=spec, density=density, finetuned=True,
                            seconds=time.perf_counter() - t0, train_seconds=round(train_s, 1),
                            loss_init=record["heldout_loss_init"], loss_end=record["heldout_loss_end"],
                            **score(ft, dense, prompts)))
        log(f"{spec} finetuned: {results[-1]}")
        save()
        if args.capture:
            saved[spec] = save_finetuned(args.out / "models" / slug(spec), student,
                                         dict(record, attention=spec, source="data/bundled"))
        del student

    save()
    print(table(results, args.out / "arc.md"))
    plot(results, args.out / "arc.png")
    if saved:
        dense_dir = save_finetuned(args.out / "models" / "dense", model, dict(attention="dense", steps=0))
        last_chunk = clip_shape(cfg)[0] // frames_per_chunk(cfg) - 1
        monarch_of_captures(args.out, dense_dir, saved, last_chunk)


def table(results: list, path: Path) -> str:
    """The markdown table of ``results`` (arc.json's rows), written to ``path`` and returned."""
    lines = ["| row | density | colours = prompt | score | persistence | PSNR vs dense (dB) | SSIM vs dense | "
             "held-out loss |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        d = "-" if r["density"] is None else f"{r['density']:.3f}"
        loss = f"{r['loss_init']:.4f} → {r['loss_end']:.4f}" if r.get("finetuned") else ""
        lines.append(f"| {r['row']} | {d} | {r['colour_match']:.0%} | {r['score']:.0%} | {r['persistence']:.0%} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.3f} | {loss} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def replot(folder: Path) -> None:
    """arc.md and arc.png again from ``folder/arc.json`` (e.g. of a run cut short by a time limit)."""
    results = json.loads((folder / "arc.json").read_text())["rows"]
    print(table(results, folder / "arc.md"))
    plot(results, folder / "arc.png")


def slug(spec: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in spec)


def monarch_of_captures(out: Path, dense_dir: Path, saved: dict[str, Path], last_chunk: int) -> None:
    """Capture the dense model and each finetuned one (under its attention), then ``toolkit analyze monarch`` over
    all of them (stacked along ``run``): the exact projection error of each model's own maps, per layout."""
    import subprocess
    import sys

    import xarray as xr

    where = out / "captures"
    where.mkdir(exist_ok=True)
    last = ["--chunks", str(last_chunk), "--steps", "3", "--quiet", "--force"]
    runs = {"dense": (["--checkpoint", str(dense_dir)], where / "dense.h5")}
    runs.update({spec: (["--checkpoint", str(folder), "--attention", spec], where / f"{slug(spec)}.h5")
                 for spec, folder in saved.items()})
    cli = [sys.executable, "-m", "toolkit.cli"]
    for spec, (extra, path) in runs.items():
        t0 = time.perf_counter()
        subprocess.run([*cli, "capture", *extra, *last, "--out", str(path)], check=True)
        print(f"captured {spec}: {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    subprocess.run([*cli, "analyze", "monarch", *(str(p) for _, p in runs.values()), "--out",
                    str(out / "monarch.nc"), "--force", "--iters", "1"], check=True)
    print(f"analyze monarch: {time.perf_counter() - t0:.0f} s", flush=True)
    ds = xr.open_dataset(out / "monarch.nc", engine="h5netcdf")
    err = ds["projection_out_rel_l2"]  # record, head, config; "run" labels the records
    mean = err.groupby("run").mean(["record", "head"])
    names = [str(r) for r in mean["run"].values]
    lines = ["| Monarch layout | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for config in mean["config"].values:
        row = mean.sel(config=config)
        lines.append(f"| {config} | " + " | ".join(f"{float(row.sel(run=r)):.3f}" for r in names) + " |")
    text = ("exact Monarch projection, output relative L2, mean over layers and heads (last chunk, step 3):\n"
            + "\n".join(lines) + "\n")
    (out / "monarch.md").write_text(text)
    print(text)


def plot(results: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [r["spec"] for r in results if r["spec"] != "dense" and not r["finetuned"]]
    density = {r["spec"]: r["density"] for r in results}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), constrained_layout=True)
    x = np.arange(len(specs))
    # against the dense video from the same noise: prompt adherence is in the table, not here, since the dense
    # model's own is low and colourful artefacts can pass the colour test (arc.md)
    for ax, key, label in ((axes[0], "psnr", "PSNR vs dense video (dB)"), (axes[1], "ssim", "SSIM vs dense video")):
        zs = [next(r[key] for r in results if r["spec"] == s and not r["finetuned"]) for s in specs]
        ft = [next((r[key] for r in results if r["spec"] == s and r["finetuned"]), np.nan) for s in specs]
        # a row with no finetuned model (more iterations, zero-shot only) gets one bar, centred on its tick
        zs_dx = np.where(np.isfinite(ft), -0.2, 0.0)
        ax.bar(x + zs_dx, zs, 0.4, label="zero-shot", color="#bbbbbb")
        ax.bar(x + 0.2, ft, 0.4, label="finetuned", color="#3b7dd8")
        for i, (a, b) in enumerate(zip(zs, ft)):
            for dx, v in ((zs_dx[i], a), (0.2, b)):
                if np.isfinite(v):
                    ax.text(i + dx, v, f"{v:.1f}" if key == "psnr" else f"{v:.2f}", ha="center", va="bottom",
                            fontsize=7)
        ax.set_xticks(x, [_tick(s, density.get(s)) for s in specs], fontsize=7.5)
        ax.set_ylabel(label)
        ax.set_ylim(0, max(v for v in zs + ft if np.isfinite(v)) * 1.12)
        ax.legend(fontsize=8, loc="upper center", ncol=2, bbox_to_anchor=(0.5, 1.0), framealpha=0.9)
    fig.suptitle("Bundled model: zero-shot vs finetuned attention approximations (same noise as the dense videos)")
    fig.savefig(path, dpi=130)


def _tick(spec: str, density: float | None) -> str:
    """Two or three short lines per bar group: family, parameters, density."""
    family, _, rest = spec.partition(":")
    family = {"monarch-contiguous": "contiguous", "blocktopk": "top-k"}.get(family, family)
    if family == "top-k":  # blocktopk:FRACTION:TILE -> the tile; the fraction is the density line
        rest = rest.split(":", 1)[1] if ":" in rest else rest
    params, _, iters = rest.partition(":T=")
    label = f"{family}\n({params})" + (f"\n{iters} iterations" if iters else "")
    return label + ("" if density is None else f"\ndensity {density:.1%}")


if __name__ == "__main__":
    main()
