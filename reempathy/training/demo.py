"""``reempathy demo``: train tiny sft, cotbs, reempathy and dpo checkpoints on examples/, then compare their answers.

Two stages, both cached under ``.cache/demo/<key>/`` (the key hashes the dataset, the held-out
prompts, the four training configs, the base's settings and the package version), so a second
run only decodes:

1. a base model (:mod:`reempathy.training.demo_base`): the tiny architecture trained, all
   weights, on the example records in the strategies' layouts — a stand-in for a backbone that
   has seen such data, since a LoRA adapter cannot teach a random model words in a minute;
2. one LoRA checkpoint per strategy on that base, through ``reempathy train`` with
   ``configs/train-<strategy>.toml`` unchanged (rank 8, alpha 32).

Then every checkpoint answers one prompt: by default the first training record's (whose
answer carries per-chunk reflections), with ``--heldout`` the first held-out one.

Where it decides: :data:`BASE_SETTINGS` (how the base is made), :func:`demo_prompt` (which
prompt), :func:`format_rows` (each spoken chunk beside the reflection that follows it).
Everything runs offline on CPU. The 2-layer model memorises 34 records: on a training prompt it
says that record's answer, thought and reflections in each strategy's layout, in English; on
a held-out prompt it blends memorised fragments. It shows what each strategy writes and where,
not empathy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from reempathy.errors import InputError, ReempathyError
from reempathy.safe_write import check_output_dir, check_output_file, write_text
from reempathy.training.demo_base import BASE_SETTINGS, BaseSettings, settings_key, train_base

DEFAULT_CACHE = ".cache/demo"
STRATEGIES = ("sft", "cotbs", "reempathy", "dpo")
DATASET = "examples/empathy_dialogues.jsonl"
HELDOUT = "examples/heldout.jsonl"
MAX_NEW_TOKENS = 320  # the longest example answer with its reflections


@dataclass
class DemoRow:
    """One checkpoint's answer to the demo's prompt, or why there is none."""

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


def cache_key(root: Path, max_steps: int | None = None, base: BaseSettings = BASE_SETTINGS) -> str:
    """A hash of the dataset, the held-out prompts, the four training configs, the base's settings and the version."""
    from reempathy import __version__

    h = hashlib.sha256(f"{__version__}|{max_steps}|{settings_key(base)}".encode())
    for rel in [DATASET, HELDOUT] + [f"configs/train-{s}.toml" for s in STRATEGIES]:
        h.update(rel.encode())
        h.update((root / rel).read_bytes())
    return h.hexdigest()[:16]


def units_path(directory: Path, heldout: bool = False) -> Path:
    """Where the demo writes the units of the prompt it decodes."""
    return directory / ("heldout-units.json" if heldout else "prompt-units.json")


def demo_prompt(root: Path, directory: Path, heldout: bool = False) -> tuple[str, Path]:
    """The user transcript of the first training record (or, with ``heldout``, of the first held-out one) and a
    units file of its speech: what the model hears."""
    from reempathy.data.records import load_records
    from reempathy.data.dialogue import split_record

    records = load_records(root / (HELDOUT if heldout else DATASET))
    context, _ = split_record(records.records[0])
    user = context[-1]
    if not user.units:
        raise InputError(f"{records.records[0].where}: the demo's user message needs units")
    path = units_path(directory, heldout)
    write_text(path, json.dumps(user.units), "the demo's units file")
    return user.text or "(speech)", path


def prepare_base(root: Path, directory: Path, say: Callable[[str], None], settings: BaseSettings) -> Path:
    """Train (or find in the cache) the demo's base model; its directory is a ``tiny`` ``path``."""
    from reempathy.data.records import load_records

    out = directory / "base"
    if (out / "config.json").is_file():
        say(f"  {'base':<10} cached in {out}")
        return out
    records = load_records(root / DATASET, skip_bad=False)
    started = time.perf_counter()
    with tqdm(total=settings.steps, desc="  base", leave=False, disable=say is not print) as bar:
        losses = train_base(records, out, settings, lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}")))
    say(
        f"  {'base':<10} {settings.steps} steps in {time.perf_counter() - started:5.1f} s, "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (all weights, on the examples in the sft, cotbs and reempathy layouts)"
    )
    return out


def train_checkpoints(
    root: Path,
    directory: Path,
    force: bool,
    say: Callable[[str], None],
    max_steps: int | None = None,
    base: Path | None = None,
) -> dict[str, DemoRow]:
    """Train (or find in the cache) one checkpoint per strategy, on the demo's base when one is given."""
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
                # Absolute: the checkpoint's manifest pins the base's path, and a sweep or decode may run elsewhere.
                *([f"backbone.path={json.dumps(str(base.resolve()))}"] if base is not None else []),
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
    """Decode the prompt in ``units_file`` with one checkpoint: its backbone, its strategy, greedy."""
    from reempathy.config import ComponentConfig, DecodeConfig, DecodeSettings, SamplingConfig
    from reempathy.registry import default_discovery
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


def format_rows(prompt: str, rows: list[DemoRow], width: int = 100, heldout: bool = False) -> str:
    """Each answer in the order it was written — a spoken chunk, then the thought or reflection after it —
    then its whole spoken text; then the timings side by side."""
    which = "held-out prompt" if heldout else "prompt of the first training record"
    out = [f"{which} (heard as speech units): {prompt!r}", ""]
    wrap = lambda s: textwrap.fill(s, width, initial_indent="    ", subsequent_indent="    ")  # noqa: E731
    for row in rows:
        title = f"[{row.name}] decoded with strategy {row.strategy!r}"
        out.append(title)
        if row.result is None:
            out.append(f"    (no answer: {row.error})")
            out.append("")
            continue
        r = row.result
        if r.hidden:
            events = [(c.start, f"  spoken {c.index:>2}: {c.text!r} + {len(c.audio_units)} audio units") for c in r.chunks]
            events += [(h.start, f"      {h.kind} {h.index}: {h.text!r}") for h in r.hidden]
            out.extend(line for _, line in sorted(events))
        out.append(f"  spoken text ({len(r.spoken_text_ids)} tokens, {len(r.audio_units)} audio units, stop: {r.stop_reason}):")
        out.append(wrap(repr(r.spoken_text)))
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
    base_steps: int | None = None,
    heldout: bool = False,
) -> list[DemoRow]:
    """Train (or reuse) the base and the four tiny checkpoints, decode one prompt with each, print the comparison.

    ``max_steps`` overrides the checkpoints' step counts and ``base_steps`` the base's (tests use 1);
    ``heldout`` decodes the first held-out prompt instead of the first training prompt.
    """
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars, once per checkpoint
    root = project_root()
    settings = BASE_SETTINGS if base_steps is None else dataclasses.replace(BASE_SETTINGS, steps=base_steps)
    directory = Path(cache_dir) / cache_key(root, max_steps, settings)
    check_output_dir(directory, "demo cache directory")  # before any training: a refused path costs nothing
    if directory.is_dir():
        check_output_file(units_path(directory, heldout), "the demo's units file")
    if force and directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    say(f"training a tiny base and four checkpoints on {DATASET} (cache: {directory})")
    base = prepare_base(root, directory, say, settings)
    rows = train_checkpoints(root, directory, force, say, max_steps, base)
    prompt, units_file = demo_prompt(root, directory, heldout)
    for row in rows.values():
        try:
            row.result = decode_with(directory / row.name, units_file)
        except ReempathyError as exc:
            row.error = str(exc)
    say("")
    say(format_rows(prompt, list(rows.values()), heldout=heldout))
    return list(rows.values())


__all__ = ["run_demo", "DEFAULT_CACHE", "DemoRow", "format_rows", "cache_key", "prepare_base", "demo_prompt", "units_path"]
