"""The rolling KV cache (``local_attn_size`` / ``sink_size``) against the official Self-Forcing ``CausalWanModel``.

Both models get the same random float32 weights (the official state-dict names are the toolkit's) and roll out the
same noise chunk by chunk, 4 denoising steps and the clean pass each, with a window and a sink; the script prints
the largest difference of any forward's output, per window, and fails if one exceeds ``--tol``. Needs a checkout of
github.com/guandeh17/Self-Forcing (its ``wan`` package is imported from there, never copied here):

    python benchmarks/check_rolling_official.py --self-forcing PATH/TO/Self-Forcing

Two adjustments, both to the official side: its attention fallback casts to bf16, so attention is routed to
float32 SDPA; its window is hard-coded in 480p tokens (``L * 1560``), so it is set to this grid's frame size.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from toolkit.models.layout import RunLayout
from toolkit.models.wan import KVCache, WanConfig, WanModel

TIMESTEPS = [1000.0, 937.5, 2500 / 3, 625.0]
CFG = dict(dim=48, ffn_dim=64, num_heads=3, num_layers=3, text_dim=16, text_len=6, freq_dim=16)
GRID_HW = (3, 5)  # tokens per frame 15: latent 6 x 10 with 2 x 2 patches


def official_modules(root: Path):
    sys.path.insert(0, str(root))
    if importlib.util.find_spec("einops") is None:  # imported by the official package, unused on this path
        sys.modules["einops"] = types.SimpleNamespace(repeat=None, rearrange=None)
    model = importlib.import_module("wan.modules.model")
    causal = importlib.import_module("wan.modules.causal_model")

    def sdpa(q, k, v, *args, **kwargs):  # b l h d, float32
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    model.flash_attention = sdpa
    causal.attention = sdpa
    return causal


def rollout_difference(causal, window: int, sink: int, chunks: int = 7, per_chunk: int = 3, seed: int = 0):
    """(max |toolkit − official| over every forward, max |output|, the toolkit's last output)."""
    torch.manual_seed(seed)
    cfg = WanConfig(**CFG)
    ours = WanModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(p.shape[-1], 1) ** 0.5))
        for block in ours.blocks:
            block.self_attn.norm_q.weight.mul_(4)  # sharper attention: windows then matter
    official = causal.CausalWanModel(
        patch_size=(1, 2, 2), text_len=6, in_dim=16, dim=48, ffn_dim=64, freq_dim=16, text_dim=16, out_dim=16,
        num_heads=3, num_layers=3, local_attn_size=window, sink_size=sink, cross_attn_norm=True).eval()
    official.load_state_dict(ours.state_dict(), strict=True)
    frames, tpf = chunks * per_chunk, GRID_HW[0] * GRID_HW[1]
    size = (window if window != -1 else frames) * tpf
    for block in official.blocks:
        block.self_attn.max_attention_size = size
    kv = [{"k": torch.zeros(1, size, 3, 16), "v": torch.zeros(1, size, 3, 16),
           "global_end_index": torch.tensor([0]), "local_end_index": torch.tensor([0])} for _ in range(3)]
    cross = [{"k": None, "v": None, "is_init": False} for _ in range(3)]
    layout = RunLayout.self_forcing(cfg, (frames, *GRID_HW), TIMESTEPS, per_chunk, window, sink)
    cache = KVCache(cfg, 1, layout.max_key_frames() * tpf, "cpu", torch.float32, local_attn_size=window,
                    sink_size=sink)
    noise = torch.randn(1, 16, frames, 2 * GRID_HW[0], 2 * GRID_HW[1], generator=g)
    context = torch.randn(1, 4, 16, generator=g)
    worst = scale = 0.0
    with torch.no_grad():
        for c in range(chunks):
            x = noise[:, :, c * per_chunk:(c + 1) * per_chunk]
            for s, t in enumerate([*TIMESTEPS, 0.0]):
                tt = torch.full((1, per_chunk), t)
                a = ours(x, tt, context, kv_cache=cache, start_frame=c * per_chunk, chunk=c, clip_frames=frames,
                         step=s)
                b = official._forward_inference([x[0]], tt, [context[0]], 10**9, kv_cache=kv, crossattn_cache=cross,
                                                current_start=c * per_chunk * tpf)
                worst, scale = max(worst, float((a - b).abs().max())), max(scale, float(a.abs().max()))
                x0 = x - t / 1000 * a
                if s < len(TIMESTEPS) - 1:
                    eps = torch.randn(x0.shape, generator=g)
                    x = (1 - TIMESTEPS[s + 1] / 1000) * x0 + TIMESTEPS[s + 1] / 1000 * eps
                elif s == len(TIMESTEPS) - 1:
                    x = x0  # the clean pass's input
    return worst, scale, a


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--self-forcing", type=Path, required=True, help="checkout of guandeh17/Self-Forcing")
    p.add_argument("--tol", type=float, default=1e-5, help="largest allowed |difference| (float32 rounding)")
    args = p.parse_args()
    causal = official_modules(args.self_forcing.resolve())
    _, _, global_out = rollout_difference(causal, -1, 0)
    failed = False
    for window, sink in [(-1, 0), (6, 0), (7, 1), (5, 2), (4, 1)]:
        worst, scale, out = rollout_difference(causal, window, sink)
        changed = float((out - global_out).abs().max())
        print(f"window {window:>2}, sink {sink}: max |toolkit - official| = {worst:.3g} (outputs up to {scale:.3g}); "
              f"last chunk vs global attention differs by {changed:.3g}")
        failed |= worst > args.tol
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
