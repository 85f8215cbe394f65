"""reempathy.decoding.transfer: the loops' per-step host-to-device tensors."""

from __future__ import annotations

import pytest
import torch

from reempathy.decoding.transfer import to_device


def test_to_device_makes_what_torch_tensor_makes_on_the_cpu():
    got = to_device([[3, 1], [4, 1]], torch.device("cpu"))
    assert torch.equal(got, torch.tensor([[3, 1], [4, 1]])) and got.dtype == torch.long


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned, non-blocking copy needs CUDA")
def test_to_device_queues_a_copy_from_pinned_memory_on_cuda():
    got = to_device([5, 9, 2], torch.device("cuda"))
    assert got.device.type == "cuda" and got.tolist() == [5, 9, 2]
