"""One answer being decoded: its session, its own plugin manager, and the logic of one step.

Both loops drive a :class:`Row` the same way, so a row decoded in a batch goes through exactly
the code a single answer does (the loops only decide which tokens go through the model when):

    ids = row.begin()                 # reempathy_decode_start; the prefill's tokens
    ... forward ids ...; row.prefilled(n)
    plan = row.plan()                 # when row.wants_plan
    loop:
        row.logits(scores)            # strategy first, then processors, in place
        token = choose([row], scores) # argmax or the row's own generator; DecodeError if none is possible
        if row.accept(token):         # the directive: append, observe, force, change phase
            plan = row.plan()
        if row.done: break
        ... forward row.pending_ids() ...; row.forwarded(n)
    result = row.finish()             # reempathy_decode_end

Where it decides: :meth:`Row.accept` turns a sampled token and the strategy's directive into
appended, forced and observed tokens, a phase change, and the stop; :func:`choose` picks the
token and refuses logits that allow none (all ``-inf``, NaN, ``+inf``). A plugin's hook that
raises becomes ``PluginFailure`` naming the plugin and the hook (:mod:`failures`), and so does an
answer the loop cannot use (not a directive, a ``Switch`` whose token ids are not in the
vocabulary), checked where it enters the loop: :meth:`Row.begin` and :meth:`Row.accept`.
"""

from __future__ import annotations

import math
import time
import types
import weakref
from typing import Any, Sequence

import pluggy
import torch

from reempathy.backbones.base import Backbone
from reempathy.decoding import hookspecs
from reempathy.decoding.directives import CONTINUE, Continue, Stop, Switch
from reempathy.decoding.failures import (
    DIRECTIVE_TYPES,
    answer_failure,
    hook_failure,
    not_a_directive,
    plugin_name,
    register_checked,
    switch_ids,
)
from reempathy.decoding.result import DecodeResult, Timings, build_result
from reempathy.decoding.session import DecodeSession
from reempathy.decoding.spans import SPEAK, SPOKEN_AUDIO
from reempathy.errors import DecodeError, InputError, ReempathyError


_UNBOUNDED = 2**62  # a budget left out: never reached


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
        register_checked(pm, proc, f"processor-{len(processors) - 1 - i}-{type(proc).__name__}")
    register_checked(pm, strategy, f"strategy-{type(strategy).__name__}")
    return pm


class Row:
    """One answer in progress. The loops own the model calls; the row owns everything else."""

    def __init__(
        self,
        backbone: Backbone,
        prompt_ids: Sequence[int],
        strategy: object,
        processors: Sequence[object],
        options: Any,
        *,
        key: Any = None,
        context_limit: int | None = None,
        prefill_inputs: dict[str, Any] | None = None,
    ) -> None:
        prompt_ids = list(prompt_ids)
        where = "" if key is None else f"record {key!r}: "
        if not prompt_ids:
            raise InputError(f"{where}the prompt is empty; give --prompt TEXT or --units FILE")
        if len(prompt_ids) >= backbone.max_context:
            raise InputError(
                f"{where}the prompt is {len(prompt_ids)} tokens, longer than the backbone's context of "
                f"{backbone.max_context}; shorten it"
            )
        if options.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {options.max_new_tokens}")
        for stream in ("spoken", "hidden"):
            value = getattr(options, f"max_{stream}_tokens")
            if value is not None and not 1 <= value <= backbone.max_context:
                raise InputError(
                    f"decode.max_{stream}_tokens = {value}: a budget must be at least 1 and at most the backbone's "
                    f"context of {backbone.max_context} tokens; leave it out for no {stream} budget"
                )
        self.key = key
        self.pm = session_plugin_manager(strategy, processors)
        hook = self.hook = self.pm.hook
        generator = torch.Generator(device=backbone.model.device)
        generator.manual_seed(options.seed)
        self.session = DecodeSession(backbone, prompt_ids, generator, options)
        self.options = options
        self.stop_ids = frozenset(backbone.layout.stop_ids)
        self.budget = min(options.max_new_tokens, backbone.max_context - len(prompt_ids))
        self.max_spoken = options.max_spoken_tokens or _UNBOUNDED
        self.max_hidden = options.max_hidden_tokens or _UNBOUNDED
        self.context_limit = backbone.max_context if context_limit is None else context_limit
        self.prefill_inputs = dict(prefill_inputs or {})
        self.wants_plan = bool(hook.reempathy_attention_plan.get_hookimpls())
        self._observers = hook.reempathy_token_appended if hook.reempathy_token_appended.get_hookimpls() else None
        self.timings = Timings()
        self.stop_reason = "max_new_tokens"
        self.done = False
        self.t_start = 0.0
        self.t_prev = 0.0

    # --- what the loops read ---------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Tokens appended but not yet through the model: the row's next inputs."""
        return len(self.session.ids) - self.session.forwarded

    def pending_ids(self) -> list[int]:
        session = self.session
        return session.ids[session.forwarded :]

    def forwarded(self, n: int) -> None:
        """``n`` of the pending tokens went through the model."""
        self.session.forwarded += n

    # --- the steps ---------------------------------------------------------------------------

    def begin(self) -> list[int]:
        """Ask ``reempathy_decode_start``, enter the first phase; the tokens of the prefill.

        A strategy may begin in another phase (a thought, say): its forced opening tokens join the
        prompt in the prefill instead of costing a forward call of their own.
        """
        self.t_start = time.perf_counter()
        try:
            answers = self.hook.reempathy_decode_start(session=self.session)
        except ReempathyError:
            raise
        except Exception as exc:
            raise hook_failure(self.pm, "reempathy_decode_start", exc) from exc
        for answer in answers:
            if type(answer) not in DIRECTIVE_TYPES:
                raise answer_failure(self.pm, "reempathy_decode_start", not_a_directive(answer))
        first = next((d for d in answers if type(d) is Switch), None)
        if first is not None:
            forced, prefix = switch_ids(self.pm, first, "reempathy_decode_start", self.session.backbone)
            self.session._append_forced(forced)
            self._observe(forced, "forced")
            self._enter(first.phase, first.hidden, prefix)
        else:
            self._enter(SPEAK, False)
        return list(self.session.ids)

    def prefilled(self, n: int) -> None:
        """The prefill of ``n`` tokens is done: its logits are the first step's."""
        self.session.forwarded += n
        self.t_prev = time.perf_counter()
        self.timings.prefill_s = self.t_prev - self.t_start

    def logits(self, scores: torch.Tensor) -> None:
        """Run the logits hooks on this row's float32 ``scores`` (``[vocab]``), in place."""
        try:
            self.hook.reempathy_logits(session=self.session, logits=scores)
        except ReempathyError:
            raise
        except Exception as exc:
            raise hook_failure(self.pm, "reempathy_logits", exc) from exc

    def accept(self, token: int) -> bool:
        """Act on the sampled ``token`` and the strategy's directive; True when a new phase began.

        Sets ``done`` (and ``stop_reason``) when the answer ends: a stop token, a ``Stop``, the
        budget or the context. The tokens to forward next are :meth:`pending_ids`.
        """
        session = self.session
        timings = self.timings
        if token in self.stop_ids:
            directive: Any = Stop("stop_token")
        else:
            try:
                directive = self.hook.reempathy_token(session=session, token_id=token) or CONTINUE
            except ReempathyError:
                raise
            except Exception as exc:
                raise hook_failure(self.pm, "reempathy_token", exc) from exc
        now = time.perf_counter()
        timings.token_latencies_s.append(now - self.t_prev)
        self.t_prev = now
        if timings.time_to_first_token_s is None:
            timings.time_to_first_token_s = now - self.t_start
        kind = type(directive)
        if kind is Stop:
            if directive.keep_token:
                session._append_sampled(token)
                self._observe((token,), "sampled")
            else:
                self._observe((token,), "stop")
                timings.token_latencies_s.pop()  # one latency per token of the answer
            self.stop_reason = directive.reason
            self.done = True
            return False
        if kind is not Continue and kind is not Switch:
            raise answer_failure(self.pm, "reempathy_token", not_a_directive(directive))
        if kind is Switch and not directive.keep_token:
            self._observe((token,), "dropped")
        else:
            session._append_sampled(token)
            self._observe((token,), "sampled")
            if timings.time_to_first_audio_s is None and session.labels[-1] == SPOKEN_AUDIO:
                timings.time_to_first_audio_s = now - self.t_start
        changed = kind is Switch
        if changed:
            forced, prefix = switch_ids(self.pm, directive, "reempathy_token", self.session.backbone)
            if forced:
                session._append_forced(forced)
                self._observe(forced, "forced")
            self._enter(directive.phase, directive.hidden, prefix)
        # The experiment's budgets first: an answer that fills its spoken budget on the very token the
        # guard is reached stopped on its budget, as every comparable answer does.
        if session.spoken_tokens >= self.max_spoken:
            self.stop_reason = "max_spoken_tokens"
            self.done = True
        elif session.hidden_tokens >= self.max_hidden:
            self.stop_reason = "max_hidden_tokens"
            self.done = True
        elif session.generated >= self.budget:
            self.stop_reason = (
                "max_new_tokens" if session.generated >= self.options.max_new_tokens else "max_context"
            )
            self.done = True
        elif len(session.ids) >= self.context_limit:
            self.stop_reason = "max_context"
            self.done = True
        return changed

    def plan(self) -> dict[int, list[Any]]:
        """Every plugin's ``reempathy_attention_plan`` for the phase that just began, merged per layer."""
        try:
            parts = self.hook.reempathy_attention_plan(session=self.session)
        except ReempathyError:
            raise
        except Exception as exc:
            raise hook_failure(self.pm, "reempathy_attention_plan", exc) from exc
        plan: dict[int, list[Any]] = {}
        for part in parts:
            for layer, biases in (part or {}).items():
                for kb in biases:
                    if not math.isfinite(float(kb.bias)):
                        raise DecodeError(
                            f"{self._where()}an attention plan for phase {self.session.phase!r} holds bias "
                            f"{kb.bias} on layer {layer}; a bias must be finite (log α for 0 < α < inf): "
                            f"check the options of {self._names('reempathy_attention_plan')}"
                        )
                plan.setdefault(layer, []).extend(biases)
        return plan

    def finish(self) -> DecodeResult:
        """The result, after ``reempathy_decode_end``. Tokens still pending were never needed by the model."""
        session = self.session
        self.timings.total_s = time.perf_counter() - self.t_start
        session.unforwarded = self.pending
        result = build_result(session, self.options.strategy_name, self.stop_reason, self.timings)
        try:
            self.hook.reempathy_decode_end(session=session, result=result)
        except ReempathyError:
            raise
        except Exception as exc:
            raise hook_failure(self.pm, "reempathy_decode_end", exc) from exc
        return result

    # --- errors --------------------------------------------------------------------------------

    def no_token(self, top: float) -> DecodeError:
        """The error for logits whose best value is ``top`` (not finite): nothing can be sampled."""
        step = self.session.generated + 1
        where = f"{self._where()}token {step} of the answer (phase {self.session.phase!r})"
        names = self._names("reempathy_logits") or "none"
        if math.isnan(top):
            return DecodeError(
                f"{where}: the logits hold NaN after the strategy and processors ({names}); the model "
                "produced NaN (check the backbone's dtype and weights) or a processor wrote it"
            )
        if top > 0:
            return DecodeError(
                f"{where}: a logit is +inf after the strategy and processors ({names}); a processor scaled "
                "the logits out of range: keep temperature, repetition_penalty and the like within their bounds"
            )
        return DecodeError(
            f"{where}: no token is possible: the strategy and processors ({names}) banned every token; "
            "loosen or remove the processor that masks tokens (top-k, top-p, a custom ban)"
        )

    def _where(self) -> str:
        return "" if self.key is None else f"record {self.key!r}, "

    def _names(self, hook_name: str) -> str:
        impls = getattr(self.hook, hook_name).get_hookimpls()
        return ", ".join(plugin_name(impl.plugin) for impl in reversed(impls))

    # --- helpers -------------------------------------------------------------------------------

    def _observe(self, tokens: Sequence[int], kind: str) -> None:
        observers = self._observers
        if observers is None:
            return
        session = self.session
        try:
            for t in tokens:
                observers(session=session, token_id=t, kind=kind)
        except ReempathyError:
            raise
        except Exception as exc:
            raise hook_failure(self.pm, "reempathy_token_appended", exc) from exc

    def _enter(self, phase: str, hidden: bool, prefix: tuple[int, ...] = ()) -> None:
        session = self.session
        old = session.phase
        session._enter(phase, hidden)
        if prefix:  # in the new segment before anyone hears of it
            session._append_prefix(prefix)
            self._observe(prefix, "forced")
        try:
            self.hook.reempathy_phase_change(session=session, old=old, new=phase)
        except ReempathyError:
            raise
        except Exception as exc:
            raise hook_failure(self.pm, "reempathy_phase_change", exc) from exc


def choose(rows: Sequence[Row], scores: torch.Tensor, greedy: bool) -> list[int]:
    """One token per row from ``scores`` (``[rows, vocab]``, float32, after the hooks).

    Greedy takes the argmax (the first on ties, as ``generate()`` does); sampling draws from
    each row's own generator, so a row's tokens never depend on its neighbours. One reduction
    over the vocabulary doubles as the guard: a best logit that is NaN (``max`` propagates NaN),
    ``+inf`` or ``-inf`` (every token banned) raises :class:`DecodeError` from that row.
    """
    if greedy:
        values, index = scores.max(dim=-1)
        tops = values.tolist()
        tokens = index.tolist()
    else:
        tops = scores.amax(dim=-1).tolist()
    for row, top in zip(rows, tops):
        if not math.isfinite(top):
            raise row.no_token(top)
    if greedy:
        return tokens
    probs = torch.softmax(scores, dim=-1)
    # Each row draws from its own generator; the draws reach the host together (one transfer, not one per row).
    draws = [torch.multinomial(probs[i], 1, generator=row.session.generator) for i, row in enumerate(rows)]
    return (draws[0] if len(draws) == 1 else torch.cat(draws)).tolist()


__all__ = ["Row", "choose", "session_plugin_manager"]
