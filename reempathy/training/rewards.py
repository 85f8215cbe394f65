"""Rewards for on-policy training: an evaluator plugin's scores turned into one number per rollout, minus penalties.

Any evaluator (``empathyeval``, ``llm-judge``, ``keyword-empathy``, ``audio-stats``, a user's plugin)
scores the rollouts' spoken answers exactly as ``reempathy eval`` would score them (an
:class:`~reempathy.evaluation.base.EvalItem` per answer: the prompt's messages, the spoken text
and audio units). Where it decides:

- :func:`scalar_rule`: the number a rollout's :class:`~reempathy.evaluation.base.Evaluation`
  is worth — ``[reward.weights]`` (the weighted sum of the named scores) when given; otherwise the
  evaluator's registered ``reward`` function (``register(..., reward=fn)``, ``fn(evaluation) ->
  float | None``); otherwise its only score. An evaluator with several scores and neither is a
  config error that lists the scores. An evaluation with an error, a missing weighted score or a
  non-finite value is worth nothing (None): TRL gives such a rollout no advantage, and the run
  logs how many there were (``reward/failed``).
- :func:`penalty` (``[reward.penalties]``, all off by default), in tokens so that a rerun gives
  the same rewards: hidden tokens per spoken token, spoken tokens beyond a budget, and the
  *latency* — tokens decoded before the first token a listener hears (the first audio unit on a
  backbone that speaks audio, else the first spoken text token) beyond a budget.
- :class:`RewardFunction`: TRL's reward function: one evaluator call per batch of rollouts
  (every answer, and with chunk credit every prefix of every answer, in that one call).
- **chunk credit** (``[grpo] credit = "chunk"``, our extension, off by default): the prefix
  r1…rk after each spoken chunk k is scored as an answer of its own (as ``reflect-data`` asks an
  evaluator about each prefix), and :func:`chunk_advantages` gives each chunk-and-reflection
  segment the advantage of its prefix's reward within the group — the same normalisation as
  TRL's answer-level advantage (``scale_rewards``), per chunk index. A rollout that ended before
  chunk k stands in the baseline with its final reward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from reempathy.backbones.base import Backbone
from reempathy.decoding.result import DecodeResult
from reempathy.errors import ConfigError, PluginFailure, ReempathyError
from reempathy.evaluation.base import EvalItem, Evaluation
from reempathy.registry import Registry
from reempathy.training.evaluator_calls import call_evaluator
from reempathy.training.grpo_config import PenaltySettings, RewardSettings
from reempathy.training.trace import Trace

Scalar = Callable[[Evaluation], "float | None"]


@dataclass
class Rollout:
    """One sampled answer of a GRPO step: which prompt, its place in the group, the decoder's result and its trace."""

    prompt_id: str
    index: int
    messages: list[dict[str, Any]]
    result: DecodeResult
    trace: Trace

    def __repr__(self) -> str:  # TRL prints a rollout's fields when no reward could be computed for it
        return f"Rollout({self.prompt_id}#{self.index}, {len(self.trace.ids)} tokens, stop {self.result.stop_reason!r})"


def scalar_rule(settings: RewardSettings, registry: Registry, score_names: Sequence[str]) -> Scalar:
    """How an evaluation becomes one number (module docstring); a ConfigError when the config cannot say."""
    name = settings.evaluator
    if settings.weights is not None:
        unknown = sorted(set(settings.weights) - set(score_names))
        if unknown:
            raise ConfigError(f"reward.weights names {unknown[0]!r}, which evaluator {name!r} does not give; its scores: "
                              f"{', '.join(score_names) or '(none)'}")
        weights = dict(settings.weights)

        def weighted(evaluation: Evaluation) -> float | None:
            total = 0.0
            for key, w in weights.items():
                value = evaluation.scores.get(key)
                if not _number(value):
                    return None
                total += w * _as_number(value)  # type: ignore[operator]
            return total

        return weighted
    registered = registry.get("evaluator", name).reward
    if registered is not None:
        return registered
    if len(score_names) == 1:
        only = score_names[0]
        return lambda evaluation: _as_number(evaluation.scores.get(only))
    raise ConfigError(f"evaluator {name!r} gives {len(score_names)} scores ({', '.join(score_names) or 'none'}) and "
                      "registers no reward: say how they make one number with [reward.weights], e.g. "
                      f"{(score_names or ('score',))[0]} = 1.0")


def _as_number(value: Any) -> float | None:
    """``value`` as a finite float — a Python, numpy or 0-d tensor number — or None (missing, not a number, NaN, inf)."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one element
        return None
    return number if math.isfinite(number) else None


def _number(value: Any) -> bool:
    return _as_number(value) is not None


def _is_non_finite(value: Any) -> bool:
    """A number that is NaN or infinite (an answer worth nothing, as an evaluation error is)."""
    try:
        return not isinstance(value, (bool, str, bytes)) and not math.isfinite(float(value))
    except (TypeError, ValueError, RuntimeError):
        return False


def first_heard(trace: Trace, backbone: Backbone) -> int:
    """Tokens of the answer decoded before the first one a listener hears (the whole answer when none is)."""
    speaks_audio = backbone.layout.audio_count > 0 and backbone.stream.audio_tokens > 0
    heard = "spoken_audio" if speaks_audio else "spoken_text"
    for pos, label in enumerate(trace.labels):
        if label == heard:
            return pos
    return len(trace.labels)


def penalty(settings: PenaltySettings, rollout: Rollout, backbone: Backbone) -> dict[str, float]:
    """Each penalty of ``[reward.penalties]`` this rollout pays (only those switched on)."""
    out: dict[str, float] = {}
    spoken = rollout.result.counts.spoken
    if settings.hidden_per_spoken:
        out["hidden_per_spoken"] = settings.hidden_per_spoken * rollout.trace.hidden_count / max(spoken, 1)
    if settings.length:
        out["length"] = settings.length * max(0, spoken - settings.length_budget)
    if settings.latency:
        out["latency"] = settings.latency * max(0, first_heard(rollout.trace, backbone) - settings.latency_budget)
    return out


@dataclass
class Segments:
    """A rollout cut into chunk-and-reflection segments: completion positions ``[starts[k], starts[k+1])``."""

    starts: list[int]
    prefixes: list[tuple[str, list[int]]]  # (spoken text, audio units) of the answer up to the end of chunk k


def segments(rollout: Rollout, backbone: Backbone) -> Segments:
    """Segment k begins where spoken chunk k begins (the first at the answer's start) and runs to the next one."""
    offset = len(rollout.result.prompt_ids)
    chunks = rollout.result.chunks
    if not chunks:
        return Segments([0], [("", [])])
    starts = [0] + [c.start - offset for c in chunks[1:]]
    prefixes = []
    text_ids: list[int] = []
    units: list[int] = []
    for c in chunks:
        text_ids += c.text_ids
        units += c.audio_units
        prefixes.append((backbone.decode_text(text_ids), list(units)))
    return Segments(starts, prefixes)


@dataclass
class ChunkScores:
    """The per-segment rewards of the latest batch of rollouts, for :func:`chunk_advantages`."""

    rewards: list[list[float]] = field(default_factory=list)  # per rollout, per segment (NaN: not scored)
    starts: list[list[int]] = field(default_factory=list)


class RewardFunction:
    """TRL's reward function: rollouts in, one reward per rollout out (None when it could not be scored)."""

    def __init__(self, settings: RewardSettings, evaluator: Any, scalar: Scalar, backbone: Backbone, chunk_credit: bool) -> None:
        self.settings = settings
        self.evaluator = evaluator
        self.scalar = scalar
        self.backbone = backbone
        self.chunk_credit = chunk_credit
        self.latest = ChunkScores()
        # TRL names its reward metrics after the function: rewards/<evaluator>/mean
        self.__name__ = settings.evaluator

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Any],
                 rollout: Sequence[Rollout], log_metric: Callable[[str, float], None] | None = None, **_: Any) -> list[float | None]:
        cuts = [segments(r, self.backbone) if self.chunk_credit else None for r in rollout]
        items: list[EvalItem] = []
        for r, cut in zip(rollout, cuts):
            base = f"{r.prompt_id}#{r.index}"
            if cut is None:
                items.append(EvalItem(base, r.messages, r.result.spoken_text, list(r.result.audio_units)))
            else:
                items += [EvalItem(f"{base}@{k + 1}", r.messages, text, units) for k, (text, units) in enumerate(cut.prefixes)]
        evaluations = iter(call_evaluator(self.evaluator, self.settings.evaluator, items))
        rewards: list[float | None] = []
        self.latest = ChunkScores()
        failed = 0
        paid: dict[str, float] = {}
        for r, cut in zip(rollout, cuts):
            fine = penalty(self.settings.penalties, r, self.backbone)
            for key, value in fine.items():
                paid[key] = paid.get(key, 0.0) + value
            minus = sum(fine.values())
            scores = [self._value(next(evaluations)) for _ in (cut.prefixes if cut is not None else [None])]
            per_segment = [math.nan if s is None else s - minus for s in scores]
            final = per_segment[-1]
            failed += math.isnan(final)
            rewards.append(None if math.isnan(final) else final)
            if cut is not None:
                self.latest.rewards.append(per_segment)
                self.latest.starts.append(cut.starts)
        if log_metric is not None:
            log_metric("reward/failed", failed / max(len(rollout), 1))
            for key, value in paid.items():
                log_metric(f"penalty/{key}", value / max(len(rollout), 1))
        return rewards

    def _value(self, evaluation: Evaluation) -> float | None:
        if evaluation.error:
            return None
        try:
            value = self.scalar(evaluation)
        except ReempathyError:
            raise
        except Exception as exc:  # a plugin's reward function failed: its name, not a traceback
            raise PluginFailure(self.settings.evaluator, "reward", exc) from exc
        if value is None:
            return None
        number = _as_number(value)
        if number is None and not _is_non_finite(value):  # a string, a list: the reward function is wrong, say so
            raise PluginFailure(self.settings.evaluator, "reward",
                                TypeError(f"the reward is {value!r} ({type(value).__name__}), not a number or None"))
        return number


def chunk_advantages(
    scores: ChunkScores, group: int, width: int, scale: str,
) -> torch.Tensor:
    """Per-token advantages ``[rollouts, width]``: each segment's tokens get its prefix reward's group advantage.

    ``scale`` is TRL's ``scale_rewards``: ``group`` divides by the std of the group's rewards at
    that chunk index, ``batch`` by the std of every reward in the batch, ``none`` not at all.
    """
    n = len(scores.rewards)
    out = torch.zeros((n, width), dtype=torch.float32)
    every = [v for row in scores.rewards for v in row if not math.isnan(v)]
    batch_std = float(torch.tensor(every).std()) if len(every) > 1 else 0.0
    for g0 in range(0, n, group):
        rows = list(range(g0, min(g0 + group, n)))
        depth = max(len(scores.rewards[i]) for i in rows)
        for k in range(depth):
            at = torch.tensor([scores.rewards[i][min(k, len(scores.rewards[i]) - 1)] for i in rows])
            valid = at[~torch.isnan(at)]
            if valid.numel() == 0:
                continue
            mean = float(valid.mean())
            std = float(valid.std()) if valid.numel() > 1 else 0.0
            divisor = {"group": std, "batch": batch_std}.get(scale)
            for i in rows:
                if k >= len(scores.rewards[i]) or math.isnan(scores.rewards[i][k]):
                    continue
                advantage = scores.rewards[i][k] - mean
                if divisor is not None:
                    advantage /= divisor + 1e-4
                starts = scores.starts[i]
                end = starts[k + 1] if k + 1 < len(starts) else width
                out[i, starts[k] : end] = advantage
    return out  # TRL multiplies by the completion and env masks itself


__all__ = [
    "Rollout", "RewardFunction", "Scalar", "scalar_rule", "penalty", "first_heard", "segments", "Segments",
    "ChunkScores", "chunk_advantages",
]
