"""Issue 17, item 4: long videos with Self-Forcing's rolling KV cache (``local_attn_size`` frames, ``sink_size``
first frames kept). The cache is pinned against two independent references: the official code's cache bookkeeping
(write pointers, eviction by shifting left, attention over the last ``local_attn_size`` frames of the buffer),
re-implemented here on tensors, and a float64 full forward with a mask, no cache at all. A capture of a rolled run
recomputes exactly the attention the model computed."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import dense_attention, tiny_wan

from toolkit.capture import Selection, capture, open_capture
from toolkit.cli import main
from toolkit.errors import ToolkitError
from toolkit.models.layout import RunLayout, attended_frames
from toolkit.models.sampling import SelfForcingSampler, flow_to_x0, self_forcing_rollout
from toolkit.models.seam import seams, use_backend

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMESTEPS = (1000.0, 937.5, 2500 / 3, 625.0)


class OfficialStyleCache:
    """The official ``CausalWanSelfAttention`` cache path as its index arithmetic defines it, for one layer: a buffer
    of ``window`` frames, ``global_end`` (clip token after the last write) and ``local_end`` (buffer slot after it).
    A write that starts past ``global_end`` and does not fit evicts the oldest non-sink tokens by moving the rest
    left; attention reads the buffer's last ``window`` frames up to ``local_end``. Independent of ``KVCache``."""

    def __init__(self, window: int, sink: int, tpf: int, like: torch.Tensor) -> None:
        self.size, self.sink, self.limit = window * tpf, sink * tpf, window * tpf
        self.k = like.new_zeros(like.shape[0], self.size, *like.shape[2:])
        self.v = torch.zeros_like(self.k)
        self.global_end = self.local_end = 0

    def write_and_read(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[1]
        end = start + n
        if end > self.global_end and self.local_end + n > self.size:
            evicted = self.local_end + n - self.size
            kept = self.local_end - evicted - self.sink
            for buf in (self.k, self.v):
                buf[:, self.sink:self.sink + kept] = buf[:, self.sink + evicted:self.sink + evicted + kept].clone()
            local_end = self.local_end + end - self.global_end - evicted
        else:
            local_end = self.local_end + end - self.global_end
        self.k[:, local_end - n:local_end], self.v[:, local_end - n:local_end] = k, v
        self.global_end, self.local_end = end, local_end
        lo = max(0, local_end - self.limit)
        return self.k[:, lo:local_end], self.v[:, lo:local_end]


@pytest.mark.parametrize("window, sink, per_chunk, chunks", [(5, 1, 2, 7), (7, 0, 3, 5), (6, 2, 3, 4), (4, 3, 1, 9),
                                                             (9, 2, 2, 3)])
def test_layout_spans_are_the_keys_the_official_cache_bookkeeping_attends(window, sink, per_chunk, chunks):
    """Feed token ids through the official bookkeeping (as each chunk's denoising steps and clean pass do: the same
    slot written again) and read which clip tokens each call attends."""
    tpf = 3
    frames = chunks * per_chunk
    layout = RunLayout((frames, 1, tpf), 1, 1, 2, TIMESTEPS + (0.0,), per_chunk, 4, local_attn_size=window,
                       sink_size=sink)
    cache = OfficialStyleCache(window, sink, tpf, torch.zeros(1, 1, 1))
    for c in range(chunks):
        t0, t1 = layout.chunk_tokens(c)
        ids = torch.arange(t0, t1, dtype=torch.float64).view(1, -1, 1)
        for _ in range(len(TIMESTEPS) + 1):
            seen, _ = cache.write_and_read(t0, ids, ids)
            expected = [t for a, b in layout.key_frame_spans(c) for t in range(a * tpf, b * tpf)]
            assert seen.flatten().long().tolist() == expected, (c, layout.key_frame_spans(c))
    assert layout.max_key_frames() == min(window, frames) and layout.rolling == (frames > window)
    assert attended_frames(6, 9, -1, 0) == ((0, 9),)


def _official_backend(window: int, sink: int, caches: dict):
    """A seam backend that ignores the keys the toolkit's cache hands over except the chunk's own (the last
    query-count tokens) and attends, in float64, over its own official-style cache of each layer."""

    def backend(q, k, v, ctx):
        n = q.shape[1]
        cache = caches.setdefault(ctx.layer, OfficialStyleCache(window, sink, ctx.tokens_per_frame, k.double()))
        ks, vs = cache.write_and_read(ctx.query_offset, k[:, -n:].double(), v[:, -n:].double())
        ref = dense_attention(q.double().transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), ctx.scale)
        return ref.out.transpose(1, 2).to(q.dtype)

    return backend


def test_float32_rolling_rollout_equals_the_official_cache_path_in_float64():
    """The sampler in float32 with ``local_attn_size`` 5 and ``sink_size`` 1 over 6 chunks of 2 frames gives the
    latents of the same model whose attention reads the official-style cache, computed in float64: equal within
    float32 rounding. The window matters (global attention gives other latents)."""
    model = tiny_wan(seed=3, sharpen=4.0)
    noise = torch.randn(1, model.cfg.in_dim, 12, 6, 10, generator=torch.Generator().manual_seed(4))
    context = torch.randn(1, 5, model.cfg.text_dim, generator=torch.Generator().manual_seed(5))

    def roll(window: int, sink: int) -> torch.Tensor:
        return self_forcing_rollout(model, noise, context, frames_per_chunk=2, timesteps=TIMESTEPS,
                                    local_attn_size=window, sink_size=sink,
                                    generator=torch.Generator().manual_seed(6))

    with torch.no_grad():
        ours = roll(5, 1)
        with use_backend(model, _official_backend(5, 1, {})):
            official = roll(5, 1)
        glob = roll(-1, 0)
    torch.testing.assert_close(ours, official, rtol=1e-4, atol=1e-5)
    assert (ours[:, :, -2:] - glob[:, :, -2:]).abs().max() > 1e-3
    torch.testing.assert_close(ours[:, :, :4], glob[:, :, :4])  # the first chunks fit in the window: no roll yet


def _official_frames(frames: int, per_chunk: int, window: int, sink: int) -> torch.Tensor:
    """``allowed[query frame, key frame]`` as the official bookkeeping attends (frame ids through the cache)."""
    cache = OfficialStyleCache(window if window != -1 else frames, sink, 1, torch.zeros(1, 1, 1))
    allowed = torch.zeros(frames, frames, dtype=torch.bool)
    for f0 in range(0, frames, per_chunk):
        ids = torch.arange(f0, f0 + per_chunk, dtype=torch.float64).view(1, -1, 1)
        seen, _ = cache.write_and_read(f0, ids, ids)
        allowed[f0:f0 + per_chunk, seen.flatten().long()] = True
    return allowed


def _masked_reference(model, noise, context, per_chunk, window, sink, generator) -> torch.Tensor:
    """The Self-Forcing loop without any cache: every forward runs the whole clip so far (earlier chunks as their
    clean x0 at t = 0, the chunk at its step's input and timestep) under a mask where each chunk attends to the
    frames the official bookkeeping gives it, RoPE at absolute frame positions."""
    f_total, tpf = noise.shape[2], (noise.shape[3] // 2) * (noise.shape[4] // 2)
    allowed = _official_frames(f_total, per_chunk, window, sink)
    outputs: list[torch.Tensor] = []
    for c in range(f_total // per_chunk):
        end = (c + 1) * per_chunk
        frame_of_token = torch.arange(end).repeat_interleave(tpf)
        mask = allowed[frame_of_token][:, frame_of_token]
        x = noise[:, :, c * per_chunk:end]
        for s, t in enumerate(TIMESTEPS):
            clip = torch.cat([*outputs, x], dim=2)
            ts = torch.tensor([[0.0] * (c * per_chunk) + [t] * per_chunk])  # float32, as the sampler passes them
            flow = model(clip, ts, context, attn_mask=mask)[:, :, c * per_chunk:]
            x0 = flow_to_x0(x, flow, t)
            if s < len(TIMESTEPS) - 1:
                eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
                x = (1 - TIMESTEPS[s + 1] / 1000) * x0 + TIMESTEPS[s + 1] / 1000 * eps
        outputs.append(x0)
    return torch.cat(outputs, dim=2)


@pytest.mark.parametrize("window, sink", [(5, 1), (4, 0)])
def test_rolling_rollout_equals_float64_masked_full_forward(window, sink):
    """float64: the rollout through a cache of ``window`` frames (memory bounded: a write past its capacity
    raises) equals the loop recomputed from scratch under the mask, chunk by chunk, to 1e-10."""
    model = tiny_wan(seed=7, sharpen=4.0, dtype=torch.float64)
    noise = torch.randn(1, model.cfg.in_dim, 12, 6, 10, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    context = torch.randn(1, 5, model.cfg.text_dim, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        got = self_forcing_rollout(model, noise, context, frames_per_chunk=2, timesteps=TIMESTEPS,
                                   local_attn_size=window, sink_size=sink, generator=torch.Generator().manual_seed(1))
        ref = _masked_reference(model, noise, context, 2, window, sink, torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_capture_of_a_rolled_run_recomputes_the_attention_the_model_computed(tmp_path):
    """A capture (every chunk and step of a layer, maps too) of a run whose cache rolls, with a sink: each record's
    key tokens are the sink and window the model attended, its rows equal float64 attention on the q and k the seam
    received, the stored maps equal them and are 0 off the attended keys, and ``attended``/``verify``/``pooled``
    agree."""
    model = tiny_wan(seed=11, sharpen=4.0)
    sampler = SelfForcingSampler(frames_per_chunk=2, local_attn_size=5, sink_size=1)
    noise = torch.randn(1, model.cfg.in_dim, 10, 6, 10, generator=torch.Generator().manual_seed(12))
    context = torch.randn(1, 5, model.cfg.text_dim, generator=torch.Generator().manual_seed(13))
    layout = sampler.layout(model.cfg, model.grid_size(noise))
    assert layout.rolling and layout.key_frame_spans(4) == ((0, 1), (6, 10))
    seen = {}

    def hook(q, k, v, out, ctx):
        if ctx.layer == 2:
            seen[ctx.step, ctx.chunk, ctx.layer] = (q[0].clone(), k[0].clone(), ctx)

    for seam in seams(model):
        seam.hooks.append(hook)
    path = tmp_path / "rolled.h5"
    with capture(model, Selection(layers="2", store=("q", "k", "v", "lse", "maps")), path, layout=layout,
                 progress=False):
        sampler.sample(model, noise, context, generator=torch.Generator().manual_seed(14))
    tpf = layout.tokens_per_frame
    with open_capture(path) as cap:
        assert cap.complete and len(cap.records) == len(seen) == 5 * 5
        assert cap.verify(records=0, rows=0).startswith("verify: ok")
        maps = cap.file["maps"]
        for key in cap.records:
            rec = cap.record(*key)
            q, k, ctx = seen[tuple(key)]
            spans = layout.key_frame_spans(rec.chunk)
            assert rec.key_tokens.tolist() == [t for a, b in spans for t in range(a * tpf, b * tpf)]
            assert ctx.sink_frames == rec.sink_frames and tuple(ctx.key_frames) == rec.key_frames
            ref = dense_attention(q.double().transpose(0, 1), k.double().transpose(0, 1), scale=ctx.scale).probs
            for head in range(layout.num_heads):
                rows = cap.rows(rec, head)
                assert np.array_equal(rows.key.values, rec.key_tokens.numpy())
                np.testing.assert_allclose(rows.values, ref[head].numpy(), rtol=1e-4, atol=1e-6)
                stored = maps[rec._s, rec._l, cap.head_index[head], rec._qa:rec._qb]
                np.testing.assert_allclose(stored[:, rec.key_tokens.numpy()], rows.values, rtol=1e-5, atol=1e-7)
                off = np.ones(layout.num_tokens, dtype=bool)
                off[rec.key_tokens.numpy()] = False
                assert not stored[:, off].any()
        rec = cap.record(4, 4, 2)  # clean pass of the last chunk: sink frame 0 and frames 6..9
        att = cap.attended(rec)
        assert np.array_equal(att.key.values, rec.key_tokens.numpy()) and att.attrs["sink_frames"] == 1
        np.testing.assert_array_equal(att.k.values, rec.k().numpy())
        mass = cap.pooled(rec).frame_mass.values  # head, query frame, key frame
        np.testing.assert_allclose(mass.sum(-1), 1.0, rtol=1e-5)
        assert not mass[:, :, 1:6].any() and mass[:, :, 0].min() > 0
        p = cap.rows(rec, 1).values.reshape(2, tpf, -1, tpf).sum(-1).mean(1)  # query frame, attended key frame
        np.testing.assert_allclose(mass[1][:, [0, 6, 7, 8, 9]], p, rtol=1e-5, atol=1e-7)
        assert "rolling KV cache of 5 frames, sink 1" in cap.summary()
    with h5py.File(path, "r+") as f:  # key sets with a sink: format 2 (earlier readers would miss the sink)
        assert f.attrs["format_version"] == 2
        # a window the layout cannot have is refused in one line
        f.attrs["layout"] = json.dumps({**json.loads(f.attrs["layout"]), "sink_size": 4})
    with pytest.raises(ToolkitError, match="damaged capture file: attribute 'layout': local attention size 5"):
        open_capture(path)


def test_pooled_capture_of_a_sink_run_is_refused_before_anything_is_written(tmp_path):
    model = tiny_wan(seed=0)
    layout = SelfForcingSampler(frames_per_chunk=2, local_attn_size=4, sink_size=1).layout(model.cfg, (10, 3, 5))
    with pytest.raises(ToolkitError, match="attention sink"):
        with capture(model, Selection(store=("q", "k", "lse", "pooled")), tmp_path / "x.h5", layout=layout,
                     progress=False):
            pass
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("argv, message", [
    (["--frames", "7"], "multiple of 3 latent frames"),
    (["--sink-size", "2"], "needs a local attention window"),
    (["--frames", "18", "--local-attn-size", "5", "--sink-size", "3"], "cannot hold 3 sink frames and a chunk"),
    (["--model", "wan2.1-t2v-1.3b", "--local-attn-size", "6"], "bidirectional"),
    (["--local-attn-size", "6", "--sink-size", "1", "--attention", "monarch"], "--sink-size needs --attention dense"),
    (["--frames", str(3 * 400), "--local-attn-size", "6"], "RoPE positions for 1024 frames"),
])
def test_impossible_long_video_flags_are_one_line_refusals(argv, message, capsys, tmp_path):
    for command in (["generate", "--out", str(tmp_path / "g")], ["capture", "--out", str(tmp_path / "c.h5")]):
        try:
            code = main(command + argv)
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (command, err)
    assert not any(tmp_path.iterdir())


def test_capture_plan_of_a_long_video_has_the_window_layout(capsys, tmp_path):
    """``--dry-run`` plans the longer clip (no weights): 8 chunks instead of 4, records by the same selection."""
    assert main(["capture", "--dry-run", "--frames", "24", "--local-attn-size", "9", "--sink-size", "3",
                 "--layers", "0", "--heads", "0", "--steps", "clean", "--out", str(tmp_path / "c.h5")]) == 0
    out = capsys.readouterr().out
    assert "8 records (1 steps × 8 chunks × 1 layers), each 1 heads" in out, out
    from toolkit.pipeline import spec_layout

    layout = spec_layout("bundled", frames=24, local_attn_size=9, sink_size=3)
    assert layout.grid[0] == 24 and layout.key_frame_spans(7) == ((0, 3), (18, 24))
    assert RunLayout.from_attrs(layout.to_attrs()) == layout
    # only the K/V a windowed record attends are planned: the sink's chunk and the window's, not every earlier one
    from toolkit.capture.selection import resolve

    plan = resolve(Selection(layers="0", heads="0", steps="0", chunks="7"), layout)
    clean = layout.clean_step
    assert plan.kv_cells == {(0, 7), (clean, 0), (clean, 6)}  # frames 0-2 (sink) and 18-20; 21-23 is chunk 7
    assert plan.map_bytes() == plan.layout.tokens_per_frame * 3 * (3 + 6) * plan.layout.tokens_per_frame * 4
