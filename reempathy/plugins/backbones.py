"""Built-in backbones: ``tiny`` (random, built from a config), ``glm-4-voice`` and ``qwen2.5-omni`` (local checkpoints), ``hf-interleaved`` (declared in TOML)."""

from __future__ import annotations

from reempathy.hooks import Register
from reempathy.hooks import hookimpl


@hookimpl
def reempathy_register_backbones(register: Register) -> None:
    from reempathy.backbones.tiny import TinyOptions, load_tiny

    from reempathy.backbones.glm4voice import Glm4VoiceOptions, load_glm4voice
    from reempathy.backbones.qwen25omni import Qwen25OmniOptions, load_qwen25omni

    register("tiny", load_tiny, TinyOptions, "small random GLM with GLM-4-Voice's token layout (no download)")
    register("glm-4-voice", load_glm4voice, Glm4VoiceOptions, "a local glm-4-voice-9b checkpoint, loaded natively")
    register(
        "qwen2.5-omni", load_qwen25omni, Qwen25OmniOptions, "a local Qwen2.5-Omni checkpoint: thinker decodes, talker speaks"
    )

    from reempathy.backbones.interleaved import InterleavedOptions, load_interleaved

    register("hf-interleaved", load_interleaved, InterleavedOptions, "any local causal LM with text and audio-unit tokens, declared in TOML")
