"""Nothing lost, nothing mixed (issue 15, items 3 and 4): analyses write record by record (a killed run leaves an
openable partial file that ``--resume`` finishes into what a straight run writes), ``--out`` never replaces what it
should not, the figures' cache continues a partial file and recomputes a damaged one, and ``capture --resume``
refuses a run with different settings (dtype, attention backend) in one line, leaving the file untouched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import h5py
import pytest
import torch
import xarray as xr
from conftest import tiny_config, tiny_wan

from toolkit.analysis import open_results
from toolkit.analysis.partial import EXIT_AFTER_ENV, parts_folder
from toolkit.capture import RunLayout, Selection, capture
from toolkit.cli import main
from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = tiny_config(num_layers=2)
# token grid (6, 3, 5): 3 chunks of 2 frames; layer 0 at steps 0 and 4 -> 6 records
MONARCH = ("--steps", "0,4", "--layers", "0", "--iters", "1", "--layout", "fh,w:1,1,1", "--device", "cpu")


@pytest.fixture(scope="module")
def run_h5(tmp_path_factory):
    path = tmp_path_factory.mktemp("cap") / "run.h5"
    model = tiny_wan(CFG, sharpen=4.0)
    g = torch.Generator().manual_seed(1)
    noise, context = torch.randn((1, 16, 6, 6, 10), generator=g), torch.randn(1, 4, CFG.text_dim, generator=g)
    layout = RunLayout.self_forcing(model.cfg, model.grid_size(noise), self_forcing_timesteps(), 2)
    with capture(model, Selection(store=("q", "k", "v", "lse"), layers="0", steps="0,4"), path, layout=layout,
                 progress=False):
        self_forcing_rollout(model, noise, context, frames_per_chunk=2, generator=torch.Generator().manual_seed(2))
    return path


def analyze(*argv) -> int:
    return main(["analyze", *map(str, argv), "--no-progress"])


def error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1, err
    return err[0]


def without_command(ds: xr.Dataset) -> xr.Dataset:
    ds.attrs = {k: v for k, v in ds.attrs.items() if k != "command"}  # names its own --out
    return ds


def test_killed_analysis_leaves_an_openable_partial_file_and_resume_equals_a_straight_run(run_h5, tmp_path):
    out = tmp_path / "m.nc"
    env = {**os.environ, EXIT_AFTER_ENV: "2"}  # the process ends as if killed right after its 2nd record
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "analyze", "monarch", str(run_h5), "--out", str(out),
                           *MONARCH, "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 75, proc.stderr
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        assert ds.attrs["complete"] == 0 and ds.sizes["record"] == 2
    with open_results(out) as ds:
        assert ds.sel(layer=0).sizes["record"] == 2  # the record index works on a partial file
    assert len(list(parts_folder(out).glob("*.nc"))) == 2

    assert analyze("monarch", run_h5, "--out", out, *MONARCH, "--resume") == 0
    assert not parts_folder(out).exists()
    straight = tmp_path / "straight.nc"
    assert analyze("monarch", run_h5, "--out", straight, *MONARCH) == 0
    with xr.open_dataset(out, engine="h5netcdf") as a, xr.open_dataset(straight, engine="h5netcdf") as b:
        assert a.attrs["complete"] == 1 and a.sizes["record"] == 6
        xr.testing.assert_identical(without_command(a.load()), without_command(b.load()))


def test_out_policy(run_h5, tmp_path, capsys):
    out = tmp_path / "t.nc"
    common = ("--steps", "0", "--chunks", "0", "--device", "cpu", "--sparsities", "0,0.5")
    assert analyze("topk", run_h5, "--out", out, *common) == 0
    before = out.read_bytes()
    capsys.readouterr()
    # an existing result: refused without a flag, untouched
    assert analyze("topk", run_h5, "--out", out, *common) == 2
    assert "--force" in error_line(capsys) and out.read_bytes() == before
    # --resume with other options: refused naming the setting, untouched
    assert analyze("topk", run_h5, "--out", out, *common[:-1], "0,0.9", "--resume") == 2
    assert "sparsities" in error_line(capsys) and out.read_bytes() == before
    # --resume of a complete result with the same settings: nothing to do
    assert analyze("topk", run_h5, "--out", out, *common, "--resume") == 0
    assert "nothing to do" in capsys.readouterr().err and out.read_bytes() == before
    # another analysis' result, a capture (input or not), a text file: refused even with --force
    capture_copy = tmp_path / "other.h5"
    shutil.copy(run_h5, capture_copy)
    text = tmp_path / "notes.nc"
    text.write_text("not a result\n")
    for target, message in ((out, "'topk' result"), (capture_copy, "capture file"), (run_h5, "input capture"),
                            (text, "not an analysis result")):
        kept = target.read_bytes()
        assert analyze("periodic", run_h5, "--out", target, "--steps", "0", "--chunks", "0", "--force") == 2
        assert message in error_line(capsys) and target.read_bytes() == kept
    # --force replaces a result of the same analysis, saying so
    assert analyze("topk", run_h5, "--out", out, *common[:-1], "0,0.9", "--force") == 0
    assert "--force" in capsys.readouterr().err
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        assert list(ds["sparsity"].values) == [0.0, 0.9]


def test_figures_cache_continues_a_partial_file_and_recomputes_a_damaged_one(run_h5, tmp_path, monkeypatch):
    from toolkit.paper_figures.results import ResultCache

    from toolkit.analysis import partial, periodic
    from toolkit.analysis.records import RecordSelection
    from toolkit.capture import open_capture

    records, options = RecordSelection(steps=[0]), periodic.PeriodicOptions()  # 3 records
    written = []
    add = partial.RecordSink.add

    def add_then_stop(self, key, ds):
        if len(written) == 1:
            raise KeyboardInterrupt  # Ctrl-C after the first record
        written.append(key)
        return add(self, key, ds)

    logs: list[str] = []
    path = tmp_path / "analysis_periodic.nc"
    with open_capture(run_h5) as cap:
        def get():
            return ResultCache(cap, tmp_path, "sha", log=logs.append, progress=False, device="cpu").get(
                "periodic", records, options)

        monkeypatch.setattr(partial.RecordSink, "add", add_then_stop)
        with pytest.raises(KeyboardInterrupt):
            get()
        with open_results(path) as ds:
            assert ds.attrs["complete"] == 0 and ds.sizes["record"] == 1
        written.clear()
        monkeypatch.setattr(partial.RecordSink, "add", lambda self, key, ds: written.append(key) or add(self, key, ds))
        resumed = get()
        assert len(written) == 2 and resumed.sizes["record"] == 3  # only the missing records were computed
        assert any("continuing the partial" in line for line in logs)

        path.write_bytes(path.read_bytes()[:300])  # truncated: recomputed from scratch instead of failing
        logs.clear()
        written.clear()
        again = get()
        assert len(written) == 3 and any("unreadable" in line for line in logs)
        with open_results(path) as ds:
            assert ds.attrs["complete"] == 1
    xr.testing.assert_identical(resumed, again)  # the resumed cache equals a straight run


# ---- capture --resume: every setting that changes the numbers is in the key ----------------------------------
@pytest.fixture(scope="module")
def interrupted_capture(tmp_path_factory):
    """A capture of a 2-layer random model of the bundled architecture, marked interrupted (complete = 0)."""
    from toolkit.models import checkpoints as ck
    from toolkit.models.bundled import bundled_config

    folder = tmp_path_factory.mktemp("ckpt")
    cfg = bundled_config(dim=64, ffn_dim=64, num_layers=2, num_heads=4)
    ck.save_wan_native(ck.random_state_dict(cfg, seed=3), folder, cfg)
    out = folder / "run.h5"
    args = ["--checkpoint", str(folder), "--layers", "1", "--steps", "2", "--chunks", "0", "--queries", "random:4",
            "--store", "q,k,lse", "--seed", "5", "--quiet", "--device", "cpu"]
    assert main(["capture", *args, "--out", str(out)]) == 0
    with h5py.File(out, "r+") as f:
        f.attrs["complete"] = 0
    return out, args


@pytest.mark.parametrize("change, message", [
    (("--dtype", "bfloat16"), "compute_dtype (float32 → bfloat16)"),
    (("--attention", "monarch:1,1,1"), "attention (dense → monarch:1,1,1)"),
])
def test_capture_resume_refuses_different_settings(interrupted_capture, capsys, change, message):
    out, args = interrupted_capture
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["capture", *args, "--out", str(out), "--resume", *change]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # the refusal alone (no "resuming ..." before it)
    assert message in lines[0] and "--resume" in lines[0]
    assert out.read_bytes() == before


def test_capture_resume_with_the_same_settings_is_accepted(interrupted_capture):
    out, args = interrupted_capture
    assert main(["capture", *args, "--out", str(out), "--resume", "--dtype", "float32"]) == 0
    with h5py.File(out, "r") as f:
        assert int(f.attrs["complete"]) == 1 and str(f.attrs["compute_dtype"]) == "float32"
