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

from reempathy.options import count_arg, seed_arg


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


def split_make_data_sets(items: list[str]) -> tuple[list[str], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``--set`` items as (config overrides, LLM options, ``--tts`` options (``tts.KEY``), ``--user-tts`` options (``user_tts.KEY``))."""
    from reempathy.config import parse_override
    from reempathy.evaluation.registry import parse_sets
    from reempathy.training.voice import CONFIG_TABLES

    config, llm, tts, user = [], [], [], []
    for item in items:
        path, _ = parse_override(item)
        if path[0] in CONFIG_TABLES:
            config.append(item)
        elif path[0] in ("tts", "user_tts") and len(path) > 1:
            (tts if path[0] == "tts" else user).append(item.split(".", 1)[1])
        else:
            llm.append(item)
    return config, parse_sets(llm), parse_sets(tts), parse_sets(user)


def cmd_make_data(args: argparse.Namespace) -> int:
    """``reempathy make-data --out OUT.jsonl --n N --set endpoint=URL --set model=M [--rejected] [--speech] [--reflections] …``."""
    from reempathy.registry import default_discovery
    from reempathy.training.make_data import MakeDataOptions, make_data

    config, llm, tts, user = split_make_data_sets(args.overrides)
    if args.concurrency is not None:
        llm["concurrency"] = args.concurrency
    if args.rate_limit is not None:
        llm["rate_limit_per_s"] = args.rate_limit
    opts = MakeDataOptions(
        out=args.out, n=args.n, llm_options=llm, seed=args.seed, language=args.language, turns=args.turns,
        templates=args.templates, rejected=args.rejected, speech=args.speech, reflections=args.reflections,
        config=args.config, config_overrides=config, layout=args.layout, reflection_template=args.reflection_template,
        tts=args.tts, tts_options=tts, user_tts=args.user_tts, user_tts_options=user, wav=args.wav, decoder=args.decoder,
        skip_bad=args.skip_bad, force=args.force, progress=False if args.quiet else None,
    )
    summary = make_data(opts, default_discovery().registry, say=print)
    return 0 if summary.finished else _unfinished(summary.failed, opts.out, "the LLM")


def _rate(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests per second, e.g. 5, got {value!r}") from None
    if not 0 < x <= 10000:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 10000 requests per second, got {value}")
    return x


def add_make_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``make-data`` to the ``reempathy`` command's subparsers."""
    p = subparsers.add_parser(
        "make-data", help="training records from an LLM: scenario, dialogue, assessment (and rejected answers, speech, reflections)"
    )
    p.add_argument("--out", required=True, metavar="OUT.jsonl",
                   help="the records (progress is kept in OUT.partial until every record is done; failures in OUT.failures.jsonl)")
    p.add_argument("--n", required=True, type=count_arg, metavar="N", help="how many records to make")
    p.add_argument("--seed", type=seed_arg, default=0, help="run seed: each record draws its topic, emotion and turns from it")
    p.add_argument("--language", default="English", help="the language the records are written in (default English)")
    p.add_argument("--turns", type=count_arg, default=2, metavar="T", help="at most this many user turns per dialogue (default 2)")
    p.add_argument("--templates", metavar="DIR",
                   help="a folder of prompt templates (system.txt, scenario.txt, dialogue.txt, assessment.txt, rejected.txt; "
                        "any missing one is the shipped default)")
    p.add_argument("--rejected", action="store_true", help="also a worse answer with its assessment, for DPO")
    p.add_argument("--speech", action="store_true", help="voice every turn (units; as `reempathy voice`)")
    p.add_argument("--reflections", action="store_true",
                   help="per-chunk reflections on each answer, as `reempathy reflect-data` writes them (needs --speech on "
                        "a backbone that interleaves audio)")
    p.add_argument("--concurrency", type=count_arg, metavar="C", help="requests in flight at once (default 1)")
    p.add_argument("--rate-limit", type=_rate, metavar="R", help="at most R requests started per second (default: no limit)")
    p.add_argument("--layout", metavar="TEXT+AUDIO", help="--reflections: the spoken chunk layout (default 5+10)")
    p.add_argument("--reflection-template", metavar="FILE", help="--reflections: the instruction for each prefix (as reflect-data's --template)")
    add_voice_arguments(p)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an LLM option as llm-judge takes it (endpoint=URL, model=NAME, backend=local, path=DIR, temperature=…), "
                        "tts.KEY / user_tts.KEY for the TTS, or backbone.KEY / decode.checkpoint of the config (repeatable)")
    p.add_argument("--skip-bad", action="store_true", help="finish without the records that failed (counted; their replies kept)")
    p.add_argument("--force", action="store_true", help="discard earlier progress or output at --out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_make_data)
    return p


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


__all__ = ["add_voice_parser", "add_make_data_parser", "add_voice_arguments", "cmd_voice", "cmd_make_data", "split_voice_sets",
           "split_make_data_sets"]
