"""The ``hf-interleaved`` backbone: any local transformers causal LM whose vocabulary holds text and audio-unit tokens.

GLM-4-Voice's family: one token stream interleaves text tokens and audio-unit tokens. The model
is declared in the decode config's ``[backbone]`` table (:class:`InterleavedOptions`): the model
and tokenizer directories, how audio units are spelled (``<|audio_{}|>``) or which ids they
take, the stop tokens, the chat template, the spoken-stream policy (text:audio interleave).

Where it decides: :class:`InterleavedBackbone` builds the backbone in named steps —
:meth:`~InterleavedBackbone.load_tokenizer`, :meth:`~InterleavedBackbone.load_model`,
:meth:`~InterleavedBackbone.add_delimiters` (the reflection/thought delimiters are added as
special tokens when the tokenizer lacks them, growing the embeddings with mean rows when no
spare row is left), :meth:`~InterleavedBackbone.vocab_layout`,
:meth:`~InterleavedBackbone.prompt_builder`. A third-party backbone subclasses it and
overrides the step its model does differently (a prompt format, a layout), then registers a
factory — docs/backbones.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch
from pydantic import BaseModel, Field, model_validator

from reempathy.backbones.base import DELIMITER_TOKENS, Backbone, StreamPolicy, Turn, VocabLayout, grow_vocab_rows
from reempathy.backbones.quantize import Quantize, quantize_weights
from reempathy.backbones.quiet import no_loading_bar
from reempathy.devices import DeviceName
from reempathy.errors import CheckpointError, ConfigError, InputError
from reempathy.options import MAX_SEGMENT, STRICT, PluginOptions, RepetitionPenalty, Temperature, Text, TopK, TopP

NAME = "hf-interleaved"


MAX_ID = 2**31 - 1  # token ids and context lengths: int32 in every tokenizer and attention mask
MAX_AUDIO_RATE_HZ = 1000.0  # audio units per second: codecs run at 12.5–75 Hz; beyond this is a typo


class StreamOptions(BaseModel):
    """``[backbone.stream]``: how the model interleaves its spoken answer."""

    model_config = STRICT
    text_tokens: int = Field(13, ge=1, le=MAX_SEGMENT, description="text tokens per interleave group")
    audio_tokens: int = Field(26, ge=0, le=MAX_SEGMENT, description="audio tokens after them (0: a text-only spoken stream)")
    audio_rate_hz: float = Field(
        12.5, gt=0.0, le=MAX_AUDIO_RATE_HZ, description="audio units per second of speech (at most 1000)"
    )


class AudioIds(BaseModel):
    """``[backbone.audio_ids]``: audio units by id range instead of by spelling."""

    model_config = STRICT
    first: int = Field(ge=0, le=MAX_ID, description="id of unit 0")
    count: int = Field(ge=1, le=MAX_ID, description="number of units (ids first .. first + count - 1)")


class InterleavedSampling(BaseModel):
    """``[backbone.sampling]``: the model's sampling defaults (unset keys: the decoder's own), bounded as ``[sampling]``."""

    model_config = STRICT
    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    repetition_penalty: RepetitionPenalty | None = None


class InterleavedOptions(PluginOptions):
    """Options of ``hf-interleaved``: the declaration of a local interleaved text+audio causal LM."""

    model_config = STRICT
    # Options that change neither the weights, the vocabulary nor the training sequences, so a checkpoint
    # decodes with other values: the same files elsewhere, another dtype, device or attention kernel, a
    # context limit, the sampling defaults. The prompt format (chat_template, system_prompt, audio_begin/end),
    # the layout (audio ids, text_end, stop_tokens, stream) and add_delimiters shape what training wrote, so
    # a checkpoint pins them; quantize too (a merge into quantized weights is not what was trained or tested).
    runtime_options: ClassVar[frozenset[str]] = frozenset(
        {"path", "tokenizer_path", "dtype", "device", "attn_implementation", "max_context", "sampling"}
    )

    path: str = Field(min_length=1, description="model directory (config.json + safetensors), loaded without remote code")
    tokenizer_path: str | None = Field(None, min_length=1, description="tokenizer directory; default: path")
    audio_token: str = Field(
        "<|audio_{}|>", description="spelling of an audio-unit token, {} = the unit number (ignored with audio_ids)"
    )
    audio_ids: AudioIds | None = Field(None, description="audio units as an id range: {first, count}")
    text_end: int | None = Field(
        None, ge=1, le=MAX_ID, description="text tokens are ids [0, text_end); default: the lowest id of any added token"
    )
    stop_tokens: list[str] | None = Field(None, description="tokens that end an answer; default: the tokenizer's eos")
    chat_template: str | None = Field(
        None, description="Jinja chat template, inline or a path to a file; default: the tokenizer's own"
    )
    system_prompt: Text | None = Field(None, description="system turn put first when the prompt has none")
    audio_begin: str | None = Field(None, description="token written before a user turn's audio units")
    audio_end: str | None = Field(None, description="token written after them")
    stream: StreamOptions = Field(default_factory=StreamOptions, description="the spoken-stream policy")
    add_delimiters: bool = Field(True, description="add the reflection/thought delimiter tokens if missing")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: DeviceName = Field("cpu", description="torch device: cpu, cuda, cuda:N or auto")
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="the model's attention; attention-reweight swaps in its SDPA-with-bias while it runs"
    )
    max_context: int | None = Field(None, ge=2, le=MAX_ID, description="default: the config's max_position_embeddings")
    quantize: Quantize = Field(
        "none", description="weight-only quantization through torchao (extra 'quant'): int8 (CPU, CUDA), int4 (CUDA, bfloat16)"
    )
    sampling: InterleavedSampling = Field(
        default_factory=InterleavedSampling,
        description="sampling defaults of this model (temperature, top_p, top_k, repetition_penalty)",
    )
    name: str = Field(NAME, min_length=1, description="the backbone name results carry")

    @model_validator(mode="after")
    def _spelling(self) -> "InterleavedOptions":
        if self.audio_ids is None and self.audio_token.count("{}") != 1:
            raise ValueError("audio_token must contain {} exactly once, e.g. '<|audio_{}|>'")
        return self


class ChatTemplatePrompt:
    """``turns -> ids`` through a Jinja chat template.

    Turns become ``{"role", "content"}`` messages; a user turn's units are written as their
    token spellings between ``audio_begin`` and ``audio_end``; an assistant turn from history
    is its text followed by its units (the model's interleave is not rebuilt). The rendered
    text is tokenized with control tokens recognised, so text in a turn may not contain a
    control token's spelling (an :class:`InputError` says which) — user text cannot inject one.
    """

    def __init__(
        self,
        tokenizer: Any,
        layout: VocabLayout,
        template: str,
        unit_token: Callable[[int], str],
        system_prompt: str | None = None,
        audio_begin: str | None = None,
        audio_end: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.layout = layout
        self.template = template
        self.unit_token = unit_token
        self.system_prompt = system_prompt
        self.audio_begin = audio_begin or ""
        self.audio_end = audio_end or ""
        specials = [t for t in tokenizer.get_vocab() if t in {str(a) for a in tokenizer.added_tokens_decoder.values()}]
        self._control = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) or "(?!)")

    def _text(self, turn_no: int, text: str | None) -> str:
        text = text or ""
        m = self._control.search(text)
        if m:
            raise InputError(
                f"turn {turn_no} contains the control token {m.group(0)!r} as text; remove it from the prompt"
            )
        return text

    def _units(self, units: Sequence[int] | None) -> str:
        if units is None:
            return ""
        for u in units:
            self.layout.unit_to_token(int(u))  # range check with a clear error
        return "".join(self.unit_token(int(u)) for u in units)

    def messages(self, turns: Sequence[Turn]) -> list[dict[str, str]]:
        """The chat messages the template is rendered with."""
        if not turns:
            raise InputError("the prompt has no turns; give at least one user turn")
        out: list[dict[str, str]] = []
        if self.system_prompt and turns[0].role != "system":
            out.append({"role": "system", "content": self.system_prompt})
        for n, turn in enumerate(turns):
            if turn.role not in ("system", "user", "assistant"):
                raise InputError(f"turn {n} has role {turn.role!r}; use system, user or assistant")
            content = self._text(n, turn.text)
            if turn.units is not None:
                audio = self._units(turn.units)
                content += self.audio_begin + audio + self.audio_end if turn.role == "user" else audio
            out.append({"role": turn.role, "content": content})
        if turns[-1].role != "user":
            raise InputError(f"the last turn is a {turns[-1].role} turn; the prompt must end with the user turn to answer")
        return out

    def __call__(self, turns: Sequence[Turn]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            self.messages(turns), chat_template=self.template, add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))


class InterleavedBackbone:
    """Builds a :class:`Backbone` from :class:`InterleavedOptions` in overridable steps (the documented base).

    ``InterleavedBackbone(options).load()`` runs, in order: :meth:`load_tokenizer`,
    :meth:`load_model`, :meth:`add_delimiters`, :meth:`vocab_layout`, :meth:`stream_policy`,
    :meth:`prompt_builder`, then puts them into a :class:`Backbone` (the registry checks it
    against the backbone contract). Override a step to adapt a model family.
    """

    #: the options model a subclass's registration may reuse or extend
    options_model: type[InterleavedOptions] = InterleavedOptions

    def __init__(self, options: InterleavedOptions) -> None:
        self.options = options
        self.path = Path(options.path).expanduser()
        self.tokenizer_path = Path(options.tokenizer_path).expanduser() if options.tokenizer_path else self.path
        self.added_delimiters: dict[str, int] = {}

    def load_tokenizer(self) -> Any:
        """The fast tokenizer of ``tokenizer_path`` (``trust_remote_code`` off)."""
        from transformers import AutoTokenizer

        if not self.tokenizer_path.is_dir():
            raise CheckpointError(f"tokenizer directory {str(self.tokenizer_path)!r} not found")
        try:
            tok = AutoTokenizer.from_pretrained(str(self.tokenizer_path), trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.tokenizer_path}: cannot load a tokenizer ({' '.join(str(exc).split())[:200]})") from None
        if not hasattr(tok, "backend_tokenizer"):
            raise CheckpointError(f"{self.tokenizer_path}: hf-interleaved needs a fast tokenizer (tokenizer.json)")
        return tok

    def load_model(self) -> Any:
        """The causal LM of ``path`` in ``dtype`` on ``device``, safetensors only, no remote code."""
        from transformers import AutoModelForCausalLM

        from reempathy.devices import resolve_device

        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{str(self.path)!r} has no config.json; give a directory written by save_pretrained")
        device = resolve_device(self.options.device)
        try:
            with no_loading_bar():  # the bar would be a second stderr line before any later one-line error
                model = AutoModelForCausalLM.from_pretrained(
                    str(self.path),
                    dtype=getattr(torch, self.options.dtype),
                    use_safetensors=True,
                    trust_remote_code=False,
                    attn_implementation=self.options.attn_implementation,
                )
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{self.path}: cannot load the model ({' '.join(str(exc).split())[:200]})") from None
        return model.to(device).eval()

    def add_delimiters(self, tokenizer: Any, model: Any) -> None:
        """Add the reflection/thought delimiters missing from the vocabulary, as special tokens."""
        if not self.options.add_delimiters:
            return
        from tokenizers import AddedToken

        vocab = tokenizer.get_vocab()
        missing = [t for t in DELIMITER_TOKENS if t not in vocab]
        if not missing:
            return
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        vocab = tokenizer.get_vocab()
        self.added_delimiters = {t: vocab[t] for t in missing}
        rows = max(vocab.values()) + 1
        if rows > model.get_input_embeddings().weight.shape[0]:
            grow_vocab_rows(model, rows)

    def audio_range(self, tokenizer: Any) -> tuple[int, int]:
        """``(id of unit 0, number of units)`` from ``audio_ids`` or the ``audio_token`` spelling."""
        if self.options.audio_ids is not None:
            return self.options.audio_ids.first, self.options.audio_ids.count
        vocab = tokenizer.get_vocab()
        first = vocab.get(self.options.audio_token.format(0))
        if first is None:
            raise ConfigError(
                f"backbone {self.options.name!r}: the tokenizer has no {self.options.audio_token.format(0)!r}; "
                "set audio_token to the spelling of its audio-unit tokens or give audio_ids"
            )
        count = 0
        while (token_id := vocab.get(self.options.audio_token.format(count))) is not None:
            if token_id != first + count:
                raise ConfigError(
                    f"backbone {self.options.name!r}: {self.options.audio_token.format(count)!r} has id {token_id}, "
                    f"expected {first + count}; audio-unit ids must be consecutive"
                )
            count += 1
        return first, count

    def vocab_layout(self, tokenizer: Any, model: Any) -> VocabLayout:
        """Text ids, the audio range, control tokens (every other added token) and stop ids."""
        rows = int(model.get_output_embeddings().weight.shape[0])
        audio_first, audio_count = self.audio_range(tokenizer)
        added = {str(t): i for i, t in tokenizer.added_tokens_decoder.items()}
        audio_ids = range(audio_first, audio_first + audio_count)
        special = {t: i for t, i in added.items() if i not in audio_ids}
        text_end = self.options.text_end or min([*added.values(), audio_first, len(tokenizer)])
        if audio_first < text_end:
            raise ConfigError(f"backbone {self.options.name!r}: audio ids start at {audio_first}, inside the text ids [0, {text_end})")
        if audio_first + audio_count > rows:
            raise ConfigError(
                f"backbone {self.options.name!r}: audio ids run to {audio_first + audio_count - 1} but the model has {rows} rows"
            )
        stops = self.options.stop_tokens
        if stops is None:
            if tokenizer.eos_token is None:
                raise ConfigError(f"backbone {self.options.name!r}: the tokenizer has no eos token; set stop_tokens")
            stops = [tokenizer.eos_token]
        vocab = tokenizer.get_vocab()
        for t in stops:
            if t not in vocab:
                raise ConfigError(f"backbone {self.options.name!r}: stop token {t!r} is not in the tokenizer's vocabulary")
        return VocabLayout(
            vocab_size=rows,
            text_end=text_end,
            audio_offset=audio_first,
            audio_count=audio_count,
            special=special,
            stop_ids=tuple(dict.fromkeys(vocab[t] for t in stops)),
        )

    def stream_policy(self) -> StreamPolicy:
        """The declared text:audio interleave."""
        s = self.options.stream
        return StreamPolicy(s.text_tokens, s.audio_tokens, s.audio_rate_hz)

    def chat_template(self, tokenizer: Any) -> str:
        """The template: the option (inline or a file), else the tokenizer's own."""
        given = self.options.chat_template
        if given is not None:
            if "{" not in given and Path(given).expanduser().is_file():
                return Path(given).expanduser().read_text(encoding="utf-8")
            return given
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            raise ConfigError(
                f"backbone {self.options.name!r}: the tokenizer in {str(self.tokenizer_path)!r} has no chat template; "
                "set chat_template (Jinja text or a file)"
            )
        return own

    def prompt_builder(self, tokenizer: Any, layout: VocabLayout) -> Callable[[list[Turn]], list[int]]:
        """``turns -> ids`` (:class:`ChatTemplatePrompt`)."""
        for t in (self.options.audio_begin, self.options.audio_end):
            if t is not None and t not in layout.special:
                raise ConfigError(f"backbone {self.options.name!r}: {t!r} is not a control token of the tokenizer")
        convert = tokenizer.convert_ids_to_tokens

        def unit_token(u: int) -> str:
            return convert(layout.audio_offset + u)

        return ChatTemplatePrompt(
            tokenizer,
            layout,
            self.chat_template(tokenizer),
            unit_token,
            system_prompt=self.options.system_prompt,
            audio_begin=self.options.audio_begin,
            audio_end=self.options.audio_end,
        )

    def load(self) -> Backbone:
        """Run every step and return the backbone."""
        tokenizer = self.load_tokenizer()
        model = self.load_model()
        self.add_delimiters(tokenizer, model)
        quantize_weights(model, self.options.quantize)
        layout = self.vocab_layout(tokenizer, model)
        max_context = self.options.max_context or int(getattr(model.config, "max_position_embeddings", 0) or 0)
        if max_context < 2:
            raise ConfigError(f"backbone {self.options.name!r}: the model config has no max_position_embeddings; set max_context")
        return Backbone(
            name=self.options.name,
            model=model,
            tokenizer=tokenizer,
            layout=layout,
            stream=self.stream_policy(),
            max_context=max_context,
            prompt_builder=self.prompt_builder(tokenizer, layout),
            sampling_defaults=self.options.sampling.model_dump(exclude_none=True),
            info={"path": str(self.path), "delimiters_added": dict(self.added_delimiters)},
        )


def load_interleaved(options: InterleavedOptions) -> Backbone:
    """The ``hf-interleaved`` factory: ``InterleavedBackbone(options).load()``."""
    return InterleavedBackbone(options).load()


__all__ = [
    "AudioIds",
    "ChatTemplatePrompt",
    "InterleavedBackbone",
    "InterleavedOptions",
    "InterleavedSampling",
    "StreamOptions",
    "load_interleaved",
]
