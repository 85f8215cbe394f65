"""``reempathy demo``: train tiny sft, cotbs, reempathy and dpo checkpoints on examples/, then compare their answers.

Checkpoints are cached under ``.cache/demo/<key>/`` where the key is a hash of the dataset and
the four training configs, so a second run only decodes. Everything runs offline on the tiny
backbone; its answers show the shape of each strategy (spoken chunks, reflections, reasoning,
timings), not empathy: a few dozen steps on 34 records cannot teach a random model to talk.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from reempathy.errors import InputError, ReempathyError

DEFAULT_CACHE = ".cache/demo"
STRATEGIES = ("sft", "cotbs", "reempathy", "dpo")
DATASET = "examples/empathy_dialogues.jsonl"
HELDOUT = "examples/heldout.jsonl"
MAX_NEW_TOKENS = 160


@dataclass
class DemoRow:
    """One checkpoint's answer to the held-out prompt, or why there is none."""

    name: str
    strategy: str
    train_s: float | None = None
    cached: bool = False
    result: object | None = None
    error: str | None = None
    losses: list[float] = field(default_factory=list)


def project_root() -> Path:
    """The folder holding examples/ and configs/: the working directory, else the source checkout."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / DATASET).is_file() and (root / "configs" / "train-sft.toml").is_file():
            return root
    raise InputError(
        f"the demo needs {DATASET} and configs/train-*.toml of a source checkout; run it from the repository root"
    )


def cache_key(root: Path, max_steps: int | None = None) -> str:
    """A hash of the dataset, the held-out prompts, the four training configs and the package version."""
    from reempathy import __version__

    h = hashlib.sha256(f"{__version__}|{max_steps}".encode())
    for rel in [DATASET, HELDOUT] + [f"configs/train-{s}.toml" for s in STRATEGIES]:
        h.update(rel.encode())
        h.update((root / rel).read_bytes())
    return h.hexdigest()[:16]


def heldout_prompt(root: Path, directory: Path) -> tuple[str, Path]:
    """The first held-out record's user transcript and a units file of its speech (what the model hears)."""
    from reempathy.training.data import load_records
    from reempathy.training.builders import split_record

    records = load_records(root / HELDOUT)
    context, _ = split_record(records.records[0])
    user = context[-1]
    if not user.units:
        raise InputError(f"{records.records[0].where}: the held-out user message needs units")
    path = directory / "heldout-units.json"
    path.write_text(json.dumps(user.units), encoding="utf-8")
    return user.text or "(speech)", path


def train_checkpoints(
    root: Path, directory: Path, force: bool, say: Callable[[str], None], max_steps: int | None = None
) -> dict[str, DemoRow]:
    """Train (or find in the cache) one checkpoint per strategy."""
    from reempathy.checkpoints import read_manifest
    from reempathy.training.config import load_train_config
    from reempathy.training.train import train

    rows: dict[str, DemoRow] = {}
    for name in STRATEGIES:
        out = directory / name
        row = DemoRow(name=name, strategy=name)
        rows[name] = row
        if not force:
            try:
                row.strategy = read_manifest(out).strategy.name
                row.cached = True
                say(f"  {name:<10} cached in {out}")
                continue
            except ReempathyError:
                pass
        cfg = load_train_config(
            root / "configs" / f"train-{name}.toml",
            [
                f"data.path={json.dumps(str(root / DATASET))}",
                f"train.output_dir={json.dumps(str(out))}",
                "train.overwrite=true",
                "train.resume=false",
                *([f"train.max_steps={max_steps}"] if max_steps else []),
            ],
        )
        started = time.perf_counter()
        result = train(cfg, progress=False)
        row.train_s = time.perf_counter() - started
        row.strategy = result.manifest.strategy.name
        row.losses = result.losses
        say(
            f"  {name:<10} {result.steps} steps in {row.train_s:5.1f} s, "
            f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}"
        )
    return rows


def decode_with(directory: Path, units_file: Path) -> object:
    """Decode the held-out prompt with one checkpoint: its backbone, its strategy, greedy."""
    from reempathy.config import ComponentConfig, DecodeConfig, DecodeSettings, SamplingConfig
    from reempathy.decoding.registry import default_discovery
    from reempathy.runner import load_backbone, run_decode
    from reempathy.checkpoints import apply_checkpoint, checkpoint_config_overrides, read_manifest

    registry = default_discovery().registry
    manifest = read_manifest(directory)
    strategy, options = checkpoint_config_overrides(manifest)
    cfg = DecodeConfig(
        backbone=ComponentConfig(name=manifest.backbone.name, **manifest.backbone.options),
        strategy=ComponentConfig(name=strategy, **options),
        sampling=SamplingConfig(greedy=True),
        decode=DecodeSettings(max_new_tokens=MAX_NEW_TOKENS),
    )
    registry.validate("strategy", strategy, options)
    backbone = apply_checkpoint(load_backbone(cfg, registry), directory)
    return run_decode(cfg, registry, units_file=str(units_file), backbone=backbone)


def format_rows(prompt: str, rows: list[DemoRow], width: int = 100) -> str:
    """The answers one under another, then their timings side by side."""
    out = [f"held-out prompt (heard as speech units): {prompt!r}", ""]
    wrap = lambda s: textwrap.fill(s, width, initial_indent="    ", subsequent_indent="    ")  # noqa: E731
    for row in rows:
        title = f"[{row.name}] decoded with strategy {row.strategy!r}"
        out.append(title)
        if row.result is None:
            out.append(f"    (no answer: {row.error})")
            out.append("")
            continue
        r = row.result
        out.append(f"  spoken text ({len(r.spoken_text_ids)} tokens, {len(r.audio_units)} audio units, stop: {r.stop_reason}):")
        out.append(wrap(repr(r.spoken_text)))
        for h in r.hidden:
            out.append(f"  {h.kind} {h.index}:")
            out.append(wrap(repr(h.text)))
        out.append("")
    header = f"{'checkpoint':<11}{'strategy':<11}{'train s':>8}{'prefill ms':>11}{'1st audio ms':>13}{'ms/token':>9}{'tokens':>7}{'total s':>8}"
    out += [header, "-" * len(header)]
    for row in rows:
        train_s = "cached" if row.cached else (f"{row.train_s:.1f}" if row.train_s is not None else "-")
        if row.result is None:
            out.append(f"{row.name:<11}{row.strategy:<11}{train_s:>8}{'-':>11}{'-':>13}{'-':>9}{'-':>7}{'-':>8}")
            continue
        t, c = row.result.timings, row.result.counts
        first_audio = f"{t.time_to_first_audio_s * 1000:.1f}" if t.time_to_first_audio_s is not None else "n/a"
        per_token = (t.total_s - t.prefill_s) / max(1, c.generated) * 1000
        out.append(
            f"{row.name:<11}{row.strategy:<11}{train_s:>8}{t.prefill_s * 1000:>11.1f}{first_audio:>13}"
            f"{per_token:>9.2f}{c.generated:>7}{t.total_s:>8.2f}"
        )
    return "\n".join(out)


def run_demo(
    cache_dir: str | Path = DEFAULT_CACHE,
    force: bool = False,
    say: Callable[[str], None] = print,
    max_steps: int | None = None,
) -> list[DemoRow]:
    """Train (or reuse) the four tiny checkpoints, decode the held-out prompt with each, print the comparison.

    ``max_steps`` overrides the configs' step counts (tests use 1).
    """
    import transformers

    transformers.logging.set_verbosity_error()
    root = project_root()
    directory = Path(cache_dir) / cache_key(root, max_steps)
    if force and directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    say(f"training tiny checkpoints on {DATASET} (cache: {directory})")
    rows = train_checkpoints(root, directory, force, say, max_steps)
    prompt, units_file = heldout_prompt(root, directory)
    for row in rows.values():
        try:
            row.result = decode_with(directory / row.name, units_file)
        except ReempathyError as exc:
            row.error = str(exc)
    say("")
    say(format_rows(prompt, list(rows.values())))
    return list(rows.values())


__all__ = ["run_demo", "DEFAULT_CACHE", "DemoRow", "format_rows", "cache_key"]
