"""Run directories in, score files out.

Reads ``DIR/results.jsonl`` (schema ``reempathy.run-record/1``, written by ``reempathy run``) into
``EvalItem``s, and keeps ``DIR/scores/<name>.jsonl`` (``reempathy.score/1``, one line per record)
and ``DIR/scores/<name>.summary.json``.

Where decisions are made:

- The score file itself (what is done, resuming, the options it was made with, appending whole
  lines) is the job driver's store :class:`reempathy.jobs.scores.ScoreStore`.
- Summaries are written through a temporary sibling and a rename.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from reempathy.errors import InputError
from reempathy.evaluation.base import EvalItem, Evaluation
from reempathy.evaluation.metrics import summarize_scores
from reempathy.jobs.scores import SCORE_SCHEMA, ScoreStore
from reempathy.safe_write import (
    write_text,
)

RUN_RECORD_SCHEMA = "reempathy.run-record/1"
SUMMARY_SCHEMA = "reempathy.score-summary/1"
RESULTS = "results.jsonl"
MANIFEST = "manifest.json"


def read_jsonl(path: Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; ``InputError`` naming the line for bad JSON."""
    with path.open("r", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                if not line.endswith("\n"):
                    return  # a partial last line: the writer was interrupted
                raise InputError(f"{what} {str(path)!r} line {n}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise InputError(f"{what} {str(path)!r} line {n}: JSON nested too deeply to be a record") from None
            if not isinstance(obj, dict):
                raise InputError(f"{what} {str(path)!r} line {n}: expected a JSON object")
            yield n, obj


def run_results(run_dir: str | Path) -> Path:
    """``DIR/results.jsonl``, or an ``InputError`` saying what a run directory is."""
    d = Path(run_dir)
    if not d.is_dir():
        raise InputError(f"run directory {str(d)!r} not found; give a directory written by `reempathy run`")
    path = d / RESULTS
    if not path.is_file():
        raise InputError(
            f"run directory {str(d)!r} has no {RESULTS}; give a directory written by `reempathy run` "
            "(one JSON line per decoded record)"
        )
    return path


def run_manifest(run_dir: str | Path) -> dict[str, Any]:
    """``DIR/manifest.json`` as a dict ({} when the run has none yet)."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to be a run manifest") from None
    return data if isinstance(data, dict) else {}


def item_from_record(record: dict[str, Any], run_dir: Path, where: str) -> EvalItem:
    """One run record (``reempathy.run-record/1``) as an ``EvalItem``; WAV paths made absolute."""
    if record.get("schema") not in (None, RUN_RECORD_SCHEMA):
        raise InputError(f"{where}: schema {record.get('schema')!r}, expected {RUN_RECORD_SCHEMA!r}")
    rid = record.get("id")
    result = record.get("result")
    messages = record.get("messages")
    if rid is None or not isinstance(result, dict) or not isinstance(messages, list):
        raise InputError(f"{where}: a run record needs id, messages and result (see docs/evaluation.md)")
    spoken = result.get("spoken") or {}
    wav = record.get("wav")
    msgs = []
    for m in messages:
        if not isinstance(m, dict):
            raise InputError(f"{where}: each message must be an object with role, text, units or audio")
        m = dict(m)
        if m.get("audio"):
            m["audio"] = str((run_dir / m["audio"]) if not Path(m["audio"]).is_absolute() else m["audio"])
        msgs.append(m)
    return EvalItem(
        id=str(rid),
        messages=msgs,
        answer_text=str(spoken.get("text") or ""),
        answer_units=[int(u) for u in spoken.get("audio_units") or []],
        answer_wav=str(run_dir / wav) if wav else None,
    )


def read_run(run_dir: str | Path) -> list[EvalItem]:
    """Every record of a run directory as an ``EvalItem``, in file order (ids must be unique)."""
    d = Path(run_dir)
    path = run_results(d)
    items: list[EvalItem] = []
    seen: set[str] = set()
    for n, record in read_jsonl(path, "run results"):
        item = item_from_record(record, d, f"{path} line {n}")
        if item.id in seen:
            continue  # the run appended a record twice; its first line stands
        seen.add(item.id)
        items.append(item)
    if not items:
        raise InputError(f"{path} holds no records yet; run `reempathy run` first")
    return items


def evaluation_line(ev: Evaluation, evaluator: str) -> dict[str, Any]:
    """The ``reempathy.score/1`` JSON object of one evaluation."""
    return {
        "schema": SCORE_SCHEMA,
        "id": ev.id,
        "evaluator": evaluator,
        "scores": dict(ev.scores) if ev.error is None else {},
        "text": ev.text,
        "error": ev.error,
        "raw": ev.raw,
    }


def write_summary(store: ScoreStore, evaluator: str, names: Sequence[str], total: int) -> dict[str, Any]:
    """``<name>.summary.json``: per-score mean with a 95 % bootstrap interval, n, failures; written atomically."""
    rows = list(store.lines().values())
    ok = [r["scores"] for r in rows if not r.get("error")]
    failed = [r for r in rows if r.get("error")]
    summary = {
        "schema": SUMMARY_SCHEMA,
        "evaluator": evaluator,
        "records": total,
        "scored": len(ok),
        "failures": len(failed),
        "failed_ids": [str(r.get("id")) for r in failed],
        "scores": summarize_scores(ok, names),
    }
    atomic_text(store.summary_path, json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def atomic_text(path: Path, text: str) -> None:
    """Write ``text`` by the one write discipline (:mod:`reempathy.safe_write`): checked, temporary sibling, fsync, rename."""
    write_text(path, text, "score summary")


def evaluation_from_line(line: dict[str, Any]) -> Evaluation:
    """A score line back as an ``Evaluation``."""
    return Evaluation(
        id=str(line.get("id")), scores=dict(line.get("scores") or {}), text=line.get("text"),
        error=line.get("error"), raw=line.get("raw"),
    )


__all__ = [
    "RUN_RECORD_SCHEMA", "SCORE_SCHEMA", "SUMMARY_SCHEMA", "read_run", "read_jsonl", "run_manifest",
    "run_results", "item_from_record", "evaluation_line", "evaluation_from_line", "write_summary", "atomic_text",
]
