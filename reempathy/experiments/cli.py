"""``reempathy run | sweep | report``: argument parsing only; the work is in run.py, sweep.py and report.py."""

from __future__ import annotations

import argparse
import json
from typing import Any

from reempathy.errors import ConfigError


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "checkpoint", None) is not None:
        overrides.append(f"decode.checkpoint={json.dumps(args.checkpoint)}")
    return overrides


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="DATA.jsonl", help="JSONL test set in the training data schema (docs/experiments.md)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (created; a rerun continues it)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="rows decoded together (default 8)")
    p.add_argument("--limit", type=int, metavar="N", help="decode only the first N records of the data file")
    p.add_argument("--speech", action="store_true", help="also write each spoken answer as DIR/wav/<id>.wav")
    p.add_argument("--force", action="store_true", help="discard the results of a directory made by another config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set sampling.seed=3 (repeatable)")


def cmd_run(args: argparse.Namespace) -> int:
    from reempathy.config import load_config
    from reempathy.registry import default_discovery
    from reempathy.experiments.run import RunOptions, run_experiment
    from reempathy.jobs.shard import release_group

    registry = default_discovery().registry
    cfg = load_config(args.config, _overrides(args), args.strategy, registry)
    opts = RunOptions(data=args.data, out=args.out, batch_size=args.batch_size, limit=args.limit,
                      speech=args.speech, force=args.force)
    try:
        run_experiment(cfg, registry, opts, say=print)
    finally:
        release_group()
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from reempathy.registry import default_discovery
    from reempathy.experiments.run import RunOptions
    from reempathy.jobs.shard import release_group
    from reempathy.experiments.sweep import plan_sweep, run_sweep

    registry = default_discovery().registry
    plan = plan_sweep(args.config, args.grid, args.overrides, checkpoints=args.checkpoints, registry=registry, out=args.out)
    opts = RunOptions(data=args.data, out=args.out, batch_size=args.batch_size, limit=args.limit,
                      speech=args.speech, force=args.force)
    try:
        run_sweep(plan, registry, opts, say=print)
    finally:
        release_group()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from reempathy.jobs import rundir
    from reempathy.experiments.report import build_report, write_csv, write_plot
    from reempathy.safe_write import check_output_file, same_file

    if (args.x is None or args.y is None) and args.plot:
        raise ConfigError("--plot needs --x KEY (a swept key, e.g. processors.0.factor) and --y METRIC (a column)")
    if (args.x is not None or args.y is not None) and not args.plot:
        raise ConfigError("--x and --y choose the axes of --plot OUT.png; give --plot too")
    # Every output is checked before the report is built: a refused --plot leaves no --csv behind.
    for flag, path in (("--csv", args.csv), ("--plot", args.plot)):
        if path:
            check_output_file(path, flag)
            rundir.check_not_run_file(path, flag, "report")  # never over a run's own files (its results)
    if args.csv and args.plot and same_file(args.csv, args.plot):
        raise ConfigError(f"--csv and --plot are the same file {args.csv!r}; give each its own path")
    report = build_report(args.dirs, baseline=args.baseline)
    print(report.markdown())
    if args.csv:
        write_csv(report, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        write_plot(report, args.plot, args.x, args.y)
        print(f"wrote {args.plot}")
    return 0


def add_run_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``reempathy run``: decode a test set into a resumable run directory."""
    p = subparsers.add_parser("run", help="decode a test set (JSONL) into a resumable run directory")
    p.add_argument("--config", "-c", metavar="FILE", help="decode config (TOML)")
    p.add_argument("--strategy", metavar="NAME", help="use this strategy instead of the config's")
    p.add_argument("--checkpoint", metavar="DIR", help="a directory written by `reempathy train`")
    _add_run_args(p)
    p.set_defaults(func=cmd_run)
    return p


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``reempathy sweep``: one resumable run per point of a grid or per ``[[sweep.runs]]`` table."""
    p = subparsers.add_parser("sweep", help="run a grid of settings (or a sweep TOML's runs) over a test set")
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="decode config, or a sweep TOML with a [sweep] table")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,…",
                   help="sweep a config key over values (repeatable: the Cartesian product)")
    p.add_argument("--checkpoints", metavar="DIR",
                   help="find each checkpoint key K at DIR/K ('demo': the checkpoints `reempathy demo` trained)")
    _add_run_args(p)
    p.set_defaults(func=cmd_sweep)
    return p


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``reempathy report``: a table of runs (a sweep directory expands to its runs)."""
    p = subparsers.add_parser("report", help="table of runs: counts, latency, scores; CSV and plots")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run or sweep directories")
    p.add_argument("--csv", metavar="OUT.csv", help="also write the table as CSV")
    p.add_argument("--plot", metavar="OUT.png", help="plot --y against --x (one line per other setting)")
    p.add_argument("--x", metavar="KEY", help="a swept key or config key, e.g. processors.0.factor")
    p.add_argument("--y", metavar="COLUMN", help="a column, e.g. hidden_per_spoken or empathyeval.emotional_support")
    p.add_argument("--baseline", metavar="RUN",
                   help="compare every run with this one record by record: mean difference with a paired 95%% "
                   "interval, win/tie/loss, Wilcoxon p (e.g. --baseline sft)")
    p.set_defaults(func=cmd_report)
    return p


def cmd_study(args: argparse.Namespace) -> int:
    from reempathy.registry import default_discovery
    from reempathy.jobs.shard import release_group
    from reempathy.experiments.study import read_study, run_study

    registry = default_discovery().registry
    study = read_study(args.file, args.overrides)
    try:
        run_study(study, registry, out=args.out, say=print)
    finally:
        release_group()
    return 0


def add_study_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``reempathy study``: train what is missing, sweep, score and report, from one file."""
    p = subparsers.add_parser("study", help="a whole comparison from one file: train what is missing, sweep, eval, report")
    p.add_argument("file", metavar="FILE", help="a study file (a sweep file with a [study] table), e.g. configs/study-table5.toml")
    p.add_argument("--out", metavar="DIR", help="the study's directory (default: study.out in the file)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key of the sweep, e.g. --set decode.max_spoken_tokens=80 (repeatable)")
    p.set_defaults(func=cmd_study)
    return p


def add_experiment_parsers(subparsers: Any) -> None:
    """Add ``run``, ``sweep``, ``report`` and ``study`` to the ``reempathy`` command."""
    add_run_parser(subparsers)
    add_sweep_parser(subparsers)
    add_report_parser(subparsers)
    add_study_parser(subparsers)


__all__ = ["add_run_parser", "add_sweep_parser", "add_report_parser", "add_study_parser", "add_experiment_parsers"]
