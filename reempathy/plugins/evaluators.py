"""Built-in evaluators: ``empathyeval`` (audio-in model, assessment + four scores) and ``llm-judge`` (rubric judge, A/B).

Only the option models are imported here; the models themselves load when an evaluator is built.
"""

from __future__ import annotations

from typing import Any

from reempathy.decoding.hookspecs import Register
from reempathy.hooks import hookimpl


def _empathyeval(options: Any) -> Any:
    from reempathy.evaluation.empathyeval.evaluator import EmpathyEval

    return EmpathyEval(options)


def _train_empathyeval(raw: dict, options: Any, progress: bool = True, where: str = "training config") -> Any:
    from reempathy.evaluation.empathyeval.train import train_empathyeval

    return train_empathyeval(raw, options, progress, where)


_empathyeval.trainer = _train_empathyeval  # type: ignore[attr-defined]  # `reempathy train` finds it here


def _llm_judge(options: Any) -> Any:
    from reempathy.evaluation.judge.evaluator import LlmJudge

    return LlmJudge(options)


@hookimpl
def reempathy_register_evaluators(register: Register) -> None:
    from reempathy.evaluation.empathyeval.options import EmpathyEvalOptions
    from reempathy.evaluation.judge.options import JudgeOptions

    register(
        "empathyeval", _empathyeval, EmpathyEvalOptions,
        "listens to the dialogue (Qwen2.5-Omni / Qwen3-Omni-MoE thinker + LoRA): assessment text and four 1-5 scores",
    )
    register(
        "llm-judge", _llm_judge, JudgeOptions,
        "rubric judge over the transcript (local instruct model or chat-completions endpoint); pairwise A/B",
    )
