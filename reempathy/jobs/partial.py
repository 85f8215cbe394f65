"""A JSONL output built record by record that survives a crash: the store of ``reflect-data`` and ``pairs``.

While the work goes on, nothing is at ``OUT`` itself::

    OUT.partial.json   what makes the output (data file hash, evaluator and its options, …), written first
    OUT.partial        one line per record done: {"id", "line", "record": <the output record> | null, ...}

and when every record is done, ``OUT`` is written in one go (temporary sibling, fsync, rename)
in data-file order and the two progress files are removed. So a file at ``OUT`` is always
complete, and a half-done job is visibly half done.

Where it decides:

- **appending** reuses :class:`reempathy.jobs.rundir.LineAppender` (one ``write`` per
  whole line, then ``fsync``): a crash, even SIGKILL, loses at most the line being written.
- **finishing** (:meth:`PartialJsonl.finish`, called by the job driver): ``OUT`` is written only
  when no record failed, or with ``skip_bad`` (the failed ones left out); otherwise the progress
  stays, and a rerun tries the failed records again.
- **resuming** (:meth:`PartialJsonl.claim`): the complete lines of ``OUT.partial`` are the
  records done (the first line of an id stands: no duplicates); a torn last line is cut off
  before anything is appended (its record is done again). A damaged line that is not the last
  is not a crash: it is reported, never dropped.
- **identity**: a rerun continues only with the same identity (``OUT.partial.json``); another
  data file, evaluator, option or setting is refused, naming the first difference, unless
  ``--force``, which removes the progress files and ``OUT`` (only those).
- **a finished output**: ``OUT`` without progress files is done; a rerun is refused unless
  ``--force``. A crash after ``OUT`` was written but before the progress files were removed is
  resumed like any other: every record is done, so ``OUT`` is written again, the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from reempathy.checkpoints import now_iso
from reempathy.errors import ConfigError, InputError
from reempathy.jobs.rundir import (
    LineAppender,
    check_not_run_file,
    dumps_line,
    scan_results,
    write_bytes_atomic,
    write_json_atomic,
)
from reempathy.jobs.identity import first_difference
from reempathy.safe_write import check_not_input, check_output_file

PROGRESS_SCHEMA = "reempathy.progress/1"


class PartialJsonl:
    """``OUT`` and its progress files (module docstring), as the job driver's store. ``kind`` names the command."""

    def __init__(
        self,
        out: str | Path,
        identity: dict[str, Any],
        kind: str,
        inputs: Sequence[tuple[str, str | Path | None]] = (),
        skip_bad: bool = False,
    ) -> None:
        self.out = Path(out)
        self.identity = identity
        self.kind = kind
        self.skip_bad = skip_bad
        self.final_count: int | None = None
        self.inputs = list(inputs)  # (flag, path) of the files the command reads: never one of its outputs
        self.lines_path = self.out.with_name(self.out.name + ".partial")
        self.identity_path = self.out.with_name(self.out.name + ".partial.json")
        self.done: dict[str, dict[str, Any]] = {}
        self._appender: LineAppender | None = None

    # --- before any work ---------------------------------------------------------------------

    def check(self, force: bool = False) -> None:
        """Refuse what cannot be continued (another identity, a finished OUT) before anything is loaded or written."""
        # Each path must be a regular file or nothing, in a writable folder: the shared write discipline's check.
        for path in (self.out, self.lines_path, self.identity_path):
            what = "--out" if path == self.out else "progress file"
            check_output_file(path, what)
            check_not_input(path, what, self.inputs)
            check_not_run_file(path, what, self.kind)
        if force:
            return
        if self.identity_path.is_file():
            self._check_same(self._read_identity())
        elif self.lines_path.exists():
            raise ConfigError(
                f"{self.lines_path} holds progress but {self.identity_path.name} is missing, so nothing says what made it; "
                "use another --out, or --force to start over"
            )
        elif self.out.exists():
            raise ConfigError(
                f"{str(self.out)!r} exists and is finished; use another --out, or --force to make it again"
            )

    def done_ids(self, force: bool = False) -> set[str]:
        """The ids of the records done, read without writing anything (none with ``force``)."""
        if force:
            return set()
        return {str(doc["id"]) for doc in scan_results(self.lines_path, required=("id", "line")).docs}

    def claim(self, force: bool = False) -> None:
        """Take the output: clear it (``force``), write the identity, cut a torn line, read the lines done."""
        self.check(force)
        if force:
            for path in (self.lines_path, self.identity_path, self.out):
                path.unlink(missing_ok=True)
        if not self.identity_path.is_file():
            write_json_atomic(self.identity_path, {"schema": PROGRESS_SCHEMA, "command": self.kind,
                                                   "identity": self.identity, "started": now_iso()})
        scanned = scan_results(self.lines_path, required=("id", "line"))
        if scanned.torn:  # the tail of a write a crash cut short: its record is done again
            write_bytes_atomic(self.lines_path, b"".join(dumps_line(doc) for doc in scanned.docs))
        self.done = {}
        for doc in scanned.docs:
            self.done.setdefault(str(doc["id"]), doc)

    def writer(self, group: Any) -> "PartialJsonl":
        """This output appends its own lines (one process)."""
        self._appender = LineAppender(self.lines_path)
        return self

    # --- while working -----------------------------------------------------------------------

    def append(self, entry: dict[str, Any]) -> None:
        """Record one finished record: ``entry`` has ``id``, ``line`` and ``record`` (None: nothing to write for it)."""
        if self._appender is None:
            raise RuntimeError("PartialJsonl.append before writer()")
        key = str(entry["id"])
        if key in self.done:
            return
        self._appender.append(entry)
        self.done[key] = entry

    def close(self) -> None:
        """Close the progress file (the work may continue later)."""
        if self._appender is not None:
            self._appender.close()
            self._appender = None

    # --- at the end --------------------------------------------------------------------------

    def finish(self, report: Any) -> bool:
        """Write ``OUT`` from the records done, in data-file order, atomically, and remove the progress files —
        unless a record failed and failures are not skipped (the progress stays for a rerun). True when written."""
        self.close()
        if report.failures and not self.skip_bad:
            return False
        entries = sorted(self.done.values(), key=lambda e: int(e["line"]))
        records = [e["record"] for e in entries if e.get("record") is not None]
        write_bytes_atomic(self.out, b"".join(dumps_line(r) for r in records))
        self.lines_path.unlink(missing_ok=True)
        self.identity_path.unlink(missing_ok=True)
        self.final_count = len(records)
        return True

    # --- identity ------------------------------------------------------------------------------

    def _read_identity(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.identity_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{self.identity_path}: not valid JSON ({exc}); use --force to start over") from None
        if not isinstance(doc, dict) or doc.get("schema") != PROGRESS_SCHEMA or doc.get("command") != self.kind:
            raise ConfigError(
                f"{self.identity_path} is not the progress of `reempathy {self.kind}`; use another --out, or --force"
            )
        return doc.get("identity") or {}

    def _check_same(self, old: dict[str, Any]) -> None:
        diff = first_difference(old, self.identity)
        if diff is not None:
            key, there, here = diff
            raise ConfigError(
                f"{str(self.out)!r} is half made with other settings ({key}: {there} there, {here} now); "
                "rerun with the same settings to continue it, use another --out, or --force to start over"
            )


def unfinished_message(failed: Sequence[Any], out: str | Path) -> str:
    """The one-line error when the evaluator failed on some records and ``OUT`` was therefore not finished."""
    n = len(failed)
    return (
        f"the evaluator failed on {n} record{'s' if n != 1 else ''}, left out (first: {failed[0]}); "
        f"the records done are kept in {out}.partial: rerun the same command to try the failed ones again, "
        f"or add --skip-bad to finish {out} without them"
    )


__all__ = ["PartialJsonl", "PROGRESS_SCHEMA", "unfinished_message"]
