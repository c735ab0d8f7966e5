"""Checkpoint formats: round trips, the native<->diffusers bijection, strict validation, corrupt files, SHA-256."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from toolkit.errors import CheckpointError
from toolkit.models import checkpoints as ck

# Wan2.1-T2V-1.3B (docs/self-forcing.md "Architecture (Wan2.1-T2V-1.3B)"); the shapes below are generated from it,
# no weights involved.
CFG_1P3B = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, out_dim=16, patch_size=(1, 2, 2),
                text_dim=4096, text_len=512, freq_dim=256, eps=1e-6)
# Small and awkward: nothing a power of two where it need not be, non-square patch.
CFG_SMALL = dict(dim=48, ffn_dim=80, num_heads=3, num_layers=2, in_dim=4, out_dim=5, patch_size=(1, 2, 3),
                 text_dim=24, text_len=7, freq_dim=16, eps=1e-6)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def test_native_layout_of_1p3b_from_config():
    shapes = ck.native_param_shapes(CFG_1P3B)
    assert len(shapes) == 30 * 27 + 15
    d, f = 1536, 8960
    per_block = 2 * (4 * (d * d + d) + 2 * d) + 2 * d + (f * d + f) + (d * f + d) + 6 * d
    top = (d * 16 * 4 + d) + (d * 4096 + d) + (d * d + d) + (d * 256 + d) + (d * d + d) + (6 * d * d + 6 * d) \
        + (64 * d + 64) + 2 * d
    assert ck.param_count(CFG_1P3B) == 30 * per_block + top == sum(_numel(s) for s in shapes.values())
    # norm1 / norm2 / head.norm carry no parameters (docs/self-forcing.md "Architecture (Wan2.1-T2V-1.3B)")
    assert not any(".norm1." in k or ".norm2." in k or k.startswith("head.norm") for k in shapes)


def test_native_diffusers_mapping_is_a_bijection_over_1p3b():
    native = ck.native_param_shapes(CFG_1P3B)
    mapped = {ck.native_to_diffusers(k): k for k in native}
    assert len(mapped) == len(native) == 825  # injective
    for d_name, n_name in mapped.items():
        assert ck.diffusers_to_native(d_name) == n_name  # inverse
    # the traps of diffusers' converter (docs/self-forcing.md "diffusers names")
    assert ck.native_to_diffusers("head.modulation") == "scale_shift_table"
    assert ck.native_to_diffusers("blocks.7.modulation") == "blocks.7.scale_shift_table"
    assert ck.native_to_diffusers("blocks.29.norm3.bias") == "blocks.29.norm2.bias"
    assert ck.native_to_diffusers("blocks.0.self_attn.o.weight") == "blocks.0.attn1.to_out.0.weight"
    assert ck.native_to_diffusers("blocks.3.ffn.0.bias") == "blocks.3.ffn.net.0.proj.bias"
    with pytest.raises(KeyError):
        ck.native_to_diffusers("blocks.0.norm2.weight")  # has no parameters natively: no rule
    with pytest.raises(KeyError):
        ck.diffusers_to_native("blocks.0.norm3.weight")


def test_mapping_matches_diffusers_model_names_and_shapes():
    diffusers = pytest.importorskip("diffusers", reason="diffusers ([video] extra) not installed")
    cfg = {k: v for k, v in ck.diffusers_config(CFG_1P3B).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = diffusers.WanTransformer3DModel(**cfg)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {ck.native_to_diffusers(k): s for k, s in ck.native_param_shapes(CFG_1P3B).items()}
    assert ours == theirs


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def weights():
    return ck.random_state_dict(CFG_SMALL, seed=1)


def test_round_trip_self_forcing_pt(tmp_path, weights):
    path = ck.save_self_forcing(weights, tmp_path / "sf.pt")
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["generator_ema"] and all(k.startswith("model.") for k in raw["generator_ema"])
    got = ck.load_checkpoint(path, CFG_SMALL)
    assert got.format == "self-forcing" and got.entry == "generator_ema"
    _assert_same(got.state_dict, weights)


def test_self_forcing_entry_choice_and_wrapper_fragments(tmp_path, weights):
    other = ck.random_state_dict(CFG_SMALL, seed=2)
    frag = "_fsdp_wrapped_module._checkpoint_wrapped_module."
    ema = {f"_orig_mod.model.{k}".replace("blocks.", f"blocks.{frag}"): v for k, v in weights.items()}
    torch.save({"generator": {"model." + k: v for k, v in other.items()}, "generator_ema": ema,
                "critic": {"x": torch.zeros(1)}}, tmp_path / "both.pt")
    _assert_same(ck.load_checkpoint(tmp_path / "both.pt", CFG_SMALL).state_dict, weights)
    got = ck.load_checkpoint(tmp_path / "both.pt", CFG_SMALL, use_ema=False)
    assert got.entry == "generator"
    _assert_same(got.state_dict, other)
    # only 'generator' present: EMA requested, falls back to what exists
    ck.save_self_forcing(other, tmp_path / "gen.pt", entry="generator")
    assert ck.load_checkpoint(tmp_path / "gen.pt", CFG_SMALL).entry == "generator"


def test_round_trip_wan_native_and_comfyui(tmp_path, weights):
    folder = ck.save_wan_native(weights, tmp_path / "native", CFG_SMALL)
    got = ck.load_checkpoint(folder, CFG_SMALL)
    assert got.format == "wan-native"
    assert got.config == {**CFG_SMALL}
    _assert_same(got.state_dict, weights)
    # the file alone, too
    _assert_same(ck.load_checkpoint(folder / ck.SAFETENSORS_NAME, CFG_SMALL).state_dict, weights)
    comfy = ck.save_wan_native(weights, tmp_path / "comfy", CFG_SMALL, prefix=ck.COMFYUI_PREFIX)
    got = ck.load_checkpoint(comfy, CFG_SMALL)
    assert got.format == "comfyui"
    _assert_same(got.state_dict, weights)


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_round_trip_diffusers(tmp_path, weights, shard_bytes):
    folder = ck.save_diffusers(weights, tmp_path / "transformer", CFG_SMALL, max_shard_bytes=shard_bytes)
    if shard_bytes:
        index = json.loads((folder / ck.SAFETENSORS_INDEX_NAME).read_text())
        assert len(set(index["weight_map"].values())) > 2
        assert not (folder / ck.SAFETENSORS_NAME).exists()
    got = ck.load_checkpoint(folder, CFG_SMALL)
    assert got.format == "diffusers"
    assert ck.read_checkpoint(tmp_path).path == folder  # a pipeline root with transformer/ inside
    assert {k: got.config[k] for k in got.config} == {k: CFG_SMALL[k] for k in got.config}
    assert set(got.config) >= {"dim", "num_heads", "ffn_dim", "num_layers", "in_dim", "out_dim", "patch_size"}
    _assert_same(got.state_dict, weights)


def test_missing_unexpected_wrong_shape_are_named(tmp_path, weights):
    sd = dict(weights)
    del sd["blocks.1.ffn.2.bias"], sd["head.modulation"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    sd["blocks.0.cross_attn.k.weight"] = torch.zeros(48, 47)
    path = ck.save_self_forcing(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        ck.load_checkpoint(path, CFG_SMALL)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "2 missing" in msg and "blocks.1.ffn.2.bias" in msg and "head.modulation" in msg
    assert "1 unexpected" in msg and "blocks.0.extra.weight" in msg
    assert "1 wrong shape" in msg and "blocks.0.cross_attn.k.weight [48, 47] (model [48, 48])" in msg


def test_long_lists_are_truncated_with_counts(tmp_path, weights):
    sd = {k: v for k, v in weights.items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointError, match=r"27 missing: blocks\.1\.[^;]*\(\+23 more\)"):
        ck.validate_state_dict(sd, ck.native_param_shapes(CFG_SMALL), "x")


def test_config_mismatch_is_reported_as_wrong_shapes(tmp_path, weights):
    path = ck.save_self_forcing(weights, tmp_path / "sf.pt")
    with pytest.raises(CheckpointError, match="wrong shape"):
        ck.load_checkpoint(path, {**CFG_SMALL, "ffn_dim": 96})


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_pt_gives_one_line_error_naming_file(tmp_path, weights, keep):
    path = ck.save_self_forcing(weights, tmp_path / "sf.pt")
    _truncate(path, keep)
    with pytest.raises(CheckpointError) as e:
        ck.read_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_safetensors_gives_one_line_error_naming_file(tmp_path, weights, keep):
    folder = ck.save_wan_native(weights, tmp_path / "native", CFG_SMALL)
    _truncate(folder / ck.SAFETENSORS_NAME, keep)
    with pytest.raises(CheckpointError) as e:
        ck.read_checkpoint(folder)
    assert str(folder / ck.SAFETENSORS_NAME) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["junk.pt", "junk.safetensors"])
def test_garbage_file_gives_checkpoint_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(CheckpointError, match=str(path)):
        ck.read_checkpoint(path)


def test_missing_shard_and_missing_file(tmp_path, weights):
    folder = ck.save_diffusers(weights, tmp_path / "df", CFG_SMALL, max_shard_bytes=20_000)
    shard = sorted(folder.glob("*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        ck.read_checkpoint(folder)
    with pytest.raises(CheckpointError, match="not found"):
        ck.read_checkpoint(tmp_path / "nope.pt")


def test_sha256_streams_matches_hashlib_and_cache_tracks_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "blob.bin"
    data = torch.randint(0, 256, (100_003,), dtype=torch.uint8).numpy().tobytes()
    f.write_bytes(data)
    assert ck.file_sha256(f, chunk_bytes=4096) == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "cache" / "sha256.json").is_file()
    assert ck.file_sha256(f) == hashlib.sha256(data).hexdigest()  # served from cache
    f.write_bytes(data + b"x")  # size (and mtime) change -> re-hashed
    assert ck.file_sha256(f) == hashlib.sha256(data + b"x").hexdigest()
    g = tmp_path / "other.bin"
    g.write_bytes(b"abc")
    combined = ck.checkpoint_sha256([g, f])
    lines = f"blob.bin:{hashlib.sha256(data + b'x').hexdigest()}\nother.bin:{hashlib.sha256(b'abc').hexdigest()}\n"
    assert combined == hashlib.sha256(lines.encode()).hexdigest()
    assert ck.checkpoint_sha256([g]) == hashlib.sha256(b"abc").hexdigest()


def test_wan_model_state_dict_is_the_native_layout():
    from toolkit.models.wan import WanConfig, WanModel

    for cfg in (WanConfig(), WanConfig.from_dict(CFG_SMALL)):
        with torch.device("meta"):
            model = WanModel(cfg)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert ours == ck.native_param_shapes(cfg)


def test_identical_model_outputs_through_every_format(tmp_path, weights):
    from toolkit.models.wan import WanConfig, WanModel

    cfg = WanConfig.from_dict(CFG_SMALL)
    torch.manual_seed(0)
    x = torch.randn(1, cfg.in_dim, 3, 4, 6)
    t = torch.tensor([731.5])
    context = torch.randn(1, 5, cfg.text_dim)
    reference = WanModel(cfg).eval()
    reference.load_state_dict(weights, strict=True)
    with torch.no_grad():
        want = reference(x, t, context)
    paths = [
        ck.save_self_forcing(weights, tmp_path / "sf.pt"),
        ck.save_wan_native(weights, tmp_path / "native", cfg),
        ck.save_wan_native(weights, tmp_path / "comfy", cfg, prefix=ck.COMFYUI_PREFIX),
        ck.save_diffusers(weights, tmp_path / "df", cfg),
        ck.save_diffusers(weights, tmp_path / "dfs", cfg, max_shard_bytes=30_000),
    ]
    for path in paths:
        model = WanModel(cfg).eval()  # fresh random init, overwritten by the load
        ck.load_into(model, path)
        with torch.no_grad():
            got = model(x, t, context)
        assert torch.equal(got, want), path
