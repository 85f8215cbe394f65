"""Host-to-device copies of small per-step tensors without a stream synchronisation.

Where it decides: :func:`to_device` is the one way the loops turn Python lists (token ids, row
positions, layer indices) into tensors on the model's device. ``torch.tensor(values,
device="cuda")`` copies from pageable host memory with a blocking copy, which waits for every
kernel queued before it: once per decode step in the batched loops, that is a host-device round
trip the GPU sits idle through. Here the values go to pinned (page-locked) host memory first and
are copied with ``non_blocking=True``: the copy is queued behind the work already on the stream
and the host goes on launching. It is safe to reuse the host tensor's memory afterwards because
PyTorch's pinned-memory allocator records the copy's stream and hands the block out again only
once that copy has run. On a CPU device this is plain ``torch.tensor``.
"""

from __future__ import annotations

from typing import Any

import torch


def to_device(values: Any, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``, queued without waiting for the device (CUDA)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


__all__ = ["to_device"]
