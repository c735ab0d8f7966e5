"""Pictures of clips: a frame strip (PNG) and an animated GIF, for rollouts next to their ground truth."""

from __future__ import annotations

from pathlib import Path

import torch


def save_strip(
    rows: list[torch.Tensor], path: str | Path, labels: list[str] | None = None, scale: int = 3, title: str = ""
) -> Path:
    """PNG with one row per clip ([3, frames, h, w] in [0, 1]) and one column per frame, nearest-upscaled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames, h, w = rows[0].shape[1:]
    fig_w = frames * w * scale / 100
    fig, axes = plt.subplots(len(rows), 1, figsize=(fig_w + 0.2, len(rows) * (h * scale / 100 + 0.3) + 0.4))
    axes = [axes] if len(rows) == 1 else list(axes)
    for i, (ax, clip) in enumerate(zip(axes, rows)):
        strip = clip.float().cpu().permute(2, 1, 3, 0).reshape(h, frames * w, 3).clamp(0, 1)  # h (f w) c
        ax.imshow(strip.numpy(), interpolation="nearest")
        ax.set_xticks([(j + 0.5) * w for j in range(frames)], [str(j) for j in range(frames)], fontsize=6)
        ax.set_yticks([])
        for j in range(1, frames):
            ax.axvline(j * w - 0.5, color="black", lw=0.5)
        if labels:
            ax.set_title(labels[i], fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_gif(video: torch.Tensor, path: str | Path, scale: int = 4, fps: int = 6) -> Path:
    """Animated GIF of one clip [3, frames, h, w] in [0, 1] (Pillow, which matplotlib already depends on)."""
    from PIL import Image

    frames = (video.float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
