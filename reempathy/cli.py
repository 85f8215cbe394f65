"""The ``reempathy`` command: decode, plugins (and more as they land).

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
import json
import os
import statistics
import sys
import traceback
import warnings
from typing import Any, NoReturn, Sequence

from reempathy.bench import add_bench_parser
from reempathy.errors import InputError, ReempathyError, UsageError, one_line_warnings
from reempathy.evaluation.commands import add_eval_parser
from reempathy.experiments.cli import add_experiment_parsers
from reempathy.options import count_arg, seed_arg
from reempathy.plugin_commands import add_plugins_dir_option, add_plugins_parser
from reempathy.serve.cli import add_serve_parser
from reempathy.speech.cli import add_speech_parser
from reempathy.training.cli import add_demo_parser, add_train_parser
from reempathy.training.data_cli import add_pairs_parser, add_reflect_data_parser

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


def _discovery():
    from reempathy.decoding.registry import default_discovery

    return default_discovery()


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="TOML config file (default: built-in tiny backbone, sft)")
    p.add_argument("--strategy", help="use this strategy instead of the config's (its options are dropped if the name differs)")
    p.add_argument("--backbone", help="use this backbone instead of the config's (its options are dropped if the name differs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set strategy.text_tokens=7 (repeatable)")


def cmd_decode(args: argparse.Namespace) -> int:
    from reempathy.config import load_config
    from reempathy.runner import run_decode
    from reempathy.safe_write import check_not_input, check_output_file

    if args.out and not args.audio:
        raise InputError("--out writes the spoken answer of a spoken turn; give --audio IN.wav too")
    if args.out:
        check_output_file(args.out, "--out")  # before any model is loaded
        check_not_input(args.out, "--out", [("--audio", args.audio), ("--units", args.units), ("--config", args.config)])

    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"sampling.seed={args.seed}")
    if args.max_new_tokens is not None:
        overrides.append(f"decode.max_new_tokens={args.max_new_tokens}")
    if args.greedy:
        overrides.append("sampling.greedy=true")
    if args.checkpoint is not None:
        overrides.append(f"decode.checkpoint={json.dumps(args.checkpoint)}")
    disc = _discovery()
    cfg = load_config(args.config, overrides, args.strategy, disc.registry, backbone=args.backbone)
    if args.audio:
        from reempathy.speech.pipeline import run_spoken_turn

        result = run_spoken_turn(cfg, disc.registry, args.audio, args.out)
    else:
        result = run_decode(cfg, disc.registry, prompt=args.prompt, units_file=args.units)
    if args.json:
        json.dump(result.to_json(), sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_result(result))
    return 0


def format_result(result: Any) -> str:
    """Human-readable answer, hidden trace and timings."""
    lines = [f"strategy: {result.strategy}   backbone: {result.backbone}   stop: {result.stop_reason}"]
    lines.append(f"spoken text: {result.spoken_text!r}")
    units = result.audio_units
    shown = " ".join(map(str, units[:24])) + (" …" if len(units) > 24 else "")
    lines.append(f"audio units: {len(units)}  [{shown}]")
    if result.hidden:
        # The answer in order: each spoken chunk, then the hidden segment that followed it.
        events = [(c.start, f"  spoken {c.index}: {c.text!r} + {len(c.audio_units)} audio units") for c in result.chunks]
        events += [(h.start, f"  {h.kind} {h.index}: {h.text!r}") for h in result.hidden]
        lines.append("in order:")
        lines.extend(text for _, text in sorted(events))
    t = result.timings
    lat = t.token_latencies_s
    p50 = statistics.median(lat) * 1000 if lat else float("nan")
    ttft = (t.time_to_first_token_s or 0.0) * 1000
    ttfa = f"{t.time_to_first_audio_s * 1000:.1f} ms" if t.time_to_first_audio_s is not None else "n/a"
    c = result.counts
    lines.append(
        f"timings: prefill {t.prefill_s * 1000:.1f} ms, first token {ttft:.1f} ms, first audio {ttfa}, "
        f"{c.generated} tokens at {p50:.2f} ms/token (median), total {t.total_s:.2f} s"
    )
    lines.append(f"tokens: prompt {c.prompt}, generated {c.generated}, forced {c.forced}, forwarded {c.forwarded}")
    return "\n".join(lines)


def cmd_convert(args: argparse.Namespace) -> int:
    from reempathy.backbones.glm4voice import convert_glm4voice

    out = convert_glm4voice(args.src, args.dst, overwrite=args.overwrite)
    print(f"wrote a native checkpoint to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="reempathy", description="Decoding strategies for spoken language models.")
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("decode", help="decode one spoken answer")
    _add_config_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text prompt")
    src.add_argument("--units", help="file of speech unit ids")
    src.add_argument("--audio", help="WAV file of the user's spoken turn (glm-4-voice needs tokenizer_path)")
    p.add_argument("--out", help="write the spoken answer to this WAV (needs --audio, and a speech decoder or talker)")
    p.add_argument("--seed", type=seed_arg, help="sampling seed, 0 <= N < 2**63")
    p.add_argument("--max-new-tokens", type=count_arg, help="token budget of the answer")
    p.add_argument("--greedy", action="store_true", help="greedy decoding")
    p.add_argument("--checkpoint", help="a directory written by `reempathy train` (its strategy is used unless told otherwise)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (docs/result-schema.md)")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("convert", help="convert a published checkpoint to transformers' native format")
    p.add_argument("format", choices=["glm-4-voice"], help="the source checkpoint's format")
    p.add_argument("src", help="directory of the published checkpoint")
    p.add_argument("dst", help="directory to write (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.set_defaults(func=cmd_convert)

    add_train_parser(sub)
    add_demo_parser(sub)
    add_reflect_data_parser(sub)
    add_pairs_parser(sub)
    add_speech_parser(sub)
    add_bench_parser(sub)
    add_experiment_parsers(sub)
    add_eval_parser(sub)
    add_plugins_parser(sub)
    add_serve_parser(sub)
    add_plugins_dir_option(parser, sub)  # it adds --plugins-dir to every command
    _add_debug_everywhere(parser)
    return parser


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
