"""Prompt sets: `toolkit capture --prompts FILE --seeds LIST --out DIR` on two ranks (torchrun, gloo, CPU), resumed,
and `toolkit analyze NAME DIR` mapped over the captures on a dask `distributed.LocalCluster`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from toolkit.capture import open_capture
from toolkit.capture.prompt_set import PromptSet, PromptSetError, Ranks, read_index, read_prompts
from toolkit.cli import main
from toolkit.models import checkpoints as ck
from toolkit.models.bundled import bundled_config

PROMPTS = ["2 sprites: red circle, blue square; pan left", "1 sprite: green triangle; static"]
# one record per capture: a one-chunk clip (3 frames), layer 0, head 0, step 3, 2 random queries per frame
SELECT = ["--frames", "3", "--layers", "0", "--heads", "0", "--steps", "3", "--chunks", "0", "--queries", "random:2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 1-layer random model of the bundled architecture (its config.json overrides the registry's 6 layers)."""
    cfg = bundled_config(dim=32, ffn_dim=32, num_layers=1, num_heads=2)
    folder = tmp_path_factory.mktemp("ckpt")
    ck.save_wan_native(ck.random_state_dict(cfg, seed=5), folder, cfg)
    return folder


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(f"{PROMPTS[0]}\n\n  {PROMPTS[1]}  \n")  # blank lines and surrounding spaces are not prompts
    return path


@pytest.fixture(scope="module")
def two_rank_set(checkpoint, prompt_file, tmp_path_factory):
    """2 prompts x 2 seeds captured by `torchrun --nproc-per-node 2 -m toolkit capture` (gloo on the CPU)."""
    out = tmp_path_factory.mktemp("set") / "set"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "toolkit",
           "capture", "--checkpoint", str(checkpoint), "--prompts", str(prompt_file), "--seeds", "0,3", "--out",
           str(out), *SELECT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_plan_order_shards_and_file_names():
    plan = PromptSet(["a", "b", "c"], [0, 7])
    assert [(it.prompt, it.seed, it.file) for it in plan.items[:3]] == [
        ("a", 0, "p0000_s0000.h5"), ("a", 7, "p0000_s0007.h5"), ("b", 0, "p0001_s0000.h5")]
    shards = [plan.shard(r, 4) for r in range(4)]
    assert sorted(it.index for s in shards for it in s) == list(range(6))  # disjoint, and every item once
    assert [it.index for it in shards[1]] == [1, 5]
    for bad in ((["a", "a"], [0]), (["a"], [0, 0]), (["a"], [-1]), ([], [0]), ([" "], [0])):
        with pytest.raises(PromptSetError):
            PromptSet(*bad)


def test_prompt_file_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "twice.txt").write_text("a\nb\na\n")
    for name, message in (("missing.txt", "no such file"), ("empty.txt", "holds no prompt"),
                          ("twice.txt", "'a' is given twice")):
        with pytest.raises(PromptSetError, match=message):
            read_prompts(tmp_path / name)


def test_ranks_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ranks = Ranks.from_env()
    assert (ranks.rank, ranks.world, ranks.local_rank) == (3, 4, 1)
    assert ranks.device("cpu") == "cpu"
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(PromptSetError, match="RANK 4"):
        Ranks.from_env()


@pytest.mark.parametrize("noise", ["toolkit", "official"])
def test_redraw_is_a_fresh_run_of_that_prompt_and_seed(checkpoint, noise):
    """A set loads its model once and redraws conditioning and noise per item: exactly what a new run draws."""
    from toolkit.pipeline import prepare_run, redraw

    base = prepare_run("bundled", prompt=PROMPTS[0], seed=0, checkpoint=str(checkpoint), device="cpu", noise=noise)
    again = redraw(base, prompt=PROMPTS[1], seed=11)
    fresh = prepare_run("bundled", prompt=PROMPTS[1], seed=11, checkpoint=str(checkpoint), device="cpu", noise=noise)
    assert torch.equal(again.noise, fresh.noise) and torch.equal(again.context, fresh.context)
    assert again.provenance()["prompt"] == PROMPTS[1] and again.provenance()["seed"] == 11
    assert torch.equal(torch.randn(4, generator=again.extra["generator"]),
                       torch.randn(4, generator=fresh.extra["generator"]))  # re-noising draws continue alike


def test_two_ranks_write_disjoint_captures_and_one_index(two_rank_set):
    out, proc = two_rank_set
    index = read_index(out)
    assert index["complete"] and index["world_size"] == 2 and index["prompts"] == PROMPTS
    assert index["seeds"] == [0, 3]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["index.json", "p0000_s0000.h5", "p0000_s0003.h5", "p0001_s0000.h5", "p0001_s0003.h5"]
    for i, entry in enumerate(index["captures"]):
        assert entry["rank"] == i % 2 and entry["action"] == "captured" and entry["status"] == "complete"
        assert entry["seconds"] > 0 and entry["records"] == 1 and entry["bytes"] > 0
        with open_capture(out / entry["file"]) as cap:
            assert cap.complete and cap.attrs["prompt"] == entry["prompt"] and cap.attrs["seed"] == entry["seed"]
            assert cap.records == [(3, 0, 0)]
    assert [r["captured"] for r in index["ranks"]] == [2, 2] and index["seconds_per_capture"] > 0
    assert "4 of 4 captures complete" in proc.stdout
    # the ranks ran one generator each: their seeds, not the rank, decide the noise (seed 0 vs 3 differ)
    q = [h5py.File(out / e["file"], "r")["q"][...] for e in index["captures"][:2]]
    assert not np.array_equal(q[0], q[1])


def test_resume_skips_finished_and_continues_the_rest(two_rank_set, checkpoint, prompt_file, tmp_path, capsys):
    out = tmp_path / "set"
    shutil.copytree(two_rank_set[0], out)
    args = ["capture", "--checkpoint", str(checkpoint), "--prompts", str(prompt_file), "--seeds", "0,3",
            "--out", str(out), "--quiet", *SELECT]
    before = {name: (out / name).read_bytes() for name in ("index.json", "p0000_s0000.h5")}
    assert main(args) == 2  # existing output: refused without --resume / --force, nothing touched
    assert "pass --resume to continue it" in capsys.readouterr().err
    other = [("1" if a == "0" and SELECT[i - 1] == "--heads" else a) for i, a in enumerate(SELECT)]
    assert main([*args[:-len(SELECT)], *other, "--resume"]) == 2  # another selection: refused before loading
    assert "different settings (selection.heads)" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before
    (out / "p0001_s0003.h5").unlink()  # never written
    with h5py.File(out / "p0000_s0003.h5", "a") as f:  # interrupted after its records were flushed
        f.attrs["complete"] = 0
    seconds = {e["file"]: e["seconds"] for e in read_index(out)["captures"]}
    assert main([*args, "--resume"]) == 0
    index = read_index(out)
    actions = {e["file"]: e["action"] for e in index["captures"]}
    assert actions == {"p0000_s0000.h5": "skipped", "p0000_s0003.h5": "resumed", "p0001_s0000.h5": "skipped",
                       "p0001_s0003.h5": "captured"}
    assert index["complete"] and all(e["status"] == "complete" for e in index["captures"])
    assert (out / "p0000_s0000.h5").read_bytes() == before["p0000_s0000.h5"]  # a finished capture is not rewritten
    kept = {e["file"]: e["seconds"] for e in index["captures"] if e["action"] == "skipped"}
    assert kept == {k: seconds[k] for k in kept}  # an earlier run's timing stays with its capture
    with open_capture(out / "p0001_s0003.h5") as new, open_capture(two_rank_set[0] / "p0001_s0003.h5") as old:
        # the same numbers as the ranks' capture (they ran one torch thread each, this process two)
        torch.testing.assert_close(new.record(3, 0, 0).q(), old.record(3, 0, 0).q(), rtol=1e-5, atol=1e-5)


def test_analysis_over_the_folder_on_a_local_cluster_equals_per_file_analyses(two_rank_set, tmp_path):
    from distributed import LocalCluster

    from toolkit.analysis import open_results, topk

    out = tmp_path / "topk.nc"
    options = topk.TopkOptions(sparsities=(0.5, 0.9), masses=(0.5, 0.9))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        assert main(["analyze", "topk", str(two_rank_set[0]), "--out", str(out), "--quiet", "--device", "cpu",
                     "--sparsities", "0.5,0.9", "--masses", "0.5,0.9", "--scheduler", cluster.scheduler_address]) == 0
    with open_results(out) as ds:
        assert json.loads(ds.attrs["prompts"]) == PROMPTS and ds.sizes["record"] == 4
        assert list(ds.prompt.values) == [0, 0, 1, 1] and list(ds.seed.values) == [0, 3, 0, 3]
        for entry in read_index(two_rank_set[0])["captures"]:
            with open_capture(two_rank_set[0] / entry["file"]) as cap:
                alone = topk.analyze(cap, options=options, device="cpu", progress=False)
            one = ds.sel(prompt=entry["prompt_index"], seed=entry["seed"])
            assert list(one.run.values) == [entry["file"]]
            for name in ("coverage_fraction", "output_rel_l2", "map_mse", "kept_mass"):
                np.testing.assert_array_equal(one[name].values, alone[name].values)


def test_analysis_of_a_folder_without_index_is_one_line(tmp_path, capsys):
    assert main(["analyze", "topk", str(tmp_path), "--out", str(tmp_path / "x.nc")]) == 2
    assert "without a prompt-set index.json" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "x", "--prompts", "{prompts}"], "give one prompt or a prompt file"),
    (["--prompts", "{prompts}", "--out", "set.h5"], "a prompt set writes a folder"),
    (["--seeds", "2-1"], "is not a seed list"),
    (["--prompts", "{missing}"], "no such file"),
])
def test_refused_before_the_model_loads(extra, message, prompt_file, tmp_path, capsys):
    extra = [a.format(prompts=prompt_file, missing=tmp_path / "none.txt") for a in extra]
    try:
        code = main(["capture", "--out", str(tmp_path / "set"), *extra])
    except SystemExit as exit:  # an argument error: argparse exits
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "set").exists()

