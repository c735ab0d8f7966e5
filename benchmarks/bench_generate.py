"""Full-size Self-Forcing generation time: one 81-frame video (21 latent frames, 7 chunks x (4 steps + clean pass) =
35 DiT forwards), no VAE, no text encoder, random weights written in the official ``.pt`` format and loaded back
through the toolkit's checkpoint loader.

    python benchmarks/bench_generate.py --out results/            # on a GPU; ~1 min plus writing 5.7 GB of weights
    python benchmarks/bench_generate.py --out results/ --attention dense monarch:1,1,1 monarch:3,1,1

Each ``--attention`` spec (``toolkit generate``'s; default dense only) runs in the same process on the same weights,
noise and re-noising draws: one warm-up video (cuDNN plans, Triton compilation and kernel tuning, the allocator;
reported apart) then ``--videos`` timed videos. Reports wall time per video (median), per-chunk times and peak GPU
memory per spec, and writes JSON. Targets: dense <= 3.7 s per video on an H100 (the paper's FlashAttention figure
is 3.66 s); Monarch (1,1,1) <= 2.6 s on an H200 (the paper's kernel: 3.23 s on an H100).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from toolkit.kernels.bench import _environment

import toolkit
from toolkit.attention.backends import use_attention
from toolkit.models.checkpoints import load_into, random_state_dict, save_self_forcing
from toolkit.models.sampling import self_forcing_rollout
from toolkit.models.wan import WanConfig, WanModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--videos", type=int, default=3, help="timed videos after one warm-up video")
    p.add_argument("--workdir", type=Path, default=None, help="where to write the random .pt (default: a temp dir)")
    p.add_argument("--attention", nargs="+", default=["dense"], metavar="SPEC",
                   help="attention specs to time, each on the same model and inputs (default: dense)")
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a GPU"
    dev = torch.device("cuda")
    cfg = WanConfig()

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        ckpt_path = save_self_forcing(random_state_dict(cfg, seed=0), Path(tmp) / "self_forcing_dmd.pt")
        write_s = time.perf_counter() - t0
        with torch.device("meta"):
            model = WanModel(cfg)
        model = model.to_empty(device=dev).to(torch.bfloat16)
        t1 = time.perf_counter()
        ckpt = load_into(model, ckpt_path)
        load_s = time.perf_counter() - t1
    model.eval()

    g = torch.Generator(device=dev).manual_seed(0)
    noise = torch.randn(1, 16, 21, 60, 104, generator=g, device=dev, dtype=torch.bfloat16)
    context = torch.randn(1, 512, 4096, generator=g, device=dev, dtype=torch.bfloat16)
    context[:, 40:] = 0  # a 40-token prompt, zero-padded like the umT5 encoder output

    def one_video() -> tuple[float, list[float]]:
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(8)]
        marks[0].record()
        self_forcing_rollout(model, noise, context, generator=torch.Generator(device=dev).manual_seed(1),
                             on_chunk=lambda c, _: marks[c + 1].record())
        torch.cuda.synchronize()
        return marks[0].elapsed_time(marks[7]) / 1e3, [marks[i].elapsed_time(marks[i + 1]) for i in range(7)]

    base_mem = torch.cuda.memory_allocated()
    rows = []
    for spec in args.attention:
        with use_attention(model, spec):
            torch.cuda.reset_peak_memory_stats()
            t2 = time.perf_counter()
            one_video()  # warm-up: cuDNN plans, Triton compilation and tuning, allocator
            warm_s = time.perf_counter() - t2
            runs, chunk_ms = [], []
            for _ in range(args.videos):
                wall0 = time.perf_counter()
                gpu_s, per_chunk = one_video()
                runs.append({"wall_s": time.perf_counter() - wall0, "gpu_s": gpu_s})
                chunk_ms.append(per_chunk)
            peak = torch.cuda.max_memory_allocated()
        rows.append({
            "attention": spec,
            "warmup_video_s": warm_s,
            "videos": runs,
            "median_wall_s": statistics.median(r["wall_s"] for r in runs),
            "median_chunk_ms": [statistics.median(c[i] for c in chunk_ms) for i in range(7)],
            "peak_allocated_bytes": peak,
        })
        print(f"{spec}: {rows[-1]['median_wall_s']:.3f} s/video (warm-up {warm_s:.1f} s)", flush=True)

    env = _environment()
    result = {
        "benchmark": "self-forcing generation, 81 frames (21 latent), 35 DiT forwards, no VAE/text encoder",
        **{key: env[key] for key in ("gpu", "torch", "cuda", "cudnn", "triton", "python")},
        "toolkit": toolkit.__version__,
        "dtype": "bfloat16",
        "dense_attention": "PyTorch SDPA (default backend selection)",
        "checkpoint": {"format": ckpt.format, "entry": ckpt.entry, "write_s": write_s, "load_s": load_s},
        "latent_shape": list(noise.shape),
        "weights_bytes": base_mem,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_generate.json").write_text(json.dumps(result, indent=2))
    print("| GPU | attention | median s/video | warm-up video s | per-chunk ms | peak GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {result['gpu']} | {r['attention']} | {r['median_wall_s']:.3f} | {r['warmup_video_s']:.1f} | "
              f"{', '.join(f'{m:.0f}' for m in r['median_chunk_ms'])} | {r['peak_allocated_bytes'] / 2**30:.1f} |")


if __name__ == "__main__":
    main()
