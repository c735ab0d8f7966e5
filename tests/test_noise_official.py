"""``--noise official``: noise drawn as the released Self-Forcing pipeline draws it (global generator, initial
``[b f c h w]``, re-noise ``[(b f) c h w]``), checked against a hand-written loop in that pipeline's order."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_wan

from toolkit.errors import ToolkitError
from toolkit.models import bundled
from toolkit.models.sampling import flow_to_x0, official_noise, self_forcing_rollout, self_forcing_timesteps
from toolkit.models.wan import KVCache


def test_initial_noise_is_the_official_draw_in_the_toolkit_layout():
    torch.manual_seed(11)
    got = official_noise((2, 3, 6, 4, 5), torch.float32, "cpu")
    torch.manual_seed(11)
    ref = torch.randn(2, 6, 3, 4, 5)  # b f c h w, as the official pipeline
    assert torch.equal(got, ref.permute(0, 2, 1, 3, 4))
    assert not torch.equal(got, torch.randn(2, 3, 6, 4, 5, generator=torch.Generator().manual_seed(11)))


@torch.no_grad()
def test_rollout_with_official_noise_equals_the_official_loop_order():
    model = tiny_wan(bundled.tiny_config(clip=(6, 12, 20)), dtype=torch.float32)
    context = bundled.encode_prompt(["2 sprites: red circle, blue square", "white ring"])
    shape = (2, 3, 6, 12, 20)
    ts = self_forcing_timesteps().tolist()

    torch.manual_seed(5)
    noise = official_noise(shape, torch.float32, "cpu")
    got = self_forcing_rollout(model, noise, context, timesteps=ts, noise_layout="official")

    torch.manual_seed(5)  # the official order: initial noise, then per chunk and step a [(b f) c h w] draw
    x_all = torch.randn(2, 6, 3, 12, 20).permute(0, 2, 1, 3, 4)
    cache = KVCache(model.cfg, 2, 6 * 3 * 5, "cpu", torch.float32)
    outs = []
    for c in range(2):
        x = x_all[:, :, 3 * c : 3 * c + 3]
        for s, t in enumerate(ts):
            v = model(x, torch.full((2, 3), t), context, kv_cache=cache, start_frame=3 * c)
            x0 = flow_to_x0(x, v, t)
            if s < len(ts) - 1:
                eps = torch.randn(2 * 3, 3, 12, 20).view(2, 3, 3, 12, 20).permute(0, 2, 1, 3, 4)
                x = (1 - ts[s + 1] / 1000) * x0 + ts[s + 1] / 1000 * eps
        outs.append(x0)
        model(x0, torch.zeros(2, 3), context, kv_cache=cache, start_frame=3 * c)
    assert torch.equal(got, torch.cat(outs, dim=2))
    # and the toolkit's own layout gives a different video from the same seed
    other = self_forcing_rollout(model, noise, context, timesteps=ts, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(got, other)


def test_prepare_run_official_noise_seeds_the_global_generators_and_says_so():
    from toolkit.pipeline import prepare_run

    run = prepare_run("bundled", seed=3, device="cpu", noise="official")
    torch.manual_seed(3)
    expected = torch.randn(1, *run.noise.shape[2:3], run.noise.shape[1], *run.noise.shape[3:])
    assert torch.equal(run.noise, expected.permute(0, 2, 1, 3, 4).to(run.noise.dtype))
    assert run.provenance()["noise"] == "official"
    assert prepare_run("bundled", seed=3, device="cpu").provenance()["noise"] == "toolkit"
    with pytest.raises(ToolkitError, match="--noise"):
        prepare_run("bundled", seed=3, device="cpu", noise="numpy")
