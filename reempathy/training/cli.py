"""The ``train`` and ``demo`` subcommands; ``reempathy.cli`` adds them with one call each."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from reempathy.options import count_arg


def cmd_train(args: argparse.Namespace) -> int:
    """``reempathy train --config FILE [--max-steps N] [--resume] [--set KEY=VALUE]``."""
    from reempathy.training.config import load_train_config
    from reempathy.training.train import train

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.resume:
        overrides.append("train.resume=true")
    from reempathy.evaluation.training import is_evaluator_config, train_evaluator

    if is_evaluator_config(args.config):  # an [evaluator] table: the evaluator's own trainer
        evaluator_result = train_evaluator(args.config, overrides, progress=not args.quiet)
        if getattr(evaluator_result, "main_process", True):
            print(evaluator_result.format())
        return 0
    from reempathy.training.grpo_config import is_grpo_config

    if is_grpo_config(args.config):  # a [grpo] table: on-policy RL with rollouts from our decoder
        from reempathy.registry import default_discovery
        from reempathy.training.grpo import train_grpo
        from reempathy.training.grpo_config import load_grpo_config

        registry = default_discovery().registry
        grpo_cfg = load_grpo_config(args.config, overrides, registry=registry)
        grpo_result = train_grpo(grpo_cfg, registry, progress=not args.quiet,
                                 on_note=lambda note: print(f"reempathy: {note}", file=sys.stderr))
        if grpo_result.main_process:
            print(grpo_result.format())
        return 0
    cfg = load_train_config(args.config, overrides)
    result = train(cfg, progress=not args.quiet, on_note=lambda note: print(f"reempathy: {note}", file=sys.stderr))
    if result.main_process:
        print(format_train_result(result))
    return 0


def format_train_result(result: Any) -> str:
    """A short summary of a finished run."""
    lines = [
        f"trained {result.manifest.training.get('method')!r} for {result.steps} steps on {result.records} records"
        + (f" (resumed from {result.resumed_from})" if result.resumed_from else "")
    ]
    lines.extend(f"note: {note}" for note in result.notes)
    if result.losses:
        lines.append(f"loss: {result.losses[0]:.4f} (first logged) -> {result.losses[-1]:.4f} (last logged)")
    if result.skipped:
        first = result.skipped[0]
        lines.append(f"skipped {len(result.skipped)} bad record(s), first: {first}")
    if result.unused:
        lines.append(f"{result.unused} record(s) have no rejected answer and were not used")
    lines.append(f"checkpoint: {result.output_dir} (decodes with strategy {result.manifest.strategy.name!r})")
    return "\n".join(lines)


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train`` to the ``reempathy`` command's subparsers."""
    p = subparsers.add_parser("train", help="train a LoRA checkpoint for a strategy (sft, cotbs, reempathy, dpo), with GRPO, or an evaluator (empathyeval)")
    p.add_argument("--config", "-c", required=True, help="training TOML config, e.g. configs/train-reempathy.toml")
    p.add_argument("--max-steps", type=count_arg, help="override [train] max_steps")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint-N in the output_dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.learning_rate=1e-3 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return p


def cmd_demo(args: argparse.Namespace) -> int:
    """``reempathy demo [--cache DIR] [--force] [--heldout]``."""
    from reempathy.training.demo import run_demo

    run_demo(cache_dir=args.cache, force=args.force, heldout=args.heldout)
    return 0


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``demo`` to the ``reempathy`` command's subparsers."""
    from reempathy.training.demo import DEFAULT_CACHE

    p = subparsers.add_parser(
        "demo", help="train tiny sft, cotbs, reempathy and dpo checkpoints on examples/ and compare their answers"
    )
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"where trained checkpoints are kept (default {DEFAULT_CACHE})")
    p.add_argument("--force", action="store_true", help="train again even if the cache holds checkpoints")
    p.add_argument("--heldout", action="store_true",
                   help="answer the first held-out prompt instead of the first training prompt (the tiny model "
                        "memorises; expect blended fragments)")
    p.set_defaults(func=cmd_demo)
    return p


__all__ = ["add_train_parser", "add_demo_parser", "cmd_train", "cmd_demo", "format_train_result"]
