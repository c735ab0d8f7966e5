"""Damaged capture files, hostile or mismatched model files, and damaged caches each give one line (a
``ToolkitError``; exit 2 through the CLI), never a traceback, a silent substitute or a cast (issue 15, items 7, 8, 10).
Damaged files are made with h5py from one small real capture of a tiny model, copied per case."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_wan

from toolkit.capture import RunLayout, Selection, capture, open_capture
from toolkit.cli import main
from toolkit.errors import CheckpointError, ToolkitError
from toolkit.models import checkpoints as ck
from toolkit.models import registry
from toolkit.models import text_encoder as te
from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps
from toolkit.models.wan import WanConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good_capture(tmp_path_factory) -> Path:
    """q, k, v, lse of every record of a 3-chunk rollout of the tiny causal model (token grid 6 × 3 × 5)."""
    cfg = tiny_config()
    model = tiny_wan(cfg, sharpen=4.0)
    g = torch.Generator().manual_seed(1)
    noise, context = torch.randn((1, 16, 6, 6, 10), generator=g), torch.randn(1, 4, cfg.text_dim, generator=g)
    layout = RunLayout.self_forcing(cfg, model.grid_size(noise), self_forcing_timesteps(), 2)
    path = tmp_path_factory.mktemp("good") / "run.h5"
    with capture(model, Selection(), path, layout=layout, progress=False, provenance={"model": "tiny"}):
        self_forcing_rollout(model, noise, context, frames_per_chunk=2, generator=torch.Generator().manual_seed(2))
    return path


def damaged(good: Path, tmp_path: Path, damage) -> Path:
    path = tmp_path / "damaged.h5"
    shutil.copy(good, path)
    with h5py.File(path, "r+") as f:
        damage(f)
    return path


def one_line_error(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _set(name: str, value):
    def damage(f):
        if value is None:
            del f.attrs[name]
        else:
            f.attrs[name] = value
    return damage


def _delete(name: str):
    def damage(f):
        del f[name]
    return damage


def _layout(**changes):
    def damage(f):
        f.attrs["layout"] = json.dumps({**json.loads(f.attrs["layout"]), **changes})
    return damage


def _lse_shape(f):
    del f["lse"]
    f.create_dataset("lse", data=np.zeros((5, 3, 3, 80), np.float32))


CASES = {
    "format version 3": (_set("format_version", 3), "format version 3; this toolkit reads <= 2 (upgrade"),
    "text format version": (_set("format_version", "one"), "'format_version' is 'one', not an integer"),
    "no format version": (_set("format_version", None), "'format_version' is missing"),
    "no layout": (_set("layout", None), "'layout' is missing"),
    "bad layout json": (_set("layout", "{grid: 3"), "'layout' is not valid JSON"),
    "layout without grid": (_set("layout", json.dumps({"num_layers": 3})), "'layout' lacks grid"),
    "zero heads in layout": (_layout(num_heads=0), "num_heads 0 is not a positive integer"),
    "no query": (_delete("query"), "dataset 'query' is missing"),
    "no step": (_delete("step"), "dataset 'step' is missing"),
    "no record_complete": (_delete("record_complete"), "dataset 'record_complete' is missing"),
    "no record_key_start_frame": (_delete("record_key_start_frame"), "'record_key_start_frame' is missing"),
    "lse of the wrong shape": (_lse_shape, "dataset 'lse' has shape (5, 3, 3, 80)"),
    # 108 tokens in the layout, 90 in the data: read blindly, topk would take 36 queries per chunk instead of 30
    "grid with more tokens": (_layout(grid=[6, 3, 6]), "dataset 'key' has shape (90,)"),
    "grid of the same size": (_layout(grid=[6, 5, 3]), "disagrees with the layout grid [6, 5, 3]"),
    "head outside the layout": (_layout(num_heads=2), "dataset 'head' holds [0, 1, 2]"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_capture_is_one_line(good_capture, tmp_path, capsys, case):
    damage, message = CASES[case]
    path = damaged(good_capture, tmp_path, damage)
    with pytest.raises(ToolkitError, match=str(path)) as e:
        open_capture(path)
    assert message in str(e.value)
    assert message in one_line_error(capsys, "inspect", str(path))


def test_random_bytes_over_the_header(good_capture, tmp_path, capsys):
    for offset in (0, 100, 512, 2048):
        path = tmp_path / f"bytes{offset}.h5"
        shutil.copy(good_capture, path)
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(np.random.default_rng(offset).bytes(512))
        assert str(path) in one_line_error(capsys, "inspect", str(path))


def test_analyze_and_figures_refuse_a_damaged_capture(good_capture, tmp_path, capsys):
    path = damaged(good_capture, tmp_path, _layout(grid=[6, 3, 6]))
    assert "dataset 'key'" in one_line_error(capsys, "analyze", "topk", str(path), "--out", str(tmp_path / "t.nc"))
    assert "dataset 'key'" in one_line_error(capsys, "figures", str(path), "--out", str(tmp_path / "figs"))


def test_cli_subprocess_prints_no_traceback(good_capture, tmp_path):
    path = damaged(good_capture, tmp_path, _set("format_version", 3))
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "inspect", str(path)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"toolkit inspect: error: {path} has format version 3; this toolkit "
                                                "reads <= 2 (upgrade the toolkit)"]


def test_verify_passes_an_intact_capture(good_capture, capsys):
    assert main(["inspect", str(good_capture), "--verify"]) == 0
    assert "verify: ok, 4050 rows of 45 records" in capsys.readouterr().out


def test_verify_catches_an_overwritten_q_row(good_capture, tmp_path, capsys):
    def overwrite(f):  # one query row of record (step 2, chunk 1, layer 1), head 0, token 40
        f["q"][2, 1, 0, 40] = np.random.default_rng(0).normal(size=16) * 3

    path = damaged(good_capture, tmp_path, overwrite)
    assert main(["inspect", str(path)]) == 0  # the structure is intact: only --verify can see it
    capsys.readouterr()
    err = one_line_error(capsys, "inspect", str(path), "--verify")
    assert f"{path}: verification failed: record step=2 chunk=1 layer=1: head 0, query token 40" in err


# ------------------------------------------------------------------------------------------------- model files
SMALL = WanConfig(dim=48, ffn_dim=80, num_heads=3, num_layers=2, in_dim=4, out_dim=4, text_dim=24, text_len=7,
                  freq_dim=16)


@pytest.fixture
def wan_folder(tmp_path) -> Path:
    return ck.save_wan_native(ck.random_state_dict(SMALL), tmp_path / "wan", SMALL)


@pytest.mark.parametrize("change, message", [
    ({"num_layers": 1e9}, "num_layers 1000000000.0 is not an integer in 1..256"),
    ({"num_layers": 10**9}, "num_layers 1000000000 is not an integer in 1..256"),
    ({"num_heads": 0}, "num_heads 0 is not an integer"),
    ({"dim": 50}, "dim 50 is not divisible by num_heads 3"),
    ({"patch_size": [1, 0, 2]}, "patch_size (1, 0, 2) is not 3 integers"),
])
def test_hostile_config_is_refused_before_building(wan_folder, change, message):
    config = wan_folder / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(CheckpointError, match=str(config)) as e:
        registry.load_model("wan2.1-t2v-1.3b", wan_folder, sha256=False)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_model_name_and_checkpoint_must_agree():
    with pytest.raises(CheckpointError, match="declares model 'bundled', not self-forcing.*--model bundled"):
        registry.load_model("self-forcing", ROOT / "data" / "bundled", sha256=False)


def test_bundled_refuses_a_checkpoint_of_another_config(wan_folder):
    with pytest.raises(CheckpointError, match=r"does not fit model bundled .*text_dim 24 \(model 32\)"):
        registry.load_model("bundled", wan_folder, sha256=False)


def test_non_floating_tensors_are_refused_by_name(wan_folder):
    from safetensors.torch import save_file

    sd = ck.random_state_dict(SMALL)
    sd["blocks.0.self_attn.q.weight"] = sd["blocks.0.self_attn.q.weight"].to(torch.int32)
    sd["head.modulation"] = sd["head.modulation"] > 0
    save_file(sd, str(wan_folder / ck.SAFETENSORS_NAME))
    with pytest.raises(CheckpointError, match=r"2 non-floating tensors .*blocks\.0\.self_attn\.q\.weight \(int32\), "
                                              r"head\.modulation \(bool\)"):
        registry.load_model("wan2.1-t2v-1.3b", wan_folder, sha256=False)


# ------------------------------------------------------------------------------------------------- prompt cache
class FakeEncoder:
    def __init__(self, t5_path: Path) -> None:
        self.t5_path, self.calls = t5_path, 0

    def encode(self, prompts):
        self.calls += 1
        out = torch.stack([torch.full((11, 8), float(len(p))) for p in prompts])
        out[:, 3:] = 0
        return out, torch.full((len(prompts),), 3)


@pytest.fixture
def fake_encoder(tmp_path, monkeypatch) -> FakeEncoder:
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "t5.pth").write_bytes(b"t5")
    return FakeEncoder(tmp_path / "t5.pth")


def test_truncated_cache_entry_is_recomputed(fake_encoder, tmp_path):
    first = te.encode_prompts(["a fox"], encoder=fake_encoder, text_len=11)
    (entry,) = (tmp_path / "cache" / "prompt_embeds").glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:40])  # a run killed mid-write by the old in-place writer
    with pytest.warns(UserWarning, match="damaged prompt-embedding cache entry"):
        again = te.encode_prompts(["a fox"], encoder=fake_encoder, text_len=11)
    assert torch.equal(again, first) and fake_encoder.calls == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # healed: read from the cache, no warning, no encoder call
        assert torch.equal(te.encode_prompts(["a fox"], encoder=fake_encoder, text_len=11), first)
    assert fake_encoder.calls == 2


def test_unwritable_cache_falls_back_with_a_warning(fake_encoder, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "file" / "cache"))
    with pytest.warns(UserWarning, match="not writable.*continuing without caching"):
        out = te.encode_prompts(["a fox", "a dog"], encoder=fake_encoder, text_len=11)
    assert out.shape == (2, 11, 8) and torch.all(out[0, :3] == 5) and torch.all(out[:, 3:] == 0)


def test_save_prompt_embeds_is_complete_or_absent(tmp_path, monkeypatch):
    import safetensors.torch

    path = te.save_prompt_embeds(tmp_path / "p.safetensors", torch.ones(2, 3))

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError):
        te.save_prompt_embeds(path, torch.zeros(2, 3))
    assert torch.equal(te.load_prompt_embeds(path, text_len=4)[0, :2], torch.ones(2, 3))
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]
