"""GRPO rollouts: our batched loop (TRL's ``rollout_func``) against TRL's own generation path, on the same model.

Group ``rollouts <model>``: 16 completions (4 prompts x 4 generations, sampled at temperature 1),
exactly ``--bench-tokens`` new tokens each, decoded

* ``trl-generate``: by TRL 1.16's own path, ``GRPOTrainer._generate_single_turn`` (left padding, then
  transformers' ``generate()`` under TRL's ``unwrap_model_for_generation``), stop tokens kept out
  with ``min_new_tokens``;
* ``ours-sft``: by :class:`reempathy.training.rollouts.Rollouts` with the ``sft`` strategy: every
  completion a row of :func:`reempathy.decoding.batch.decode_batch` (16 rows per forward call) with
  its own plugins, seed and trace recorder, the stop tokens banned;
* ``ours-reempathy+reweight``: the same with ``reempathy`` and ``attention-reweight`` (α 1.15) —
  what TRL's path cannot do: per-row phases, forced delimiters, an attention bias.

Every call generates the same number of tokens, so completions/s of two calls is the inverse ratio
of their times. Numbers: bench/README.md (GRPO rollouts).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

import harness

PROMPTS = 4
GENERATIONS = 4


def _prompts(bb: Any) -> dict[str, Any]:
    from reempathy.backbones.base import PromptInputs

    return {str(p): PromptInputs(harness.row_prompt(bb, p)) for p in range(PROMPTS)}


def our_rollouts(bb: Any, variant: str, n: int) -> Any:
    """:class:`Rollouts` for ``variant``, stop tokens banned, exactly ``n`` tokens per completion."""
    from reempathy.config import ComponentConfig, DecodeConfig, DecodeSettings, SamplingConfig
    from reempathy.decoding.loop import LoopOptions
    from reempathy.registry import default_discovery
    from reempathy.training.rollouts import Rollouts

    name, _, extra = variant.partition("+")
    processors = [ComponentConfig(name="attention-reweight", factor=1.15)] if extra == "reweight" else []
    cfg = DecodeConfig(strategy=ComponentConfig(name=name), processors=processors,
                       sampling=SamplingConfig(temperature=1.0), decode=DecodeSettings(max_new_tokens=n))
    rollouts = Rollouts(bb, cfg, default_discovery().registry, _prompts(bb), {str(p): [] for p in range(PROMPTS)}, LoopOptions(max_new_tokens=n, strategy_name=name),
                        PROMPTS * GENERATIONS, True, {})
    build = rollouts.plugins

    def plugins() -> tuple[object, list[object]]:
        strategy, procs = build()
        return strategy, [*procs, harness.BanStops(bb)]

    rollouts.plugins = plugins  # type: ignore[method-assign]
    return rollouts


def run_ours(rollouts: Any, n: int) -> int:
    out = rollouts([str(p) for p in range(PROMPTS) for _ in range(GENERATIONS)], None)
    generated = sum(r.result.counts.generated for r in out["rollout"])
    if generated != PROMPTS * GENERATIONS * n:
        raise RuntimeError(f"our rollouts generated {generated} tokens, not {PROMPTS * GENERATIONS * n}")
    return generated


def trl_trainer(bb: Any, n: int, tmp: str) -> Any:
    """A GRPOTrainer on the backbone's model whose own generation path makes exactly ``n`` tokens per completion."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=tmp, per_device_train_batch_size=PROMPTS * GENERATIONS, num_generations=GENERATIONS,
                      max_completion_length=n, temperature=1.0, report_to="none", use_cpu=bb.model.device.type == "cpu",
                      generation_kwargs={"min_new_tokens": n}, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=bb.model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=args,
                              train_dataset=Dataset.from_list([{"prompt": "x"}]), processing_class=bb.tokenizer)
    trainer.eos_token_ids = list(bb.layout.stop_ids)
    trainer.generation_config.eos_token_id = list(bb.layout.stop_ids)
    return trainer


def run_trl(trainer: Any, bb: Any, n: int) -> int:
    ids = [harness.row_prompt(bb, p) for p in range(PROMPTS) for _ in range(GENERATIONS)]
    completions, _ = trainer._generate_single_turn(ids, None, {}, GENERATIONS)
    generated = sum(len(c) for c in completions)
    if generated != PROMPTS * GENERATIONS * n:
        raise RuntimeError(f"TRL's generation made {generated} tokens, not {PROMPTS * GENERATIONS * n}")
    return generated


@pytest.mark.parametrize("path", ["trl-generate", "ours-sft", "ours-reempathy+reweight"])
def test_rollout_throughput(benchmark, model, device, path, n_tokens, rounds, disabled, tmp_path):
    if model in harness.QWEN_MODELS:
        pytest.skip("GRPO rollouts are measured on the interleaved shapes (tiny, cpu512)")
    # A fresh copy of the shape (same seed, same weights): TRL patches the model it trains, and the
    # other benchmarks share harness.backbone's.
    from reempathy.backbones.tiny import TinyOptions, load_tiny

    bb = load_tiny(TinyOptions(**harness.MODELS[model], device=device))
    if path == "trl-generate":
        trainer = trl_trainer(bb, n_tokens, str(tmp_path))
        call, args = run_trl, (trainer, bb, n_tokens)
    else:
        call, args = run_ours, (our_rollouts(bb, path.removeprefix("ours-"), n_tokens), n_tokens)
    if not disabled:
        call(*args)  # warm-up
    benchmark.group = f"rollouts {model}"
    benchmark.extra_info.update(tokens=PROMPTS * GENERATIONS * n_tokens, completions=PROMPTS * GENERATIONS, model=model, path=path)
    total = benchmark.pedantic(call, args=args, rounds=min(rounds, 5))
    assert total == PROMPTS * GENERATIONS * n_tokens
