"""A run's score files: ``DIR/scores/<name>.jsonl`` as the job driver's store.

::

    DIR/scores/<name>.jsonl           one reempathy.score/1 line per record (a failure is a line too)
    DIR/scores/<name>.options.json    the evaluator and the options that made the file
    DIR/scores/<name>.summary.json    written by `reempathy eval` when it ends

Where it decides:

- **done** (:meth:`ScoreStore.done_ids`): every complete line counts once (a record scored
  twice keeps its first line); with ``retry_failed`` a failed line does not count, and the claim
  rewrites the file without it, so its record is scored again.
- **identity**: resuming with another evaluator or other options is refused (naming both)
  instead of mixing two evaluators' scores in one file.
- **a crash**: a torn last line (a kill mid-write) is cut before anything is appended; each
  line is appended whole and made durable (:class:`reempathy.jobs.rundir.LineAppender`).
- Every path is checked before any work: a directory, a pipe or a link where a score file goes
  is refused with one line, and nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reempathy.errors import ConfigError, InputError
from reempathy.jobs.rundir import LineAppender, dumps_line, scan_results, write_bytes_atomic
from reempathy.safe_write import check_output_dir, check_output_file, write_text

SCORE_SCHEMA = "reempathy.score/1"
SCORES = "scores"


class ScoreStore:
    """``scores/<name>.jsonl`` of a run directory and its options file (module docstring)."""

    def __init__(self, run_dir: str | Path, name: str, identity: dict[str, Any], retry_failed: bool = False) -> None:
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"score name {name!r}: give a plain file name (letters, digits, - or _)")
        self.dir = Path(run_dir) / SCORES
        self.name = name
        self.path = self.dir / f"{name}.jsonl"
        self.summary_path = self.dir / f"{name}.summary.json"
        self.options_path = self.dir / f"{name}.options.json"
        self.identity = identity
        self.retry_failed = retry_failed

    # --- the driver's store ---------------------------------------------------------------------

    def check(self, force: bool = False) -> None:
        """Refuse paths that cannot be written, and a file made by another evaluator or other options."""
        check_output_dir(self.dir, "score directory")
        if not self.dir.is_dir():
            return
        for path in (self.path, self.options_path, self.summary_path):
            check_output_file(path, "score file")
        if self.options_path.is_file() and self.path.is_file():
            before = self._read_options()
            if before != self.identity:
                raise ConfigError(
                    f"{self.path} was written by evaluator {before.get('evaluator')!r} with other options "
                    f"({json.dumps(before.get('options'), sort_keys=True)}); pass the same options, choose another "
                    "--name, or delete the file to start over"
                )

    def done_ids(self, force: bool = False) -> set[str]:
        """Ids with a line (with ``retry_failed``: a line that is not a failure)."""
        return {rid for rid, row in self.lines().items() if not (self.retry_failed and row.get("error"))}

    def claim(self, force: bool = False) -> None:
        """Write the options file; cut a torn last line; drop failed lines when retrying them."""
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text(self.options_path, json.dumps(self.identity, indent=2, sort_keys=True), "score options")
        scanned = scan_results(self.path, required=("id",))
        keep = scanned.docs
        if self.retry_failed:
            keep = [doc for doc in keep if not doc.get("error")]
        if scanned.torn or len(keep) != len(scanned.docs):
            write_bytes_atomic(self.path, b"".join(dumps_line(doc) for doc in keep))

    def writer(self, group: Any) -> LineAppender:
        return LineAppender(self.path)

    def finish(self, report: Any) -> bool:
        return report.left == 0

    # --- reading ----------------------------------------------------------------------------------

    def lines(self) -> dict[str, dict[str, Any]]:
        """Every complete line, the first per id."""
        done: dict[str, dict[str, Any]] = {}
        for doc in scan_results(self.path, required=("id",)).docs:
            done.setdefault(str(doc["id"]), doc)
        return done

    def _read_options(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.options_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise InputError(f"{self.options_path}: not valid JSON; delete it (and the score file) to start over") from None
        return doc if isinstance(doc, dict) else {}


__all__ = ["ScoreStore", "SCORE_SCHEMA", "SCORES"]
