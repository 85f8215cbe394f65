"""Looking at a path the user gave, without an ``OSError`` escaping: what it is, and whether its name fits.

``stat`` on a path can fail for reasons that are the user's input, not a bug: a file name
longer than the file system allows (``File name too long``), a component that is a file
(``afile/x``), a loop of symbolic links, a directory without permission. :func:`path_kind`
answers with a kind and turns those into one-line errors that name the path, so a command
checks its inputs and outputs before it does any work.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Literal

from reempathy.errors import InputError, ReempathyError

NAME_MAX = 255  # bytes per path component on Linux, macOS and Windows file systems
PATH_MAX = 4096  # bytes in a whole path on Linux

Kind = Literal["missing", "file", "dir", "link", "fifo", "other"]


def check_name(path: str | os.PathLike[str], what: str, error: type[ReempathyError] = InputError) -> Path:
    """``path`` as a Path, or ``error`` when it is empty or a name in it is longer than the file system allows."""
    raw = os.fspath(path)
    if not raw:
        raise error(f"{what}: the path is empty; give a file or directory path")
    if "\x00" in raw:
        raise error(f"{what} {raw!r}: a path cannot contain a NUL character")
    encoded = os.fsencode(raw)
    if len(encoded) > PATH_MAX:
        raise error(f"{what}: the path is {len(encoded)} bytes long, over the {PATH_MAX}-byte limit; use a shorter path")
    for part in encoded.split(b"/"):
        if len(part) > NAME_MAX:
            shown = os.fsdecode(part[:40])
            raise error(
                f"{what}: the name {shown!r}… is {len(part)} bytes long, over the file system's {NAME_MAX}-byte "
                "limit for one name; use a shorter name"
            )
    return Path(raw)


def path_kind(path: str | os.PathLike[str], what: str, error: type[ReempathyError] = InputError) -> Kind:
    """What ``path`` is, without following a final symbolic link; ``error`` for a path that cannot be looked at."""
    p = check_name(path, what, error)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:
        raise error(f"{what} {str(p)!r}: a part of the path is a file, not a directory; check the path") from None
    except OSError as exc:
        raise error(f"{what} {str(p)!r}: cannot be looked at ({_reason(exc)})") from None
    return "link" if stat.S_ISLNK(st.st_mode) else _kind_of(st.st_mode)


def resolved_kind(path: str | os.PathLike[str], what: str, error: type[ReempathyError] = InputError) -> Kind:
    """Like :func:`path_kind`, but following symbolic links (for inputs, where a link to a file is fine)."""
    kind = path_kind(path, what, error)
    if kind != "link":
        return kind
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {os.fspath(path)!r} is a symbolic link to a path that does not exist") from None
    except OSError as exc:
        raise error(f"{what} {os.fspath(path)!r}: cannot be followed ({_reason(exc)})") from None
    return _kind_of(st.st_mode)


def _kind_of(mode: int) -> Kind:
    """The kind of a stat mode that is not a link."""
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "other"


def describe_kind(kind: Kind) -> str:
    """``kind`` in words, for messages: "a directory", "a symbolic link", …"""
    return {
        "missing": "missing",
        "file": "a file",
        "dir": "a directory",
        "link": "a symbolic link",
        "fifo": "a named pipe",
        "other": "a device or socket, not a regular file",
    }[kind]


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "too many levels of symbolic links"
    return exc.strerror or type(exc).__name__


def read_input_file(
    path: str | os.PathLike[str], what: str, limit: int, error: type[ReempathyError] = InputError, hint: str = ""
) -> bytes:
    """The bytes of an input file (a regular file, or a pipe), at most ``limit``; ``error`` naming ``what`` otherwise.

    ``hint`` ends the messages of a missing path or a path of the wrong kind ("give a path to a TOML file").
    """
    p = check_name(path, what, error)
    kind = resolved_kind(p, what, error)
    tail = f"; {hint}" if hint else ""
    if kind == "missing":
        raise error(f"{what} {str(p)!r} not found{tail}")
    if kind not in ("file", "fifo"):
        raise error(f"{what} {str(p)!r} is {describe_kind(kind)}{tail}")
    try:
        with p.open("rb") as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise error(f"{what} {str(p)!r} cannot be read ({exc.strerror or exc})") from None
    if len(raw) > limit:
        raise error(f"{what} {str(p)!r} is larger than {limit // 2**20} MiB; it is not a {what}")
    return raw

__all__ = ["read_input_file", "NAME_MAX", "PATH_MAX", "check_name", "path_kind", "resolved_kind", "describe_kind"]
