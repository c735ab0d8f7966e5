"""`toolkit capture` and `toolkit inspect` end to end on a small random checkpoint of the bundled architecture."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
import torch

from toolkit.capture import open_capture
from toolkit.cli import main
from toolkit.models import checkpoints as ck
from toolkit.models.bundled import bundled_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-layer random model of the bundled architecture (config.json overrides the registry's 6 layers)."""
    cfg = bundled_config(dim=64, ffn_dim=64, num_layers=2, num_heads=4)
    folder = tmp_path_factory.mktemp("ckpt")
    ck.save_wan_native(ck.random_state_dict(cfg, seed=3), folder, cfg)
    return folder


def toolkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit.cli", *args], capture_output=True, text=True, timeout=300)


def test_capture_then_inspect(checkpoint, tmp_path):
    out = tmp_path / "run.h5"
    argv = ["capture", "--checkpoint", str(checkpoint), "--out", str(out), "--layers", "1", "--steps", "2,clean",
            "--chunks", "0,3", "--queries", "random:4", "--store", "q,k,lse,pooled", "--seed", "5",
            "--query-seed", "0", "--prompt", "2 sprites: red circle, blue square; pan left"]
    proc = toolkit(*argv)
    assert proc.returncode == 0, proc.stderr
    assert "capture plan: 4 records" in proc.stdout and "4 records" in proc.stdout.splitlines()[-1]
    with open_capture(out) as cap:
        assert cap.complete
        assert cap.records == [(2, 0, 1), (4, 0, 1), (2, 3, 1), (4, 3, 1)]
        assert cap.grid == (12, 20, 32)
        a = cap.attrs
        assert a["model"] == "bundled" and a["seed"] == 5 and a["prompt"].startswith("2 sprites")
        assert len(a["checkpoint_sha256"]) == 64 and a["sampler"]["frames_per_chunk"] == 3
        assert a["history"].endswith(a["history_command"])
        # the command as typed, quoted for a shell: the prompt's ";" and a zero seed survive the round trip
        assert shlex.split(a["history_command"]) == ["toolkit", *argv]
        rec = cap.record(step=2, chunk=3, layer=1)
        assert rec.k().shape == (4, 12 * 640, 16) and len(rec.query_tokens) == 3 * 4
        rows = cap.rows(rec, 3)
        assert torch.allclose(torch.from_numpy(rows.sum("key").values), torch.ones(12), atol=1e-5)
    proc = toolkit("inspect", str(out), "--records")
    assert proc.returncode == 0, proc.stderr
    for text in ("complete", "bundled", "2 sprites", "12 frames × 20 × 32 = 7680 tokens",
                 "4 complete of 4 selected", "record step=4 chunk=3 layer=1"):
        assert text in proc.stdout
    # a second run into the same file is refused and leaves it untouched
    before = out.read_bytes()
    proc = toolkit("capture", "--checkpoint", str(checkpoint), "--out", str(out), "--quiet")
    assert proc.returncode == 2 and "exists; pass --resume" in proc.stderr and proc.stdout == ""
    assert out.read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--layers", "40"], "layer 40 is out of range: this run has 6 layers (valid: 0-5)"),
    (["--steps", "7"], "step 7 is out of range: this run has 5 steps (valid: 0-4, clean)"),
    (["--chunks", "4"], "chunk 4 is out of range: this run has 4 chunks (valid: 0-3)"),
    (["--queries", "random:700"], "queries random:700 asks for more than the 640 tokens of a frame"),
    (["--store", "q,maps", "--max-map-bytes", "1MB"], "maps for this selection would take"),
    (["--max-map-bytes", "lots"], "cannot read size 'lots'"),
])
def test_refused_before_the_model_loads(args, message, capsys, tmp_path):
    # no --checkpoint and no bundled weights needed: the selection is refused first
    code = main(["capture", "--out", str(tmp_path / "x.h5"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.h5").exists()


def test_dry_run_prints_the_plan_without_loading(capsys):
    assert main(["capture", "--model", "self-forcing", "--dry-run", "--layers", "8", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    # one layer of Self-Forcing 480p: 35 records; q, k, v: 35 forwards × 4680 tokens × 12 heads × 128 × 2 B each
    assert "35 records" in out and f"q {35 * 4680 * 12 * 128 * 2 / 1e6:.1f} MB" in out


def test_inspect_rejects_other_files(tmp_path, capsys):
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2]
    assert main(["inspect", str(tmp_path / "other.h5")]) == 2
    assert "not a toolkit capture file" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.h5")]) == 2


def test_dry_run_estimate_follows_the_compute_dtype(capsys):
    """float32 runs (the CPU default) store q/k/v at 4 bytes: the plan must say so, not assume bf16."""
    assert main(["capture", "--model", "self-forcing", "--dry-run", "--layers", "8", "--dtype", "float32"]) == 0
    assert f"q {35 * 4680 * 12 * 128 * 4 / 1e9:.1f} GB" in capsys.readouterr().out


def test_capture_stops_after_the_last_selected_chunk(checkpoint, tmp_path, monkeypatch):
    """--chunks 0: the rollout ends after chunk 0's clean pass (5 forwards of 20); the file is complete and equal,
    record for record, to the same records of a capture of every chunk."""
    from toolkit.models.wan import WanModel

    calls = []
    forward = WanModel.forward
    monkeypatch.setattr(WanModel, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    short, full = tmp_path / "short.h5", tmp_path / "full.h5"
    common = ["capture", "--checkpoint", str(checkpoint), "--layers", "1", "--quiet"]
    assert main([*common, "--chunks", "0", "--out", str(short)]) == 0
    assert len(calls) == 5  # 4 denoising steps + the clean pass of chunk 0
    assert main([*common, "--out", str(full)]) == 0
    with open_capture(short) as a, open_capture(full) as b:
        assert a.complete and a.records == [r for r in b.records if r.chunk == 0]
        for key in a.records:
            assert torch.equal(a.record(*key).q(), b.record(*key).q())
            assert torch.equal(a.record(*key).lse(), b.record(*key).lse())
