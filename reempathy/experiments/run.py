"""``reempathy run``: decode every record of a test set into a resumable run directory.

The path: read and check the records → load the backbone (with its checkpoint) → check the
records against it → (rank 0) claim the directory: write the manifest, consolidate what an
earlier attempt left → every rank takes its share of the records not yet done → each row gets
its own strategy and processor objects from the registered factories and its own seed →
:func:`reempathy.decoding.batch.decode_batch` → each finished row is appended to the rank's
file as one whole line → (rank 0) merge the shards in record order, finish the manifest.

Where it decides:

- **resuming**: a record is done when its line is in results.jsonl; nothing else is trusted
  (:mod:`reempathy.experiments.rundir` says how a crash is survived). ``--limit N`` decodes
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
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from reempathy.backbones.base import Backbone, PromptInputs
from reempathy.checkpoints import now_iso, read_manifest
from reempathy.config import DecodeConfig
from reempathy.decoding.batch import RowRequest, decode_batch, row_seed
from reempathy.decoding.registry import Registry
from reempathy.decoding.result import DecodeResult
from reempathy.errors import ConfigError, InputError, ReempathyError
from reempathy.experiments import rundir
from reempathy.experiments.records import DataSet, RunRecord, check_records, prompt_inputs, read_records
from reempathy.experiments.shard import Group, process_group
from reempathy.runner import build_plugins, load_backbone, loop_options

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
        parts.append("complete" if self.complete else f"{left} of {self.records} records not decoded yet")
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
    old = rundir.read_run_manifest(out) if out.is_dir() else None
    if old is not None and not opts.force:
        rundir.check_same_run(out, old, manifest)
    if old is None and not opts.force and ((out / rundir.RESULTS).exists() or (out / rundir.SHARDS).exists()):
        raise ConfigError(
            f"{str(out)!r} holds results but no {rundir.MANIFEST}, so nothing says which config made them; "
            "use another --out, or --force to discard them"
        )
    backbone = backbone or load_backbone(cfg, registry)
    if opts.speech and backbone.speech_decoder is None:
        raise ConfigError(
            f"--speech needs a speech decoder, and backbone {backbone.name!r} has none; use glm-4-voice with "
            "backbone.decoder_path = the glm-4-voice-decoder directory, or leave out --speech"
        )
    ready = check_records(data, backbone, cfg.decode.system_prompt)
    # decode_batch checks its options when called (and starts nothing until iterated): refuse
    # settings the batched loop cannot run before the directory is touched.
    decode_batch(backbone, (), options, opts.batch_size)
    manifest["backbone"] = {"name": backbone.name, "audio_rate_hz": backbone.stream.audio_rate_hz,
                            "device": str(backbone.model.device), "dtype": str(backbone.model.dtype)}
    manifest["processes"] = group.size
    selected = data.records[: opts.limit] if opts.limit else data.records

    # Rank 0 claims the directory; the others wait for it, and fail with it if it fails.
    error = None
    if group.main:
        try:
            claim(out, manifest, old, opts.force)
        except (ReempathyError, OSError) as exc:
            error = _error_report(exc)
    error = group.broadcast(error)
    if error is not None:
        raise _reraise(error)

    decode_started = time.perf_counter()
    done = rundir.done_ids(out)
    todo = [r for r in selected if r.id not in done]
    mine = group.share(todo)
    sink_path = out / rundir.RESULTS if group.size == 1 else rundir.shard_path(out, group.rank)
    failure: dict[str, Any] | None = None
    counts: Counter = Counter()
    tokens = 0
    try:
        with rundir.LineAppender(sink_path) as sink:
            bar = _progress_bar(len(mine), opts.progress if group.main else False, group)
            t0 = time.perf_counter()
            try:
                requests = _requests(mine, cfg, registry, backbone, ready)
                for record, result in _decode(backbone, mine, requests, options, opts.batch_size):
                    wav = write_speech(out, record, result, backbone) if opts.speech else None
                    sink.append(record_json(record, result, wav))
                    counts[result.stop_reason] += 1
                    tokens += result.counts.generated
                    bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f} tok/s", refresh=False)
                    bar.update(1)
            finally:
                bar.close()
    except ReempathyError as exc:
        if group.size == 1:
            raise
        failure = _error_report(exc)  # told to every rank below, so none waits for this one forever

    # Every rank meets here, failed or not; rank 0 merges what was written either way.
    reports = group.gather({"rank": group.rank, "error": failure, "decoded": sum(counts.values()),
                            "tokens": tokens, "stops": dict(counts)})
    total_stops: Counter = Counter()
    for rep in reports:
        total_stops.update(rep["stops"])
    decoded = sum(rep["decoded"] for rep in reports)
    complete = False
    if group.main:
        docs = rundir.consolidate(out)
        complete = len(docs) == len(data.records)
        finish(out, complete)
    complete = group.broadcast(complete)
    failed = [rep for rep in reports if rep["error"] is not None]
    if failed:
        first = failed[0]
        raise _reraise(dict(first["error"], message=f"rank {first['rank']} of {group.size} failed: {first['error']['message']}"))
    summary = RunSummary(
        out=out,
        records=len(data.records),
        selected=len(selected),
        already_done=len(selected) - len(todo),
        decoded=decoded,
        processes=group.size,
        seconds=time.perf_counter() - decode_started,
        generated_tokens=sum(rep["tokens"] for rep in reports),
        stop_reasons=dict(total_stops),
        complete=complete,
    )
    if group.main and say is not None:
        say(summary.line())
    return summary


def _error_report(exc: BaseException) -> dict[str, Any]:
    """An error as it travels between ranks: its message and the exit status it stands for."""
    if isinstance(exc, ReempathyError):
        return {"message": str(exc), "exit_code": exc.exit_code}
    return {"message": f"{type(exc).__name__}: {exc}", "exit_code": 2}


def _reraise(report: dict[str, Any]) -> ReempathyError:
    error = ReempathyError(report["message"])
    error.exit_code = report["exit_code"]
    return error


# --- the directory -----------------------------------------------------------------------


def run_config(cfg: DecodeConfig) -> DecodeConfig:
    """``cfg`` as a run uses it: ``[decode] prompt``/``units`` cleared, since the records are the prompts."""
    cfg = cfg.model_copy(deep=True)
    cfg.decode.prompt = None
    cfg.decode.units = None
    return cfg


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


def claim(out: Path, manifest: dict[str, Any], old: dict[str, Any] | None, force: bool) -> None:
    """Rank 0, before any decoding: clear (``--force``), write the manifest, consolidate an earlier attempt."""
    out.mkdir(parents=True, exist_ok=True)
    if force:
        rundir.clear_run(out)
        old = None
    history = list(old.get("history", [])) if old else []
    history.append({"started": now_iso(), "finished": None, "processes": manifest.get("processes", 1),
                    "command": " ".join(sys.argv[1:]) or None})
    manifest["started"] = old.get("started") if old and old.get("started") else history[-1]["started"]
    manifest["finished"] = None
    manifest["history"] = history
    rundir.write_json_atomic(out / rundir.MANIFEST, manifest)
    rundir.consolidate(out)


def finish(out: Path, complete: bool) -> None:
    """Rank 0, after the merge: close this attempt in the history; ``finished`` once every record is done."""
    path = out / rundir.MANIFEST
    manifest = rundir.read_run_manifest(out)
    if manifest is None:
        raise InputError(f"{path}: disappeared while the run was going on")
    now = now_iso()
    if manifest.get("history"):
        manifest["history"][-1]["finished"] = now
    manifest["finished"] = now if complete else None
    rundir.write_json_atomic(path, manifest)


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


def _progress_bar(total: int, enabled: bool | None, group: Group) -> Any:
    from tqdm.auto import tqdm

    desc = "run" if group.size == 1 else f"run (rank 0 of {group.size})"
    disable = None if enabled is None else not enabled
    return tqdm(total=total, unit="rec", desc=desc, disable=disable, dynamic_ncols=True, file=sys.stderr)


__all__ = ["RunOptions", "RunSummary", "run_experiment", "run_config", "record_json", "new_manifest", "versions", "wav_name"]
