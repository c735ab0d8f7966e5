"""`toolkit generate` end to end on a small random bundled-architecture checkpoint, and its refusals."""

import json
import subprocess
import sys
import time

import pytest
import torch

from toolkit.cli import main
from toolkit.models.bundled import bundled_config
from toolkit.models.checkpoints import random_state_dict, save_wan_native


@pytest.fixture
def tiny_bundled(tmp_path):
    cfg = bundled_config(dim=32, ffn_dim=48, num_heads=2, num_layers=2)
    return save_wan_native(random_state_dict(cfg, seed=3), tmp_path / "ckpt", cfg)


def test_generate_bundled_architecture_writes_video_and_provenance(tiny_bundled, tmp_path, capsys):
    out = tmp_path / "gen"
    code = main(["generate", "--checkpoint", str(tiny_bundled), "--prompt", "2 sprites: red circle, blue square",
                 "--seed", "5", "--out", str(out), "--quiet"])
    assert code == 0
    assert (out / "video.png").stat().st_size > 1000 and (out / "video.gif").stat().st_size > 1000
    meta = json.loads((out / "run.json").read_text())
    assert meta["model"] == "bundled" and meta["seed"] == 5 and len(meta["checkpoint_sha256"]) == 64
    assert meta["prompt"] == "2 sprites: red circle, blue square"


def test_generate_is_reproducible_per_seed(tiny_bundled):
    from toolkit.pipeline import prepare_run, sample

    runs = [prepare_run("bundled", checkpoint=str(tiny_bundled), seed=s) for s in (1, 1, 2)]
    a, b, c = (sample(r, progress=False) for r in runs)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3


def test_missing_real_weights_fail_fast_with_paths_and_commands(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "generate", "--model", "self-forcing"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert time.perf_counter() - t0 < 60
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "huggingface-cli download gdhe17/Self-Forcing checkpoints/self_forcing_dmd.pt" in err
    assert str(tmp_path / "hf" / "hub") in err


@pytest.mark.parametrize("spec", ["sparse", "monarch:1,2", "monarch:0,1,1", "dense:1"])
def test_bad_attention_spec_is_refused_before_loading(spec, capsys):
    assert main(["generate", "--model", "self-forcing", "--attention", spec]) == 2
    assert "--attention" in capsys.readouterr().err


def test_monarch_attention_runs_through_every_seam(tiny_bundled):
    """--attention monarch[:f,h,w]: every layer's seam computes MonarchAttention (the PyTorch reference on CPU):
    its outputs equal the reference op called directly on the same q, k, v, and differ from dense attention."""
    from toolkit.attention.monarch import monarch_attention
    from toolkit.models.seam import dense_attention, seams
    from toolkit.pipeline import prepare_run, sample

    run = prepare_run("bundled", checkpoint=str(tiny_bundled), seed=1, attention="monarch:1,2,1")
    calls, gaps = [], []

    def check(q, k, v, out, ctx):
        ref = monarch_attention(q, k, v, ctx.grid, (1, 2, 1), query_frames=ctx.query_frames,
                                key_frames=ctx.key_frames, scale=ctx.scale)
        calls.append(float((out - ref).abs().max()))
        gaps.append(float((out - dense_attention(q, k, v, ctx)).abs().max()))

    for seam in seams(run.model):
        assert seam.backend is not None
        seam.hooks.append(check)
    sample(run, progress=False)
    assert len(calls) == 2 * 4 * 5 and max(calls) < 1e-5  # 2 layers x 4 chunks x (4 steps + clean pass)
    assert min(gaps) > 1e-3
