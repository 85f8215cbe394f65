"""The ``reempathy`` command: decode, plugins (and more as they land)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from typing import Any, Sequence

from reempathy.bench import add_bench_parser
from reempathy.errors import InputError, ReempathyError
from reempathy.evaluation.commands import add_eval_parser
from reempathy.experiments.cli import add_experiment_parsers
from reempathy.plugin_commands import add_plugins_dir_option, add_plugins_parser
from reempathy.speech.cli import add_speech_parser
from reempathy.training.cli import add_demo_parser, add_train_parser
from reempathy.training.data_cli import add_pairs_parser, add_reflect_data_parser


def _discovery():
    from reempathy.decoding.registry import default_discovery

    return default_discovery()


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="TOML config file (default: built-in tiny backbone, sft)")
    p.add_argument("--strategy", help="use this strategy instead of the config's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set strategy.text_tokens=7 (repeatable)")


def cmd_decode(args: argparse.Namespace) -> int:
    from reempathy.config import load_config
    from reempathy.runner import run_decode

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
    cfg = load_config(args.config, overrides, args.strategy, disc.registry)
    if args.audio:
        from reempathy.speech.pipeline import run_spoken_turn

        result = run_spoken_turn(cfg, disc.registry, args.audio, args.out)
    elif args.out:
        raise InputError("--out writes the spoken answer of a spoken turn; give --audio IN.wav too")
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
    parser = argparse.ArgumentParser(prog="reempathy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("decode", help="decode one spoken answer")
    _add_config_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text prompt")
    src.add_argument("--units", help="file of speech unit ids")
    src.add_argument("--audio", help="WAV file of the user's spoken turn (glm-4-voice needs tokenizer_path)")
    p.add_argument("--out", help="write the spoken answer to this WAV (needs --audio, and a speech decoder or talker)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--max-new-tokens", type=int, help="token budget of the answer")
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
    add_plugins_dir_option(parser, sub)  # last: it adds --plugins-dir to every command
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="transformers")
            return int(args.func(args) or 0)
    except ReempathyError as exc:
        print(f"reempathy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reempathy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
