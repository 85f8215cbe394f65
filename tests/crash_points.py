"""Kill points for the crash-safety tests: count file-system writes, and SIGKILL the process at the k-th.

Every call that changes files — ``open`` for writing (and each ``write`` on such a file), ``os.replace``,
``os.rename``, ``os.fsync``, ``os.unlink``, ``os.mkdir``, ``shutil.rmtree``, ``shutil.copyfile``,
``torch.save``, ``safetensors.torch.save_file`` — is a point. At point ``k`` the process kills itself
with SIGKILL (no cleanup, no ``finally``), and a ``write`` killed there first writes half of its
buffer, as a kill in the middle of a write would. Run as a script it is the command under test:

    python tests/crash_points.py K reempathy-args...      (K = 0: run to the end, print the count)

The patches go in before anything imports reempathy, so functions imported by name are covered too.
"""

from __future__ import annotations

import builtins
import io
import os
import shutil
import signal
import sys
from contextlib import contextmanager

SEED_ENV = "REEMPATHY_CRASH_SEED"
DRAWN: dict[str, tuple[list[int], int]] = {}  # per command: the kill points drawn and the count; conftest prints them


def crash_seed() -> int:
    """``REEMPATHY_CRASH_SEED`` when set (to repeat a run's kill points), else a fresh random seed for this run."""
    given = os.environ.get(SEED_ENV, "").strip()
    if given:
        return int(given)
    return int.from_bytes(os.urandom(4), "big")


SEED = crash_seed()  # one per pytest run (this module is imported once)


class Points:
    """Counts points; kills the process at ``kill_at`` (1-based; 0 or None never)."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.kill_at = kill_at or None
        self.count = 0

    def hit(self, before_kill=None) -> None:
        self.count += 1
        if self.count == self.kill_at:
            if before_kill is not None:
                before_kill()
            os.kill(os.getpid(), signal.SIGKILL)


class _Writer:
    """A file opened for writing whose every write is a point (a kill there leaves half the buffer written)."""

    def __init__(self, fh, points: Points) -> None:
        self._fh = fh
        self._points = points

    def write(self, data):
        def half():
            self._fh.write(data[: len(data) // 2])
            self._fh.flush()

        self._points.hit(half)
        return self._fh.write(data)

    def __enter__(self):
        self._fh.__enter__()
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)

    def __iter__(self):
        return iter(self._fh)

    def __getattr__(self, name):
        return getattr(self._fh, name)


@contextmanager
def patched(points: Points):
    """Route the file-changing calls through ``points`` while the block runs.

    Besides the functions' home modules, every loaded module that imported one by name
    (``from safetensors.torch import save_file``) gets the counted version too, so a count taken
    in a process that has imported everything already matches a fresh one.
    """
    import safetensors.torch
    import torch

    homes = [
        (os, "replace"), (os, "rename"), (os, "fsync"), (os, "unlink"), (os, "remove"), (os, "mkdir"),
        (shutil, "rmtree"), (shutil, "copyfile"), (torch, "save"), (safetensors.torch, "save_file"),
    ]
    real_open = builtins.open

    def counted(fn):
        def call(*args, **kwargs):
            points.hit()
            return fn(*args, **kwargs)

        return call

    def open_(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wxa+"):
            points.hit()
            return _Writer(fh, points)
        return fh

    swaps = {id(getattr(home, name)): counted(getattr(home, name)) for home, name in homes}
    originals = {id(getattr(home, name)): getattr(home, name) for home, name in homes}
    undo = [(builtins, "open", real_open), (io, "open", real_open)]
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict) or module is sys.modules[__name__]:
            continue
        for attr, value in list(namespace.items()):
            if id(value) in swaps and originals[id(value)] is value:
                undo.append((module, attr, value))
                setattr(module, attr, swaps[id(value)])
    builtins.open = io.open = open_
    try:
        yield points
    finally:
        for module, attr, value in reversed(undo):
            setattr(module, attr, value)


def main() -> int:
    kill_at = int(sys.argv[1])
    points = Points(kill_at)
    with patched(points):
        from reempathy.cli import main as reempathy

        code = reempathy(sys.argv[2:])
    print(f"points: {points.count}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
