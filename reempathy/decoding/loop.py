"""The single-row token loop: prefill once, then extend one KV cache, one answer at a time.

What happens to a sampled token (hooks, directive, forced tokens, phases, plans) is one row's
logic in :mod:`reempathy.decoding.row`, which the batched loop (:mod:`reempathy.decoding.batch`)
runs too; this loop decides only what goes through the model: the prefill, then after each step
every pending token (the sampled one and any forced with it) in one forward call.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from transformers import DynamicCache, StaticCache

from reempathy.backbones.base import Backbone
from reempathy.decoding.result import DecodeResult, build_result
from reempathy.decoding.row import Row, choose, session_plugin_manager


@dataclass
class LoopOptions:
    """Settings of the loop itself (the strategy and processors carry their own).

    ``cache="static"`` preallocates a transformers ``StaticCache`` of prompt + 2 × budget positions
    (forced tokens need room too), the shape ``torch.compile`` and CUDA graphs want. ``compile``
    runs the decode steps (not the prefill) through the model's compiled call; it needs the static
    cache and is skipped while an attention plan is active, whose per-phase Python state would
    make the graph recompile.
    """

    max_new_tokens: int = 128
    greedy: bool = False
    seed: int = 0
    strategy_name: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict)
    cache: Literal["dynamic", "static"] = "dynamic"
    compile: bool = False


def _cache_keyword(model: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` during 5.x; use whichever this version takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _compiled_call(model: Any) -> Any:
    """The model's compiled ``__call__``, cached on the model by transformers (or by us where it has none)."""
    getter = getattr(model, "get_compiled_call", None)
    if getter is not None:
        return getter(None)
    compiled = model.__dict__.get("_reempathy_compiled_call")
    if compiled is None:
        compiled = model.__dict__["_reempathy_compiled_call"] = torch.compile(model.__call__)
    return compiled


def decode(
    backbone: Backbone,
    prompt_ids: Sequence[int],
    strategy: object,
    processors: Sequence[object] = (),
    options: LoopOptions | None = None,
    *,
    prefill_inputs: dict[str, Any] | None = None,
) -> DecodeResult:
    """Decode one answer to ``prompt_ids`` with ``strategy`` and ``processors`` (plugin objects).

    ``prefill_inputs`` are extra keyword arguments of the model's first (prefill) call only, for
    backbones whose prompt carries more than token ids (audio features, say).
    """
    options = options or LoopOptions()
    model = backbone.model
    budget = min(options.max_new_tokens, backbone.max_context - len(prompt_ids))
    if options.cache == "static":
        context_limit = min(backbone.max_context, len(prompt_ids) + 2 * max(budget, 1))
    else:
        context_limit = backbone.max_context
    row = Row(
        backbone, prompt_ids, strategy, processors, options, context_limit=context_limit, prefill_inputs=prefill_inputs
    )
    if options.cache == "static":
        cache: Any = StaticCache(config=model.config, max_cache_len=context_limit)
    else:
        cache = DynamicCache(config=model.config)

    if row.wants_plan:
        from reempathy.decoding.attention import biased_attention

        attention_ctx: Any = biased_attention(model)
    else:
        attention_ctx = contextlib.nullcontext(None)
    compiled = options.compile and options.cache == "static" and not row.wants_plan
    step_call = _compiled_call(model) if compiled else model
    cache_kw = _cache_keyword(model)
    device = model.device
    greedy = options.greedy
    one = torch.empty(1, 1, dtype=torch.long, device=device)  # the usual step's input, refilled in place

    def forward(ids: list[int], call: Any = model, extra: dict[str, Any] | None = None) -> torch.Tensor:
        if len(ids) == 1:
            inputs = one.fill_(ids[0])
        else:
            inputs = torch.tensor([ids], device=device)
        out = call(input_ids=inputs, use_cache=True, logits_to_keep=1, **{cache_kw: cache}, **(extra or {}))
        # A compiled (CUDA-graph) call reuses its output buffer; processors edit logits in place.
        logits = out.logits[0, -1]
        return logits.clone() if compiled else logits

    with torch.inference_mode(), attention_ctx as controller:
        ids = row.begin()
        logits = forward(ids, model, row.prefill_inputs)
        row.prefilled(len(ids))
        if controller is not None:
            controller.set_plan(row.plan())
        while True:
            scores = logits.float() if logits.dtype != torch.float32 else logits
            row.logits(scores)
            token = choose((row,), scores.unsqueeze(0), greedy)[0]
            if row.accept(token) and controller is not None:
                controller.set_plan(row.plan())
            if row.done:
                break
            n = row.pending
            if n:  # nothing pending after a dropped token: sample again from these logits
                logits = forward(row.pending_ids(), step_call)
                row.forwarded(n)
    # Tokens appended after the last forward call: the answer ended, so nothing needs their keys.
    return row.finish()


__all__ = ["LoopOptions", "decode", "session_plugin_manager", "build_result"]
