"""``reempathy reflect-data | pairs``: argument parsing only; the work is in reflect_data.py and pairs.py.

Both commands end with one summary line. When the evaluator failed on some records and
``--skip-bad`` was not given, the output is not finished: a one-line error says so and the
command exits with status 1 (not the user's input; a rerun tries those records again).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from reempathy.options import count_arg


def _unfinished(summary: Any, out: str) -> int:
    from reempathy.jobs.partial import unfinished_message

    print(f"reempathy: error: {unfinished_message(summary.failed, out)}", file=sys.stderr)
    return 1


def cmd_reflect_data(args: argparse.Namespace) -> int:
    """``reempathy reflect-data --data FILE --evaluator NAME --out FILE [--layout T+A] [--config FILE] [--template FILE] [--set K=V]…``."""
    from reempathy.registry import default_discovery
    from reempathy.training.evaluator_calls import split_sets
    from reempathy.training.reflect_data import CONFIG_TABLES, DEFAULT_TEMPLATE, ReflectOptions, read_template, reflect_data

    config_overrides, evaluator_options = split_sets(args.overrides, CONFIG_TABLES)
    opts = ReflectOptions(
        data=args.data, out=args.out, evaluator=args.evaluator, evaluator_options=evaluator_options, config=args.config,
        config_overrides=config_overrides, layout=args.layout,
        template=read_template(args.template) if args.template else DEFAULT_TEMPLATE,
        skip_bad=args.skip_bad, force=args.force, progress=False if args.quiet else None,
    )
    summary = reflect_data(opts, default_discovery().registry, say=print)
    return 0 if summary.finished else _unfinished(summary, opts.out)


def cmd_pairs(args: argparse.Namespace) -> int:
    """``reempathy pairs [--checkpoint DIR] --data FILE --samples N --evaluator NAME --out FILE [--batch-size B] [--config FILE] [--set K=V]…``."""
    from reempathy.config import load_config
    from reempathy.registry import default_discovery
    from reempathy.training.evaluator_calls import split_sets
    from reempathy.training.pairs import DECODE_TABLES, PairsOptions, make_pairs

    registry = default_discovery().registry
    config_overrides, evaluator_options = split_sets(args.overrides, DECODE_TABLES)
    if args.checkpoint is not None:
        config_overrides.append(f"decode.checkpoint={json.dumps(args.checkpoint)}")
    cfg = load_config(args.config, config_overrides, None, registry)
    opts = PairsOptions(
        data=args.data, out=args.out, samples=args.samples, evaluator=args.evaluator, evaluator_options=evaluator_options,
        batch_size=args.batch_size, skip_bad=args.skip_bad, force=args.force, progress=False if args.quiet else None,
    )
    summary = make_pairs(cfg, registry, opts, say=print)
    return 0 if summary.finished else _unfinished(summary, opts.out)


def add_reflect_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``reflect-data`` to the ``reempathy`` command's subparsers."""
    p = subparsers.add_parser(
        "reflect-data", help="give each training record per-chunk reflections, asked of an evaluator prefix by prefix"
    )
    p.add_argument("--data", required=True, metavar="DATA.jsonl", help="training records (docs/training.md)")
    p.add_argument("--evaluator", "-e", required=True, metavar="NAME",
                   help="the evaluator that writes the reflections, e.g. llm-judge")
    p.add_argument("--out", required=True, metavar="OUT.jsonl",
                   help="the records with their reflections (progress is kept in OUT.partial until every record is done)")
    p.add_argument("--layout", metavar="TEXT+AUDIO",
                   help="spoken chunk layout, e.g. 5+10 (default: the reempathy [strategy] of --config, else 5+10)")
    p.add_argument("--config", "-c", metavar="FILE",
                   help="a training or decode config: its [backbone] (whose tokenizer cuts the chunks; default tiny) "
                        "and reempathy [strategy] layout are read")
    p.add_argument("--template", metavar="FILE", help="the instruction the evaluator gets for each prefix (default: docs/training.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an evaluator option (e.g. endpoint=URL), or backbone.KEY / strategy.KEY of the config (repeatable)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) bad records and records the evaluator fails on, instead of stopping")
    p.add_argument("--force", action="store_true", help="discard earlier progress or output at --out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_reflect_data)
    return p


def add_pairs_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``pairs`` to the ``reempathy`` command's subparsers."""
    p = subparsers.add_parser(
        "pairs", help="on-policy DPO pairs: sample N answers (whole traces) per prompt from a policy, score them, best vs worst"
    )
    p.add_argument("--checkpoint", metavar="DIR",
                   help="the policy: a directory written by `reempathy train` (default: the config's backbone and strategy "
                        "as they are, e.g. the first round of iterated DPO)")
    p.add_argument("--data", required=True, metavar="DATA.jsonl", help="the prompts: JSONL records as `reempathy run` reads them")
    p.add_argument("--samples", required=True, type=int, metavar="N", help="answers sampled per prompt (at least 2)")
    p.add_argument("--evaluator", "-e", required=True, metavar="NAME", help="the evaluator that scores the answers, e.g. llm-judge")
    p.add_argument("--out", required=True, metavar="PAIRS.jsonl",
                   help="the pairs: a training file for the dpo strategy (progress is kept in OUT.partial until every prompt is done)")
    p.add_argument("--batch-size", type=count_arg, default=8, metavar="B", help="answers decoded together (default 8)")
    p.add_argument("--config", "-c", metavar="FILE",
                   help="decode config for the sampling settings (default: built-in; strategy and backbone from the checkpoint)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a decode config key (sampling.temperature=1.0, decode.max_new_tokens=256) or an evaluator "
                        "option (endpoint=URL) (repeatable)")
    p.add_argument("--skip-bad", action="store_true", help="finish without the prompts the evaluator failed on (counted)")
    p.add_argument("--force", action="store_true", help="discard earlier progress or output at --out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pairs)
    return p


__all__ = ["add_reflect_data_parser", "add_pairs_parser", "cmd_reflect_data", "cmd_pairs"]
