"""Reading a published glm-4-voice-9b directory: config, tokenizer, shard layout, all checked up front."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import GlmConfig, PreTrainedTokenizerFast

from reempathy.backbones.glm4voice import config_map
from reempathy.backbones.glm4voice.layout import audio_range, plan_delimiters
from reempathy.backbones.glm4voice.tokenizer import (
    AddedSpec,
    build_backend,
    read_added_tokens,
    read_tiktoken_ranks,
    wrap,
)
from reempathy.backbones.glm4voice.weights import ShardPlan, expected_chatglm_shapes, read_shard_plan, validate
from reempathy.errors import CheckpointError

TIKTOKEN_FILE = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass
class OriginalCheckpoint:
    """A validated published checkpoint, with its native config and fast tokenizer (delimiters added)."""

    directory: Path
    raw_config: dict
    config: GlmConfig  # vocab_size grown past padded_vocab_size only if the delimiters need rows
    plan: ShardPlan
    text_end: int
    tokenizer: PreTrainedTokenizerFast
    added: dict[str, int]  # every added token (content → id), delimiters included
    delimiters: list[AddedSpec]  # the delimiters this load added
    resized: bool


def check_directory(directory: Path) -> None:
    """Raise ``CheckpointError`` unless ``directory`` is an existing directory."""
    if not directory.exists():
        raise CheckpointError(f"{directory} does not exist; pass the local directory of the GLM-4-Voice checkpoint")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; pass the checkpoint directory that holds config.json")


def model_type(directory: Path) -> str:
    """``model_type`` from ``config.json`` (the caller dispatches on chatglm vs glm)."""
    check_directory(directory)
    return str(config_map.read_config_json(directory).get("model_type"))


def open_original(directory: Path) -> OriginalCheckpoint:
    """Validate a published (model_type chatglm) checkpoint directory and build its tokenizer; reads no weights."""
    check_directory(directory)
    raw = config_map.read_config_json(directory)
    config_path = directory / "config.json"
    if raw.get("model_type") == config_map.NATIVE_MODEL_TYPE:
        raise CheckpointError(f"{config_path} has model_type 'glm': {directory} is already converted; load it directly")
    base = config_map.chatglm_to_glm_config(raw, config_path)

    ranks = read_tiktoken_ranks(directory / TIKTOKEN_FILE)
    text_end = len(ranks)
    declared = read_added_tokens(directory / TOKENIZER_CONFIG, text_end)
    audio_range({s.content: s.id for s in declared}, str(directory / TOKENIZER_CONFIG))
    beyond = [s for s in declared if s.id >= base.vocab_size]
    if beyond:
        raise CheckpointError(
            f"{directory / TOKENIZER_CONFIG} gives {beyond[0].content!r} id {beyond[0].id}, past the model's "
            f"{base.vocab_size} embedding rows; the tokenizer does not belong to these weights"
        )
    delimiters = plan_delimiters({s.content: s.id for s in declared})
    specs = declared + delimiters
    rows = max(base.vocab_size, max(s.id for s in specs) + 1)
    cfg = config_map.chatglm_to_glm_config(raw, config_path, vocab_rows=rows) if rows != base.vocab_size else base

    plan = read_shard_plan(directory)
    validate(plan, expected_chatglm_shapes(raw, base))

    tokenizer = wrap(build_backend(ranks, specs), model_max_length=cfg.max_position_embeddings)
    return OriginalCheckpoint(
        directory=directory,
        raw_config=raw,
        config=cfg,
        plan=plan,
        text_end=text_end,
        tokenizer=tokenizer,
        added={s.content: s.id for s in specs},
        delimiters=delimiters,
        resized=rows != base.vocab_size,
    )
