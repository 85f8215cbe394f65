"""The single-row token loop: prefill once, then extend one KV cache, one answer at a time.

What happens to a sampled token (hooks, directive, forced tokens, phases, plans) is one row's
logic in :mod:`reempathy.decoding.row`, which the batched loop (:mod:`reempathy.decoding.batch`)
runs too; this loop decides only what goes through the model: the prefill, then after each step
every pending token (the sampled one and any forced with it) in one forward call — on the static
path (``cache = "static"``, :mod:`reempathy.decoding.static`) in calls of one or two tokens, the
widths of its step graphs.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from transformers import DynamicCache

from reempathy.backbones.base import Backbone
from reempathy.decoding.result import DecodeResult, build_result
from reempathy.decoding.row import Row, choose, session_plugin_manager
from reempathy.decoding.transfer import to_device
from reempathy.errors import ConfigError


@dataclass
class LoopOptions:
    """Settings of the loop itself (the strategy and processors carry their own).

    ``cache="static"`` decodes on a preallocated transformers ``StaticCache`` of at least prompt +
    2 × budget positions (forced tokens need room too), rounded up to a shape bucket and reused by
    later answers of the same bucket (:mod:`reempathy.decoding.static`). ``compile`` runs the
    decode steps (not the prefill) through ``torch.compile`` (CUDA graphs on a GPU); it needs the
    static cache. Attention plans included: the bias is read from a preallocated tensor updated
    in place, so a phase change never recompiles; forced tokens go through a second, two-token
    graph. Each shape compiles on its first answer; later answers of that shape compile nothing.
    ``attention`` picks how the static path carries a plan: ``"sdpa-bias"`` (a dense bias in
    SDPA's mask, the reference) or ``"flex"`` (key ranges in FlexAttention's fused kernel inside
    the compiled steps); ``"flex"`` needs the static cache.

    Budgets: ``max_new_tokens`` caps every generated token (spoken, hidden and control) and is the
    guard against runaway answers; ``max_spoken_tokens`` caps the spoken stream (text and audio
    tokens) and ``max_hidden_tokens`` the hidden one (reflections and thoughts, all together), so
    that strategies that think between spoken chunks get the same chance to speak as those that do
    not. Whichever is reached first ends the answer and names itself as the stop reason.
    """

    max_new_tokens: int = 128
    max_spoken_tokens: int | None = None
    max_hidden_tokens: int | None = None
    greedy: bool = False
    seed: int = 0
    strategy_name: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict)
    cache: Literal["dynamic", "static"] = "dynamic"
    compile: bool = False
    attention: Literal["sdpa-bias", "flex"] = "sdpa-bias"

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa-bias", "flex"):
            raise ConfigError(f'decode.attention must be "sdpa-bias" or "flex", got {self.attention!r}')
        if self.attention == "flex" and self.cache != "static":
            raise ConfigError(
                'decode.attention = "flex" needs decode.cache = "static" (and decode.compile = true to run '
                "FlexAttention's fused kernel); on a dynamic cache use the default \"sdpa-bias\""
            )


def _cache_keyword(model: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` during 5.x; use whichever this version takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


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
    static = options.cache == "static"
    if static:
        context_limit = min(backbone.max_context, len(prompt_ids) + 2 * max(budget, 1))
    else:
        context_limit = backbone.max_context
    row = Row(
        backbone, prompt_ids, strategy, processors, options, context_limit=context_limit, prefill_inputs=prefill_inputs
    )
    compiled = static and options.compile
    cache_kw = _cache_keyword(model)
    device = model.device
    greedy = options.greedy
    one = torch.empty(1, 1, dtype=torch.long, device=device)  # the usual step's input, refilled in place

    def forward(ids: list[int], call: Any, cache: Any, extra: dict[str, Any] | None = None) -> torch.Tensor:
        if len(ids) == 1:
            inputs = one.fill_(ids[0])
        else:  # queued without a host-device round trip (transfer.py)
            inputs = to_device([ids], device)
        out = call(input_ids=inputs, use_cache=True, logits_to_keep=1, **{cache_kw: cache}, **(extra or {}))
        # A compiled (CUDA-graph) call reuses its output buffer; processors edit logits in place.
        logits = out.logits[0, -1]
        return logits.clone() if compiled else logits

    with torch.inference_mode(), contextlib.ExitStack() as stack:
        controller: Any = None
        if static:
            from reempathy.decoding import static as static_path

            engine = static_path.engine(model)
            columns = static_path.columns_for(context_limit, backbone.max_context)
            slot = stack.enter_context(engine.lease(1, columns, row.wants_plan, options.attention))
            cache: Any = slot.cache
            controller = slot.controller if row.wants_plan else None
            step_call = engine.stepper(slot, compiled)
        else:
            cache = DynamicCache(config=model.config)
            step_call = model
        if row.wants_plan:
            from reempathy.decoding.attention import biased_attention

            controller = stack.enter_context(biased_attention(model, controller))
        ids = row.begin()
        logits = forward(ids, model, cache, row.prefill_inputs)
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
                pending = row.pending_ids()
                if static:  # only the step graphs' widths: one token, or two (sampled + a delimiter)
                    start = 0
                    for width in static_path.split_widths(n):
                        logits = forward(pending[start : start + width], step_call, cache)
                        start += width
                else:
                    logits = forward(pending, step_call, cache)
                row.forwarded(n)
    # Tokens appended after the last forward call: the answer ended, so nothing needs their keys.
    return row.finish()


__all__ = ["LoopOptions", "decode", "session_plugin_manager", "build_result"]
