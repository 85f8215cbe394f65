"""``reempathy sweep``: many resumable runs over one test set, one per point of a grid or per listed run.

A sweep file is a decode config (the base every sub-run starts from) plus a ``[sweep]`` table::

    [sweep]
    grid = { "processors.0.factor" = [1.0, 1.1, 1.2, 1.5] }   # Cartesian product over keys
    checkpoints = { reempathy = "runs/train-reempathy" }       # checkpoint key -> directory

    [[sweep.runs]]                        # each run: config keys laid over the base
    name = "reempathy-reflect-off"
    checkpoint = "reempathy"              # a key of [sweep.checkpoints] (or a directory)
    strategy = { reflect = false }

Sub-runs are ``runs × grid`` (either may be missing, not both); ``--grid KEY=V1,V2`` adds or
replaces a grid key. Each sub-run is a run directory ``DIR/<name>``; ``DIR/sweep.json`` lists
them (``reempathy report DIR`` expands it).

A sweep may also say how its checkpoints are made, so that a comparison that needs one model
per setting (the paper's chunk sizes) is one command::

    [sweep.train]                          # checkpoint key -> its training config (+ overrides)
    sft = "configs/train-sft.toml"
    "3+6" = { config = "configs/train-reempathy.toml", set = { "strategy.text_tokens" = 3, "strategy.audio_tokens" = 6 } }

    [[sweep.runs]]
    name = "3+6"
    checkpoint = "3+6"                     # or inline: train = { config = …, set = … }

A key whose checkpoint directory holds no finished checkpoint is trained first (``reempathy
train`` with ``resume = true``, so a killed training continues), once however many runs use it,
into ``--checkpoints DIR/<key>``, else ``[sweep.checkpoints]``'s directory, else
``OUT/checkpoints/<key>``. When the sweep file has a ``[backbone]`` table, every training uses
that backbone (its name and options replace the training config's), so the trained rows and the
untuned row (a run with no checkpoint) share one base. ``--checkpoints demo`` makes the demo's
base model that backbone when the file names ``tiny`` without a ``path`` (or no backbone).

Where it decides:

- **merging** (:func:`merge_config`): a run's tables are laid over the base key by key; a list
  (``processors``) is replaced whole; naming another ``strategy``/``backbone`` drops the
  base's options for it (they belong to the other plugin), as ``--strategy`` does.
- **checkpoint keys**: ``--checkpoints DIR`` finds key K at ``DIR/K`` (``demo``: the checkpoints
  ``reempathy demo`` trained), else ``[sweep.checkpoints]`` maps it, else the key is a path.
- **names** (:func:`sub_run_name`): a run's ``name`` (else its keys ``k=v`` joined by commas),
  then the grid's ``k=v``; characters unsafe in a file name become ``_``.
- **checking**: every sub-run's config is built and validated against the registry, the data
  file read and every existing sub-run directory's identity checked *before* anything runs or
  is written; an error names the ``--grid`` value or the run it comes from. A sub-run whose
  checkpoint is still to be trained is checked through its training config (read and validated
  at plan time, an error naming ``sweep.train.<key>``) and built once it is trained.
- **loading the backbone once** (:func:`run_sweep`): sub-runs are grouped by backbone and
  checkpoint, and the backbone is reused while only strategy, processor, sampling or decode
  settings change. When the checkpoint changes, the backbone is *reloaded*, not unmerged:
  ``apply_checkpoint`` merges the LoRA adapter into the weights, which is what ``decode`` and
  ``run`` use, so a sub-run's answers equal a standalone ``run`` of its config; unmerging would
  leave float drift, and keeping adapters unmerged would cost every token an extra LoRA matmul
  for the whole test set. A load costs seconds to a minute against minutes to hours of
  decoding, and only one backbone is held at a time.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import itertools
import json
import math
import re
import sys
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from reempathy.checkpoints import now_iso
from reempathy.config import DecodeConfig, apply_overrides, load_config, parse_override, read_toml
from reempathy.registry import Registry
from reempathy.errors import CheckpointError, ConfigError, InputError, ReempathyError
from reempathy.jobs import rundir
from reempathy.jobs.identity import flatten
from reempathy.data.testset import read_records
from reempathy.experiments.run import RunOptions, RunSummary, new_manifest, run_experiment
from reempathy.jobs.shard import Group, process_group

SWEEP_KEYS = ("runs", "grid", "checkpoints", "train")
TRAIN_KEYS = ("config", "set")
DEMO = "demo"
_PLUGIN_TABLES = ("strategy", "backbone")


@dataclass
class SubRun:
    """One run of a sweep: its directory name, what distinguishes it, and its config."""

    name: str
    settings: dict[str, Any]
    data: dict[str, Any]  # the raw config: base + run table + grid values
    run_data: dict[str, Any]  # the same without the grid values
    point: dict[str, Any]  # the grid values
    origin: str  # for messages: which run table made it
    checkpoint_key: str | None = None
    cfg: DecodeConfig | None = None


@dataclass
class TrainSpec:
    """How checkpoint ``key`` is made: a training config, overrides of it, and where the checkpoint goes."""

    key: str
    config: str
    overrides: list[str]
    directory: Path
    origin: str  # for messages: sweep.train.<key> or the run that names it

    def trained(self) -> bool:
        """True when the directory holds a finished checkpoint (a manifest that reads)."""
        from reempathy.checkpoints import read_manifest

        try:
            read_manifest(self.directory)
        except ReempathyError:
            return False
        return True


@dataclass
class SweepPlan:
    """The sub-runs of a sweep, in the order they will run, and the checkpoints to train first."""

    source: str
    grid: dict[str, list[Any]]
    runs: list[SubRun] = field(default_factory=list)
    train: dict[str, TrainSpec] = field(default_factory=dict)
    backbone: list[str] = field(default_factory=list)  # overrides every training takes (the sweep's [backbone])


# --- reading the sweep --------------------------------------------------------------------


def split_values(text: str) -> list[str]:
    """``"1.0,1.1,[2, 3],\\"a,b\\""`` → ``["1.0", "1.1", "[2, 3]", "\\"a,b\\""]``: commas inside brackets or quotes do not split."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["strategy.text_tokens=3,5", …]`` → ``{"strategy.text_tokens": [3, 5], …}``; values are read as TOML."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,…, e.g. --grid processors.0.factor=1.0,1.2")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--grid {item!r}: the key is empty or has an empty part")
        raws = split_values(raw)
        if any(not r for r in raws):
            raise ConfigError(f"--grid {item!r}: a value is empty; give KEY=V1,V2,… with no empty values")
        values = [parse_override(f"{key}={r}")[1] for r in raws]
        if len({_fmt(v) for v in values}) != len(values):
            raise ConfigError(f"--grid {item!r}: a value is given twice")
        grid[key] = values
    return grid


def plan_sweep(
    config: str | Path,
    grid_items: list[str] | None = None,
    overrides: list[str] | None = None,
    checkpoints: str | None = None,
    registry: Registry | None = None,
    out: str | Path | None = None,
    data: dict[str, Any] | None = None,
) -> SweepPlan:
    """Read a sweep (or plain decode) config, expand its runs × grid, and (with ``registry``) validate each sub-run.

    ``out`` is the sweep's directory (where checkpoints to train go by default); ``data``, when
    given, is the sweep file's content already read (``config`` then only names it).
    """
    data = apply_overrides(copy.deepcopy(data) if data is not None else read_toml(config), list(overrides or []))
    where = f"config file {str(config)!r}"
    data.pop("study", None)  # a study file is a sweep file with a [study] table (reempathy study)
    sweep = data.pop("sweep", {})
    if not isinstance(sweep, dict):
        raise ConfigError(f"{where}: sweep must be a table ([sweep])")
    unknown = [k for k in sweep if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key 'sweep.{unknown[0]}'; valid keys in [sweep]: {', '.join(SWEEP_KEYS)}")
    runs = sweep.get("runs", [])
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise ConfigError(f"{where}: sweep.runs must be tables ([[sweep.runs]])")
    grid = sweep.get("grid", {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{where}: sweep.grid must map keys to non-empty lists of values, e.g. \"processors.0.factor\" = [1.0, 1.2]")
    grid = {**grid, **parse_grid(list(grid_items or []))}
    table = sweep.get("checkpoints", {})
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise ConfigError(f"{where}: sweep.checkpoints must map checkpoint keys to directories")
    if not runs and not grid:
        raise ConfigError(f"{where}: nothing to sweep; give --grid KEY=V1,V2,… or [[sweep.runs]] tables")
    ckpt_dir = resolve_checkpoints_dir(checkpoints)
    if checkpoints == DEMO:
        data = _with_demo_base(data, ckpt_dir)  # type: ignore[arg-type]

    plan = SweepPlan(source=str(config), grid=grid)
    train_table = sweep.get("train", {})
    if not isinstance(train_table, dict):
        raise ConfigError(f"{where}: sweep.train must map checkpoint keys to training configs ([sweep.train])")
    for key, value in train_table.items():
        _add_train(plan, key, value, f"sweep.train.{key}", where, ckpt_dir, table, out)
    if isinstance(data.get("backbone"), dict):
        plan.backbone = _backbone_overrides(data["backbone"])
    names: dict[str, str] = {}
    for i, run in enumerate(runs or [{}], start=1):
        run = dict(run)
        label = run.pop("name", None)
        key = run.pop("checkpoint", None)
        train_value = run.pop("train", None)
        if label is not None and (not isinstance(label, str) or not label.strip()):
            raise ConfigError(f"{where}: sweep.runs[{i}].name must be a non-empty string")
        if key is not None and not isinstance(key, str):
            raise ConfigError(f"{where}: sweep.runs[{i}].checkpoint must be a string (a checkpoint key or directory)")
        if train_value is not None:
            if key is None and label is None:
                raise ConfigError(f"{where}: sweep.runs[{i}] trains a checkpoint (train = …): give it a name or a checkpoint key")
            key = key if key is not None else label
            _add_train(plan, key, train_value, f"sweep.runs[{i}].train", where, ckpt_dir, table, out)
        run_settings = flatten(run) if run else {}
        if key is not None:
            run_settings = {"checkpoint": key, **run_settings}
            run.setdefault("decode", {})
            if not isinstance(run["decode"], dict):
                raise ConfigError(f"{where}: sweep.runs[{i}].decode must be a table")
            spec = plan.train.get(key)
            run["decode"]["checkpoint"] = str(spec.directory) if spec else _checkpoint_path(key, ckpt_dir, table)
        run_name = label or (sub_run_name(run_settings) if runs else "")
        origin = f"sweep run {label or run_name or str(i)!r}" if runs else f"the base config {str(config)!r}"
        merged = merge_config(data, run)
        for combo in itertools.product(*grid.values()):
            point = dict(zip(grid, combo))
            sub = _with_grid(merged, point, origin)
            name = ",".join(p for p in (run_name, sub_run_name(point)) if p)
            name = safe_name(name)
            if name in names:
                raise ConfigError(f"{where}: two sub-runs are both named {name!r} ({names[name]} and {origin}); give the runs distinct names")
            names[name] = origin
            plan.runs.append(SubRun(name, {**run_settings, **point}, sub, merged, point, origin, key))
    if registry is not None:
        for sub in plan.runs:
            if not pending(plan, sub):
                sub.cfg = build_config(sub, registry)
    return plan


def pending(plan: SweepPlan, sub: SubRun) -> bool:
    """True when ``sub``'s checkpoint is still to be trained (its config can be built only afterwards)."""
    spec = plan.train.get(sub.checkpoint_key) if sub.checkpoint_key is not None else None
    return spec is not None and not spec.trained()


def _add_train(
    plan: SweepPlan, key: Any, value: Any, origin: str, where: str, ckpt_dir: Path | None,
    table: dict[str, str], out: str | Path | None,
) -> None:
    """Read one training spec (``"FILE"`` or ``{config = FILE, set = {KEY = VALUE}}``) and check its config now."""
    from reempathy.training.config import load_train_config

    if not isinstance(key, str) or not key.strip():
        raise ConfigError(f"{where}: {origin}: a checkpoint key must be a non-empty string")
    if isinstance(value, str):
        value = {"config": value}
    if not isinstance(value, dict) or not isinstance(value.get("config"), str) or not value["config"]:
        raise ConfigError(
            f"{where}: {origin} must be a training config file, or a table {{ config = FILE, set = {{ KEY = VALUE }} }}"
        )
    unknown = [k for k in value if k not in TRAIN_KEYS]
    if unknown:
        raise ConfigError(f"{where}: {origin}: unknown key {unknown[0]!r}; valid keys: {', '.join(TRAIN_KEYS)}")
    sets = value.get("set", {})
    if not isinstance(sets, dict):
        raise ConfigError(f"{where}: {origin}.set must be a table of training config keys, e.g. {{ \"train.max_steps\" = 40 }}")
    overrides = [f"{k}={toml_value(v, f'{origin}.set.{k}')}" for k, v in sets.items()]
    if ckpt_dir is not None or key in table:
        directory = Path(_checkpoint_path(key, ckpt_dir, table))
    else:
        directory = Path(out if out is not None else ".") / "checkpoints" / safe_name(key)
    spec = TrainSpec(key, value["config"], overrides, directory, origin)
    known = plan.train.get(key)
    if known is not None:
        if (known.config, known.overrides) != (spec.config, spec.overrides):
            raise ConfigError(f"{where}: checkpoint key {key!r} is trained two ways ({known.origin} and {origin}); give one")
        return
    if not spec.trained():  # a config is read only when it is to be used: a finished checkpoint needs none
        try:
            load_train_config(spec.config, spec.overrides)
        except ReempathyError as exc:
            raise ConfigError(f"{where}: {origin}: {exc}") from None
    plan.train[key] = spec


def _backbone_overrides(table: dict[str, Any]) -> list[str]:
    """The sweep's ``[backbone]`` as training-config overrides (``name`` first, so another backbone's options go)."""
    keys = sorted(table, key=lambda k: k != "name")
    return [f"backbone.{_plain_key(k, 'backbone')}={toml_value(table[k], f'backbone.{k}')}" for k in keys]


def _with_demo_base(data: dict[str, Any], ckpt_dir: Path) -> dict[str, Any]:
    """``--checkpoints demo``: the demo's base model as the sweep's backbone, when the file leaves it to tiny's default."""
    base = ckpt_dir / "base"
    backbone = data.get("backbone")
    if not (base / "config.json").is_file():
        return data
    if backbone is None or (isinstance(backbone, dict) and backbone.get("name", "tiny") == "tiny" and "path" not in backbone):
        data = dict(data)
        data["backbone"] = {**(backbone or {}), "name": "tiny", "path": str(base.resolve())}
    return data


def train_missing(plan: SweepPlan, say: Callable[[str], None] | None = None, progress: bool = True) -> list[str]:
    """Train every checkpoint of ``plan.train`` some run needs and whose directory holds no finished one; their keys.

    Each training is ``reempathy train`` of its config with its overrides, the sweep's backbone,
    ``output_dir`` the checkpoint's directory and ``resume = true`` (a killed training goes on
    from its last save). A failure is a ``ConfigError`` naming the key; what trained before stands.
    """
    from reempathy.training.config import load_train_config
    from reempathy.training.train import train

    needed = {sub.checkpoint_key for sub in plan.runs}
    trained = []
    for key, spec in plan.train.items():
        if key not in needed or spec.trained():
            continue
        overrides = [*spec.overrides, *plan.backbone,
                     f"train.output_dir={json.dumps(str(spec.directory))}", "train.resume=true", "train.overwrite=false"]
        if say is not None:
            say(f"training checkpoint {key!r} ({spec.config}) into {spec.directory}")
        try:
            cfg = load_train_config(spec.config, overrides)
            result = train(cfg, progress=progress)
        except ReempathyError as exc:
            error = ConfigError(f"{spec.origin}: training checkpoint {key!r} failed: {exc}")
            error.exit_code = exc.exit_code
            raise error from None
        if say is not None and result.losses:
            say(f"  {key}: {result.steps} steps, loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
        trained.append(key)
    return trained


def resolve_checkpoints_dir(value: str | None) -> Path | None:
    """``--checkpoints``: a directory of checkpoints named by key; ``demo`` is the demo's cache for this checkout."""
    if value is None:
        return None
    if value == DEMO:
        from reempathy.training.demo import DEFAULT_CACHE, cache_key, project_root

        root = project_root()
        path = Path(DEFAULT_CACHE) / cache_key(root)
        if not path.is_dir():
            raise CheckpointError(
                f"no demo checkpoints in {str(path)!r}; run `reempathy demo` first (from the repository root), "
                "or pass --checkpoints DIR with one checkpoint directory per key"
            )
        return path
    path = Path(value)
    if not path.is_dir():
        raise CheckpointError(f"--checkpoints {value!r} is not a directory; give one holding a checkpoint per key (DIR/sft, …)")
    return path


def _checkpoint_path(key: str, ckpt_dir: Path | None, table: dict[str, str]) -> str:
    if ckpt_dir is not None:
        return str(ckpt_dir / key)
    return table.get(key, key)


def merge_config(base: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """``run`` laid over ``base`` (module docstring: tables by key, lists whole, another plugin drops old options)."""
    out = copy.deepcopy(base)
    for top, value in run.items():
        if isinstance(value, dict) and isinstance(out.get(top), dict):
            if top in _PLUGIN_TABLES and "name" in value and value["name"] != out[top].get("name"):
                out[top] = copy.deepcopy(value)
            else:
                out[top] = _deep_merge(out[top], value)
        else:
            out[top] = copy.deepcopy(value)
    return out


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def set_key(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set a dotted ``key`` (``processors.0.factor`` indexes the list) in a copy of ``data``."""
    out = copy.deepcopy(data)
    path = key.split(".")
    if len(path) == 2 and path[0] in _PLUGIN_TABLES and path[1] == "name":
        table = out.get(path[0])
        if not isinstance(table, dict) or table.get("name") != value:
            out[path[0]] = {"name": value}  # another plugin: the old one's options do not apply
        return out
    node: Any = out
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"no list item {part!r} in {'.'.join(path[:i]) or 'the config'} ({len(node)} items)")
            node = node[int(part)]
        else:
            if part not in node and path[i + 1].isdigit():
                raise ConfigError(
                    f"{'.'.join(path[: i + 1])} is not in the config; a list item can only be set in a list the "
                    f"config has (e.g. [[{part}]] in the file)"
                )
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{'.'.join(path[: i + 1])} is a value, not a table")
    if isinstance(node, list):
        raise ConfigError(f"{'.'.join(path[:-1])} is a list; give an index, e.g. {'.'.join(path[:-1])}.0.{path[-1]}")
    node[path[-1]] = value
    return out


def _with_grid(data: dict[str, Any], point: dict[str, Any], origin: str) -> dict[str, Any]:
    for key, value in point.items():
        try:
            data = set_key(data, key, value)
        except ConfigError as exc:
            raise ConfigError(f"--grid {key}={_fmt(value)} ({origin}): {exc}") from None
    return data


def _grid_text(point: dict[str, Any]) -> str:
    return "".join(f", --grid {k}={_fmt(v)}" for k, v in point.items())


def build_config(sub: SubRun, registry: Registry) -> DecodeConfig:
    """Validate one sub-run's config; an error names the ``--grid`` value or the run it comes from."""
    try:
        return config_from_data(sub.data, registry)
    except ReempathyError as exc:
        message = str(exc)
    try:  # is the run itself wrong, or one of the grid's values?
        config_from_data(sub.run_data, registry)
    except ReempathyError:
        hint = ""
        if sub.checkpoint_key is not None and "checkpoint" in message:
            hint = (
                f" (checkpoint key {sub.checkpoint_key!r}: set its directory in [sweep.checkpoints], or pass "
                f"--checkpoints DIR holding DIR/{sub.checkpoint_key}, e.g. --checkpoints demo after `reempathy demo`)"
            )
        raise ConfigError(f"{sub.origin}: {message}{hint}") from None
    data = sub.run_data
    for key, value in sub.point.items():
        data = set_key(data, key, value)
        try:
            config_from_data(data, registry)
        except ReempathyError as exc:
            raise ConfigError(f"--grid {key}={_fmt(value)} ({sub.origin}): {exc}") from None
    raise ConfigError(f"{sub.origin}{_grid_text(sub.point)}: {message}")


def config_from_data(data: dict[str, Any], registry: Registry) -> DecodeConfig:
    """A validated :class:`DecodeConfig` from a raw config dict, through :func:`reempathy.config.load_config`.

    The dict is handed over as ``--set`` overrides (``name`` keys first), so that a sub-run's
    config is read by exactly the rules of a config file.
    """
    overrides: list[str] = []
    for top, value in data.items():
        if isinstance(value, dict):
            for key in sorted(value, key=lambda k: k != "name"):
                overrides.append(f"{top}.{_plain_key(key, top)}={toml_value(value[key], f'{top}.{key}')}")
            if not value:
                overrides.append(f"{top}={{}}")
        else:
            overrides.append(f"{_plain_key(top, '')}={toml_value(value, top)}")
    return load_config(None, overrides, registry=registry)


def _plain_key(key: str, table: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", str(key)):
        where = f"{table}.{key}" if table else str(key)
        raise ConfigError(f"config key {where!r}: a sweep can set only plain keys (letters, digits, _ and -)")
    return str(key)


def toml_value(value: Any, key: str = "value") -> str:
    """``value`` as a TOML value; checked to read back equal (so it can never turn into a string by accident)."""
    text = _toml(value, key)
    try:
        back = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        back = _MISSING
    if not _same(back, value):
        raise ConfigError(f"config key {key!r}: value {value!r} cannot be written as TOML")
    return text


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _toml(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v, key) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v, key)}" for k, v in value.items()) + "}"
    raise ConfigError(f"config key {key!r}: value {value!r} ({type(value).__name__}) has no TOML form")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def sub_run_name(settings: dict[str, Any]) -> str:
    """``{"a.b": 1, "c": "x"}`` → ``"a.b=1,c=x"``."""
    return ",".join(f"{k}={_fmt(v)}" for k, v in settings.items())


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


def safe_name(name: str) -> str:
    """A directory name: unsafe characters become ``_``; a long name is cut and given a short hash."""
    safe = _UNSAFE.sub("_", name).strip("._") or "run"
    if len(safe) > 120:
        safe = f"{safe[:100]}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]}"
    return safe


# --- running ------------------------------------------------------------------------------


def _load_key(cfg: DecodeConfig) -> str:
    checkpoint = str(Path(cfg.decode.checkpoint).resolve()) if cfg.decode.checkpoint else None
    return json.dumps([cfg.backbone.model_dump(mode="json"), checkpoint], sort_keys=True)


def run_sweep(
    plan: SweepPlan,
    registry: Registry,
    opts: RunOptions,
    group: Group | None = None,
    say: Callable[[str], None] | None = None,
) -> list[RunSummary]:
    """Run every sub-run of ``plan`` into ``opts.out/<name>``, loading each backbone once (module docstring)."""
    from reempathy.runner import load_backbone

    group = group or process_group()
    out = rundir.check_out_dir(opts.out, "sweep")
    data = read_records(opts.data)
    _check_sub_runs(plan, out, data, opts.force)  # those that can be checked now: before any training
    if any(pending(plan, sub) for sub in plan.runs):
        if group.size > 1:
            raise ConfigError(
                "this sweep has checkpoints to train first; train them in one process (run the sweep once without "
                "torchrun, or `reempathy train` each), then decode with many"
            )
        train_missing(plan, say, progress=opts.progress if opts.progress is not None else sys.stderr.isatty())
    for sub in plan.runs:
        if sub.cfg is None:
            sub.cfg = build_config(sub, registry)
    _check_sub_runs(plan, out, data, opts.force)
    order: dict[str, int] = {}
    runs = sorted(plan.runs, key=lambda s: order.setdefault(_load_key(s.cfg), len(order)))
    if group.main:
        write_sweep_manifest(out, plan, opts, finished=False)
    summaries: list[RunSummary] = []
    loaded: tuple[str, Any] | None = None
    for i, sub in enumerate(runs, start=1):
        key = _load_key(sub.cfg)
        if loaded is None or loaded[0] != key:
            loaded = None
            gc.collect()
            _empty_cuda_cache()
            loaded = (key, load_backbone(sub.cfg, registry))
        if say is not None and group.main:
            say(f"[{i}/{len(runs)}] {sub.name}")
        summaries.append(
            run_experiment(sub.cfg, registry, replace(opts, out=out / sub.name, settings=sub.settings),
                           backbone=loaded[1], group=group, say=say)
        )
    if group.main:
        write_sweep_manifest(out, plan, opts, finished=all(s.complete for s in summaries))
        if say is not None:
            say(f"sweep {out}: {len(runs)} runs; report: reempathy report {out}")
    return summaries


def _check_sub_runs(plan: SweepPlan, out: Path, data: Any, force: bool) -> None:
    """Refuse a sub-run directory made by another config before any sub-run starts (``--force`` discards it)."""
    if force:
        return
    for sub in plan.runs:
        if sub.cfg is None:
            continue
        old = rundir.read_run_manifest(out / sub.name) if (out / sub.name).is_dir() else None
        if old is not None:
            rundir.check_same_run(out / sub.name, old, new_manifest(sub.cfg, data, sub.settings))


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_sweep_manifest(out: Path, plan: SweepPlan, opts: RunOptions, finished: bool) -> None:
    """``DIR/sweep.json``: the sub-runs in plan order (what ``report DIR`` expands to)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / rundir.SWEEP_MANIFEST
    started = None
    if path.is_file():
        try:
            started = json.loads(path.read_text(encoding="utf-8")).get("started")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise InputError(f"{path}: not valid JSON; the sweep directory is damaged") from None
    doc = {
        "schema": rundir.SWEEP_SCHEMA,
        "config": plan.source,
        "grid": plan.grid,
        "data": str(Path(opts.data).resolve()),
        "runs": [{"name": s.name, "dir": s.name, "settings": s.settings} for s in plan.runs],
        "started": started or now_iso(),
        "finished": now_iso() if finished else None,
    }
    rundir.write_json_atomic(path, doc)


__all__ = [
    "SubRun",
    "SweepPlan",
    "TrainSpec",
    "train_missing",
    "pending",
    "plan_sweep",
    "run_sweep",
    "parse_grid",
    "split_values",
    "merge_config",
    "set_key",
    "config_from_data",
    "toml_value",
    "sub_run_name",
    "safe_name",
    "write_sweep_manifest",
    "resolve_checkpoints_dir",
]
