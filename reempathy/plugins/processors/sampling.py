"""Sampling controls as logits processors: repetition penalty, temperature, top-k, top-p.

Each changes the float32 logits in place. The ``[sampling]`` table of a config adds them in this
order after the configured processors; they can also be listed under ``[[processors]]``.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from reempathy.backbones.base import Backbone
from reempathy.decoding.session import DecodeSession
from reempathy.hooks import hookimpl


class TemperatureOptions(BaseModel):
    """``temperature``: divide the logits by ``value``."""

    model_config = ConfigDict(extra="forbid")
    value: float = Field(1.0, gt=0.0)


class TopKOptions(BaseModel):
    """``top-k``: keep the ``k`` highest logits."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(50, ge=1)


class TopPOptions(BaseModel):
    """``top-p``: keep the smallest set of tokens whose probability reaches ``p``."""

    model_config = ConfigDict(extra="forbid")
    p: float = Field(0.9, gt=0.0, le=1.0)


class RepetitionPenaltyOptions(BaseModel):
    """``repetition-penalty``: make tokens already in the sequence less likely (CTRL-style, as in transformers)."""

    model_config = ConfigDict(extra="forbid")
    penalty: float = Field(1.1, gt=0.0)


class Temperature:
    def __init__(self, options: TemperatureOptions, backbone: Backbone) -> None:
        self.inv = 1.0 / options.value

    @hookimpl
    def reempathy_logits(self, session: DecodeSession, logits: torch.Tensor) -> None:
        if self.inv != 1.0:
            logits.mul_(self.inv)


class TopK:
    def __init__(self, options: TopKOptions, backbone: Backbone) -> None:
        self.k = options.k

    @hookimpl
    def reempathy_logits(self, session: DecodeSession, logits: torch.Tensor) -> None:
        if self.k >= logits.shape[-1]:
            return
        kth = torch.topk(logits, self.k).values[-1]
        logits.masked_fill_(logits < kth, float("-inf"))


class TopP:
    def __init__(self, options: TopPOptions, backbone: Backbone) -> None:
        self.p = options.p

    @hookimpl
    def reempathy_logits(self, session: DecodeSession, logits: torch.Tensor) -> None:
        if self.p >= 1.0:
            return
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the tokens before it already reach p; the top token always stays.
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= self.p
        drop = torch.zeros_like(drop_sorted).scatter_(0, order, drop_sorted)
        logits.masked_fill_(drop, float("-inf"))


class RepetitionPenalty:
    def __init__(self, options: RepetitionPenaltyOptions, backbone: Backbone) -> None:
        self.penalty = options.penalty

    @hookimpl
    def reempathy_logits(self, session: DecodeSession, logits: torch.Tensor) -> None:
        if self.penalty == 1.0:
            return
        seen = torch.tensor(sorted(set(session.ids)), device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals < 0, vals * self.penalty, vals / self.penalty)


SAMPLING_PROCESSORS = {
    "repetition-penalty": (RepetitionPenalty, RepetitionPenaltyOptions, "penalise tokens already in the sequence"),
    "temperature": (Temperature, TemperatureOptions, "divide logits by a temperature"),
    "top-k": (TopK, TopKOptions, "keep the k most likely tokens"),
    "top-p": (TopP, TopPOptions, "nucleus sampling: keep tokens up to cumulative probability p"),
}
