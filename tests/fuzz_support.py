"""Helpers of the fuzz suite (tests/test_fuzz.py): counts, a sandbox, a TOML writer, an in-process command runner."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

COUNTS: Counter[str] = Counter()  # generated inputs tried per property; conftest prints them
EXITS: dict[str, Counter[int]] = {}  # per property: how many inputs ended with each exit status (0 ran, 2 refused)


@dataclass
class Outcome:
    """What one in-process command did."""

    code: int
    out: str
    err: str


def run_cli(argv: list[str], cwd: Path) -> Outcome:
    """``reempathy.cli.main(argv)`` in ``cwd`` with stdout/stderr captured."""
    from reempathy.cli import main

    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        os.chdir(before)
    return Outcome(code, out.getvalue(), err.getvalue())


def check_outcome(outcome: Outcome, argv: list[str]) -> None:
    """The properties every command keeps: exit 0 or 2 on user input, and an error is one line, never a traceback."""
    shown = " ".join(repr(a)[:80] for a in argv)
    assert outcome.code in (0, 2), f"exit {outcome.code} for {shown}: {outcome.err[-2000:]}"
    debug = "--debug" in argv[: argv.index("--") if "--" in argv else len(argv)]
    err = outcome.err
    if debug and "Traceback" in err:  # --debug asked for it; the error line still closes the output
        err = err.strip().splitlines()[-1]
    assert "Traceback" not in err, f"traceback for {shown}: {outcome.err[-2000:]}"
    if outcome.code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1, f"{len(lines)} lines for {shown}: {outcome.err[-2000:]}"
        assert lines[0].startswith("reempathy: error: "), lines[0]


# --- a sandbox: the only place a generated command may write -----------------------------------


def make_sandbox(root: Path) -> tuple[Path, Path]:
    """``root/sandbox`` (where examples run) and ``root/outside`` (must never change)."""
    sandbox, outside = root / "sandbox", root / "outside"
    sandbox.mkdir()
    outside.mkdir()
    (outside / "target.wav").write_bytes(b"outside, never to be replaced")
    (outside / "target.toml").write_text('[strategy]\nname = "sft"\n')
    return sandbox, outside


def populate(d: Path, outside: Path) -> None:
    """Awkward entries for generated paths: a file, a folder, a link out of the sandbox, a pipe, inputs."""
    (d / "afile").write_text("not a directory")
    (d / "adir").mkdir()
    (d / "link.wav").symlink_to(outside / "target.wav")
    os.mkfifo(d / "fifo")
    (d / "units.txt").write_text("1 2 3 4")
    (d / "garbage.toml").write_bytes(b"\xff\xfe[[[ not toml")
    (d / "sft.toml").write_text('[strategy]\nname = "sft"\n[decode]\nprompt = "hi"\n')
    (d / "train.toml").write_text('[strategy]\nname = "sft"\n[data]\npath = "missing.jsonl"\n[train]\noutput_dir = "o"\n')


def snapshot(path: Path) -> dict[str, tuple[int, float, bytes | None]]:
    """Every entry under ``path`` (not following links) with its mode, mtime and (small files') bytes."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            data = p.read_bytes() if p.is_file() and not p.is_symlink() and st.st_size < 2**16 else None
            result[str(p.relative_to(path))] = (st.st_mode, st.st_mtime, data)
    return result


# --- TOML ----------------------------------------------------------------------------------------

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_key(key: str) -> str:
    return key if _BARE.match(key) else json.dumps(key)


@dataclass(frozen=True)
class Deep:
    """An array nested ``depth`` levels deep (kept as a number, so hypothesis can print the example)."""

    depth: int

    def to_python(self):
        value: object = 1
        for _ in range(self.depth):
            value = [value]
        return value


def toml_value(value) -> str:
    """A TOML value (strings as JSON-escaped basic strings: a lone surrogate makes the file invalid TOML, as it should)."""
    if isinstance(value, Deep):
        return "[" * value.depth + "1" + "]" * value.depth
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def plain(value):
    """``value`` for ``json.dumps``, each :class:`Deep` as a placeholder string that :func:`json_line` expands."""
    if isinstance(value, Deep):
        return f"@@deep{value.depth}@@"
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


_PLACEHOLDER = re.compile(r'"@@deep(\d+)@@"')


def json_line(value) -> str:
    """``value`` as one JSON line, nested arrays of any depth included (written as text, not by recursion)."""
    text = json.dumps(plain(value), ensure_ascii=False)
    return _PLACEHOLDER.sub(lambda m: "[" * int(m.group(1)) + "1" + "]" * int(m.group(1)), text)


def toml_dump(data: dict) -> str:
    """``data`` as a TOML document: scalars first, then [tables] and [[arrays of tables]]."""
    lines = []
    tables = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value, False))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((key, value, True))
        else:
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    for key, value, many in tables:
        for table in value if many else [value]:
            lines.append(f"[[{toml_key(key)}]]" if many else f"[{toml_key(key)}]")
            lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"
