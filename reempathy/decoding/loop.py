"""The token loop: prefill once, then extend one KV cache, asking the session's plugins at each step."""

from __future__ import annotations

import contextlib
import inspect
import time
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import pluggy
import torch
from transformers import DynamicCache, StaticCache

from reempathy.backbones.base import Backbone
from reempathy.decoding import hookspecs
from reempathy.decoding.directives import CONTINUE, Stop, Switch
from reempathy.decoding.result import Counts, DecodeResult, HiddenSegment, SpokenChunk, Timings
from reempathy.decoding.session import DecodeSession
from reempathy.decoding.spans import SPEAK, SPOKEN_AUDIO, SPOKEN_TEXT
from reempathy.errors import InputError


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


class _SessionPluginManager(pluggy.PluginManager):
    """pluggy's manager, remembering per class which attributes are hook implementations.

    On ``register`` pluggy inspects every attribute of a plugin object (and of the hookspecs
    module) with ``inspect.getattr_static``: a hundred attributes, over a millisecond per answer
    for three plugins, as much as the decode steps of a small model. For a class attribute the
    answer never changes, so it is looked up once per class; module plugins take pluggy's own
    path every time.
    """

    # plugin class (or hookspec namespace) -> attribute name -> pluggy's options or None
    _by_class: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
    _HOOKABLE = (types.FunctionType, types.MethodType, classmethod, staticmethod)

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        if isinstance(plugin, types.ModuleType):
            return super().parse_hookimpl_opts(plugin, name)
        own = getattr(plugin, "__dict__", None)
        if own is not None and name in own:
            # Data (options, masks, tensors) is never a hook; pluggy only takes functions and methods.
            return super().parse_hookimpl_opts(plugin, name) if isinstance(own[name], self._HOOKABLE) else None
        known = self._by_class.setdefault(type(plugin), {})
        if name not in known:
            known[name] = super().parse_hookimpl_opts(plugin, name)
        return known[name]

    def parse_hookspec_opts(self, module_or_class: Any, name: str) -> Any:
        # The hookspecs module is the same for every session: read it once.
        known = self._by_class.setdefault(module_or_class, {})
        if name not in known:
            known[name] = super().parse_hookspec_opts(module_or_class, name)
        return known[name]


def session_plugin_manager(strategy: object, processors: Sequence[object] = ()) -> pluggy.PluginManager:
    """A plugin manager holding only this session's plugins.

    pluggy calls the most recently registered implementation first, so processors are registered
    in reverse to run in config order; strategies mark their logits hook ``tryfirst``.
    """
    pm = _SessionPluginManager("reempathy")
    pm.add_hookspecs(hookspecs)
    for i, proc in enumerate(reversed(list(processors))):
        pm.register(proc, name=f"processor-{len(processors) - 1 - i}-{type(proc).__name__}")
    pm.register(strategy, name=f"strategy-{type(strategy).__name__}")
    return pm


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


def _sample(scores: torch.Tensor, greedy: bool, generator: torch.Generator) -> int:
    if greedy:
        return int(torch.argmax(scores))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def decode(
    backbone: Backbone,
    prompt_ids: Sequence[int],
    strategy: object,
    processors: Sequence[object] = (),
    options: LoopOptions | None = None,
    prefill_inputs: Mapping[str, Any] | None = None,
) -> DecodeResult:
    """Decode one answer to ``prompt_ids`` with ``strategy`` and ``processors`` (plugin objects).

    ``prefill_inputs`` (from ``PromptInputs``, e.g. audio features) are passed to the model's
    first call only, beside the prompt ids.
    """
    options = options or LoopOptions()
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise InputError("the prompt is empty; give --prompt TEXT or --units FILE")
    if len(prompt_ids) >= backbone.max_context:
        raise InputError(
            f"the prompt is {len(prompt_ids)} tokens, longer than the backbone's context of "
            f"{backbone.max_context}; shorten it"
        )
    if options.max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {options.max_new_tokens}")
    pm = session_plugin_manager(strategy, processors)
    hook = pm.hook
    model = backbone.model
    device = model.device
    generator = torch.Generator(device=device)
    generator.manual_seed(options.seed)
    session = DecodeSession(backbone, prompt_ids, generator, options)
    stop_ids = frozenset(backbone.layout.stop_ids)
    budget = min(options.max_new_tokens, backbone.max_context - len(prompt_ids))
    wants_plan = bool(hook.reempathy_attention_plan.get_hookimpls())

    if wants_plan:
        from reempathy.decoding.attention import biased_attention

        attention_ctx: Any = biased_attention(model)
    else:
        attention_ctx = contextlib.nullcontext(None)

    if options.cache == "static":
        context_limit = min(backbone.max_context, len(prompt_ids) + 2 * budget)
        cache: Any = StaticCache(config=model.config, max_cache_len=context_limit)
    else:
        context_limit = backbone.max_context
        cache = DynamicCache(config=model.config)
    compiled = options.compile and options.cache == "static" and not wants_plan
    step_call = _compiled_call(model) if compiled else model
    cache_kw = _cache_keyword(model)
    timings = Timings()
    stop_reason = "max_new_tokens"
    to_forward: list[int] = []

    def forward(ids: list[int], call: Any = model, extra: Mapping[str, Any] | None = None) -> torch.Tensor:
        out = call(
            input_ids=torch.tensor([ids], device=device),
            use_cache=True,
            logits_to_keep=1,
            **{cache_kw: cache},
            **(extra or {}),
        )
        session.forwarded += len(ids)
        # A compiled (CUDA-graph) call reuses its output buffer; processors edit logits in place.
        return out.logits[0, -1].clone() if compiled else out.logits[0, -1]

    observers = hook.reempathy_token_appended if hook.reempathy_token_appended.get_hookimpls() else None

    def observe(tokens: Sequence[int], kind: str) -> None:
        if observers is not None:
            for t in tokens:
                observers(session=session, token_id=t, kind=kind)

    def enter(phase: str, hidden: bool) -> None:
        old = session.phase
        session._enter(phase, hidden)
        hook.reempathy_phase_change(session=session, old=old, new=phase)

    def update_plan(controller: Any) -> None:
        if controller is None:
            return
        plan: dict = {}
        for part in hook.reempathy_attention_plan(session=session):
            for layer, biases in (part or {}).items():
                plan.setdefault(layer, []).extend(biases)
        controller.set_plan(plan)

    with torch.inference_mode(), attention_ctx as controller:
        t_start = time.perf_counter()
        # A strategy may begin in another phase (a thought, say): its forced opening tokens
        # join the prompt in the prefill instead of costing a forward call of their own.
        first = next((d for d in hook.reempathy_decode_start(session=session) if type(d) is Switch), None)
        if first is not None:
            session._append_forced(first.forced)
            observe(first.forced, "forced")
            enter(first.phase, first.hidden)
        else:
            enter(SPEAK, False)
        logits = forward(list(session.ids), extra=prefill_inputs)
        t_prev = time.perf_counter()
        timings.prefill_s = t_prev - t_start
        update_plan(controller)
        latencies = timings.token_latencies_s
        while True:
            scores = logits.float() if logits.dtype != torch.float32 else logits
            hook.reempathy_logits(session=session, logits=scores)
            token = _sample(scores, options.greedy, generator)
            if token in stop_ids:
                directive: Any = Stop("stop_token")
            else:
                directive = hook.reempathy_token(session=session, token_id=token) or CONTINUE
            now = time.perf_counter()
            latencies.append(now - t_prev)
            t_prev = now
            if timings.time_to_first_token_s is None:
                timings.time_to_first_token_s = now - t_start
            if type(directive) is Stop:
                to_forward = []
                if directive.keep_token:
                    session._append_sampled(token)
                    observe((token,), "sampled")
                    to_forward = [token]
                else:
                    observe((token,), "stop")
                    latencies.pop()  # one latency per token of the answer
                stop_reason = directive.reason
                break
            to_forward = []
            if type(directive) is Switch and not directive.keep_token:
                observe((token,), "dropped")
            else:
                session._append_sampled(token)
                observe((token,), "sampled")
                to_forward.append(token)
                if timings.time_to_first_audio_s is None and session.labels[-1] == SPOKEN_AUDIO:
                    timings.time_to_first_audio_s = now - t_start
            if type(directive) is Switch:
                if directive.forced:
                    session._append_forced(directive.forced)
                    observe(directive.forced, "forced")
                    to_forward.extend(directive.forced)
                enter(directive.phase, directive.hidden)
                update_plan(controller)
            if session.generated >= budget:
                stop_reason = "max_new_tokens" if session.generated >= options.max_new_tokens else "max_context"
                break
            if len(session.ids) >= context_limit:
                stop_reason = "max_context"
                break
            if to_forward:
                logits = forward(to_forward, step_call)
                to_forward = []
        timings.total_s = time.perf_counter() - t_start

    # Tokens appended after the last forward call: the answer ended, so nothing needs their keys.
    session.unforwarded = len(to_forward)
    result = build_result(session, options.strategy_name, stop_reason, timings)
    hook.reempathy_decode_end(session=session, result=result)
    return result


def build_result(session: DecodeSession, strategy_name: str, stop_reason: str, timings: Timings) -> DecodeResult:
    """Split the session's sequence into the spoken stream and the hidden trace."""
    backbone = session.backbone
    layout = session.layout
    chunks: list[SpokenChunk] = []
    hidden: list[HiddenSegment] = []
    text_ids: list[int] = []
    units: list[int] = []
    for seg in session.segments:
        if seg.hidden:
            ids = session.segment_ids(seg)
            hidden.append(
                HiddenSegment(seg.phase, seg.index, backbone.decode_text(ids), ids, seg.start, seg.end)
            )
            continue
        c_text = [session.ids[i] for i in range(seg.start, seg.end) if session.labels[i] == SPOKEN_TEXT]
        c_units = [
            layout.token_to_unit(session.ids[i])
            for i in range(seg.start, seg.end)
            if session.labels[i] == SPOKEN_AUDIO
        ]
        if not c_text and not c_units:
            continue
        chunks.append(SpokenChunk(seg.index, backbone.decode_text(c_text), c_text, c_units, seg.start, seg.end))
        text_ids.extend(c_text)
        units.extend(c_units)
    spans = [
        {"label": s.label, "start": s.start, "end": s.end, "segment": s.segment} for s in session.spans()
    ]
    counts = Counts(session.prompt_len, session.generated, session.forced, session.forwarded, session.unforwarded)
    return DecodeResult(
        strategy=strategy_name,
        backbone=backbone.name,
        spoken_text=backbone.decode_text(text_ids),
        spoken_text_ids=text_ids,
        audio_units=units,
        chunks=chunks,
        hidden=hidden,
        spans=spans,
        ids=session.ids[session.prompt_len :],
        stop_reason=stop_reason,
        counts=counts,
        timings=timings,
        extra=dict(session.extra),
    )
