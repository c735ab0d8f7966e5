"""Wan VAE: Wan -> diffusers key table (full 2.1 layout vs diffusers' model and converter), strict loading of a
tiny random VAE from a Wan-named .pth, latent de-normalisation, mp4 writing, and the no-extra fallback."""

from __future__ import annotations

import pytest
import torch

from toolkit.errors import CheckpointError, WeightsNotFound
from toolkit.models import registry
from toolkit.models import vae as wv

TINY = dict(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 3), num_res_blocks=1, temperal_downsample=(False, True, True))


def test_key_table_is_one_to_one():
    for cfg in (wv.WAN21_VAE, TINY):
        pairs = wv.vae_key_pairs(**cfg)
        assert len({w for w, _ in pairs}) == len({d for _, d in pairs}) == len(pairs)
        sd = {w: torch.full((1,), float(i)) for i, (w, _) in enumerate(pairs)}
        assert wv.diffusers_to_wan_vae(wv.wan_vae_to_diffusers(sd, cfg), cfg) == sd


def test_key_table_matches_diffusers_model_and_converter():
    diffusers = pytest.importorskip("diffusers", reason="diffusers ([video] extra) not installed")
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with torch.device("meta"):
        model = diffusers.AutoencoderKLWan()  # defaults = Wan2.1 VAE
    pairs = wv.vae_key_pairs(**wv.WAN21_VAE)
    assert {d for _, d in pairs} == set(model.state_dict())
    tagged = {w: torch.full((1,), float(i)) for i, (w, _) in enumerate(pairs)}
    theirs = convert_wan_vae_to_diffusers(tagged)
    ours = wv.wan_vae_to_diffusers(tagged)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


@pytest.fixture(scope="module")
def tiny_vae_file(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers", reason="diffusers ([video] extra) not installed")
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(**{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # also the zero-initialised attention projections
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    torch.save(wv.diffusers_to_wan_vae(model.state_dict(), TINY), path)
    return path, model.eval()


def test_tiny_vae_loads_strictly_and_decodes_like_the_original(tiny_vae_file):
    path, original = tiny_vae_file
    vae = wv.load_vae(path, config=TINY)
    torch.manual_seed(1)
    latents = torch.randn(1, TINY["z_dim"], 3, 2, 3)
    video = wv.decode_latents(vae, latents)
    assert video.shape == (1, 3, 1 + 4 * 2, 16, 24)
    mean = torch.tensor(wv.LATENT_MEAN[:4]).view(1, 4, 1, 1, 1)
    std = torch.tensor(wv.LATENT_STD[:4]).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        want = original.decode(latents * std + mean).sample.clamp(-1, 1)
    torch.testing.assert_close(video, want, rtol=0, atol=0)
    assert video.abs().max() > 0


def test_bad_vae_file_is_named(tiny_vae_file, tmp_path):
    path, _ = tiny_vae_file
    sd = torch.load(path, weights_only=True)
    del sd["decoder.head.2.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"1 missing: decoder\.conv_out\.bias"):
        wv.load_vae(tmp_path / "bad.pth", config=TINY)
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.pth"):
        wv.load_vae(tmp_path / "cut.pth", config=TINY)


def test_save_video_writes_a_readable_mp4(tiny_vae_file, tmp_path):
    imageio = pytest.importorskip("imageio.v2", reason="imageio ([video] extra) not installed")
    pytest.importorskip("imageio_ffmpeg", reason="imageio-ffmpeg ([video] extra) not installed")
    path, _ = tiny_vae_file
    vae = wv.load_vae(path, config=TINY)
    latents = torch.randn(2, TINY["z_dim"], 2, 2, 3)
    paths, message = wv.save_video(latents, tmp_path / "clip.mp4", vae=vae, fps=8)
    assert [p.name for p in paths] == ["clip_0.mp4", "clip_1.mp4"] and "wrote" in message
    frames = imageio.mimread(str(paths[1]))
    assert len(frames) == 5 and frames[0].shape == (16, 24, 3)
    want = ((wv.decode_latents(vae, latents[1:])[0, :, 0] + 1) * 127.5).permute(1, 2, 0)
    assert (torch.as_tensor(frames[0]).float() - want).abs().mean() < 20  # lossy H.264, same picture


def test_without_the_extra_latents_are_saved_and_the_extra_named(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setattr(wv, "have_video_extra", lambda: False)
    latents = torch.randn(1, 16, 3, 4, 5)
    paths, message = wv.save_video(latents, tmp_path / "clip.mp4")
    assert paths == [tmp_path / "clip.latents.safetensors"]
    assert "toolkit[video]" in message and str(paths[0]) in message
    assert torch.equal(load_file(str(paths[0]))["latents"], latents)


def test_missing_vae_weights_list_paths_and_download(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", registry.WAN_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    pytest.importorskip("diffusers", reason="diffusers ([video] extra) not installed")
    with pytest.raises(WeightsNotFound, match=r"huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B Wan2.1_VAE.pth"):
        wv.load_vae()


def test_decode_to_mp4_without_the_extra_raises_naming_it(tmp_path, monkeypatch):
    from toolkit.errors import ToolkitError

    monkeypatch.setattr(wv, "have_video_extra", lambda: False)
    with pytest.raises(ToolkitError, match=r"toolkit\[video\]"):
        wv.decode_to_mp4(torch.zeros(1, 16, 1, 2, 2), tmp_path / "x.mp4")
    assert not (tmp_path / "x.mp4").exists()
