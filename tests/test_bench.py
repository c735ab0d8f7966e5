"""`toolkit bench --tiny` on the CPU (interpreter) and the resource report's kernel arguments (kernels/resources.py)
against what the Monarch launcher really passes."""

import inspect
import json

import pytest
import toolkit.kernels.monarch as km
import torch
from toolkit.kernels import resources
from toolkit.kernels.bench import main


def test_bench_tiny_on_cpu_reports_cuda_baselines_as_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_KERNEL_CACHE", str(tmp_path / "cache"))
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    rc = main(["--tiny", "--shapes", "tiny-111", "--rounds", "1", "--no-autotune", "--out", str(tmp_path)])
    assert rc == 0  # skipped baselines are not failures
    rows = {r["variant"]: r for r in json.loads((tmp_path / "bench_kernels.json").read_text())["rows"]}
    for backend in ("cudnn", "flash", "efficient"):
        r = rows[f"sdpa-{backend}"]
        assert r["skipped"] == "needs CUDA" and not r["ok"] and r["error"] is None
    assert rows["monarch(1, 1, 1)"]["ok"] and rows["monarch(1, 1, 1)"]["skipped"] is None
    # the streamed kernel runs the two-stage kernels' job code: the same error against the reference (bf16)
    streamed = rows["monarch(1, 1, 1)-streamed"]
    assert streamed["ok"] and streamed["version"] == "streamed"
    assert streamed["check_rel_err"] == pytest.approx(rows["monarch(1, 1, 1)"]["check_rel_err"], rel=1e-3)
    md = (tmp_path / "bench_kernels.md").read_text()
    assert md.count("skipped (needs CUDA)") == 3


@pytest.mark.parametrize(("argv", "says"), [
    ([], "needs a CUDA GPU; --tiny runs a CPU smoke test"),
    (["--backward"], "needs a CUDA GPU"),
    (["--tiny", "--shapes", "full-111"], "--shapes full-111: --tiny has tiny-111"),
    (["--tiny", "--rounds", "0"], "--rounds 0: must be at least 1"),
    (["--tiny", "--heads", "2", "--check-heads", "3"], "--check-heads 3: more than the 2 --heads"),
    (["--tiny", "--dim", "7"], "--dim 7"),
])
def test_bench_refuses_in_one_line_and_keeps_earlier_results(argv, says, tmp_path, capsys, monkeypatch):
    from toolkit.cli import main as cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "bench_kernels.json").write_text("earlier")
    assert cli(["bench", *argv, "--force", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert (tmp_path / "bench_kernels.json").read_text() == "earlier"


def test_bench_backward_tiny_writes_its_table_and_refuses_to_overwrite(tmp_path, capsys):
    """`toolkit bench --backward --tiny`: every variant measured with finite gradients, backward = fwd+bwd - fwd;
    a second run into the same folder is one line, exit 2, files untouched."""
    from toolkit.cli import main as cli

    out = tmp_path / "bwd"
    assert cli(["bench", "--backward", "--tiny", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads((out / "bench_backward.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"monarch forward", "monarch forward+backward", "sdpa-math forward+backward"}
    assert all("error" not in r and r["median_ms"] > 0 for r in rows.values())
    assert rows["monarch forward+backward"]["grads_finite"] and rows["sdpa-math forward+backward"]["grads_finite"]
    train, fwd = rows["monarch forward+backward"], rows["monarch forward"]
    assert train["backward_ms"] == round(train["median_ms"] - fwd["median_ms"], 4)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert cli(["bench", "--backward", "--tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


class _Recorder:
    """Stands in for a jitted kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def test_resources_compile_the_launchers_arguments(tmp_path, monkeypatch):
    """Each Monarch entry of the resource report has the constexprs, warps and stages the launcher passes at that
    shape, and as many runtime arguments as the launch (meta tensors: nothing runs, nothing is compiled)."""
    monkeypatch.setenv("TOOLKIT_KERNEL_CACHE", str(tmp_path / "cache"))
    reports = resources.default_kernels(128)
    monkeypatch.setattr(km, "upcast_dots", lambda dtype: False)  # as on a GPU (the interpreter upcasts bf16)
    monkeypatch.setattr(km, "_PICKED", {}, raising=False)
    # (kernel name, grid, tiling, query frames, version) in the order default_kernels lists them
    launches = [
        ("_monarch_rows_fwd", (21, 30, 52), (1, 1, 1), (0, 21), "v1"),
        ("_monarch_rows_fwd", (21, 45, 80), (1, 1, 1), (0, 21), "v1"),
        ("_monarch_rows_fwd_v2", (21, 30, 52), (1, 1, 1), (0, 21), "v2"),
        ("_monarch_rows_fwd_v2", (21, 30, 52), (1, 1, 1), (18, 21), "v2"),
        ("_monarch_cols_fwd", (21, 30, 52), (1, 2, 1), (0, 21), None),  # b1 = 15
        ("_monarch_cols_fwd", (21, 30, 52), (1, 1, 1), (0, 21), None),  # b1 = 30
        ("_monarch_cols_fwd", (21, 30, 52), (3, 1, 1), (0, 21), None),  # b1 = 90
        ("_monarch_streamed_fwd", (21, 30, 52), (1, 1, 1), (0, 21), "streamed"),
    ]
    assert [fn.__name__ for fn, *_ in reports[:len(launches)]] == [name for name, *_ in launches]
    for (fn, ptrs, consts, warps, stages), (name, grid, tiling, qf, version) in zip(reports, launches):
        recorder = _Recorder()
        monkeypatch.setattr(km, name, recorder)
        tpf = grid[1] * grid[2]
        q = torch.empty(1, (qf[1] - qf[0]) * tpf, 12, 128, dtype=torch.bfloat16, device="meta")
        k = torch.empty(1, grid[0] * tpf, 12, 128, dtype=torch.bfloat16, device="meta")
        km._forward(q, k, k, grid, tiling, query_frames=qf, key_frames=(0, grid[0]), autotune=False,
                    version=version, stages={None: "cols", "streamed": "both"}.get(version, "rows"))
        monkeypatch.setattr(km, name, fn)
        assert recorder.calls, name
        args, kwargs = recorder.calls[0]
        assert kwargs == {**consts, "num_warps": warps, "num_stages": stages}, (name, grid, tiling, qf)
        runtime = [a for a in fn.arg_names if a not in consts]
        assert len(args) == len(runtime), name
        assert set(ptrs) <= set(runtime)


def test_resources_entries_name_their_kernels_arguments():
    """Every entry of the resource report (forward, backward, analysis kernels) types only pointers its kernel takes
    and sets exactly its constexpr parameters, so ``compile_report`` compiles the kernel the launcher runs."""
    entries = resources.default_kernels(128)
    names = [fn.__name__ for fn, *_ in entries]
    for kernel in ("_monarch_cols_bwd", "_monarch_rows_bwd", "_monarch_dq_rows"):
        assert kernel in names
    for fn, ptrs, consts, warps, stages in entries:
        # the Python function under the JIT (or interpreter) wrapper: its tl.constexpr annotations
        constexprs = {name for name, p in inspect.signature(fn.fn).parameters.items()
                      if "constexpr" in str(p.annotation)}
        assert set(consts) == constexprs, fn.__name__
        assert set(ptrs) <= set(fn.arg_names) - constexprs, fn.__name__
        assert warps in (1, 2, 4, 8, 16) and stages >= 1


def test_fused_floor_benchmark_checks_its_kernels_on_the_cpu(tmp_path):
    """benchmarks/bench_fused_floor.py --tiny: both micro-kernels run through the interpreter and match torch
    (the script asserts it) before anything would be timed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fused_floor.py"
    run = subprocess.run([sys.executable, str(script), "--tiny", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "bench_fused_floor.json").read_text())["rows"]
    assert {r["kind"] for r in rows} == {"reread", "thin_dot"} and all("median_ms" not in r for r in rows)
