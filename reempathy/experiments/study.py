"""``reempathy study FILE``: a whole comparison from one file — train what is missing, sweep, score, report.

A study file is a sweep file (a decode config with a ``[sweep]`` table, or ``[study] sweep = FILE``
naming one, whose tables the study file's own lay over) plus a ``[study]`` table::

    [study]
    sweep = "sweep-table5.toml"        # relative to the study file; or [sweep] in this file
    data = "examples/empathy_dialogues.jsonl"
    limit = 12                         # the first N records (optional)
    out = "runs/study-table5"          # the default of --out
    baseline = "untuned"               # the run every other is compared with, record by record
    base = "tiny-demo"                 # optional: train the tiny stand-in for a pretrained backbone first
    evaluators = [{ name = "keyword-empathy" }]

It runs five stages into ``OUT``, each resumable and skipped when its work is done, so a rerun
after a kill (at any point) continues where it stopped and a rerun of a finished study only
rewrites the report:

1. ``base``   (``base = "tiny-demo"``) ``OUT/base``: the demo's base model
   (:mod:`reempathy.training.demo_base`), which every training and the untuned row use;
2. ``train``  ``OUT/checkpoints/<key>``: each ``[sweep.train]`` checkpoint a run needs;
3. ``sweep``  ``OUT/runs/<run>``: every run of the sweep over the data;
4. ``eval``   ``OUT/runs/<run>/scores/<evaluator>.jsonl``: every evaluator over every run;
5. ``report`` ``OUT/report.md`` and ``OUT/report.csv``: the table with the baseline comparison.

Where it decides: :func:`read_study` (the file, checked whole before any stage starts: its keys,
the sweep's runs and training configs, the evaluators and their options, the baseline among the
runs), :func:`run_study` (the stages in order). What each stage does is the commands' own code
(``sweep``, ``eval``, ``report``), not a copy of it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reempathy.config import describe_config_error, read_toml
from reempathy.registry import Registry
from reempathy.errors import ConfigError, InputError
from reempathy.experiments.run import RunOptions
from reempathy.experiments.sweep import SweepPlan, merge_config, plan_sweep

BASES = ("tiny-demo",)
STAGES = ("base", "train", "sweep", "eval", "report")


class EvaluatorChoice(BaseModel):
    """One ``[[study.evaluators]]`` entry: the evaluator's name and its options."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(min_length=1)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StudySettings(BaseModel):
    """``[study]``: the data, the stages' settings and where everything goes."""

    model_config = ConfigDict(extra="forbid", strict=True)
    data: str = Field(min_length=1, description="the test set (JSONL, the training data schema)")
    out: str | None = Field(None, min_length=1, description="the study's directory (default of --out)")
    sweep: str | None = Field(None, min_length=1, description="a sweep file (relative to the study file); else [sweep] here")
    limit: int | None = Field(None, ge=1, lt=2**31, description="decode only the first N records")
    batch_size: int = Field(8, ge=1, le=4096, description="rows decoded together")
    baseline: str | None = Field(None, min_length=1, description="the run every other run is compared with")
    evaluators: list[EvaluatorChoice] = Field(default_factory=list, description="evaluators scoring every run")
    base: str | None = Field(None, description='"tiny-demo": train the tiny stand-in base model first')
    base_steps: int = Field(1000, ge=1, lt=2**31, description="steps of the tiny-demo base")
    train_set: list[str] = Field(default_factory=list, description="overrides for every training, e.g. train.max_steps=40")


class _StudyTable(BaseModel):
    """The ``[study]`` table under its name, so that errors name ``study.KEY``."""

    study: StudySettings


@dataclass
class Study:
    """A study file, read and checked: its settings, the sweep's raw config, where it was read from."""

    path: Path
    settings: StudySettings
    sweep_data: dict[str, Any]
    sweep_source: Path
    overrides: list[str] = field(default_factory=list)


def read_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Read a study file (and the sweep it names); one-line errors naming the key."""
    p = Path(path)
    raw = read_toml(p)
    where = f"study file {str(p)!r}"
    table = raw.pop("study", None)
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: no [study] table; a study file is a sweep file with a [study] table (docs/experiments.md)")
    try:
        settings = _StudyTable.model_validate({"study": table}).study
    except ValidationError as exc:
        raise ConfigError(describe_config_error(exc, where, {"study": StudySettings}, _StudyTable)) from None
    if settings.base is not None and settings.base not in BASES:
        raise ConfigError(f"{where}: study.base = {settings.base!r}; the only base a study trains is \"tiny-demo\" (or leave it out)")
    if settings.sweep is not None:
        if "sweep" in raw:
            raise ConfigError(f"{where}: give the runs in [sweep] or name a file in study.sweep, not both")
        source = p.parent / settings.sweep
        data = merge_config(read_toml(source), raw)
    else:
        if "sweep" not in raw:
            raise ConfigError(f"{where}: no runs; give a [sweep] table or study.sweep = \"FILE\"")
        source, data = p, raw
    return Study(p, settings, data, source, list(overrides or []))


def plan(study: Study, out: Path, registry: Registry | None = None) -> SweepPlan:
    """The sweep as the study runs it: its backbone the base (if any), its checkpoints under ``OUT/checkpoints``."""
    data = copy.deepcopy(study.sweep_data)
    if study.settings.base == "tiny-demo":
        backbone = data.get("backbone") if isinstance(data.get("backbone"), dict) else {}
        if backbone.get("name", "tiny") != "tiny":
            raise ConfigError(f"study.base = \"tiny-demo\" trains a tiny model, but the backbone is {backbone['name']!r}")
        data["backbone"] = {**backbone, "name": "tiny", "path": str((out / "base").resolve())}
    checkpoints = out / "checkpoints"
    sweep = plan_sweep(
        study.sweep_source, overrides=study.overrides, checkpoints=str(checkpoints), registry=registry, out=out, data=data,
    )
    for spec in sweep.train.values():
        spec.overrides += study.settings.train_set
    return sweep


def run_study(
    study: Study,
    registry: Registry,
    out: str | Path | None = None,
    say: Callable[[str], None] = print,
    progress: bool | None = None,
) -> Path:
    """Run every stage of ``study`` into ``out`` (module docstring); the report's path."""
    from reempathy.evaluation.commands import score_run
    from reempathy.experiments.report import build_report, write_csv
    from reempathy.experiments.sweep import run_sweep, train_missing
    from reempathy.safe_write import check_output_dir, write_text

    s = study.settings
    target = out if out is not None else s.out
    if target is None:
        raise ConfigError(f"study file {str(study.path)!r}: give --out DIR (or study.out in the file)")
    root = check_output_dir(Path(target), "--out", ConfigError)
    if not Path(s.data).is_file():
        raise InputError(f"study.data {s.data!r} not found; give the test set (JSONL) the runs decode")
    for choice in s.evaluators:  # every evaluator and option checked before any stage starts
        registry.validate("evaluator", choice.name, choice.options)
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    sweep = plan(study, root, registry)
    names = [sub.name for sub in sweep.runs]
    if s.baseline is not None and s.baseline not in names:
        raise ConfigError(f"study.baseline {s.baseline!r} is not a run of the study; its runs: {', '.join(names)}")

    started = time.perf_counter()
    say(f"study {study.path} -> {root}")
    if s.base == "tiny-demo":
        _base_stage(root / "base", s, say)
    else:
        say("[1/5] base: the sweep's backbone as configured")
    say("[2/5] train")
    trained = train_missing(sweep, lambda line: say(f"  {line}"), progress=bool(progress))
    if not trained:
        say("  every checkpoint is trained" if sweep.train else "  nothing to train")
    say("[3/5] sweep")
    opts = RunOptions(data=s.data, out=root / "runs", batch_size=s.batch_size, limit=s.limit, progress=progress)
    run_sweep(sweep, registry, opts, say=lambda line: say(f"  {line}"))
    say("[4/5] eval")
    for sub in sweep.runs:
        for choice in s.evaluators:
            summary, _ = score_run(root / "runs" / sub.name, choice.name, choice.options, progress=bool(progress),
                                   registry=registry)
            say(f"  {sub.name}: {choice.name} scored {summary['scored']} of {summary['records']}")
    say("[5/5] report")
    report = build_report([root / "runs"], baseline=s.baseline)
    text = report.markdown()
    write_text(root / "report.md", text + "\n", "the study's report")
    write_csv(report, root / "report.csv")
    say(text)
    say(f"study done in {time.perf_counter() - started:.1f} s: {root / 'report.md'}, {root / 'report.csv'}")
    return root / "report.md"


def _base_stage(out: Path, s: StudySettings, say: Callable[[str], None]) -> None:
    """Train the tiny stand-in base into ``out`` unless it is there (it is written whole or not at all)."""
    from reempathy.data.records import load_records
    from reempathy.training.demo import DATASET, project_root
    from reempathy.training.demo_base import BASE_SETTINGS, train_base

    if (out / "config.json").is_file():
        say(f"[1/5] base: trained before ({out})")
        return
    settings = replace(BASE_SETTINGS, steps=s.base_steps)
    records = load_records(project_root() / DATASET, skip_bad=False)
    started = time.perf_counter()
    losses = train_base(records, out, settings)
    say(f"[1/5] base: {settings.steps} steps in {time.perf_counter() - started:.1f} s, loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f} ({out})")


__all__ = ["Study", "StudySettings", "read_study", "run_study", "plan", "STAGES"]
