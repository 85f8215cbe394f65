"""Evaluators: score spoken answers, compare runs, check an evaluator against human scores.

- ``base``: the interface (``EvalItem`` → ``Evaluator.evaluate`` → ``Evaluation``; ``PairItem`` → ``compare``)
- ``runs``: run directories (``results.jsonl``) in, ``scores/<name>.jsonl`` + summary out (resumable)
- ``metrics``: LCC, SRCC, MSE, bootstrap confidence intervals
- ``registry``: building an evaluator by name through the plugin registry (kind ``evaluator``)
- ``empathyeval``: the paper's evaluator (audio-in LM + LoRA + four regression heads) and its trainer
- ``judge``: ``llm-judge`` (rubric, parsing, local and endpoint back ends, A/B)
- ``speech``: speech quality of the answers' WAVs: ``audio-stats`` (no model) and ``asr-wer`` (Whisper + jiwer)
- ``keywords``: ``keyword-empathy``, a word-list heuristic for offline runs (not the paper's EmpathyEval)
- ``commands``: ``reempathy eval | ab | eval-check``

This package sits above ``reempathy.decoding`` and is never imported by it.
"""
