"""GRPO rollouts through our own batched decoder: TRL's ``rollout_func``, answered by :func:`decode_batch`.

TRL 1.16's GRPOTrainer takes a ``rollout_func(prompts, trainer)`` that returns the prompt ids,
the completion ids and their sampling log-probabilities, plus any other fields, which it hands
to the reward functions. :class:`Rollouts` is that function: every completion TRL asks for is one
row of :func:`reempathy.decoding.batch.decode_batch` — the configured strategy with its own plugin
objects (any strategy: ``sft``, ``cotbs``, ``reempathy``, a plugin's), the configured processors
(attention reweighting included), per-row phases, forced delimiters, its own seed — with a
:class:`~reempathy.training.trace.TraceRecorder` beside them.

Where it decides:

- **what TRL trains** (``completion_ids``): the trace, the answer exactly as decoded (forced
  delimiters and the sampled stop token included), so the policy loss sees the reflections.
  ``env_mask`` (TRL's mask of the tokens the model produced) is the trace's loss mask: forced
  tokens out, hidden tokens in unless ``[grpo] hidden = "mask"``.
- **seeds**: completion j of prompt P in the rollouts of step S, on process R, samples with
  ``row_seed(sampling.seed, "S:R:P#j")``: the rollouts depend neither on the batch size nor on an
  interruption, so a run resumed from ``checkpoint-N`` draws the same answers as an unbroken one.
- **the model while decoding**: the trainer's model in eval mode (no dropout) under
  ``inference_mode``, restored afterwards; the LoRA layers sit inside the base model, so the rows
  decode with the adapter as it is at this step.
- **sampling log-probabilities**: not returned (``logprobs`` None). With one optimisation pass
  per batch (``[grpo] num_iterations = 1``) TRL's ratio is exactly 1 and needs none; rollouts
  sample under the strategy's logit masks and the attention bias, which TRL's training forward
  does not apply (docs/training.md, GRPO: what is and is not the same).

A rollout is part of a training step, not resumable work of its own: the unit of resumption is
TRL's ``checkpoint-N``, after which the next rollouts are drawn again with the same seeds.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from reempathy.backbones.base import Backbone, PromptInputs
from reempathy.config import DecodeConfig
from reempathy.decoding.batch import RowRequest, decode_batch, row_seed
from reempathy.decoding.loop import LoopOptions
from reempathy.registry import Registry
from reempathy.training.rewards import Rollout
from reempathy.training.trace import TraceRecorder, trace_of


class Rollouts:
    """TRL's ``rollout_func``: a list of prompt ids (each repeated once per completion) in, completions out."""

    def __init__(
        self,
        backbone: Backbone,
        cfg: DecodeConfig,
        registry: Registry,
        prompts: dict[str, PromptInputs],
        messages: dict[str, list[dict[str, Any]]],
        options: LoopOptions,
        batch_size: int,
        hidden: bool,
        strategy_options: dict[str, Any],
    ) -> None:
        self.backbone = backbone
        self.cfg = cfg
        self.registry = registry
        self.prompts = prompts
        self.messages = messages
        self.options = options
        self.batch_size = batch_size
        self.hidden = hidden
        self.strategy_options = strategy_options
        self.longest: dict[str, int] = {}  # the longest hidden segment seen, per kind (for the manifest)
        self.chunk_layout: dict[str, int] | None = None
        self.rows = 0
        self.last: list[Rollout] = []  # the latest call's rollouts, in the order TRL received them

    def seed(self, step: int, rank: int, prompt_id: str, j: int) -> int:
        """The sampling seed of completion ``j`` of ``prompt_id`` at ``step`` on process ``rank``."""
        return row_seed(self.cfg.sampling.seed, f"{step}:{rank}:{prompt_id}#{j}")

    def __call__(self, prompts: Sequence[str], trainer: Any) -> dict[str, Any]:
        step = int(trainer.state.global_step) if trainer is not None else 0
        rank = int(trainer.accelerator.process_index) if trainer is not None else 0
        seen: Counter = Counter()
        order: list[tuple[str, int]] = []
        for p in prompts:
            order.append((p, seen[p]))
            seen[p] += 1
        recorders = {key: TraceRecorder() for key in order}

        def requests() -> Any:
            for n, (prompt_id, j) in enumerate(order):
                strategy, processors = self.plugins()
                yield RowRequest(key=n, prompt_ids=self.prompts[prompt_id].ids, strategy=strategy,
                                 processors=[*processors, recorders[(prompt_id, j)]], seed=self.seed(step, rank, prompt_id, j))

        model = self.backbone.model
        training = model.training
        model.eval()
        try:
            results = dict(decode_batch(self.backbone, requests(), self.options, self.batch_size))
        finally:
            model.train(training)
        out: dict[str, Any] = {"prompt_ids": [], "completion_ids": [], "logprobs": None, "env_mask": [], "rollout": []}
        for n, (prompt_id, j) in enumerate(order):
            result = results[n]
            trace = trace_of(result, recorders[(prompt_id, j)], self.strategy_options)
            self._note(result, trace)
            out["prompt_ids"].append(list(result.prompt_ids))
            out["completion_ids"].append(list(trace.ids))
            out["env_mask"].append(trace.loss_mask(self.hidden))
            out["rollout"].append(Rollout(prompt_id, j, self.messages[prompt_id], result, trace))
        self.rows += len(order)
        self.last = list(out["rollout"])
        return out

    def state(self) -> dict[str, Any]:
        """What the rollouts so far saw (rows decoded, the longest hidden segment per kind), for a checkpoint."""
        return {"rows": self.rows, "longest": dict(self.longest)}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue the counts of :meth:`state` (a resumed run)."""
        self.rows = int(state.get("rows", 0))
        self.longest = {str(k): int(v) for k, v in dict(state.get("longest", {})).items()}

    def plugins(self) -> tuple[object, list[object]]:
        """A fresh strategy object and the processors of one row (a strategy keeps per-answer state)."""
        from reempathy.runner import build_plugins

        return build_plugins(self.cfg, self.backbone, self.registry)

    def _note(self, result: Any, trace: Any) -> None:
        for segment in result.hidden:
            self.longest[segment.kind] = max(self.longest.get(segment.kind, 0), len(segment.ids))
        if self.chunk_layout is None and isinstance(trace.chunk_layout, dict):
            self.chunk_layout = dict(trace.chunk_layout)


__all__ = ["Rollouts"]
