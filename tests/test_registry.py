"""Registry: where weights are looked for, the not-found error, loading with provenance, `toolkit models`."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time

import pytest
import torch

from toolkit.commands import models as models_cmd
from toolkit.errors import WeightsNotFound
from toolkit.models import checkpoints as ck
from toolkit.models import registry
from toolkit.models.wan import WanConfig, WanModel

CFG_SMALL = WanConfig(dim=48, ffn_dim=80, num_heads=3, num_layers=2, in_dim=4, out_dim=4, patch_size=(1, 2, 2),
                      text_dim=24, text_len=7, freq_dim=16)


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No weights anywhere: empty HF cache, env vars unset, cwd without local folders."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", registry.SF_ENV, registry.WAN_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "toolkit-cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _snapshot(root, repo, rev="0123abcd"):
    snap = root / f"models--{repo.replace('/', '--')}" / "snapshots" / rev
    snap.mkdir(parents=True)
    return snap


@pytest.mark.parametrize("name", ["self-forcing", "wan2.1-t2v-1.3b"])
def test_missing_weights_error_lists_paths_and_download_commands(clean_env, name):
    start = time.perf_counter()
    with pytest.raises(WeightsNotFound) as e:
        registry.load_model(name)
    assert time.perf_counter() - start < 5
    msg = str(e.value)
    assert "\n" not in msg
    hub = clean_env / "hf" / "hub"
    if name == "self-forcing":
        assert "huggingface-cli download gdhe17/Self-Forcing checkpoints/self_forcing_dmd.pt" in msg
        assert "$TOOLKIT_SELF_FORCING_CKPT (unset)" in msg
        assert f"{hub}/models--gdhe17--Self-Forcing/snapshots/*/checkpoints/self_forcing_dmd.pt" in msg
        assert str(clean_env / "checkpoints" / "self_forcing_dmd.pt") in msg
    else:
        assert "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B" in msg
        assert "$TOOLKIT_WAN_DIR (unset)" in msg
        assert f"{hub}/models--Wan-AI--Wan2.1-T2V-1.3B/snapshots/*/diffusion_pytorch_model.safetensors" in msg
        assert str(clean_env / "wan_models" / "Wan2.1-T2V-1.3B") in msg


def test_explicit_missing_checkpoint_is_named(clean_env):
    with pytest.raises(WeightsNotFound, match=r"--checkpoint .*nowhere\.pt.*huggingface-cli download gdhe17"):
        registry.find_weights("self-forcing", clean_env / "nowhere.pt")


def test_hf_cache_resolution_order(clean_env, monkeypatch):
    assert registry.hf_hub_cache() == clean_env / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(clean_env / "elsewhere"))
    assert registry.hf_hub_cache() == clean_env / "elsewhere"


def test_finds_self_forcing_in_hf_cache_env_and_explicit(clean_env, monkeypatch):
    weights = ck.random_state_dict(CFG_SMALL)
    hub = clean_env / "hf" / "hub"
    old = ck.save_self_forcing(weights, _snapshot(hub, registry.SF_REPO, "old") / registry.SF_FILE)
    new = ck.save_self_forcing(weights, _snapshot(hub, registry.SF_REPO, "new") / registry.SF_FILE)
    refs = hub / "models--gdhe17--Self-Forcing" / "refs"
    refs.mkdir()
    (refs / "main").write_text("old")  # refs/main wins over modification time
    assert registry.find_weights("self-forcing") == old
    (refs / "main").unlink()
    assert registry.find_weights("self-forcing") in (old, new)
    env_file = ck.save_self_forcing(weights, clean_env / "mine.pt")
    monkeypatch.setenv(registry.SF_ENV, str(env_file))
    assert registry.find_weights("self-forcing") == env_file
    explicit = ck.save_self_forcing(weights, clean_env / "explicit.pt")
    assert registry.find_weights("self-forcing", explicit) == explicit


def test_load_model_self_forcing_from_hf_cache_with_provenance(clean_env, monkeypatch):
    small = dataclasses.replace(registry.MODELS["self-forcing"], config=lambda: CFG_SMALL)
    monkeypatch.setitem(registry.MODELS, "self-forcing", small)
    weights = ck.random_state_dict(CFG_SMALL, seed=3)
    path = ck.save_self_forcing(weights, _snapshot(clean_env / "hf" / "hub", registry.SF_REPO) / registry.SF_FILE)
    model, info = registry.load_model("self-forcing")
    assert isinstance(model, WanModel) and not model.training
    assert info.checkpoint == path and info.entry == "generator_ema" and info.causal
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.sampler["frames_per_chunk"] == 3 and info.sampler["shift"] == 5.0
    json.dumps(info.to_dict())  # provenance is JSON-able
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_load_model_wan_dir_from_env_uses_its_config_json(clean_env, monkeypatch):
    weights = ck.random_state_dict(CFG_SMALL, seed=4)
    folder = ck.save_wan_native(weights, clean_env / "wan", CFG_SMALL)
    monkeypatch.setenv(registry.WAN_ENV, str(folder))
    model, info = registry.load_model("wan2.1-t2v-1.3b", dtype=torch.float64, sha256=False)
    assert model.cfg.dim == 48 and model.cfg.num_layers == 2 and not info.causal
    assert info.sha256 is None and info.format == "wan-native"
    reference = WanModel(CFG_SMALL).double().eval()
    reference.load_state_dict(weights)
    x, t, ctx = torch.randn(1, 4, 2, 4, 6, dtype=torch.float64), torch.tensor([500.0]), torch.randn(1, 3, 24)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), reference(x, t, ctx))


def test_wan_file_search_and_error(clean_env):
    with pytest.raises(WeightsNotFound) as e:
        registry.wan_file(registry.VAE_FILE)
    assert f"huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B {registry.VAE_FILE}" in str(e.value)
    assert f"snapshots/*/{registry.VAE_FILE}" in str(e.value)
    snap = _snapshot(clean_env / "hf" / "hub", registry.WAN_REPO)
    (snap / registry.VAE_FILE).write_bytes(b"x")
    assert registry.wan_file(registry.VAE_FILE) == snap / registry.VAE_FILE


def test_models_command_reports_found_and_missing(clean_env, monkeypatch, capsys):
    weights = ck.random_state_dict(CFG_SMALL)
    folder = ck.save_wan_native(weights, clean_env / "wan", CFG_SMALL)
    monkeypatch.setenv(registry.WAN_ENV, str(folder))
    assert models_cmd.run(argparse.Namespace(json=True)) == 0
    out = json.loads(capsys.readouterr().out)
    by_name = {m["name"]: m for m in out["models"]}
    assert set(by_name) == set(registry.MODELS)
    sf, wan = by_name["self-forcing"], by_name["wan2.1-t2v-1.3b"]
    assert sf["params"] == ck.param_count(WanConfig()) and sf["bf16_bytes"] == 2 * sf["params"]
    assert not any(loc["found"] for loc in sf["locations"])
    assert [loc["found"] for loc in wan["locations"]][0] == str(folder)
    assert models_cmd.run(argparse.Namespace(json=False)) == 0
    text = capsys.readouterr().out
    assert "[found] $TOOLKIT_WAN_DIR" in text and "huggingface-cli download gdhe17/Self-Forcing" in text


def test_load_model_bundled_reads_the_shipped_folder(clean_env, monkeypatch):
    from safetensors.torch import save_file

    from toolkit.models import bundled

    cfg = bundled.bundled_config(dim=32, ffn_dim=48, num_heads=2, num_layers=1)
    weights = ck.random_state_dict(cfg, seed=5, dtype=torch.float16)
    folder = clean_env / "bundled"
    folder.mkdir()
    save_file(weights, str(folder / bundled.WEIGHTS_FILE))
    (folder / bundled.CONFIG_FILE).write_text(json.dumps({**cfg.to_dict(), "training": {"steps": 1}}))
    monkeypatch.setattr(bundled, "DEFAULT_DIR", folder)
    model, info = registry.load_model()  # the default model
    assert info.name == "bundled" and info.checkpoint == folder / bundled.WEIGHTS_FILE
    assert model.cfg == cfg and model.dtype == torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k].float()), k
    monkeypatch.setattr(bundled, "DEFAULT_DIR", clean_env / "empty")
    with pytest.raises(WeightsNotFound, match="bundled with the toolkit"):
        registry.load_model("bundled")


def test_finds_the_diffusers_repo_transformer_folder(clean_env):
    weights = ck.random_state_dict(CFG_SMALL, seed=6)
    snap = _snapshot(clean_env / "hf" / "hub", registry.WAN_DIFFUSERS_REPO)
    ck.save_diffusers(weights, snap / "transformer", CFG_SMALL, max_shard_bytes=40_000)
    assert registry.find_weights("wan2.1-t2v-1.3b") == snap / "transformer"
    model, info = registry.load_model("wan2.1-t2v-1.3b", sha256=False)
    assert info.format == "diffusers" and model.cfg.num_heads == CFG_SMALL.num_heads
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
