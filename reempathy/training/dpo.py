"""TRL's DPOTrainer, fed token ids we built ourselves.

TRL 1.16's DPOTrainer always runs its own preparation, which reads ``prompt``/``chosen``/
``rejected`` text and tokenizes it into ``prompt_ids``/``chosen_ids``/``rejected_ids``. Our
answers interleave text and audio-unit tokens that must not be re-tokenized, so the builder
makes those three columns directly and the preparation step passes them through unchanged.
"""

from __future__ import annotations

from typing import Any

from trl import DPOTrainer

PRETOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class PretokenizedDPOTrainer(DPOTrainer):
    """A DPOTrainer whose datasets already hold ``prompt_ids``, ``chosen_ids`` and ``rejected_ids``."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        first = next(iter(dataset))
        missing = [c for c in PRETOKENIZED_COLUMNS if c not in first]
        if missing:
            raise ValueError(f"{dataset_name} dataset lacks the pre-tokenized column {missing[0]!r}")
        return dataset
