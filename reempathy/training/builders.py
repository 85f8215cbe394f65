"""Per-strategy sequence builders: one dataset record → the token sequence the model is trained on.

Every builder returns the prompt (masked out of the loss with -100) followed by the answer in
the layout its decoding strategy produces, and a label per position (prompt, spoken_text,
spoken_audio, control, reflection, thought):

- ``sft``:       prompt → spoken answer → stop
- ``cotbs``:     prompt → THOUGHT_OPEN reasoning THOUGHT_CLOSE → spoken answer → stop
                 (the reasoning is the record's assessment text)
- ``reempathy``: prompt → r1 RO f1 RC r2 RO f2 RC … → stop
                 (r = spoken chunks of :func:`split_spoken`; a reflection follows every *full*
                 chunk, exactly where the decoding strategy forces RO. f_k is the record's k-th
                 per-chunk reflection, or a piece of its assessment cut at sentence, then word
                 boundaries; with ``reflection_tokens`` every f_k is fitted to exactly that many
                 tokens — all decided in :mod:`reempathy.training.reflections`.
                 The stop token comes after the last full chunk's reflection when the answer
                 ends on a chunk boundary, else right after the shorter last chunk, because the
                 decoder allows the stop token, never RO, inside a chunk. ``reflect = false``
                 keeps the chunking and leaves the reflections out)
- ``dpo``:       a preference pair of spoken answers (sft layout) to one prompt.

The spoken answer of ``sft``/``cotbs``/``dpo`` is interleaved as the backbone streams it
(``backbone.stream``: GLM-4-Voice's 13 text then 26 audio tokens, audio only once the text
ends); this is the same state machine as the spoken chunks, with the stream's sizes. The stop
token is the backbone's first stop id (``<|user|>`` for GLM-4-Voice layouts).

A backbone whose spoken stream is text only (``backbone.stream.audio_tokens == 0``, Qwen2.5-Omni)
gets the same sequences without audio: spoken chunks of text tokens only (``reempathy``'s
``audio_tokens`` is 0 there), the answer's text is required and its units are not used, and a
user message is read as its text (such a backbone has no audio-unit tokens to hear units with).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from pydantic import BaseModel, Field

from reempathy.backbones.base import (
    REFLECTION_CLOSE,
    REFLECTION_OPEN,
    THOUGHT_CLOSE,
    THOUGHT_OPEN,
    Backbone,
)
from reempathy.decoding.spans import CONTROL, PROMPT, SPOKEN_AUDIO, SPOKEN_TEXT
from reempathy.errors import InputError
from reempathy.options import STRICT
from reempathy.decoding.chunking import DEFAULT_AUDIO_TOKENS, ChunkLayout, layout_for_stream, split_spoken
from reempathy.data.dialogue import prompt_turn, split_record
from reempathy.data.records import BadRecord, RecordSet, SourcedRecord, bad_records_message
from reempathy.training.reflections import fit_to_length, reflection_texts, space_token
from reempathy.data.schema import Answer, Message

IGNORE_INDEX = -100
REFLECTION = "reflection"
THOUGHT = "thought"


# --- options, one model per strategy ------------------------------------------------------


class SftBuild(BaseModel):
    """``sft`` has no options."""

    model_config = STRICT


class CotbsBuild(BaseModel):
    """``cotbs`` has no options: the reasoning is the record's assessment text."""

    model_config = STRICT


class ReempathyBuild(BaseModel):
    """``reempathy``: the spoken-chunk layout and whether reflections are written."""

    model_config = STRICT

    text_tokens: int = Field(5, ge=1, description="text slots of a spoken chunk")
    audio_tokens: int | None = Field(
        None, ge=0, description="audio slots of a spoken chunk; default 10, or 0 for a text-only spoken stream"
    )
    reflect: bool = Field(True, description="false: the same chunking without reflections")
    reflection_tokens: int | None = Field(
        None, ge=1, description="fixed-length reflections: each cut or padded to exactly this many tokens (decoding's mode)"
    )

    def chunk_layout(self, backbone: Backbone | None = None) -> ChunkLayout:
        """The layout, checked against ``backbone``'s spoken stream when given (as the decoding strategy checks it)."""
        if backbone is None:
            return ChunkLayout(self.text_tokens, DEFAULT_AUDIO_TOKENS if self.audio_tokens is None else self.audio_tokens)
        return layout_for_stream(backbone.stream, backbone.name, self.text_tokens, self.audio_tokens, "strategy 'reempathy'")


class DpoBuild(BaseModel):
    """``dpo``: preference pairs of spoken answers; ``beta`` is DPO's temperature."""

    model_config = STRICT

    beta: float = Field(0.1, gt=0.0)


# --- what a builder returns ------------------------------------------------------------------


@dataclass
class TrainingSequence:
    """One training sequence: ids, loss labels (prompt = -100) and a span label per position."""

    input_ids: list[int]
    labels: list[int]
    spans: list[str]
    prompt_len: int
    where: str = ""


@dataclass
class PreferencePair:
    """A DPO pair: one prompt, the chosen and the rejected answer (ids after the prompt)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_spans: list[str]
    rejected_spans: list[str]
    where: str = ""
    swapped: bool = False  # True when the scores made the record's `rejected` answer the chosen one


@dataclass
class _Builder:
    ids: list[int] = field(default_factory=list)
    spans: list[str] = field(default_factory=list)

    def add(self, ids: Sequence[int], label: str) -> None:
        self.ids.extend(ids)
        self.spans.extend([label] * len(ids))

    def add_spoken(self, ids: Sequence[int], backbone: Backbone) -> None:
        for i in ids:
            self.add([i], SPOKEN_AUDIO if backbone.layout.is_audio(i) else SPOKEN_TEXT)


# --- shared pieces ---------------------------------------------------------------------------


def encode_text(backbone: Backbone, text: str, where: str, what: str) -> list[int]:
    """Text ids of ``text``; special tokens written in the text are refused (they would act as controls)."""
    ids = list(backbone.tokenizer.encode(text, add_special_tokens=False))
    if any(not backbone.layout.is_text(i) for i in ids):
        raise InputError(f"{where}: the {what} contains special-token text such as '<|...|>'; remove it")
    return ids


def prompt_ids(sr: SourcedRecord, backbone: Backbone) -> list[int]:
    """Token ids of the record's prompt (every message before the answer)."""
    context, _ = split_record(sr)
    return backbone.build_prompt([prompt_turn(m, backbone.layout.audio_count > 0) for m in context])


def spoken_chunks(answer: Message, backbone: Backbone, layout: ChunkLayout, where: str, what: str = "answer") -> list[list[int]]:
    """The answer's text and audio tokens laid out in chunks of ``layout`` as decoding emits them."""
    if layout.text_only:
        if not answer.text:
            raise InputError(f"{where}: the {what} has no text; backbone {backbone.name!r} speaks text only")
        return split_spoken(encode_text(backbone, answer.text, where, f"{what} text"), [], layout)
    if not answer.units:
        raise InputError(f"{where}: the {what} has no audio units; a spoken answer needs them")
    text_ids = encode_text(backbone, answer.text, where, f"{what} text") if answer.text else []
    audio_ids = [backbone.layout.unit_to_token(u) for u in answer.units]
    try:
        return split_spoken(text_ids, audio_ids, layout)
    except ValueError:
        raise InputError(
            f"{where}: the {what} cannot be laid out in {layout.text_tokens}+{layout.audio_tokens} chunks: "
            f"its {len(text_ids)} text tokens need more than its {len(audio_ids)} audio units "
            f"(about {layout.audio_tokens / layout.text_tokens:g} per text token)"
        ) from None


def stream_layout(backbone: Backbone) -> ChunkLayout:
    """The backbone's text:audio interleave as a chunk layout."""
    return ChunkLayout(backbone.stream.text_tokens, backbone.stream.audio_tokens)


def reflection_ids(
    sr: SourcedRecord, backbone: Backbone, options: ReempathyBuild, chunk_layout: ChunkLayout, full_chunks: int
) -> list[list[int]]:
    """The token ids of the ``full_chunks`` reflections of a record (rules in :mod:`reempathy.training.reflections`)."""
    record = sr.record
    layout = f"{chunk_layout.text_tokens}+{chunk_layout.audio_tokens}"
    texts = reflection_texts(
        record.reflections,
        record.reflections_layout,
        record.assessment.text if record.assessment else None,
        full_chunks,
        lambda word: len(backbone.tokenizer.encode(word, add_special_tokens=False)),
        sr.where,
        layout,
    )
    own = record.reflections is not None and record.reflections_layout in (None, layout)
    what = "reflection" if own else "assessment text"
    encode = lambda text: encode_text(backbone, text, sr.where, what)  # noqa: E731
    if options.reflection_tokens is None:
        return [encode(text) for text in texts]
    filler = space_token(backbone)
    return [fit_to_length(text, options.reflection_tokens, encode, filler) for text in texts]


def _assessment_text(sr: SourcedRecord, strategy: str, role: str) -> str:
    if sr.record.assessment is None:
        raise InputError(f"{sr.where}: strategy {strategy!r} needs the record's assessment (its text is the {role})")
    return sr.record.assessment.text


def _finish(prompt: list[int], body: _Builder, where: str) -> TrainingSequence:
    ids = prompt + body.ids
    labels = [IGNORE_INDEX] * len(prompt) + list(body.ids)
    return TrainingSequence(ids, labels, [PROMPT] * len(prompt) + body.spans, len(prompt), where)


# --- the builders ----------------------------------------------------------------------------


def build_sft(sr: SourcedRecord, backbone: Backbone, options: SftBuild | None = None) -> TrainingSequence:
    """prompt → spoken answer (backbone's interleave) → stop."""
    _, answer = split_record(sr)
    body = _Builder()
    for chunk in spoken_chunks(answer, backbone, stream_layout(backbone), sr.where):
        body.add_spoken(chunk, backbone)
    body.add([backbone.layout.stop_ids[0]], CONTROL)
    return _finish(prompt_ids(sr, backbone), body, sr.where)


def build_cotbs(sr: SourcedRecord, backbone: Backbone, options: CotbsBuild | None = None) -> TrainingSequence:
    """prompt → THOUGHT_OPEN reasoning THOUGHT_CLOSE → spoken answer → stop."""
    _, answer = split_record(sr)
    layout = backbone.layout
    reasoning = encode_text(backbone, _assessment_text(sr, "cotbs", "reasoning"), sr.where, "assessment text")
    body = _Builder()
    body.add([layout.token_id(THOUGHT_OPEN)], CONTROL)
    body.add(reasoning, THOUGHT)
    body.add([layout.token_id(THOUGHT_CLOSE)], CONTROL)
    for chunk in spoken_chunks(answer, backbone, stream_layout(backbone), sr.where):
        body.add_spoken(chunk, backbone)
    body.add([layout.stop_ids[0]], CONTROL)
    return _finish(prompt_ids(sr, backbone), body, sr.where)


def build_reempathy(sr: SourcedRecord, backbone: Backbone, options: ReempathyBuild | None = None) -> TrainingSequence:
    """prompt → r1 RO f1 RC r2 … → stop: a reflection after every full chunk (none when ``reflect`` is false)."""
    options = options or ReempathyBuild()
    _, answer = split_record(sr)
    layout = backbone.layout
    chunk_layout = options.chunk_layout(backbone)
    chunks = spoken_chunks(answer, backbone, chunk_layout, sr.where)
    body = _Builder()
    if options.reflect:
        opener, closer = layout.token_id(REFLECTION_OPEN), layout.token_id(REFLECTION_CLOSE)
        size = chunk_layout.size
        full = sum(1 for chunk in chunks if len(chunk) == size)  # every chunk but a shorter last one
        pieces = iter(reflection_ids(sr, backbone, options, chunk_layout, full))
        for chunk in chunks:
            body.add_spoken(chunk, backbone)
            if len(chunk) == size:
                body.add([opener], CONTROL)
                body.add(next(pieces), REFLECTION)
                body.add([closer], CONTROL)
    else:
        for chunk in chunks:
            body.add_spoken(chunk, backbone)
    body.add([layout.stop_ids[0]], CONTROL)
    return _finish(prompt_ids(sr, backbone), body, sr.where)


def preferred_first(sr: SourcedRecord) -> bool:
    """True when the record's answer is the chosen one.

    The rejected answer wins only when both the record's assessment and the rejected answer's
    own assessment carry scores and the rejected answer's total (sum of the four) is higher;
    otherwise (no scores on either side, or a tie) the record's answer is chosen.
    """
    record = sr.record
    mine = record.assessment.scores if record.assessment else None
    theirs = record.rejected.assessment.scores if record.rejected and record.rejected.assessment else None
    if mine is None or theirs is None:
        return True
    return mine.total() >= theirs.total()


def build_dpo(sr: SourcedRecord, backbone: Backbone, options: DpoBuild | None = None) -> PreferencePair | None:
    """A preference pair of spoken answers (sft layout), or None when the record has no rejected answer."""
    record = sr.record
    if record.rejected is None:
        return None
    _, answer = split_record(sr)
    stream = stream_layout(backbone)
    stop = backbone.layout.stop_ids[0]

    def lay_out(message: Message | Answer, what: str) -> _Builder:
        b = _Builder()
        for chunk in spoken_chunks(message, backbone, stream, sr.where, what):
            b.add_spoken(chunk, backbone)
        b.add([stop], CONTROL)
        return b

    first = lay_out(answer, "answer")
    second = lay_out(record.rejected, "rejected answer")
    keep = preferred_first(sr)
    chosen, rejected = (first, second) if keep else (second, first)
    return PreferencePair(
        prompt_ids(sr, backbone), chosen.ids, rejected.ids, chosen.spans, rejected.spans, sr.where, swapped=not keep
    )


# --- the table of strategies -----------------------------------------------------------------


@dataclass(frozen=True)
class BuilderSpec:
    """What training needs to know of a strategy: its options, builder, decoding strategy and delimiters."""

    name: str
    options_model: type[BaseModel]
    build: Callable[..., TrainingSequence | PreferencePair | None]
    decode_strategy: str
    preference: bool = False

    def delimiters(self, options: BaseModel) -> tuple[str, ...]:
        """The delimiter tokens this strategy's sequences use (trained through peft's trainable tokens)."""
        if self.name == "cotbs":
            return (THOUGHT_OPEN, THOUGHT_CLOSE)
        if self.name == "reempathy" and getattr(options, "reflect", False):
            return (REFLECTION_OPEN, REFLECTION_CLOSE)
        return ()

    def chunk_layout(self, options: BaseModel, backbone: Backbone | None = None) -> ChunkLayout | None:
        return options.chunk_layout(backbone) if isinstance(options, ReempathyBuild) else None


BUILDERS: dict[str, BuilderSpec] = {
    "sft": BuilderSpec("sft", SftBuild, build_sft, "sft"),
    "cotbs": BuilderSpec("cotbs", CotbsBuild, build_cotbs, "cotbs"),
    "reempathy": BuilderSpec("reempathy", ReempathyBuild, build_reempathy, "reempathy"),
    # DPO trains the plain spoken answer, so its checkpoints decode with ``sft``.
    "dpo": BuilderSpec("dpo", DpoBuild, build_dpo, "sft", preference=True),
}


def sequence_length(item: TrainingSequence | PreferencePair) -> int:
    """Tokens the model reads for one item (the longer side of a pair)."""
    if isinstance(item, PreferencePair):
        return len(item.prompt_ids) + max(len(item.chosen_ids), len(item.rejected_ids))
    return len(item.input_ids)


@dataclass
class BuiltDataset:
    """The built sequences (or pairs) of a record set, and the records left out."""

    items: list[TrainingSequence | PreferencePair]
    skipped: list[BadRecord]
    unused: int = 0  # records without a rejected answer (dpo)


def build_all(
    records: RecordSet, backbone: Backbone, spec: BuilderSpec, options: BaseModel, skip_bad: bool = False
) -> BuiltDataset:
    """Build every record; a record that cannot be built raises (or, with ``skip_bad``, is skipped and listed)."""
    items: list[TrainingSequence | PreferencePair] = []
    bad: list[BadRecord] = []
    unused = 0
    for sr in records.records:
        try:
            item = spec.build(sr, backbone, options)
        except InputError as exc:
            message, prefix = str(exc), f"{sr.where}: "
            bad.append(BadRecord(sr.where, message.removeprefix(prefix)))
            continue
        if item is None:
            unused += 1
            continue
        length = sequence_length(item)
        if length > backbone.max_context:
            bad.append(
                BadRecord(sr.where, f"{length} tokens, longer than the backbone's context of {backbone.max_context}")
            )
            continue
        items.append(item)
    if bad and not skip_bad:
        raise InputError(
            bad_records_message(records.path, bad, "fix them, or set [data] skip_bad = true to skip bad records")
        )
    if not items:
        need = "a record with a 'rejected' answer" if spec.preference else "a record it can build"
        raise InputError(f"dataset {records.path!r}: strategy {spec.name!r} needs at least {need}; none found")
    return BuiltDataset(items, bad, unused)


__all__ = [
    "BUILDERS",
    "BuilderSpec",
    "BuiltDataset",
    "TrainingSequence",
    "PreferencePair",
    "SftBuild",
    "CotbsBuild",
    "ReempathyBuild",
    "DpoBuild",
    "build_sft",
    "build_cotbs",
    "build_reempathy",
    "build_dpo",
    "build_all",
    "reflection_ids",
    "preferred_first",
    "IGNORE_INDEX",
    "REFLECTION",
    "THOUGHT",
]
