"""``load_qwen25omni``: a Qwen2.5-Omni ``Backbone`` from a local directory in the published format.

The directory is checked before any weight is read (config ``model_type``, safetensors shards,
``spk_dict.pt`` when the talker is wanted), then loaded through transformers' native classes —
``Qwen2_5OmniForConditionalGeneration`` (thinker, talker, token2wav), or with ``talker = false``
``Qwen2_5OmniThinkerForConditionalGeneration`` alone — from safetensors, with no remote code.
A tensor the directory lacks is an error, never a silently random weight.

Where it decides:

- the decoder's model is the thinker; its spoken stream is text only
  (:data:`QWEN25OMNI_STREAM`), and speech comes from the talker (:mod:`.talker`);
- the delimiter tokens are added to the thinker's tokenizer after its largest id; embedding rows
  are grown (new rows = mean of the old) only when the checkpoint has no spare rows for them;
- stop ids and sampling defaults come from the directory's ``generation_config.json``
  (``<|im_end|>`` and ``<|endoftext|>`` when it names none).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import torch
from pydantic import BaseModel, Field

from reempathy.backbones.base import (
    DELIMITER_TOKENS,
    Backbone,
    StreamPolicy,
    VocabLayout,
)
from reempathy.backbones.glm4voice.config_map import read_config_json
from reempathy.backbones.base import grow_vocab_rows
from reempathy.backbones.glm4voice.loader import resolve_dtype
from reempathy.backbones.glm4voice.weights import read_shard_plan
from reempathy.backbones.quiet import no_loading_bar
from reempathy.backbones.qwen25omni.prompt import Qwen25OmniPrompt
from reempathy.backbones.qwen25omni.talker import Qwen25OmniTalker, TalkerSettings
from reempathy.devices import DeviceName, resolve_device
from reempathy.errors import CheckpointError
from reempathy.options import STRICT, RepetitionPenalty, Temperature, Text, TopK, TopP

BACKBONE_NAME = "qwen2.5-omni"
MODEL_TYPE = "qwen2_5_omni"
SPEAKERS_FILE = "spk_dict.pt"
# Text only: the thinker writes the answer's text; the talker makes its speech afterwards.
QWEN25OMNI_STREAM = StreamPolicy(text_tokens=1, audio_tokens=0)
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty")
# Bounds of the talker's budget and token2wav's steps: far beyond any answer (the published defaults are
# 4096 and 10), far below what would overflow a tensor size or run for days.
MAX_TALKER_TOKENS = 2**16
MAX_TOKEN2WAV_STEPS = 1000


class Qwen25OmniOptions(BaseModel):
    """Options of the ``qwen2.5-omni`` backbone (the ``talker_*`` ones are transformers' ``generate()`` defaults)."""

    model_config = STRICT
    # Options that do not change the thinker's weights, its vocabulary or the training sequences, so a
    # checkpoint decodes with other values: the same weights in another directory, dtype or device, the
    # talker on or off (a checkpoint trained with talker = false speaks with talker = true: the adapter
    # is on the thinker, which is the same either way) and everything about how the talker speaks.
    # system_prompt is not among them: training writes it into every prompt, so the adapter learnt it.
    runtime_options: ClassVar[frozenset[str]] = frozenset(
        {
            "path",
            "dtype",
            "device",
            "talker",
            "talker_speaker",
            "talker_greedy",
            "talker_temperature",
            "talker_top_k",
            "talker_top_p",
            "talker_repetition_penalty",
            "talker_max_new_tokens",
            "token2wav_steps",
        }
    )

    path: str = Field(min_length=1, description="local Qwen2.5-Omni directory (e.g. Qwen2.5-Omni-7B or -3B), safetensors")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto", description="thinker and talker dtype; auto = float32 on CPU, bfloat16 on CUDA (token2wav is float32)"
    )
    device: DeviceName = Field("auto", description="torch device; auto = cuda if available, else cpu")
    talker: bool = Field(True, description="false: load the thinker alone (text out, no speech; ~10 GB less for 7B)")
    system_prompt: Text | None = Field(
        None, description="replaces the published system prompt; an empty string leaves the system message out"
    )
    talker_speaker: Text = Field("Chelsie", min_length=1, description="a voice of the checkpoint's spk_dict.pt")
    talker_greedy: bool = Field(False, description="pick the most likely codec token instead of sampling")
    talker_temperature: Temperature = 0.9
    talker_top_k: TopK = 40
    talker_top_p: TopP = 0.8
    talker_repetition_penalty: RepetitionPenalty = 1.05
    talker_max_new_tokens: int = Field(
        4096, ge=1, le=MAX_TALKER_TOKENS, description=f"codec tokens at most per answer (1 to {MAX_TALKER_TOKENS})"
    )
    token2wav_steps: int = Field(
        10, ge=2, le=MAX_TOKEN2WAV_STEPS, description=f"ODE steps of token2wav's flow matching (2 to {MAX_TOKEN2WAV_STEPS})"
    )

    def talker_settings(self) -> TalkerSettings:
        return TalkerSettings(
            speaker=self.talker_speaker,
            greedy=self.talker_greedy,
            temperature=self.talker_temperature,
            top_k=self.talker_top_k,
            top_p=self.talker_top_p,
            repetition_penalty=self.talker_repetition_penalty,
            max_new_tokens=self.talker_max_new_tokens,
            token2wav_steps=self.token2wav_steps,
        )


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings while loading (the published config trips its own id range checks) stay quiet,
    and so does its loading bar (:func:`~reempathy.backbones.quiet.no_loading_bar`)."""
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with no_loading_bar():
            yield
    finally:
        logging.set_verbosity(before)


def check_directory(path: Path, talker: bool) -> dict[str, Any]:
    """Everything that can be checked without reading weights; returns the parsed ``config.json``."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass the local directory of the Qwen2.5-Omni checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    raw = read_config_json(path)
    if raw.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"{path / 'config.json'} has model_type {raw.get('model_type')!r}; backbone {BACKBONE_NAME!r} loads "
            f"Qwen2.5-Omni checkpoints (model_type {MODEL_TYPE!r})"
        )
    read_shard_plan(path)  # safetensors present and readable (a .bin-only directory is refused)
    if talker and not (path / SPEAKERS_FILE).is_file():
        raise CheckpointError(
            f"{path / SPEAKERS_FILE} is missing; the talker needs the checkpoint's speakers "
            "(or set backbone option talker = false for text only)"
        )
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path} has no tokenizer files (tokenizer.json / tokenizer_config.json); re-download the checkpoint")
    return raw


def _from_pretrained(cls: type, path: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """``cls`` loaded from safetensors; ``CheckpointError`` naming any tensor the directory lacks."""
    from transformers import PreTrainedModel

    try:
        # PreTrainedModel's loader, not Qwen2_5OmniForConditionalGeneration's override: that one drops
        # the loading info (it loads the speakers itself, which `load_speakers` does below).
        model, info = PreTrainedModel.from_pretrained.__func__(  # type: ignore[attr-defined]
            cls, str(path), dtype=dtype, device_map={"": str(device)}, use_safetensors=True, output_loading_info=True
        )
    except (OSError, RuntimeError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: the weights cannot be loaded ({reason}); re-download the checkpoint") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            f"{path} lacks tensors {', '.join(missing[:3])}{more}; the checkpoint is incomplete, re-download it"
        )
    return model.eval()


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: the tokenizer cannot be loaded ({e}); re-download the checkpoint") from None


def chat_template(path: Path, tokenizer: Any) -> str:
    """The checkpoint's chat template: the processor's (``chat_template.json`` / ``.jinja``) or the tokenizer's."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = path / "chat_template.json"
    if as_json.is_file():
        try:
            template = json.loads(as_json.read_text(encoding="utf-8"))["chat_template"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{as_json} holds no chat template ({e}); re-download the checkpoint") from None
        if isinstance(template, str):
            return template
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        return tokenizer.chat_template
    raise CheckpointError(f"{path} has no chat template (chat_template.json / .jinja); re-download the checkpoint")


def add_delimiters(tokenizer: Any, thinker: Any) -> dict[str, int]:
    """Add the delimiter tokens the tokenizer lacks after its largest id; grow the thinker's rows if needed."""
    vocab = tokenizer.get_vocab()
    new = [t for t in DELIMITER_TOKENS if t not in vocab]
    if not new:
        return {}
    largest = max(vocab.values())
    tokenizer.add_tokens(new, special_tokens=True)
    ids = dict(zip(new, tokenizer.convert_tokens_to_ids(new)))
    if sorted(ids.values()) != list(range(largest + 1, largest + 1 + len(new))):
        raise CheckpointError(f"the tokenizer gave the delimiters ids {ids}, not the ids after its largest ({largest})")
    rows = int(thinker.get_input_embeddings().num_embeddings)
    if max(ids.values()) >= rows:
        grow_vocab_rows(thinker, max(ids.values()) + 1)
    return ids


def build_layout(tokenizer: Any, vocab_size: int, eos: Any) -> VocabLayout:
    """Text ids below the first added token; every added token is special; stop at ``eos`` (or im_end/endoftext)."""
    added = {tok.content: int(i) for i, tok in tokenizer.added_tokens_decoder.items()}
    if not added:
        raise CheckpointError("the tokenizer has no added tokens; it is not a Qwen2.5-Omni tokenizer")
    if eos is None:
        stops = [added[t] for t in ("<|im_end|>", "<|endoftext|>") if t in added]
    else:
        stops = [int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos])]
    if not stops:
        raise CheckpointError("the checkpoint names no stop token (generation_config.json eos_token_id, or <|im_end|>)")
    return VocabLayout(
        vocab_size=vocab_size,
        text_end=min(added.values()),
        audio_offset=vocab_size,
        audio_count=0,
        special=added,
        stop_ids=tuple(dict.fromkeys(stops)),
    )


def _clear_stale_rope_deltas(thinker: Any) -> None:
    """Forget the thinker's M-RoPE deltas at a prefill that does not recompute them.

    The thinker keeps the deltas of its last call that passed an attention mask (``generate()``,
    a training batch) and adds them to the positions of later cached steps. Our loop's prefill
    passes no mask, so the thinker does not recompute them; for text and audio prompts the
    positions are plain 1-D (deltas 0), which is what the thinker assumes when it holds none.
    """

    def hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prefill = cache is None or cache.get_seq_length() == 0
        if prefill and kwargs.get("attention_mask") is None and kwargs.get("position_ids") is None:
            module.model.rope_deltas = None

    thinker.register_forward_pre_hook(hook, with_kwargs=True)


def load_qwen25omni(options: Qwen25OmniOptions) -> Backbone:
    """A Qwen2.5-Omni ``Backbone`` from ``options.path``: the thinker decodes, the talker (optional) speaks."""
    with quiet_transformers():
        return _load(options)


def _load(options: Qwen25OmniOptions) -> Backbone:
    from transformers import (
        GenerationConfig,
        Qwen2_5OmniForConditionalGeneration,
        Qwen2_5OmniThinkerForConditionalGeneration,
        WhisperFeatureExtractor,
    )

    path = Path(options.path).expanduser()
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    check_directory(path, options.talker)
    tokenizer = _load_tokenizer(path)
    template = chat_template(path, tokenizer)
    features = None
    if (path / "preprocessor_config.json").is_file():
        try:
            features = WhisperFeatureExtractor.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / 'preprocessor_config.json'} cannot be read ({e}); re-download it") from None

    talker = None
    if options.talker:
        full = _from_pretrained(Qwen2_5OmniForConditionalGeneration, path, dtype, device)
        try:
            full.load_speakers(str(path / SPEAKERS_FILE))  # torch.load(weights_only=True): tensors only
        except Exception as e:  # torch raises several types for a damaged or unsafe pickle
            raise CheckpointError(f"{path / SPEAKERS_FILE} cannot be read ({type(e).__name__}); re-download it") from None
        thinker = full.thinker
        token2wav = full.token2wav.float()  # transformers runs token2wav in float32 whatever the dtype
    else:
        thinker = _from_pretrained(Qwen2_5OmniThinkerForConditionalGeneration, path, dtype, device)
    delimiters = add_delimiters(tokenizer, thinker)
    generation = GenerationConfig.from_pretrained(str(path)) if (path / "generation_config.json").is_file() else None
    eos = getattr(generation, "eos_token_id", None)
    rows = int(thinker.get_input_embeddings().num_embeddings)
    layout = build_layout(tokenizer, rows, eos)
    sampling = {k: getattr(generation, k) for k in _SAMPLING_KEYS if generation is not None and getattr(generation, k, None) is not None}
    thinker.generation_config = GenerationConfig(
        eos_token_id=list(layout.stop_ids), pad_token_id=tokenizer.pad_token_id, do_sample=bool(sampling), **sampling
    )
    _clear_stale_rope_deltas(thinker)
    thinker_config = thinker.config
    audio_ids = [int(thinker_config.audio_token_index), int(thinker_config.image_token_index), int(thinker_config.video_token_index)]
    if options.talker:
        talker = Qwen25OmniTalker(thinker, full.talker, token2wav, full.speaker_map, options.talker_settings(), audio_ids)
    special = tuple(tok.content for tok in tokenizer.added_tokens_decoder.values() if tok.special)
    prompt = Qwen25OmniPrompt(
        tokenizer=tokenizer,
        chat_template=template,
        feature_extractor=features,
        special_tokens=special,
        device=device,
        dtype=dtype,
        system_prompt=options.system_prompt,
        source=str(path),
    )
    return Backbone(
        name=BACKBONE_NAME,
        model=thinker,
        tokenizer=tokenizer,
        layout=layout,
        stream=QWEN25OMNI_STREAM,
        max_context=int(thinker_config.get_text_config(decoder=True).max_position_embeddings),
        prompt_builder=prompt,
        sampling_defaults=sampling,
        talker=talker,
        reads_audio=True,
        info={
            "path": str(path),
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "talker": options.talker,
            "delimiters_added": delimiters,
            "text_end": layout.text_end,
        },
    )


__all__ = ["Qwen25OmniOptions", "load_qwen25omni", "QWEN25OMNI_STREAM", "BACKBONE_NAME"]
