"""Options of the speech-quality evaluators ``audio-stats`` and ``asr-wer`` (light: no model code is imported here).

Both models are strict (:data:`reempathy.options.STRICT`): an unknown key, a string where a
number belongs or NaN is refused while ``--set`` is read, with the option's name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from reempathy.devices import DeviceName
from reempathy.options import STRICT

WHISPER_PROMPT_TOKENS = 4
"""Tokens Whisper's decoder is given before the transcript (start, language, task, no-timestamps)."""


class AudioStatsOptions(BaseModel):
    """``audio-stats``: duration, silence share, clipping share and loudness of each answer's WAV (no model)."""

    model_config = STRICT

    silence_threshold_dbfs: float = Field(
        -40.0,
        ge=-120.0,
        le=0.0,
        description="a frame whose RMS is below this many dB relative to full scale (20·log10 RMS) is silent; "
        "-120 to 0 (16-bit audio's noise floor is about -96)",
    )
    frame_ms: float = Field(
        20.0, ge=5.0, le=200.0, description="length of the frames silence is judged on, 5-200 ms"
    )
    clip_level: float = Field(
        0.999,
        ge=0.5,
        le=1.0,
        description="a sample with |x| at or above this (full scale is 1) counts as clipped, 0.5-1; 16-bit full "
        "scale (32767/32768) is above the default",
    )


class AsrWerOptions(BaseModel):
    """``asr-wer``: a local Whisper model directory transcribes each answer's WAV; WER and CER against its spoken text."""

    model_config = STRICT

    path: str = Field(
        description="a local transformers Whisper model directory (config.json, safetensors weights, tokenizer, "
        "preprocessor_config.json), e.g. one saved from openai/whisper-large-v3"
    )
    language: str | None = Field(
        None,
        description="language of the answers for a multilingual model, a code or a name (en, zh, english); "
        "unset: the model detects it per answer (English-only models need none)",
    )
    max_new_tokens: int = Field(
        224,
        ge=1,
        le=448 - WHISPER_PROMPT_TOKENS,
        description="length limit of a transcript in tokens (Whisper's decoder holds 448 with its 4 prompt tokens; "
        "224 is Whisper's own sampling length)",
    )
    device: DeviceName = Field("cpu", description="torch device: cpu, cuda, cuda:N, mps or auto")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights and features dtype")


__all__ = ["AudioStatsOptions", "AsrWerOptions", "WHISPER_PROMPT_TOKENS"]
