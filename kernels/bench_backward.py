"""Forward + backward of the Monarch op (``toolkit::monarch_attention``, backward kernels of
``kernels/monarch_backward.py``) against PyTorch SDPA forward + backward (cuDNN and flash backends), same process.

    toolkit bench --backward --out DIR [--shapes full-111 full-311 ar-111] [--repeats 10] [--no-autotune]
    toolkit bench --backward --tiny --out /tmp/bb   # CPU smoke run (Triton interpreter, toy shape)

Shapes are ``toolkit.kernels.bench.SHAPES`` (bf16, B = 1, 12 heads, d = 128). Per shape, first the Monarch launch
configs are chosen: one forward and one forward + backward call with ``TOOLKIT_KERNEL_AUTOTUNE=1`` (candidates of
every forward and backward kernel timed once per shape and scratch chunk, winners cached on disk; with
``--no-autotune`` cached or heuristic configs only), reported as ``tuning_s`` (compile included) with the
tuner's log, and excluded from everything else. Then per variant: the first call (remaining compiles / cuDNN
plan, reported separately), ``--warmup`` calls not timed, then ``--repeats`` timed calls (CUDA events; medians
reported); Monarch also forward alone, so backward ≈ the difference; peak memory above the inputs during one
forward + backward; a finiteness check of the gradients. Writes DIR/bench_backward.json and .md.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from toolkit.kernels import _common
from toolkit.kernels.bench import SHAPES, TINY_SHAPES, _environment, _inputs, _peak_extra
from toolkit.kernels.monarch import monarch_attention_triton

from toolkit.errors import ToolkitError

BENCH_SHAPES = ("full-111", "full-311", "ar-111")  # the default of ``toolkit bench --backward``
OUTPUTS = ("bench_backward.json", "bench_backward.md")


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
    peak = _peak_extra(fn, device.type == "cuda")
    return {"first_call_s": round(first_s, 3), "median_ms": round(statistics.median(times), 4),
            "min_ms": round(min(times), 4), "max_ms": round(max(times), 4), "peak_extra_bytes": peak}


@contextmanager
def _autotune_env(on: bool) -> Iterator[None]:
    """``TOOLKIT_KERNEL_AUTOTUNE`` for the duration: the op's launchers (forward, recompute, backward) read it, as
    the op's signature has no tuning switch."""
    before = os.environ.get("TOOLKIT_KERNEL_AUTOTUNE")
    os.environ["TOOLKIT_KERNEL_AUTOTUNE"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOOLKIT_KERNEL_AUTOTUNE"]
        else:
            os.environ["TOOLKIT_KERNEL_AUTOTUNE"] = before


def _choose_configs(fn, device: torch.device) -> dict:
    """One call of ``fn`` that makes the launchers pick (tune, read from cache, or default) every launch config:
    its seconds and the tuner's log, so that the measurements that follow exclude tuning."""
    n_log = len(_common.TUNING_LOG)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    log = [dict(t) for t in _common.TUNING_LOG[n_log:]]
    return {"tuning_s": round(time.perf_counter() - t0, 3), "tuning": log}


def bench_shape(
    name: str, spec: tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int], tuple[int, int]],
    heads: int, dim: int, dtype: torch.dtype, device: torch.device, warmup: int, repeats: int,
) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    grid, tiling, qf, kf = spec
    q, k, v = _inputs(grid, qf, kf, heads, dim, dtype, device)
    d_out = torch.randn_like(q)
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
        last = [None]  # the latest call's result: the gradient check needs no call of its own

        def call(fn=fn, last=last):
            last[0] = fn()

        try:
            if variant.startswith("monarch"):
                row.update(_choose_configs(call, device))
            row.update(_measure(call, device, warmup, repeats))
            if "backward" in variant:
                row["grads_finite"] = all(bool(torch.isfinite(g).all()) for g in last[0])
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
             "| shape | variant | median ms | backward ms | min–max ms | tuning s (configs) | first call s | "
             "peak extra (× size q) | grads finite |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | error: {r['error']} | | | | | | |")
            continue
        peak = "–" if r.get("peak_extra_over_q") is None else f"{r['peak_extra_over_q']}"
        bwd = f"{r['backward_ms']:.3f}" if "backward_ms" in r else ""
        tuning = "–"
        if "tuning_s" in r:
            sources = [t["source"] for t in r["tuning"]]
            tuning = f"{r['tuning_s']:.1f} (" + ", ".join(
                f"{sources.count(s)} {s}" for s in ("tuned", "cached", "default") if s in sources) + ")"
        lines.append(f"| {r['shape']} | {r['variant']} | {r['median_ms']:.3f} | {bwd} | "
                     f"{r['min_ms']:.3f}–{r['max_ms']:.3f} | {tuning} | {r['first_call_s']:.2f} | {peak} | "
                     f"{r.get('grads_finite', '')} |")
    return "\n".join(lines) + "\n"


def run(out: str | Path, shapes: list[str] | None = None, *, tiny: bool = False, warmup: int = 2,
        repeats: int = 10, autotune: bool = True) -> dict:
    """Benchmark ``shapes`` (default :data:`BENCH_SHAPES`; ``tiny``: a toy shape on the CPU, 2 heads of d = 16,
    fp32) and write ``out``/bench_backward.json and .md; returns the result. ``autotune``: tune the Monarch
    launch configs not yet in the on-disk cache before timing (else cached or heuristic ones)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    if tiny:
        chosen, heads, dim, dtype, warmup, repeats = {"tiny-111": TINY_SHAPES["tiny-111"]}, 2, 16, torch.float32, 0, 1
    else:
        if device.type != "cuda":
            raise ToolkitError("the backward benchmark needs a CUDA device (or --tiny)")
        chosen = {s: SHAPES[s] for s in (shapes or BENCH_SHAPES)}
        heads, dim, dtype = 12, 128, torch.bfloat16
    env = _environment()
    rows = []
    t0 = time.perf_counter()
    out = Path(out)
    with _autotune_env(autotune):
        for name, spec in chosen.items():
            rows += bench_shape(name, spec, heads, dim, dtype, device, warmup, repeats)
            # written after every shape: a run cut short keeps the shapes it finished
            result = {"environment": env, "heads": heads, "head_dim": dim, "dtype": str(dtype), "batch": 1,
                      "warmup": warmup, "repeats": repeats, "autotune": autotune,
                      "tuning_cache": str(_common.cache_path()), "seconds": round(time.perf_counter() - t0, 1),
                      "rows": rows}
            (out / OUTPUTS[0]).write_text(json.dumps(result, indent=1, default=str))
            md = markdown(env, rows)
            (out / OUTPUTS[1]).write_text(md)
    print(md)
    return result
