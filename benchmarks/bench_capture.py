"""Capture overhead on full-size Self-Forcing (Wan2.1-T2V-1.3B shapes, random bf16 weights, 480p, 81 frames =
21 latent frames, 7 chunks × (4 steps + clean pass) = 35 DiT forwards; no text encoder, no VAE).

    python benchmarks/bench_capture.py --out results/            # on a GPU; a few minutes, writes ≈ 2 GB at a time

Modes, each timed as one whole video (CUDA events around ``self_forcing_rollout``; "total" adds waiting for the
writer thread to drain and close the file, i.e. until the capture file is complete on disk):

* ``none``    — no capture (the baseline);
* ``a``       — one layer (``--layer``, default 15), all 12 heads, q/k/v/lse, every step and chunk;
* ``b SPEC``  — pooled views (frame×frame mass, Δt/Δh/Δw profiles) for all 30 layers × 12 heads, every step and
                chunk, from the query rows SPEC, one mode per entry of ``--pooled-queries`` (default random:16 and
                random:64 per frame = 1 % and 4 % of the rows);
* ``b_all``   — the same with every query row (``--with-all-queries``; an exact fp32 re-computation of every map).

``--attribute`` adds, for the first ``b`` mode, the same capture with the HDF5 writes switched off ("no hdf5") and
with the pooled kernel switched off ("no kernel"), reports the main thread's time inside the capture hook per
record, and profiles one video of ``none`` and ``b`` (top GPU kernels, GPU busy time): where the overhead goes.

Modes run interleaved (none, a, b, none, a, b, ...) after one warm-up video per mode; medians over ``--videos``.
Targets: a ≤ 1.3×, b ≤ 1.15× the uncaptured time. Also reported: bytes written, write throughput, and a
correctness check (rows recomputed from the file vs softmax of what the model attended, for the last chunk).
Capture files go to ``--workdir`` (default: a temp dir next to --out) and are deleted after each run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import toolkit
from toolkit.capture import Selection, capture, open_capture, resolve
from toolkit.capture.selection import human_bytes
from toolkit.models.checkpoints import random_state_dict
from toolkit.models.layout import RunLayout
from toolkit.models.sampling import SelfForcingSampler
from toolkit.models.seam import seams
from toolkit.models.wan import WanConfig, WanModel


def readme_sizes(layout: RunLayout) -> dict:
    """Bytes of a full Self-Forcing capture under the default selection and under "everything" (from shapes)."""
    out = {}
    for name, sel in (("default", Selection()), ("everything", Selection.everything())):
        est = resolve(sel, layout).estimate_bytes()
        out[name] = {"total_bytes": sum(est.values()), "by_variable": est, "store": list(sel.store)}
    return out


def profile_modes(modes: list[str], one) -> dict:
    """One video per mode under torch.profiler: wall time, summed GPU kernel time and the top kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for mode in modes:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            one(mode, "profile")
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        per_kernel: dict[str, float] = {}
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                per_kernel[evt.name] = per_kernel.get(evt.name, 0.0) + evt.device_time / 1e6
        top = dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12])
        out[mode] = {"wall_s": wall, "kernel_s": sum(per_kernel.values()), "top": top}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--videos", type=int, default=3, help="timed videos per mode (after one warm-up each)")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--pooled-queries", default="random:16,random:64",
                   help="comma list: one mode b per query selection (default random:16,random:64)")
    p.add_argument("--with-all-queries", action="store_true", help="also time mode b_all (pooled, every row)")
    p.add_argument("--attribute", action="store_true",
                   help="also time b without HDF5 writes / without the pooled kernel, and profile none vs b")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="smoke-test the script on a tiny model (CPU allowed)")
    args = p.parse_args()
    if args.tiny:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cfg = WanConfig(dim=64, ffn_dim=64, num_heads=4, num_layers=3, text_dim=32, text_len=16, freq_dim=32)
        args.layer = min(args.layer, cfg.num_layers - 1)
        args.pooled_queries = "random:2,random:4"
        latent = (1, 16, 6, 6, 10)
    else:
        assert torch.cuda.is_available(), "needs a GPU (use --tiny for a CPU smoke test)"
        dev = torch.device("cuda")
        cfg = WanConfig()
        latent = (1, 16, 21, 60, 104)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench_capture_", dir=args.workdir or args.out))

    t0 = time.perf_counter()
    with torch.device("meta"):
        model = WanModel(cfg)
    model = model.to_empty(device=dev).to(torch.bfloat16)
    model.load_state_dict(random_state_dict(cfg, seed=0, dtype=torch.bfloat16, device=dev), strict=True)
    model.eval()
    load_s = time.perf_counter() - t0

    g = torch.Generator(device=dev).manual_seed(0)
    noise = torch.randn(latent, generator=g, device=dev, dtype=torch.bfloat16)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device=dev, dtype=torch.bfloat16)
    context[:, 40:] = 0  # a 40-token prompt, zero-padded like the umT5 encoder output
    sampler = SelfForcingSampler()  # Self-Forcing's loop; its layout is what the seams will see
    layout = sampler.layout(cfg, model.grid_size(noise))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    modes = {
        "none": None,
        "a": Selection(layers=str(args.layer), store=("q", "k", "v", "lse")),
    }
    for spec in args.pooled_queries.split(","):
        modes[f"b {spec}"] = Selection(store=("pooled",), queries=spec)
    if args.with_all_queries:
        modes["b_all"] = Selection(store=("pooled",), queries="all")

    def rollout():
        return sampler.sample(model, noise, context, generator=torch.Generator(device=dev).manual_seed(1))

    def timed(fn) -> float:
        """Seconds of ``fn`` by CUDA events on the GPU (host clock on the CPU smoke test)."""
        if dev.type != "cuda":
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    first_b = next(m for m in modes if m.startswith("b "))
    switched_off = {}
    if args.attribute:
        switched_off = {f"{first_b} (no hdf5)": "hdf5", f"{first_b} (no kernel)": "kernel"}
        modes.update({m: modes[first_b] for m in switched_off})
    hook_s = {"s": 0.0, "calls": 0}

    @contextlib.contextmanager
    def attribution(mode: str):
        """Time the main thread inside the capture hook; switch HDF5 writes or the pooled kernel off."""
        import toolkit.capture.recorder as recorder_mod
        import toolkit.capture.store as store_mod

        saved = (recorder_mod.Recorder.hook, store_mod.CaptureStore.write, recorder_mod.accumulate_pooled)
        inner = saved[0]

        def timed_hook(self, *a, **kw):
            t = time.perf_counter()
            try:
                return inner(self, *a, **kw)
            finally:
                hook_s["s"] += time.perf_counter() - t
                hook_s["calls"] += 1

        recorder_mod.Recorder.hook = timed_hook
        if switched_off.get(mode) == "hdf5":
            store_mod.CaptureStore.write = lambda self, name, index, array: None
        if switched_off.get(mode) == "kernel":
            recorder_mod.accumulate_pooled = lambda q, *a, **kw: q.new_empty(q.shape[:2], dtype=torch.float32)
        try:
            yield
        finally:
            recorder_mod.Recorder.hook, store_mod.CaptureStore.write, recorder_mod.accumulate_pooled = saved

    def one(mode: str, tag: str) -> dict:
        sel = modes[mode]
        path = workdir / f"{mode}_{tag}.h5".replace(" ", "_").replace("(", "").replace(")", "")
        sync()
        hook_s.update(s=0.0, calls=0)
        wall0 = time.perf_counter()
        if sel is None:
            gpu_s = timed(rollout)
            rec = None
        else:
            with attribution(mode), capture(model, sel, path, layout=layout, progress=False) as rec:
                gpu_s = timed(rollout)
        total_s = time.perf_counter() - wall0
        row = {"mode": mode, "gpu_s": gpu_s, "total_s": total_s}
        if sel is not None:
            row["hook_host_ms_per_call"] = 1e3 * hook_s["s"] / max(hook_s["calls"], 1)
        if rec is not None:
            row.update(bytes_written=rec.bytes_written, file_bytes=os.path.getsize(path),
                       records=rec.records_written)
            if tag == "check" and mode not in switched_off:
                row["check"] = check(path, mode)
            path.unlink()
        return row

    # correctness: remember what the model attended in the last chunk (step 3) at the captured layer
    seen = {}
    stride = 997 if not args.tiny else 7

    def spy(q, k, v, out, ctx):
        if ctx.chunk == layout.num_chunks - 1 and ctx.step == 3 and ctx.layer == args.layer:
            seen["q"], seen["k"], seen["offset"] = q[0].clone(), k[0].clone(), ctx.query_offset

    def check(path: Path, mode: str) -> dict:
        with open_capture(path) as cap:
            assert cap.complete, "capture file not complete"
            out = {"complete": cap.complete, "records": len(cap.records)}
            rec = cap.record(step=3, chunk=layout.num_chunks - 1, layer=args.layer)
            ks = seen["k"].float().transpose(0, 1)  # h j d, every attended key
            local = (rec.query_tokens[::stride] if mode == "a" else rec.query_tokens) - seen["offset"]
            qs = seen["q"][local.to(dev)].float().transpose(0, 1)  # h i d
            direct = torch.softmax(layout.softmax_scale * qs @ ks.transpose(-1, -2), -1)  # fp32, no TF32
            if mode == "a":
                rows = torch.tensor(cap.rows(rec, 0, rec.query_tokens[::stride]).values, device=dev)
                k_file = rec.k(0).to(dev)
                out.update(max_abs_prob_err=float((rows - direct[0]).abs().max()),
                           keys_equal=bool(torch.equal(k_file[0], ks[0])), n_keys=int(ks.shape[1]))
            else:  # stored frame x frame mass against the dense map of the same queries
                tpf = layout.tokens_per_frame
                per_frame = direct.view(direct.shape[0], direct.shape[1], -1, tpf).sum(-1)  # h i key_frame
                qf = rec.query_tokens // tpf
                stored = torch.tensor(cap.pooled(rec, source="stored").frame_mass.values, device=dev)
                ref = torch.stack([per_frame[:, (qf == f).to(dev)].mean(1) for f in range(*rec.query_frames)], 1)
                out.update(max_abs_frame_mass_err=float((stored - ref).abs().max()), queries=len(qf))
            return out

    layer_seam = seams(model)[args.layer]
    layer_seam.hooks.append(spy)
    t1 = time.perf_counter()
    warm = {m: one(m, "check") for m in modes}  # warm-up (cuDNN plans, allocator, pinned pool) + correctness
    warm_s = time.perf_counter() - t1
    layer_seam.hooks.remove(spy)
    runs: list[dict] = []
    for i in range(args.videos):
        for m in modes:
            runs.append(one(m, str(i)))
    profile = profile_modes(["none", first_b], one) if args.attribute and dev.type == "cuda" else None
    shutil.rmtree(workdir, ignore_errors=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["mode"] == mode)

    base = med("none", "gpu_s")
    summary = {}
    for m in modes:
        s = {"median_gpu_s": med(m, "gpu_s"), "median_total_s": med(m, "total_s")}
        if m != "none":
            s["hook_host_ms_per_call"] = med(m, "hook_host_ms_per_call")
        s["overhead_gpu"] = s["median_gpu_s"] / base
        s["overhead_total"] = s["median_total_s"] / base
        if m != "none":
            b = statistics.median(r["bytes_written"] for r in runs if r["mode"] == m)
            s.update(bytes_written=b, write_GBps=b / 1e9 / s["median_total_s"],
                     planned_bytes=sum(resolve(modes[m], layout).estimate_bytes().values()))
        summary[m] = s
    result = {
        "benchmark": "capture overhead, full-size Self-Forcing (random weights), 35 forwards, bf16",
        "timer": "gpu_s: CUDA events around self_forcing_rollout; total_s: host wall time from entering the capture "
                 "context until the file is closed (writer drained)",
        "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (tiny smoke test)",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None, "python": platform.python_version(),
        "toolkit": toolkit.__version__, "tiny": args.tiny, "latent_shape": list(latent), "layer": args.layer,
        "pooled_queries": args.pooled_queries,
        "load_s": load_s, "warmup_s": warm_s, "warmup_and_check": warm, "runs": runs, "summary": summary,
        "goals": {"a": 1.3, "b": 1.15}, "readme_sizes": readme_sizes(layout), "profile": profile,
    }
    (args.out / "bench_capture.json").write_text(json.dumps(result, indent=2))
    print("| mode | median GPU s | median total s | overhead (GPU / total) | bytes | write GB/s | goal |")
    print("|---|---|---|---|---|---|---|")
    for m, s in summary.items():
        goal = {"a": "≤ 1.3×", "b": "≤ 1.15×"}.get(m.split()[0], "")
        extra = (f"{human_bytes(s['bytes_written'])} | {s['write_GBps']:.2f}" if m != "none" else "- | -")
        if switched_off.get(m) == "hdf5":
            extra = "(not written) | -"
        print(f"| {m} | {s['median_gpu_s']:.3f} | {s['median_total_s']:.3f} | {s['overhead_gpu']:.2f}× / "
              f"{s['overhead_total']:.2f}× | {extra} | {goal} |")
    print(f"GPU: {result['gpu']}; checks: " + "; ".join(f"{m}: {json.dumps(w.get('check'))}"
                                                         for m, w in warm.items() if m != "none"))
    for m, s in summary.items():
        if m != "none":
            print(f"{m}: main-thread time in the capture hook {s['hook_host_ms_per_call']:.3f} ms per call")
    for m, prof in (profile or {}).items():
        print(f"profile {m}: wall {prof['wall_s']:.3f} s, GPU kernels {prof['kernel_s']:.3f} s; top kernels (s): "
              + "; ".join(f"{k[:60]} {v:.3f}" for k, v in prof["top"].items()))
    for name, s in result["readme_sizes"].items():
        print(f"capture of this run, {name} selection: {human_bytes(s['total_bytes'])} "
              f"({', '.join(f'{k} {human_bytes(v)}' for k, v in s['by_variable'].items())})")


if __name__ == "__main__":
    main()
