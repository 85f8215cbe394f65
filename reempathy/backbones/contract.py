"""What the decoder core needs of a backbone, checked once when a backbone is built.

A backbone factory (built-in or third-party) returns a :class:`~reempathy.backbones.base.Backbone`;
:func:`check_backbone` runs on it before any decode, so a backbone that breaks the contract
fails with one line naming what is wrong instead of a tensor error deep inside a decode. The
contract, rule by rule (docs/backbones.md explains each):

1. Vocabulary: text tokens are the ids ``[0, text_end)``; audio unit ``u`` is id
   ``audio_offset + u`` for ``0 <= u < audio_count`` (one contiguous range); every other id is
   special. ``layout.vocab_size`` is the length of the model's logits.
2. ``layout.special`` maps each control token's string to its id (outside the text and audio
   ranges); strategies look their delimiters up there (``<|begin_of_reflection|>`` …).
3. ``layout.stop_ids`` end an answer (the loop stops before the strategy is asked).
4. ``prompt_builder(turns)`` returns the prompt's token ids, ending where the assistant's
   answer begins.
5. The model is a transformers causal LM whose ``forward`` takes ``input_ids``, ``use_cache``,
   ``logits_to_keep`` and a cache (``past_key_values``, or ``cache`` in later 5.x releases).
6. ``attention-reweight`` needs the model to dispatch attention through transformers'
   ``AttentionInterface`` (``config._attn_implementation``), as every model with
   ``set_attn_implementation`` does.
"""

from __future__ import annotations

import inspect
from typing import Any

from reempathy.backbones.base import Backbone
from reempathy.errors import PluginError


def _logit_rows(model: Any) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and getattr(weight, "dim", lambda: 0)() == 2:
        return int(weight.shape[0])
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None) if config is not None else None
    return int(size) if isinstance(size, int) else None


def contract_problems(backbone: Any) -> list[str]:
    """Every way ``backbone`` breaks the contract above (empty when it keeps it)."""
    if not isinstance(backbone, Backbone):
        return [f"a backbone factory must return reempathy.api.Backbone, got {type(backbone).__name__}"]
    problems: list[str] = []
    lay = backbone.layout
    audio_end = lay.audio_offset + lay.audio_count
    if not 0 < lay.text_end <= lay.vocab_size:
        problems.append(f"layout.text_end {lay.text_end} is outside 1..vocab_size ({lay.vocab_size})")
    if lay.audio_count < 0 or (lay.audio_count and not (lay.text_end <= lay.audio_offset and audio_end <= lay.vocab_size)):
        problems.append(
            f"audio ids {lay.audio_offset}..{audio_end - 1} must lie after the text ids (text_end {lay.text_end}) "
            f"and inside the vocabulary ({lay.vocab_size})"
        )
    for name, token_id in lay.special.items():
        if not 0 <= token_id < lay.vocab_size or lay.is_text(token_id) or lay.is_audio(token_id):
            problems.append(f"special token {name!r} has id {token_id}, inside the text or audio range or the vocabulary's end")
            break
    bad_stop = [i for i in lay.stop_ids if not 0 <= i < lay.vocab_size]
    if bad_stop:
        problems.append(f"stop id {bad_stop[0]} is outside the vocabulary ({lay.vocab_size})")
    rows = _logit_rows(backbone.model)
    if rows is not None and rows != lay.vocab_size:
        problems.append(f"layout.vocab_size is {lay.vocab_size} but the model's logits have {rows} entries")
    forward = getattr(backbone.model, "forward", None)
    if forward is None:
        problems.append("the model has no forward method")
    else:
        params = inspect.signature(forward).parameters
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if "logits_to_keep" not in params and not takes_kwargs:
            problems.append("the model's forward takes no logits_to_keep (a transformers 5 causal LM does)")
        if not ({"past_key_values", "cache"} & set(params)) and not takes_kwargs:
            problems.append("the model's forward takes no cache (past_key_values)")
    if backbone.max_context < 2:
        problems.append(f"max_context is {backbone.max_context}; it must leave room for a prompt and an answer")
    if backbone.stream.text_tokens < 0 or backbone.stream.audio_tokens < 0:
        problems.append("stream policy counts must not be negative")
    if not callable(backbone.prompt_builder):
        problems.append("prompt_builder is not callable (turns -> token ids)")
    return problems


def check_backbone(backbone: Any, where: str = "backbone") -> Backbone:
    """Return ``backbone`` if it keeps the contract; a one-line :class:`PluginError` naming the first problems otherwise."""
    problems = contract_problems(backbone)
    if problems:
        raise PluginError(f"{where} breaks the backbone contract: {'; '.join(problems[:3])} (see docs/backbones.md)")
    return backbone


__all__ = ["check_backbone", "contract_problems"]
