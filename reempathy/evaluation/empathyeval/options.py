"""Options of the ``empathyeval`` evaluator (light: no model code is imported here)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EmpathyEvalOptions(BaseModel):
    """``empathyeval``: a trained checkpoint (adapter + heads), the base model it needs, and how to hear units."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(
        None, description="directory written by `reempathy train` with an [evaluator] config (adapter + heads + evaluator.json)"
    )
    model: str | None = Field(
        None,
        description="base model directory (Qwen2.5-Omni or Qwen3-Omni-MoE layout, or a thinker alone); default: the checkpoint's",
    )
    speech_decoder: str | None = Field(
        None,
        description="glm-4-voice-decoder directory that turns audio units into speech when a turn has units but no WAV "
        "(`reempathy eval` takes the run's backbone decoder_path when unset)",
    )
    generate: bool = Field(True, description="write the assessment text (False: scores only, much faster)")
    max_new_tokens: int = Field(256, ge=1, description="length limit of a generated assessment")
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = Field(42, description="seed of the speech decoder when units are synthesised")


__all__ = ["EmpathyEvalOptions"]
