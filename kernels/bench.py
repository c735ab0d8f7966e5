"""Benchmark: Monarch Triton kernels (two-stage v1 / v2, the one-launch streamed kernel, and, on CUDA where it
applies, the fused CUDA forward of ``monarch_fused``) vs PyTorch SDPA (cuDNN, flash, efficient) at the paper's
shapes.

Run as ``toolkit bench --out DIR`` or ``python benchmarks/bench_kernels.py --out DIR`` (same arguments). Every
variant is checked against a reference before it is timed, and a failure of one variant (compile error, OOM,
wrong result) is recorded and the run goes on. Per shape and variant it reports the median time
(``triton.testing.do_bench``, L2 flushed, CUDA events; two interleaved rounds), real and dense-equivalent
TFLOP/s, peak extra memory, and the cold-start cost (first call: compile + tuning) separately, with where the
launch configs came from (tuned now / cached on disk / heuristic default). Writes ``DIR/bench_kernels.json``,
``DIR/bench_kernels.md`` and prints the markdown table last.

Checks: dense backends against fp32 softmax attention on 256 sampled query rows (all heads); Monarch against the
PyTorch reference ``toolkit.attention.monarch.monarch_attention`` in fp32 on the GPU for ``--check-heads`` heads;
the analysis kernels (``--analysis``) against the reference's factors/errors on one head.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# name -> (grid, tiling, query_frames, key_frames); None tiling = dense baselines only
SHAPES = {  # the goal shapes first
    "full-111": ((21, 30, 52), (1, 1, 1), (0, 21), (0, 21)),
    "ar-111": ((21, 30, 52), (1, 1, 1), (18, 21), (0, 21)),
    "full-121": ((21, 30, 52), (1, 2, 1), (0, 21), (0, 21)),
    "ar-121": ((21, 30, 52), (1, 2, 1), (18, 21), (0, 21)),
    "full-311": ((21, 30, 52), (3, 1, 1), (0, 21), (0, 21)),
    "720p-311": ((21, 45, 80), (3, 1, 1), (0, 21), (0, 21)),
}
# Tiny shapes for a CPU smoke run through the Triton interpreter (--tiny): same code paths, no timing value.
TINY_SHAPES = {
    "tiny-111": ((3, 3, 5), (1, 1, 1), (0, 3), (0, 3)),
    "tiny-ar-121": ((6, 4, 5), (1, 2, 1), (3, 6), (0, 6)),
}
DENSE_BACKENDS = ("cudnn", "flash", "efficient")
# Target times in ms, checked by the benchmark (H100, bf16, B=1, 12 heads, d=128)
GOALS_MS = {"full-111": 3.1, "ar-111": 0.56}


@dataclass
class Row:
    shape: str
    variant: str
    ok: bool = False
    error: str | None = None
    check_rel_err: float | None = None
    median_ms: list[float] = field(default_factory=list)  # one per round
    p20_ms: float | None = None
    p80_ms: float | None = None
    real_tflops: float | None = None
    dense_equiv_tflops: float | None = None
    flops: float | None = None
    peak_extra_bytes: int | None = None
    peak_extra_over_q: float | None = None
    first_call_s: float | None = None
    tuning: list[dict] = field(default_factory=list)
    stage_ms: dict | None = None  # Monarch: median ms of the rows (R-step) and cols (L-step) kernels alone
    reload_from_disk: str | None = None  # Monarch: where configs came from after forgetting them in memory
    version: str | None = None  # Monarch: R-step kernel version (kernels/monarch.py _VERSIONS), "streamed" or "fused"
    skipped: str | None = None  # why the variant was not run (not a failure), e.g. "needs CUDA"

    @property
    def ms(self) -> float | None:
        return sorted(self.median_ms)[len(self.median_ms) // 2] if self.median_ms else None


def monarch_flops(grid: Sequence[int], tiling: Sequence[int], query_frames: Sequence[int] | None = None,
                  key_frames: Sequence[int] | None = None, heads: int = 12, head_dim: int = 128, batch: int = 1,
                  block_causal_frames: int | None = None) -> float:
    """FLOPs the two Monarch kernels execute (2 per multiply-add, no padding): 3·b2²·d per (a, f, k, j) row pair
    for the R-step products, 2·b1·d per (a, f, k, j, i) for the L-step, summed over allowed tile pairs."""
    from toolkit.kernels._common import TileGeometry, key_tiles_allowed

    query_frames = tuple(query_frames) if query_frames is not None else (0, grid[0])
    key_frames = tuple(key_frames) if key_frames is not None else query_frames
    gq = TileGeometry(tuple(grid), tuple(tiling), query_frames)
    gk = TileGeometry(tuple(grid), tuple(tiling), key_frames)
    pairs = int(key_tiles_allowed(gq, gk, block_causal_frames).sum())
    per_pair = gq.b1 * gq.b2 * head_dim * (3 * gq.b2 + 2 * gq.b1)
    return 2.0 * per_pair * pairs * heads * batch


def dense_flops(n_q: int, n_k: int, heads: int = 12, head_dim: int = 128, batch: int = 1) -> float:
    return 4.0 * n_q * n_k * head_dim * heads * batch


def minimum_bytes(n_q: int, n_k: int, heads: int = 12, head_dim: int = 128, batch: int = 1,
                  element_size: int = 2) -> float:
    """Each of q, k, v read once and out written once."""
    return float((2 * n_q + 2 * n_k) * heads * head_dim * batch * element_size)


def _environment() -> dict:
    import torch

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "host": platform.node(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), sm_count=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}", gpu_memory_gb=round(p.total_memory / 2**30, 1))
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--format=csv", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                 "power.limit,mig.mode.current"], capture_output=True, text=True, timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            env["nvidia_smi"] = f"unavailable: {err}"
    env["kernel_cache"] = str(_kernel_cache_path())
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                           cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def _kernel_cache_path():
    from toolkit.kernels._common import cache_path

    return cache_path()


def _time(fn, rounds_out: list[float], cuda: bool) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile ms of ``fn`` (do_bench on CUDA; a host timer under the interpreter)."""
    if cuda:
        import triton.testing

        try:
            times = sorted(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all"))
        except (TypeError, ValueError, AssertionError):  # a do_bench without return_mode="all"
            med = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            times = [med]
    else:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
    pick = lambda f: times[min(len(times) - 1, int(f * (len(times) - 1) + 0.5))]  # noqa: E731
    med = pick(0.5)
    rounds_out.append(med)
    return med, pick(0.2), pick(0.8)


def _peak_extra(fn, cuda: bool) -> int | None:
    import torch

    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    import torch

    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("nan")
    return ((x - ref).norm() / ref.norm()).item()


def _inputs(grid, qf, kf, heads, dim, dtype, device, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    tpf = grid[1] * grid[2]
    n_q, n_k = (qf[1] - qf[0]) * tpf, (kf[1] - kf[0]) * tpf
    return tuple(torch.randn(1, n, heads, dim, generator=g).to(device=device, dtype=dtype) for n in (n_q, n_k, n_k))


def _dense_fn(name: str, qh, kh, vh, scale):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]

    def run():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(qh, kh, vh, scale=scale)

    return run


def _dense_reference_rows(q, k, v, rows, scale):
    """fp32 softmax attention for query ``rows`` (all heads): ``h r d``."""
    import torch

    qs = q[0, rows].transpose(0, 1).float()  # h r d
    kh, vh = k[0].transpose(0, 1).float(), v[0].transpose(0, 1).float()
    p = torch.softmax(qs @ kh.transpose(-1, -2) * scale, dim=-1)
    return p @ vh


def _bench_shape(name: str, spec, args, heads: int, dim: int, dtype, cuda: bool, rows: list[Row]) -> dict:
    """Check and time every variant at one shape; appends to ``rows``, returns the shape's accounting."""
    import torch
    from toolkit.kernels import _common
    from toolkit.kernels.monarch import _VERSIONS, FUSED, STREAMED, _default_version, _forward

    from toolkit.attention.monarch import monarch_attention

    grid, tiling, qf, kf = spec
    device = "cuda" if cuda else "cpu"
    print(f"== {name}: grid {grid} tiling {tiling} query frames {qf} key frames {kf}", flush=True)
    q, k, v = _inputs(grid, qf, kf, heads, dim, dtype, device)
    scale = dim**-0.5
    n_q, n_k = q.shape[1], k.shape[1]
    q_bytes = q.numel() * q.element_size()
    dflops = dense_flops(n_q, n_k, heads, dim)
    mflops = monarch_flops(grid, tiling, qf, kf, heads, dim)
    info = dict(grid=grid, tiling=tiling, query_frames=qf, key_frames=kf, n_q=n_q, n_k=n_k, heads=heads,
                head_dim=dim, dtype=str(dtype), dense_flops=dflops, monarch_flops=mflops, flop_ratio=mflops / dflops,
                q_bytes=q_bytes, min_bytes=minimum_bytes(n_q, n_k, heads, dim, 1, q.element_size()))

    variants = {}  # name -> (fn, check(out) -> rel err, flops)
    if not args.no_dense and not cuda:  # the SDPA baselines are the GPU kernels (cuDNN, flash, efficient)
        rows.extend(Row(name, f"sdpa-{backend}", skipped="needs CUDA") for backend in DENSE_BACKENDS)
    elif not args.no_dense:  # contiguous b h n d, as SDPA prefers
        qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        sample = torch.randperm(n_q, generator=torch.Generator().manual_seed(1))[:256].to(device)
        ref_rows = _dense_reference_rows(q, k, v, sample, scale)
        for backend in DENSE_BACKENDS:
            variants[f"sdpa-{backend}"] = (_dense_fn(backend, qh, kh, vh, scale),
                                           lambda out: _rel(out[0][:, sample], ref_rows), dflops)

    def monarch_fn(scratch_bytes=None, stages="both", version=None):
        return lambda: _forward(q, k, v, grid, tiling, query_frames=qf, key_frames=kf, scale=scale,
                                autotune=not args.no_autotune, scratch_bytes=scratch_bytes, stages=stages,
                                version=version)

    def monarch_check(out):
        hs = slice(0, args.check_heads)
        ref = monarch_attention(q[:, :, hs].float(), k[:, :, hs].float(), v[:, :, hs].float(), grid, tiling,
                                query_frames=qf, key_frames=kf, scale=scale)
        return _rel(out[:, :, hs], ref)

    # the default R-step version as "monarch(...)", the other versions as "monarch(...)-vN" rows of their own
    # (listed first, so that a table keeping one Monarch column per shape keeps the default's row)
    default = _default_version(grid[2] // tiling[2])
    versions = {}
    if default == "v2":  # v1 also runs every shape; v2 only those with b2 <= 64
        for ver in _VERSIONS:
            if ver != default:
                variants[f"monarch{tiling}-{ver}"] = (monarch_fn(version=ver), monarch_check, mflops)
                versions[f"monarch{tiling}-{ver}"] = ver
    variants[f"monarch{tiling}"] = (monarch_fn(version=default), monarch_check, mflops)
    versions[f"monarch{tiling}"] = default
    if default == "v2":  # both steps in one launch, intermediates in a ring of group slots (where v2 applies)
        variants[f"monarch{tiling}-{STREAMED}"] = (monarch_fn(version=STREAMED), monarch_check, mflops)
        versions[f"monarch{tiling}-{STREAMED}"] = STREAMED
    if cuda:  # the one-kernel CUDA forward, where its tile limits allow
        from toolkit.kernels._common import TileGeometry
        from toolkit.kernels.monarch_fused import fused_unsupported

        why = fused_unsupported(q, TileGeometry(grid, tiling, qf))
        if why:
            rows.append(Row(name, f"monarch{tiling}-{FUSED}", skipped=why))
        else:
            variants[f"monarch{tiling}-{FUSED}"] = (monarch_fn(version=FUSED), monarch_check, mflops)
            versions[f"monarch{tiling}-{FUSED}"] = FUSED
    extra = {}
    if args.low_memory:  # scratch ≤ size(q) (head groups of one query tile): with the output, extra ≤ 2 × size(q)
        extra["lowmem"] = dict(scratch_bytes=q_bytes)
    for tag, kw in extra.items():
        variants[f"monarch{tiling}-{tag}"] = (monarch_fn(version=default, **kw), monarch_check, mflops)
        versions[f"monarch{tiling}-{tag}"] = default
        if default == "v2":  # the streamed kernel's ring within the same budget
            variants[f"monarch{tiling}-{STREAMED}-{tag}"] = (monarch_fn(version=STREAMED, **kw), monarch_check, mflops)
            versions[f"monarch{tiling}-{STREAMED}-{tag}"] = STREAMED

    # check + cold start per variant, then interleaved timing rounds
    live = {}
    bound = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for vname, (fn, check, flops) in variants.items():
        row = Row(name, vname, flops=flops, version=versions.get(vname))
        rows.append(row)
        try:
            n_log = len(_common.TUNING_LOG)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            row.first_call_s = time.perf_counter() - t0
            row.tuning = _common.TUNING_LOG[n_log:]
            row.check_rel_err = check(fn())  # a fresh call with the chosen configs
            if not row.check_rel_err < bound:
                row.error = f"check failed: rel err {row.check_rel_err:.3g} (bound {bound})"
                continue
            row.peak_extra_bytes = _peak_extra(fn, cuda)
            if row.peak_extra_bytes is not None:
                row.peak_extra_over_q = row.peak_extra_bytes / q_bytes
            live[vname] = (row, fn)
        except Exception as err:  # noqa: BLE001 - report and go on with the next variant
            row.error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            traceback.print_exc()
        finally:
            if cuda:
                torch.cuda.empty_cache()
    for _ in range(args.rounds):
        for row, fn in live.values():
            try:
                _, row.p20_ms, row.p80_ms = _time(fn, row.median_ms, cuda)
                row.ok = True
            except Exception as err:  # noqa: BLE001
                row.error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                row.ok = False
    for vname, (row, fn) in live.items():  # launch-config source and per-stage split of the two-stage kernels
        if row.ok and vname.startswith("monarch") and not any(vname.endswith(f"-{tag}") for tag in (*extra, FUSED)):
            try:  # would a new process re-tune? forget the in-memory choice and look again
                _common._PICKED.clear()
                n_log = len(_common.TUNING_LOG)
                fn()
                row.reload_from_disk = ", ".join(t["source"] for t in _common.TUNING_LOG[n_log:])
            except Exception as err:  # noqa: BLE001
                row.reload_from_disk = f"{type(err).__name__}: {err}"[:200]
            if row.version == STREAMED:  # one launch: no stages to time apart
                continue
            try:  # per-stage split (configs are cached by now)
                row.stage_ms = {st: round(_time(monarch_fn(stages=st, version=row.version), [], cuda)[0], 4)
                                for st in ("rows", "cols")}
            except Exception as err:  # noqa: BLE001
                row.stage_ms = {"error": f"{type(err).__name__}: {err}"[:200]}
    for row, _ in live.values():
        if row.ok and row.ms:
            row.real_tflops = row.flops / (row.ms * 1e-3) / 1e12
            row.dense_equiv_tflops = dflops / (row.ms * 1e-3) / 1e12
        print(_fmt_row(row), flush=True)
    return info


def run_benchmark(args: argparse.Namespace, save: Callable[[dict], None] | None = None) -> dict:
    """All shapes; ``save(result)`` is called after each shape so a run cut short keeps what it measured."""
    import torch

    cuda = torch.cuda.is_available()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    shapes = TINY_SHAPES if args.tiny else SHAPES
    heads, dim = (2, 16) if args.tiny else (args.heads, args.dim)
    env = _environment()
    rows: list[Row] = []
    shape_info = {}
    for name in args.shapes or list(shapes):
        try:
            shape_info[name] = _bench_shape(name, shapes[name], args, heads, dim, dtype, cuda, rows)
        except Exception as err:  # noqa: BLE001 - e.g. OOM building the inputs
            rows.append(Row(name, "(shape)", error=f"{type(err).__name__}: {err}".splitlines()[0][:300]))
            traceback.print_exc()
        if cuda:
            torch.cuda.empty_cache()
        if save is not None:
            save(_result(env, shape_info, rows))
    return _result(env, shape_info, rows)


def _result(env: dict, shape_info: dict, rows: list[Row]) -> dict:
    return {"environment": env, "shapes": dict(shape_info), "goals_ms": GOALS_MS,
            "rows": [r.__dict__ | {"ms": r.ms} for r in rows], "analysis": None}


def _fmt_row(r: Row) -> str:
    def f(x, spec):
        return "–" if x is None else format(x, spec)

    tuning = ", ".join(f"{t['source']} {t['seconds']:.1f}s" for t in r.tuning) or "–"
    if r.reload_from_disk:
        tuning += f"; next process: {r.reload_from_disk}"
    status = "ok" if r.ok else f"skipped ({r.skipped})" if r.skipped else (r.error or "not run")
    if r.version:
        status += f" {r.version}"
    if r.stage_ms and "rows" in r.stage_ms:
        status += f" (rows {r.stage_ms['rows']:.3f} + cols {r.stage_ms['cols']:.3f} ms)"
    spread = f"{r.p20_ms:.3f}–{r.p80_ms:.3f}" if r.p20_ms is not None else "–"
    rounds = "/".join(f"{m:.3f}" for m in r.median_ms) or "–"
    return (f"| {r.shape} | {r.variant} | {f(r.ms, '.3f')} | {rounds} | {spread} | {f(r.real_tflops, '.0f')} | "
            f"{f(r.dense_equiv_tflops, '.0f')} | {f(r.peak_extra_bytes and r.peak_extra_bytes / 2**20, '.0f')} | "
            f"{f(r.peak_extra_over_q, '.2f')} | {f(r.check_rel_err, '.1e')} | {f(r.first_call_s, '.1f')} | "
            f"{tuning} | {status} |")


HEADER = ("| shape | variant | median ms | per-round medians | p20–p80 ms | real TFLOP/s | dense-equiv TFLOP/s | "
          "peak extra MiB | extra / size(q) | check rel err | first call s | configs (tuning) | status |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["# Monarch kernel benchmark", "",
             f"GPU: {env.get('gpu', 'none (interpreter)')}; torch {env['torch']}, triton {env['triton']}, "
             f"CUDA {env['cuda']}, cuDNN {env['cudnn']}", ""]
    if env.get("nvidia_smi"):
        lines += ["```", env["nvidia_smi"], "```", ""]
    lines += ["| shape | N_q × N_k | tiling | dense GFLOP | Monarch GFLOP | FLOP ratio | min bytes (MB) |",
              "|---|---|---|---|---|---|---|"]
    for name, s in result["shapes"].items():
        lines.append(f"| {name} | {s['n_q']} × {s['n_k']} | {tuple(s['tiling'])} | {s['dense_flops'] / 1e9:.0f} | "
                     f"{s['monarch_flops'] / 1e9:.1f} | {s['flop_ratio']:.4f} | {s['min_bytes'] / 1e6:.0f} |")
    lines += ["", HEADER]
    for r in result["rows"]:
        row = Row(**{k: v for k, v in r.items() if k != "ms"})
        lines.append(_fmt_row(row))
    lines += ["", "Goals (H100): " + ", ".join(f"{k} ≤ {v} ms" for k, v in result["goals_ms"].items())
              + "; tiled configs faster than dense; extra memory ≤ 2× size(q); tuning ≤ 30 s per shape.",
              "first call = compile + tuning (cold start), excluded from the medians. "
              "'cached' = launch configs read from the on-disk tuning cache."]
    if result.get("resources"):
        lines += ["", "## Compiled resources (default configs)", "",
                  "| kernel | blocks | warps | registers | spill ld/st | shared KB | HGMMA | HMMA |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["resources"]:
            if "error" in r:
                lines.append(f"| {r.get('kernel', '?')} | error: {r['error']} | | | | | | |")
                continue
            blocks = ", ".join(f"{k}={v}" for k, v in r.items() if k.startswith("BLOCK") or k == "EXPLICIT")
            lines.append(f"| {r['kernel']} | {blocks} | {r['num_warps']} | {r['registers']} | {r['spill_loads']}/"
                         f"{r['spill_stores']} | {r['shared_bytes'] / 1024:.0f} | {r['HGMMA']} | {r['HMMA']} |")
    if result.get("analysis"):
        lines += ["", "## Analysis kernels", "", "| kernel | shape | median ms | check rel err | status |",
                  "|---|---|---|---|---|"]
        for a in result["analysis"]:
            err = a.get("check_rel_err")
            err = "–" if err is None else f"{err:.1e}"
            lines.append(f"| {a['kernel']} | {a['shape']} | {a.get('ms', '–')} | {err} | "
                         f"{a.get('error') or 'ok'} {a.get('note', '')} |")
    return "\n".join(lines) + "\n"


def run_analysis(args: argparse.Namespace) -> list[dict]:
    """Explicit-factor M·V and the streaming comparison at one shape (last AR chunk, framewise), one head
    checked against the reference, all heads timed."""
    import torch
    from toolkit.kernels import apply_factors, monarch_compare

    from toolkit.attention.monarch import exact_projection, map_errors, monarch_attention
    from toolkit.grid import MonarchLayout

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = "tiny-ar-121" if args.tiny else "ar-111"
    grid, tiling, qf, kf = (TINY_SHAPES if args.tiny else SHAPES)[name]
    heads, dim = (1, 16) if args.tiny else (args.heads, args.dim)
    q, k, v = _inputs(grid, qf, kf, heads, dim, torch.bfloat16, device, seed=2)
    layout = MonarchLayout.aligned(grid, "fh,w", tiling)
    results = []

    # explicit factors: the variational factors of head 0 (fp32) replicated to all heads
    entry = {"kernel": "apply_factors (M·V, row sums)", "shape": name}
    results.append(entry)
    try:
        ref_out, factors = monarch_attention(q[:, :, :1].float(), k[:, :, :1].float(), v[:, :, :1].float(), grid,
                                             tiling, query_frames=qf, key_frames=kf, return_factors=True)
        out, rows = apply_factors(factors, v[:, :, :1])
        entry["check_rel_err"] = max(_rel(out, ref_out), _rel(rows, torch.ones_like(rows)))
        factors.L = factors.L.expand(1, heads, *factors.L.shape[2:]).contiguous()
        factors.R = factors.R.expand(1, heads, *factors.R.shape[2:]).contiguous()
        entry["ms"] = round(_time(lambda f=factors: apply_factors(f, v), [], cuda)[0], 3)
        entry["note"] = f"{heads} heads"
    except Exception as err:  # noqa: BLE001
        entry["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        traceback.print_exc()

    for mode in ("implicit", "explicit"):
        entry = {"kernel": f"monarch_compare ({mode})", "shape": name}
        results.append(entry)
        try:
            q1, k1, v1 = (x[:, :, :1] for x in (q, k, v))
            qh, kh, vh = (x.transpose(1, 2).float() for x in (q1, k1, v1))
            if mode == "implicit":
                _, factors = monarch_attention(q1.float(), k1.float(), v1.float(), grid, tiling, query_frames=qf,
                                               key_frames=kf, return_factors=True)
                got = monarch_compare(q1, k1, v1, grid, tiling, query_frames=qf, key_frames=kf)
            else:
                _, factors = exact_projection(qh, kh, layout, query_frames=qf, key_frames=kf, return_factors=True)
                got = monarch_compare(q1, k1, v1, grid, tiling, query_frames=qf, key_frames=kf, factors=factors)
            want = map_errors(qh, kh, factors, v=vh)
            sq, out_sq = got.map_sq_err.sum().item(), got.out_err.square().sum().item()
            entry["check_rel_err"] = max(abs(sq - want.sq_error.sum().item()) / want.sq_error.sum().item(),
                                         abs(out_sq - want.out_sq_error.sum().item()) / want.out_sq_error.sum().item())
            if mode == "implicit":
                entry["ms"] = round(_time(lambda: monarch_compare(q, k, v, grid, tiling, query_frames=qf,
                                                                  key_frames=kf), [], cuda)[0], 3)
                entry["note"] = f"{heads} heads"
        except Exception as err:  # noqa: BLE001
            entry["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            traceback.print_exc()
        if cuda:
            torch.cuda.empty_cache()
    return results


def _resources() -> list[dict]:
    """Registers / spills / wgmma use of the default configs, compiled ahead of time (kernels/resources.py)."""
    import torch

    try:
        from toolkit.kernels.resources import compile_report, default_kernels

        cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
        reports = []
        for fn, ptrs, consts, warps, stages in default_kernels(128):
            try:
                reports.append(compile_report(fn, ptrs, consts, warps, stages, cap[0] * 10 + cap[1]))
            except Exception as err:  # noqa: BLE001
                reports.append({"kernel": fn.__name__, "error": f"{type(err).__name__}: {err}"[:200]})
        return reports
    except Exception as err:  # noqa: BLE001 - Triton internals differ between versions
        return [{"error": f"{type(err).__name__}: {err}"[:200]}]


BENCH_OUTPUTS = ("bench_kernels.json", "bench_kernels.md")  # what --out receives; existing ones need --force


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="bench_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True,
                   help="directory for bench_kernels.json / bench_kernels.md (results already there are kept unless "
                        "--force)")
    p.add_argument("--force", action="store_true", help="replace bench_kernels.json / .md already in --out")
    p.add_argument("--shapes", nargs="*", choices=sorted({*SHAPES, *TINY_SHAPES}), default=None,
                   help="subset of shapes (default: all)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (default 12; --tiny uses 2)")
    p.add_argument("--dim", type=int, default=128, help="head dim, 64 or 128 (default 128; --tiny uses 16)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds per shape")
    p.add_argument("--check-heads", type=int, default=1, help="heads checked against the PyTorch reference")
    p.add_argument("--no-autotune", action="store_true", help="use cached or heuristic launch configs only")
    p.add_argument("--no-dense", action="store_true", help="skip the SDPA baselines")
    p.add_argument("--low-memory", action="store_true",
                   help="also time Monarch with intermediates limited to size(q), i.e. extra memory with the output "
                        "≤ 2x size(q): the two-stage kernels in chunks of one query tile of a head group (more, "
                        "smaller launches) and the streamed kernel with a ring cut to that budget")
    p.add_argument("--analysis", action="store_true",
                   help="also check and time apply_factors and monarch_compare at the last AR chunk")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test through the interpreter)")
    return p


def check_args(args: argparse.Namespace, backward: bool = False) -> None:
    """Refuse, in one line and before any output is touched, what cannot be benchmarked: no GPU without --tiny,
    shapes of the other mode, and counts that are not positive."""
    import torch

    from toolkit.errors import ToolkitError

    if not args.tiny and not torch.cuda.is_available():
        raise ToolkitError("the kernel benchmark needs a CUDA GPU; --tiny runs a CPU smoke test through the Triton "
                           "interpreter")
    allowed = TINY_SHAPES if args.tiny else SHAPES
    wrong = [s for s in args.shapes or () if s not in allowed]
    if wrong:
        raise ToolkitError(f"--shapes {' '.join(wrong)}: {'--tiny' if args.tiny else 'the GPU run'} has "
                           f"{', '.join(allowed)}")
    if backward:
        return
    for name in ("rounds", "heads", "check_heads"):
        if getattr(args, name) < 1:
            raise ToolkitError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.check_heads > args.heads:
        raise ToolkitError(f"--check-heads {args.check_heads}: more than the {args.heads} --heads")
    if args.dim not in (64, 128):
        raise ToolkitError(f"--dim {args.dim}: the benchmark times head dims 64 and 128")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    from toolkit.errors import ToolkitError, check_output, prepare_output_dir

    args = args or build_parser().parse_args(argv)
    try:  # the toolkit's overwrite policy, also when run as benchmarks/bench_kernels.py (one line, exit 2)
        check_args(args)
        note = check_output(args.out, force=getattr(args, "force", False), folder=True, outputs=BENCH_OUTPUTS)
        prepare_output_dir(args.out, folder=True)
    except ToolkitError as err:  # OutputError too
        print(f"toolkit bench: error: {err}", file=sys.stderr)
        return 2
    if note:
        print(f"toolkit bench: {note}", file=sys.stderr)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    t0 = time.perf_counter()

    def save(result: dict) -> None:
        with open(os.path.join(args.out, "bench_kernels.json"), "w") as fh:
            json.dump(result, fh, indent=1, default=str)
        with open(os.path.join(args.out, "bench_kernels.md"), "w") as fh:
            fh.write(_markdown(result))

    result = run_benchmark(args, save)
    if args.analysis:
        try:
            result["analysis"] = run_analysis(args)
        except Exception as err:  # noqa: BLE001
            result["analysis"] = [{"kernel": "analysis", "shape": "-", "error": f"{type(err).__name__}: {err}"}]
    if not args.tiny:
        result["resources"] = _resources()
    result["wall_s"] = time.perf_counter() - t0
    result["tuning_cache"] = {"path": str(_kernel_cache_path()), "exists": _kernel_cache_path().exists()}
    save(result)
    print(_markdown(result))
    failed = [r for r in result["rows"] if not r["ok"] and not r.get("skipped")]
    n_skipped = sum(1 for r in result["rows"] if r.get("skipped"))
    print(f"{len(result['rows']) - len(failed) - n_skipped} variants ok, {n_skipped} skipped, {len(failed)} failed; "
          f"wall {result['wall_s']:.0f} s", file=sys.stderr)
    return 0 if not failed else 1

