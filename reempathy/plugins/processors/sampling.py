"""Sampling controls as logits processors: repetition penalty, temperature, top-k, top-p.

Each changes the float32 logits in place. The ``[sampling]`` table of a config adds them in this
order after the configured processors; they can also be listed under ``[[processors]]``.

Option bounds keep every scaled logit finite in float32 (|logit| stays far below 3e38): a
temperature of 1e-300 or a penalty of 1e-300 would turn logits into inf and the probabilities
into NaN; the loop refuses logits that allow no token (:func:`reempathy.decoding.row.choose`), but
an option that can only produce that is refused where it is read.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from reempathy.backbones.base import Backbone
from reempathy.decoding.session import DecodeSession
from reempathy.decoding.transfer import to_device
from reempathy.hooks import hookimpl
from reempathy.options import STRICT
from reempathy.options import RepetitionPenalty as RepetitionPenaltyValue
from reempathy.options import Temperature as TemperatureValue
from reempathy.options import TopP as TopPValue


class TemperatureOptions(BaseModel):
    """``temperature``: divide the logits by ``value``."""

    model_config = STRICT
    value: TemperatureValue = 1.0


class TopKOptions(BaseModel):
    """``top-k``: keep the ``k`` highest logits."""

    model_config = STRICT
    k: int = Field(50, ge=1, lt=2**31)


class TopPOptions(BaseModel):
    """``top-p``: keep the smallest set of tokens whose probability reaches ``p``."""

    model_config = STRICT
    p: TopPValue = 0.9


class RepetitionPenaltyOptions(BaseModel):
    """``repetition-penalty``: make tokens already in the sequence less likely (CTRL-style, as in transformers)."""

    model_config = STRICT
    penalty: RepetitionPenaltyValue = 1.1


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
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach p; the top token always stays
        # (also when p is below float32's resolution and the comparison would drop everything).
        drop_sorted = (probs.cumsum(-1) - probs) >= self.p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(0, order, drop_sorted)
        logits.masked_fill_(drop, float("-inf"))


class RepetitionPenalty:
    """Keeps the distinct ids seen so far in a buffer, adding only the new tail of ``session.ids`` each step.

    Rebuilding ``set(session.ids)`` every step cost O(sequence) per token; now each token is
    looked at once (a set lookup), and a step gathers and scatters only the distinct seen ids.
    """

    def __init__(self, options: RepetitionPenaltyOptions, backbone: Backbone) -> None:
        self.penalty = options.penalty
        self._session: object | None = None
        self._read = 0  # how much of session.ids is folded into the seen ids
        self._seen: set[int] = set()
        self._ids: torch.Tensor | None = None  # distinct seen ids, first `_count` entries valid
        self._count = 0

    def _update(self, session: DecodeSession, device: torch.device) -> torch.Tensor:
        if session is not self._session:  # a new answer (or another session object): start over
            self._session, self._read, self._seen, self._count = session, 0, set(), 0
            self._ids = None
        ids = session.ids
        new = []
        for token in ids[self._read :]:
            if token not in self._seen:
                self._seen.add(token)
                new.append(token)
        self._read = len(ids)
        if new:
            needed = self._count + len(new)
            if self._ids is None or self._ids.shape[0] < needed or self._ids.device != device:
                grown = torch.empty(max(64, 2 * needed), dtype=torch.long, device=device)
                if self._ids is not None:
                    grown[: self._count] = self._ids[: self._count].to(device)
                self._ids = grown
            self._ids[self._count : needed] = to_device(new, device)  # queued, no host-device round trip
            self._count = needed
        return self._ids[: self._count]  # type: ignore[index]

    @hookimpl
    def reempathy_logits(self, session: DecodeSession, logits: torch.Tensor) -> None:
        if self.penalty == 1.0:
            return
        seen = self._update(session, logits.device)
        if not self._count:
            return
        vals = logits.index_select(0, seen)
        logits.index_copy_(0, seen, torch.where(vals < 0, vals * self.penalty, vals / self.penalty))


SAMPLING_PROCESSORS = {
    "repetition-penalty": (RepetitionPenalty, RepetitionPenaltyOptions, "penalise tokens already in the sequence"),
    "temperature": (Temperature, TemperatureOptions, "divide logits by a temperature"),
    "top-k": (TopK, TopKOptions, "keep the k most likely tokens"),
    "top-p": (TopP, TopPOptions, "nucleus sampling: keep tokens up to cumulative probability p"),
}
