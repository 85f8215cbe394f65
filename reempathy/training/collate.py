"""Batching built sequences for Trainer: right padding, -100 labels on the padding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from reempathy.training.builders import IGNORE_INDEX


@dataclass
class PadCollator:
    """Pads ``input_ids`` with ``pad_id`` and ``labels`` with -100; the attention mask marks the real tokens."""

    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(f["labels"], dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
