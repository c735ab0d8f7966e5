"""Oracle top-k analysis of one full-scale record on a GPU: coverage quantiles + top-k error at 10 sparsities.

The record is the last Self-Forcing chunk at 480p: 4,680 queries against 32,760 keys (the whole KV cache),
12 heads, d = 128, random float32 q/k/v (N(0,1), scale d^-1/2). Timed, each on identical tensors:

* ``toolkit``: ``toolkit.analysis.topk.topk_tensors`` with the stored LSE (as from a capture), per method
  (``radix``: per-row histogram + exact refinement, no full sort; ``sort``: one sort per row); also the LSE pass;
* ``naive``: the obvious PyTorch version — per head materialise softmax(s·q·kᵀ), ``torch.sort`` every row,
  cumsum for coverage, and for every sparsity build the masked / renormalised map and multiply by V.

Target: all 12 heads, 4 coverage masses and 10 sparsities (both variants, map + output errors) in
<= 2 s on an H100; the speedup over ``naive`` is reported from the same run.

    python benchmarks/bench_analysis.py --out benchmarks/results/

Before timing: a small case (3 heads, 300 queries × 1,000 keys) on the device in float32, against float64 brute
force on the CPU; then, at full scale, radix == sort exactly on the same tiles (2 heads × 256 queries), and the
full toolkit result against ``naive`` (coverage counts, metrics). Timing: ``triton.testing.do_bench(...,
return_mode="median")`` (first call / warm-up excluded and reported separately as ``first_call_s``); on CPU a
median of wall-clock calls (smoke test: ``--device cpu --queries 64 --keys 600 --heads 2 --head-dim 16``).
Prints a table and writes ``bench_analysis.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from pathlib import Path

import torch
from timing import median_ms, sync

import toolkit
from toolkit.analysis import topk
from toolkit.attention import exact

GOAL_S = 2.0
SPARSITIES = (0.0, 0.5, 0.75, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99)  # 10 levels
MASSES = (0.5, 0.9, 0.95, 0.99)


def timed(fn, device: torch.device, rep_ms: float) -> tuple[float, float]:
    """(first call s, median ms of later calls): do_bench on CUDA, else wall clock."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0, median_ms(fn, device, rep_ms)


def naive(q, k, v, scale, masses=MASSES, sparsities=SPARSITIES) -> dict[str, torch.Tensor]:
    """The obvious version: per head, full map, full sort, masked maps per sparsity (float32, float64 sums)."""
    f64 = torch.float64
    n = k.shape[-2]
    keep = topk.keep_counts(n, sparsities)
    cover, mse, fro, out_l2, cos = [], [], [], [], []
    for h in range(q.shape[0]):
        a = torch.softmax((q[h] @ k[h].T) * scale, dim=-1)  # i j
        srt = torch.sort(a, dim=-1, descending=True).values
        cum = srt.cumsum(-1, dtype=f64)
        target = cum[:, -1:] * torch.tensor(masses, dtype=f64, device=a.device)
        cover.append((torch.searchsorted(cum, target) + 1).clamp(max=n))
        av = a @ v[h]
        row = {"mse": [], "fro": [], "out": [], "cos": []}
        for kept in keep:
            trunc = a * (a >= srt[:, kept - 1 : kept])
            renorm = trunc / trunc.sum(-1, keepdim=True)
            per = [[], [], [], []]
            for approx in (renorm, trunc):  # order = topk.VARIANTS
                err = a - approx
                sq = err.square().sum(dtype=f64)
                per[0].append(sq / a.numel())
                per[1].append((sq / a.square().sum(dtype=f64)).sqrt())
                out = approx @ v[h]
                per[2].append(((av - out).square().sum(dtype=f64) / av.square().sum(dtype=f64)).sqrt())
                per[3].append(torch.nn.functional.cosine_similarity(av, out, dim=-1).mean(dtype=f64))
            for name, vals in zip(("mse", "fro", "out", "cos"), per):
                row[name].append(torch.stack(vals))
        mse.append(torch.stack(row["mse"]))
        fro.append(torch.stack(row["fro"]))
        out_l2.append(torch.stack(row["out"]))
        cos.append(torch.stack(row["cos"]))
    return {"coverage_keys": torch.stack(cover).cpu(), "map_mse": torch.stack(mse).cpu(),
            "map_rel_fro": torch.stack(fro).cpu(), "output_rel_l2": torch.stack(out_l2).cpu(),
            "output_cosine": torch.stack(cos).cpu()}


def brute_force64(q, k, v, scale) -> dict[str, torch.Tensor]:
    """float64 on the CPU, same definitions as toolkit.analysis.topk (no ties in random data)."""
    q, k, v = (t.double().cpu() for t in (q, k, v))
    return naive(q, k, v, scale)


def compare(got: dict, ref: dict, rtol: float, cover_slack: float, floor: float = 1e-5) -> dict:
    """Max relative differences and the share of coverage counts that differ (by more than 0 / 1)."""
    res = {}
    d = (got["coverage_keys"].long() - ref["coverage_keys"].long()).abs()
    res["coverage_rows_differing"] = float((d > 0).double().mean())
    res["coverage_max_abs_diff"] = int(d.max())
    ok = res["coverage_rows_differing"] <= cover_slack and res["coverage_max_abs_diff"] <= 1
    for name in ("map_mse", "map_rel_fro", "output_rel_l2", "output_cosine"):
        a, b = got[name].double(), ref[name].double()
        # relative to the value, with a floor of `floor` × the metric's largest value (float32 maps are not exact
        # where the exact value is ~0, e.g. at sparsity 0)
        rel = (a - b).abs() / (b.abs() + floor * b.abs().max()).clamp(min=1e-300)
        res[f"{name}_max_rel_diff"] = float(rel.max())
        ok &= res[f"{name}_max_rel_diff"] <= rtol
    res["ok"] = bool(ok)
    return res


def block_stages(q, k, v, lse, scale, device) -> dict:
    """Per-stage cost (ms) of one query block as topk_tensors sizes it, to show where the time goes."""
    n_heads, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]
    rows = exact.default_query_chunk(n_k, n_heads, topk.BLOCK_ENTRIES)
    qb, lb = q[:, :rows], lse[:, :rows]
    keep = topk.keep_counts(n_k, SPARSITIES)
    pb = exact.probs(qb, k, lb, scale)
    selb = topk.select_radix(pb, keep, MASSES)
    stages = {
        "probs": lambda: exact.probs(qb, k, lb, scale),
        "select_radix": lambda: topk.select_radix(pb, keep, MASSES),
        "select_sort": lambda: topk.select_sort(pb, keep, MASSES),
        "metrics": lambda: topk._block_metrics(pb, v, selb, keep),
    }
    out = {"rows": rows, "blocks": -(-n_q // rows)}
    for name, fn in stages.items():
        out[f"{name}_ms"] = timed(fn, device, 200)[1]
    return out


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "toolkit": toolkit.__version__,
           "device": str(device)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        try:  # record, never change, clocks and power limit
            import subprocess

            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,mig.mode.current",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["nvidia_smi"] = None
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for bench_analysis.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--queries", type=int, default=4680)
    ap.add_argument("--keys", type=int, default=32760)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rep-ms", type=float, default=4000, help="do_bench time budget per measurement (ms)")
    ap.add_argument("--skip-naive", action="store_true", help="do not time the naive baseline")
    ap.add_argument("--with-periodic", action="store_true",
                    help="also time toolkit.analysis.periodic on the same record (one call, wall clock)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device = torch.device(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"env": environment(device), "goal_s": GOAL_S, "masses": MASSES, "sparsities": SPARSITIES,
                    "shape": {"heads": args.heads, "queries": args.queries, "keys": args.keys,
                              "head_dim": args.head_dim}, "checks": {}, "timings": {}, "errors": {}}
    scale = args.head_dim**-0.5

    # ---- 1. small case vs float64 brute force
    g = torch.Generator().manual_seed(args.seed)
    small = [torch.randn(3, n, args.head_dim, generator=g) for n in (300, 1000, 1000)]
    ref = brute_force64(*small, scale)
    for method in ("radix", "sort"):
        try:
            qd, kd, vd = (t.to(device) for t in small)
            got = topk.topk_tensors(qd, kd, vd, scale, masses=MASSES, sparsities=SPARSITIES, method=method)
            result["checks"][f"small_{method}_vs_float64"] = compare(got, ref, rtol=1e-3, cover_slack=0.01)
        except Exception as err:  # keep going: report which path failed
            result["errors"][f"small_{method}"] = traceback.format_exc()
            print(f"small check {method} failed: {err}")

    # ---- 2. full-scale record
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    q, k, v = (torch.randn(args.heads, n, args.head_dim, generator=g).to(device)
               for n in (args.queries, args.keys, args.keys))
    lse = exact.logsumexp(q, k, scale)
    sub = (q[:2, :256], k[:2], v[:2], lse[:2, :256])
    try:
        keep = topk.keep_counts(args.keys, SPARSITIES)
        p = exact.probs(sub[0], sub[1], sub[3], scale)
        a, b = topk.select_radix(p, keep, MASSES), topk.select_sort(p, keep, MASSES)
        result["checks"]["full_radix_equals_sort"] = {
            f: bool(torch.equal(getattr(a, f), getattr(b, f)))
            for f in ("threshold", "n_greater", "n_equal", "coverage_keys")}
        del p, a, b
    except Exception:
        result["errors"]["full_radix_equals_sort"] = traceback.format_exc()

    try:
        result["block_stages"] = block_stages(q, k, v, lse, scale, device)
    except Exception:
        result["errors"]["block_stages"] = traceback.format_exc()

    def lse_pass():
        return exact.logsumexp(q, k, scale)

    runs = {}
    for method in ("radix", "sort"):
        def fn(method=method):
            return topk.topk_tensors(q, k, v, scale, lse, masses=MASSES, sparsities=SPARSITIES, method=method)

        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            first, ms = timed(fn, device, args.rep_ms)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            result["timings"][f"toolkit_{method}"] = {"median_ms": ms, "first_call_s": first, "peak_gib": peak}
            runs[method] = fn()
        except Exception:
            result["errors"][f"toolkit_{method}"] = traceback.format_exc()
    first, ms = timed(lse_pass, device, min(args.rep_ms, 1000))
    result["timings"]["lse_pass"] = {"median_ms": ms, "first_call_s": first}
    if not args.skip_naive:
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            first, ms = timed(lambda: naive(q, k, v, scale), device, args.rep_ms)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            result["timings"]["naive"] = {"median_ms": ms, "first_call_s": first, "peak_gib": peak}
            base = naive(q, k, v, scale)
            for method, got in runs.items():
                result["checks"][f"full_{method}_vs_naive"] = compare(got, base, rtol=2e-3, cover_slack=1e-3,
                                                                          floor=1e-3)
        except Exception:
            result["errors"]["naive"] = traceback.format_exc()

    if args.with_periodic:  # informative only: no goal; grid (21, 30, 52) with the last 3 frames as queries
        from toolkit.analysis import periodic

        grid = (21, 30, 52)
        tpf = grid[1] * grid[2]
        if args.keys == grid[0] * tpf and args.queries == 3 * tpf:
            try:
                key_tokens = torch.arange(args.keys)
                query_tokens = torch.arange(args.keys - args.queries, args.keys)
                sync(device)
                t0 = time.perf_counter()
                periodic.periodic_tensors(q, k, scale, lse, query_tokens, key_tokens, grid)
                sync(device)
                result["timings"]["periodic_one_call"] = {"median_ms": 1e3 * (time.perf_counter() - t0),
                                                          "first_call_s": time.perf_counter() - t0}
            except Exception:
                result["errors"]["periodic"] = traceback.format_exc()

    # ---- report
    t = result["timings"]
    if "naive" in t:
        for method in ("radix", "sort"):
            if f"toolkit_{method}" in t:
                t[f"toolkit_{method}"]["speedup_vs_naive"] = t["naive"]["median_ms"] / t[f"toolkit_{method}"][
                    "median_ms"]
    best = min((t[key]["median_ms"] for key in t if key.startswith("toolkit_")), default=float("nan"))
    result["best_toolkit_s"] = best / 1e3
    result["goal_met"] = bool(best / 1e3 <= GOAL_S)
    print(f"device: {result['env'].get('gpu', device)}  torch {torch.__version__}  triton {result['env']['triton']}")
    print(f"record: {args.heads} heads × {args.queries} queries × {args.keys} keys, d={args.head_dim}; "
          f"{len(MASSES)} coverage masses, {len(SPARSITIES)} sparsities × 2 variants")
    print(f"{'what':<16}{'median ms':>12}{'first call s':>14}{'peak GiB':>10}{'speedup':>9}")
    for name, row in t.items():
        peak = row.get("peak_gib")
        speed = row.get("speedup_vs_naive")
        print(f"{name:<16}{row['median_ms']:>12.1f}{row['first_call_s']:>14.2f}"
              f"{'' if peak is None else f'{peak:.1f}':>10}{'' if speed is None else f'{speed:.1f}x':>9}")
    if "block_stages" in result:
        print("one query block:", ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in result["block_stages"].items()))
    for name, check in result["checks"].items():
        print(f"check {name}: {check}")
    for name in result["errors"]:
        print(f"ERROR in {name} (traceback in JSON)")
    print(f"goal <= {GOAL_S} s: {'met' if result['goal_met'] else 'NOT met'} (best {result['best_toolkit_s']:.3f} s)")
    path = out_dir / "bench_analysis.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
    checks_ok = all(c.get("ok", all(c.values())) for c in result["checks"].values())
    return 0 if checks_ok and not result["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
