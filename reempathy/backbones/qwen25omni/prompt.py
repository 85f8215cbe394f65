"""Qwen2.5-Omni prompts: the checkpoint's chat template and system prompt; speech in as Whisper features.

Where it decides: :meth:`Qwen25OmniPrompt.__call__` turns the turns into chat messages (a user
turn holds audio, then text), renders them with the checkpoint's own chat template
(``add_generation_prompt``), and for each audio part reads the WAV (channels averaged to mono,
resampled to the feature extractor's 16 kHz through the bounded
:func:`reempathy.speech.audio.resample`), makes its log-mel
features with the checkpoint's ``WhisperFeatureExtractor`` (``preprocessor_config.json``) with
the settings of transformers' ``Qwen2_5OmniProcessor`` (padding to ``max_length``, an attention
mask over the real frames), and expands that part's ``<|AUDIO|>`` placeholder to as many
tokens as the audio encoder makes of those frames — the processor's own rule. The features go
to the thinker's first call as ``prefill_inputs``; the ids hold the placeholders.

``Qwen2_5OmniProcessor`` itself is not constructed: it insists on its video processor, which
needs torchvision, which this project does not install. Only its audio path is used, as above.

User text is refused when it holds a special-token string (``<|im_end|>`` …): the template would
turn it into a control token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from reempathy.backbones.base import PromptInputs, Turn
from reempathy.errors import InputError

# The system prompt the published model card asks for when the model is to speak.
DEFAULT_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)
AUDIO_TOKEN = "<|AUDIO|>"


def audio_token_count(frames: int) -> int:
    """Audio placeholder tokens for ``frames`` feature frames (two stride-2 stages, as the processor counts)."""
    after_conv = (frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def read_mono_16k(path: str, sample_rate: int, max_seconds: float) -> np.ndarray:
    """A WAV file as mono float32 at ``sample_rate``; ``InputError`` for anything unusable or too long."""
    from reempathy.speech.audio import read_wav, resample

    audio = read_wav(path)
    if audio.seconds > max_seconds:
        raise InputError(
            f"audio file {path!r} is {audio.seconds:.1f} s long; Qwen2.5-Omni's feature extractor takes at most "
            f"{max_seconds:g} s per audio: cut it into shorter turns"
        )
    wave = torch.from_numpy(audio.samples).mean(dim=0)
    wave = resample(wave, audio.sample_rate, sample_rate)  # an odd rate at the nearest small ratio
    return wave.numpy().astype(np.float32)


@dataclass
class Qwen25OmniPrompt:
    """Callable ``turns -> PromptInputs`` in the checkpoint's chat format.

    ``system_prompt`` replaces :data:`DEFAULT_SYSTEM_PROMPT`; an empty string leaves the system
    message out (the template may then write its own). A leading ``system`` turn overrides both.
    """

    tokenizer: Any
    chat_template: str
    feature_extractor: Any | None
    special_tokens: tuple[str, ...]
    device: torch.device
    dtype: torch.dtype
    system_prompt: str | None = None
    source: str = ""  # the checkpoint directory, for messages

    def __call__(self, turns: Sequence[Turn]) -> PromptInputs:
        turns = list(turns)
        _check(turns)
        messages: list[dict[str, Any]] = []
        system = self._system_text(turns)
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        waves: list[np.ndarray] = []
        for number, turn in enumerate(turns):
            if turn.role == "system":
                continue
            content: list[dict[str, Any]] = []
            if turn.units is not None:
                raise InputError(
                    f"turn {number} gives speech units; Qwen2.5-Omni has no audio-unit tokens: give the turn's text, "
                    "or its WAV file as audio"
                )
            if turn.audio is not None:
                if turn.role != "user":
                    raise InputError(f"turn {number} is a {turn.role} turn with audio; only user turns are heard")
                waves.append(self._read(turn.audio))
                content.append({"type": "audio", "audio": turn.audio})
            if turn.text:
                self._check_text(turn.text, number)
                content.append({"type": "text", "text": turn.text})
            messages.append({"role": turn.role, "content": content})
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )
        prefill: dict[str, Any] = {}
        if waves:
            text, prefill = self._expand_audio(text, waves)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return PromptInputs(list(ids), prefill)

    def _system_text(self, turns: list[Turn]) -> str | None:
        if turns[0].role == "system":
            return turns[0].text or None
        if self.system_prompt is not None:
            return self.system_prompt or None
        return DEFAULT_SYSTEM_PROMPT

    def _check_text(self, text: str, number: int) -> None:
        for token in self.special_tokens:
            if token in text:
                raise InputError(
                    f"turn {number} contains the special token {token!r} as text; remove it (it would act as a control token)"
                )

    def _read(self, path: str) -> np.ndarray:
        fe = self.feature_extractor
        if fe is None:
            raise InputError(
                f"{self.source}: the checkpoint has no preprocessor_config.json, so it cannot read audio; "
                "add the published file or give the turn as text"
            )
        return read_mono_16k(path, int(fe.sampling_rate), float(fe.chunk_length))

    def _expand_audio(self, text: str, waves: list[np.ndarray]) -> tuple[str, dict[str, Any]]:
        fe = self.feature_extractor
        feats = fe(
            waves,
            sampling_rate=fe.sampling_rate,
            padding="max_length",
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = feats["attention_mask"]
        counts = [audio_token_count(int(n)) for n in mask.sum(-1).tolist()]
        parts = text.split(AUDIO_TOKEN)
        if len(parts) != len(waves) + 1:
            raise InputError(
                f"{self.source}: the chat template wrote {len(parts) - 1} {AUDIO_TOKEN} placeholders for "
                f"{len(waves)} audio parts; the template does not belong to Qwen2.5-Omni"
            )
        out = parts[0]
        for count, rest in zip(counts, parts[1:]):
            out += AUDIO_TOKEN * count + rest
        prefill = {
            "input_features": feats["input_features"].to(self.device, self.dtype),
            "feature_attention_mask": mask.to(self.device),
        }
        return out, prefill


def _check(turns: list[Turn]) -> None:
    if not turns:
        raise InputError("the prompt has no turns; give at least one user turn")
    for number, turn in enumerate(turns):
        if turn.role not in ("system", "user", "assistant"):
            raise InputError(f"turn {number} has role {turn.role!r}; use system, user or assistant")
        if turn.role == "system" and number != 0:
            raise InputError(f"turn {number} is a system turn; only the first turn may be a system turn")
        if turn.role == "user" and not turn.text and turn.units is None and turn.audio is None:
            raise InputError(f"user turn {number} has neither text nor audio; give one of them")
    if turns[-1].role != "user":
        raise InputError(f"the last turn is a {turns[-1].role} turn; the prompt must end with the user turn to answer")
