"""Built-in evaluators: ``empathyeval`` (audio-in model, assessment + four scores), ``llm-judge`` (rubric judge, A/B),
``audio-stats`` and ``asr-wer`` (speech quality), and ``keyword-empathy`` (a word-list heuristic for offline runs).

Only the option models are imported here; the models themselves (and jiwer) load when an evaluator is built.
"""

from __future__ import annotations

from typing import Any

from reempathy.hooks import Register
from reempathy.hooks import hookimpl


def _empathyeval(options: Any) -> Any:
    from reempathy.evaluation.empathyeval.evaluator import EmpathyEval

    return EmpathyEval(options)


def _train_empathyeval(raw: dict, options: Any, progress: bool = True, where: str = "training config") -> Any:
    from reempathy.evaluation.empathyeval.train import train_empathyeval

    return train_empathyeval(raw, options, progress, where)




def _llm_judge(options: Any) -> Any:
    from reempathy.evaluation.judge.evaluator import LlmJudge

    return LlmJudge(options)


def _audio_stats(options: Any) -> Any:
    from reempathy.evaluation.speech.stats import AudioStatsEvaluator

    return AudioStatsEvaluator(options)


def _asr_wer(options: Any) -> Any:
    from reempathy.evaluation.speech.asr import AsrWer

    return AsrWer(options)


def _keyword_empathy(options: Any) -> Any:
    from reempathy.evaluation.keywords import KeywordEmpathy

    return KeywordEmpathy(options)


@hookimpl
def reempathy_register_evaluators(register: Register) -> None:
    from reempathy.evaluation.empathyeval.options import EmpathyEvalOptions
    from reempathy.evaluation.judge.options import JudgeOptions
    from reempathy.evaluation.keywords import KeywordEmpathyOptions
    from reempathy.evaluation.speech.options import AsrWerOptions, AudioStatsOptions

    register(
        "empathyeval", _empathyeval, EmpathyEvalOptions,
        "listens to the dialogue (Qwen2.5-Omni / Qwen3-Omni-MoE thinker + LoRA): assessment text and four 1-5 scores",
        trainer=_train_empathyeval,  # `reempathy train --config configs/train-empathyeval.toml`
    )
    register(
        "llm-judge", _llm_judge, JudgeOptions,
        "rubric judge over the transcript (local instruct model or chat-completions endpoint); pairwise A/B",
    )
    register(
        "audio-stats", _audio_stats, AudioStatsOptions,
        "speech quality without a model: duration, silence share, clipping share and RMS loudness of each answer's WAV",
    )
    register(
        "asr-wer", _asr_wer, AsrWerOptions,
        "speech quality: a local Whisper transcribes each answer's WAV; WER and CER against its spoken text (jiwer)",
    )
    register(
        "keyword-empathy", _keyword_empathy, KeywordEmpathyOptions,
        "HEURISTIC, NOT the paper's EmpathyEval: four 1-5 scores from cue words in the spoken text (offline pipeline runs)",
    )
