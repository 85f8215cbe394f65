"""The dialogue as the evaluator receives it: Qwen chat tokens with audio clips in place, then the batch tensors.

One layout for training and scoring, so what is trained is what is scored::

    <|im_start|>system\\n{SYSTEM}<|im_end|>\\n
    <|im_start|>user\\nDialogue:\\nUser: <audio_start>[audio]<audio_end>\\nAssistant: <audio_start>[audio]<audio_end>\\n\\n{task}<|im_end|>\\n
    <|im_start|>assistant\\n{assessment}<|im_end|>

A turn with audio is heard (its clip), one without is read (its text). Each clip's placeholder
count depends on its feature frames, so prompts carry a marker per clip that ``collate``
expands once the feature extractor has run over the batch. The score heads pool the prompt
positions of the dialogue and the task (``pool_mask``; the system preamble is the same for every
record and carries nothing), so scoring needs no assessment text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from reempathy.evaluation.empathyeval.omni import Omni

SYSTEM = (
    "You are EmpathyEval. You listen to a spoken dialogue and assess the assistant's last answer: what the user "
    "needs, how appropriate the wording is, how well the user's emotion is understood and supported, with suggestions."
)
DEFAULT_TASK = "Assess the assistant's last spoken answer."
AUDIO_MARK = -1  # stands for one clip's placeholders until collate knows their count
IGNORE = -100


@dataclass
class HeardTurn:
    """One turn: its role and either its waveform (heard) or its text (read)."""

    role: str
    text: str | None = None
    wave: np.ndarray | None = None


@dataclass
class Example:
    """One dialogue ready to batch: prompt ids with clip markers, the clips, and the training targets."""

    prompt_ids: list[int]
    waves: list[np.ndarray]
    target_ids: list[int] = field(default_factory=list)
    scores: list[float] | None = None
    pool_start: int = 0  # prompt position where the dialogue begins (the fixed preamble is not pooled)


def _text(omni: Omni, s: str) -> list[int]:
    return list(omni.tokenizer(s, add_special_tokens=False)["input_ids"])


def encode_dialogue(omni: Omni, turns: Sequence[HeardTurn], task: str | None = None) -> tuple[list[int], list[np.ndarray], int]:
    """Prompt ids (with ``AUDIO_MARK`` per clip), the clips in order, and where the dialogue begins."""
    ids = _text(omni, f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nDialogue:\n")
    start = len(ids)
    waves: list[np.ndarray] = []
    for turn in turns:
        ids += _text(omni, f"{turn.role.capitalize()}: ")
        if turn.wave is not None:
            ids += [omni.audio_start_id, AUDIO_MARK, omni.audio_end_id]
            waves.append(turn.wave)
        else:
            ids += _text(omni, turn.text or "")
        ids += _text(omni, "\n")
    ids += _text(omni, f"\n{task or DEFAULT_TASK}<|im_end|>\n<|im_start|>assistant\n")
    return ids, waves, start


def target_ids(omni: Omni, assessment: str | None) -> list[int]:
    """Token ids of the assessment the model learns to write, closed by ``<|im_end|>``."""
    return _text(omni, f"{assessment}<|im_end|>") if assessment else []


def collate(omni: Omni, examples: Sequence[Example], with_targets: bool = True) -> dict[str, Any]:
    """Batch tensors: ids (clips expanded), attention, features, labels, pool mask, scores."""
    waves = [w for ex in examples for w in ex.waves]
    batch: dict[str, Any] = {}
    counts: list[int] = []
    if waves:
        fe = omni.feature_extractor(
            waves, sampling_rate=omni.sampling_rate, return_attention_mask=True, padding="longest", return_tensors="pt"
        )
        batch["input_features"] = fe["input_features"].to(omni.thinker.dtype)
        batch["feature_attention_mask"] = fe["attention_mask"]
        counts = omni.audio_tokens(fe["attention_mask"].sum(-1))
    rows, labels, pools = [], [], []
    k = 0
    for ex in examples:
        prompt: list[int] = []
        pool_start = 0
        for i, t in enumerate(ex.prompt_ids):
            if i == ex.pool_start:
                pool_start = len(prompt)
            if t == AUDIO_MARK:
                prompt += [omni.audio_pad_id] * counts[k]
                k += 1
            else:
                prompt.append(t)
        target = ex.target_ids if with_targets else []
        rows.append(prompt + target)
        labels.append([IGNORE] * len(prompt) + target)
        pools.append([0] * pool_start + [1] * (len(prompt) - pool_start) + [0] * len(target))
    width = max(len(r) for r in rows)
    pad = omni.tokenizer.pad_token_id if omni.tokenizer.pad_token_id is not None else 0

    def padded(seqs: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

    batch["input_ids"] = padded(rows, pad)
    batch["attention_mask"] = padded([[1] * len(r) for r in rows], 0)
    batch["labels"] = padded(labels, IGNORE)
    batch["pool_mask"] = padded(pools, 0)
    scored = [ex.scores for ex in examples if ex.scores is not None]
    if scored:
        blank = [0.0] * len(scored[0])
        batch["scores"] = torch.tensor([ex.scores if ex.scores is not None else blank for ex in examples], dtype=torch.float32)
        batch["score_mask"] = torch.tensor([ex.scores is not None for ex in examples])
    return batch


__all__ = ["SYSTEM", "DEFAULT_TASK", "AUDIO_MARK", "HeardTurn", "Example", "encode_dialogue", "target_ids", "collate"]
