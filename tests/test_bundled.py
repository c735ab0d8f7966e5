"""The bundled model: teacher forcing == the KV-cache path, each training stage (teacher, ODE init, Self-Forcing)
on a tiny config, strict loading, rollouts, pictures, `toolkit train` refusing to overwrite; and the shipped
weights (grid, evaluator thresholds against random initialisation)."""

from __future__ import annotations

import copy
import hashlib
import json
import runpy
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_wan
from PIL import Image
from safetensors import safe_open

from toolkit.errors import CheckpointError, WeightsNotFound
from toolkit.models import bundled
from toolkit.models.bundled import data as procedural
from toolkit.models.bundled.model import UnreadPlacesWarning, load_weights
from toolkit.models.bundled.ode_init import ODESettings, ode_grid, ode_pairs, ode_regression_loss, train_ode_init
from toolkit.models.bundled.self_forcing import SelfForcingSettings, dmd_gradient, student_rollout, train_self_forcing
from toolkit.models.bundled.teacher import (
    ClipSetup,
    TeacherSettings,
    chunked_attention,
    flow_matching_loss,
    sample_sigma,
    teacher_forcing_mask,
    train_teacher,
    warped_timesteps,
)
from toolkit.models.sampling import self_forcing_rollout
from toolkit.models.seam import seams, use_backend
from toolkit.models.wan import KVCache, WanModel

TINY = dict(dim=64, ffn_dim=96, num_heads=2, num_layers=2)
SHIPPED = bundled.DEFAULT_DIR / bundled.WEIGHTS_FILE


def _tiny_model(seed: int = 0, clip=(6, 12, 20), dtype=torch.float64) -> WanModel:
    cfg = bundled.bundled_config(**TINY)
    cfg.extra["clip"] = dict(frames=clip[0], height=clip[1], width=clip[2])
    return tiny_wan(cfg, seed=seed, dtype=dtype)


@torch.no_grad()
def test_teacher_forcing_equals_the_kv_cache_path_chunk_by_chunk():
    """The training sequence [clean | noisy] under the mask gives, for every noisy chunk, exactly what the
    Self-Forcing sampler computes with the KV cache (clean passes of earlier chunks, then the noisy chunk)."""
    model = _tiny_model(clip=(9, 12, 20))  # 3 chunks, token grid 9 x 3 x 5
    g = torch.Generator().manual_seed(0)
    b, frames, fpc = 2, 9, 3
    x0 = torch.randn(b, 3, frames, 12, 20, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    context = procedural.encode_prompts(procedural.random_prompts(b, g)).double()
    sigma = sample_sigma(b, frames, fpc, g).double()
    tpf = 3 * 5
    mask = teacher_forcing_mask(frames, tpf, fpc)

    s = sigma.view(b, 1, frames, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    seq = model(torch.cat([x0, x_t], 2), torch.cat([torch.zeros_like(sigma), 1000 * sigma], 1), context,
                frame_index=torch.arange(frames).repeat(2), attn_mask=mask)

    cache = KVCache(model.cfg, b, frames * tpf, "cpu", torch.float64)
    for c in range(frames // fpc):
        sl = slice(c * fpc, (c + 1) * fpc)
        noisy = model(x_t[:, :, sl], 1000 * sigma[:, sl], context, kv_cache=cache, start_frame=c * fpc)
        clean = model(x0[:, :, sl], torch.zeros(b, fpc, dtype=torch.float64), context, kv_cache=cache,
                      start_frame=c * fpc, is_clean=True)
        torch.testing.assert_close(seq[:, :, frames:][:, :, sl], noisy, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(seq[:, :, :frames][:, :, sl], clean, rtol=1e-9, atol=1e-9)
    # and the mask matters: without it the noisy half sees the future and the answer changes
    free = model(torch.cat([x0, x_t], 2), torch.cat([torch.zeros_like(sigma), 1000 * sigma], 1), context,
                 frame_index=torch.arange(frames).repeat(2))
    assert (free[:, :, frames:] - seq[:, :, frames:]).abs().amax() > 1e-3

    # the loss function is the MSE of that noisy half against v = noise - x0
    loss = flow_matching_loss(model, x0, context, noise, sigma, mask)
    torch.testing.assert_close(loss, (seq[:, :, frames:] - (noise - x0)).pow(2).mean().float(), rtol=1e-5, atol=0)


@torch.no_grad()
def test_chunked_attention_equals_the_masked_dense_path():
    """The training backend (one SDPA per chunk over its allowed keys) == dense SDPA under the mask, float64,
    on a grid whose chunks (3 frames x 15 tokens) cut nothing into powers of two; cached calls fall through."""
    model = _tiny_model(clip=(9, 12, 20))
    g = torch.Generator().manual_seed(1)
    b, frames = 2, 9
    x0 = torch.randn(b, 3, frames, 12, 20, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    context = procedural.encode_prompts(procedural.random_prompts(b, g)).double()
    sigma = sample_sigma(b, frames, 3, g).double()
    mask = teacher_forcing_mask(frames, 15, 3)
    dense = flow_matching_loss(model, x0, context, noise, sigma, mask, per_sample=True)
    calls = []

    def spy(q, k, v, ctx):
        calls.append(q.shape[1])
        return chunked(q, k, v, ctx)

    chunked = chunked_attention(frames, 15, 3)
    with use_backend(model, spy):
        fast = flow_matching_loss(model, x0, context, noise, sigma, mask, per_sample=True)
        video = bundled.generate(model.float(), "white ring", seed=0)  # KV-cache calls: dense fallback
        model.double()
    torch.testing.assert_close(fast, dense, rtol=1e-10, atol=0)
    assert calls[:2] == [2 * frames * 15] * 2 and video.shape == (1, 3, 9, 12, 20)
    assert all(seam.backend is None for seam in seams(model))  # restored


def test_sigma_follows_the_shift5_warp_per_chunk():
    sigma = sample_sigma(4000, 12, 3, torch.Generator().manual_seed(1))
    assert sigma.shape == (4000, 12)
    assert torch.equal(sigma[:, 0::3], sigma[:, 1::3]) and torch.equal(sigma[:, 0::3], sigma[:, 2::3])
    # warp sigma' = 5u / (1 + 4u): P(sigma' <= s) = P(u <= s / (5 - 4 s)); at s = 0.625 -> 0.25, at 0.9375 -> 0.75
    flat = sigma[:, 0::3].flatten()
    assert abs(float((flat <= 0.625).float().mean()) - 0.25) < 0.02
    assert abs(float((flat <= 0.9375).float().mean()) - 0.75) < 0.02


def _tiny_setup(clip=(6, 8, 12)):
    torch.manual_seed(0)
    cfg = bundled.tiny_config(clip)
    return cfg, ClipSetup.of(cfg, "cpu")


@pytest.mark.parametrize("prediction", ["flow", "x0"])
def test_teacher_stage_lowers_the_heldout_flow_loss(prediction):
    cfg, setup = _tiny_setup()
    model = WanModel(replace(cfg, prediction=prediction))
    with use_backend(model, setup.backend):
        record = train_teacher(model, TeacherSettings(steps=60, batch=4, lr=2e-3, warmup=10), log=lambda *_: None)
    assert record["stage"] == "teacher" and len(record["curve"]) >= 1
    # measured (seed 0): flow 1.55 -> 0.60, x0 2.16 -> 0.28
    assert record["heldout_loss_end"] < 0.6 * record["heldout_loss_init"], record


def _x0_twins(seed: int = 0, clip=(6, 12, 20)) -> tuple[WanModel, WanModel]:
    """The same random float64 weights as a flow model and as an x0 model (head randomised: not zero)."""
    flow = _tiny_model(seed, clip)
    with torch.no_grad():
        flow.head.head.weight.normal_(0, 0.1)
    x0 = copy.deepcopy(flow)
    x0.cfg = replace(flow.cfg, prediction="x0")
    return flow, x0


@torch.no_grad()
def test_x0_prediction_returns_the_flow_its_clean_sample_implies():
    """With ``prediction="x0"`` the forward returns v = (x − head) / σ per frame, so x − σ·v is the head's x̂0 and
    one Euler step to σ = 0 lands on it; the teacher-forced path (clean half at t = 0) stays finite."""
    flow, x0 = _x0_twins()
    torch.manual_seed(1)
    b, frames = 2, 6
    x = torch.randn(b, 3, frames, 12, 20, dtype=torch.float64)
    context = procedural.encode_prompts(procedural.random_prompts(b, torch.Generator().manual_seed(2)))
    sigma = torch.tensor([[0.93, 0.93, 0.93, 0.31, 0.31, 0.31], [0.6, 0.6, 0.6, 0.0007, 0.0007, 0.0007]],
                         dtype=torch.float64)
    head = flow(x, 1000 * sigma, context.double())  # the shared weights' raw output = the x0 model's x̂0
    v = x0(x, 1000 * sigma, context.double())
    s = sigma.clamp_min(1e-3).view(b, 1, frames, 1, 1)
    torch.testing.assert_close(v, (x - head) / s, rtol=1e-12, atol=1e-12)
    above = sigma.view(b, 1, frames, 1, 1).expand_as(x) >= 1e-3  # below the floor (t ≈ 0) σ·v is not x − x̂0
    torch.testing.assert_close((x - sigma.view(b, 1, frames, 1, 1) * v)[above], head[above], rtol=1e-12, atol=1e-12)
    assert (v - head).abs().amax() > 0.1  # not the flow model's answer
    mask = teacher_forcing_mask(frames, 3 * 5, 3)
    assert torch.isfinite(x0(torch.cat([x, x], 2), torch.cat([torch.zeros_like(sigma), 1000 * sigma], 1),
                             context.double(), frame_index=torch.arange(frames).repeat(2), attn_mask=mask)).all()


@torch.no_grad()
def test_x0_flow_loss_weighs_the_clean_error_by_one_over_sigma_capped():
    """The flow loss of an x0 model is mean(((x̂0 − x0) / max(σ, 0.05))²) — the flow error with 1/σ capped — against
    a float64 reference built from the twin flow model's raw output, σ on both sides of the cap."""
    from toolkit.models.bundled.teacher import X0_LOSS_SIGMA_MIN, teacher_forced_flow

    flow, x0 = _x0_twins(seed=3)
    torch.manual_seed(4)
    b, frames = 3, 6
    clean = torch.rand(b, 3, frames, 12, 20, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(clean)
    context = procedural.encode_prompts(procedural.random_prompts(b, torch.Generator().manual_seed(5))).double()
    sigma = torch.tensor([[0.011] * 3 + [0.2] * 3, [0.049] * 3 + [0.999] * 3, [0.051] * 3 + [0.7] * 3],
                         dtype=torch.float64)
    mask = teacher_forcing_mask(frames, 3 * 5, 3)
    s = sigma.view(b, 1, frames, 1, 1)
    x_hat = teacher_forced_flow(flow, clean, (1 - s) * clean + s * noise, context, sigma, mask)
    want = ((x_hat - clean) / s.clamp_min(X0_LOSS_SIGMA_MIN)).pow(2)
    got = flow_matching_loss(x0, clean, context, noise, sigma, mask, per_sample=True)
    torch.testing.assert_close(got, want.flatten(1).mean(1).float(), rtol=1e-6, atol=0)
    uncapped = ((x_hat - clean) / s).pow(2).flatten(1).mean(1)
    assert uncapped[0] > 2 * got[0]  # the cap acted on the σ = 0.011 chunk


def test_teacher_time_budget_fixes_the_steps_after_the_probe():
    """With ``seconds``, the plan shrinks after the timed probe steps to what fits; the record says how many ran."""
    from toolkit.models.bundled.teacher import PROBE_STEPS

    cfg, setup = _tiny_setup()
    model = WanModel(cfg)
    lines = []
    with use_backend(model, setup.backend):
        record = train_teacher(model, TeacherSettings(steps=10_000, batch=2, warmup=5, seconds=1e-3), log=lines.append,
                               every=5)
    assert record["steps_run"] == PROBE_STEPS and record["curve"][-1][0] == PROBE_STEPS
    assert any(f"{PROBE_STEPS} steps fit" in line for line in lines)
    with use_backend(model, setup.backend):
        record = train_teacher(model, TeacherSettings(steps=7, batch=2, warmup=2, seconds=1e6), log=lambda *_: None)
    assert record["steps_run"] == 7  # a budget never adds steps


@torch.no_grad()
def test_ode_pairs_are_the_teachers_euler_sampler_and_its_states():
    """The pair generator is the teacher's many-step sampler (same output as ``generate(solver="euler")``), and each
    kept state is the Euler iterate that sampler fed the model at that warped timestep (float64)."""
    teacher = _tiny_model(clip=(6, 12, 20))
    prompts = ["2 sprites: red circle, blue square", "white ring"]
    context = bundled.encode_prompt(prompts).double()
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 3, 6, 12, 20, generator=g, dtype=torch.float64)
    steps = (1000, 900, 750, 600, 500, 250, 100)
    states, x0 = ode_pairs(teacher, context, noise, frames_per_chunk=3, ode_steps=steps)
    assert states.shape == (4, 2, 3, 6, 12, 20)
    torch.testing.assert_close(states[0], noise, rtol=0, atol=0)  # t = 1000 is where every chunk starts
    direct = self_forcing_rollout(teacher, noise, context, timesteps=warped_timesteps(steps), solver="euler")
    torch.testing.assert_close(x0, direct, rtol=0, atol=0)

    # chunk 0 by hand: Euler on the warped grid with a fresh cache, compared at t(750) = 937.5 and t(250) = 625
    t = warped_timesteps(steps)
    cache = KVCache(teacher.cfg, 2, 6 * 3 * 5, "cpu", torch.float64)
    x = noise[:, :, :3]
    for i in range(len(steps)):
        if steps[i] in (750, 250):
            torch.testing.assert_close(states[(1000 - steps[i]) // 250, :, :, :3], x, rtol=1e-12, atol=1e-12)
        v = teacher(x, torch.full((2, 3), t[i]), context, kv_cache=cache, start_frame=0)  # t float32 as the sampler
        x = x + ((t[i + 1] if i + 1 < len(t) else 0.0) - t[i]) / 1000 * v
    torch.testing.assert_close(x0[:, :, :3], x, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="not on the ODE grid"):
        ode_pairs(teacher, context, noise, frames_per_chunk=3, ode_steps=(1000, 800, 600))
    # guided pairs, guidance at the high-noise steps only: the guided sampler's output
    guidance = dict(guidance_scale=3.0, guidance_interval=(0.9, 1.0))
    _, x0 = ode_pairs(teacher, context, noise, frames_per_chunk=3, ode_steps=steps, **guidance)
    direct = self_forcing_rollout(teacher, noise, context, timesteps=warped_timesteps(steps), solver="euler",
                                  negative_context=torch.zeros_like(context), **guidance)
    torch.testing.assert_close(x0, direct, rtol=0, atol=0)


@torch.no_grad()
def test_skipping_the_final_clean_pass_leaves_the_video_unchanged_with_one_forward_fewer():
    model = _tiny_model(clip=(9, 12, 20))
    context = bundled.encode_prompt(["2 sprites: red circle, blue square", "white ring"]).double()
    noise = torch.randn(2, 3, 9, 12, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    videos, forwards, calls = [], [], []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    for final in (True, False):
        calls.clear()
        videos.append(self_forcing_rollout(model, noise, context, generator=torch.Generator().manual_seed(4),
                                           final_clean_pass=final))
        forwards.append(len(calls))
    hook.remove()
    torch.testing.assert_close(videos[0], videos[1], rtol=0, atol=0)
    assert forwards == [3 * 5, 3 * 5 - 1]  # 3 chunks x (4 steps + clean pass), the last clean pass skipped


def test_ode_grids_contain_the_students_steps_or_are_refused():
    from toolkit.models.bundled.config import MANY_STEPS, SELF_FORCING_STEPS

    assert ode_grid(40) == MANY_STEPS
    for n in (4, 8, 20, 40, 200):
        grid = ode_grid(n)
        assert len(grid) == n and grid[0] == 1000 and set(SELF_FORCING_STEPS) <= set(grid)
    for n in (0, 3, 6, 30, 1001):
        with pytest.raises(ValueError, match="does not contain the student's steps"):
            ode_grid(n)


def test_ode_regression_stage_lowers_its_heldout_loss():
    cfg, setup = _tiny_setup()
    teacher = WanModel(cfg).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    settings = ODESettings(pairs=16, pair_batch=8, steps=40, batch=4, lr=2e-3, warmup=5)
    with use_backend(student, setup.backend):
        record = train_ode_init(student, teacher, settings, log=lambda *_: None)
    # measured (seed 0, CPU): 0.0204 -> 0.0011
    assert record["heldout_loss_end"] < 0.5 * record["heldout_loss_init"], record
    assert all(p.grad is None for p in teacher.parameters())


def test_ode_pool_keeps_only_trajectories_the_evaluator_passes(monkeypatch):
    """``keep_prompted``: the pool holds exactly the trajectories (states, x0, context) of the unfiltered pool that
    the sprite evaluator scores as matching their prompts (here a stand-in verdict: every third clip, over two
    teacher batches), and the verdict is asked of those very clips; a pool with nothing kept is a one-line error."""
    from toolkit.errors import ToolkitError
    from toolkit.models.bundled import ode_init

    cfg, _ = _tiny_setup()
    teacher = WanModel(cfg).eval().requires_grad_(False)
    settings = ODESettings(pairs=7, pair_batch=4, grid_steps=8)
    full = ode_init.make_pool(teacher, settings, seed=3, log=lambda *_: None)
    seen, verdicts = [], []
    real = ode_init.evaluate.evaluate_clips

    def every_third(video, prompts, **kw):
        scores = real(video, prompts, **kw)
        for m in scores:
            m.colour_match = m.count_match = len(verdicts) % 3 == 0
            verdicts.append(m.colour_match)
        seen.append(video)
        return scores

    monkeypatch.setattr(ode_init.evaluate, "evaluate_clips", every_third)
    kept = ode_init.make_pool(teacher, replace(settings, keep_prompted=True), seed=3, log=lambda *_: None)
    index = torch.tensor([i for i, ok in enumerate(verdicts) if ok])
    assert [len(v) for v in seen] == [4, 3] and index.tolist() == [0, 3, 6]
    assert torch.equal(torch.cat(seen), ode_init.to_pixels(full["x0"]))
    assert (kept["drawn"], kept["kept"]) == (7, 3)
    for name in ("x0", "context"):
        assert torch.equal(kept[name], full[name][index])
    assert torch.equal(kept["states"], full["states"][:, index])

    monkeypatch.setattr(ode_init.evaluate, "evaluate_clips", lambda v, p, **kw: [
        type("M", (), dict(colour_match=False, count_match=True))() for _ in p])
    with pytest.raises(ToolkitError, match="none of the teacher's 7 ODE solutions"):
        ode_init.make_pool(teacher, replace(settings, keep_prompted=True), seed=3, log=lambda *_: None)


def test_student_stages_stop_at_their_time_budget():
    """``seconds`` shrinks stages (b) and (c) to the timed probe steps when nothing more fits; the record says so."""
    from toolkit.models.bundled.teacher import PROBE_STEPS

    cfg, setup = _tiny_setup()
    teacher = WanModel(cfg).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    settings = ODESettings(pairs=4, pair_batch=4, grid_steps=8, steps=10_000, batch=2, seconds=1e-3)
    with use_backend(student, setup.backend):
        record = train_ode_init(student, teacher, settings, log=lambda *_: None)
    assert record["steps_run"] == PROBE_STEPS and record["curve"][-1][0] == PROBE_STEPS
    settings = SelfForcingSettings(steps=10_000, batch=1, critic_ratio=1, seconds=1e-3)
    record = train_self_forcing(student, teacher, settings, log=lambda *_: None)
    assert record["steps_run"] == PROBE_STEPS and record["curve"][-1][0] == PROBE_STEPS


def test_every_stage_draws_prompts_with_places_when_asked(monkeypatch, tmp_path):
    """``placed`` on a stage's settings is the fraction of its prompts that name start places: the teacher's clips,
    the ODE pool's prompts and stage (c)'s rollouts all draw through ``ClipSetup``, which carries it;
    ``recipe.with_places`` sets it on every stage and the evaluation."""
    from toolkit.models.bundled import ode_init, recipe
    from toolkit.models.bundled import teacher as teacher_stage

    cfg, _ = _tiny_setup()
    setup = ClipSetup.of(cfg, "cpu", placed=1.0)
    _, context, prompts = setup.sample(6, torch.Generator().manual_seed(1), "cpu")
    assert all(s.place for p in prompts for s in p.sprites) and procedural.decode_prompts(context) == prompts
    assert not any(s.place for p in ClipSetup.of(cfg, "cpu").sample(6, torch.Generator(), "cpu")[2]
                   for s in p.sprites)
    teacher = WanModel(cfg).eval().requires_grad_(False)
    pool = ode_init.make_pool(teacher, ODESettings(pairs=3, pair_batch=3, grid_steps=8, placed=1.0), seed=3,
                              log=lambda *_: None)
    assert all(s.place for p in procedural.decode_prompts(pool["context"]) for s in p.sprites)
    drawn = []
    real = teacher_stage.ClipSetup.prompts_context_noise

    def spy(self, *args, **kw):
        drawn.append(self.placed)
        return real(self, *args, **kw)

    monkeypatch.setattr(teacher_stage.ClipSetup, "prompts_context_noise", spy)
    student = copy.deepcopy(teacher).requires_grad_(True)
    train_self_forcing(student, teacher, SelfForcingSettings(steps=1, batch=1, critic_ratio=1, placed=0.5),
                       log=lambda *_: None)
    assert drawn and set(drawn) == {0.5}
    monkeypatch.setattr(teacher_stage.ClipSetup, "prompts_context_noise", real)
    # the model now says it reads places, its weights file keeps that, and generate no longer warns
    from toolkit.models.bundled.config import reads_places

    assert reads_places(student.cfg) and not reads_places(teacher.cfg)
    with pytest.warns(UnreadPlacesWarning, match="not trained on prompts that name start places"):
        bundled.generate(teacher, "red circle top-left", denoising_steps=(1000,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bundled.generate(student, "red circle top-left", denoising_steps=(1000,))
        bundled.generate(teacher, "red circle", denoising_steps=(1000,))
    from toolkit.models.bundled.model import save_weights
    from toolkit.pipeline import prepare_run  # the CLI's path: the shipped student reads places, a plain one not

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_run("bundled", prompt="red circle top-left", seed=0)
    plain = bundled.bundled_config()  # a model folder whose config.json says nothing of places
    save_weights(WanModel(plain), tmp_path / bundled.WEIGHTS_FILE)
    (tmp_path / bundled.CONFIG_FILE).write_text(json.dumps(plain.to_dict()))
    with pytest.warns(UnreadPlacesWarning, match="not trained on prompts that name start places"):
        prepare_run("bundled", checkpoint=str(tmp_path), prompt="red circle top-left", seed=0)
    # a Wan-native config.json (no ``extra``) completes the family's defaults, not the shipped weights' facts
    wan_native = {k: v for k, v in plain.to_dict().items() if k != "extra"}
    (tmp_path / bundled.CONFIG_FILE).write_text(json.dumps(wan_native))
    with pytest.warns(UnreadPlacesWarning, match="not trained on prompts that name start places"):
        prepare_run("bundled", checkpoint=str(tmp_path), prompt="red circle top-left", seed=0)
    # a stage's weights file alone: its metadata's config is the one used, places and size included
    from toolkit.models.bundled.config import learned_places

    small = bundled.bundled_config(dim=64, ffn_dim=128, num_heads=2, num_layers=2)
    learned_places(small)
    (tmp_path / "stage").mkdir()
    save_weights(WanModel(small), tmp_path / "stage" / "ode_init.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = prepare_run("bundled", checkpoint=str(tmp_path / "stage" / "ode_init.safetensors"),
                          prompt="red circle top-left", seed=0)
    assert run.model.cfg == small
    r = recipe.with_places(recipe.Recipe(), 0.25)
    assert (r.base.placed, r.teacher.placed, r.ode_init.placed, r.self_forcing.placed, r.placed) == (0.25,) * 5


def test_showcase_prompts_with_places_keep_their_sprites():
    """A model trained on prompts with places is shown the same four showcase prompts, each sprite in its own cell."""
    from toolkit.models.bundled.card import SHOWCASE_PLACES, SHOWCASE_PROMPTS, showcase_prompts

    plain, placed = showcase_prompts(), showcase_prompts(placed=True)
    assert [str(p) for p in plain] == list(SHOWCASE_PROMPTS)
    for p, q, cells in zip(plain, placed, SHOWCASE_PLACES, strict=True):
        assert [(s.colour, s.shape) for s in p.sprites] == [(s.colour, s.shape) for s in q.sprites] and p.pan == q.pan
        assert tuple(s.place for s in q.sprites) == cells and len(set(cells)) == len(cells)
        assert all(s.place is None for s in p.sprites)


def test_ode_regression_loss_is_the_x0_error_of_one_kv_cache_step_per_chunk():
    """For a pool entry and a chosen state per chunk, the loss equals the MSE of x0 predicted by the KV-cache
    sampler step (clean passes over the ODE output of earlier chunks, then the chunk's state) — float64."""
    cfg, _ = _tiny_setup(clip=(6, 12, 20))
    model = WanModel(cfg).double().eval()
    setup = ClipSetup.of(cfg, "cpu")
    g = torch.Generator().manual_seed(2)
    states = torch.randn(4, 1, 3, 6, 12, 20, generator=g, dtype=torch.float64)
    pool = dict(states=states, x0=torch.randn(1, 3, 6, 12, 20, generator=g, dtype=torch.float64),
                context=bundled.encode_prompt("white ring").double())
    pick = torch.Generator().manual_seed(9)
    k = torch.randint(4, (1, 2), generator=torch.Generator().manual_seed(9))  # the draw the loss will make
    with torch.no_grad():
        loss = ode_regression_loss(model, pool, torch.tensor([0]), pick, setup)
        t = warped_timesteps(bundled.SELF_FORCING_STEPS)
        cache = KVCache(cfg, 1, 6 * 15, "cpu", torch.float64)
        errs = []
        for c in range(2):
            sl = slice(3 * c, 3 * c + 3)
            x_t = states[k[0, c], :, :, sl]
            tc = torch.full((1, 3), t[k[0, c]], dtype=torch.float64)
            v = model(x_t, tc, pool["context"], kv_cache=cache, start_frame=3 * c)
            errs.append((x_t - tc[0, 0] / 1000 * v - pool["x0"][:, :, sl]).pow(2))
            model(pool["x0"][:, :, sl], torch.zeros(1, 3, dtype=torch.float64), pool["context"], kv_cache=cache,
                  start_frame=3 * c)
    torch.testing.assert_close(loss.double(), torch.cat(errs, 2).mean(), rtol=1e-6, atol=0)  # the loss is float32


@torch.no_grad()
def test_guided_rollout_combines_conditional_and_null_prompt_flows_with_their_own_caches():
    """CFG in the chunked sampler: per step v = v_u + g·(v_c − v_u), where v_c and v_u come from two KV caches, each
    filled by clean passes under its own prompt — checked against a hand loop with two caches (float64)."""
    model = _tiny_model(clip=(6, 12, 20))
    context = bundled.encode_prompt(["2 sprites: red circle, blue square", "white ring"]).double()
    null = torch.zeros_like(context)
    noise = torch.randn(2, 3, 6, 12, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = warped_timesteps((1000, 750, 500, 250))
    g = 2.5
    out = self_forcing_rollout(model, noise, context, timesteps=t, solver="euler", guidance_scale=g,
                               negative_context=null)

    def by_hand(scales: list[float]) -> torch.Tensor:  # scales[i]: the guidance of step i
        caches = {name: KVCache(model.cfg, 2, 6 * 15, "cpu", torch.float64) for name in ("c", "u")}
        prompts = {"c": context, "u": null}
        chunks = []
        for c in range(2):
            x = noise[:, :, 3 * c : 3 * c + 3]
            for i in range(len(t)):
                tt = torch.full((2, 3), t[i])  # float32, as the sampler passes t
                v = {n: model(x, tt, prompts[n], kv_cache=caches[n], start_frame=3 * c) for n in "cu"}
                flow = v["u"] + scales[i] * (v["c"] - v["u"])
                if i + 1 < len(t):
                    x = x + (t[i + 1] - t[i]) / 1000 * flow
            x0 = x - t[-1] / 1000 * flow
            for n in "cu":
                model(x0, torch.zeros(2, 3), prompts[n], kv_cache=caches[n], start_frame=3 * c,
                      is_clean=True)
            chunks.append(x0)
        return torch.cat(chunks, 2)

    torch.testing.assert_close(out, by_hand([g] * len(t)), rtol=1e-10, atol=1e-10)
    # guidance in an interval of σ: only the steps inside it are guided (t = 1000, 937.5, 833.3, 625: the first two)
    interval = self_forcing_rollout(model, noise, context, timesteps=t, solver="euler", guidance_scale=g,
                                    negative_context=null, guidance_interval=(0.9, 1.0))
    torch.testing.assert_close(interval, by_hand([g, g, 1.0, 1.0]), rtol=1e-10, atol=1e-10)
    everywhere = self_forcing_rollout(model, noise, context, timesteps=t, solver="euler", guidance_scale=g,
                                      negative_context=null, guidance_interval=(0.0, 1.0))
    assert torch.equal(everywhere, out)
    plain = self_forcing_rollout(model, noise, context, timesteps=t, solver="euler")
    assert (plain - out).abs().amax() > 1e-3  # guidance changed the sample
    assert (interval - out).abs().amax() > 1e-3 and (interval - plain).abs().amax() > 1e-3
    nowhere = self_forcing_rollout(model, noise, context, timesteps=t, solver="euler", guidance_scale=g,
                                   negative_context=null, guidance_interval=(2.0, 3.0))
    torch.testing.assert_close(nowhere, plain, rtol=1e-10, atol=1e-10)  # the conditional flow alone
    with pytest.raises(ValueError, match="negative_context"):
        self_forcing_rollout(model, noise, context, timesteps=t, guidance_scale=2.0)


@torch.no_grad()
def test_autoguidance_extrapolates_from_a_weaker_model_with_its_own_cache_and_patch():
    """``guide``: per step v = v_g + w·(v − v_g), v the model's flow (classifier-free guided or not) and v_g a weaker
    model's conditional flow from its own KV cache on its own token grid (here 2 × 2 patches against 4 × 4), filled
    by its own clean passes — checked against a hand loop with three caches (float64)."""
    model = _tiny_model(clip=(6, 12, 20))
    weak_cfg = bundled.bundled_config(**{**TINY, "dim": 32, "num_layers": 1, "patch_size": (1, 2, 2)})
    weak_cfg.extra["clip"] = dict(frames=6, height=12, width=20)
    weak = tiny_wan(weak_cfg, seed=7, dtype=torch.float64)
    context = bundled.encode_prompt(["2 sprites: red circle, blue square", "white ring"]).double()
    null = torch.zeros_like(context)
    noise = torch.randn(2, 3, 6, 12, 20, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    t = warped_timesteps((1000, 750, 500, 250))

    def by_hand(cfg_scale: float, w: float) -> torch.Tensor:
        nets = {"c": (model, context, 15), "u": (model, null, 15), "g": (weak, context, 60)}  # tokens per frame
        caches = {n: KVCache(net.cfg, 2, 6 * tpf, "cpu", torch.float64) for n, (net, _, tpf) in nets.items()}
        chunks = []
        for c in range(2):
            x = noise[:, :, 3 * c : 3 * c + 3]
            for i in range(len(t)):
                tt = torch.full((2, 3), t[i])
                v = {n: net(x, tt, ctx, kv_cache=caches[n], start_frame=3 * c) for n, (net, ctx, _) in nets.items()}
                flow = v["u"] + cfg_scale * (v["c"] - v["u"])
                flow = v["g"] + w * (flow - v["g"])
                if i + 1 < len(t):
                    x = x + (t[i + 1] - t[i]) / 1000 * flow
            x0 = x - t[-1] / 1000 * flow
            for n, (net, ctx, _) in nets.items():
                net(x0, torch.zeros(2, 3), ctx, kv_cache=caches[n], start_frame=3 * c, is_clean=True)
            chunks.append(x0)
        return torch.cat(chunks, 2)

    for cfg_scale, w in ((1.0, 2.0), (2.5, 1.7)):
        out = self_forcing_rollout(model, noise, context, timesteps=t, solver="euler", guidance_scale=cfg_scale,
                                   negative_context=null, guide=weak, guide_scale=w)
        torch.testing.assert_close(out, by_hand(cfg_scale, w), rtol=1e-10, atol=1e-10)
    plain = self_forcing_rollout(model, noise, context, timesteps=t, solver="euler")
    assert (out - plain).abs().amax() > 1e-3  # the guide changed the sample
    same = self_forcing_rollout(model, noise, context, timesteps=t, solver="euler", guide=weak, guide_scale=1.0)
    assert torch.equal(same, plain)  # w = 1: the model alone
    itself = self_forcing_rollout(model, noise, context, timesteps=t, solver="euler", guide=model, guide_scale=3.0)
    torch.testing.assert_close(itself, plain, rtol=1e-12, atol=1e-12)  # guided by itself: nothing to push from
    # ``generate`` hands the guide through (pixels)
    prompts = ["2 sprites: red circle, blue square", "white ring"]
    videos = [bundled.generate(model, prompts, seed=3, denoising_steps=(1000, 750, 500, 250), solver="euler", **o)
              for o in (dict(), dict(guide=weak, guide_scale=2.0))]
    assert (videos[1] - videos[0]).abs().amax() > 1e-3
    frame_patch = bundled.bundled_config(**{**TINY, "patch_size": (2, 4, 4)})
    frame_patch.extra["clip"] = dict(frames=6, height=12, width=20)
    with pytest.raises(ValueError, match="temporal patch"):
        self_forcing_rollout(model, noise, context, timesteps=t, guide=tiny_wan(frame_patch, dtype=torch.float64),
                             guide_scale=2.0)


def test_leave_one_out_contexts_drop_each_sprite_in_turn_and_pad_with_the_prompt_itself():
    prompts = [procedural.parse_prompt(p) for p in ("3 sprites: red circle, blue square, white ring; pan up",
                                                     "green diamond", "2 sprites: cyan ring, orange triangle")]
    negs = procedural.leave_one_out_contexts(prompts)
    assert negs.shape == (3, 3, procedural.TEXT_LEN, procedural.TEXT_DIM)
    own = procedural.encode_prompts(prompts)
    assert [str(p) for p in procedural.decode_prompts(negs[:, 0])] == [
        "2 sprites: blue square, white ring; pan up", "2 sprites: red circle, white ring; pan up",
        "2 sprites: red circle, blue square; pan up"]
    assert torch.equal(negs[0, 1], torch.zeros_like(own[1]))  # one sprite left out: the null prompt
    assert torch.equal(negs[1, 1], own[1]) and torch.equal(negs[2, 1], own[1])  # padding: the prompt itself
    left = procedural.decode_prompts(negs[:2, 2])
    assert [str(p) for p in left] == ["1 sprite: orange triangle", "1 sprite: cyan ring"]
    assert torch.equal(negs[2, 2], own[2])


@torch.no_grad()
def test_guidance_against_several_negative_prompts_sums_their_terms_each_from_its_own_cache():
    """``negative_context`` [m b L D]: per step v = v_c + (g − 1)·Σ_j (v_c − v_j), each v_j from its own KV cache
    filled by clean passes under its own prompt — checked against a hand loop (float64); one negative given as
    [1 b L D] is plain CFG, and ``generate(negatives="leave_one_out")`` is plain CFG for one-sprite prompts."""
    model = _tiny_model(clip=(6, 12, 20))
    prompts = [procedural.parse_prompt(p) for p in ("3 sprites: red circle, blue square, white ring", "white ring")]
    context = procedural.encode_prompts(prompts).double()
    negs = procedural.leave_one_out_contexts(prompts).double()
    noise = torch.randn(2, 3, 6, 12, 20, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    t = warped_timesteps((1000, 750, 500, 250))
    g = 2.5
    out = self_forcing_rollout(model, noise, context, timesteps=t, solver="euler", guidance_scale=g,
                               negative_context=negs)

    contexts = [context, *negs]
    caches = [KVCache(model.cfg, 2, 6 * 15, "cpu", torch.float64) for _ in contexts]
    chunks = []
    for c in range(2):
        x = noise[:, :, 3 * c : 3 * c + 3]
        for i in range(len(t)):
            tt = torch.full((2, 3), t[i])
            v = [model(x, tt, ctx, kv_cache=cache, start_frame=3 * c) for ctx, cache in zip(contexts, caches)]
            flow = v[0] + (g - 1) * sum(v[0] - vj for vj in v[1:])
            if i + 1 < len(t):
                x = x + (t[i + 1] - t[i]) / 1000 * flow
        x0 = x - t[-1] / 1000 * flow
        for ctx, cache in zip(contexts, caches):
            model(x0, torch.zeros(2, 3), ctx, kv_cache=cache, start_frame=3 * c, is_clean=True)
        chunks.append(x0)
    torch.testing.assert_close(out, torch.cat(chunks, 2), rtol=1e-10, atol=1e-10)

    null = torch.zeros_like(context)
    cfg = self_forcing_rollout(model, noise, context, timesteps=t, solver="euler", guidance_scale=g,
                               negative_context=null)
    assert torch.equal(cfg, self_forcing_rollout(model, noise, context, timesteps=t, solver="euler",
                                                 guidance_scale=g, negative_context=null[None]))
    assert (out[:1] - cfg[:1]).abs().amax() > 1e-3  # three sprites: other negatives, another sample
    kwargs = dict(seed=3, denoising_steps=(1000, 750, 500, 250), solver="euler", guidance_scale=g)
    one = ["white ring", "green diamond; pan left"]
    assert torch.equal(bundled.generate(model, one, negatives="leave_one_out", **kwargs),
                       bundled.generate(model, one, **kwargs))
    many = ["3 sprites: red circle, blue square, white ring", "white ring"]
    assert (bundled.generate(model, many, negatives="leave_one_out", **kwargs)
            - bundled.generate(model, many, **kwargs)).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="negatives"):
        bundled.generate(model, one, negatives="everything", **kwargs)


@torch.no_grad()
def test_ancestral_solver_is_ddim_with_eta_and_eta_zero_is_the_euler_ode():
    """``solver="ancestral"``: per step DDIM's update with stochasticity η, checked against a hand loop written in
    DDIM's own variance-preserving coordinates (x̄ = x / √(α² + σ²), ᾱ = α² / (α² + σ²), the paper's σ_η), with the
    same fresh noise; η = 0 is the Euler step of the flow ODE (float64)."""
    model = _tiny_model(clip=(6, 12, 20))
    context = bundled.encode_prompt(["2 sprites: red circle, blue square", "white ring"]).double()
    noise = torch.randn(2, 3, 6, 12, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t = warped_timesteps((1000, 750, 500, 250))

    def by_hand(eta: float, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        cache = KVCache(model.cfg, 2, 6 * 15, "cpu", torch.float64)
        chunks = []
        for c in range(2):
            x = noise[:, :, 3 * c : 3 * c + 3]
            for i in range(len(t)):
                sig = t[i] / 1000
                v = model(x, torch.full((2, 3), t[i]), context, kv_cache=cache, start_frame=3 * c)
                x0 = x - sig * v
                if i + 1 < len(t):
                    nxt = t[i + 1] / 1000
                    bar_t, bar_s = ((1 - u) ** 2 / ((1 - u) ** 2 + u**2) for u in (sig, nxt))
                    norm_t, norm_s = (((1 - u) ** 2 + u**2) ** 0.5 for u in (sig, nxt))
                    eps = (x / norm_t - bar_t**0.5 * x0) / (1 - bar_t) ** 0.5
                    s_eta = eta * ((1 - bar_s) / (1 - bar_t) * (1 - bar_t / bar_s)) ** 0.5
                    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
                    x = norm_s * (bar_s**0.5 * x0 + (1 - bar_s - s_eta**2) ** 0.5 * eps + s_eta * z)
            model(x0, torch.zeros(2, 3), context, kv_cache=cache, start_frame=3 * c, is_clean=True)
            chunks.append(x0)
        return torch.cat(chunks, 2)

    for eta in (1.0, 0.6):
        out = self_forcing_rollout(model, noise, context, timesteps=t, solver="ancestral", eta=eta,
                                   generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(out, by_hand(eta, 9), rtol=1e-9, atol=1e-9)
    euler = self_forcing_rollout(model, noise, context, timesteps=t, solver="euler")
    ddim = self_forcing_rollout(model, noise, context, timesteps=t, solver="ancestral", eta=0.0,
                                generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(ddim, euler, rtol=1e-10, atol=1e-10)
    assert (out - euler).abs().amax() > 1e-2  # the fresh noise changed the sample
    # ``generate`` hands the solver and eta through (pixels, so a looser bound)
    prompts = ["2 sprites: red circle, blue square", "white ring"]
    videos = [bundled.generate(model, prompts, seed=3, denoising_steps=(1000, 750, 500, 250), **options)
              for options in (dict(solver="euler"), dict(solver="ancestral", eta=0.0), dict(solver="ancestral"))]
    torch.testing.assert_close(videos[1], videos[0], rtol=0, atol=1e-6)
    assert (videos[2] - videos[0]).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="eta"):
        self_forcing_rollout(model, noise, context, timesteps=t, solver="ancestral", eta=1.5)


def test_exit_step_rollout_is_the_sampler_truncated_with_gradient_through_one_forward_per_chunk():
    model = _tiny_model(clip=(6, 12, 20), dtype=torch.float32)
    context = bundled.encode_prompt("2 sprites: red circle, blue square")
    noise = torch.randn(1, 3, 6, 12, 20, generator=torch.Generator().manual_seed(1))
    t = warped_timesteps(bundled.SELF_FORCING_STEPS)
    forwards = []
    seam = seams(model)[0]
    hook = seam.register_forward_hook(lambda m, a, out: forwards.append(torch.is_grad_enabled()))
    with torch.enable_grad():
        x = self_forcing_rollout(model, noise, context, timesteps=t, exit_step=2,
                                 generator=torch.Generator().manual_seed(3))
    hook.remove()
    with torch.no_grad():
        ref = self_forcing_rollout(model, noise, context, timesteps=t[:3], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x.detach(), ref, rtol=0, atol=0)
    # per chunk: steps 0, 1 without grad, step 2 with grad, clean pass without -> [F, F, T, F] x 2 chunks
    assert forwards == [False, False, True, False] * 2
    x.pow(2).mean().backward()
    # the prompt's cross-attention K/V were cached by the first (no-grad) forward, as in Self-Forcing's training
    # rollout: they and the text MLP get no gradient unless the exit step is 0; everything else does
    frozen = ("text_embedding", "cross_attn.k.", "cross_attn.v.", "cross_attn.norm_k")
    for name, p in model.named_parameters():
        assert (p.grad is None) == any(f in name for f in frozen), name


def test_dmd_gradient_vanishes_when_the_critic_is_the_teacher_and_points_from_fake_to_real():
    cfg, setup = _tiny_setup(clip=(6, 12, 20))
    teacher = WanModel(cfg).eval()
    torch.manual_seed(1)
    other = WanModel(cfg).eval()
    x = torch.randn(2, 3, 6, 12, 20, generator=torch.Generator().manual_seed(0))
    context = bundled.encode_prompt(["white ring", "red circle"])
    settings = SelfForcingSettings()
    same = dmd_gradient(x, context, teacher, teacher, setup, settings, torch.Generator().manual_seed(1))
    assert float(same.abs().max()) == 0.0
    diff = dmd_gradient(x, context, teacher, other, setup, settings, torch.Generator().manual_seed(1))
    assert float(diff.abs().mean()) > 1e-3
    # with guidance the real score moves away from the critic's even when both are the teacher
    guided = dmd_gradient(x, context, teacher, teacher, setup, settings, torch.Generator().manual_seed(1), 3.0)
    assert float(guided.abs().mean()) > 1e-3
    # guidance in an interval of σ: a clip whose noise level lies outside it gets the unguided real score, so with
    # the teacher as critic its gradient is exactly zero; an interval holding every σ changes nothing
    from toolkit.models.bundled import self_forcing

    sigma = self_forcing._dmd_sigma(2, 6, settings, torch.Generator().manual_seed(1))  # the draws dmd_gradient makes
    lo = float(sigma.max())  # one clip inside, the other outside
    part = dmd_gradient(x, context, teacher, teacher, setup, settings, torch.Generator().manual_seed(1), 3.0, (lo, 1.0))
    inside = (sigma >= lo).view(2, 1, 6, 1, 1).expand_as(part)
    assert inside.any() and (~inside).any()
    assert float(part[~inside].abs().max()) == 0.0 and float(part[inside].abs().mean()) > 1e-3
    every = dmd_gradient(x, context, teacher, teacher, setup, settings, torch.Generator().manual_seed(1), 3.0, (0, 1))
    torch.testing.assert_close(every, guided, rtol=0, atol=0)


def test_self_forcing_stage_rolls_out_with_the_sampler_and_trains_the_critic(monkeypatch):
    from toolkit.models.bundled import self_forcing

    cfg, setup = _tiny_setup()
    teacher = WanModel(cfg).eval()
    student = copy.deepcopy(teacher)
    calls = []
    real = self_forcing.self_forcing_rollout

    def spy(*args, **kwargs):
        calls.append(kwargs.get("exit_step"))
        return real(*args, **kwargs)

    monkeypatch.setattr(self_forcing, "self_forcing_rollout", spy)
    assert self_forcing.student_rollout is student_rollout and real is self_forcing_rollout
    before = [p.detach().clone() for p in student.parameters()]
    record = train_self_forcing(student, teacher, SelfForcingSettings(steps=6, batch=2, critic_ratio=3, lr=1e-3,
                                                                      critic_lr=1e-3), log=lambda *_: None, every=2)
    assert len(calls) == 6 * (3 + 1) and set(calls) <= {0, 1, 2, 3}
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert all(p.grad is None for p in teacher.parameters())
    assert record["stage"] == "self_forcing" and len(record["curve"]) == 3


def test_crowded_prompts_draw_only_high_counts_and_the_default_draws_are_unchanged():
    from toolkit.models.bundled import data

    def draws(**kw) -> list:
        return [str(p) for p in data.random_prompts(200, torch.Generator().manual_seed(3), **kw)]

    assert draws() == draws(min_sprites=1)  # what every held-out prompt set was drawn with
    counts = {len(data.parse_prompt(p).sprites) for p in draws(min_sprites=3)}
    assert counts == {3, data.MAX_SPRITES}
    with pytest.raises(ValueError, match="min_sprites"):
        data.random_prompts(1, torch.Generator(), min_sprites=data.MAX_SPRITES + 1)


def test_self_forcing_on_crowded_prompts_rolls_out_only_those_and_the_card_says_so(monkeypatch):
    """``SelfForcingSettings.min_sprites`` reaches every rollout's prompts (critic's and generator's) through
    ``ClipSetup``; the teacher's ``min_sprites`` the same way; the default draws stay every held-out set's."""
    from toolkit.models.bundled import data
    from toolkit.models.bundled.card import crowded

    cfg, setup = _tiny_setup()
    counts = []
    real = data.random_prompts

    def spy(*args, **kw):
        prompts = real(*args, **kw)
        counts.extend(len(p.sprites) for p in prompts)
        return prompts

    monkeypatch.setattr(data, "random_prompts", spy)
    teacher = WanModel(cfg).eval()
    student = copy.deepcopy(teacher)
    record = train_self_forcing(student, teacher, SelfForcingSettings(steps=3, batch=4, critic_ratio=2, min_sprites=3),
                                log=lambda *_: None)
    assert len(counts) == 3 * (2 + 1) * 4 and set(counts) == {3, data.MAX_SPRITES}
    assert record["settings"]["min_sprites"] == 3 and crowded(record["settings"]) == ", clips of 3+ sprites only"
    assert crowded({"min_sprites": 1}) == crowded({}) == ""
    counts.clear()
    x0, context, prompts = ClipSetup.of(cfg, "cpu", min_sprites=4).sample(5, torch.Generator().manual_seed(2), "cpu")
    assert set(counts) == {4} and x0.shape[0] == 5
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [str(p) for p in setup.prompts_context_noise(6, cfg.in_dim, g1, "cpu")[0]] == \
        [str(p) for p in real(6, g2)]


def test_self_forcing_resumed_from_its_state_equals_one_longer_run(tmp_path):
    """3 updates, the state through torch.save/load, then 2 resumed ones: bitwise the student (EMA), the live
    weights and the critic of 5 updates in one run; a fresh critic (no state) is not."""
    cfg, _ = _tiny_setup()
    torch.manual_seed(5)
    teacher = WanModel(cfg).eval()
    start = copy.deepcopy(teacher)
    for p in start.parameters():  # a student that differs from the critic's start
        p.data.add_(0.01 * torch.randn_like(p))
    settings = SelfForcingSettings(steps=5, batch=2, critic_ratio=2, lr=1e-3, critic_lr=1e-3, ema_decay=0.5)
    quiet = dict(log=lambda *_: None, every=1)

    whole, whole_state = copy.deepcopy(start).requires_grad_(True), {}
    train_self_forcing(whole, teacher, settings, seed=4, state=whole_state, **quiet)

    split, state = copy.deepcopy(start).requires_grad_(True), {}
    first = train_self_forcing(split, teacher, replace(settings, steps=3), seed=4, state=state, **quiet)
    torch.save(state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["updates"] == 3 and not first["resumed"]
    # the caller loads the stage file (the EMA weights); the state brings the live ones back
    second = train_self_forcing(split, teacher, replace(settings, steps=2, resume=True), seed=99, state=state,
                                **quiet)
    assert second["resumed"] and state["updates"] == 5
    for a, b in zip(whole.state_dict().values(), split.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for key in ("student", "critic"):
        for a, b in zip(whole_state[key].values(), state[key].values(), strict=True):
            assert torch.equal(a, b)

    fresh = copy.deepcopy(start).requires_grad_(True)
    train_self_forcing(fresh, teacher, replace(settings, steps=3), seed=4, **quiet)
    train_self_forcing(fresh, teacher, replace(settings, steps=2), seed=4, **quiet)
    assert any(not torch.equal(a, b) for a, b in zip(whole.state_dict().values(), fresh.state_dict().values()))


def _save(model: WanModel, folder, config: dict | None = None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(folder / bundled.WEIGHTS_FILE))
    (folder / bundled.CONFIG_FILE).write_text(json.dumps(config if config is not None else model.cfg.to_dict()))


def test_load_bundled_is_strict(tmp_path):
    with pytest.raises(WeightsNotFound, match="toolkit train --out"):
        bundled.load_bundled(path=tmp_path / "nothing")

    model = _tiny_model(dtype=torch.float32)
    _save(model, tmp_path / "ok", {**model.cfg.to_dict(), "training": {"steps": 3}})
    loaded, info = bundled.load_bundled(path=tmp_path / "ok")
    assert info["training"] == {"steps": 3} and loaded.cfg.to_dict() == model.cfg.to_dict()
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a.half().float(), b)

    # weights of another architecture under this config -> CheckpointError naming the file
    other = _tiny_model(dtype=torch.float32)
    _save(other, tmp_path / "bad", bundled.bundled_config(**{**TINY, "num_layers": 3}).to_dict())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        bundled.load_bundled(path=tmp_path / "bad")
    # an integer tensor is refused by name, not cast into float weights
    from safetensors.torch import load_file, save_file

    _save(other, tmp_path / "ints")
    state = load_file(str(tmp_path / "ints" / bundled.WEIGHTS_FILE))
    name = sorted(state)[0]
    state[name] = state[name].to(torch.int32)
    save_file(state, str(tmp_path / "ints" / bundled.WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        bundled.load_bundled(path=tmp_path / "ints")
    # a config.json that is not JSON or is out of bounds: one error naming it
    (tmp_path / "ints" / bundled.CONFIG_FILE).write_text('{"num_heads": 0')
    with pytest.raises(CheckpointError, match="config.json"):
        bundled.load_bundled(path=tmp_path / "ints")


def test_generate_is_a_seeded_full_rollout_and_pictures_are_written(tmp_path, monkeypatch):
    from toolkit.models.bundled import model as bundled_model

    model = _tiny_model(dtype=torch.float32)
    chunks, real = [], bundled_model.self_forcing_rollout
    assert real is self_forcing_rollout  # the sampler's loop, not a copy

    def counting(*args, **kwargs):
        return real(*args, **kwargs, on_chunk=lambda c, x0: chunks.append(c))

    with monkeypatch.context() as m:
        m.setattr(bundled_model, "self_forcing_rollout", counting)
        a = bundled.generate(model, ["2 sprites: red circle, blue square; pan left", "white ring"], seed=3)
    assert chunks == [0, 1]  # 6 frames = 2 chunks of 3
    b = bundled.generate(model, [procedural.parse_prompt("2 sprites: red circle, blue square; pan left"),
                                 "white ring"], seed=3)
    c = bundled.generate(model, ["2 sprites: red circle, blue square; pan left", "white ring"], seed=4)
    assert a.shape == (2, 3, 6, 12, 20) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)

    png = bundled.save_strip([a[0], a[1]], tmp_path / "strip.png", ["one", "two"], scale=2)
    with Image.open(png) as im:
        assert im.width >= 6 * 20 * 2 and im.height >= 2 * 12 * 2
    gif = bundled.save_gif(a[0], tmp_path / "clip.gif", scale=3)
    with Image.open(gif) as im:
        assert im.size == (60, 36) and im.n_frames == 6


def _tree_digest(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _record_start(monkeypatch, module, name: str) -> dict:
    """Wrap the stage function ``module.name`` so that it first copies the student's starting weights into the
    returned dict."""
    started, train = {}, getattr(module, name)

    def spy(student, *args, **kwargs):
        started.update({k: v.detach().clone() for k, v in student.state_dict().items()})
        return train(student, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return started


def _train_refused(argv: list[str], message: str) -> None:
    """``toolkit train ARGV`` exits 2 with one line on stderr, which contains ``message``."""
    run = subprocess.run([sys.executable, "-m", "toolkit.cli", "train", *argv], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and message in run.stderr, (argv, run.stderr)
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_toolkit_train_runs_every_stage_and_refuses_to_overwrite_a_model(tmp_path, monkeypatch):
    from toolkit.commands.train import main

    out = tmp_path / "model"
    assert main(["--tiny", "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "train_log.json").read_text())
    assert set(record["stages"]) == {"base", "teacher", "ode_init", "self_forcing"}
    # the teacher has its own (coarser-patch) architecture, stored with its weights; the student starts from base
    assert record["teacher_config"]["patch_size"] == [1, 8, 8] and record["config"]["patch_size"] == [1, 4, 4]
    teacher = load_weights(out / "stages" / "teacher.safetensors")
    assert tuple(teacher.cfg.patch_size) == (1, 8, 8) and teacher.cfg.dim != record["config"]["dim"]
    assert record["shipped"] in ("ode_init", "self_forcing")
    assert set(record["evaluation"]) == {"random_init", "ode_init", "self_forcing", "teacher_40_euler_steps",
                                         "ground_truth"}
    assert record["evaluation"]["ground_truth"]["score"] == 1.0
    for name in ("model.safetensors", "config.json", "MODEL_CARD.md", "curves.png", "rollout.png", "rollout.gif",
                 "stages/base.safetensors", "stages/teacher.safetensors"):
        assert (out / name).is_file(), name
    model, info = bundled.load_bundled(path=out)  # strict load of what was shipped
    assert info["training"]["shipped"] == record["shipped"]

    before = _tree_digest(out)
    for argv in (["--tiny"], ["--tiny", "--stages", "teacher"]):
        run = subprocess.run([sys.executable, "-m", "toolkit.cli", "train", "--out", str(out), *argv],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and "already holds a model" in lines[0] and "--force" in lines[0], run.stderr
    assert _tree_digest(out) == before
    # a later stage without the earlier stage's weights is one line too
    empty = ["--out", str(tmp_path / "empty"), "--tiny"]
    _train_refused([*empty, "--stages", "self_forcing"], "run stage ode_init first")
    _train_refused([*empty, "--stages", "ode_init"], "run stage base first")
    _train_refused([*empty, "--ode-grid", "30"], "--ode-grid 30")
    assert not (tmp_path / "empty").exists()
    # continuing stage (b): refused in one line, nothing written, without its earlier weights, without the stage
    # itself, or with base or teacher retrained beside it
    for folder, stages, message in ((tmp_path / "empty", "ode_init", "run stage ode_init first"),
                                    (out, "self_forcing", "add it to the stages"),
                                    (out, "base,ode_init", "runs without base and teacher"),
                                    (out, "teacher,ode_init", "runs without base and teacher")):
        _train_refused(["--out", str(folder), "--tiny", "--force", "--stages", stages, "--ode-start", "ode_init"],
                       message)
    assert not (tmp_path / "empty").exists() and _tree_digest(out) == before

    # stage (b) trained further: it starts from its own earlier student, and the record keeps the first run
    import toolkit.models.bundled.recipe as recipe_module

    earlier = load_weights(out / "stages" / "ode_init.safetensors").state_dict()
    base = load_weights(out / "stages" / "base.safetensors").state_dict()
    started = _record_start(monkeypatch, recipe_module, "train_ode_init")
    monkeypatch.setenv("TOOLKIT_COMMIT", "later")
    assert main(["--tiny", "--out", str(out), "--stages", "ode_init", "--ode-start", "ode_init", "--seed", "1",
                 "--force", "--quiet"]) == 0
    assert all(torch.equal(started[k], v) for k, v in earlier.items())
    assert not all(torch.equal(started[k], v) for k, v in base.items())
    ode = json.loads((out / "train_log.json").read_text())["stages"]["ode_init"]
    assert ode["heldout_loss_end"] == record["stages"]["ode_init"]["heldout_loss_end"]
    assert len(ode["continued"]) == 1 and ode["continued"][0]["steps_run"] == 4
    assert ode["commit"] == record["stages"]["ode_init"]["commit"] != "later" == ode["continued"][0]["commit"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "| ode_init, continued | 4 × 2 |" in card and "4 new ODE pairs (seed 1)" in card
    assert "--ode-start ode_init --force --seed S` (S = 1)." in card
    later = json.loads((out / "train_log.json").read_text())
    assert later["seed"] == 0 and ode["seed"] == 0 and ode["continued"][0]["seed"] == 1
    # the stage (c) of the first run was trained from the student this replaced: no longer in the record
    assert "self_forcing" not in later["stages"] and "| self_forcing |" not in card
    # the teacher's samples were not scored again: the same weights, guidance, prompts and noise
    kept = "by an earlier run (same weights, prompts and noise)"
    assert later["evaluation"]["teacher_40_euler_steps"] == {**record["evaluation"]["teacher_40_euler_steps"],
                                                             "evaluated": kept}
    guidance = later["guidance"]["scale"]
    assert f"| teacher, 40 Euler steps, CFG {guidance:g} (evaluated {kept}) |" in card

    # stage (c) trained further (--sf-start self_forcing): refused in one line without its weights or beside an
    # earlier stage; then it starts from its own earlier student, keeps the first run in the record and the (b)
    # student's numbers from the evaluation that trained it
    assert main(["--tiny", "--out", str(out), "--stages", "self_forcing", "--force", "--quiet"]) == 0
    before = _tree_digest(out)
    for stages, message in (("ode_init,self_forcing", "runs without base, teacher and ode_init"),
                            ("ode_init", "add it to the stages")):
        _train_refused(["--out", str(out), "--tiny", "--force", "--stages", stages, "--sf-start", "self_forcing"],
                       message)
    assert _tree_digest(out) == before
    first_sf = json.loads((out / "train_log.json").read_text())
    earlier = load_weights(out / "stages" / "self_forcing.safetensors").state_dict()
    started = _record_start(monkeypatch, recipe_module, "train_self_forcing")
    monkeypatch.setenv("TOOLKIT_COMMIT", "latest")
    assert main(["--tiny", "--out", str(out), "--stages", "self_forcing", "--sf-start", "self_forcing", "--seed", "2",
                 "--force", "--quiet"]) == 0
    assert all(torch.equal(started[k], v) for k, v in earlier.items())
    latest = json.loads((out / "train_log.json").read_text())
    sf = latest["stages"]["self_forcing"]
    assert sf["steps_run"] == first_sf["stages"]["self_forcing"]["steps_run"] and sf["commit"] == "later"
    more = sf["continued"]
    assert len(more) == 1 and more[0]["seed"] == 2 and more[0]["commit"] == "latest" and more[0]["steps_run"] == 2
    teacher_record = latest["stages"]["teacher"]
    assert more[0]["teacher_steps"] == teacher_record["steps_run"] > 0
    assert list(latest["evaluation"]) == ["random_init", "ode_init", "self_forcing_start", "self_forcing",
                                          "teacher_40_euler_steps", "ground_truth"]
    assert latest["evaluation"]["ode_init"] == {**first_sf["evaluation"]["ode_init"],
                                                "evaluated": "by the run that trained it"}
    assert latest["evaluation"]["self_forcing_start"].keys() == first_sf["evaluation"]["self_forcing"].keys()
    assert latest["shipped"] in ("self_forcing_start", "self_forcing")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["stage"] == "self_forcing"  # either candidate is stage (c)'s weights
    card = (out / "MODEL_CARD.md").read_text()
    assert "| self_forcing, continued | 2 × 2 |" in card and "seed 2, a fresh critic" in card
    assert "| ode init (evaluated by the run that trained it) |" in card and "| self forcing start |" in card
    dropped = "; not shipped: the student before it is" if latest["shipped"] == "self_forcing_start" else ""
    assert f"--sf-start self_forcing --force --seed S` (S = 2{dropped})." in card
    assert "before and after its last continued run" in card

    # stage (c) resumed (--sf-resume): from the state the last stage-(c) run left beside its weights; refused
    # without --sf-start self_forcing, and for a state of other weights
    from toolkit.errors import ToolkitError
    from toolkit.models.bundled.recipe import load_sf_state

    state_file = out / "stages" / "self_forcing_state.pt"
    assert torch.load(state_file, weights_only=True)["updates"] == 2  # the continued run above, a fresh state
    _train_refused(["--out", str(out), "--tiny", "--force", "--stages", "self_forcing", "--sf-resume"],
                   "add --sf-start self_forcing")
    with pytest.raises(ToolkitError, match="is not the state of"):
        load_sf_state(out, load_weights(out / "stages" / "ode_init.safetensors"))
    assert main(["--tiny", "--out", str(out), "--stages", "self_forcing", "--sf-start", "self_forcing",
                 "--sf-resume", "--seed", "5", "--force", "--quiet"]) == 0
    latest = json.loads((out / "train_log.json").read_text())
    more = latest["stages"]["self_forcing"]["continued"]
    assert [run["resumed"] for run in more] == [False, True] and more[1]["seed"] == 5
    assert torch.load(state_file, weights_only=True)["updates"] == 4
    card = (out / "MODEL_CARD.md").read_text()
    assert "resumed: the run above's critic, optimisers, EMA and random streams" in card

    # a second round of stage (b) from the stage-(c) student (--ode-start self_forcing): it starts from those
    # weights, and the record keeps the stage-(c) record it started from inside the continued run
    earlier = load_weights(out / "stages" / "self_forcing.safetensors").state_dict()
    started = _record_start(monkeypatch, recipe_module, "train_ode_init")
    assert main(["--tiny", "--out", str(out), "--stages", "ode_init", "--ode-start", "self_forcing", "--seed", "3",
                 "--force", "--quiet"]) == 0
    assert all(torch.equal(started[k], v) for k, v in earlier.items())
    second = json.loads((out / "train_log.json").read_text())
    rounds = second["stages"]["ode_init"]["continued"]
    assert [more["seed"] for more in rounds] == [1, 3] and "start_record" not in rounds[0]
    assert rounds[1]["start_record"] == latest["stages"]["self_forcing"] and "self_forcing" not in second["stages"]
    assert not state_file.exists()  # the state of the stage-(c) run the new student replaced
    assert main(["--tiny", "--out", str(out), "--stages", "self_forcing", "--seed", "4", "--guidance", "1.5",
                 "--force", "--quiet"]) == 0
    teacher_row = json.loads((out / "train_log.json").read_text())["evaluation"]["teacher_40_euler_steps"]
    assert "evaluated" not in teacher_row and teacher_row["of"]["guidance"] == [1.5, None]  # scored again
    card = (out / "MODEL_CARD.md").read_text()
    table = [line for line in card.splitlines() if line.startswith(("| ode_init", "| self_forcing"))]
    assert [line.split(" | ")[0] for line in table] == [
        "| ode_init", "| ode_init, continued", "| self_forcing", "| self_forcing, continued",
        "| self_forcing, continued", "| ode_init, continued", "| self_forcing"]
    assert "seed 3), teacher CFG" in table[5] and table[5].count("from the self_forcing student above") == 1
    # the last stage (c) used another guidance than the runs before it, so each command names its run's
    assert ("After stage (c), stage (b) started a second round from the stage-(c) student with `--stages ode_init "
            f"--ode-start self_forcing --guidance {rounds[1]['guidance_scale']:g} --force --seed S` (S = 3), then "
            "stage (c) again.") in card


def test_student_size_sets_the_base_and_the_later_stages_follow_it(tmp_path):
    from toolkit.commands.train import main

    out = tmp_path / "wide"
    assert main(["--tiny", "--out", str(out), "--stages", "base,teacher", "--student-size", "3x48/2", "--quiet"]) == 0
    base = load_weights(out / "stages" / "base.safetensors")
    assert (base.cfg.num_layers, base.cfg.dim, base.cfg.num_heads, base.cfg.ffn_dim) == (3, 48, 2, 192)
    # a base split over device calls: continue_teacher.py --stage base trains it further in place, keeps its size
    # and records the run under the base's "continued"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "continue_teacher.py"
    continue_teacher = runpy.run_path(str(script))["main"]
    continue_teacher(["--out", str(out), "--stage", "base", "--seconds", "600", "--steps", "3", "--batch", "2",
                      "--warmup", "1", "--seed", "5"])
    more = load_weights(out / "stages" / "base.safetensors")
    assert (more.cfg.num_layers, more.cfg.dim) == (3, 48)
    assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), more.state_dict().values()))
    record = json.loads((out / "stages" / "log.json").read_text())
    assert [r["steps_run"] for r in record["stages"]["base"]["continued"]] == [3]
    assert "teacher" in record["stages"] and "continued" not in record["stages"]["teacher"]
    # the teacher trained further on crowded scenes only (--min-sprites): recorded, and named on the card below
    continue_teacher(["--out", str(out), "--stage", "teacher", "--seconds", "600", "--steps", "2", "--batch", "2",
                      "--warmup", "1", "--min-sprites", "3"])
    record = json.loads((out / "stages" / "log.json").read_text())
    assert [r["settings"]["min_sprites"] for r in record["stages"]["teacher"]["continued"]] == [3]
    # the teacher grown first (2x as wide and as deep, the same function), then trained: the later stages use it
    teacher = load_weights(out / "stages" / "teacher.safetensors")
    continue_teacher(["--out", str(out), "--stage", "teacher", "--seconds", "600", "--steps", "2", "--batch", "2",
                      "--warmup", "1", "--widen", "2", "--deepen", "2", "--seed", "6"])
    grown = load_weights(out / "stages" / "teacher.safetensors")
    c, g = teacher.cfg, grown.cfg
    assert (g.num_layers, g.dim, g.num_heads, g.ffn_dim) == tuple(2 * n for n in (c.num_layers, c.dim, c.num_heads,
                                                                                c.ffn_dim))
    record = json.loads((out / "stages" / "log.json").read_text())
    entry = record["stages"]["teacher"]["continued"][-1]["grown"]
    assert entry["from_size"]["dim"] == c.dim and entry["to_size"]["num_layers"] == 2 * c.num_layers
    assert 0 < entry["max_relative_difference"] < 2e-3  # float16 rounding of the split weights, no more
    assert record["teacher_config"]["dim"] == 2 * c.dim
    with pytest.raises(SystemExit):  # the student stages grow with toolkit train --widen
        continue_teacher(["--out", str(out), "--stage", "base", "--seconds", "1", "--widen", "2"])
    _train_refused(["--tiny", "--out", str(out), "--stages", "ode_init", "--guidance-interval", "0.9", "0.2"],
                   "0 <= LO <= HI")
    # the teacher guided only below σ = 0.8 (sampler steps and DMD's noise levels), kept in the record and the card
    assert main(["--tiny", "--out", str(out), "--stages", "ode_init,self_forcing", "--eval-seeds", "2",
                 "--guidance", "3", "--guidance-interval", "0", "0.8", "--quiet"]) == 0
    model, info = bundled.load_bundled(path=out)
    record = json.loads((out / "train_log.json").read_text())
    assert record["guidance"] == dict(scale=3.0, chosen_by="recipe", interval=[0.0, 0.8])
    assert all(record["stages"][s]["guidance_interval"] == [0.0, 0.8] for s in ("ode_init", "self_forcing"))
    assert (model.cfg.num_layers, model.cfg.dim) == (3, 48) and record["config"]["dim"] == 48
    card = (out / "MODEL_CARD.md").read_text()
    assert "A 3-layer Wan DiT (width 48, 2 heads × 24" in card
    assert "score and for its own samples: **3 for σ in [0, 0.8]**" in card
    assert "teacher CFG 3 for σ in [0, 0.8]" in card
    assert "| base, continued | 3 × 2 |" in card
    assert "| teacher, continued | 2 × 2 |" in card and "clips of 3+ sprites only" in card
    assert f"first grown from {c.num_layers} × {c.dim} ({c.num_heads} heads) to {g.num_layers} × {g.dim}" in card
    assert f"{g.num_layers} layers × width {g.dim}" in card  # the teacher's description follows its new size
    # two noise seeds per prompt, and (b)+(c) compared with (b) clip by clip
    assert record["eval_seeds"] == 2 and record["evaluation"]["self_forcing"]["clips"] == 2 * record["eval_prompts"]
    split = record["paired"]["self_forcing vs ode_init"]
    assert set(split) == {"colour_match", "count_match", "score"}
    ode, sf = (record["evaluation"][n]["outcomes"]["score"] for n in ("ode_init", "self_forcing"))
    assert split["score"]["gained"] == sum(a == "0" and b == "1" for a, b in zip(ode, sf))
    assert "2 rollouts each (noise seeds" in card and "Clip by clip, self forcing vs ode init: colour match +" in card
    # prompts that name start places: every student stage trains on them and the evaluation asks for them
    assert main(["--tiny", "--out", str(out), "--stages", "ode_init,self_forcing", "--placed", "1", "--guidance",
                 "2", "--force", "--quiet"]) == 0
    record = json.loads((out / "train_log.json").read_text())
    assert record["eval_placed"] is True
    assert all(record["stages"][s]["settings"]["placed"] == 1.0 for s in ("ode_init", "self_forcing"))
    assert all(record["evaluation"][n]["place_match"] is not None for n in ("ode_init", "self_forcing"))
    assert "each sprite's start place named" in (out / "MODEL_CARD.md").read_text()
    for argv, message in ((["--student-size", "6x250/4"], "not divisible"),
                          (["--student-size", "6by256"], "LAYERSxWIDTH"),
                          (["--stages", "ode_init", "--student-size", "6x256"], "add base to --stages")):
        _train_refused(["--out", str(tmp_path / "none"), "--tiny", *argv], message)
        assert not (tmp_path / "none").exists()


def test_widening_the_student_stages_keeps_their_function_and_the_next_run_trains_them_wide(tmp_path):
    from toolkit.commands.train import main

    out = tmp_path / "lineage"
    assert main(["--tiny", "--out", str(out), "--quiet"]) == 0
    assert (out / "stages" / "self_forcing_state.pt").is_file()
    narrow = load_weights(out / "stages" / "self_forcing.safetensors")
    before = _tree_digest(out)
    _train_refused(["--out", str(out), "--widen", "2"], "pass --force")  # it replaces weights
    _train_refused(["--out", str(out), "--widen", "1", "--force"], "integer >= 2")
    _train_refused(["--out", str(out), "--widen", "2", "--force", "--student-size", "6x256"], "leave out")
    _train_refused(["--out", str(tmp_path / "empty"), "--widen", "2", "--force"], "no student stage")
    assert _tree_digest(out) == before
    assert main(["--out", str(out), "--widen", "2", "--force", "--seed", "4", "--quiet"]) == 0
    record = json.loads((out / "stages" / "log.json").read_text())
    (entry,) = record["widened"]
    assert entry["stages"] == ["base", "ode_init", "self_forcing"] and entry["runs_before"] == {
        "base": 1, "ode_init": 1, "self_forcing": 1}
    for stage in entry["stages"]:
        wide = load_weights(out / "stages" / f"{stage}.safetensors")
        assert (wide.cfg.dim, wide.cfg.num_heads, wide.cfg.ffn_dim) == (2 * narrow.cfg.dim, 2 * narrow.cfg.num_heads,
                                                                         2 * narrow.cfg.ffn_dim)
    # the same function up to float16 storage of the split weights
    assert 0 < max(entry["max_relative_difference"].values()) < 2e-3
    wide = load_weights(out / "stages" / "self_forcing.safetensors")
    prompt = "2 sprites: red circle, blue square"
    with torch.no_grad():
        video, video_wide = (bundled.generate(m, prompt, seed=1) for m in (narrow, wide))
    assert (video_wide - video).abs().max() < 5e-3
    assert _tree_digest(out)["model.safetensors"] == before["model.safetensors"]  # only the stages are widened
    # the narrow stage (c)'s state went with its width: nothing to resume
    assert not (out / "stages" / "self_forcing_state.pt").exists()
    _train_refused(["--out", str(out), "--tiny", "--force", "--stages", "self_forcing", "--sf-start", "self_forcing",
                    "--sf-resume"], "left none")
    # stage (c) continues the wide student; the card says which runs trained wide copies
    assert main(["--tiny", "--out", str(out), "--stages", "self_forcing", "--sf-start", "self_forcing", "--force",
                 "--quiet"]) == 0
    model, _ = bundled.load_bundled(path=out)
    assert model.cfg.dim == 2 * narrow.cfg.dim
    card = (out / "MODEL_CARD.md").read_text()
    assert "Widened at `" in card and "--widen 2 --seed 4 --force" in card
    assert "| self_forcing, continued, 2× wide |" in card and "| self_forcing |" in card and "| base |" in card
    assert "| teacher |" in card and "teacher, 2× wide" not in card  # only the student is widened


def test_continuing_stage_b_needs_its_record_too(tmp_path):
    from toolkit.errors import ToolkitError
    from toolkit.models.bundled.recipe import check_output

    stages = tmp_path / "stages"
    stages.mkdir()
    (stages / "ode_init.safetensors").write_bytes(b"weights")
    (stages / "teacher.safetensors").write_bytes(b"weights")
    for log in ('{"stages": {"base": {}}}', "not json", None):
        if log is not None:
            (stages / "log.json").write_text(log)
        with pytest.raises(ToolkitError, match="its record in"):
            check_output(tmp_path, ["ode_init"], True, "ode_init")
        (stages / "log.json").unlink(missing_ok=True)
    (stages / "log.json").write_text('{"stages": {"ode_init": {"seconds": 1}}}')
    assert check_output(tmp_path, ["ode_init"], True, "ode_init") == tmp_path
    with pytest.raises(ToolkitError, match="starts from one of base, ode_init, self_forcing"):
        check_output(tmp_path, ["ode_init"], True, "teacher")
    # a second round from the stage-(c) student needs its weights and both records
    with pytest.raises(ToolkitError, match="needs .*self_forcing.safetensors and the records of ode_init and "
                                           "self_forcing in .*run stage self_forcing first"):
        check_output(tmp_path, ["ode_init"], True, "self_forcing")
    (stages / "self_forcing.safetensors").write_bytes(b"weights")
    with pytest.raises(ToolkitError, match="the records of ode_init and self_forcing"):
        check_output(tmp_path, ["ode_init"], True, "self_forcing")
    (stages / "log.json").write_text('{"stages": {"ode_init": {}, "self_forcing": {}}}')
    assert check_output(tmp_path, ["ode_init"], True, "self_forcing") == tmp_path
    with pytest.raises(ToolkitError, match="--ode-start self_forcing continues stage ode_init: add it"):
        check_output(tmp_path, ["self_forcing"], True, "self_forcing")



def test_as_stored_is_what_the_saved_file_loads_back(tmp_path):
    """The recipe evaluates ``as_stored`` copies so that the card's numbers are those of the shipped float16 file."""
    from toolkit.models.bundled.config import tiny_teacher_config
    from toolkit.models.bundled.model import as_stored, save_weights

    torch.manual_seed(3)
    model = WanModel(tiny_teacher_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # off the float16 grid
    stored = as_stored(model)
    back = load_weights(save_weights(model, tmp_path / "m.safetensors"))
    for name, value in back.state_dict().items():
        assert stored.state_dict()[name].dtype == torch.float32
        assert torch.equal(stored.state_dict()[name], value), name
    assert not all(torch.equal(model.state_dict()[k], v) for k, v in back.state_dict().items())
    assert not any(p.requires_grad for p in stored.parameters()) and not stored.training
    assert any(p.requires_grad for p in model.parameters())  # the original is untouched


def test_stage_weights_carry_their_config_and_a_file_without_one_is_refused(tmp_path):
    from safetensors.torch import save_file

    from toolkit.models.bundled.config import tiny_teacher_config
    from toolkit.models.bundled.model import save_weights

    torch.manual_seed(0)
    teacher = WanModel(tiny_teacher_config(prediction="x0"))
    back = load_weights(save_weights(teacher, tmp_path / "t.safetensors"))
    assert back.cfg == teacher.cfg and back.cfg.prediction == "x0"
    with pytest.raises(CheckpointError, match="prediction 'eps' is not one of flow, x0"):
        tiny_teacher_config(prediction="eps")
    assert all(torch.equal(a.half().float(), b) for a, b in zip(teacher.state_dict().values(),
                                                               back.state_dict().values()))
    save_file({k: v.half().contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(CheckpointError, match="no config"):
        load_weights(tmp_path / "bare.safetensors")

def test_int8_weights_round_trip_within_half_a_step_and_load_strictly(tmp_path):
    """``save_weights(int8=True)``: every large matrix comes back within half a quantisation step of its row's
    scale (absmax / 127), small tensors as float16; the file is smaller (about half for the real teacher); a scale
    without its int8 tensor, or an int8 tensor without its scale, is refused."""
    from safetensors.torch import load_file, save_file

    from toolkit.models.bundled.config import tiny_teacher_config
    from toolkit.models.bundled.model import INT8_MIN_NUMEL, INT8_SCALE, save_weights

    torch.manual_seed(1)
    teacher = WanModel(tiny_teacher_config())
    with torch.no_grad():
        for p in teacher.parameters():  # trained weights are not all zero or one (the init's biases, norms are)
            p.add_(torch.randn_like(p) * 0.1)
    half = save_weights(teacher, tmp_path / "f16.safetensors")
    int8 = save_weights(teacher, tmp_path / "i8.safetensors", int8=True)
    back = load_weights(int8)
    assert back.cfg == teacher.cfg
    quantised = 0
    for (name, a), b in zip(teacher.state_dict().items(), back.state_dict().values()):
        if a.dim() >= 2 and a.numel() >= INT8_MIN_NUMEL:
            quantised += 1
            rows = a.reshape(a.shape[0], -1).double()
            step = rows.abs().amax(1, keepdim=True) / 127
            err = (b.reshape(rows.shape).double() - rows).abs()
            assert (err <= 0.5 * step * 1.002 + 1e-7).all(), name  # the scale itself is rounded to float16
        else:
            assert torch.equal(a.half().float(), b), name
    assert quantised >= 4
    assert int8.stat().st_size < 0.8 * half.stat().st_size  # tiny: many float16 vectors; the teacher: 14.4 of 28.4 MB

    state = load_file(str(int8))
    name = next(k for k in state if k.endswith(INT8_SCALE))[: -len(INT8_SCALE)]
    for broken, match in (({k: v for k, v in state.items() if k != name}, "has no int8 tensor"),
                          ({k: v for k, v in state.items() if k != name + INT8_SCALE}, "non-floating")):
        save_file(broken, str(tmp_path / "bad.safetensors"), metadata={"config": json.dumps(teacher.cfg.to_dict())})
        with pytest.raises(CheckpointError, match=match):
            load_weights(tmp_path / "bad.safetensors")


def test_the_kept_teacher_loads():
    """``data/teacher`` (int8) loads strictly with the teacher architecture the recipe trains, and knows that it
    has trained on prompts that name start places (run 23)."""
    from toolkit.models.bundled.config import learned_places, reads_places, teacher_config

    model = load_weights(bundled.DEFAULT_DIR.parent / "teacher" / "teacher.safetensors")
    expected = teacher_config()
    learned_places(expected)
    assert model.cfg == expected and reads_places(model.cfg) and not reads_places(teacher_config())


def test_shipped_weights_load_strictly_and_a_full_rollout_completes():
    """The shipped weights load strictly with the config shipped beside them, on the grid of the paper's regime,
    and roll out a whole clip on the CPU."""
    model, info = bundled.load_bundled()
    assert bundled.clip_shape(model.cfg) == (bundled.FRAMES, bundled.HEIGHT, bundled.WIDTH)
    assert tuple(model.cfg.patch_size) == bundled.config.PATCH
    assert info["training"]["shipped"] in ("ode_init", "self_forcing", "self_forcing_start")
    video = bundled.generate(model, "2 sprites: red circle, blue square; pan left", seed=0)
    assert video.shape == (1, 3, bundled.FRAMES, bundled.HEIGHT, bundled.WIDTH) and torch.isfinite(video).all()


def test_shipped_model_draws_prompted_sprites_and_random_init_does_not():
    """The evaluator on CPU rollouts of the first held-out prompts, each sprite's start place named (the prompts the
    shipped student was trained on, three in four): the shipped model draws its prompted sprites, most of them in
    their cells, a randomly initialised one of the same config nothing. (The card's 128-clip numbers come from the
    GPU run; these few prompts on the CPU are the check a fresh clone can make.)"""
    from toolkit.models.bundled import evaluate
    from toolkit.models.bundled.recipe import evaluate_model

    model, info = bundled.load_bundled()
    card = info["training"]["evaluation"][info["training"]["shipped"]]
    prompts = evaluate.heldout_prompts(4, placed=True)
    shipped = evaluate_model(model, prompts)
    torch.manual_seed(0)
    random = evaluate_model(WanModel(model.cfg).eval(), prompts[:1])
    # measured on 2 CPU cores (float32) on these 4 prompts: colour match 3/4, persistence 0.94, every sprite in its
    # cell in 3/4 (card, 128 placed clips on an H100 in bf16: colours 89 %, score 84 %, persistence 96 %, in place 95 %)
    assert shipped["colour_match"] >= 0.5 and shipped["persistence"] >= 0.85 and shipped["place_match"] >= 0.5, shipped
    assert card["clips"] >= 128 and card["place_match"] >= 0.9, card
    assert card["persistence"] >= 0.9 and card["colour_match"] >= 0.85 and card["score"] >= 0.8, card
    assert random["persistence"] == 0 and random["colour_match"] == 0, random


def test_saved_weights_are_readable_as_any_other_file(tmp_path):
    """safetensors writes 0600; the weights of a shared run folder get the umask's mode like its logs."""
    import os

    from toolkit.models.bundled.model import save_weights

    umask = os.umask(0o022)
    try:
        path = save_weights(WanModel(bundled.tiny_config()), tmp_path / "w.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_stage_c_flags_reach_its_settings():
    """``toolkit train --sf-lr/--sf-critic-lr/--sf-critic-ratio`` set stage (c)'s settings, and only those."""
    import argparse

    from toolkit.commands.train import recipe_from, register
    from toolkit.models.bundled.recipe import Recipe

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--out", "x", "--sf-lr", "7e-5", "--sf-critic-lr", "3e-5",
                              "--sf-critic-ratio", "3", "--sf-min-sprites", "3"])
    recipe, default = recipe_from(args), Recipe()
    sf = recipe.self_forcing
    assert (sf.lr, sf.critic_lr, sf.critic_ratio, sf.min_sprites) == (7e-5, 3e-5, 3, 3)
    assert replace(sf, lr=default.self_forcing.lr, critic_lr=default.self_forcing.critic_lr,
                   critic_ratio=default.self_forcing.critic_ratio, min_sprites=1) == default.self_forcing
    assert default.self_forcing.min_sprites == 1
    with pytest.raises(SystemExit):  # argparse's one line, exit 2: there are at most MAX_SPRITES sprites
        parser.parse_args(["train", "--out", "x", "--sf-min-sprites", "5"])


def test_new_weights_drop_the_notes_written_about_earlier_ones(tmp_path):
    """A record carried into a later stage run (as ``train_bundled.sh PART=kept_student`` does) may hold what scripts
    wrote about the weights then in the folder: a redrawn strip (``showcase``), a table of more clips
    (``clip_comparison``). The run's new weights, record and card drop both."""
    from toolkit.commands.train import main

    out = tmp_path / "m"
    assert main(["--tiny", "--out", str(out), "--quiet"]) == 0
    log_file = out / "stages" / "log.json"
    record = json.loads(log_file.read_text())
    record["showcase"] = dict(commit="abc1234", device="elsewhere", precision="float32", teacher="t", seconds=1.0)
    record["clip_comparison"] = dict(source="x", commit="abc1234", devices=["a card"], paired_with="a", rows=[])
    log_file.write_text(json.dumps(record))
    assert main(["--tiny", "--out", str(out), "--stages", "self_forcing", "--sf-start", "self_forcing", "--seed", "2",
                 "--force", "--quiet"]) == 0
    latest = json.loads((out / "train_log.json").read_text())
    assert "showcase" not in latest and "clip_comparison" not in latest
    card = (out / "MODEL_CARD.md").read_text()
    assert "redrawn after training" not in card and "Colour match on more clips" not in card


def test_a_recipe_on_placed_prompts_does_not_warn_about_places(tmp_path):
    """Every stage trained on prompts that name start places: nothing in the run warns that a model reads places as
    noise, the randomly initialised baseline of the evaluation included (random weights read nothing; the warning
    is for trained models)."""
    from toolkit.commands.train import main

    out = str(tmp_path / "m")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["--tiny", "--out", out, "--placed", "1", "--quiet"]) == 0  # in one process
    # a base pretrained without places (as the shipped one was), every later stage with them
    assert main(["--tiny", "--out", str(tmp_path / "n"), "--stages", "base", "--quiet"]) == 0
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        assert main(["--tiny", "--out", str(tmp_path / "n"), "--stages", "teacher,ode_init,self_forcing",
                     "--placed", "1", "--force", "--quiet"]) == 0
    assert not [str(w.message) for w in caught + later if "start places" in str(w.message)]


def test_the_curves_show_the_stage_c_run_a_second_round_of_b_started_from(tmp_path):
    """A student whose (b) was continued from a stage-(c) student (the shipped one) keeps that (c) run only inside
    the continued run's record: the curves draw it in the (c) panel, and draw a later (c) run instead when there is
    one."""
    from toolkit.models.bundled.card import curve_stages, plot_curves

    def run(seconds: float, points: int, width: int = 2) -> dict:
        return dict(seconds=seconds, curve=[[10 * (i + 1), *([0.1 / (i + 1)] * width)] for i in range(points)])

    earlier_c = run(460.0, 5, width=3)  # (step, critic loss, DMD grad rms)
    record = dict(device="a card", stages=dict(
        base=run(300.0, 4), teacher=run(500.0, 4),
        ode_init={**run(200.0, 4), "continued": [run(100.0, 3), {**run(150.0, 3), "start_record": earlier_c}]}))
    assert curve_stages(record)["self_forcing"] is earlier_c and "self_forcing" not in record["stages"]
    later_c = run(300.0, 4, width=3)
    assert curve_stages({**record, "stages": {**record["stages"], "self_forcing": later_c}})["self_forcing"] is later_c
    del record["stages"]["ode_init"]["continued"][1]["start_record"]
    assert "self_forcing" not in curve_stages(record)
    plot_curves(tmp_path / "curves.png", record)  # draws with (c) not run
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_the_card_says_how_guidance_was_chosen_and_which_candidate_ships():
    """The card's guidance sentence introduces the validation table only when the record has one (a kept teacher's
    guidance comes from the recipe), and a shipped "self_forcing_start" is named in words; the "Reproduce" text lists
    the continued runs in the order they ran, with --sf-resume where they resumed."""
    from toolkit.models.bundled.card import model_card

    model, _ = bundled.load_bundled()
    record = json.loads((Path(bundled.DEFAULT_DIR) / "train_log.json").read_text())
    summary = record["evaluation"][record["shipped"]]
    chosen = copy.deepcopy(record)
    chosen["guidance"] = dict(scale=2.0, chosen_by="validation, 4 prompts",
                              validation={"2": summary, "3": summary})
    chosen["shipped"] = "self_forcing"
    card = model_card(chosen, model)
    assert "**2** (validation, 4 prompts; its 40-step samples on validation prompts" in card
    assert card.count("| CFG scale |") == 1 and "Shipped: the **self_forcing** student (the better of" in card
    record["guidance"] = dict(scale=2.0, chosen_by="recipe")
    record["shipped"] = "self_forcing_start"
    card = model_card(record, model)
    assert "**2** (recipe)." in card and "| CFG scale |" not in card
    assert "Shipped: the **stage-(c) student before its last continued run** (\"self forcing start\" below:" in card
    ode = [str(run.get("seed")) for run in record["stages"]["ode_init"]["continued"]]
    first_round = ode[:[("start_record" in run) for run in record["stages"]["ode_init"]["continued"]].index(True)]
    assert f"--ode-start ode_init --guidance 2 --force --seed S` (S = {', '.join(first_round)}), before stage (c)." \
        in card
    assert "--sf-start self_forcing --guidance 2 --sf-resume --force --seed S`" in card
    # the shipped lineage: stage (c) at CFG 2, then at CFG 3; run 24's last (c) run was not kept
    assert "The runs of (b) and (c) used the teacher's classifier-free guidance" in card
    assert "| teacher, 40 Euler steps, CFG 2 " in card and "| teacher 40 euler steps" not in card
    runs = record["stages"]["self_forcing"]["continued"]
    dropped_runs = [i for i, run in enumerate(runs) if run.get("kept") is False]
    assert dropped_runs and dropped_runs[-1] < len(runs) - 1
    assert card.count("not kept: the runs below start from the student before it") == len(dropped_runs)
    # "Reproduce": each command with its run's guidance (they differ), and the run not kept named
    record = json.loads((Path(bundled.DEFAULT_DIR) / "train_log.json").read_text())
    assert record["shipped"] == "self_forcing"
    reproduce = model_card(record, model).split("## Reproduce")[1]
    assert "--guidance 2 --sf-resume --force --seed S` (S = 24, 24; the second not kept: later runs start" in reproduce
    assert "--guidance 3 --sf-resume --force --seed S` (S = 26)." in reproduce
    crowded_record = copy.deepcopy(record)
    crowded_record["stages"]["self_forcing"]["continued"][-1]["settings"]["min_sprites"] = 3
    crowded_record["shipped"] = "self_forcing_start"
    reproduce = model_card(crowded_record, model).split("## Reproduce")[1]
    assert "--guidance 3 --sf-resume --sf-min-sprites 3 --force --seed S` (S = 26; not shipped: the student before " \
           "it is)." in reproduce
    for stage in ("ode_init", "self_forcing"):  # one guidance throughout: the one sentence for every use
        for run in [record["stages"][stage], *record["stages"][stage]["continued"]]:
            run["guidance_scale"] = 3.0
            run.get("start_record", {})["guidance_scale"] = 3.0
    assert "The teacher's classifier-free guidance (null prompt = all-zero context), used for its ODE pairs, as " \
           "DMD's real\nscore and for its own samples: **3** (recipe)." in model_card(record, model)


def test_a_stage_c_run_not_kept_is_marked_until_a_resumed_run_carries_it_on(tmp_path, monkeypatch):
    """When the evaluation ships the student from before a continued stage-(c) run, the record marks that run
    ``kept: false``: a later fresh run starts from the shipped student, not from it (the stage file keeps it, with
    the state that resumes it), and a resumed run continues it, which takes the mark off again."""
    import shutil

    from safetensors.torch import load_file

    from toolkit.commands.train import main
    from toolkit.models.bundled import recipe

    out = tmp_path / "m"
    assert main(["--tiny", "--out", str(out), "--quiet"]) == 0
    real_evaluate, real_train = recipe.evaluate_model, recipe.train_self_forcing
    evaluated, started = [], []

    def rigged(*args, **kw):  # models in order: random init, the start, the new student, the teacher
        evaluated.append(1)
        result = real_evaluate(*args, **kw)
        return {**result, "colour_match": 0.0, "score": 0.0} if len(evaluated) == 3 else result

    def spy(student, *args, **kw):  # the weights each stage-(c) run starts from
        started.append([p.detach().clone() for p in student.parameters()])
        return real_train(student, *args, **kw)

    def stage_c(folder, *flags) -> int:
        return main(["--tiny", "--out", str(folder), "--stages", "self_forcing", "--sf-start", "self_forcing",
                     "--force", "--quiet", *flags])

    def runs(folder) -> list[dict]:
        return json.loads((folder / "train_log.json").read_text())["stages"]["self_forcing"]["continued"]

    monkeypatch.setattr(recipe, "evaluate_model", rigged)
    monkeypatch.setattr(recipe, "train_self_forcing", spy)
    assert stage_c(out, "--seed", "1") == 0
    assert json.loads((out / "train_log.json").read_text())["shipped"] == "self_forcing_start"
    assert runs(out)[-1]["kept"] is False
    stage, shipped = load_file(out / "stages" / "self_forcing.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(stage[k], shipped[k]) for k in stage)  # the stage file keeps the dropped student
    shipped_model = bundled.load_bundled(path=out)[0]
    fresh = tmp_path / "fresh"
    shutil.copytree(out, fresh)
    monkeypatch.setattr(recipe, "evaluate_model", real_evaluate)
    assert stage_c(fresh, "--seed", "3") == 0  # a fresh run: from the shipped student
    assert all(torch.equal(a.cpu(), b) for a, b in zip(started[-1], shipped_model.parameters()))
    assert stage_c(out, "--sf-resume") == 0  # a resumed one: the dropped run carried on, no longer marked
    assert runs(out)[0].get("kept") is None and runs(out)[1]["resumed"]
    last_shipped = json.loads((out / "train_log.json").read_text())["shipped"]
    assert runs(out)[1].get("kept") is (False if last_shipped == "self_forcing_start" else None)
