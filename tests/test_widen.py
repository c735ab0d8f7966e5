"""Function-preserving widening of a Wan DiT (toolkit/models/bundled/widen.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_wan

from toolkit.models import bundled
from toolkit.models.bundled import widen
from toolkit.models.bundled.widen import widened

# awkward sizes: width 36 in 3 heads of 12, FFN 52 (not a multiple of the width), a 6-frame clip in 2 chunks
SMALL = dict(dim=36, ffn_dim=52, num_heads=3, num_layers=2)


def _model(seed: int = 0) -> torch.nn.Module:
    cfg = bundled.bundled_config(**SMALL)
    cfg.extra["clip"] = dict(frames=6, height=12, width=20)
    model = tiny_wan(cfg, seed=seed, dtype=torch.float64)
    with torch.no_grad():  # random init leaves modulations, norms and biases near trivial: make every path count
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("factor", [2, 3])
def test_widened_model_computes_the_same_function(factor):
    model = _model(seed=factor)
    wide = widened(model, factor, seed=7)
    c, w = model.cfg, wide.cfg
    assert (w.dim, w.ffn_dim, w.num_heads, w.num_layers) == (factor * c.dim, factor * c.ffn_dim, factor * c.num_heads,
                                                             c.num_layers)
    assert w.head_dim == c.head_dim and w.extra == c.extra and wide.dtype == torch.float64
    gen = torch.Generator().manual_seed(factor)
    x = torch.randn(2, 3, 6, 12, 20, generator=gen, dtype=torch.float64)
    context = torch.randn(2, 5, c.text_dim, generator=gen, dtype=torch.float64)
    t = torch.tensor([830.0, 140.0], dtype=torch.float64)
    with torch.no_grad():
        before, after = model(x, t, context), wide(x, t, context)
        # the sampler's KV-cache rollout (4 steps per chunk, re-noising between them, clean passes)
        video, video_wide = (bundled.generate(m, ["2 sprites: red circle, blue square", "1 sprite: green ring"],
                                              seed=3) for m in (model, wide))
    # LayerNorm and RMSNorm run in float32 (as in Wan), so float64 models agree to float32 rounding, not to 1e-15
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    assert (video_wide - video).abs().max() <= 1e-5
    # the weights that read a widened stream are split unevenly over its copies, not halved
    q, q_wide = model.blocks[0].self_attn.q.weight, wide.blocks[0].self_attn.q.weight
    parts = q_wide[: c.dim].split(c.dim, dim=1)
    torch.testing.assert_close(sum(parts), q, rtol=1e-12, atol=1e-12)
    assert (parts[0] / q - 1 / factor).abs().max() > 0.05


def test_copies_get_different_gradients_only_with_an_uneven_split(monkeypatch):
    model, spread = _model(), widen.SPREAD
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 6, 12, 20, generator=gen, dtype=torch.float64)
    context = torch.randn(1, 5, model.cfg.text_dim, generator=gen, dtype=torch.float64)
    target = torch.randn(1, 3, 6, 12, 20, generator=gen, dtype=torch.float64)

    def copy_gradients(spread: float) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(widen, "SPREAD", spread)
        wide = widened(model, 2, seed=1)
        loss = (wide(x, torch.tensor([500.0], dtype=torch.float64), context) - target).square().mean()
        loss.backward()
        g = wide.blocks[0].ffn[0].weight.grad  # FFN hidden units: rows 0..F-1 and their copies F..2F-1
        return g[: model.cfg.ffn_dim], g[model.cfg.ffn_dim:]

    a, b = copy_gradients(0.0)  # equal shares: every copy has the same gradient, so the copies never separate
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    a, b = copy_gradients(spread)
    assert (a - b).abs().max() > 0.05 * a.abs().max()


def test_widening_refuses_a_factor_below_two():
    for factor in (1, 0, 2.0):
        with pytest.raises(ValueError, match="integer >= 2"):
            widened(_model(), factor)
