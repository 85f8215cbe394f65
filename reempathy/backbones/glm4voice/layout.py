"""Where GLM-4-Voice's text, control and audio tokens live, and where our delimiter tokens go.

Delimiters (``<|begin_of_reflection|>``, ``<|end_of_reflection|>``, ``<|begin_of_thought|>``,
``<|end_of_thought|>``): the published vocabulary has none, so they are added as special tokens
with the next free ids after the largest existing id. In glm-4-voice-9b the largest id is
``<|audio_16383|>`` = 151552 + 16383 = 167935, so they become 167936–167939. Its
``padded_vocab_size`` of 168960 leaves 1024 embedding rows above the last audio token that no
token uses; the delimiters take four of them and the embedding matrix is not resized. Those
rows were never trained, so the delimiters carry no meaning until a ReEmpathy/CoT checkpoint
is trained (LoRA with trainable tokens). Only when a checkpoint has no spare rows are the
embedding and output matrices grown, with new rows set to the mean of the existing ones.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from reempathy.backbones.base import DELIMITER_TOKENS, VocabLayout
from reempathy.backbones.glm4voice.tokenizer import AddedSpec
from reempathy.errors import CheckpointError

AUDIO_TOKEN = re.compile(r"<\|audio_(\d+)\|>")
USER_TOKEN = "<|user|>"
# Control tokens the published chat format cannot do without.
REQUIRED_CONTROL = (
    "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_audio|>", "<|end_of_audio|>",
)  # fmt: skip


def audio_range(added: Mapping[str, int], source: str) -> tuple[int, int]:
    """``(id of <|audio_0|>, number of audio tokens)``; the ``<|audio_N|>`` ids must be consecutive."""
    units = {}
    for content, token_id in added.items():
        m = AUDIO_TOKEN.fullmatch(content)
        if m:
            units[int(m.group(1))] = token_id
    if not units:
        raise CheckpointError(f"{source} declares no <|audio_N|> tokens; this is not a GLM-4-Voice tokenizer")
    if 0 not in units:
        raise CheckpointError(f"{source} declares audio tokens but no <|audio_0|>; the tokenizer config is incomplete")
    offset = units[0]
    for unit in range(len(units)):
        if units.get(unit) != offset + unit:
            found = "missing" if unit not in units else f"id {units[unit]}"
            raise CheckpointError(
                f"{source}: <|audio_{unit}|> is {found}, expected id {offset + unit}; audio token ids must be "
                "consecutive from <|audio_0|>, the tokenizer config is corrupt"
            )
    return offset, len(units)


def plan_delimiters(existing: Mapping[str, int], names: Iterable[str] = DELIMITER_TOKENS) -> list[AddedSpec]:
    """Special tokens for the ``names`` not in ``existing``, with ids after the largest existing id."""
    next_id = max(existing.values()) + 1
    planned = []
    for name in names:
        if name not in existing:
            planned.append(AddedSpec(name, next_id, True))
            next_id += 1
    return planned


def stop_ids(added: Mapping[str, int], eos: int | list[int] | None) -> tuple[int, ...]:
    """``<|user|>`` first (the published demo stops there), then the configured eos ids, without repeats."""
    ids = [added[USER_TOKEN]] if USER_TOKEN in added else []
    for i in [eos] if isinstance(eos, int) else list(eos or []):
        if i not in ids:
            ids.append(int(i))
    return tuple(ids)


def build_layout(
    added: Mapping[str, int], text_end: int, vocab_rows: int, eos: int | list[int] | None, source: str
) -> VocabLayout:
    """The ``VocabLayout`` of a GLM-4-Voice tokenizer whose added tokens are ``added`` (content → id)."""
    offset, count = audio_range(added, source)
    if offset + count > vocab_rows or max(added.values()) >= vocab_rows:
        raise CheckpointError(
            f"{source} has token ids up to {max(added.values())}, but the model has only {vocab_rows} "
            "embedding rows; the tokenizer does not belong to these weights"
        )
    special = {c: i for c, i in added.items() if not AUDIO_TOKEN.fullmatch(c)}
    missing = [t for t in REQUIRED_CONTROL if t not in special]
    if missing:
        raise CheckpointError(f"{source} lacks control tokens {missing}; this is not a GLM-4-Voice tokenizer")
    missing = [d for d in DELIMITER_TOKENS if d not in special]
    if missing:
        raise CheckpointError(f"{source} lacks delimiter tokens {missing}; add them before building the layout")
    return VocabLayout(
        vocab_size=vocab_rows,
        text_end=text_end,
        audio_offset=offset,
        audio_count=count,
        special=special,
        stop_ids=stop_ids(added, eos),
    )
