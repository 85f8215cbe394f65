"""Loading an audio-in thinker from a local directory through transformers' native classes.

Supported layouts (``config.json`` ``model_type``):

- ``qwen2_5_omni`` / ``qwen3_omni_moe``: the published full models (Qwen2.5-Omni-7B,
  Qwen3-Omni-30B-A3B-Captioner/Instruct). Only the thinker is loaded: its config is the
  ``thinker_config`` and its weights are the ``thinker.*`` tensors (talker and code-to-wave
  weights are left on disk).
- ``qwen2_5_omni_thinker`` / ``qwen3_omni_moe_thinker``: a thinker saved on its own.

Where it decides: ``FAMILIES`` holds all that differs between the two families — the classes,
how the audio placeholder ids are found, and how many placeholders an audio clip takes (each
family's own transformers function). Nothing else branches on the family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from reempathy.backbones.quiet import no_loading_bar
from reempathy.errors import CheckpointError


def _qwen25_count(thinker: Any, lengths: torch.Tensor) -> torch.Tensor:
    return thinker.model.audio_tower._get_feat_extract_output_lengths(lengths)[1]


def _qwen3_count(thinker: Any, lengths: torch.Tensor) -> torch.Tensor:
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as m

    return m._get_feat_extract_output_lengths(lengths, thinker.config.audio_config.n_window)


@dataclass(frozen=True)
class Family:
    """What differs between audio-in model families."""

    name: str
    full_type: str
    thinker_type: str
    classes: Callable[[], tuple[Any, Any]]  # () -> (full config class, thinker model class)
    audio_end: str  # the token that closes an audio clip, looked up in the tokenizer when the config lacks it
    count: Callable[[Any, torch.Tensor], torch.Tensor]


def _qwen25_classes() -> tuple[Any, Any]:
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniThinkerForConditionalGeneration

    return Qwen2_5OmniConfig, Qwen2_5OmniThinkerForConditionalGeneration


def _qwen3_classes() -> tuple[Any, Any]:
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    return Qwen3OmniMoeConfig, Qwen3OmniMoeThinkerForConditionalGeneration


FAMILIES = {
    "qwen2.5-omni": Family("qwen2.5-omni", "qwen2_5_omni", "qwen2_5_omni_thinker", _qwen25_classes, "<|audio_eos|>", _qwen25_count),
    "qwen3-omni-moe": Family("qwen3-omni-moe", "qwen3_omni_moe", "qwen3_omni_moe_thinker", _qwen3_classes, "<|audio_end|>", _qwen3_count),
}


@dataclass
class Omni:
    """A loaded thinker with its tokenizer and feature extractor, and the ids of its audio placeholders."""

    family: Family
    path: str
    thinker: Any
    tokenizer: Any
    feature_extractor: Any
    audio_start_id: int
    audio_end_id: int
    audio_pad_id: int
    eos_ids: tuple[int, ...]

    @property
    def hidden_size(self) -> int:
        return int(self.thinker.config.text_config.hidden_size)

    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    def audio_tokens(self, feature_lengths: torch.Tensor) -> list[int]:
        """How many placeholder tokens each clip takes, given its feature frame count."""
        return [int(n) for n in self.family.count(self.thinker, feature_lengths)]


def read_model_type(path: Path) -> str:
    """``model_type`` of a model directory; CheckpointError naming the directory otherwise."""
    cfg = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} not found; give a local Qwen2.5-Omni or Qwen3-Omni-MoE directory")
    if not cfg.is_file():
        raise CheckpointError(f"{cfg}: missing; give a model directory in the published layout (config.json + safetensors)")
    try:
        return str(json.loads(cfg.read_text(encoding="utf-8")).get("model_type", ""))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg}: not valid JSON ({exc.msg})") from None


def family_of(model_type: str, where: str) -> Family:
    """The family whose full or thinker ``model_type`` this is."""
    for family in FAMILIES.values():
        if model_type in (family.full_type, family.thinker_type):
            return family
    known = ", ".join(t for f in FAMILIES.values() for t in (f.full_type, f.thinker_type))
    raise CheckpointError(f"{where}: model_type {model_type!r} is not an audio-in model empathyeval can load; supported: {known}")


def load_omni(path: str | Path, device: str = "cpu", dtype: str = "float32") -> Omni:
    """Load the thinker, tokenizer and feature extractor of a local directory (safetensors, no remote code)."""
    from transformers import AutoConfig, AutoTokenizer, WhisperFeatureExtractor

    p = Path(path)
    family = family_of(read_model_type(p), str(p / "config.json"))
    _, thinker_cls = family.classes()
    config = AutoConfig.from_pretrained(p)
    torch_dtype = getattr(torch, dtype)
    try:
        with no_loading_bar():
            if config.model_type == family.full_type:
                thinker = thinker_cls.from_pretrained(
                    p, config=config.thinker_config, key_mapping={r"^thinker\.": ""}, dtype=torch_dtype, use_safetensors=True
                )
            else:
                thinker = thinker_cls.from_pretrained(p, dtype=torch_dtype, use_safetensors=True)
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot load the thinker weights ({str(exc).splitlines()[0]})") from None
    if not (p / "preprocessor_config.json").is_file():
        raise CheckpointError(f"{p / 'preprocessor_config.json'}: missing; the audio feature extractor is described there")
    fe = WhisperFeatureExtractor.from_pretrained(p)
    tokenizer = AutoTokenizer.from_pretrained(p)
    tc = thinker.config
    end_id = getattr(tc, "audio_end_token_id", None)
    if end_id is None:
        end_id = tokenizer.convert_tokens_to_ids(family.audio_end)
        if end_id is None or end_id == tokenizer.unk_token_id:
            raise CheckpointError(f"{p}: the tokenizer has no {family.audio_end} token")
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    thinker.to(device).eval()
    return Omni(
        family=family,
        path=str(p),
        thinker=thinker,
        tokenizer=tokenizer,
        feature_extractor=fe,
        audio_start_id=int(tc.audio_start_token_id),
        audio_end_id=int(end_id),
        audio_pad_id=int(tc.audio_token_id),
        eos_ids=tuple(int(i) for i in eos if isinstance(i, int) and i != tokenizer.unk_token_id),
    )


__all__ = ["Family", "FAMILIES", "Omni", "load_omni", "family_of", "read_model_type"]
