"""A run directory on disk: ``manifest.json``, ``results.jsonl``, per-rank shards, and how they survive a crash.

Layout (docs/experiments.md)::

    DIR/manifest.json           what made the run (schema reempathy.run/1), written atomically
    DIR/results.jsonl           one reempathy.run-record/1 line per record, in data-file order once complete
    DIR/shards/rank-R.jsonl     while several processes run: each rank appends only to its own file
    DIR/wav/<id>.wav            spoken answers (``--speech``)
    DIR/scores/<evaluator>.jsonl  written later by ``reempathy eval``

Where it decides:

- **appending** (:class:`LineAppender`): one ``write`` of a whole line, then ``fsync``, so a
  crash (even SIGKILL) leaves every earlier line intact and at most one torn line at the end.
- **recovering** (:func:`consolidate`): a line without its newline at the end of a file is torn
  and dropped (its record is decoded again); lines from every shard and from results.jsonl are
  merged, duplicates by id dropped, sorted by data-file line and written atomically (temporary
  sibling, fsync, rename) before the shards are removed. A crash between the rename and the
  removal leaves duplicates in shards, which the next consolidation drops again. A bad line
  that is *not* at the end of a file cannot come from a crash: it is reported, never dropped.
- **identity** (:func:`check_same_run`): a directory belongs to one resolved config, one
  checkpoint (its path and creation time) and one data file (its SHA-256).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from reempathy.checkpoints import now_iso
from reempathy.errors import ConfigError, InputError
from reempathy.jobs.identity import first_difference
from reempathy.paths import check_name, describe_kind, resolved_kind
from reempathy.safe_write import write_bytes

RUN_SCHEMA = "reempathy.run/1"
RECORD_SCHEMA = "reempathy.run-record/1"
SWEEP_SCHEMA = "reempathy.sweep/1"
MANIFEST = "manifest.json"
RESULTS = "results.jsonl"
SHARDS = "shards"
WAVS = "wav"
SCORES = "scores"
SWEEP_MANIFEST = "sweep.json"
# What --force removes: only what a run writes, never a file we do not know.
RUN_OUTPUTS = (RESULTS, SHARDS, WAVS, SCORES, MANIFEST)


# --- writing ------------------------------------------------------------------------------


def dumps_line(doc: dict[str, Any]) -> bytes:
    """One JSON line (UTF-8, compact, newline-terminated); text that cannot be UTF-8 is escaped instead."""
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: keep the line valid JSON and valid UTF-8
        data = json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return data + b"\n"


class LineAppender:
    """Appends whole lines to a file: each one written with a single ``write`` and made durable with ``fsync``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if not existed:
            _fsync_dir(self.path.parent)

    def append(self, doc: dict[str, Any]) -> None:
        data = memoryview(dumps_line(doc))
        while data:  # a regular file takes the whole line at once; loop only for the rare short write
            n = os.write(self.fd, data)
            data = data[n:]
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "LineAppender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_json_atomic(path: str | Path, doc: Any) -> None:
    """Write ``doc`` as indented JSON: temporary sibling, fsync, rename."""
    write_bytes_atomic(path, (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` by the one write discipline (:mod:`reempathy.safe_write`): checked, temporary
    sibling, fsync, rename."""
    write_bytes(path, data, "run file")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync directories
        pass
    finally:
        os.close(fd)


# --- reading ------------------------------------------------------------------------------


@dataclass
class ScannedFile:
    """The complete lines of a JSONL file and whether a torn tail (a crash mid-write) was found."""

    path: Path
    docs: list[dict[str, Any]] = field(default_factory=list)
    torn: bool = False


def scan_results(path: str | Path, required: Iterable[str] = ("id", "line")) -> ScannedFile:
    """Read every complete line of a results (or shard, or scores) file.

    A last line without its newline is torn: it is left out and reported by ``torn``. Any other
    line that is not a JSON object with the ``required`` keys raises ``InputError``.
    """
    p = Path(path)
    out = ScannedFile(p)
    if not p.is_file():
        return out
    raw = p.read_bytes()
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    out.torn = bool(tail)
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            doc = None
        if not isinstance(doc, dict) or any(k not in doc for k in required):
            raise InputError(
                f"{p}:{n}: not a complete result line, and not the last line, so not a crash mid-write; "
                "the file was changed by hand or is damaged: repair or remove it (or rerun with --force)"
            )
        out.docs.append(doc)
    return out


def shard_path(directory: str | Path, rank: int) -> Path:
    """The file rank ``rank`` appends to while several processes run."""
    return Path(directory) / SHARDS / f"rank-{rank}.jsonl"


def consolidate(directory: str | Path) -> list[dict[str, Any]]:
    """Merge shards and results.jsonl into one results.jsonl in record order; return its records.

    Idempotent and crash-safe (module docstring). Rewrites nothing when results.jsonl is already
    whole, ordered and alone.
    """
    d = Path(directory)
    main = scan_results(d / RESULTS)
    shard_dir = d / SHARDS
    shards = [scan_results(p) for p in sorted(shard_dir.glob("rank-*.jsonl"))] if shard_dir.is_dir() else []
    merged: dict[str, dict[str, Any]] = {}
    for scanned in [main, *shards]:
        for doc in scanned.docs:
            merged.setdefault(str(doc["id"]), doc)
    docs = sorted(merged.values(), key=lambda doc: int(doc["line"]))
    changed = main.torn or bool(shards) or len(docs) != len(main.docs) or docs != main.docs
    if changed:
        write_bytes_atomic(d / RESULTS, b"".join(dumps_line(doc) for doc in docs))
    if shard_dir.is_dir():
        shutil.rmtree(shard_dir)
    return docs


def done_ids(directory: str | Path) -> set[str]:
    """Ids of the records results.jsonl already holds (call after :func:`consolidate`)."""
    return {str(doc["id"]) for doc in scan_results(Path(directory) / RESULTS).docs}


# --- the manifest --------------------------------------------------------------------------


def read_run_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The directory's manifest.json, None if there is none; ``InputError`` if it is not a run manifest."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); the run directory is damaged") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to be a run manifest; the run directory is damaged") from None
    if not isinstance(doc, dict) or doc.get("schema") != RUN_SCHEMA:
        raise InputError(f"{path}: not a run manifest (schema {RUN_SCHEMA!r}); is {str(directory)!r} a run directory?")
    return doc


def run_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What must match for a rerun to continue a directory: config, checkpoint, data hash."""
    checkpoint = manifest.get("checkpoint") or None
    if checkpoint:
        checkpoint = {k: checkpoint.get(k) for k in ("path", "created", "steps")}
    return {
        "config": manifest.get("config"),
        "checkpoint": checkpoint,
        "data.sha256": (manifest.get("data") or {}).get("sha256"),
    }


def check_same_run(directory: str | Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """``ConfigError`` naming the first difference when ``old`` (on disk) and ``new`` describe different runs."""
    diff = first_difference(run_identity(old), run_identity(new))
    if diff is not None:
        key, there, here = diff
        raise ConfigError(
            f"{str(directory)!r} holds a run made with another config ({key}: {there} there, {here} now); "
            "use another --out, or --force to discard its results and start again"
        )


def run_file(path: str | Path) -> tuple[Path, str] | None:
    """``(directory, name)`` when ``path`` is one of the files a run or sweep directory keeps, else None.

    A run directory (it holds ``manifest.json``) keeps :data:`RUN_OUTPUTS` (``results.jsonl``,
    ``manifest.json`` and everything under ``shards/``, ``wav/``, ``scores/``); a sweep directory its
    ``sweep.json``. Symbolic links are followed, so a link into a run directory is caught too.
    """
    p = Path(os.path.realpath(path))
    for folder in p.parents:
        first = p.relative_to(folder).parts[0]
        if (first in RUN_OUTPUTS and (folder / MANIFEST).is_file()) or (
            first == SWEEP_MANIFEST and (folder / SWEEP_MANIFEST).is_file()
        ):
            return folder, p.relative_to(folder).as_posix()
    return None


def check_not_run_file(path: str | Path, flag: str, command: str) -> None:
    """``InputError`` when the output ``path`` of ``command`` is a file a run directory keeps (:func:`run_file`).

    An output must never be a file of a run directory the command does not own: ``report D --csv
    D/results.jsonl`` would replace the run's results with a table.
    """
    owner = run_file(path)
    if owner is not None:
        directory, name = owner
        example = f" (e.g. {str(directory / 'table.csv')!r})" if command == "report" else ""
        raise InputError(
            f"{flag} {str(path)!r} is {name!r} of the run directory {str(directory)!r}, which `reempathy {command}` "
            f"does not write; give a path outside that run's own files{example}"
        )


def check_data_outside(data: str | Path, directory: str | Path) -> None:
    """``InputError`` when the data file a run reads is one of the files it writes (or ``--force`` clears) in ``directory``."""
    p, d = Path(os.path.realpath(data)), Path(os.path.realpath(directory))
    if d in p.parents and p.relative_to(d).parts[0] in RUN_OUTPUTS:
        raise InputError(
            f"--data {str(data)!r} is {p.relative_to(d).as_posix()!r} of the run directory --out {str(directory)!r}, "
            "which the run writes (and --force clears): an output must not be an input of the same command; "
            "copy the data elsewhere first"
        )


def clear_run(directory: str | Path) -> None:
    """Remove what a run wrote (``--force``); files we did not write are left alone."""
    d = Path(directory)
    for name in RUN_OUTPUTS:
        p = d / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


class RunStore:
    """A run directory as the job driver's store (:mod:`reempathy.jobs.driver`): identity, claim, appends, merge.

    ``manifest`` is the run's manifest as :func:`reempathy.experiments.run.new_manifest` makes
    it; the job may fill in more (the backbone it loaded) before the claim writes it.
    ``records`` is the number of records in the data file: the run is complete when
    results.jsonl holds them all.
    """

    def __init__(self, out: Path, manifest: dict[str, Any], records: int) -> None:
        self.out = out
        self.manifest = manifest
        self.records = records
        self.old: dict[str, Any] | None = None

    def check(self, force: bool) -> None:
        """Another config's directory, or results without a manifest, are refused (unless ``force``)."""
        out = self.out
        self.old = read_run_manifest(out) if out.is_dir() else None
        if force:
            return
        if self.old is not None:
            check_same_run(out, self.old, self.manifest)
        elif (out / RESULTS).exists() or (out / SHARDS).exists():
            raise ConfigError(
                f"{str(out)!r} holds results but no {MANIFEST}, so nothing says which config made them; "
                "use another --out, or --force to discard them"
            )

    def done_ids(self, force: bool) -> set[str]:
        return set() if force else done_ids(self.out)

    def claim(self, force: bool) -> None:
        """Clear (``force``), write the manifest with this attempt in its history, merge an earlier attempt's shards."""
        out, manifest, old = self.out, self.manifest, self.old
        out.mkdir(parents=True, exist_ok=True)
        if force:
            clear_run(out)
            old = None
        if old and "backbone" not in manifest and old.get("backbone"):
            manifest["backbone"] = old["backbone"]  # nothing was loaded this time: keep what the last attempt recorded
        history = list(old.get("history", [])) if old else []
        history.append({"started": now_iso(), "finished": None, "processes": manifest.get("processes", 1),
                        "command": " ".join(sys.argv[1:]) or None})
        manifest["started"] = old.get("started") if old and old.get("started") else history[-1]["started"]
        manifest["finished"] = None
        manifest["history"] = history
        write_json_atomic(out / MANIFEST, manifest)
        consolidate(out)

    def writer(self, group: Any) -> "LineAppender":
        """results.jsonl alone; each rank's own shard when there are several."""
        return LineAppender(self.out / RESULTS if group.size == 1 else shard_path(self.out, group.rank))

    def finish(self, report: Any) -> bool:
        """Merge the shards in record order; close this attempt in the history; ``finished`` once every record is done."""
        docs = consolidate(self.out)
        complete = len(docs) == self.records
        path = self.out / MANIFEST
        manifest = read_run_manifest(self.out)
        if manifest is None:
            raise InputError(f"{path}: disappeared while the run was going on")
        now = now_iso()
        if manifest.get("history"):
            manifest["history"][-1]["finished"] = now
        manifest["finished"] = now if complete else None
        write_json_atomic(path, manifest)
        return complete


def check_out_dir(directory: str | Path, kind: str = "run") -> Path:
    """``directory`` as a path a run (or sweep) may use: a folder or nothing; not the other kind's folder.

    An empty path is an error (it would be the current folder); a symbolic link must lead to a folder;
    a folder among another run's own files (its ``wav/``, ``scores/``, …) is refused.
    """
    d = check_name(directory, "--out")
    state = resolved_kind(d, "--out")  # a dangling link is one line here, not a FileExistsError from mkdir
    if state not in ("missing", "dir"):
        raise InputError(f"--out {str(d)!r} is {describe_kind(state)}; give a directory")
    owner = run_file(d)
    if owner is not None:
        raise InputError(
            f"--out {str(d)!r} is {owner[1]!r} of the run directory {str(owner[0])!r}, which belongs to that run; "
            "give a directory of its own"
        )
    if kind == "run" and (d / SWEEP_MANIFEST).is_file():
        raise InputError(f"--out {str(d)!r} is a sweep directory; give a directory of its own to a run")
    if kind == "sweep" and (d / MANIFEST).is_file():
        raise InputError(f"--out {str(d)!r} is a run directory; give a directory of its own to a sweep")
    return d


__all__ = [
    "RUN_SCHEMA",
    "RECORD_SCHEMA",
    "SWEEP_SCHEMA",
    "MANIFEST",
    "RESULTS",
    "SHARDS",
    "WAVS",
    "SCORES",
    "SWEEP_MANIFEST",
    "LineAppender",
    "ScannedFile",
    "scan_results",
    "shard_path",
    "consolidate",
    "done_ids",
    "read_run_manifest",
    "run_identity",
    "check_same_run",
    "clear_run",
    "check_out_dir",
    "RunStore",
    "check_not_run_file",
    "check_data_outside",
    "run_file",
    "write_json_atomic",
    "write_bytes_atomic",
    "dumps_line",
]
