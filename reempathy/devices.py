"""Device names → torch devices, with one clear error for a name torch does not know or a device this machine lacks.

Every option called ``device`` (backbones, the speech tokenizer and decoder, ``--device``)
goes through :func:`resolve_device` when it is used, and through :data:`DeviceName` when a
config is validated, so ``device = "banana"`` is refused while the config is read and
``device = "cuda"`` on a machine without a GPU is refused before any weights are loaded.
"""

from __future__ import annotations

import re
from typing import Annotated

import torch
from pydantic import AfterValidator

from reempathy.errors import ConfigError

_NAME = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,4})?)$")
HINT = "use auto, cpu, cuda, cuda:N or mps"


def check_device_name(device: str) -> str:
    """``device`` if it is a name reempathy can use (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``); ValueError otherwise."""
    if not isinstance(device, str) or not _NAME.match(device):
        raise ValueError(f"{device!r} is not a device name; {HINT}")
    return device


DeviceName = Annotated[str, AfterValidator(check_device_name)]
"""A pydantic field type for ``device`` options: the name is checked when the config is validated."""


def resolve_device(device: str | torch.device, what: str = "device") -> torch.device:
    """The torch device for ``device`` (``auto`` → cuda when present, else cpu); ConfigError if unusable here."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_device_name(device)
    except ValueError:
        raise ConfigError(f"{what} {device!r} is not a device name; {HINT}") from None
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {device!r} asks for CUDA, which this machine does not have; use cpu or auto")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"{what} {device!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{what} {device!r} asks for Apple's MPS, which this machine does not have; use cpu or auto")
    return resolved


__all__ = ["DeviceName", "check_device_name", "resolve_device"]
