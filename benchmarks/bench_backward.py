"""Forward + backward of the Monarch op (``toolkit::monarch_attention``, backward kernels of
``kernels/monarch_backward.py``) against PyTorch SDPA forward + backward (cuDNN and flash backends), same process.

    python benchmarks/bench_backward.py --out DIR [--shapes full-111 full-311 ar-111] [--repeats 10]
    python benchmarks/bench_backward.py --tiny --out /tmp/bb   # CPU smoke run (Triton interpreter, toy shape)

Shapes are ``toolkit.kernels.bench.SHAPES`` (bf16, B = 1, 12 heads, d = 128). Per variant: the first call (Triton
compile / cuDNN plan, reported separately), ``--warmup`` calls not timed, then ``--repeats`` timed calls (CUDA
events; medians reported); Monarch also forward alone, so backward ≈ the difference; peak memory above the inputs
during one forward + backward; a finiteness check of the gradients. Writes DIR/bench_backward.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from toolkit.kernels import monarch_attention_triton
from toolkit.kernels.bench import SHAPES, TINY_SHAPES, _environment

BENCH_SHAPES = ("full-111", "full-311", "ar-111")


def _inputs(grid, qf, kf, heads, dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    tpf = grid[1] * grid[2]
    n_q, n_k = (qf[1] - qf[0]) * tpf, (kf[1] - kf[0]) * tpf
    q, k, v, d_out = (torch.randn(1, n, heads, dim, generator=g).to(device=device, dtype=dtype)
                      for n in (n_q, n_k, n_k, n_q))
    return q, k, v, d_out


def _timed_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def _measure(fn, device: torch.device, warmup: int, repeats: int) -> dict:
    """First-call seconds, median / min / max ms of ``repeats`` calls after ``warmup`` untimed ones, peak extra
    bytes of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    times = [_timed_ms(fn, device) for _ in range(repeats)]
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    return {"first_call_s": round(first_s, 3), "median_ms": round(statistics.median(times), 4),
            "min_ms": round(min(times), 4), "max_ms": round(max(times), 4), "peak_extra_bytes": peak}


def bench_shape(name: str, spec, heads: int, dim: int, dtype, device, warmup: int, repeats: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    grid, tiling, qf, kf = spec
    q, k, v, d_out = _inputs(grid, qf, kf, heads, dim, dtype, device)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    size_q = q.numel() * q.element_size()
    rows = []

    def monarch_forward():
        with torch.no_grad():
            return monarch_attention_triton(q, k, v, grid, tiling, query_frames=qf, key_frames=kf)

    def monarch_train():
        out = monarch_attention_triton(*leaves, grid, tiling, query_frames=qf, key_frames=kf)
        return torch.autograd.grad(out, leaves, d_out)

    heads_first = [x.transpose(1, 2).detach().requires_grad_(True) for x in (q, k, v)]  # b h n d
    d_out_h = d_out.transpose(1, 2)

    def dense_train(backend):
        def run():
            with sdpa_kernel([backend]):
                out = torch.nn.functional.scaled_dot_product_attention(*heads_first)
            return torch.autograd.grad(out, heads_first, d_out_h)
        return run

    variants = [("monarch forward", monarch_forward), ("monarch forward+backward", monarch_train)]
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION} if device.type == "cuda" \
        else {"math": SDPBackend.MATH}  # the CPU smoke run exercises the code path only
    variants += [(f"sdpa-{b} forward+backward", dense_train(backend)) for b, backend in backends.items()]
    for variant, fn in variants:
        row = {"shape": name, "variant": variant, "grid": grid, "tiling": tiling, "query_frames": qf,
               "key_frames": kf}
        try:
            row.update(_measure(fn, device, warmup, repeats))
            if "backward" in variant:
                row["grads_finite"] = all(bool(torch.isfinite(g).all()) for g in fn())
            if row["peak_extra_bytes"] is not None:
                row["peak_extra_over_q"] = round(row["peak_extra_bytes"] / size_q, 2)
        except Exception as err:  # noqa: BLE001 - one failing variant is reported, the others still run
            row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    fwd = next((r for r in rows if r["variant"] == "monarch forward" and "median_ms" in r), None)
    train = next((r for r in rows if r["variant"] == "monarch forward+backward" and "median_ms" in r), None)
    if fwd and train:
        train["backward_ms"] = round(train["median_ms"] - fwd["median_ms"], 4)
    return rows


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# Monarch forward + backward vs SDPA ({env.get('gpu', 'cpu')}, torch {env['torch']}, "
             f"triton {env['triton']})", "",
             "| shape | variant | median ms | backward ms | min–max ms | first call s | peak extra (× size q) | "
             "grads finite |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | error: {r['error']} | | | | | |")
            continue
        peak = "–" if r.get("peak_extra_over_q") is None else f"{r['peak_extra_over_q']}"
        lines.append(f"| {r['shape']} | {r['variant']} | {r['median_ms']:.3f} | {r.get('backward_ms', '')} | "
                     f"{r['min_ms']:.3f}–{r['max_ms']:.3f} | {r['first_call_s']:.2f} | {peak} | "
                     f"{r.get('grads_finite', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for bench_backward.json / .md")
    p.add_argument("--shapes", nargs="*", choices=sorted(SHAPES), default=list(BENCH_SHAPES))
    p.add_argument("--repeats", type=int, default=10, help="timed calls per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first one")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: toy shape, 2 heads of d = 16, fp32")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        shapes, heads, dim, dtype, warmup, repeats = {"tiny-111": TINY_SHAPES["tiny-111"]}, 2, 16, torch.float32, 0, 1
    else:
        if device.type != "cuda":
            print("needs a CUDA device (or --tiny)", file=sys.stderr)
            return 2
        shapes = {s: SHAPES[s] for s in args.shapes}
        heads, dim, dtype, warmup, repeats = 12, 128, torch.bfloat16, args.warmup, args.repeats
    env = _environment()
    rows = []
    t0 = time.perf_counter()
    for name, spec in shapes.items():
        rows += bench_shape(name, spec, heads, dim, dtype, device, warmup, repeats)
    result = {"environment": env, "heads": heads, "head_dim": dim, "dtype": str(dtype), "batch": 1,
              "warmup": warmup, "repeats": repeats, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_backward.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(env, rows)
    (args.out / "bench_backward.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
