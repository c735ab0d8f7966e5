"""Nothing lost: a write error mid-capture stops the run with one line and leaves only durable records flagged; one
writer per file whatever HDF5's locking does; an interrupted start leaves no file under the final name."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import tiny_config, tiny_wan

from toolkit.capture import RunLayout, Selection, capture, open_capture
from toolkit.capture.store import CaptureLock, CaptureStore, lock_path, temporary_path
from toolkit.errors import ToolkitError

# A tiny causal capture (3 layers, 3 chunks, 5 stored steps: 45 records of q, k, v, lse) in a child process.
# mode: run | hold (wait in the body until the file argv[4] exists) | killbody (SIGKILL in the body) |
# killcreate (SIGKILL once the schema is built, before the file is in place) | limit (after creation, cap the file
# size at the first lse chunk of stored step 1: every write there fails with EFBIG instead of SIGXFSZ).
# ToolkitError is reported as the CLI does: one line on stderr, exit code 2.
CHILD = textwrap.dedent("""
    import os, resource, signal, sys, time
    import torch
    torch.set_num_threads(1)
    from toolkit.capture import RunLayout, Selection, capture
    from toolkit.capture.store import CaptureStore
    from toolkit.errors import ToolkitError
    from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps
    from toolkit.models.wan import WanConfig, WanModel

    out, mode, resume, arg = sys.argv[1], sys.argv[2], sys.argv[3] == "resume", sys.argv[4]
    cfg = WanConfig(dim=48, ffn_dim=64, num_heads=3, num_layers=3, text_dim=16, text_len=6, freq_dim=16)
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    noise, context = torch.randn(1, 16, 6, 6, 10, generator=g), torch.randn(1, 4, 16, generator=g)
    layout = RunLayout.self_forcing(cfg, model.grid_size(noise), self_forcing_timesteps(), 2)
    create, build = CaptureStore.create.__func__, CaptureStore._build

    def limited_create(cls, *a, **kw):
        store = create(cls, *a, **kw)
        lse = store.file["lse"].id
        chunks = [lse.get_chunk_info(i) for i in range(lse.get_num_chunks())]
        limit = min(c.byte_offset for c in chunks if c.chunk_offset[0] >= 1)
        assert all(c.byte_offset + c.size <= limit for c in chunks if c.chunk_offset[0] == 0)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return store

    def killing_build(self, *a, **kw):
        build(self, *a, **kw)
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "limit":
        CaptureStore.create = classmethod(limited_create)
    if mode == "killcreate":
        CaptureStore._build = killing_build
    try:
        with capture(model, Selection(), out, layout=layout, progress=False, resume=resume,
                     provenance={"seed": 1}):
            if mode == "hold":
                print("READY", flush=True)
                while not os.path.exists(arg):
                    time.sleep(0.05)
            elif mode == "killbody":
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                self_forcing_rollout(model, noise, context, frames_per_chunk=2,
                                     generator=torch.Generator().manual_seed(2))
    except ToolkitError as err:
        print(f"toolkit capture: error: {err}", file=sys.stderr)
        sys.exit(2)
    print("DONE")
""")

NO_HDF5_LOCKS = {"HDF5_USE_FILE_LOCKING": "FALSE"}  # as on NFS/Lustre: only the toolkit's own lock protects


def child_args(tmp_path, out, mode, resume=False, arg="-"):
    script = tmp_path / "child.py"
    if not script.exists():
        script.write_text(CHILD)
    return [sys.executable, str(script), str(out), mode, "resume" if resume else "new", str(arg)]


def child(tmp_path, out, mode="run", resume=False, arg="-", env=None):
    return subprocess.run(child_args(tmp_path, out, mode, resume, arg), capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def assert_one_line(stderr: str, message: str) -> None:
    assert stderr.splitlines() == [f"toolkit capture: error: {message}"], stderr


def same_records(path, reference, keys) -> None:
    with open_capture(path) as cap, open_capture(reference) as ref:
        for key in keys:
            a, b = cap.record(*key), ref.record(*key)
            for name in ("q", "k", "v", "lse"):
                assert torch.equal(getattr(a, name)(), getattr(b, name)()), (key, name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "straight.h5"
    proc = child(tmp, out)
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stderr
    return out


# ------------------------------------------------------------------------------------------------ write errors
def test_write_error_mid_capture_stops_with_one_line_and_keeps_only_durable_records(tmp_path, reference):
    out = tmp_path / "limited.h5"
    proc = child(tmp_path, out, "limit")
    assert proc.returncode == 2 and "DONE" not in proc.stdout, proc.stderr
    assert_one_line(proc.stderr, f"file size limit reached while writing {out}")  # no h5py tracebacks, no crash
    with open_capture(out) as cap:
        assert not cap.complete
        # chunk 0 runs steps 0, 1, ...: the records of step 0 are written, nothing from the first failed write on
        assert cap.records == [(0, 0, 0), (0, 0, 1), (0, 0, 2)]
        kv = cap.file["kv_complete"][...]
        # K/V of (step 1, chunk 0, layer 0) were written before that record's failing lse; nothing after it
        assert kv[0, 0].all() and int(kv[1:].sum()) == int(kv[1, 0, 0]) == 1
    same_records(out, reference, [(0, 0, 0), (0, 0, 1), (0, 0, 2)])


def test_writer_thread_error_stops_the_sampler_and_never_flags_unflushed_data(tmp_path, monkeypatch):
    from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps

    model = tiny_wan(tiny_config(dim=32, ffn_dim=32, num_heads=2, num_layers=2, text_dim=8, text_len=4))
    noise, context = torch.randn(1, 16, 4, 4, 6), torch.randn(1, 3, 8)
    layout = RunLayout.self_forcing(model.cfg, model.grid_size(noise), self_forcing_timesteps(), 2)
    real_flush, flushes, calls = CaptureStore.flush, [], []

    def failing_flush(self):
        flushes.append(1)
        if len(flushes) == 3:
            raise OSError(28, "No space left on device")
        real_flush(self)

    def counting_hook(q, k, v, o, ctx):
        calls.append((ctx.step, ctx.chunk, ctx.layer))
        time.sleep(0.05)  # let the writer thread catch up: the check is that its error stops the sampler

    monkeypatch.setattr(CaptureStore, "flush", failing_flush)
    out = tmp_path / "x.h5"
    with pytest.raises(ToolkitError) as err:
        with capture(model, Selection(), out, layout=layout, progress=False):
            model.blocks[0].self_attn.seam.hooks.append(counting_hook)
            self_forcing_rollout(model, noise, context, frames_per_chunk=2)
    assert str(err.value) == f"disk full while writing {out}"
    assert len(calls) <= 3  # stopped at the next seam call (a full run calls layer 0 2 chunks × 5 steps times)
    with open_capture(out) as cap:
        assert not cap.complete
        # flushes 1 and 2 vouched for (step 0, chunk 0)'s K/V of layers 0 and 1; the third failed: nothing more
        assert cap.records == [] and int(cap.file["kv_complete"][...].sum()) == 2
    assert not os.path.exists(lock_path(str(out)))


# ------------------------------------------------------------------------------------------------ one writer
def test_second_writer_is_refused_and_a_killed_writers_lock_does_not_block(tmp_path):
    out, go = tmp_path / "run.h5", tmp_path / "go"
    holder = subprocess.Popen(child_args(tmp_path, out, "hold", resume=True, arg=go), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **NO_HDF5_LOCKS})
    try:
        assert holder.stdout.readline().strip() == "READY", holder.stderr.read()
        message = f"{out} is being written by another capture (pid {holder.pid} on "
        cli = subprocess.run([sys.executable, "-m", "toolkit.cli", "capture", "--out", str(out), "--resume",
                              "--quiet"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, **NO_HDF5_LOCKS})
        assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and message in cli.stderr, cli.stderr
        go.touch()
        assert holder.wait(timeout=60) == 0, holder.stderr.read()
    finally:
        holder.kill()
        holder.wait()
    assert not os.path.exists(lock_path(str(out)))  # released on exit
    with open_capture(out) as cap:
        assert not cap.complete and cap.records == []  # the body ran no sampler

    killed = child(tmp_path, out, "killbody", resume=True, env=NO_HDF5_LOCKS)
    assert killed.returncode == -signal.SIGKILL
    assert os.path.exists(lock_path(str(out)))  # left behind by the killed writer, its flock gone with it
    resumed = child(tmp_path, out, "hold", resume=True, arg=go, env=NO_HDF5_LOCKS)  # go exists: no wait
    assert resumed.returncode == 0 and "DONE" in resumed.stdout, resumed.stderr
    assert not os.path.exists(lock_path(str(out)))


def test_lock_is_held_for_the_capture_and_released_on_exceptions(tmp_path):
    model = tiny_wan(tiny_config(dim=32, ffn_dim=32, num_heads=2, num_layers=2, text_dim=8, text_len=4))
    layout = RunLayout.self_forcing(model.cfg, (4, 2, 3), [1000.0, 500.0], 2)
    out = tmp_path / "x.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, Selection(), out, layout=layout, progress=False):
            # flock belongs to an open file, so a second lock from this very process is refused too
            with pytest.raises(ToolkitError, match="^" + re.escape(f"{out} is being written by another capture "
                                                                    f"(pid {os.getpid()} on ")):
                CaptureLock(str(out)).acquire()
            raise RuntimeError("boom")
    assert not os.path.exists(lock_path(str(out)))
    with capture(model, Selection(), out, layout=layout, progress=False, resume=True):
        pass
    with CaptureLock(str(out)):
        assert os.path.exists(lock_path(str(out)))


# ------------------------------------------------------------------------------------------------ creation
def test_kill_during_creation_leaves_no_file_and_a_rerun_succeeds(tmp_path, reference):
    out = tmp_path / "run.h5"
    killed = child(tmp_path, out, "killcreate")
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    rerun = child(tmp_path, out)  # no --resume needed: nothing was there
    assert rerun.returncode == 0 and "DONE" in rerun.stdout, rerun.stderr
    assert not os.path.exists(temporary_path(str(out))) and not os.path.exists(lock_path(str(out)))
    with open_capture(out) as cap:
        assert cap.complete and len(cap.records) == 45
    same_records(out, reference, [(0, 0, 0), (4, 2, 2)])


def test_ctrl_c_during_creation_leaves_nothing_and_resume_starts_afresh(tmp_path, monkeypatch):
    model = tiny_wan(tiny_config(dim=32, ffn_dim=32, num_heads=2, num_layers=2, text_dim=8, text_len=4))
    layout = RunLayout.self_forcing(model.cfg, (4, 2, 3), [1000.0, 500.0], 2)
    out = tmp_path / "x.h5"
    build = CaptureStore._build

    def interrupted_build(self, *a, **kw):
        build(self, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(CaptureStore, "_build", interrupted_build)
    with pytest.raises(KeyboardInterrupt):
        with capture(model, Selection(), out, layout=layout, progress=False):
            pass
    assert sorted(os.listdir(tmp_path)) == []
    monkeypatch.setattr(CaptureStore, "_build", build)
    with capture(model, Selection(), out, layout=layout, progress=False, resume=True):
        pass
    with open_capture(out) as cap:
        assert not cap.complete and cap.records == []
