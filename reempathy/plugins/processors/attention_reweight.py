"""Processor ``attention-reweight``: strengthen attention between the spoken and the hidden stream.

Rule (the paper's): while a hidden segment (reflection, thought) is generated, the keys of the
spoken segment just before it get factor α; while speaking, the keys of the most recent hidden
segment do. Scaling post-softmax weights by α and renormalising equals adding log α to those
keys' scores, so the plan is an additive bias that runs inside SDPA
(:mod:`reempathy.decoding.attention`). A third-party strategy gets this by labelling its
segments hidden or spoken; nothing here knows any strategy.
"""

from __future__ import annotations

import math
import re

from pydantic import BaseModel, Field, field_validator

from reempathy.backbones.base import Backbone
from reempathy.decoding.attention import KeyBias
from reempathy.decoding.session import DecodeSession
from reempathy.errors import ConfigError
from reempathy.hooks import hookimpl
from reempathy.options import STRICT

NAME = "attention-reweight"


class AttentionReweightOptions(BaseModel):
    """Options of ``attention-reweight`` (the paper: α 1.1–1.2 best, above 1.5 harmful; middle layers)."""

    model_config = STRICT

    factor: float = Field(
        1.15,
        ge=1e-3,
        le=1e3,
        description="α: multiply the target keys' attention weights by this; 0.001–1000, because log α is "
        "added to attention scores and must stay a finite bias (beyond these the target keys are all or "
        "nothing; the paper's useful range is 1.1–1.5)",
    )
    layers: str | list[int | str] | None = Field(
        None,
        description='layer indices and ranges, both ends included, e.g. "10-30" or [2, "5-7"]; or relative to the '
        'depth, so that a preset means the same on every backbone: "middle", "all", or fractions such as '
        '"0.25-0.75" (10-30 of 40 layers); default: "middle", depth/4 to 3·depth/4 inclusive (10-30 of 40, the paper\'s)',
    )
    heads: list[int] | dict[str, list[int]] | None = Field(
        None, description="heads to steer: a list for every chosen layer, or {layer: [heads]}; default all"
    )

    @field_validator("heads")
    @classmethod
    def _heads_keys(cls, v):
        if isinstance(v, dict):
            for k in v:
                if not str(k).isdigit():
                    raise ValueError(f"heads keys are layer indices, got {k!r}")
        return v


def middle_layers(depth: int) -> list[int]:
    """The default layers: depth/4 through 3·depth/4, both included — the paper's "10–30" of GLM-4-Voice's 40
    (21 layers: ranges here are inclusive, as in ``parse_layers``). Clipped to the model's last layer."""
    return list(range(depth // 4, min(depth - depth // 4, depth - 1) + 1))


def relative_layers(lo: float, hi: float, depth: int) -> list[int]:
    """Layers from fraction ``lo`` to fraction ``hi`` of the depth, both ends included.

    The lower end is ``floor(lo·depth)``, the upper ``depth - floor((1-hi)·depth)`` clipped to the
    last layer: ``0.25-0.75`` is exactly :func:`middle_layers` on every depth (10-30 of 40, 7-21 of
    28), ``0.25-0.5`` is 10-20 of 40, ``0.0-1.0`` every layer.
    """
    eps = 1e-9  # 0.3·10 is 2.9999999999999996 in binary floating point
    first = math.floor(lo * depth + eps)
    last = min(depth - math.floor((1.0 - hi) * depth + eps), depth - 1)
    return list(range(min(first, depth - 1), last + 1))


_FRACTION = r"(\d*\.\d+|\d+\.)"


def parse_layers(spec: str | list[int | str], depth: int) -> list[int]:
    """``"10-30"``, ``"3,5,7-9"``, ``[2, "5-7"]``, ``"middle"``, ``"all"`` or ``"0.25-0.75"`` → sorted layer indices.

    Integers are layer indices (ranges inclusive), checked against ``depth``; a range of fractions
    (with a decimal point) is relative to the depth (:func:`relative_layers`).
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: set[int] = set()
    for item in items:
        text = str(item).strip()
        if text in ("middle", "all"):
            out.update(middle_layers(depth) if text == "middle" else range(depth))
            continue
        rel = re.fullmatch(rf"{_FRACTION}\s*-\s*{_FRACTION}", text)
        if rel:
            lo, hi = float(rel[1]), float(rel[2])
            if not 0.0 <= lo < hi <= 1.0:
                raise ConfigError(
                    f"processor {NAME!r}: option 'layers': relative range {text!r} must run upwards within 0-1 "
                    '(fractions of the depth, e.g. "0.25-0.75"); use whole numbers for layer indices'
                )
            out.update(relative_layers(lo, hi, depth))
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", text)
        if not m:
            raise ConfigError(
                f"processor {NAME!r}: option 'layers': cannot read {text!r}; use layer indices such as \"10-30\" or "
                '[2, 5], fractions of the depth such as "0.25-0.75", "middle" or "all"'
            )
        lo, hi = (int(m[1]), int(m[2])) if m[1] is not None else (int(m[3]), int(m[3]))
        if lo > hi:
            raise ConfigError(f"processor {NAME!r}: option 'layers': range {text!r} runs backwards")
        if hi >= depth:
            raise ConfigError(
                f"processor {NAME!r}: option 'layers': layer {hi} is beyond the model's depth "
                f"({depth} layers, 0..{depth - 1}); a range relative to the depth (\"0.25-0.75\", \"middle\") "
                "means the same on every backbone"
            )
        out.update(range(lo, hi + 1))
    if not out:
        raise ConfigError(f"processor {NAME!r}: option 'layers' is empty")
    return sorted(out)


class AttentionReweight:
    """Plans an additive key bias of log α for the chosen layers (and heads) at each phase change."""

    def __init__(self, options: AttentionReweightOptions, backbone: Backbone) -> None:
        depth, n_heads = backbone.num_layers, backbone.num_heads
        if options.layers is None:
            layers = middle_layers(depth)  # 10..30 inclusive of 40, what the paper's "10-30" names
        else:
            layers = parse_layers(options.layers, depth)
        self.heads: dict[int, tuple[int, ...] | None] = {layer: None for layer in layers}
        if isinstance(options.heads, list):
            self._check_heads(options.heads, n_heads, "heads")
            self.heads = {layer: tuple(sorted(set(options.heads))) for layer in layers}
        elif isinstance(options.heads, dict):
            for key, hs in options.heads.items():
                layer = int(key)
                if layer not in self.heads:
                    raise ConfigError(
                        f"processor {NAME!r}: option 'heads.{key}': layer {layer} is not among the chosen layers {layers}"
                    )
                self._check_heads(hs, n_heads, f"heads.{key}")
                self.heads[layer] = tuple(sorted(set(hs)))
        self.bias = math.log(options.factor)
        self.layers = layers

    @staticmethod
    def _check_heads(heads: list[int], n_heads: int, option: str) -> None:
        bad = [h for h in heads if not 0 <= h < n_heads]
        if bad:
            raise ConfigError(
                f"processor {NAME!r}: option {option!r}: head {bad[0]} is out of range (the model has {n_heads} heads, 0..{n_heads - 1})"
            )

    @hookimpl
    def reempathy_attention_plan(self, session: DecodeSession) -> dict[int, list[KeyBias]] | None:
        if self.bias == 0.0:
            return None  # α = 1: leave attention exactly as it is
        target = session.last_segment(hidden=not session.hidden)
        if target is None or target.start == target.end:
            return None
        return {
            layer: [KeyBias(target.start, target.end, self.bias, heads)] for layer, heads in self.heads.items()
        }
