"""The one interface the decoder core sees of a speech language model.

A backbone declares its spoken stream (:class:`StreamPolicy`): text and audio tokens interleaved
(GLM-4-Voice), or text only (``audio_tokens = 0``) with speech made afterwards from the decoder's
own states at the spoken positions by a :class:`Talker` (Qwen2.5-Omni). Strategies, the chunk
layout and the training builders read that declaration; none of them branches on a backbone name.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from reempathy.errors import InputError

# Delimiter token names shared by strategies, backbones and the training builders, so that
# what is trained is what is decoded.
REFLECTION_OPEN = "<|begin_of_reflection|>"
"""Opens a hidden reflection (``reempathy``)."""
REFLECTION_CLOSE = "<|end_of_reflection|>"
"""Closes a reflection."""
THOUGHT_OPEN = "<|begin_of_thought|>"
"""Opens a hidden chain of thought (``cotbs``)."""
THOUGHT_CLOSE = "<|end_of_thought|>"
"""Closes a thought."""
DELIMITER_TOKENS = (REFLECTION_OPEN, REFLECTION_CLOSE, THOUGHT_OPEN, THOUGHT_CLOSE)
"""Every delimiter a backbone should hold in ``layout.special`` (strategies look them up by these names)."""
# Characters per token assumed for a tokenizer whose vocabulary cannot be read (longer than any real token).
_FALLBACK_TOKEN_CHARS = 256


@dataclass(frozen=True)
class VocabLayout:
    """Where text, special and audio-unit tokens live in a backbone's vocabulary.

    Text tokens are ids ``[0, text_end)``; audio unit ``u`` is token ``audio_offset + u`` for
    ``0 <= u < audio_count``; everything else is special. ``special`` maps special-token
    strings to ids; ``stop_ids`` end an answer.
    """

    vocab_size: int
    text_end: int
    audio_offset: int
    audio_count: int
    special: dict[str, int]
    stop_ids: tuple[int, ...]

    def is_text(self, token_id: int) -> bool:
        """True for a text token id."""
        return 0 <= token_id < self.text_end

    def is_audio(self, token_id: int) -> bool:
        """True for an audio-unit token id."""
        return self.audio_offset <= token_id < self.audio_offset + self.audio_count

    def unit_to_token(self, unit: int) -> int:
        """Token id of audio unit ``unit``; an :class:`InputError` outside ``0..audio_count-1``."""
        if not 0 <= unit < self.audio_count:
            raise InputError(
                f"audio unit {unit} is outside this backbone's range 0..{self.audio_count - 1}; "
                "check that the units come from the matching speech tokenizer"
            )
        return self.audio_offset + unit

    def token_to_unit(self, token_id: int) -> int:
        """Audio unit of an audio-unit token id."""
        return token_id - self.audio_offset

    def token_id(self, name: str) -> int:
        """Id of the special token ``name``; an :class:`InputError` naming the known ones if absent."""
        try:
            return self.special[name]
        except KeyError:
            raise InputError(
                f"the backbone has no special token {name!r}; known: {', '.join(sorted(self.special))}"
            ) from None

    def text_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean mask over the model's vocabulary, True for text tokens."""
        m = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
        m[: self.text_end] = True
        return m

    def audio_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean mask over the model's vocabulary, True for audio-unit tokens."""
        m = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
        m[self.audio_offset : self.audio_offset + self.audio_count] = True
        return m

    def allowed_mask(
        self,
        *,
        text: bool = False,
        audio: bool = False,
        stop: bool = False,
        extra_ids: Sequence[int] = (),
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Boolean mask over the vocabulary, True for the kinds of token allowed (and ``extra_ids``).

        Strategies build their "banned" masks as ``~allowed_mask(...)`` once, so that each step is
        one ``masked_fill``. A backbone without audio tokens gives no audio ids for ``audio=True``.
        """
        m = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
        if text:
            m[: self.text_end] = True
        if audio:
            m[self.audio_offset : self.audio_offset + self.audio_count] = True
        if stop:
            m[list(self.stop_ids)] = True
        if extra_ids:
            m[list(extra_ids)] = True
        return m


@dataclass(frozen=True)
class StreamPolicy:
    """How the backbone interleaves its spoken stream: ``text_tokens`` text, then ``audio_tokens`` audio, repeating.

    ``audio_tokens = 0`` declares a text-only spoken stream: the model writes only text, and its
    speech is made afterwards from the spoken positions (``Backbone.talker``). ``text_tokens``
    then only groups the answer's text, which does not change its tokens.
    """

    text_tokens: int
    audio_tokens: int
    audio_rate_hz: float = 12.5

    @property
    def text_only(self) -> bool:
        """True when the spoken stream holds no audio tokens."""
        return self.audio_tokens == 0


@dataclass
class Turn:
    """One turn of a dialogue: ``role`` is system, user or assistant; content is text, audio units or audio.

    ``audio`` is the path of a WAV file, for backbones that read the waveform themselves
    (``Backbone.reads_audio``); ``units`` are speech-tokenizer units, for backbones with audio tokens.
    """

    role: str
    text: str | None = None
    units: Sequence[int] | None = None
    audio: str | None = None


@dataclass
class PromptInputs:
    """A prompt as the model reads it: token ids, plus model inputs for the first forward call only.

    ``prefill_inputs`` are keyword arguments the decode loop passes to the model's first (prefill)
    call together with the ids — e.g. audio features for audio placeholders in the ids. They
    must not depend on tokens appended after the prompt. Empty for most backbones.
    """

    ids: list[int]
    prefill_inputs: dict[str, Any] = field(default_factory=dict)


class SpeechTokenizer(Protocol):
    """Waveform → audio units."""

    def tokenize(self, path: str) -> list[int]:
        """Audio units of the WAV file at ``path``."""
        ...


class SpeechDecoder(Protocol):
    """Audio units → waveform."""

    sample_rate: int

    def synthesize(self, units: Sequence[int]) -> torch.Tensor:
        """Waveform (at ``sample_rate``) of ``units``."""
        ...


class TalkerTurn(Protocol):
    """The speech of one answer of a text-only stream.

    Enter it around the decode and add it to the decode's observers: it records the decoder's
    states at the spoken positions and releases them to the talker as spoken chunks complete.
    ``advance`` runs the talker over what has been released (call it from one thread, the
    decode may run in another); ``finish`` (after the decode) ends the talker's input and
    returns the waveform, ``(samples,)`` float32 at the talker's ``sample_rate``.
    """

    def __enter__(self) -> "TalkerTurn": ...

    def __exit__(self, *exc: object) -> None: ...

    def advance(self) -> None: ...

    def finish(self) -> torch.Tensor: ...


class Talker(Protocol):
    """Speech out of a text-only spoken stream, made from the decoder's states at spoken positions."""

    sample_rate: int

    def turn(self, seed: int) -> TalkerTurn:
        """A fresh :class:`TalkerTurn`; ``seed`` drives the talker's sampling and the waveform's noise."""
        ...


@dataclass
class Backbone:
    """A loaded speech LM: model, tokenizer, vocabulary layout, prompt format and stream policy.

    Adapters build one of these; the decoder core uses nothing else of the model. A backbone
    factory returns one; the registry checks it against the backbone contract
    (:mod:`reempathy.backbones.contract`, docs/backbones.md) before any decode. For a
    transformers causal LM with interleaved text and audio-unit tokens, subclass
    :class:`reempathy.backbones.interleaved.InterleavedBackbone` instead of building it by hand.
    """

    name: str
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers tokenizer; plugins use encode_text / decode_text
    layout: VocabLayout
    stream: StreamPolicy
    max_context: int
    prompt_builder: Any  # callable(list[Turn]) -> list[int], or -> PromptInputs when it needs prefill inputs
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    speech_tokenizer: SpeechTokenizer | None = None
    speech_decoder: SpeechDecoder | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # Speech for a text-only stream (``stream.audio_tokens == 0``): see :class:`Talker`.
    talker: Talker | None = None
    # True when the prompt builder reads WAV files itself (``Turn.audio``) instead of taking units.
    reads_audio: bool = False

    @functools.cached_property
    def max_text_chars(self) -> int:
        """Characters of text beyond which a prompt (or a training record) cannot fit ``max_context``, however it is tokenized.

        A token covers at most as many characters as the vocabulary's longest token spells (a
        byte-level token spells one character per byte; a character is at least one byte), so text
        longer than ``max_context`` × that length needs more tokens than the context holds; twice
        that leaves room for a tokenizer whose normalizer drops characters. Checked before
        tokenizing, so that a 64 MB prompt is refused at once instead of tokenized for minutes.
        """
        longest = _FALLBACK_TOKEN_CHARS
        get_vocab = getattr(self.tokenizer, "get_vocab", None)
        if callable(get_vocab):
            try:
                longest = max((len(t) for t in get_vocab()), default=1) or 1
            except Exception:  # noqa: BLE001 — a tokenizer without a readable vocabulary keeps the fallback
                longest = _FALLBACK_TOKEN_CHARS
        return 2 * self.max_context * longest

    def add_special_tokens(self, names: Sequence[str]) -> list[str]:
        """Add the special tokens of ``names`` this backbone lacks; the names added (in order).

        A strategy declares the special tokens it forces or samples (``register(...,
        special_tokens=...)``); the runner asks the backbone for them before the strategy is built
        or a checkpoint applied. Each missing token is added to the tokenizer as a special token
        with the next id after the largest it has, named in ``layout.special``; the model's input
        and output embeddings grow when the id is beyond them (new rows the mean of the old, so
        that an untrained token is no more likely than any other). Adding the same names in the
        same order gives the same ids, which a checkpoint trained with them relies on.
        """
        from tokenizers import AddedToken

        missing = [n for n in dict.fromkeys(names) if n not in self.layout.special]
        if not missing:
            return []
        vocab = self.tokenizer.get_vocab()
        present = [n for n in missing if n in vocab]
        if present:
            raise InputError(
                f"backbone {self.name!r}: {present[0]!r} is already a token of its vocabulary but not a special one; "
                "a strategy's special token must be new to the backbone (rename it)"
            )
        self.tokenizer.add_tokens([AddedToken(n, special=True, normalized=False) for n in missing], special_tokens=True)
        ids = {n: int(self.tokenizer.convert_tokens_to_ids(n)) for n in missing}
        layout = self.layout
        clash = [n for n, i in ids.items() if layout.is_text(i) or layout.is_audio(i)]
        if clash:
            raise InputError(
                f"backbone {self.name!r}: its tokenizer gave the new token {clash[0]!r} id {ids[clash[0]]}, which is a "
                "text or audio-unit id; this backbone cannot take new special tokens"
            )
        rows = max(ids.values()) + 1
        if rows > int(self.model.get_input_embeddings().weight.shape[0]):
            grow_vocab_rows(self.model, rows)
        self.layout = dataclasses.replace(
            layout, special={**layout.special, **ids}, vocab_size=max(layout.vocab_size, rows)
        )
        self.__dict__.pop("max_text_chars", None)  # a cached property that reads the vocabulary
        return missing

    def check_text_fits(self, chars: int, what: str = "the prompt's text") -> None:
        """An :class:`InputError` when ``chars`` characters of text cannot fit the context (:attr:`max_text_chars`)."""
        if chars > self.max_text_chars:
            raise InputError(
                f"{what} is {chars:,} characters, more than the context of {self.max_context} tokens of backbone "
                f"{self.name!r} can hold (at most {self.max_text_chars:,} characters, checked before tokenizing); shorten it"
            )

    @property
    def _text_config(self) -> Any:
        # Composite models (Qwen2.5-Omni's thinker) keep the decoder's shape in a text sub-config.
        config = self.model.config
        return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model (``num_hidden_layers`` of its text config)."""
        return int(self._text_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        """Attention heads per layer (``num_attention_heads`` of its text config)."""
        return int(self._text_config.num_attention_heads)

    def build_prompt_inputs(self, turns: Sequence[Turn]) -> PromptInputs:
        """The prompt that asks the model for the next assistant turn: ids and any prefill inputs.

        ``prompt_builder`` may return a list of ids or a :class:`PromptInputs`.
        """
        built = self.prompt_builder(list(turns))
        if isinstance(built, PromptInputs):
            return built
        return PromptInputs(list(built))

    def build_prompt(self, turns: Sequence[Turn]) -> list[int]:
        """Token ids of the prompt that asks the model for the next assistant turn.

        Refuses a prompt that needs prefill inputs (audio read as features): its ids alone would
        decode without the audio. Use :meth:`build_prompt_inputs` for those.
        """
        built = self.build_prompt_inputs(turns)
        if built.prefill_inputs:
            raise InputError(
                f"backbone {self.name!r} reads this prompt's audio as model inputs beside the ids; "
                "build it with build_prompt_inputs and pass prefill_inputs to the decoder"
            )
        return built.ids

    def encode_text(self, text: str) -> list[int]:
        """Text-token ids of ``text`` as the model reads it inside an answer: no special tokens added.

        The typed way for a plugin to turn text into ids, e.g. text forced into a phase as part of it
        (``Switch("reflection", forced=(open_id,), hidden=True, prefix=tuple(backbone.encode_text("Thinking:")))``).
        Text is tokenized on its own: a word may split differently than it would after other text.
        Text that spells a special token (``<|user|>``, a delimiter) is an :class:`InputError`: forced
        into an answer, it would act as that control token; force such tokens by id
        (``layout.token_id(name)``) instead.
        """
        ids = [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]
        special = [i for i in ids if not self.layout.is_text(i)]
        if special:
            first = special[0]
            names = {v: k for k, v in self.layout.special.items()}
            shown = names.get(first) or (
                f"audio unit {self.layout.token_to_unit(first)}" if self.layout.is_audio(first) else f"token id {first}"
            )
            raise InputError(
                f"backbone {self.name!r}: the text {text[:60]!r} encodes the special token {shown}, not text; "
                "force special tokens by id (backbone.layout.token_id(NAME)) and give only plain text here"
            )
        return ids

    def decode_text(self, ids: Sequence[int]) -> str:
        """Text of text-token ids (non-text ids are dropped)."""
        return self.tokenizer.decode([i for i in ids if self.layout.is_text(i)], skip_special_tokens=True)


@torch.no_grad()
def grow_vocab_rows(model: Any, rows: int) -> None:
    """Resize input and output embeddings to ``rows``; new rows are the mean of the old (deterministic)."""
    old_in = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings()
    old_out = head.weight.detach().clone() if head is not None else None
    model.resize_token_embeddings(rows, mean_resizing=False)
    n = old_in.shape[0]
    model.get_input_embeddings().weight[n:] = old_in.mean(dim=0, keepdim=True)
    out = model.get_output_embeddings()
    if old_out is not None and out.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        out.weight[n:] = old_out.mean(dim=0, keepdim=True)
