"""A run describes itself: each model's sampler gives the ``RunLayout`` its seams will see, and a capture of that
run stores, as its ``timestep`` coordinate, exactly the timestep every seam call received."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
import torch

from toolkit.capture import Selection, capture
from toolkit.models import registry
from toolkit.models.sampling import WanSampler
from toolkit.models.seam import seams
from toolkit.models.wan import WanModel


def _tiny(spec: registry.ModelSpec):
    """The spec's own sampler (Wan: 4 steps) on a tiny model of its config family; a small clip."""
    cfg = dataclasses.replace(spec.config(), dim=32, ffn_dim=48, num_heads=2, num_layers=2, text_dim=8, text_len=4,
                              freq_dim=16)
    sampler = spec.make_sampler()
    if isinstance(sampler, WanSampler):
        sampler = dataclasses.replace(sampler, steps=4)
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    pt, ph, pw = cfg.patch_size
    noise = torch.randn(1, cfg.in_dim, 6 * pt, 3 * ph, 5 * pw, generator=torch.Generator().manual_seed(1))
    context = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(2))
    return model, sampler, noise, context


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_stored_timesteps_are_what_every_seam_call_received(name, tmp_path):
    spec = registry.get_spec(name)
    model, sampler, noise, context = _tiny(spec)
    layout = sampler.layout(model.cfg, model.grid_size(noise))
    seen: dict[tuple[int, int], set[float]] = {}

    def hook(q, k, v, out, ctx):
        seen.setdefault((ctx.step, ctx.chunk), set()).add(ctx.timestep)

    for seam in seams(model):
        seam.hooks.append(hook)
    out = tmp_path / f"{name}.h5"
    kwargs = {"negative_context": context} if isinstance(sampler, WanSampler) else {}
    with capture(model, Selection(layers="0", heads="0"), out, layout=layout, progress=False):
        sampler.sample(model, noise, context, generator=torch.Generator().manual_seed(3), **kwargs)

    assert {s for s, _ in seen} == set(range(layout.num_steps))
    assert all(len(ts) == 1 for ts in seen.values())  # one timestep per (step, chunk): all layers agree
    with h5py.File(out) as f:
        coord = f["timestep"][()]
        per_record = f["record_timestep"][()]
    # the model receives float32 timesteps; the file keeps the schedule in float64
    for (step, chunk), ts in seen.items():
        (t,) = ts
        assert np.float32(coord[step]) == np.float32(t), (name, step, coord[step], t)
        assert np.float32(per_record[step, chunk]) == np.float32(t)
    assert np.array_equal(coord, np.array(layout.timesteps))


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_the_spec_layout_without_weights_is_the_layout_of_a_prepared_run(name):
    """``ModelSpec.layout()`` (what ``toolkit capture`` checks selections against before loading anything) equals
    the layout of a run of that model's clip: the same sampler on the grid of the spec's latent shape."""
    spec = registry.get_spec(name)
    cfg = spec.config()
    shape = spec.latent_shape(cfg)
    grid = WanModel.grid_size(type("M", (), {"cfg": cfg})(), torch.empty(1, *shape, device="meta"))
    assert spec.layout(cfg) == spec.make_sampler().layout(cfg, grid)


def test_a_prepared_bundled_run_reports_the_layout_capture_checks_against():
    from toolkit.pipeline import prepare_run

    run = prepare_run("bundled", seed=0, device="cpu")
    assert run.layout() == registry.get_spec("bundled").layout()
    assert run.layout().timesteps == (*run.sampler.timesteps().tolist(), 0.0)
