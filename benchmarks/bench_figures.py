"""What reproducing the paper's analysis figures costs on full-size Self-Forcing: the README recipe (two captures
and ``toolkit figures`` on each) with random weights of the real size (Wan2.1-T2V-1.3B, bf16) and random prompt
embeddings, timed per step and per figure, with bytes on disk and peak memory.

    python benchmarks/bench_figures.py --out results/                  # GPU: both parts (~ minutes each)
    python benchmarks/bench_figures.py --out results/ --parts pairs    # one part per call if time is short
    python benchmarks/bench_figures.py --out /tmp/smoke --tiny         # CPU smoke run (tiny bundled architecture)

Recipe (paths relative to --workdir):

* ``pairs``: ``toolkit capture --model self-forcing --layers 0,8 --steps 3,clean --out pairs.h5`` then
  ``toolkit figures pairs.h5 --out figs_pairs --figures fig1,fig2,alignment,offsets,spectra`` (every query: Monarch
  tiles and frame zooms need them);
* ``all``: ``toolkit capture --model self-forcing --queries random:64 --steps 0,3,clean --out all.h5`` then
  ``toolkit figures all.h5 --out figs_all --figures coverage,head-types --pairs 0:0,8:7`` (64 random queries per
  frame, every layer and head).

Random weights give near-uniform attention, so the figures themselves mean nothing; the times and sizes are those
of a real run (the analyses are exact and do the same work whatever the values). Writes ``bench_figures.json`` and
prints a markdown table. Runs on torch ≥ 2.4 (no compile, no Triton needed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import time
from pathlib import Path

import torch

RECIPE = {
    "pairs": dict(capture=["--layers", "0,8", "--steps", "3,clean"],
                  figures=("fig1", "fig2", "alignment", "offsets", "spectra"), pairs=None),
    "all": dict(capture=["--queries", "random:64", "--steps", "0,3,clean"],
                figures=("coverage", "head-types"), pairs=((0, 0), (8, 7))),
}
TINY = {  # the same recipe on a 2-layer bundled architecture (CPU smoke test of the script)
    "pairs": dict(capture=["--layers", "0,1", "--steps", "3,clean"],
                  figures=("fig1", "fig2", "alignment", "offsets", "spectra"), pairs=None),
    "all": dict(capture=["--queries", "random:8", "--steps", "0,3,clean"],
                figures=("coverage", "head-types"), pairs=((0, 0), (1, 1))),
}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def make_model_files(workdir: Path, tiny: bool) -> tuple[str, list[str]]:
    """A checkpoint of the real architecture with random weights (+ random prompt embeddings): (model, options)."""
    from toolkit.models.checkpoints import random_state_dict, save_wan_native

    ckpt = workdir / "checkpoint"
    if tiny:
        from toolkit.models.bundled import bundled_config

        cfg = bundled_config(dim=32, ffn_dim=48, num_heads=2, num_layers=2)
        if not (ckpt / "config.json").is_file():
            save_wan_native(random_state_dict(cfg), ckpt, cfg)
        return "bundled", ["--checkpoint", str(ckpt)]
    from toolkit.models.text_encoder import save_prompt_embeds
    from toolkit.models.wan import WanConfig

    cfg = WanConfig()
    if not (ckpt / "config.json").is_file():
        save_wan_native(random_state_dict(cfg, dtype=torch.bfloat16), ckpt, cfg)
    embeds = workdir / "prompt_embeds.safetensors"
    if not embeds.is_file():
        g = torch.Generator().manual_seed(0)
        save_prompt_embeds(embeds, torch.randn(77, cfg.text_dim, generator=g) * 0.1)
    return "self-forcing", ["--checkpoint", str(ckpt), "--prompt-embeds", str(embeds)]


def run_part(name: str, recipe: dict, model: str, model_args: list[str], workdir: Path) -> dict:
    from toolkit.paper_figures import FigureSettings, make_figures

    from toolkit.cli import main

    cap, figs = workdir / f"{name}.h5", workdir / f"figs_{name}"
    cap.unlink(missing_ok=True)
    shutil.rmtree(figs, ignore_errors=True)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    argv = ["capture", "--model", model, *model_args, *recipe["capture"], "--out", str(cap), "--quiet"]
    if main(argv) != 0:
        raise RuntimeError(f"toolkit {' '.join(argv)} failed")
    t1 = time.perf_counter()
    marks: list[tuple[str, float]] = []

    def log(*parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        if line.startswith("["):
            marks.append((line.split("]")[1].split(":")[0].strip(), time.perf_counter()))

    settings = FigureSettings(figures=recipe["figures"], pairs=recipe["pairs"])
    make_figures(cap, figs, settings, log=log, progress=True)
    t2 = time.perf_counter()
    per_figure = {n: (marks[i + 1][1] if i + 1 < len(marks) else t2) - t for i, (n, t) in enumerate(marks)}
    return {
        "capture_command": "toolkit " + " ".join(a for a in argv if a not in model_args),
        "figures": list(recipe["figures"]),
        "capture_s": round(t1 - t0, 2),
        "capture_bytes": cap.stat().st_size,
        "figures_s": round(t2 - t1, 2),
        "figure_s": {k: round(v, 2) for k, v in per_figure.items()},  # includes the analyses each one ran first
        "figures_folder_bytes": folder_bytes(figs),
        "analysis_cache_bytes": {p.name: p.stat().st_size for p in sorted(figs.glob("analysis_*.nc"))},
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_host_rss_gb_so_far": round(peak_rss_gb(), 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for bench_figures.json")
    p.add_argument("--workdir", default=None, help="captures and figures (default: OUT/bench_figures_work)")
    p.add_argument("--parts", default="pairs,all", help="comma list of pairs, all (default both)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny bundled architecture")
    p.add_argument("--keep", action="store_true", help="keep the captures and figures (default: delete captures)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir) if args.workdir else out / "bench_figures_work"
    workdir.mkdir(parents=True, exist_ok=True)
    recipes = TINY if args.tiny else RECIPE
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    t = time.perf_counter()
    model, model_args = make_model_files(workdir, args.tiny)
    setup_s = time.perf_counter() - t
    import toolkit

    result = {
        "environment": {
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(), "toolkit": toolkit.__version__,
            "cpu_count": os.cpu_count(),
        },
        "model": model, "tiny": args.tiny, "random_checkpoint_setup_s": round(setup_s, 1), "parts": {},
    }
    for name in parts:
        result["parts"][name] = run_part(name, recipes[name], model, model_args, workdir)
        if not args.keep:
            (workdir / f"{name}.h5").unlink(missing_ok=True)
        (out / "bench_figures.json").write_text(json.dumps(result, indent=1) + "\n")  # after each part
    gb = 1e9
    print(f"\n## toolkit figures recipe on {result['environment']['gpu'] or 'CPU'} ({model}, random weights)\n")
    print("| part | capture s | capture GB | figures s | figures folder GB | peak GPU GB | per figure s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in result["parts"].items():
        per = ", ".join(f"{k} {v}" for k, v in r["figure_s"].items())
        print(f"| {name} | {r['capture_s']} | {r['capture_bytes'] / gb:.2f} | {r['figures_s']} | "
              f"{r['figures_folder_bytes'] / gb:.2f} | {r['peak_gpu_gb']} | {per} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
