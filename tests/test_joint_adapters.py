"""Capture from diffusers' video transformers through SDPAAdapter.for_diffusers: the joint text+video attention
models (CogVideoX, HunyuanVideo, Mochi) and LTX-Video / SkyReels-V2, each at a tiny random config with awkward grid
sizes. The reference is what the model itself handed to ``F.scaled_dot_product_attention`` (a spy installed under
the adapter), recomputed in float64 with every key it attended, text and padding mask included."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from toolkit.capture import Selection, capture, open_capture
from toolkit.capture.adapters import SDPAAdapter
from toolkit.errors import ToolkitError

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (the [dev] extra installs it)")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

STORE = ("q", "k", "v", "lse", "text_mass")


class Spy:
    """Records the joint self-attention calls the model makes (queries and keys the same sequence of at least
    ``min_tokens``), as the adapter's "original" SDPA."""

    def __init__(self, min_tokens: int) -> None:
        self.min_tokens, self.calls, self.original = min_tokens, [], F.scaled_dot_product_attention

    def __call__(self, q, k, v, attn_mask=None, **kw):
        if q.shape[-2] == k.shape[-2] >= self.min_tokens:
            self.calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone(),
                               None if attn_mask is None else attn_mask.clone()))
        return self.original(q, k, v, attn_mask=attn_mask, **kw)


def run_and_check(tmp_path, model, adapter: SDPAAdapter, forward, timesteps, *, text: str, n_text: int,
                  calls_per_layer: int = 1) -> None:
    """Capture ``forward(t)`` for each timestep (twice per step, as classifier-free guidance calls it: the first
    call is the one recorded) and check every record against the spied calls in float64: the adapter's
    ``batch_index`` sample of each call, or its ``batch_index``-th call when the model calls once per sample."""
    n = adapter.num_tokens
    spy = Spy(n)
    layers = len(adapter.seams)
    out = tmp_path / "joint.h5"
    with torch.no_grad():
        plain = [forward(t) for t in timesteps]
        F.scaled_dot_product_attention = spy
        try:
            with adapter, capture(adapter, Selection(store=STORE), out, layout=adapter.layout(timesteps),
                                  progress=False):
                captured = [(forward(t), forward(t))[0] for t in timesteps]
        finally:
            F.scaled_dot_product_attention = spy.original
    for a, b in zip(plain, captured):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # outputs unchanged
    per_step = 2 * layers * calls_per_layer
    assert len(spy.calls) == len(timesteps) * per_step
    video = slice(n_text, n_text + n) if text == "first" else slice(0, n)
    with open_capture(out) as cap:
        assert cap.complete and cap.grid == adapter.grid
        assert cap.attrs["model_class"] == f"diffusers.{type(model).__name__}"
        assert cap.attrs["model_config"]["num_layers"] == model.config.num_layers
        assert cap.attrs["diffusers_version"] == diffusers.__version__
        for step in range(len(timesteps)):
            for layer in range(layers):
                b = adapter.batch_index
                q, k, v, mask = spy.calls[step * per_step + layer * calls_per_layer + (b if adapter.per_sample else 0)]
                sample = 0 if adapter.per_sample else b
                q, k, v = q[sample], k[sample], v[sample]  # h s d
                mask = None if mask is None else mask[sample if mask.shape[0] > 1 else 0]
                rec = cap.record(step=step, chunk=0, layer=layer)
                assert rec.timestep == timesteps[step]
                assert torch.equal(rec.q(), q[:, video]) and torch.equal(rec.k(), k[:, video])
                assert torch.equal(rec.v(), v[:, video])
                allowed = None if mask is None else mask.expand(q.shape[0], q.shape[1], k.shape[1])
                ref = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
                if allowed is not None:
                    ref = ref.masked_fill(~allowed, -math.inf)
                probs = torch.softmax(ref, dim=-1)[:, video]  # video queries over every attended key
                torch.testing.assert_close(rec.lse().double(), torch.logsumexp(ref, -1)[:, video],
                                           rtol=1e-5, atol=1e-5)
                text_mass = 1 - probs[:, :, video].sum(-1)
                torch.testing.assert_close(rec.text_mass().double(), text_mass, rtol=1e-4, atol=1e-5)
                for head in range(q.shape[0]):
                    rows = torch.from_numpy(cap.rows(rec, head).values).double()
                    torch.testing.assert_close(rows, probs[head][:, video], rtol=1e-4, atol=1e-6)
        assert "verify: ok" in cap.verify(0, 0)


def test_cogvideox_text_first_with_rotary_embedding_conditional_sample(tmp_path):
    torch.manual_seed(0)
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=8, num_layers=2, sample_frames=9, sample_height=6, sample_width=10, patch_size=2,
        max_text_seq_length=7, use_rotary_positional_embeddings=True).eval()
    latents, text = torch.randn(2, 3, 4, 6, 10), torch.randn(2, 7, 8) * 4  # b F c H W -> grid 3 x 3 x 5
    angles = torch.randn(45, 8)
    rope = (angles.cos(), angles.sin())  # as the pipeline passes it: per video token and channel
    adapter = SDPAAdapter.for_diffusers(model, latents.shape, batch_index=1)  # [unconditional, conditional]
    assert adapter.grid == (3, 3, 5) and adapter.text == "first"
    run_and_check(tmp_path, model, adapter, lambda t: model(latents, text, torch.tensor([t, t]),
                                                               image_rotary_emb=rope, return_dict=False)[0],
                  [900.0, 400.0], text="first", n_text=7)


def test_hunyuan_video_text_last_with_padding_mask(tmp_path):
    torch.manual_seed(1)
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=8,
        pooled_projection_dim=8, rope_axes_dim=(4, 4, 4), guidance_embeds=False).eval()
    latents, text = torch.randn(2, 4, 3, 6, 10), torch.randn(2, 5, 8) * 4  # b c F H W -> grid 3 x 3 x 5
    text_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # sample 0: two padded text tokens
    pooled = torch.randn(2, 8)
    adapter = SDPAAdapter.for_diffusers(model, latents.shape)
    assert adapter.grid == (3, 3, 5) and len(adapter.seams) == 3 and adapter.text == "last"
    run_and_check(tmp_path, model, adapter, lambda t: model(latents, torch.tensor([t, t]), text, text_mask, pooled,
                                                               return_dict=False)[0],
                  [1000.0, 250.0], text="last", n_text=5)


def test_mochi_per_sample_calls_over_valid_text_second_sample(tmp_path):
    torch.manual_seed(2)
    model = diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=8, time_embed_dim=8, max_sequence_length=6).eval()
    latents, text = torch.randn(2, 4, 3, 6, 10), torch.randn(2, 6, 8) * 4
    text_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])  # valid text tokens: 4 and 5
    adapter = SDPAAdapter.for_diffusers(model, latents.shape, batch_index=1)  # the conditional one under guidance
    assert adapter.grid == (3, 3, 5) and adapter.text == "last" and adapter.per_sample
    run_and_check(tmp_path, model, adapter, lambda t: model(latents, text, torch.tensor([t, t]), text_mask,
                                                               return_dict=False)[0],
                  [950.0, 300.0], text="last", n_text=5, calls_per_layer=2)


def test_ltx_video_and_skyreels_attend_video_only(tmp_path):
    torch.manual_seed(3)
    ltx = diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, caption_channels=8).eval()
    tokens, text, text_mask = torch.randn(1, 3 * 3 * 5, 4), torch.randn(1, 4, 8), torch.ones(1, 4)
    adapter = SDPAAdapter.for_diffusers(ltx, (1, 4, 3, 3, 5))
    assert adapter.grid == (3, 3, 5) and adapter.text is None
    (tmp_path / "ltx").mkdir()
    run_and_check(tmp_path / "ltx", ltx, adapter,
                  lambda t: ltx(tokens, text, torch.tensor([t]), text_mask, num_frames=3, height=3, width=5,
                                return_dict=False)[0], [800.0, 100.0], text="first", n_text=0)
    sky = diffusers.SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=8, freq_dim=8, ffn_dim=16, num_layers=2, rope_max_seq_len=32).eval()
    latents = torch.randn(1, 4, 3, 6, 10)
    adapter = SDPAAdapter.for_diffusers(sky, latents.shape)
    assert adapter.grid == (3, 3, 5)
    (tmp_path / "sky").mkdir()
    run_and_check(tmp_path / "sky", sky, adapter,
                  lambda t: sky(latents, torch.tensor([t]), text, return_dict=False)[0], [700.0, 50.0],
                  text="first", n_text=0)


def test_unsupported_class_and_empty_grid_are_one_line_errors():
    with pytest.raises(ToolkitError, match="not a supported diffusers video transformer"):
        SDPAAdapter.for_diffusers(torch.nn.Linear(2, 2), (1, 4, 3, 6, 10))
    model = diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=8, time_embed_dim=8, max_sequence_length=6)
    with pytest.raises(ToolkitError, match="empty token grid"):
        SDPAAdapter.for_diffusers(model, (1, 4, 3, 1, 10))
    with pytest.raises(ToolkitError, match="batch index 2 but the model is called with 2 samples"):
        SDPAAdapter.for_diffusers(model, (2, 4, 3, 6, 10), batch_index=2)
