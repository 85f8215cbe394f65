"""EmpathyEval's trainable parts: four regression heads on pooled hidden states, and the joint loss.

Where it decides:

- Pooling: the mean of the thinker's last hidden states over the dialogue (both turns' audio or
  text) and the task, never over the fixed system preamble nor the assessment, so that scoring
  needs no generated text and scores and text can be asked for separately.
- Heads: one linear layer per dimension, biased to 3 (the middle of the 1–5 scale) at the start.
  Predictions are clipped to 1–5 when reported, never during training.
- Loss: ``lm_weight`` × next-token cross-entropy on the assessment tokens + ``score_weight`` ×
  MSE on the scores of the records that have them (a record may have only one of the two).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from reempathy.evaluation.base import SCORE_MAX, SCORE_MIN
from reempathy.evaluation.empathyeval.prompt import IGNORE


class ScoreHeads(nn.Module):
    """One ``Linear(hidden, 1)`` per score name; ``forward`` gives ``[batch, len(names)]``."""

    def __init__(self, hidden_size: int, names: Sequence[str]) -> None:
        super().__init__()
        self.names = tuple(names)
        self.heads = nn.ModuleDict({n: nn.Linear(hidden_size, 1) for n in self.names})
        for head in self.heads.values():
            nn.init.normal_(head.weight, std=0.02)
            nn.init.constant_(head.bias, (SCORE_MIN + SCORE_MAX) / 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.heads[n](pooled) for n in self.names], dim=-1)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where ``mask`` is 1, in float32."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (0 when none are labelled)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    if not (shift_labels != IGNORE).any():
        return shift_logits.sum() * 0.0
    return nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE
    )


class EmpathyEvalModel(nn.Module):
    """The thinker (LoRA-wrapped when training) plus the score heads."""

    def __init__(self, thinker: Any, heads: ScoreHeads, lm_weight: float = 1.0, score_weight: float = 1.0) -> None:
        super().__init__()
        self.thinker = thinker
        self.heads = heads
        self.lm_weight = lm_weight
        self.score_weight = score_weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pool_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
        score_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``predictions`` ``[batch, 4]``; with labels/scores also ``lm_loss``, ``score_loss`` and ``loss``."""
        kwargs = {}
        if input_features is not None:
            kwargs = {"input_features": input_features, "feature_attention_mask": feature_attention_mask}
        out = self.thinker(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False, **kwargs
        )
        pooled = masked_mean(out.hidden_states[-1], pool_mask)
        predictions = self.heads(pooled.to(next(self.heads.parameters()).dtype)).float()
        result = {"predictions": predictions}
        zero = predictions.sum() * 0.0
        text_loss = lm_loss(out.logits, labels) if labels is not None else zero
        if scores is not None and score_mask is not None and score_mask.any():
            score_loss = ((predictions[score_mask] - scores[score_mask]) ** 2).mean()
        else:
            score_loss = zero
        result.update(lm_loss=text_loss, score_loss=score_loss, loss=self.lm_weight * text_loss + self.score_weight * score_loss)
        return result


def clip_score(x: float) -> float:
    """A prediction on the 1–5 scale."""
    return float(min(SCORE_MAX, max(SCORE_MIN, x)))


__all__ = ["ScoreHeads", "EmpathyEvalModel", "masked_mean", "lm_loss", "clip_score"]
