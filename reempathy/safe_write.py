"""The one write discipline for every output: checked before any work, written beside, synced, renamed.

Every file a command writes (WAVs, JSON, manifests, checkpoints, converted weights) goes
through here:

1. **Check first** (:func:`check_output_file`, :func:`check_output_dir`), before the expensive
   part: the path is missing or a regular file (never a pipe, a device or a symbolic link,
   which a rename would silently replace), its name fits the file system, its directory
   exists and is writable. A refused run has touched nothing.
2. **Write a temporary sibling** (same directory, so the rename cannot cross file systems),
   named ``.NAME.tmp-PID-RANDOM``; ``fsync`` it.
3. **Rename it over the path** (atomic on POSIX) and ``fsync`` the directory. A reader sees the
   old complete file or the new complete one, never half of one; a killed run leaves at most
   a hidden temporary, which the next write to the same path removes (its process is gone).

Files that grow a line at a time (a run's ``results.jsonl``, score files, half-made outputs) are
the job layer's: :class:`reempathy.jobs.rundir.LineAppender` appends them (one ``write`` of the
whole line, then ``fsync``) and :func:`reempathy.jobs.rundir.scan_results` reads them back,
leaving out a last line a kill cut short.

Directories that are produced whole (``reempathy convert``) are written into a temporary
sibling and swapped in by :func:`replacing_dir`; a previous complete directory is moved aside
only for the instant of the swap, and a run killed in that instant is repaired by the next one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reempathy.errors import InputError, ReempathyError
from reempathy.paths import check_name, describe_kind, path_kind, resolved_kind

# A temporary name keeps at most this much of the target's name, so that it fits NAME_MAX too.
_STEM = 80


def check_output_file(path: str | os.PathLike[str], what: str, error: type[ReempathyError] = InputError) -> Path:
    """``path`` if a file may be written there; ``error`` (one line, naming ``what``) otherwise. Writes nothing."""
    p = check_name(path, what, error)
    kind = path_kind(p, what, error)
    if kind not in ("missing", "file"):
        raise error(
            f"{what} {str(p)!r} is {describe_kind(kind)}; give the path of a regular file "
            "(outputs are written beside it and renamed into place, which would replace it)"
        )
    _check_parent(p, what, error)
    if kind == "file" and not os.access(p, os.W_OK):
        raise error(f"{what} {str(p)!r} is read-only; make it writable or choose another path")
    return p


def check_output_dir(path: str | os.PathLike[str], what: str, error: type[ReempathyError] = InputError) -> Path:
    """``path`` if it is an existing directory or can be created as one; ``error`` otherwise. Creates nothing."""
    p = check_name(path, what, error)
    kind = resolved_kind(p, what, error)
    if kind == "dir":
        if not os.access(p, os.W_OK | os.X_OK):
            raise error(f"{what} {str(p)!r} is not writable; choose another directory")
        return p
    if kind != "missing":
        raise error(f"{what} {str(p)!r} is {describe_kind(kind)}; give a directory path")
    # The nearest existing ancestor must be a writable directory (mkdir -p will make the rest).
    ancestor = p.parent
    while True:
        akind = resolved_kind(ancestor, what, error)
        if akind == "dir":
            break
        if akind != "missing":
            raise error(f"{what} {str(p)!r}: {str(ancestor)!r} is {describe_kind(akind)}, not a directory")
        if ancestor == ancestor.parent:
            break
        ancestor = ancestor.parent
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise error(f"{what} {str(p)!r}: directory {str(ancestor)!r} is not writable; choose another path")
    return p


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when ``a`` and ``b`` name one file: the same path once links are followed, or one file by two names (hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they lead
        return os.path.realpath(a) == os.path.realpath(b)


def check_not_input(
    output: str | os.PathLike[str], what: str, inputs: Iterable[tuple[str, str | os.PathLike[str] | None]],
    error: type[ReempathyError] = InputError,
) -> None:
    """``error`` when the output ``output`` is one of ``inputs`` (``(flag, path)``): an output is never an input of its command."""
    for flag, path in inputs:
        if path is not None and os.fspath(path) and same_file(output, path):
            raise error(
                f"{what} {os.fspath(output)!r} is also {flag}, which this command reads: an output must not be an "
                "input of the same command; write it to another path"
            )


def _check_parent(p: Path, what: str, error: type[ReempathyError]) -> None:
    parent = p.parent
    kind = resolved_kind(parent, f"{what} {str(p)!r}: directory", error)
    if kind == "missing":
        raise error(f"{what} {str(p)!r}: directory {str(parent)!r} does not exist; create it first")
    if kind != "dir":
        raise error(f"{what} {str(p)!r}: {str(parent)!r} is {describe_kind(kind)}, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{what} {str(p)!r}: directory {str(parent)!r} is not writable; choose another path")


def _temp_sibling(p: Path, label: str) -> Path:
    return p.parent / f".{p.name[:_STEM]}.{label}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's process, or a number that cannot be a pid
    return True


def _stale(entry_name: str, prefix: str) -> bool:
    """True when ``entry_name`` is ``PREFIX-PID-RANDOM`` of a process that no longer runs (or has no pid)."""
    if not entry_name.startswith(prefix + "-"):
        return False
    parts = entry_name[len(prefix) + 1 :].split("-")
    if len(parts) == 2 and parts[0].isdigit():
        return not _pid_alive(int(parts[0]))
    return len(parts) == 1  # the older ``PREFIX-RANDOM`` form carried no pid; its writer is long gone


def remove_stale(p: Path, label: str) -> list[Path]:
    """Remove temporaries ``.NAME.LABEL-PID-*`` beside ``p`` whose process is gone; return what was removed."""
    prefix = f".{p.name[:_STEM]}.{label}"
    removed = []
    try:
        entries = list(os.scandir(p.parent))
    except OSError:
        return removed
    for entry in entries:
        if _stale(entry.name, prefix):
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file (or a directory's entries) to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


@contextmanager
def output_file(path: str | os.PathLike[str], what: str, error: type[ReempathyError] = InputError) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it is synced and renamed over ``path``.

    On any error (or an interrupt) the temporary is removed and ``path`` is left as it was.
    """
    p = check_output_file(path, what, error)
    remove_stale(p, "tmp")
    tmp = _temp_sibling(p, "tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file of {p}")
        fsync_path(tmp)
        check_output_file(p, what, error)  # still a regular file or missing after the work
        os.replace(tmp, p)
        fsync_path(p.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike[str], data: bytes, what: str, error: type[ReempathyError] = InputError) -> Path:
    """Write ``data`` to ``path`` by the discipline above."""
    with output_file(path, what, error) as tmp:
        with open(tmp, "xb") as fh:
            fh.write(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str, what: str, error: type[ReempathyError] = InputError) -> Path:
    """Write UTF-8 ``text`` to ``path`` by the discipline above."""
    return write_bytes(path, text.encode("utf-8"), what, error)


def write_json(
    path: str | os.PathLike[str], data: Any, what: str, error: type[ReempathyError] = InputError, indent: int = 2
) -> Path:
    """Write ``data`` as JSON (UTF-8, a final newline) to ``path`` by the discipline above."""
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n", what, error)


def write_with(
    path: str | os.PathLike[str], write: Callable[[Path], None], what: str, error: type[ReempathyError] = InputError
) -> Path:
    """Let ``write(tmp)`` produce the file (for libraries that want a file name), then rename it into place."""
    with output_file(path, what, error) as tmp:
        write(tmp)
    return Path(path)


def restore_interrupted_swap(dst: Path, label: str = "replaced") -> Path | None:
    """Repair a swap killed between its two renames: put the previous directory back if ``dst`` is gone.

    Returns the restored path, or None. Leftovers of a finished swap are removed.
    """
    prefix = f".{dst.name[:_STEM]}.{label}"
    restored = None
    try:
        entries = sorted(os.scandir(dst.parent), key=lambda e: e.name)
    except OSError:
        return None
    for entry in entries:
        if not _stale(entry.name, prefix):
            continue
        old = Path(entry.path)
        if restored is None and not os.path.lexists(dst):
            os.replace(old, dst)
            restored = dst
        else:
            shutil.rmtree(old, ignore_errors=True)
    return restored


@contextmanager
def replacing_dir(dst: str | os.PathLike[str], label: str = "partial") -> Iterator[Path]:
    """Yield a fresh temporary sibling directory; on success its files are synced and it replaces ``dst``.

    The caller has checked ``dst`` (missing, or a directory it may replace). Temporaries of
    killed runs (``.DST.LABEL-PID-*``) are removed first, and a swap killed halfway is undone,
    so no run leaves ``dst`` missing when a complete one existed. On failure the temporary goes.
    """
    dst = Path(dst)
    restore_interrupted_swap(dst)
    remove_stale(dst, label)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(dst, label)
    tmp.mkdir()
    try:
        yield tmp
        for item in tmp.rglob("*"):
            if item.is_file():
                fsync_path(item)
        fsync_path(tmp)
        if not os.path.lexists(dst):
            os.replace(tmp, dst)
        else:
            old = _temp_sibling(dst, "replaced")
            os.replace(dst, old)
            try:
                os.replace(tmp, dst)
            except BaseException:
                os.replace(old, dst)
                raise
            shutil.rmtree(old, ignore_errors=True)
        fsync_path(dst.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = [
    "check_output_file",
    "check_output_dir",
    "check_not_input",
    "same_file",
    "output_file",
    "write_bytes",
    "write_text",
    "write_json",
    "write_with",
    "replacing_dir",
    "restore_interrupted_swap",
    "remove_stale",
    "fsync_path",
]
