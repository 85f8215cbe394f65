"""The ``reempathy`` command: every registered command (:mod:`reempathy.commands`, and plugins').

Where failures become exit codes (:func:`main`; docs/errors.md): a ``ReempathyError`` prints
one line ``reempathy: error: ...`` and exits with its ``exit_code`` (2: the user's input,
1: a plugin's own code failed); a command line argparse cannot read is one line too
(:class:`OneLineArgumentParser`), exit 2; a file-system refusal on a named path (permission,
no space, name too long) is the user's to fix, exit 2; anything else is a bug: one line that
says so, exit 1. ``--debug`` or ``REEMPATHY_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
import warnings
from typing import NoReturn, Sequence

from reempathy.commands import cmd_decode, format_result  # noqa: F401 - their home until the commands moved
from reempathy.errors import ReempathyError, UsageError, one_line_warnings
from reempathy.plugin_commands import add_plugins_dir_option, use_plugins_dirs

DEBUG_ENV = "REEMPATHY_DEBUG"
MAX_MESSAGE = 1000  # characters of one error line; longer messages are cut

# File-system errors on a path the user named: theirs to fix, not a bug.
_USER_ERRNOS = {
    errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP,
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EEXIST, errno.ENXIO, errno.EFBIG, errno.ETXTBSY,
}


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (a UsageError), not a usage block and ``exit(2)``.

    Subparsers inherit the class, so every subcommand's errors read the same.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    """The ``reempathy`` parser: every registered command (the built-ins, then plugins'), in registration order.

    A plugin whose ``add_parser`` fails is skipped with one warning line. (:func:`main` reads
    ``--plugins-dir`` first, so that a command from a plugins directory is there to be parsed.)
    """
    from reempathy.registry import default_discovery, plugin_command_failed

    parser = OneLineArgumentParser(prog="reempathy", description="Decoding strategies for spoken language models.")
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for reg in default_discovery().registry.items.get("command", {}).values():
        before = set(sub.choices)
        try:
            reg.factory(sub)
        except (KeyboardInterrupt, ReempathyError):
            raise
        except Exception as exc:  # noqa: BLE001 - a third-party command must not take the CLI down
            for name in set(sub.choices) - before:
                sub.choices.pop(name, None)
            plugin_command_failed(reg, exc)
    add_plugins_dir_option(parser, sub)  # it adds --plugins-dir to every command
    _add_debug_everywhere(parser)
    return parser


def early_plugins_dirs(argv: Sequence[str]) -> list[str]:
    """The ``--plugins-dir DIR`` values of ``argv`` (before a ``--``), read before the parser exists."""
    dirs = []
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--plugins-dir" and i + 1 < len(args):
            dirs.append(args[i + 1])
        elif arg.startswith("--plugins-dir="):
            dirs.append(arg.split("=", 1)[1])
    return dirs


def _add_debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after the subcommand too (``reempathy decode ... --debug``), as the error hint suggests."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if not any("--debug" in a.option_strings for a in child._actions):
                    child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                _add_debug_everywhere(child)


def debug_requested(argv: Sequence[str]) -> bool:
    """True when ``--debug`` is on the command line (before a ``--``) or ``REEMPATHY_DEBUG`` is set."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off"):
        return True
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--debug":
            return True
    return False


def one_line(message: str) -> str:
    """``message`` on one line (line breaks joined), cut to MAX_MESSAGE characters."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def _emit(line: str) -> None:
    """Print ``line`` to stderr, escaping what its encoding cannot show (a lone surrogate from a bad argument)."""
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    safe = line.encode(encoding, "backslashreplace").decode(encoding, "replace")
    sys.stderr.write(safe + "\n")
    sys.stderr.flush()


def _report(message: str, debug: bool) -> None:
    if debug:
        traceback.print_exc(file=sys.stderr)
    _emit(f"reempathy: error: {one_line(message)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``reempathy`` command; returns the exit status (0 ok, 1 a plugin's failure or a bug, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    if sys.stdout is sys.__stdout__ and hasattr(sys.stdout, "reconfigure"):
        # A file name that is not UTF-8 arrives as lone surrogates; print it back as the bytes it was.
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        use_plugins_dirs(early_plugins_dirs(argv))
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help printed its text
            return exc.code if isinstance(exc.code, int) else 0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="transformers")
            warnings.showwarning = one_line_warnings(warnings.showwarning)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _emit("reempathy: interrupted")
        return 130
    except ReempathyError as exc:
        hint = "; rerun with --debug for the traceback" if exc.exit_code == 1 and not debug else ""
        _report(f"{exc}{hint}", debug)
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in _USER_ERRNOS:
            return _bug(exc, debug)
        target = f"{exc.filename}" if exc.filename is not None else "a file"
        _report(f"{target}: {exc.strerror or exc}; check the path, its permissions and the free space", debug)
        return 2
    except MemoryError:
        _report("out of memory; give a smaller input, model or batch", debug)
        return 2
    except Exception as exc:
        return _bug(exc, debug)


def _bug(exc: BaseException, debug: bool) -> int:
    hint = "" if debug else f"; rerun with --debug (or {DEBUG_ENV}=1) for the traceback"
    _report(f"internal error (a bug in reempathy or a plugin; please report it): {type(exc).__name__}: {exc}{hint}", debug)
    return 1


if __name__ == "__main__":
    sys.exit(main())
