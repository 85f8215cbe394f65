"""``load_glm4voice``: a GLM-4-Voice ``Backbone`` from a published or a converted directory, no remote code.

A published directory (config.json ``model_type: chatglm``) is read natively: the model is
built on the meta device and each safetensors shard is mapped to native names and assigned
in place, so the weights are read once and never held twice. A converted directory
(``model_type: glm``, written by ``convert_glm4voice``) is a plain transformers checkpoint.
``trust_remote_code`` is never passed; the checkpoint's Python files are never imported.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, Field
from transformers import GenerationConfig, GlmForCausalLM, PreTrainedTokenizerFast
from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

from reempathy.backbones.base import Backbone
from reempathy.backbones.glm4voice import config_map
from reempathy.backbones.glm4voice.checkpoint import OriginalCheckpoint, model_type, open_original
from reempathy.backbones.glm4voice.layout import build_layout, plan_delimiters
from reempathy.backbones.glm4voice.prompt import GLM4_VOICE_STREAM, Glm4VoicePrompt
from reempathy.backbones.glm4voice.tokenizer import encode_plain, with_added_tokens, wrap
from reempathy.backbones.glm4voice.weights import iter_native_shards, pad_rows
from reempathy.backbones.quantize import Quantize, quantize_weights
from reempathy.devices import DeviceName, resolve_device
from reempathy.errors import CheckpointError
from reempathy.options import STRICT, Text

BACKBONE_NAME = "glm-4-voice"
SAMPLING_DEFAULTS = {"temperature": 0.2, "top_p": 0.8}  # the published demo's defaults


class Glm4VoiceOptions(BaseModel):
    """Options of the ``glm-4-voice`` backbone."""

    model_config = STRICT
    # Options that do not change the weights: the same model may sit in another directory (published
    # or converted), run in another dtype, on another device, with other speech parts; a checkpoint
    # trained on it decodes with any of these (delimiter ids and shapes are still checked). Not the
    # system prompt: training writes it into every sequence, so the adapter learnt it (as on qwen2.5-omni).
    runtime_options: ClassVar[frozenset[str]] = frozenset({"path", "dtype", "device", "tokenizer_path", "decoder_path"})

    path: str = Field(min_length=1, description="local glm-4-voice-9b directory, published (chatglm) or converted (glm)")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto", description="weight dtype; auto = float32 on CPU, bfloat16 on CUDA"
    )
    device: DeviceName = Field("auto", description="torch device; auto = cuda if available, else cpu")
    system_prompt: Text | None = Field(
        None, description="replaces the published system prompt; an empty string leaves the system block out"
    )
    tokenizer_path: str | None = Field(None, description="glm-4-voice-tokenizer directory: speech in (WAV → units)")
    decoder_path: str | None = Field(None, description="glm-4-voice-decoder directory: speech out (units → WAV)")
    quantize: Quantize = Field(
        "none", description="weight-only quantization through torchao (extra 'quant'): int8 (CPU, CUDA), int4 (CUDA, bfloat16)"
    )


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return config_map.torch_dtype_of(dtype)


def load_glm4voice(options: Glm4VoiceOptions) -> Backbone:
    """A GLM-4-Voice ``Backbone`` from ``options.path`` (published or converted layout)."""
    path = Path(options.path).expanduser()
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    speech_tokenizer, speech_decoder = _load_speech(options, device)  # before the LM: fail fast on a bad path
    kind = model_type(path)
    if kind == config_map.CHATGLM_MODEL_TYPE:
        ck = open_original(path)
        model = materialize(ck, dtype, device)
        tokenizer, text_end, added, new = ck.tokenizer, ck.text_end, ck.added, ck.delimiters
        converted = False
    elif kind == config_map.NATIVE_MODEL_TYPE:
        model, tokenizer, text_end, added, new = _load_converted(path, dtype, device)
        converted = True
    else:
        raise CheckpointError(
            f"{path / 'config.json'} has model_type {kind!r}; expected 'chatglm' (the published glm-4-voice-9b) "
            "or 'glm' (a directory written by `reempathy convert`)"
        )

    quantize_weights(model, options.quantize)
    source = str(path / ("tokenizer.json" if converted else "tokenizer_config.json"))
    layout = build_layout(added, text_end, model.config.vocab_size, model.config.eos_token_id, source)
    _check_speech_units(speech_tokenizer, speech_decoder, layout.audio_count, options)
    model.generation_config = GenerationConfig(
        eos_token_id=list(layout.stop_ids), pad_token_id=model.config.pad_token_id, **SAMPLING_DEFAULTS, do_sample=True
    )
    return Backbone(
        name=BACKBONE_NAME,
        model=model,
        tokenizer=tokenizer,
        layout=layout,
        stream=GLM4_VOICE_STREAM,
        max_context=int(model.config.max_position_embeddings),
        prompt_builder=Glm4VoicePrompt(partial(encode_plain, tokenizer), layout, system_prompt=options.system_prompt),
        sampling_defaults=dict(SAMPLING_DEFAULTS),
        speech_tokenizer=speech_tokenizer,
        speech_decoder=speech_decoder,
        info={
            "path": str(path),
            "converted": converted,
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "quantize": options.quantize,
            "text_end": text_end,
            "audio_offset": layout.audio_offset,
            "audio_count": layout.audio_count,
            "delimiters_added": {s.content: s.id for s in new},
        },
    )


def _load_speech(options: Glm4VoiceOptions, device: torch.device) -> tuple[Any, Any]:
    """The speech tokenizer and decoder named by the options (``None`` where no path is given)."""
    tokenizer = decoder = None
    if options.tokenizer_path is not None:
        from reempathy.speech.tokenizer import load_speech_tokenizer

        tokenizer = load_speech_tokenizer(options.tokenizer_path, device=device)
    if options.decoder_path is not None:
        from reempathy.speech.decoder import load_speech_decoder

        decoder = load_speech_decoder(options.decoder_path, device=device)
    return tokenizer, decoder


def _check_speech_units(tokenizer: Any, decoder: Any, audio_count: int, options: Glm4VoiceOptions) -> None:
    """The speech tokenizer may make only units the model has; the decoder must read every one of them."""
    if tokenizer is not None and tokenizer.vocab_size > audio_count:
        raise CheckpointError(
            f"{options.tokenizer_path} makes units 0..{tokenizer.vocab_size - 1} but the model has {audio_count} "
            "audio tokens; the speech tokenizer and the language model do not belong together"
        )
    if decoder is not None and decoder.vocab_size < audio_count:
        raise CheckpointError(
            f"{options.decoder_path} reads units 0..{decoder.vocab_size - 1} but the model has {audio_count} "
            "audio tokens; the speech decoder and the language model do not belong together"
        )


def materialize(ck: OriginalCheckpoint, dtype: torch.dtype, device: torch.device) -> GlmForCausalLM:
    """The native model for a published checkpoint: built on meta, filled shard by shard."""
    with torch.device("meta"):
        model = GlmForCausalLM(ck.config)
    expected = set(model.state_dict())
    loaded: set[str] = set()
    for shard, tensors in iter_native_shards(ck.plan, ck.config, dtype=dtype, device=device):
        result = model.load_state_dict(tensors, strict=False, assign=True)
        if result.unexpected_keys:
            raise CheckpointError(f"{ck.directory / shard} maps to unknown native tensors {result.unexpected_keys[:3]}")
        loaded |= set(tensors)
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(
            f"{ck.plan.describe()} leaves native tensors {missing[:3]} unset; re-download the checkpoint"
        )
    # Non-persistent buffers were created on meta; the rotary tables are recomputed from the config (float32).
    model.model.rotary_emb = GlmRotaryEmbedding(config=ck.config).to(device)
    model.config.dtype = dtype
    return model.eval()


def _load_converted(
    path: Path, dtype: torch.dtype, device: torch.device
) -> tuple[GlmForCausalLM, PreTrainedTokenizerFast, int, dict[str, int], list]:
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{path / 'tokenizer.json'} is missing; re-run `reempathy convert` on the published checkpoint"
        )
    try:
        model = GlmForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": str(device)}, use_safetensors=True)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:  # a damaged file surfaces as any of these
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: the converted checkpoint cannot be loaded ({reason}); re-run `reempathy convert`"
        ) from None
    model.eval()
    added = {t.content: i for i, t in tokenizer.backend_tokenizer.get_added_tokens_decoder().items()}
    if not added:
        raise CheckpointError(f"{path / 'tokenizer.json'} has no added tokens; it is not a GLM-4-Voice tokenizer")
    text_end = min(added.values())
    new = plan_delimiters(added)
    if new:
        backend = with_added_tokens(tokenizer.backend_tokenizer, new)
        tokenizer = wrap(backend, model_max_length=int(model.config.max_position_embeddings))
        added.update({s.content: s.id for s in new})
        rows = max(added.values()) + 1
        if rows > model.config.vocab_size:
            grow_vocab_rows(model, rows)
    return model, tokenizer, text_end, added, new


@torch.no_grad()
def grow_vocab_rows(model: GlmForCausalLM, rows: int) -> None:
    """Resize input and output embeddings to ``rows``; new rows are the mean of the old (as in conversion)."""
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    model.resize_token_embeddings(rows, mean_resizing=False)
    model.get_input_embeddings().weight.copy_(pad_rows(old_in, rows))
    model.get_output_embeddings().weight.copy_(pad_rows(old_out, rows))


__all__ = ["Glm4VoiceOptions", "load_glm4voice"]
