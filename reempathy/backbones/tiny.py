"""The ``tiny`` backbone: a small random GLM model with GLM-4-Voice's special-token layout, built in seconds.

It is what tests, benchmarks and the out-of-the-box demo run on. Its answers are random
tokens until it is fine-tuned; the point is that every code path of a real backbone runs.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, Field, model_validator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

from reempathy.backbones.base import DELIMITER_TOKENS, Backbone, VocabLayout
from reempathy.backbones.glm4voice.prompt import GLM4_VOICE_STREAM, Glm4VoicePrompt
from reempathy.backbones.quantize import Quantize, quantize_weights
from reempathy.backbones.quiet import no_loading_bar
from reempathy.devices import DeviceName, resolve_device
from reempathy.errors import CheckpointError
from reempathy.options import STRICT, Seed
from reempathy.paths import check_name, describe_kind, resolved_kind

# Control tokens in GLM-4-Voice's order, then our delimiters; audio units follow.
CONTROL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
) + DELIMITER_TOKENS

# A small built-in corpus so the tokenizer has real merges; written for this project.
_CORPUS = """
I hear you. That sounds really hard, and it makes sense that you feel tired.
Thank you for telling me. I am here, and we can take this one step at a time.
It is okay to feel sad after a loss. Would you like to talk about what happened?
You did your best, and that matters. Let us think about what could help tonight.
That is wonderful news! You must be so proud of yourself after all that work.
I am sorry you had such a stressful day at work. What part weighed on you most?
Feeling lonely in a new city is common. Maybe we can find one small way to connect.
The user sounds anxious and needs reassurance before any practical advice.
The reply should acknowledge the feeling, then offer gentle support.
The wording is warm but a little generic; name the emotion more precisely.
My exam is tomorrow and I cannot sleep. My friend forgot my birthday again.
I finally got the job I wanted! My dog is sick and the vet is closed.
""".strip().splitlines()


class TinyOptions(BaseModel):
    """Options of the ``tiny`` backbone: the shape of the random model and its seed.

    Shapes are bounded to what a test model needs (a 4096-wide, 64-layer model is already far
    from tiny), and checked against each other the way the attention needs them.
    """

    model_config = STRICT
    # Options that do not change the weights or the vocabulary: a checkpoint may decode with others.
    runtime_options: ClassVar[frozenset[str]] = frozenset({"device", "dtype", "max_context"})

    seed: Seed = Field(0, description="seed of the random weights")
    hidden_size: int = Field(64, ge=8, le=4096)
    num_layers: int = Field(2, ge=1, le=64)
    num_heads: int = Field(4, ge=1, le=256)
    num_kv_heads: int = Field(2, ge=1, le=256)
    intermediate_size: int = Field(128, ge=8, le=16384)
    text_vocab: int = Field(512, ge=300, le=8192, description="size of the byte-level BPE text vocabulary")
    audio_units: int = Field(1024, ge=16, le=16384, description="number of audio-unit tokens")
    max_context: int = Field(2048, ge=64, le=131072)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: DeviceName = "cpu"
    path: str | None = Field(
        None, min_length=1, description="load a saved tiny model (save_pretrained directory) instead of building one"
    )
    quantize: Quantize = Field(
        "none", description="weight-only quantization through torchao (extra 'quant'): int8 (CPU, CUDA), int4 (CUDA)"
    )

    @model_validator(mode="after")
    def _heads_fit(self) -> "TinyOptions":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}; "
                "each head needs an equal share of the hidden size"
            )
        head_dim = self.hidden_size // self.num_heads
        if head_dim % 4:
            raise ValueError(
                f"hidden_size / num_heads = {head_dim}, but the rotary embedding needs a head size that is a multiple of 4"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}; "
                "grouped-query attention shares each key/value head among equal groups"
            )
        return self


@lru_cache(maxsize=8)
def _text_tokenizer(text_vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=text_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok


def build_tokenizer(text_vocab: int = 512, audio_units: int = 1024) -> PreTrainedTokenizerFast:
    """A fast tokenizer: byte-level BPE text ids first, then control tokens, then ``<|audio_N|>``."""
    base = Tokenizer.from_str(_text_tokenizer(text_vocab).to_str())
    tok = PreTrainedTokenizerFast(tokenizer_object=base, clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"additional_special_tokens": list(CONTROL_TOKENS)})
    tok.add_tokens([f"<|audio_{i}|>" for i in range(audio_units)], special_tokens=True)
    tok.eos_token = "<|endoftext|>"
    tok.pad_token = "<|endoftext|>"
    return tok


def layout_from_tokenizer(tok: PreTrainedTokenizerFast, vocab_size: int) -> VocabLayout:
    """Read the vocabulary layout back from a tokenizer built by :func:`build_tokenizer`."""
    vocab = tok.get_vocab()
    special = {name: vocab[name] for name in CONTROL_TOKENS}
    audio_offset = vocab["<|audio_0|>"]
    count = 0
    while f"<|audio_{count}|>" in vocab:
        if vocab[f"<|audio_{count}|>"] != audio_offset + count:
            raise CheckpointError("tiny tokenizer: audio tokens are not consecutive; rebuild it")
        count += 1
    return VocabLayout(
        vocab_size=vocab_size,
        text_end=min(special.values()),
        audio_offset=audio_offset,
        audio_count=count,
        special=special,
        stop_ids=(special["<|user|>"], special["<|endoftext|>"]),
    )


def build_model(options: TinyOptions, vocab_size: int) -> GlmForCausalLM:
    """A random GlmForCausalLM of the given shape; the caller's global RNG is left untouched."""
    config = GlmConfig(
        vocab_size=vocab_size,
        hidden_size=options.hidden_size,
        intermediate_size=options.intermediate_size,
        num_hidden_layers=options.num_layers,
        num_attention_heads=options.num_heads,
        num_key_value_heads=options.num_kv_heads,
        head_dim=options.hidden_size // options.num_heads,
        max_position_embeddings=options.max_context,
        partial_rotary_factor=0.5,
        attention_bias=True,
        pad_token_id=0,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        model = GlmForCausalLM(config)
    # The tiny model's default initialisation is so small that every logit is ~0; widen it so
    # sampling and greedy decoding are not decided by float noise.
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed + 1)
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5 * 4)
    return model


def load_tiny(options: TinyOptions) -> Backbone:
    """Build (or load from ``options.path``) the tiny backbone."""
    dtype = getattr(torch, options.dtype)
    device = resolve_device(options.device, "backbone option device")
    if options.path:
        tok, model = _load_saved(options.path, dtype)
    else:
        tok = build_tokenizer(options.text_vocab, options.audio_units)
        vocab_size = (len(tok) + 7) // 8 * 8
        model = build_model(options, vocab_size).to(dtype)
    model.to(device).eval()
    quantize_weights(model, options.quantize)
    layout = layout_from_tokenizer(tok, int(model.config.vocab_size))
    prompt = Glm4VoicePrompt(lambda text: tok.encode(text, add_special_tokens=False), layout, GLM4_VOICE_STREAM)
    return Backbone(
        name="tiny",
        model=model,
        tokenizer=tok,
        layout=layout,
        stream=GLM4_VOICE_STREAM,
        max_context=int(model.config.max_position_embeddings),
        prompt_builder=prompt,
        info={"seed": options.seed, "path": options.path, "quantize": options.quantize},
    )


def _load_saved(directory: str, dtype: torch.dtype) -> tuple[PreTrainedTokenizerFast, GlmForCausalLM]:
    """A tiny model and tokenizer written by ``save_pretrained``; CheckpointError naming what is wrong with the directory."""
    path = check_name(directory, "backbone option path", CheckpointError)
    kind = resolved_kind(path, "backbone option path", CheckpointError)
    if kind != "dir":
        state = "not found" if kind == "missing" else describe_kind(kind)
        raise CheckpointError(f"tiny backbone path {str(path)!r}: {state}; pass a directory written by save_pretrained")
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{path}: no config.json; pass a directory written by save_pretrained")
    try:
        raw = json.loads(config.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{config}: not valid JSON ({str(exc)[:80]}); save the model again") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "glm":
        raise CheckpointError(f"{config}: not the config of a tiny (GLM) model; save the model again")
    try:
        with no_loading_bar():
            tok = PreTrainedTokenizerFast.from_pretrained(path)
            model = GlmForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: the saved tiny model cannot be loaded ({reason}); save it again") from None
    return tok, model
