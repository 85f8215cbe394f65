"""``reempathy eval | ab | eval-check``: score a run, compare two runs, check an evaluator against humans.

Where decisions are made:

- ``cmd_eval`` reads and checks everything cheap first (the evaluator's name and options, the
  run's records, the score file's state) and only then builds the evaluator, so bad input fails
  in a second with one line. Records already in ``scores/<name>.jsonl`` are skipped; new results
  are appended batch by batch, so an interrupted run loses at most the batch in flight.
- When a turn has units but no WAV, a listening evaluator needs a speech decoder: an evaluator
  whose options have ``speech_decoder`` gets the run's backbone ``decoder_path`` unless told otherwise.
- ``cmd_ab`` pairs the two runs' records by id and reports A's wins, ties and losses with a
  bootstrap interval of A's preference score (win 1, tie ½, loss 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from reempathy.options import count_arg

from reempathy.errors import ConfigError, InputError


def _registry() -> Any:
    from reempathy.registry import default_discovery

    return default_discovery().registry


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _call(evaluator: Any, name: str, method: str, batch: Sequence[Any]) -> list[Any]:
    from reempathy.evaluation.registry import call_evaluator

    return call_evaluator(evaluator, name, batch, method)


def _with_run_decoder(registry: Any, name: str, options: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    model = registry.get("evaluator", name).config_model
    decoder = (((manifest.get("config") or {}).get("backbone")) or {}).get("decoder_path")
    if "speech_decoder" in model.model_fields and "speech_decoder" not in options and decoder:
        return dict(options, speech_decoder=decoder)
    return options


def cmd_eval(args: argparse.Namespace) -> int:
    """``reempathy eval DIR --evaluator NAME [--set K=V]… [--name LABEL] [--batch-size N] [--retry-failed]``."""
    from reempathy.evaluation.registry import parse_sets

    summary, path = score_run(
        args.dir, args.evaluator, parse_sets(args.overrides), name=args.name, batch_size=args.batch_size,
        retry_failed=args.retry_failed, progress=not args.quiet,
    )
    print(format_summary(summary, path))
    return 0


def score_run(
    run_dir: str | Path,
    evaluator_name: str,
    options: dict[str, Any],
    *,
    name: str | None = None,
    batch_size: int = 8,
    retry_failed: bool = False,
    progress: bool = True,
    registry: Any = None,
) -> tuple[dict[str, Any], Path]:
    """Score every record of ``run_dir`` not scored yet into ``scores/<name>.jsonl``; the summary and the file.

    A job on the one driver (:func:`reempathy.jobs.driver.run_job`) with the score file as its
    store: everything cheap is checked before the evaluator is built, and each record's line is
    appended as soon as its batch is scored, so a kill loses at most one batch.
    """
    from reempathy.evaluation.registry import build_evaluator, evaluator_options
    from reempathy.evaluation.runs import evaluation_line, read_run, run_manifest, write_summary
    from reempathy.jobs.driver import Job, Outcome, run_job
    from reempathy.jobs.scores import ScoreStore

    registry = registry or _registry()
    registry.get("evaluator", evaluator_name)
    items = read_run(run_dir)
    options = _with_run_decoder(registry, evaluator_name, options, run_manifest(run_dir))
    checked = evaluator_options(registry, evaluator_name, options)
    # Options that only pace the work (llm-judge's concurrency) are not part of what made the scores.
    validated = checked.model_dump(mode="json", exclude=set(getattr(type(checked), "runtime_options", ())))
    store = ScoreStore(run_dir, name or evaluator_name, {"evaluator": evaluator_name, "options": validated}, retry_failed)
    built: dict[str, Any] = {}

    def build() -> Any:
        evaluator = build_evaluator(registry, evaluator_name, options)
        built["names"] = evaluator.score_names
        return evaluator

    def work(evaluator: Any, todo: list[Any]) -> Any:
        for batch in _batches(todo, batch_size):
            for result in _call(evaluator, evaluator_name, "evaluate", batch):
                yield Outcome(result.id, evaluation_line(result, evaluator_name))

    run_job(Job(f"eval {evaluator_name}", "record", items, key=lambda item: item.id, store=store, build=build,
                work=work), progress=progress)
    names = built.get("names")
    if names is None:
        from reempathy.evaluation.base import EMPATHY_SCORES

        names = sorted({k for row in store.lines().values() for k in (row.get("scores") or {})}) or EMPATHY_SCORES
    return write_summary(store, evaluator_name, names, len(items)), store.path


def format_summary(summary: dict[str, Any], path: Path) -> str:
    """Per-score mean with its 95 % interval, then the failures."""
    lines = [f"{summary['evaluator']}: {summary['scored']} of {summary['records']} records scored -> {path}"]
    for name, s in summary["scores"].items():
        if s["n"]:
            lo, hi = s["ci95"]
            lines.append(f"  {name:<26} {s['mean']:.3f}  [{lo:.3f}, {hi:.3f}]  n={s['n']}")
    if summary["failures"]:
        ids = ", ".join(summary["failed_ids"][:5]) + (" …" if summary["failures"] > 5 else "")
        lines.append(f"  failures: {summary['failures']} (ids {ids}); their lines hold the error and the raw reply; "
                     "rerun with --retry-failed to try them again")
    return "\n".join(lines)


def cmd_ab(args: argparse.Namespace) -> int:
    """``reempathy ab DIR_A DIR_B --judge NAME [--set K=V]… [--out FILE] [--json]``."""
    from tqdm import tqdm

    from reempathy.evaluation.base import PairItem, PairwiseEvaluator
    from reempathy.evaluation.metrics import bootstrap_ci
    from reempathy.evaluation.registry import build_evaluator, evaluator_options, parse_sets
    from reempathy.evaluation.runs import read_run

    registry = _registry()
    registry.get("evaluator", args.judge)
    options = parse_sets(args.overrides)
    evaluator_options(registry, args.judge, options)
    if args.out:  # checked before any pair is judged; never over a run's own files
        from reempathy.jobs.rundir import check_not_run_file
        from reempathy.safe_write import check_output_file

        check_output_file(args.out, "--out")
        check_not_run_file(args.out, "--out", "ab")
    a_items = read_run(args.dir_a)
    b_by_id = {i.id: i for i in read_run(args.dir_b)}
    pairs = [PairItem(a.id, a, b_by_id[a.id]) for a in a_items if a.id in b_by_id]
    if not pairs:
        raise InputError(f"runs {args.dir_a!r} and {args.dir_b!r} share no record ids; compare runs of the same data set")
    judge = build_evaluator(registry, args.judge, options)
    if not isinstance(judge, PairwiseEvaluator):
        raise ConfigError(f"evaluator {args.judge!r} cannot compare two answers; use a judge such as llm-judge")
    results = []
    with tqdm(total=len(pairs), desc=f"ab {args.judge}", unit="pair", disable=args.quiet) as bar:
        for batch in _batches(pairs, args.batch_size):
            results += _call(judge, args.judge, "compare", batch)
            bar.update(len(batch))
    counts = {k: sum(1 for r in results if r.outcome == k) for k in ("win", "tie", "loss")}
    failed = [r for r in results if r.outcome is None]
    points = [{"win": 1.0, "tie": 0.5, "loss": 0.0}[r.outcome] for r in results if r.outcome is not None]
    lo, hi = bootstrap_ci(points)
    report = {
        "schema": "reempathy.ab/1", "a": str(args.dir_a), "b": str(args.dir_b), "judge": args.judge,
        "pairs": len(pairs), "unmatched": len(a_items) + len(b_by_id) - 2 * len(pairs), **counts,
        "failures": len(failed), "preference": sum(points) / len(points) if points else None,
        "preference_ci95": [lo, hi] if points else None,
        "position_consistent": sum(1 for r in results if r.orders.get("ab") and r.orders.get("ab") == _swap(r.orders.get("ba"))),
    }
    if args.out:
        from reempathy.evaluation.runs import atomic_text

        rows = [{"id": r.id, "outcome": r.outcome, "orders": r.orders, "error": r.error, "raw": r.raw} for r in results]
        atomic_text(Path(args.out), "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_ab(report))
    return 0


def _swap(verdict: str | None) -> str | None:
    return {"first": "second", "second": "first", "tie": "tie"}.get(verdict or "")


def format_ab(r: dict[str, Any]) -> str:
    """One paragraph: win / tie / loss of A against B, the preference score with its interval, failures."""
    n = r["win"] + r["tie"] + r["loss"]
    lines = [f"A = {r['a']}  vs  B = {r['b']}  (judge {r['judge']}, {r['pairs']} pairs, each judged in both orders)"]
    if n:
        pct = lambda k: 100.0 * r[k] / n  # noqa: E731
        lo, hi = r["preference_ci95"]
        lines.append(f"  A win {r['win']} ({pct('win'):.0f}%)  tie {r['tie']} ({pct('tie'):.0f}%)  loss {r['loss']} ({pct('loss'):.0f}%)")
        lines.append(f"  A's preference (win 1, tie 0.5): {r['preference']:.3f}  95% CI [{lo:.3f}, {hi:.3f}]")
        lines.append(f"  verdicts that agree across both orders: {r['position_consistent']} of {n}")
    if r["failures"]:
        lines.append(f"  failures: {r['failures']} pair(s) without a verdict (see --out for the errors)")
    if r["unmatched"]:
        lines.append(f"  {r['unmatched']} record(s) in only one of the runs were left out")
    return "\n".join(lines)


def cmd_eval_check(args: argparse.Namespace) -> int:
    """``reempathy eval-check --evaluator NAME --data HUMAN.jsonl [--set K=V]… [--json]``."""
    from tqdm import tqdm

    from reempathy.evaluation.data import load_labelled
    from reempathy.evaluation.metrics import agreement_table, format_agreement
    from reempathy.evaluation.registry import build_evaluator, evaluator_options, parse_sets

    registry = _registry()
    registry.get("evaluator", args.evaluator)
    options = parse_sets(args.overrides)
    evaluator_options(registry, args.evaluator, options)
    data = load_labelled(args.data)
    labelled = [r for r in data.records if r.scores]
    if not labelled:
        raise InputError(f"data file {args.data!r} has no records with human scores (\"scores\" or assessment.scores)")
    evaluator = build_evaluator(registry, args.evaluator, options)
    preds, human, failures = [], [], []
    with tqdm(total=len(labelled), desc=f"eval-check {args.evaluator}", unit="record", disable=args.quiet) as bar:
        for batch in _batches(labelled, args.batch_size):
            for rec, ev in zip(batch, _call(evaluator, args.evaluator, "evaluate", [r.item for r in batch])):
                if ev.error:
                    failures.append(f"{rec.item.id}: {ev.error}")
                else:
                    preds.append(ev.scores)
                    human.append(rec.scores)
            bar.update(len(batch))
    names = [n for n in evaluator.score_names if any(n in h for h in human)]
    table = agreement_table(preds, human, names)
    if args.json:
        json.dump({"evaluator": args.evaluator, "data": args.data, "records": len(labelled), "failures": failures,
                   "agreement": {k: v.to_json() for k, v in table.items()}}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"{args.evaluator} against human scores in {args.data} ({len(preds)} of {len(labelled)} records scored)")
        print(format_agreement(table))
        if failures:
            print(f"  failures: {len(failures)}, first: {failures[0]}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an evaluator option, e.g. --set checkpoint=runs/empathyeval (repeatable)")
    p.add_argument("--batch-size", type=count_arg, default=8, help="records per evaluator call (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_eval_parser(subparsers: Any) -> None:
    """Add ``eval``, ``ab`` and ``eval-check`` to the ``reempathy`` command's subparsers."""
    p = subparsers.add_parser("eval", help="score a run directory with an evaluator (resumable)")
    p.add_argument("dir", help="run directory with results.jsonl (written by `reempathy run`)")
    p.add_argument("--evaluator", "-e", required=True, help="evaluator name (see `reempathy plugins`)")
    p.add_argument("--name", help="score file name under DIR/scores/ (default: the evaluator's name)")
    p.add_argument("--retry-failed", action="store_true", help="score again the records whose earlier attempt failed")
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("ab", help="compare two runs record by record with a judge (win / tie / loss)")
    p.add_argument("dir_a", help="run directory A")
    p.add_argument("dir_b", help="run directory B")
    p.add_argument("--judge", "-j", required=True, help="a pairwise evaluator, e.g. llm-judge")
    p.add_argument("--out", help="write each pair's verdicts (both orders) to this JSONL")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _common(p)
    p.set_defaults(func=cmd_ab)

    p = subparsers.add_parser("eval-check", help="LCC / SRCC / MSE of an evaluator against human scores")
    p.add_argument("--evaluator", "-e", required=True, help="evaluator name")
    p.add_argument("--data", required=True, help="JSONL of dialogues with human scores (docs/evaluation.md)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    _common(p)
    p.set_defaults(func=cmd_eval_check)


__all__ = ["add_eval_parser", "cmd_eval", "score_run", "cmd_ab", "cmd_eval_check", "format_summary", "format_ab"]
