"""The two rates a fused Monarch forward would live on, measured before one is written (``kernels/NOTES.md``,
"A fused forward outside Triton: predicted floors").

A fused program owns one query tile and a few columns j, so every program re-reads the key tile's K/V rows that
the two-stage R-step reads once per 104 columns: per head 17 MB of K/V, read by every program of that head from
L2. And its products are thin: N = the few columns it owns. So:

* ``reread``: L2-to-SM read bandwidth when P programs each read one B-byte buffer from start to end (each from its
  own starting block, so programs do not walk in lockstep), for B from 4 MB to 34 MB (one head's K + V at the
  full clip is 16.8 MB; the L2 is 60 MB in two halves), against one read of a 2 GB buffer (HBM);
* ``thin_dot``: tensor-core rate of acc[M, N] += A[M, Kd] · B[Kd, N] with B held in registers and A streamed
  from a small, L2-resident buffer (``.cg`` loads: L2, not L1; the rate at which A arrives is reported too) —
  the K rows of the fused R-step: M = key columns l, N = query columns j —
  for N = 16 (the least ``tl.dot`` takes), 32, 64 and a square 128 reference.

Each kernel is checked against torch on its first launch (sums of every program; products of two programs in
float64) before it is timed; medians of ``triton.testing.do_bench``. Writes ``bench_fused_floor.json``.

    python benchmarks/bench_fused_floor.py --out DIR          # GPU
    TRITON_INTERPRET=1 python benchmarks/bench_fused_floor.py --tiny --out /tmp/floor   # the checks on the CPU
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _reread(X, OUT, n_blocks, BLOCK: tl.constexpr):
    """Program p sums all n_blocks · BLOCK values of X (n_blocks a multiple of 4), starting at block
    (p · 97) mod n_blocks; four loads in flight per step, through L2 only (``.cg``: no L1 hits between programs)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    first = (pid * 97) % n_blocks
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, n_blocks, 4):
        b0 = ((first + i) % n_blocks).to(tl.int64) * BLOCK
        b1 = ((first + i + 1) % n_blocks).to(tl.int64) * BLOCK
        b2 = ((first + i + 2) % n_blocks).to(tl.int64) * BLOCK
        b3 = ((first + i + 3) % n_blocks).to(tl.int64) * BLOCK
        x0 = tl.load(X + b0 + offs, cache_modifier=".cg")
        x1 = tl.load(X + b1 + offs, cache_modifier=".cg")
        x2 = tl.load(X + b2 + offs, cache_modifier=".cg")
        x3 = tl.load(X + b3 + offs, cache_modifier=".cg")
        acc += (x0.to(tl.float32) + x1.to(tl.float32)) + (x2.to(tl.float32) + x3.to(tl.float32))
    tl.store(OUT + pid, tl.sum(acc, 0))


@triton.jit
def _thin_dot(A, B, OUT, n_iter, n_tiles, M: tl.constexpr, N: tl.constexpr, KD: tl.constexpr,
              UPCAST: tl.constexpr):
    """acc[M, N] = Σ_it A[(it + pid) mod n_tiles] · B: A tiles [M, KD] re-read from a small buffer, B [KD, N]
    loaded once."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, M)
    offs_n = tl.arange(0, N)
    offs_k = tl.arange(0, KD)
    b = tl.load(B + offs_k[:, None] * N + offs_n[None, :])
    if UPCAST:  # the CPU interpreter cannot multiply bf16 in tl.dot
        b = b.to(tl.float32)
    acc = tl.zeros((M, N), dtype=tl.float32)
    tile = offs_m[:, None] * KD + offs_k[None, :]
    for it in range(0, n_iter):
        a = tl.load(A + ((it + pid) % n_tiles) * (M * KD) + tile, cache_modifier=".cg")  # from L2, not L1
        if UPCAST:
            a = a.to(tl.float32)
        acc = tl.dot(a, b, acc)
    tl.store(OUT + pid.to(tl.int64) * M * N + offs_m[:, None] * N + offs_n[None, :], acc)


def reread(buffer_bytes: int, programs: int, device: str, block: int, warps: int, check: bool) -> tuple:
    """(launcher, bytes read per launch); checked against torch once when ``check``."""
    n = buffer_bytes // 2 // (4 * block) * (4 * block)
    x = torch.randn(n, device=device).to(torch.bfloat16)
    out = torch.full((programs,), float("nan"), device=device)

    def run():
        _reread[(programs,)](x, out, n // block, BLOCK=block, num_warps=warps)

    if check:
        run()
        want = x.double().sum().item()
        got = out.double()
        assert torch.isfinite(got).all(), "reread: a program wrote nothing"
        err = (got - want).abs().max().item() / max(x.double().abs().sum().item(), 1.0)
        assert err < 1e-5, f"reread: relative error {err:.2e}"
    return run, programs * n * 2


def thin_dot(m: int, n: int, kd: int, programs: int, n_iter: int, n_tiles: int, device: str, warps: int,
             stages: int, check: bool) -> tuple:
    """(launcher, FLOPs per launch, bytes of A read per launch); checked against float64 on two programs once
    when ``check``."""
    upcast = os.environ.get("TRITON_INTERPRET") == "1"
    a = torch.randn(n_tiles, m, kd, device=device).to(torch.bfloat16)
    b = torch.randn(kd, n, device=device).to(torch.bfloat16)
    out = torch.full((programs, m, n), float("nan"), device=device)

    def run():
        _thin_dot[(programs,)](a, b, out, n_iter, n_tiles, M=m, N=n, KD=kd, UPCAST=upcast, num_warps=warps,
                               num_stages=stages)

    if check:
        run()
        for pid in (0, programs - 1):
            idx = [(it + pid) % n_tiles for it in range(n_iter)]
            want = a[idx].double().sum(0) @ b.double()
            err = ((out[pid].double() - want).norm() / want.norm()).item()
            assert err < 1e-3, f"thin_dot {m}x{n}x{kd}: relative error {err:.2e} (program {pid})"
    return run, programs * n_iter * 2 * m * n * kd, programs * n_iter * m * kd * 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for bench_fused_floor.json")
    p.add_argument("--tiny", action="store_true", help="small sizes: the checks alone (CPU interpreter)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    sms = torch.cuda.get_device_properties(0).multi_processor_count if gpu else 2
    bench = (lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")) if gpu else None
    mb = 1 << 20
    rows = []

    sizes = (4, 8, 17, 34) if gpu else (1,)
    for size_mb in sizes:
        for per_sm in ((1, 4, 8) if gpu else (1,)):
            programs = sms * per_sm
            run, nbytes = reread(size_mb * mb if gpu else 64 * 1024, programs, device, 4096 if gpu else 256,
                                 8, check=True)
            row = dict(kind="reread", buffer_MB=size_mb, programs=programs, bytes=nbytes)
            if gpu:
                row["median_ms"] = bench(run)
                row["TB_per_s"] = nbytes / (row["median_ms"] * 1e-3) / 1e12
            rows.append(row)
    if gpu:  # one pass over a buffer much larger than the L2: device memory
        n = (2 << 30) // 2
        x = torch.randn(n, device=device).to(torch.bfloat16)
        ms = bench(lambda: x.sum(dtype=torch.float32))
        rows.append(dict(kind="hbm read (torch.sum, 2 GiB)", bytes=n * 2, median_ms=ms,
                         TB_per_s=n * 2 / (ms * 1e-3) / 1e12))
        del x

    shapes = ((64, 16, 128), (128, 16, 64), (64, 32, 128), (64, 64, 128), (128, 128, 128)) if gpu \
        else ((16, 16, 32),)
    for m, n, kd in shapes:
        for warps, stages in ((4, 3), (8, 3)) if gpu else ((4, 2),):
            programs, n_iter = (sms * 4, 2000) if gpu else (3, 5)
            run, flops, a_bytes = thin_dot(m, n, kd, programs, n_iter, 64, device, warps, stages, check=True)
            row = dict(kind="thin_dot", M=m, N=n, K=kd, warps=warps, stages=stages, programs=programs,
                       iterations=n_iter, flops=flops, a_bytes=a_bytes)
            if gpu:
                row["median_ms"] = bench(run)
                row["TFLOP_per_s"] = flops / (row["median_ms"] * 1e-3) / 1e12
                row["A_TB_per_s"] = a_bytes / (row["median_ms"] * 1e-3) / 1e12
            rows.append(row)

    result = dict(gpu=torch.cuda.get_device_name() if gpu else "cpu (interpreter: checks only)",
                  torch=torch.__version__, triton=triton.__version__, multiprocessors=sms,
                  l2_bytes=getattr(torch.cuda.get_device_properties(0), "L2_cache_size", None) if gpu else None,
                  timing="triton.testing.do_bench median (warm-up 25 ms, rep 200 ms); compile and checks "
                         "before timing, not timed",
                  rows=rows)
    with open(os.path.join(args.out, "bench_fused_floor.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"{result['gpu']}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}")
    for r in rows:
        what = (f"reread {r['buffer_MB']} MB x {r['programs']} programs" if r["kind"] == "reread"
                else f"thin_dot M{r['M']} N{r['N']} K{r['K']} {r['warps']}w/{r['stages']}s"
                if r["kind"] == "thin_dot" else r["kind"])
        rate = (f"{r['TB_per_s']:.2f} TB/s" if "TB_per_s" in r else
                f"{r['TFLOP_per_s']:.0f} TFLOP/s, A at {r['A_TB_per_s']:.1f} TB/s" if "TFLOP_per_s" in r
                else "checked")
        print(f"  {what:42s} {r.get('median_ms', float('nan')):8.3f} ms  {rate}")


if __name__ == "__main__":
    main()
