"""`toolkit compare` / `toolkit.analysis.quality`: attention approximations vs dense from the same noise, on the tiny
bundled config (random weights, 6 x 16 x 24 clip: ~0.1 s a video)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import xarray as xr

from toolkit.analysis import quality
from toolkit.cli import main
from toolkit.models.bundled import tiny_config
from toolkit.models.wan import WanModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["2 sprites: red circle, blue square", "1 sprites: yellow triangle; pan left"]
SPECS = ["dense", "monarch:1,1,1", "dense@layers=0+monarch:3,1,1"]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return WanModel(tiny_config()).eval()


@pytest.fixture(scope="module")
def result(tiny_model):
    lines: list[str] = []
    ds = quality.compare_attention(tiny_model, PROMPTS[:1], [0, 1], SPECS, report=lines.append)
    return ds, lines


def test_dense_as_a_spec_reproduces_the_reference_exactly(result):
    ds, _ = result
    dense = ds.sel(spec="dense")
    assert float(abs(dense["rel_l2"]).max()) == 0.0 and float(abs(dense["rel_l2_chunk"]).max()) == 0.0
    assert np.isinf(dense["psnr"].values).all() and (dense["ssim"].values == 1.0).all()
    ref = ds.sel(spec=quality.REFERENCE)
    assert float(ref["rel_l2"].max()) == 0.0 and (ref["ssim"].values == 1.0).all()


def test_monarch_gives_a_nonzero_error(result):
    ds, lines = result
    mon = ds.sel(spec="monarch:1,1,1")
    assert (mon["rel_l2"].values > 1e-4).all() and (mon["rel_l2_chunk"].values > 0).all()
    assert np.isfinite(mon["psnr"].values).all() and (mon["ssim"].values < 1).all()
    # layer 0 dense, the rest Monarch (3,1,1): between dense and Monarch everywhere in density, nonzero error
    mixed = ds.sel(spec=SPECS[2])
    assert (mixed["rel_l2"].values > 0).all()
    dens = ds["density"].values
    assert dens[0] == dens[1] == 1.0 and 0 < dens[2] < dens[3] < 1
    assert len(lines) == ds.sizes["spec"] * ds.sizes["prompt"] * ds.sizes["seed"]


def test_frames_samples_a_shorter_clip_and_refuses_partial_chunks(tiny_model, result):
    from toolkit.errors import ToolkitError
    from toolkit.models.bundled import clip_shape, frames_per_chunk

    chunk = frames_per_chunk(tiny_model.cfg)
    short = quality.compare_attention(tiny_model, PROMPTS[:1], [0], SPECS[:2], frames=chunk)
    assert short.sizes["frame"] == chunk < result[0].sizes["frame"] == clip_shape(tiny_model.cfg)[0]
    assert short.sizes["chunk"] == 1
    for bad in (chunk + 1, 0, clip_shape(tiny_model.cfg)[0] + chunk):
        with pytest.raises(ToolkitError, match="whole chunks"):
            quality.compare_attention(tiny_model, PROMPTS[:1], [0], SPECS[:1], frames=bad)


def test_metrics_equal_scikit_image_on_the_same_frames(tiny_model, result):
    """The dataset's numbers are scikit-image's on the frames sampled from the same noise: re-made here from the
    public bundled rollout (``bundled.generate``, same seed), which compare's reference must equal."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from toolkit.attention.backends import use_attention
    from toolkit.models.bundled import generate

    ds, _ = result
    prompt, seed = PROMPTS[0], 1
    ref = generate(tiny_model, prompt, seed=seed)[0].double().numpy()  # 3 f h w in [0, 1]
    with use_attention(tiny_model, "monarch:1,1,1"):
        test = generate(tiny_model, prompt, seed=seed)[0].double().numpy()
    got = ds.sel(spec="monarch:1,1,1", prompt=prompt, seed=seed)
    for f in range(ref.shape[1]):
        a, b = np.moveaxis(ref[:, f], 0, -1), np.moveaxis(test[:, f], 0, -1)
        assert got["psnr"].values[f] == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), rel=1e-4)
        assert got["ssim"].values[f] == pytest.approx(
            structural_similarity(a, b, data_range=1.0, channel_axis=-1), rel=1e-4, abs=1e-6)
    # rel L2 is of the sampler's raw output (model space, not clamped), so it is not recomputed from pixels here
    assert 0 < float(got["rel_l2"]) < 1


def test_frame_metrics_match_scikit_image_directly():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((3, 2, 20, 24))
    b = np.clip(a + 0.05 * rng.standard_normal(a.shape), 0, 1)
    psnr, ssim = quality.frame_metrics(a, b)
    for f in range(2):
        x, y = np.moveaxis(a[:, f], 0, -1), np.moveaxis(b[:, f], 0, -1)
        assert psnr[f] == peak_signal_noise_ratio(x, y, data_range=1.0)
        assert ssim[f] == structural_similarity(x, y, data_range=1.0, channel_axis=-1)
    assert quality.mean_psnr([math.inf, 30.0, 40.0]) == 35.0 and quality.mean_psnr([math.inf]) == math.inf


def test_netcdf_has_dims_cf_and_provenance_attrs(result, tmp_path):
    ds, _ = result
    path = quality.write_quality(ds, tmp_path / "quality.nc")
    back = xr.open_dataset(path, engine="h5netcdf")
    assert {"spec", "prompt", "seed", "chunk", "frame"} <= set(back.sizes)
    assert list(back["spec"].values) == [quality.REFERENCE, *SPECS]
    assert back["psnr"].attrs["units"] == "dB" and back["rel_l2"].attrs["long_name"]
    assert all("units" in back[v].attrs and "long_name" in back[v].attrs for v in back.data_vars)
    a = back.attrs
    assert a["model"] == "bundled" and a["format_version"] == quality.FORMAT_VERSION and a["toolkit_version"]
    assert list(a["seeds"]) == [0, 1] and "monarch:1,1,1" in a["specs"]
    np.testing.assert_array_equal(back["psnr"].values, ds["psnr"].values)
    for key in ("score", "colour_match", "persistence"):
        assert back[key].shape == (len(SPECS) + 1, 1, 2)
    table = quality.quality_table(ds)
    assert len(table.splitlines()) == 2 + len(SPECS) + 1 + 2 and "monarch:1,1,1" in table


def test_figure(result, tmp_path):
    from toolkit.paper_figures import quality as figure

    ds, _ = result
    pts = figure.points(ds)
    assert [p["spec"] for p in pts] == SPECS and math.isinf(pts[0]["psnr"]) and pts[1]["ssim"] < 1
    # a spec without a density goes on a categorical axis (the density axis: test_cli_end_to_end...)
    out = figure.plot(ds.assign_coords(density=ds["density"] * np.nan), tmp_path, name="categorical")
    assert not out["numeric"] and (tmp_path / "categorical.png").stat().st_size > 10_000


@pytest.mark.parametrize("spec", ["sparse", "monarch:0,1,1", "monarch@layers=99"])
def test_cli_refuses_a_bad_spec_in_one_line_before_generating(spec, tmp_path, monkeypatch, capsys):
    def no_generation(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr(quality, "compare_attention", no_generation)
    monkeypatch.setattr("toolkit.pipeline.prepare_run", no_generation)
    assert main(["compare", "--attention", "monarch", spec, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("toolkit compare: error: --attention"), err
    assert not (tmp_path / "c").exists()


def test_cli_refuses_existing_results_without_force(tmp_path, capsys):
    out = tmp_path / "c"
    out.mkdir()
    (out / "quality.nc").write_bytes(b"x")
    assert main(["compare", "--attention", "monarch", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--force" in err and len(err.splitlines()) == 1
    assert main(["compare", "--attention", "monarch", "--prompts", "heldout:0", "--out", str(tmp_path / "d")]) == 2
    assert "heldout:N" in capsys.readouterr().err


def test_cli_end_to_end_on_a_tiny_checkpoint(tmp_path, monkeypatch, capsys):
    """The CLI through ``toolkit.pipeline`` (a random bundled-architecture checkpoint on a small clip: the clip of
    the checkpoint's own config, not the shipped model's)."""
    from toolkit.models.bundled.finetune import save_finetuned
    from toolkit.models.wan import WanModel

    torch.manual_seed(3)
    ckpt = save_finetuned(tmp_path / "ckpt", WanModel(tiny_config((6, 16, 24))), {})  # a bundled-layout folder
    out = tmp_path / "c"
    args = ["compare", "--checkpoint", str(ckpt), "--prompts", "heldout:1", "--seeds", "0-1", "--attention",
            "monarch:1,1,1", "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.err.count("[") == 4 and "monarch:1,1,1" in captured.out
    ds = xr.open_dataset(out / "quality.nc", engine="h5netcdf")
    assert list(ds["seed"].values) == [0, 1] and float(ds["rel_l2"].sel(spec="monarch:1,1,1").min()) > 0
    assert ds.sizes["frame"] == 6, dict(ds.sizes)
    assert (out / "quality.png").is_file() and (out / "table.txt").is_file()
    assert main(args) == 2 and "--force" in capsys.readouterr().err  # refused before loading anything


def test_latent_model_without_vae_reports_latent_metrics_only(tmp_path, monkeypatch):
    """A Wan-family model (random Self-Forcing-layout weights, small clip, prompt embeddings): latent metrics
    only, said in one line."""
    import dataclasses

    from toolkit.models import registry
    from toolkit.models.checkpoints import random_state_dict, save_wan_native
    from toolkit.models.wan import WanConfig

    cfg = WanConfig(dim=48, ffn_dim=80, num_heads=3, num_layers=2, in_dim=4, out_dim=4, text_dim=24, text_len=512,
                    freq_dim=16)
    ckpt = save_wan_native(random_state_dict(cfg), tmp_path / "sf", cfg)
    spec = registry.MODELS["self-forcing"]
    small = dict(spec.sampler(), latent_frames=6, height=48, width=80)
    small_spec = dataclasses.replace(spec, sampler=lambda cfg=None: dict(small))
    monkeypatch.setitem(registry.MODELS, "self-forcing", small_spec)
    embeds = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for i, path in enumerate(embeds):
        torch.save(torch.randn(7, 24, generator=torch.Generator().manual_seed(i)), path)
    ds = quality.compare_attention("self-forcing", ["a", "b"], [0], ["dense", "monarch:1,1,1"],
                                   checkpoint=str(ckpt), prompt_embeds=[str(p) for p in embeds], device="cpu")
    assert "psnr" not in ds and "score" not in ds and ds.attrs["pixels"].startswith("latent metrics only")
    assert float(ds["rel_l2"].sel(spec="dense").max()) == 0.0 and (ds["rel_l2"].sel(spec="monarch:1,1,1") > 0).all()
    assert ds.sizes["chunk"] == 2 and "latent metrics only" in quality.quality_table(ds)


def test_missing_scikit_image_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage -> ImportError
    assert main(["compare", "--attention", "monarch", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "toolkit[metrics]" in err and not (tmp_path / "c").exists()
