"""Device resolution, shared by every layer: ``auto`` (the GPU when torch sees one), ``cpu``, ``cuda``, ``cuda:N``."""

from __future__ import annotations

import re

import torch

from toolkit.errors import ToolkitError

# What a run can compute on. torch.device also parses meta, xla, ... which hold no data or need other stacks.
_DEVICE = re.compile(r"(cpu|cuda|mps)(:\d+)?")


def check_device(device: str | None) -> str:
    """Refuse (one line) a device string that is not ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, before
    torch parses it (its errors are tracebacks); returns it unchanged. Touches no GPU."""
    if device is None or device == "auto":
        return "auto"
    if not isinstance(device, str) or not _DEVICE.fullmatch(device.strip().lower()):
        raise ToolkitError(f"--device {device!r}: choose auto, cpu, cuda, cuda:N (or mps)")
    return device


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``None`` or ``"auto"`` -> ``cuda`` when available, else ``cpu``; else ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

    Raises `ToolkitError` for any other string and when a CUDA device is asked for that torch does not see."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        dev = device
    else:
        dev = torch.device(check_device(device).strip().lower())
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ToolkitError(f"device {device} asked for, but torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ToolkitError(f"device {device} asked for, but torch sees {torch.cuda.device_count()} CUDA "
                               f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ToolkitError(f"device {device} asked for, but torch sees no MPS device")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ToolkitError(f"--device {device!r}: there is one CPU device (cpu)")
    return dev
