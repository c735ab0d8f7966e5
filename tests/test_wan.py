"""The Wan DiT: RoPE, schedule, per-frame modulation and the KV cache pinned against independent references."""

import math

import pytest
import torch

from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps, shift_sigma
from toolkit.models.seam import seams
from toolkit.models.wan import WanConfig, WanModel, apply_rope, rope_angles, rope_frequencies


def tiny_config(**kw) -> WanConfig:
    base = dict(
        dim=48, ffn_dim=80, num_heads=2, num_layers=3, in_dim=4, out_dim=4, patch_size=(1, 2, 2),
        text_dim=12, text_len=7, freq_dim=16,
    )  # fmt: skip
    base.update(kw)
    return WanConfig(**base)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (fresh init leaves modulation tiny and some biases zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 / math.sqrt(max(p.shape[-1], 1))))


def test_rope_dims_of_released_model():
    assert WanConfig().rope_dims == (44, 42, 42)
    assert WanConfig().head_dim == 128


def test_rope_against_float64_complex_reference():
    cfg = tiny_config(dim=2 * 26, num_heads=2)  # head dim 26: time 10, height 8, width 8 real channels
    assert cfg.rope_dims == (10, 8, 8)
    frames, height, width, start = 3, 5, 7, 4
    x = torch.randn(2, frames * height * width, 2, 26, dtype=torch.float64)
    angles = rope_angles(rope_frequencies(cfg), torch.arange(start, start + frames), height, width, cfg.rope_dims)
    got = apply_rope(x, torch.cos(angles), torch.sin(angles))

    # Independent reference: complex multiply, token by token, with the frequencies written out per axis.
    ref = torch.empty_like(x)
    xc = torch.view_as_complex(x.reshape(2, -1, 2, 13, 2).contiguous())
    for n in range(frames * height * width):
        f, rem = divmod(n, height * width)
        y, xx = divmod(rem, width)
        pos = [start + f] * 5 + [y] * 4 + [xx] * 4
        widths = [10] * 5 + [8] * 4 + [8] * 4
        slot_in_axis = list(range(5)) + list(range(4)) + list(range(4))
        theta = torch.tensor(
            [p * 10000.0 ** (-2.0 * j / wdt) for p, j, wdt in zip(pos, slot_in_axis, widths)], dtype=torch.float64
        )
        rot = xc[:, n] * torch.polar(torch.ones_like(theta), theta)
        ref[:, n] = torch.view_as_real(rot).reshape(2, 2, 26)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_self_forcing_timesteps_derived_from_shift_warp():
    t = self_forcing_timesteps()
    expected = [1000 * float(shift_sigma(torch.tensor(s, dtype=torch.float64), 5.0)) for s in (1.0, 0.75, 0.5, 0.25)]
    torch.testing.assert_close(t, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(t, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0], dtype=torch.float64))


def test_native_parameter_names_and_count_of_released_layout():
    cfg = WanConfig()
    with torch.device("meta"):
        model = WanModel(cfg)
    sd = model.state_dict()
    assert len(sd) == 825
    assert sum(v.numel() for v in sd.values()) == 1_418_996_800
    assert sd["blocks.0.self_attn.q.weight"].shape == (1536, 1536)
    assert sd["blocks.29.modulation"].shape == (1, 6, 1536)
    assert sd["head.modulation"].shape == (1, 2, 1536)
    assert sd["patch_embedding.weight"].shape == (1536, 16, 1, 2, 2)
    assert "blocks.0.norm1.weight" not in sd and "blocks.0.norm3.weight" in sd


@pytest.mark.parametrize("frames_per_chunk", [3, 2])
def test_kv_cache_loop_equals_block_causal_full_forward(frames_per_chunk):
    """Chunked forwards with the KV cache (each chunk written, then re-written by a pass on the same input, as
    the clean pass does) give the same per-chunk outputs as one forward over all frames with a block-causal
    mask. Pins the cache, RoPE frame offsets and per-frame modulation together."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = WanModel(cfg).double().eval()
    randomise(model, 1)
    frames, hl, wl = 3 * frames_per_chunk, 6, 10  # token grid frames x 3 x 5
    x = torch.randn(1, cfg.in_dim, frames, hl, wl, dtype=torch.float64)
    t = torch.rand(1, frames, dtype=torch.float64) * 1000
    ctx = torch.randn(1, 5, cfg.text_dim, dtype=torch.float64)

    from toolkit.models.wan import KVCache

    tokens_per_frame = (hl // 2) * (wl // 2)
    cache = KVCache(cfg, 1, frames * tokens_per_frame, "cpu", torch.float64)
    chunked = []
    for c in range(3):
        sl = slice(c * frames_per_chunk, (c + 1) * frames_per_chunk)
        kw = dict(kv_cache=cache, start_frame=sl.start, chunk=c, clip_frames=frames)
        chunked.append(model(x[:, :, sl], t[:, sl], ctx, **kw))
        model(x[:, :, sl], t[:, sl], ctx, is_clean=True, **kw)  # rewrite slots, like the clean pass
    chunked = torch.cat(chunked, dim=2)

    frame_of_token = torch.arange(frames).repeat_interleave(tokens_per_frame)
    chunk_of_token = frame_of_token // frames_per_chunk
    mask = chunk_of_token[None, :] <= chunk_of_token[:, None]  # key chunk <= query chunk
    full = model(x, t, ctx, attn_mask=mask)
    torch.testing.assert_close(chunked, full, rtol=1e-10, atol=1e-10)

    # And the mask matters: without it, later frames leak into earlier chunks.
    unmasked = model(x, t, ctx)
    assert (unmasked[:, :, :frames_per_chunk] - full[:, :, :frames_per_chunk]).abs().max() > 1e-6


def test_per_frame_timesteps_modulate_each_frame_separately():
    cfg = tiny_config()
    model = WanModel(cfg).double().eval()
    randomise(model, 2)
    x = torch.randn(1, cfg.in_dim, 2, 4, 6, dtype=torch.float64)
    ctx = torch.randn(1, 3, cfg.text_dim, dtype=torch.float64)
    mask = torch.eye(2).repeat_interleave(6, 0).repeat_interleave(6, 1).bool()  # frames attend only to themselves
    a = model(x, torch.tensor([[100.0, 900.0]], dtype=torch.float64), ctx, attn_mask=mask)
    b = model(x, torch.tensor([[100.0, 200.0]], dtype=torch.float64), ctx, attn_mask=mask)
    torch.testing.assert_close(a[:, :, 0], b[:, :, 0])  # frame 0 unaffected by frame 1's timestep
    assert (a[:, :, 1] - b[:, :, 1]).abs().max() > 1e-6


def test_rollout_calls_seams_with_the_self_forcing_schedule():
    cfg = tiny_config()
    model = WanModel(cfg).eval()
    randomise(model, 3)
    calls = []
    for seam in seams(model):
        seam.hooks.append(lambda q, k, v, out, ctx: calls.append((ctx.layer, ctx.chunk, ctx.step, ctx.is_clean,
                                                                  ctx.timestep, q.shape[1], k.shape[1])))
    noise = torch.randn(1, cfg.in_dim, 6, 6, 10)
    ctx = torch.randn(1, 5, cfg.text_dim)
    out = self_forcing_rollout(model, noise, ctx, generator=torch.Generator().manual_seed(0))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert len(calls) == 2 * 5 * cfg.num_layers  # 2 chunks x (4 steps + clean pass) x layers
    expected_t = [1000.0, 937.5, 2500 / 3, 625.0, 0.0]
    for _layer, chunk, step, is_clean, timestep, nq, nk in calls:
        assert is_clean == (step == 4)
        assert timestep == pytest.approx(expected_t[step])
        assert nq == 3 * 15 and nk == (chunk + 1) * 3 * 15
    # Same seed, same video; other seed, other video.
    again = self_forcing_rollout(model, noise, ctx, generator=torch.Generator().manual_seed(0))
    other = self_forcing_rollout(model, noise, ctx, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, again)
    assert (out - other).abs().max() > 1e-4
