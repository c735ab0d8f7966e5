"""Which few-step schedule should the bundled model sample with?

The bundled model is trained by plain (teacher-forced) flow matching, not distilled like Self-Forcing (DMD). Its
last x0 estimate in the released 4-step schedule comes from σ = 0.625, where a non-distilled model's posterior mean is
blurry. This sweep rolls out the same prompts under several timestep lists of the same Self-Forcing loop and scores:

* colour match: fraction of clips whose visible palette colours equal the prompt's (``evaluate.detect_colours``);
* sharpness: mean |spatial Laplacian| of the rollout over that of procedural ground truth with the same prompts.

    python benchmarks/bundled_sampler_sweep.py --out results/      # GPU: seconds; CPU: minutes
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from toolkit.models import bundled
from toolkit.models.bundled import data as procedural
from toolkit.models.bundled import evaluate
from toolkit.models.sampling import self_forcing_rollout, self_forcing_timesteps

VARIANTS = {
    "sf-4 (shift 5: 1000,937,833,625)": (5.0, (1000, 750, 500, 250)),
    "shift 1, 4 steps (1000,750,500,250)": (1.0, (1000, 750, 500, 250)),
    "shift 3, 4 steps": (3.0, (1000, 750, 500, 250)),
    "shift 5, 8 steps": (5.0, tuple(range(1000, 0, -125))),
    "shift 5, 16 steps": (5.0, tuple(range(1000, 0, -62))[:16]),
    "shift 1, 8 steps": (1.0, tuple(range(1000, 0, -125))),
}


def laplacian_energy(video: torch.Tensor) -> torch.Tensor:
    """Mean |∇²| over pixels of [b 3 f h w] clips, per clip."""
    x = video.flatten(1, 2)
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return lap.abs().flatten(1).mean(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--clips", type=int, default=32)
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = bundled.load_bundled(dev)
    frames, height, width = bundled.clip_shape(model.cfg)
    prompts = procedural.random_prompts(args.clips, torch.Generator().manual_seed(7))
    truth = procedural.render(prompts, torch.Generator().manual_seed(8), frames=frames, height=height, width=width)
    context = procedural.encode_prompts(prompts).to(dev)
    sharp_truth = float(laplacian_energy(truth).mean())
    results, rows, labels = [], [truth[0], truth[1]], ["ground truth a", "ground truth b"]
    for name, (shift, steps) in VARIANTS.items():
        ts = self_forcing_timesteps(shift, steps)
        g = torch.Generator(dev).manual_seed(0)
        noise = torch.randn(args.clips, 3, frames, height, width, generator=g, device=dev)
        video = bundled.to_pixels(self_forcing_rollout(model, noise, context, timesteps=ts, generator=g)).cpu()
        found = evaluate.detect_colours(video)
        match = sum(f == {s.colour for s in q.sprites} for q, f in zip(prompts, found)) / len(prompts)
        sharp = float(laplacian_energy(video).mean()) / sharp_truth
        results.append(dict(variant=name, shift=shift, denoising_steps=list(steps),
                            timesteps=[round(float(t), 2) for t in ts], colour_match=match, sharpness_ratio=sharp))
        rows += [video[0], video[1]]
        labels += [f"{name} a", f"{name} b"]
        print(f"{name:40s} colour match {match:5.2f}  sharpness/truth {sharp:5.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    (args.out / "bundled_sampler_sweep.json").write_text(json.dumps(dict(device=dev_name, results=results), indent=1))
    bundled.save_strip(rows, args.out / "bundled_sampler_sweep.png", labels=labels, scale=2)


if __name__ == "__main__":
    main()
