"""Device resolution, shared by every layer: ``auto`` (the GPU when torch sees one), ``cpu``, ``cuda``, ``cuda:N``."""

from __future__ import annotations

import torch

from toolkit.errors import ToolkitError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``None`` or ``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else as ``torch.device`` reads it.

    Raises `ToolkitError` when a CUDA device is asked for and torch sees none."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ToolkitError(f"device {device} asked for, but torch sees no CUDA device")
    return dev
