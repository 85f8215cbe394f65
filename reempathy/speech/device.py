"""``auto`` → CUDA when present, else CPU; any other string must name a usable torch device."""

from __future__ import annotations

import torch

from reempathy.errors import ConfigError


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``); ``ConfigError`` if unusable."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asks for CUDA, which this machine does not have; use cpu or auto")
    return resolved
