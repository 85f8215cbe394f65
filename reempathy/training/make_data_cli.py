"""``reempathy make-data | voice``: argument parsing only; the work is in make_data.py and voice.py.

Both end with one summary line. When some records failed (the endpoint's replies, or the TTS)
and ``--skip-bad`` was not given, the output is not finished: a one-line error says so and the
command exits with status 1, as ``reflect-data`` and ``pairs`` do (not the user's input; a rerun
tries those records again). Bad input — a template without a placeholder it needs, an unknown
option, a bad data line — is a one-line error with status 2 before anything is asked or loaded.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from reempathy.options import seed_arg


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _unfinished(failed: Any, out: str, what: str) -> int:
    n = len(failed)
    print(f"reempathy: error: {what} failed on {n} record{'s' if n != 1 else ''}, left out (first: {failed[0]}); "
          f"the records done are kept in {out}.partial: rerun the same command to try the failed ones again, "
          f"or add --skip-bad to finish {out} without them", file=sys.stderr)
    return 1


def split_voice_sets(items: list[str]) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """``--set`` items as (config overrides, ``--tts`` options, ``--user-tts`` options (keys ``user_tts.KEY``))."""
    from reempathy.config import parse_override
    from reempathy.evaluation.registry import parse_sets
    from reempathy.training.voice import CONFIG_TABLES

    config, tts, user = [], [], []
    for item in items:
        path, _ = parse_override(item)
        if path[0] in CONFIG_TABLES:
            config.append(item)
        elif path[0] == "user_tts" and len(path) > 1:
            user.append(item.split(".", 1)[1])
        else:
            tts.append(item)
    return config, parse_sets(tts), parse_sets(user)


def cmd_voice(args: argparse.Namespace) -> int:
    """``reempathy voice DATA.jsonl --out OUT.jsonl [--wav DIR] [--tts NAME] [--user-tts NAME] [--config FILE] [--set K=V]…``."""
    from reempathy.registry import default_discovery
    from reempathy.training.voice import VoiceOptions, voice

    config, tts_options, user_options = split_voice_sets(args.overrides)
    opts = VoiceOptions(
        data=args.data, out=args.out, config=args.config, config_overrides=config, tts=args.tts, tts_options=tts_options,
        user_tts=args.user_tts, user_tts_options=user_options, wav=args.wav, decoder=args.decoder, seed=args.seed,
        skip_bad=args.skip_bad, force=args.force, progress=False if args.quiet else None,
    )
    summary = voice(opts, default_discovery().registry, say=print)
    return 0 if summary.finished else _unfinished(summary.failed, opts.out, "the tts")


def add_voice_arguments(p: argparse.ArgumentParser) -> None:
    """The speech flags ``voice`` and ``make-data --speech`` share."""
    p.add_argument("--config", "-c", metavar="FILE",
                   help="a decode or training config: its [backbone] speaks (default tiny) and [decode] checkpoint, if any")
    p.add_argument("--tts", default="read-aloud", metavar="NAME",
                   help="who speaks the turns (default read-aloud: the backbone itself; a plugin's TTS by its name)")
    p.add_argument("--user-tts", metavar="NAME", help="another TTS for the user's turns (a second voice); options: --set user_tts.KEY=V")
    p.add_argument("--wav", metavar="DIR", help="also write each voiced turn as a WAV here (its path goes in the turn's audio)")
    p.add_argument("--decoder", metavar="DIR", help="the speech decoder for --wav (default: the backbone's decoder_path)")


def add_voice_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``voice`` to the ``reempathy`` command's subparsers."""
    p = subparsers.add_parser("voice", help="audio units for every turn of a training set that lacks them, spoken by the backbone")
    p.add_argument("data", metavar="DATA.jsonl", help="training records (docs/training.md)")
    p.add_argument("--out", required=True, metavar="OUT.jsonl",
                   help="the records with units (progress is kept in OUT.partial until every record is done)")
    add_voice_arguments(p)
    p.add_argument("--seed", type=seed_arg, default=0, help="run seed: each turn samples with its own seed from it (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a TTS option (batch_size=16, temperature=0.8), user_tts.KEY for --user-tts, or backbone.KEY / "
                        "decode.checkpoint of the config (repeatable)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad records and records the TTS fails on")
    p.add_argument("--force", action="store_true", help="discard earlier progress or output at --out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_voice)
    return p


__all__ = ["add_voice_parser", "add_voice_arguments", "cmd_voice", "split_voice_sets"]
