"""Capture from models we did not write, through their F.scaled_dot_product_attention calls (SDPAAdapter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import dense_attention
from torch import nn

from toolkit.capture import Selection, capture, open_capture
from toolkit.capture.adapters import SDPAAdapter

GRID = (3, 2, 5)  # 30 tokens: frames × height × width
HEADS, HEAD_DIM, DIM = 3, 8, 24


class ToyBlock(nn.Module):
    """A DiT-like block: self-attention over the video tokens, then cross-attention to 4 text tokens, both via
    F.scaled_dot_product_attention in the b h i d layout (as diffusers' native backend calls it)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.kv_text = nn.Linear(DIM, 2 * DIM)
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)  # b h i d each
        self.seen.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, DIM)
        tk, tv = self.kv_text(text).view(b, -1, 2, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        return x + F.scaled_dot_product_attention(q, tk, tv).transpose(1, 2).reshape(b, n, DIM)


class ToyDiT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock() for _ in range(2))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, text)
        return x


def test_sdpa_adapter_captures_self_attention_and_leaves_outputs_unchanged(tmp_path):
    torch.manual_seed(0)
    model = ToyDiT().eval()
    x, text = torch.randn(1, 30, DIM) * 3, torch.randn(1, 4, DIM)
    timesteps = [900.0, 500.0, 100.0]
    with torch.no_grad():
        plain = [model(x, torch.tensor([t]), text) for t in timesteps]
    for b in model.blocks:
        b.seen.clear()

    original_sdpa = F.scaled_dot_product_attention
    adapter = SDPAAdapter([b for b in model.blocks], GRID, root=model)
    out = tmp_path / "toy.h5"
    layout = adapter.layout(timesteps, num_heads=HEADS, head_dim=HEAD_DIM)
    with torch.no_grad(), adapter, capture(adapter, Selection(store=("q", "k", "v", "lse")), out, layout=layout,
                                            progress=False):
        captured = [model(x, torch.tensor([t]), text) for t in timesteps]
    assert F.scaled_dot_product_attention is original_sdpa  # restored on exit
    for a, b in zip(plain, captured):
        assert torch.equal(a, b)

    with open_capture(out) as cap:
        assert cap.complete and cap.grid == GRID
        assert cap.records == [(s, 0, l) for s in range(3) for l in range(2)]
        for step in range(3):
            for layer in range(2):
                rec = cap.record(step=step, chunk=0, layer=layer)
                q, k, v = model.blocks[layer].seen[step]  # b h i d
                assert rec.timestep == timesteps[step]
                assert torch.equal(rec.q(), q[0]) and torch.equal(rec.k(), k[0]) and torch.equal(rec.v(), v[0])
                expected = dense_attention(q[0], k[0], scale=HEAD_DIM**-0.5).probs
                for head in range(HEADS):
                    rows = torch.from_numpy(cap.rows(rec, head).values).double()
                    torch.testing.assert_close(rows, expected[head], rtol=1e-5, atol=1e-6)


def test_sdpa_adapter_ignores_calls_outside_the_modules_and_other_shapes():
    torch.manual_seed(1)
    adapter = SDPAAdapter([nn.Identity()], GRID)
    calls = []
    adapter.seams[0].hooks.append(lambda *a: calls.append(a))
    q = torch.randn(1, 2, 30, 4)
    with adapter:
        out = F.scaled_dot_product_attention(q, q, q)  # not inside a target module
    assert not calls and torch.equal(out, F.scaled_dot_product_attention(q, q, q))


def test_diffusers_wan_transformer(tmp_path):
    """diffusers' WanTransformer3DModel at a small random config, captured through its native SDPA backend."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (optional [video] extra)")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32).eval()
    latents, text = torch.randn(1, 4, 3, 4, 6), torch.randn(1, 5, 16)
    seen = {}

    def spy(q, k, v, out, ctx):
        seen[(ctx.step, ctx.layer)] = (q[0].transpose(0, 1).clone(), k[0].transpose(0, 1).clone())

    adapter = SDPAAdapter.for_diffusers(model, latents.shape)
    assert adapter.grid == (3, 2, 3)
    for s in adapter.seams:
        s.hooks.append(spy)
    out = tmp_path / "wan_diffusers.h5"
    timesteps = [999.0, 500.0]
    with torch.no_grad():
        plain = [model(latents, torch.tensor([t]), text, return_dict=False)[0] for t in timesteps]
        with adapter, capture(adapter, Selection(), out, layout=adapter.layout(timesteps, num_heads=2, head_dim=16),
                              progress=False):
            captured = [model(latents, torch.tensor([t]), text, return_dict=False)[0] for t in timesteps]
    for a, b in zip(plain, captured):
        torch.testing.assert_close(a, b)
    with open_capture(out) as cap:
        assert cap.complete and len(cap.records) == 2 * 2
        for step, layer in [(0, 0), (1, 1)]:
            rec = cap.record(step=step, chunk=0, layer=layer)
            q, k = seen[(step, layer)]
            assert torch.equal(rec.q(), q.float()) and torch.equal(rec.k(), k.float())
            expected = dense_attention(q, k, scale=1 / 4).probs
            torch.testing.assert_close(torch.from_numpy(cap.rows(rec, 1).values).double(), expected[1],
                                       rtol=1e-5, atol=1e-6)
    model.blocks[1].attn1.processor._attention_backend = "flex"  # a kernel that never calls SDPA
    from toolkit.errors import ToolkitError

    with pytest.raises(ToolkitError, match="set_attention_backend"):
        SDPAAdapter.for_diffusers(model, latents.shape)


def test_adapter_docstring_examples_run():
    """The module docstring's example (a tiny CogVideoX captured end to end) runs as written."""
    import doctest

    pytest.importorskip("diffusers", reason="diffusers is not installed (the [dev] extra installs it)")
    from toolkit.capture import adapters

    result = doctest.testmod(adapters, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0


def test_a_capture_that_records_nothing_names_what_it_watched(tmp_path, capsys):
    """Wrong grid: every call inside the modules is passed over, so the capture refuses in one line, keeps the file
    and `toolkit inspect` calls it empty, not interrupted."""
    from toolkit.capture.recorder import EmptyCaptureError
    from toolkit.cli import main

    torch.manual_seed(2)
    model = ToyDiT().eval()
    adapter = SDPAAdapter(list(model.blocks), (3, 2, 4), root=model)  # 24 tokens; the model runs 30
    out = tmp_path / "empty.h5"
    with pytest.raises(EmptyCaptureError) as err:
        with torch.no_grad(), adapter, capture(adapter, Selection(), out, progress=False,
                                               layout=adapter.layout([1.0], num_heads=HEADS, head_dim=HEAD_DIM)):
            model(torch.randn(1, 30, DIM), torch.tensor([1.0]), torch.randn(1, 4, DIM))
    message = str(err.value)
    assert "\n" not in message and "blocks.0, blocks.1" in message and "expecting 24 video tokens" in message
    assert "2 × 30 tokens" in message and "2 × cross-attention" in message  # per block: self- and cross-attention
    assert main(["inspect", str(out)]) == 0
    assert "EMPTY (capture recorded nothing" in capsys.readouterr().out
