"""Pictures of clips: a frame strip (PNG) and an animated GIF, for rollouts next to their ground truth."""

from __future__ import annotations

from pathlib import Path

import torch


def save_strip(
    rows: list[torch.Tensor],
    path: str | Path,
    labels: list[str] | None = None,
    scale: int = 3,
    title: str = "",
    frames_per_chunk: int | None = None,
    width_inches: float = 16.0,
) -> Path:
    """PNG with one row per clip ([3, frames, h, w] in [0, 1]) and one column per frame, nearest-upscaled by
    ``scale``. The figure is ``width_inches`` wide at whatever resolution keeps every frame pixel ``scale`` pixels
    wide, so its text stays readable when the strip is shown at page width; frame numbers run along the last row,
    and with ``frames_per_chunk`` white lines mark the chunk boundaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames, h, w = rows[0].shape[1:]
    dpi = frames * w * scale / (0.98 * width_inches)  # the image spans ~98 % of the width at `scale` px per pixel
    row_inches = h * scale / dpi
    label_inches = 0.3 if labels else 0.05
    height = len(rows) * (row_inches + label_inches) + (0.5 if title else 0.1) + 0.4
    fig = plt.figure(figsize=(width_inches, height), dpi=dpi, layout="constrained")
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for i, (ax, clip) in enumerate(zip(axes, rows)):
        strip = clip.float().cpu().permute(2, 1, 3, 0).reshape(h, frames * w, 3).clamp(0, 1)  # h (f w) c
        ax.imshow(strip.numpy(), interpolation="nearest")
        ax.set_yticks([])
        for j in range(1, frames):
            boundary = frames_per_chunk and j % frames_per_chunk == 0
            ax.axvline(j * w - 0.5, color="white" if boundary else "black", lw=2.5 if boundary else 0.8)
        last = i == len(rows) - 1
        ax.set_xticks([(j + 0.5) * w for j in range(frames)], [str(j) for j in range(frames)] if last else [],
                      fontsize=10)
        ax.tick_params(length=0)
        if last:
            ax.set_xlabel("frame" + (f" (chunks of {frames_per_chunk}, white lines)" if frames_per_chunk else ""),
                          fontsize=11)
        if labels:
            ax.set_title(labels[i], fontsize=11, loc="left", pad=3)
    if title:
        fig.suptitle(title, fontsize=13)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
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
