"""The built-in commands, registered through ``reempathy_register_commands`` like a plugin's.

Each command's parser lives beside its work (``experiments/cli.py``, ``evaluation/commands.py``,
…) and imports its heavy parts only when it runs; this module names them, in the order
``reempathy --help`` lists them, and holds the two that belong to no package (``decode``,
``convert``). A plugin adds a command the same way (docs/plugins.md, commands).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from reempathy.bench import add_bench_parser
from reempathy.errors import InputError
from reempathy.evaluation.commands import add_eval_parser
from reempathy.experiments.cli import add_report_parser, add_run_parser, add_study_parser, add_sweep_parser
from reempathy.hooks import Register, hookimpl
from reempathy.options import count_arg, seed_arg
from reempathy.plugin_commands import add_plugins_parser
from reempathy.serve.cli import add_serve_parser
from reempathy.speech.cli import add_speech_parser
from reempathy.training.cli import add_demo_parser, add_train_parser
from reempathy.training.data_cli import add_pairs_parser, add_reflect_data_parser


def _discovery():
    from reempathy.registry import default_discovery

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
        from reempathy.streaming import run_spoken_turn

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


def add_decode_parser(sub: Any) -> argparse.ArgumentParser:
    """``reempathy decode``: one spoken answer."""
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
    return p


def add_convert_parser(sub: Any) -> argparse.ArgumentParser:
    """``reempathy convert``: a published checkpoint into transformers' native format."""
    p = sub.add_parser("convert", help="convert a published checkpoint to transformers' native format")
    p.add_argument("format", choices=["glm-4-voice"], help="the source checkpoint's format")
    p.add_argument("src", help="directory of the published checkpoint")
    p.add_argument("dst", help="directory to write (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.set_defaults(func=cmd_convert)
    return p


BUILTIN_COMMANDS: tuple[tuple[str, Any, str], ...] = (
    ("decode", add_decode_parser, "decode one spoken answer"),
    ("convert", add_convert_parser, "convert a published checkpoint to transformers' native format"),
    ("train", add_train_parser, "fine-tune a LoRA checkpoint for a strategy (or train an evaluator)"),
    ("demo", add_demo_parser, "train tiny checkpoints and compare their answers"),
    ("reflect-data", add_reflect_data_parser, "per-chunk reflections for a training set, from an evaluator"),
    ("pairs", add_pairs_parser, "on-policy preference pairs from a checkpoint's samples"),
    ("speech", add_speech_parser, "speech tokenizer and decoder (WAV <-> units)"),
    ("bench", add_bench_parser, "decode latency per strategy"),
    ("run", add_run_parser, "decode a test set into a resumable run directory"),
    ("sweep", add_sweep_parser, "a grid of settings (or a sweep file's runs) over a test set"),
    ("report", add_report_parser, "a table of runs: lengths, latency, scores, paired tests"),
    ("study", add_study_parser, "train what is missing, sweep, eval and report, from one file"),
    ("eval", add_eval_parser, "score runs with an evaluator (eval, ab, eval-check)"),
    ("plugins", add_plugins_parser, "list plugins, scaffold a new one (plugins, plugin new)"),
    ("serve", add_serve_parser, "a realtime speech endpoint and web page for any strategy"),
)


@hookimpl
def reempathy_register_commands(register: Register) -> None:
    for name, add_parser, description in BUILTIN_COMMANDS:
        register(name, add_parser, None, description)


__all__ = ["BUILTIN_COMMANDS", "cmd_decode", "cmd_convert", "format_result", "add_decode_parser", "add_convert_parser"]
