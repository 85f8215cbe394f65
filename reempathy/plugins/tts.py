"""Built-in text-to-speech: ``read-aloud``, the backbone itself speaking each text (strategy ``read-aloud``, batched).

Registered through ``reempathy_register_tts`` like a third-party TTS (docs/plugins.md). Every
request becomes one row of the batched loop (:func:`reempathy.decoding.batch.decode_batch`) with
its own :class:`ReadAloudStrategy` (the text forced into the backbone's interleave), its own
sampling processors and its own seed, so a turn's units depend neither on its neighbours nor on
the batch size. Each row's token budget is what its text needs (every interleave block of the
text, then the tail), so a text is never cut by a budget.

Where it decides: :meth:`ReadAloudTts.speak`. The prompt is one user turn, ``instruction`` with
``{text}`` filled in (the backbone hears what it is about to say); the sampling options left
unset take the backbone's own defaults (GLM-4-Voice's temperature 0.2, top-p 0.8), as
``[sampling]`` does. A backbone whose spoken stream is text only has no units to give: refused
when the TTS is built.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from pydantic import Field, field_validator

from reempathy.backbones.base import Backbone, Turn
from reempathy.decoding.batch import RowRequest, decode_batch
from reempathy.decoding.loop import LoopOptions
from reempathy.errors import ConfigError
from reempathy.hooks import Register, hookimpl
from reempathy.options import MAX_SEGMENT, PluginOptions
from reempathy.plugins.processors.sampling import SAMPLING_PROCESSORS
from reempathy.plugins.strategies.read_aloud import (
    TEXT_SPOKEN,
    ReadAloudOptions,
    ReadAloudStrategy,
    read_aloud_budget,
    tail_cap,
)
from reempathy.speech.tts import Speech, SpeechRequest

DEFAULT_INSTRUCTION = "Read this aloud, word for word:\n{text}"

# option → (sampling processor, its option, the value that adds none): the order of [sampling]'s chain.
_SAMPLING = (("temperature", "temperature", "value", 1.0), ("top_k", "top-k", "k", 0), ("top_p", "top-p", "p", 1.0))


class ReadAloudTtsOptions(PluginOptions):
    """``read-aloud`` as a TTS: the batch, the sampling of the audio, the tail after the text, the prompt."""

    batch_size: int = Field(8, ge=1, le=4096, description="turns decoded together (rows of one batch)")
    greedy: bool = Field(False, description="greedy audio (the same units for the same text every time)")
    # The bounds of [sampling]'s (reempathy.options: Temperature, TopK, TopP), written out so they read as such.
    temperature: float | None = Field(None, ge=1e-3, le=1e3, description="sampling temperature (unset: the backbone's default)")
    top_k: int | None = Field(None, ge=0, lt=2**31, description="top-k of the audio sampling, 0: off (unset: the backbone's default)")
    top_p: float | None = Field(None, ge=1e-6, le=1.0, description="top-p of the audio sampling (unset: the backbone's default)")
    max_tail_audio_tokens: int | None = Field(
        None, ge=0, le=MAX_SEGMENT, description="audio tokens after the text's last block (default: two audio blocks)"
    )
    instruction: str = Field(DEFAULT_INSTRUCTION, min_length=1, description="the user turn before the answer; {text} is the text")

    @field_validator("instruction")
    @classmethod
    def _has_text(cls, value: str) -> str:
        try:
            value.format(text="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"instruction {value!r}: the only placeholder is {{text}} ({exc})") from None
        return value


class ReadAloudTts:
    """Speech units for each text from the backbone itself (module docstring)."""

    def __init__(self, options: ReadAloudTtsOptions, backbone: Backbone) -> None:
        if backbone.stream.text_only or backbone.layout.audio_count == 0:
            raise ConfigError(
                f"tts 'read-aloud': backbone {backbone.name!r} speaks text only (its speech is made afterwards), so it has "
                "no audio units to give; use a backbone that interleaves text and audio (glm-4-voice, tiny), or another tts"
            )
        self.options = options
        self.backbone = backbone

    def _processors(self) -> list[Any]:
        if self.options.greedy:
            return []
        defaults = self.backbone.sampling_defaults
        out = []
        for key, name, option, off in _SAMPLING:
            value = getattr(self.options, key)
            value = defaults.get(key) if value is None else value
            if value is not None and value != off:
                cls, model, _ = SAMPLING_PROCESSORS[name]
                out.append(cls(model(**{option: value}), self.backbone))
        return out

    def speak(self, requests: Iterable[SpeechRequest]) -> Iterator[tuple[Any, Speech]]:
        """Units for every request, decoded ``batch_size`` at a time; yielded as rows finish."""
        o, backbone = self.options, self.backbone
        strategy_options = {"max_tail_audio_tokens": o.max_tail_audio_tokens}

        def rows() -> Iterator[RowRequest]:
            for req in requests:
                options = ReadAloudOptions(text=req.text, **strategy_options)
                strategy = ReadAloudStrategy(options, backbone)
                prompt = backbone.build_prompt([Turn("user", text=o.instruction.format(text=req.text))])
                budget = read_aloud_budget(len(strategy.text_ids), backbone, tail_cap(options, backbone))
                loop = LoopOptions(max_new_tokens=budget, greedy=o.greedy, strategy_name="read-aloud")
                yield RowRequest(key=(req.key, len(strategy.text_ids)), prompt_ids=prompt, strategy=strategy,
                                 processors=self._processors(), seed=req.seed, options=loop)

        for (key, text_tokens), result in decode_batch(backbone, rows(), LoopOptions(greedy=o.greedy), o.batch_size):
            if len(result.spoken_text_ids) < text_tokens or result.stop_reason not in (TEXT_SPOKEN, "stop_token"):
                yield key, Speech(error=f"read-aloud stopped ({result.stop_reason}) after {len(result.spoken_text_ids)} "
                                        f"of {text_tokens} text tokens; the text does not fit the backbone's context")
                continue
            yield key, Speech(units=list(result.audio_units))


@hookimpl
def reempathy_register_tts(register: Register) -> None:
    register("read-aloud", ReadAloudTts, ReadAloudTtsOptions,
             "the backbone speaks each text itself: the text forced into its interleave, the audio units its own")


__all__ = ["ReadAloudTts", "ReadAloudTtsOptions", "DEFAULT_INSTRUCTION"]
