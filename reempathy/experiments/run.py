"""``reempathy run``: decode every record of a test set into a resumable run directory.

A job on the one driver (:func:`reempathy.jobs.driver.run_job`) with a run directory as its
store (:class:`reempathy.jobs.rundir.RunStore`). What this module adds: read the records →
(build) load the backbone with its checkpoint and check the records against it → (work) each
row gets its own strategy and processor objects from the registered factories and its own seed
→ :func:`reempathy.decoding.batch.decode_batch` → each finished row is one line of the
directory's results. The driver claims the directory, shares the records among processes,
appends, merges and finishes the manifest.

Where it decides:

- **resuming**: a record is done when its line is in results.jsonl; nothing else is trusted
  (:mod:`reempathy.jobs.rundir` says how a crash is survived). ``--limit N`` decodes
  only the first N records of the file, so a later run with a larger limit continues.
- **a directory of another run**: the resolved config, the checkpoint and the data file's hash
  must match the manifest's; otherwise the run is refused before anything is written, unless
  ``--force``, which removes the old outputs (results, shards, WAVs, scores, manifest) first.
  ``[decode] prompt``/``units`` are cleared from the config: the records are the prompts.
- **seeds**: each record samples with ``row_seed(sampling.seed, record id)``, so an answer does
  not depend on the batch size, the neighbours or the number of processes.
- **speech** (``--speech``): each answer's spoken units go through the backbone's speech decoder
  into ``DIR/wav/<id>.wav`` (written atomically before the record's line; no WAV and
  ``"wav": null`` when an answer has no audio units).
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from reempathy.backbones.base import Backbone, PromptInputs
from reempathy.checkpoints import read_manifest
from reempathy.config import DecodeConfig
from reempathy.decoding.batch import RowRequest, decode_batch, row_seed
from reempathy.registry import Registry
from reempathy.decoding.result import DecodeResult
from reempathy.errors import ConfigError
from reempathy.jobs import rundir
from reempathy.data.testset import DataSet, RunRecord, check_records, prompt_inputs, read_records
from reempathy.jobs.driver import Job, Outcome, run_job
from reempathy.jobs.shard import Group, process_group
from reempathy.runner import build_plugins, load_backbone, loop_options, run_config

VERSIONED = ("reempathy", "torch", "transformers", "peft", "accelerate", "numpy", "pluggy", "pydantic")


@dataclass
class RunOptions:
    """How to run: where the data and the results are, and the command line's switches."""

    data: str | Path
    out: str | Path
    batch_size: int = 8
    limit: int | None = None
    speech: bool = False
    force: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # swept keys → values (set by a sweep)
    progress: bool | None = None  # None: a bar on a terminal only


@dataclass
class RunSummary:
    """What one invocation did (over all processes, as rank 0 sees it); ``seconds`` from the first record on."""

    out: Path
    records: int  # in the data file
    selected: int  # within --limit
    already_done: int
    decoded: int
    processes: int
    seconds: float
    generated_tokens: int
    stop_reasons: dict[str, int]
    complete: bool

    def line(self) -> str:
        """The final summary line."""
        rate = self.decoded / self.seconds if self.seconds > 0 else 0.0
        tok = self.generated_tokens / self.seconds if self.seconds > 0 else 0.0
        parts = [f"run {self.out}: {self.decoded} records decoded"]
        if self.already_done:
            parts[-1] += f" ({self.already_done} done before)"
        parts.append(f"{self.seconds:.1f} s")
        parts.append(f"{rate:.2f} records/s, {tok:.0f} tokens/s")
        if self.processes > 1:
            parts.append(f"{self.processes} processes")
        if self.stop_reasons:
            parts.append("stop: " + ", ".join(f"{k} {v}" for k, v in sorted(self.stop_reasons.items())))
        left = self.records - self.already_done - self.decoded
        if self.complete:
            parts.append("complete")
        elif self.already_done + self.decoded >= self.selected:
            parts.append(f"the first {self.selected} of {self.records} records (--limit); a larger --limit continues")
        else:
            parts.append(f"{left} of {self.records} records not decoded yet")
        return "; ".join(parts)


def run_experiment(
    cfg: DecodeConfig,
    registry: Registry,
    opts: RunOptions,
    backbone: Backbone | None = None,
    group: Group | None = None,
    say: Callable[[str], None] | None = None,
) -> RunSummary:
    """Decode the records of ``opts.data`` with ``cfg`` into ``opts.out`` (resumably; module docstring).

    ``backbone`` is reused when given (a sweep loads it once); it must be ``cfg``'s backbone with
    ``cfg``'s checkpoint applied. ``say`` gets the summary line (rank 0 only).
    """
    group = group or process_group()
    if opts.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.limit is not None and opts.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {opts.limit}")
    cfg = run_config(cfg)
    options = loop_options(cfg)
    out = rundir.check_out_dir(opts.out, "run")
    rundir.check_data_outside(opts.data, out)
    data = read_records(opts.data)
    manifest = new_manifest(cfg, data, opts.settings)
    manifest["processes"] = group.size
    selected = data.records[: opts.limit] if opts.limit else data.records
    loaded: dict[str, Any] = {}

    def build() -> Backbone:
        """The backbone and the records checked against it — before the directory is touched."""
        model = backbone or load_backbone(cfg, registry)
        if opts.speech and model.speech_decoder is None:
            raise ConfigError(
                f"--speech needs a speech decoder, and backbone {model.name!r} has none; use glm-4-voice with "
                "backbone.decoder_path = the glm-4-voice-decoder directory, or leave out --speech"
            )
        loaded["ready"] = check_records(data, model, cfg.decode.system_prompt)
        # decode_batch checks its options when called (and starts nothing until iterated).
        decode_batch(model, (), options, opts.batch_size)
        manifest["backbone"] = {"name": model.name, "audio_rate_hz": model.stream.audio_rate_hz,
                                "device": str(model.model.device), "dtype": str(model.model.dtype)}
        return model

    def work(model: Backbone, mine: list[RunRecord]) -> Iterator[Outcome]:
        requests = _requests(mine, cfg, registry, model, loaded["ready"])
        for record, result in _decode(model, mine, requests, options, opts.batch_size):
            wav = write_speech(out, record, result, model) if opts.speech else None
            yield Outcome(record.id, record_json(record, result, wav),
                          tally={f"stop:{result.stop_reason}": 1, "tokens": result.counts.generated})

    job = Job("run", "rec", selected, key=lambda r: r.id, store=rundir.RunStore(out, manifest, len(data.records)),
              build=build, work=work, postfix=lambda tally, s: f"{tally['tokens'] / max(s, 1e-9):.0f} tok/s")
    report = run_job(job, force=opts.force, progress=opts.progress, group=group)
    summary = RunSummary(
        out=out,
        records=len(data.records),
        selected=len(selected),
        already_done=report.already_done,
        decoded=report.processed,
        processes=group.size,
        seconds=report.seconds,
        generated_tokens=int(report.tally["tokens"]),
        stop_reasons={k.split(":", 1)[1]: int(v) for k, v in report.tally.items() if k.startswith("stop:")},
        complete=report.complete,
    )
    if group.main and say is not None:
        say(summary.line())
    return summary


# --- the directory -----------------------------------------------------------------------


def new_manifest(cfg: DecodeConfig, data: DataSet, settings: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a run of ``cfg`` starting now (``started``/``finished`` are set by :func:`claim`/:func:`finish`)."""
    cfg = run_config(cfg)
    checkpoint = None
    if cfg.decode.checkpoint:
        m = read_manifest(cfg.decode.checkpoint)
        checkpoint = {
            "path": str(Path(cfg.decode.checkpoint).resolve()),
            "strategy": m.strategy.name,
            "steps": m.steps,
            "created": m.created,
        }
    config = cfg.model_dump(mode="json")
    if checkpoint is not None:
        config["decode"]["checkpoint"] = checkpoint["path"]
    return {
        "schema": rundir.RUN_SCHEMA,
        "config": config,
        "checkpoint": checkpoint,
        "settings": dict(settings),
        "versions": versions(),
        "data": {"path": str(Path(data.path).resolve()), "sha256": data.sha256, "records": len(data.records)},
        "started": None,
        "finished": None,
    }


def versions() -> dict[str, str | None]:
    """Python, the platform and the versions of the packages that shape an answer."""
    out: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# --- decoding ---------------------------------------------------------------------------


def _requests(
    records: list[RunRecord],
    cfg: DecodeConfig,
    registry: Registry,
    backbone: Backbone,
    ready: dict[int, PromptInputs],
) -> Iterator[RowRequest]:
    """One request per record, built as the batch asks for it (WAV prompts are tokenized or read here)."""
    for record in records:
        inputs = ready.pop(record.index, None) or prompt_inputs(record, backbone, cfg.decode.system_prompt)
        strategy, processors = build_plugins(cfg, backbone, registry)
        yield RowRequest(
            key=record.id,
            prompt_ids=inputs.ids,
            strategy=strategy,
            processors=processors,
            seed=row_seed(cfg.sampling.seed, record.id),
            prefill_inputs=inputs.prefill_inputs or None,
        )


def _decode(
    backbone: Backbone, records: list[RunRecord], requests: Iterator[RowRequest], options: Any, batch_size: int
) -> Iterator[tuple[RunRecord, DecodeResult]]:
    """``(record, result)`` from the batched loop, as rows finish (requests are keyed by record id)."""
    by_id = {r.id: r for r in records}
    for record_id, result in decode_batch(backbone, requests, options, batch_size):
        yield by_id[record_id], result


def record_json(record: RunRecord, result: DecodeResult, wav: str | None) -> dict[str, Any]:
    """One line of results.jsonl (schema ``reempathy.run-record/1``); the result carries its prompt's ids."""
    doc = result.to_json()
    return {
        "schema": rundir.RECORD_SCHEMA,
        "id": record.id,
        "line": record.line,
        "messages": [m.to_json() for m in record.prompt],
        "reference": record.reference_json(),
        "result": doc,
        "wav": wav,
    }


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def wav_name(record_id: str) -> str:
    """A file name for a record's WAV: the id with unsafe characters replaced (plus a hash if any were)."""
    import hashlib

    safe = _UNSAFE.sub("_", record_id).strip("._") or "record"
    if safe != record_id or len(safe) > 100:
        safe = f"{safe[:80]}-{hashlib.sha256(record_id.encode('utf-8')).hexdigest()[:8]}"
    return f"{safe}.wav"


def write_speech(out: Path, record: RunRecord, result: DecodeResult, backbone: Backbone) -> str | None:
    """Synthesise the answer's spoken units into ``DIR/wav/<id>.wav``; the path relative to DIR, or None."""
    if not result.audio_units:
        return None
    from reempathy.speech.audio import write_wav
    from reempathy.speech.decoder import DEFAULT_SEED

    decoder = backbone.speech_decoder
    started = time.perf_counter()
    wave = decoder.synthesize(result.audio_units, seed=DEFAULT_SEED)
    (out / rundir.WAVS).mkdir(parents=True, exist_ok=True)
    rel = f"{rundir.WAVS}/{wav_name(record.id)}"
    write_wav(out / rel, wave, decoder.sample_rate)
    result.extra["speech"] = {"synthesis_s": time.perf_counter() - started, "audio_s": wave.shape[0] / decoder.sample_rate,
                              "sample_rate": decoder.sample_rate, "seed": DEFAULT_SEED}
    return rel


__all__ = ["RunOptions", "RunSummary", "run_experiment", "run_config", "record_json", "new_manifest", "versions", "wav_name"]
