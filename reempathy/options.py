"""Field types shared by the option models of configs, plugins and command-line flags.

Configs are TOML, which has real types, so option models are strict (:data:`STRICT`):
``text_tokens = true`` is not 1, ``greedy = "yes"`` is not true, ``1.0`` is not an integer;
NaN and infinity are refused where a number is expected. Seeds and sizes carry bounds, so a
value torch or numpy cannot take (``2**63``, a model of ``2**63 - 1`` layers) is refused while
the config is read, with the option's name, instead of overflowing deep inside a library.
"""

from __future__ import annotations

import argparse
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
"""The model config of every built-in option model: unknown keys, loose types, NaN and infinity refused."""


class PluginOptions(BaseModel):
    """Base class of a plugin's option model, strict like the built-ins' (:data:`STRICT`).

    Subclass it and declare the options as fields (``spoken: int = Field(8, ge=1, description=…)``):
    an unknown option is an error that lists the valid ones, ``true`` is not 1, ``4.0`` is not an
    integer (an integer is accepted for a float), NaN and infinity are refused — the rules of
    docs/config.md, worded as docs/errors.md says, for a plugin's options as for reempathy's own.
    """

    model_config = STRICT

MAX_SEGMENT = 2**20
"""Upper bound of segment sizes (chunk slots, reflection and thought caps): beyond any context, far below overflow."""

SEED_LIMIT = 2**63
"""Decode and speech seeds are below this (torch generators take 64-bit seeds; results store them as JSON integers)."""

TRAIN_SEED_LIMIT = 2**32
"""Training seeds are below this: ``transformers.set_seed`` also seeds numpy, which takes 32-bit seeds."""

Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT, description="a seed, 0 <= seed < 2**63")]
TrainSeed = Annotated[int, Field(ge=0, lt=TRAIN_SEED_LIMIT, description="a seed, 0 <= seed < 2**32")]
Count = Annotated[int, Field(ge=1, lt=2**31, description="a count of tokens or steps, 1 to 2**31 - 1")]

# Sampling bounds, shared by the sampling processors, [sampling] and the backbones' own sampling
# options (the Qwen2.5-Omni talker's, hf-interleaved's defaults): each keeps a scaled float32 logit
# finite (|logit| far below 3e38), so an option that could only overflow is refused where it is read.
Temperature = Annotated[
    float,
    Field(
        ge=1e-3,
        le=1e3,
        description="0.001–1000: below 0.001 sampling is greedy in effect (use greedy = true) and logits "
        "overflow; above 1000 it is uniform in effect",
    ),
]
TopK = Annotated[int, Field(ge=0, lt=2**31, description="keep the k most likely tokens; 0 turns top-k off")]
TopP = Annotated[
    float,
    Field(
        ge=1e-6,
        le=1.0,
        description="1e-6–1: smaller values keep only the most likely token anyway (and are below float32's "
        "resolution of a cumulative probability); use greedy = true",
    ),
]
RepetitionPenalty = Annotated[
    float,
    Field(
        ge=1e-2,
        le=1e2,
        description="0.01–100 (1 = off, above 1 penalises): beyond these a seen token's logit is scaled "
        "out of any sensible range, towards overflow",
    ),
]


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str, what: str = "the text") -> str:
    """``text`` if it is valid Unicode; ValueError naming the position of a lone surrogate otherwise.

    A lone surrogate is what Python makes of bytes that are not UTF-8 (a command-line argument
    such as ``$'\\xff'``) or of a JSON escape such as ``"\\ud800"``; no tokenizer can encode it.
    """
    match = _SURROGATE.search(text)
    if match:
        raise ValueError(
            f"{what} is not valid Unicode at character {match.start() + 1} (bytes that are not UTF-8, "
            "or a lone surrogate escape); give UTF-8 text"
        )
    return text


Text = Annotated[str, AfterValidator(check_text)]
"""A pydantic field type for text that reaches a tokenizer: lone surrogates are refused."""


def seed_arg(text: str) -> int:
    """argparse ``type=`` for seed flags: an integer in ``[0, 2**63)``."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give an integer, e.g. 42") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"seed {text} is out of range; give 0 <= seed < 2**63")
    return value


def count_arg(text: str) -> int:
    """argparse ``type=`` for counts (tokens, steps): an integer of at least 1 and at most 2**31 - 1."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: give a whole number, e.g. 64") from None
    if not 1 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"{text} is out of range; give a whole number from 1 to {2**31 - 1}")
    return value


__all__ = [
    "PluginOptions",
    "Text",
    "check_text",
    "STRICT",
    "MAX_SEGMENT",
    "SEED_LIMIT",
    "TRAIN_SEED_LIMIT",
    "Seed",
    "TrainSeed",
    "Count",
    "Temperature",
    "TopK",
    "TopP",
    "RepetitionPenalty",
    "seed_arg",
    "count_arg",
]
