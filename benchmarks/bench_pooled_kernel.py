"""Pooled-views kernel (``toolkit.kernels.pooled``) vs the torch path it replaces in the recorder, one record at
full Self-Forcing scale: 12 heads × d 128, bf16, grid 21 × 30 × 52 (1,560 tokens per frame), the stored queries
of one 3-frame chunk (``--queries``, default 48 and 192 = random:16 / random:64 per frame) against the first chunk
(3 key frames) and the last (full 21-frame cache, 32,760 keys).

    python benchmarks/bench_pooled_kernel.py --out results/     # GPU, under a minute
    python benchmarks/bench_pooled_kernel.py --tiny --out /tmp  # CPU smoke test (Triton interpreter)

Per case: correctness against the float64 reference (``exact.logsumexp`` + ``capture.pooled.pooled_sums`` on
float64 copies of the same inputs): max |Δ| of the LSE and of each pooled sum; GPU time (``do_bench`` median,
compile and warm-up excluded and reported); and the *host* time per record (the recorder's constraint: mean
``perf_counter`` time of 200 back-to-back calls without synchronisation, i.e. Python + launch cost).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402
from toolkit.kernels import pooled as kpooled  # noqa: E402

from toolkit.attention import exact  # noqa: E402
from toolkit.capture.pooled import packed_bins, pooled_sums, tf32_for_bf16_values, unpack  # noqa: E402


def torch_path(q, k, scale, tokens, key_frames, grid):
    """What the recorder ran per record before the kernel (LSE, then the pooled sums)."""
    with tf32_for_bf16_values(q.is_cuda and q.dtype == torch.bfloat16):
        lse = exact.logsumexp(q, k, scale)
        return lse, pooled_sums(q, k, lse, scale, tokens, key_frames, grid)


def host_us(fn, calls: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls * 1e6
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return host


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--queries", default="48,192")
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU interpreter smoke test)")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        grid, heads, dim, chunk, counts, calls = (6, 3, 5), 2, 16, 2, [5], 3
    else:
        assert dev.type == "cuda", "needs a GPU (use --tiny for a CPU smoke test)"
        counts = [int(x) for x in args.queries.split(",")]
        grid, heads, dim, chunk, calls = (21, 30, 52), 12, 128, 3, 200
    frames, height, width = grid
    tpf = height * width
    scale = dim**-0.5
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for n_q in counts:
        for first, last in ((0, chunk), (frames - chunk, frames)):  # first chunk, last chunk (full cache)
            key_frames = (0, last)
            chunk_tokens = torch.arange(first * tpf, last * tpf)
            tokens = chunk_tokens[torch.randperm(len(chunk_tokens), generator=g)[:n_q]].sort().values.to(dev)
            q = (2 * torch.randn(heads, n_q, dim, generator=g)).to(dev, torch.bfloat16)
            k = torch.randn(heads, last * tpf, dim, generator=g).to(dev, torch.bfloat16)
            t0 = time.perf_counter()
            lse, bins = kpooled.pooled_lse_and_sums(q, k, scale, tokens, key_frames, grid)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            first_call_s = time.perf_counter() - t0  # includes compiling both kernels
            q64, k64 = q.double(), k.double()
            ref_lse = exact.logsumexp(q64, k64, scale)
            ref = pooled_sums(q64, k64, ref_lse, scale, tokens, key_frames, grid)
            errors = {"lse": float((lse.double() - ref_lse).abs().max())}
            for name, got, want in zip(("frame_mass", "offset_t", "offset_h", "offset_w"), unpack(bins, grid),
                                       (ref.frame_mass, ref.offset_t, ref.offset_h, ref.offset_w)):
                errors[name] = float((got.double() - want.double()).abs().max())
            mass = float(unpack(bins, grid)[3].double().sum() / (heads * n_q))  # offset_w holds all the mass
            acc = torch.zeros(heads, packed_bins(grid), device=dev)

            def kernel(acc=acc, q=q, k=k, tokens=tokens, key_frames=key_frames):
                kpooled.pooled_lse_and_sums(q, k, scale, tokens, key_frames, grid, bins=acc)

            def reference(q=q, k=k, tokens=tokens, key_frames=key_frames):
                torch_path(q, k, scale, tokens, key_frames, grid)

            row = {"queries": n_q, "key_frames": list(key_frames), "keys": int(k.shape[1]),
                   "max_abs_err": errors, "mean_row_mass": mass, "first_call_s": first_call_s,
                   "launch_config": kpooled.launch_config(n_q, heads, last)}
            if dev.type == "cuda":
                row["kernel_ms"] = triton.testing.do_bench(kernel, return_mode="median")
                row["torch_ms"] = triton.testing.do_bench(reference, return_mode="median")
            row["kernel_host_us"] = host_us(kernel, calls)
            row["torch_host_us"] = host_us(reference, max(1, calls // 10))
            rows.append(row)
            print(json.dumps(row), flush=True)
    ok = all(max(r["max_abs_err"].values()) < 1e-3 and abs(r["mean_row_mass"] - 1) < 1e-4 for r in rows)
    result = {
        "benchmark": "pooled-views kernel vs torch path, one record (bf16, 12 heads x d 128)" if not args.tiny
        else "pooled-views kernel smoke test (tiny, CPU interpreter)",
        "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "grid": list(grid), "heads": heads, "head_dim": dim,
        "timer": "kernel_ms/torch_ms: triton.testing.do_bench median (first call incl. compile excluded, "
                 "reported as first_call_s); *_host_us: mean host time per call of back-to-back calls, no sync",
        "correct": ok, "cases": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_pooled_kernel.json").write_text(json.dumps(result, indent=2))
    print("| queries | key frames | kernel ms | torch ms | kernel host µs | torch host µs | max abs err |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['queries']} | {r['key_frames']} | {r.get('kernel_ms', float('nan')):.3f} | "
              f"{r.get('torch_ms', float('nan')):.3f} | {r['kernel_host_us']:.0f} | {r['torch_host_us']:.0f} | "
              f"{max(r['max_abs_err'].values()):.2e} |")
    print(f"GPU: {result['gpu']}; correct: {ok}")
    if not ok:
        raise SystemExit("pooled kernel disagrees with the float64 reference")


if __name__ == "__main__":
    main()
