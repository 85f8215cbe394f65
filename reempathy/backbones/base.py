"""The one interface the decoder core sees of a speech language model."""

from __future__ import annotations

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


@dataclass(frozen=True)
class StreamPolicy:
    """How the backbone interleaves its spoken stream: ``text_tokens`` text, then ``audio_tokens`` audio, repeating."""

    text_tokens: int
    audio_tokens: int
    audio_rate_hz: float = 12.5


@dataclass
class Turn:
    """One turn of a dialogue: ``role`` is system, user or assistant; content is text or audio units."""

    role: str
    text: str | None = None
    units: Sequence[int] | None = None


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
    tokenizer: Any  # a transformers tokenizer
    layout: VocabLayout
    stream: StreamPolicy
    max_context: int
    prompt_builder: Any  # callable(list[Turn]) -> list[int]
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    speech_tokenizer: SpeechTokenizer | None = None
    speech_decoder: SpeechDecoder | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model (``config.num_hidden_layers``)."""
        return int(self.model.config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        """Attention heads per layer (``config.num_attention_heads``)."""
        return int(self.model.config.num_attention_heads)

    def build_prompt(self, turns: Sequence[Turn]) -> list[int]:
        """Token ids of the prompt that asks the model for the next assistant turn."""
        return list(self.prompt_builder(list(turns)))

    def decode_text(self, ids: Sequence[int]) -> str:
        """Text of text-token ids (non-text ids are dropped)."""
        return self.tokenizer.decode([i for i in ids if self.layout.is_text(i)], skip_special_tokens=True)
