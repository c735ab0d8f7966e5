"""Function-preserving widening and deepening of a Wan DiT (toolkit/models/bundled/grow.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_wan

from toolkit.models import bundled
from toolkit.models.bundled import grow
from toolkit.models.bundled.grow import deepened, widened

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
    model, spread = _model(), grow.SPREAD
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 6, 12, 20, generator=gen, dtype=torch.float64)
    context = torch.randn(1, 5, model.cfg.text_dim, generator=gen, dtype=torch.float64)
    target = torch.randn(1, 3, 6, 12, 20, generator=gen, dtype=torch.float64)

    def copy_gradients(spread: float) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(grow, "SPREAD", spread)
        wide = widened(model, 2, seed=1)
        loss = (wide(x, torch.tensor([500.0], dtype=torch.float64), context) - target).square().mean()
        loss.backward()
        g = wide.blocks[0].ffn[0].weight.grad  # FFN hidden units: rows 0..F-1 and their copies F..2F-1
        return g[: model.cfg.ffn_dim], g[model.cfg.ffn_dim:]

    a, b = copy_gradients(0.0)  # equal shares: every copy has the same gradient, so the copies never separate
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    a, b = copy_gradients(spread)
    assert (a - b).abs().max() > 0.05 * a.abs().max()


def test_growing_refuses_a_factor_below_two():
    for grown in (widened, deepened):
        for factor in (1, 0, 2.0):
            with pytest.raises(ValueError, match="integer >= 2"):
                grown(_model(), factor)


def _inputs(seed: int, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 6, 12, 20, generator=gen, dtype=torch.float64)
    context = torch.randn(2, 5, cfg.text_dim, generator=gen, dtype=torch.float64)
    return x, torch.tensor([830.0, 140.0], dtype=torch.float64), context


@pytest.mark.parametrize("factor", [2, 3])
def test_deepened_model_computes_exactly_the_same_function(factor):
    model = _model(seed=10 + factor)
    deep = deepened(model, factor)
    c, d = model.cfg, deep.cfg
    assert (d.num_layers, d.dim, d.ffn_dim, d.num_heads) == (factor * c.num_layers, c.dim, c.ffn_dim, c.num_heads)
    assert d.extra == c.extra and deep.dtype == torch.float64
    assert [b.layer for b in deep.blocks] == list(range(d.num_layers))  # hook names and KV-cache slots follow
    x, t, context = _inputs(factor, c)
    with torch.no_grad():
        before, after = model(x, t, context), deep(x, t, context)
        video, video_deep = (bundled.generate(m, ["3 sprites: red circle, blue square, white ring"], seed=5)
                             for m in (model, deep))
    # each new block adds exactly zero to the residual stream: bit-identical, not merely close
    assert torch.equal(after, before) and torch.equal(video_deep, video)
    # block i is at factor·i; the new blocks are its copies with zero residual writers
    for i, block in enumerate(model.blocks):
        torch.testing.assert_close(deep.blocks[factor * i].state_dict(), block.state_dict(), rtol=0, atol=0)
        new = deep.blocks[factor * i + 1]
        assert torch.equal(new.self_attn.q.weight, block.self_attn.q.weight)
        assert not new.ffn[2].weight.any() and not new.self_attn.o.weight.any() and not new.cross_attn.o.bias.any()


def test_new_blocks_learn_from_the_first_step():
    model = _model(seed=3)
    deep = deepened(model, 2)
    x, t, context = _inputs(3, model.cfg)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (deep(x, t, context) - target).square().mean().backward()
    new = deep.blocks[1]
    for writer in (new.self_attn.o, new.cross_attn.o, new.ffn[2]):  # the gradient at the residual times features
        assert writer.weight.grad.abs().max() > 1e-6
    assert not new.self_attn.q.weight.grad.any()  # nothing downstream of q yet: it learns once o is nonzero
    opt = torch.optim.SGD(deep.parameters(), lr=1e-2)
    opt.step()
    with torch.no_grad():
        assert not torch.equal(deep(x, t, context), model(x, t, context))
