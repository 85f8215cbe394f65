"""Batching built sequences for Trainer: right padding, -100 labels on the padding; preference batches for TRL with loss masks."""

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


@dataclass
class PreferenceCollator:
    """TRL's preference batch (chosen rows, then rejected rows), with the loss on the tokens each pair's masks keep.

    TRL's ``DataCollatorForPreference`` puts every completion token in the loss; a whole-trace
    pair carries ``chosen_mask`` / ``rejected_mask`` (1: in the loss, 0: a forced token, or a
    hidden one when masked), and those become the batch's ``completion_mask``. TRL sums the
    log-probabilities of exactly the tokens whose ``completion_mask`` is 1. A pair without masks
    keeps every completion token.
    """

    pad_id: int
    max_length: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows: list[tuple[list[int], list[int]]] = []
        for side in ("chosen", "rejected"):
            for f in features:
                completion = list(f[f"{side}_ids"])
                mask = f.get(f"{side}_mask") or [1] * len(completion)
                rows.append((list(f["prompt_ids"]) + completion, [0] * len(f["prompt_ids"]) + list(mask)))
        if self.max_length is not None:
            rows = [(ids[: self.max_length], mask[: self.max_length]) for ids, mask in rows]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        completion = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, mask) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[r, : len(ids)] = 1
            completion[r, : len(mask)] = torch.tensor(mask, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}
