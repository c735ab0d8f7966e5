"""Crash safety of capture files: SIGKILL mid-run, write errors (disk full), file-size limits, bad paths."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config, tiny_wan

from toolkit.capture import RunLayout, Selection, capture, open_capture
from toolkit.capture.store import CaptureStore
from toolkit.errors import ToolkitError

# The child builds a tiny random causal model and captures one rollout; it SIGKILLs itself at the given
# (step, chunk, layer) seam call (after the capture hook ran), or never ("none").
CHILD = textwrap.dedent("""
    import os, resource, signal, sys
    import torch
    torch.set_num_threads(1)
    from toolkit.capture import RunLayout, Selection, capture
    from toolkit.errors import ToolkitError
    from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps
    from toolkit.models.seam import seams
    from toolkit.models.wan import WanConfig, WanModel

    out, kill_at, fsize = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if fsize:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    cfg = WanConfig(dim=48, ffn_dim=64, num_heads=3, num_layers=3, text_dim=16, text_len=6, freq_dim=16)
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    noise, context = torch.randn(1, 16, 6, 6, 10, generator=g), torch.randn(1, 4, 16, generator=g)
    layout = RunLayout.self_forcing(cfg, model.grid_size(noise), self_forcing_timesteps(), 2)
    target = None if kill_at == "none" else tuple(int(x) for x in kill_at.split(","))

    def killer(q, k, v, o, ctx):
        if (ctx.step, ctx.chunk, ctx.layer) == target:
            if os.environ.get("INSPECT_INSTEAD"):  # read the live file from another process, then go on
                import subprocess
                r = subprocess.run([sys.executable, "-m", "toolkit.cli", "inspect", out], capture_output=True,
                                   text=True)
                print("INSPECT", r.returncode, r.stdout, r.stderr)
                return
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        with capture(model, Selection(store=("q", "k", "v", "lse", "pooled")), out, layout=layout,
                     progress=False, provenance={"seed": 1}):
            for s in seams(model):
                s.hooks.append(killer)  # after the capture hook
            self_forcing_rollout(model, noise, context, frames_per_chunk=2, generator=torch.Generator().manual_seed(2))
    except ToolkitError as err:
        print(f"ERROR {err}")
        sys.exit(2)
    print("DONE")
""")


def child(tmp_path, out, kill_at="none", fsize=0, env=None):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.run([sys.executable, str(script), str(out), kill_at, str(fsize)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "full.h5"
    proc = child(tmp, out)
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stderr
    return out


@pytest.mark.parametrize("kill_at", ["2,1,1", "4,2,0"])
def test_sigkill_leaves_openable_incomplete_file_with_intact_records(tmp_path, reference, kill_at):
    out = tmp_path / "killed.h5"
    proc = child(tmp_path, out, kill_at)
    assert proc.returncode == -signal.SIGKILL
    step, chunk, layer = (int(x) for x in kill_at.split(","))
    with open_capture(out) as cap, open_capture(reference) as ref:
        assert not cap.complete and ref.complete
        done = cap.records
        assert 0 < len(done) < len(ref.records)
        assert set(done) <= set(ref.records)
        # every record before the kill point in sampler order may be done; nothing after it
        assert all((r.chunk, r.step, r.layer) <= (chunk, step, layer) for r in done)
        for key in done:
            a, b = cap.record(*key), ref.record(*key)
            assert torch.equal(a.q(), b.q()) and torch.equal(a.k(), b.k()) and torch.equal(a.v(), b.v())
            assert torch.equal(a.lse(), b.lse())
            pa, pb = cap.pooled(a, source="stored"), ref.pooled(b, source="stored")
            assert (pa.frame_mass == pb.frame_mass).all() and (pa.offset_w == pb.offset_w).all()
    # xarray opens it too, and the summary says it is incomplete
    import xarray as xr

    with xr.open_dataset(out, engine="h5netcdf") as ds:
        assert ds.attrs["complete"] == 0 and int(ds.record_complete.sum()) == len(done)
    summary = subprocess.run([sys.executable, "-m", "toolkit.cli", "inspect", str(out)], capture_output=True,
                             text=True, timeout=60)
    assert summary.returncode == 0 and "INCOMPLETE (interrupted)" in summary.stdout
    assert f"{len(done)} complete of 45 selected" in summary.stdout


def test_a_capture_being_written_can_be_inspected_from_another_process(tmp_path):
    out = tmp_path / "live.h5"
    proc = child(tmp_path, out, "0,2,0", env={"INSPECT_INSTEAD": "1"})
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stderr
    assert "INSPECT 0" in proc.stdout and "being written (open in another process)" in proc.stdout
    done = int(re.search(r"records\s+(\d+) complete of 45 selected", proc.stdout).group(1))
    assert done < 45  # chunk 2 was still running
    with open_capture(out) as cap:
        assert cap.complete and len(cap.records) == 45


def test_file_size_limit_is_one_line_and_leaves_no_file(tmp_path):
    out = tmp_path / "limited.h5"
    proc = child(tmp_path, out, fsize=100_000)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == f"ERROR file size limit reached while writing {out}"
    assert not out.exists()


def tiny_model():
    return tiny_wan(tiny_config(dim=32, ffn_dim=32, num_heads=2, num_layers=2, text_dim=8, text_len=4))


def test_disk_full_mid_run_is_one_clear_error_and_keeps_finished_records(tmp_path, monkeypatch):
    from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps

    model = tiny_model()
    noise, context = torch.randn(1, 16, 4, 4, 6), torch.randn(1, 3, 8)
    layout = RunLayout.self_forcing(model.cfg, model.grid_size(noise), self_forcing_timesteps(), 2)
    real_write, calls = CaptureStore.write, []

    def failing_write(self, name, index, array):
        calls.append(name)
        if len(calls) > 60:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, name, index, array)

    monkeypatch.setattr(CaptureStore, "write", failing_write)
    out = tmp_path / "full_disk.h5"
    with pytest.raises(ToolkitError) as err:
        with capture(model, Selection(), out, layout=layout, progress=False):
            self_forcing_rollout(model, noise, context, frames_per_chunk=2)
    assert str(err.value) == f"disk full while writing {out}"
    monkeypatch.setattr(CaptureStore, "write", real_write)
    with open_capture(out) as cap:
        assert not cap.complete
        assert 0 < len(cap.records) < 20
        for key in cap.records:
            rec = cap.record(*key)
            assert torch.isfinite(rec.q()).all() and rec.k().shape[1] == len(rec.key_tokens)


def test_missing_directory_and_unwritable_path_are_one_line(tmp_path):
    model = tiny_model()
    layout = RunLayout.self_forcing(model.cfg, (4, 2, 3), [1000.0, 500.0], 2)
    with pytest.raises(ToolkitError, match=r"^directory does not exist for .*nowhere/x\.h5$"):
        with capture(model, Selection(), tmp_path / "nowhere" / "x.h5", layout=layout, progress=False):
            pass
    if os.geteuid() != 0:  # root ignores permissions; the message mapping is still checked below
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(ToolkitError, match="permission denied"):
            with capture(model, Selection(), ro / "x.h5", layout=layout, progress=False):
                pass
    from toolkit.capture.store import describe_os_error

    assert describe_os_error(PermissionError(errno.EACCES, "Permission denied"), "a.h5") == \
        "permission denied: cannot write a.h5"
    assert describe_os_error(RuntimeError("write failed: errno = 28, error message = 'No space left'"), "a.h5") == \
        "disk full while writing a.h5"


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    model = tiny_model()
    layout = RunLayout.self_forcing(model.cfg, (4, 2, 3), [1000.0, 500.0], 2)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(ToolkitError, match=r"needs about .* but .* has 100 B free"):
        with capture(model, Selection(), tmp_path / "x.h5", layout=layout, progress=False):
            pass
    assert not (tmp_path / "x.h5").exists()
