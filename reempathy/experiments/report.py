"""``reempathy report``: one row per run — counts, latency, real-time margin, every evaluator's scores.

Where it decides:

- **which runs** (:func:`expand_dirs`): a directory with ``manifest.json`` is a run; one with
  ``sweep.json`` expands to its sub-runs in sweep order (those not started yet are listed
  under the table). A run still going on is reported with what it has (results.jsonl and any
  shards; a torn last line is left out).
- **columns** (:data:`METRIC_COLUMNS`, module :mod:`reempathy.experiments.metrics` defines them):
  ``run``, then each swept setting, then the strategy, ``records`` (done/total), the metrics, and
  for every ``scores/<evaluator>.jsonl`` one column per score, ``<evaluator>.<score>`` (mean with
  its 95 % bootstrap interval), plus ``<evaluator>.n`` (records scored) and
  ``<evaluator>.failures``. Times are in milliseconds.
- **budget hits**: ``budget_hit_share`` is the share of answers a token budget ended; above
  :data:`~reempathy.experiments.metrics.BUDGET_FLAG` (10 %) the cell is flagged and a note under
  the table names the run: its scores compare answers cut short against whole ones.
- **against a baseline** (``--baseline NAME``, :mod:`reempathy.experiments.paired`): for every
  other run, record by record against the baseline run — the answer's length (spoken tokens) and
  every score (``average`` included) — the mean difference with its paired 95 % bootstrap
  interval, wins / ties / losses and the Wilcoxon signed-rank p-value. Printed as a second table;
  in the CSV as columns ``<column>.vs_baseline`` (``.lo``, ``.hi``), ``<column>.wins``,
  ``.ties``, ``.losses``, ``.p`` on each run's row, beside a ``baseline`` column.
- **output**: the table is Markdown, padded so it also reads in a terminal; ``--csv`` writes the
  raw numbers (each score also as ``.lo``/``.hi``); ``--plot`` draws a column against a swept key
  (or any config key), one line per combination of the other settings, scores (and paired
  differences) with their intervals as error bars. Files are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reempathy.errors import ConfigError, InputError
from reempathy.jobs import rundir
from reempathy.experiments.metrics import BUDGET_FLAG, EvaluatorScores, RunMetrics, evaluator_scores, run_metrics
from reempathy.experiments.paired import Paired, paired
from reempathy.safe_write import write_with

DEFAULT_AUDIO_RATE_HZ = 12.5
# (column, attribute of RunMetrics, scale, decimals)
METRIC_COLUMNS: tuple[tuple[str, str, float, int], ...] = (
    ("spoken_tokens", "spoken_tokens", 1.0, 1),
    ("audio_s", "audio_s", 1.0, 2),
    ("hidden_per_spoken", "hidden_per_spoken", 1.0, 2),
    ("budget_hit_share", "budget_hit_share", 1.0, 2),
    ("ttft_p50_ms", "ttft_p50", 1e3, 1),
    ("ttft_p90_ms", "ttft_p90", 1e3, 1),
    ("first_audio_p50_ms", "first_audio_p50", 1e3, 1),
    ("first_audio_p90_ms", "first_audio_p90", 1e3, 1),
    ("itl_p50_ms", "itl_p50", 1e3, 2),
    ("itl_p90_ms", "itl_p90", 1e3, 2),
    ("realtime_margin", "realtime_margin", 1.0, 2),
)


@dataclass
class RunRow:
    """One run of the report."""

    name: str
    path: Path
    manifest: dict[str, Any]
    metrics: RunMetrics
    total: int
    evaluators: list[EvaluatorScores] = field(default_factory=list)

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.manifest.get("settings") or {})

    def lookup(self, key: str) -> Any:
        """A swept setting, else a dotted key of the run's config (``strategy.text_tokens``); None if absent."""
        if key in self.settings:
            return self.settings[key]
        node: Any = self.manifest.get("config") or {}
        for part in key.split("."):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                return None
        return node


PAIRED_STATS = ("vs_baseline", "wins", "ties", "losses", "p")
"""The CSV columns each paired quantity gets (``<column>.<stat>``; ``vs_baseline`` with ``.lo``/``.hi``)."""
LENGTH = "spoken_tokens"


@dataclass
class Report:
    """The rows, the setting keys and score columns they have, and the sub-runs not started yet.

    With a ``baseline`` (a row's name), ``paired`` holds every other row's comparisons with it:
    row name → column (``spoken_tokens`` or ``<evaluator>.<score>``) → :class:`Paired`.
    """

    rows: list[RunRow]
    missing: list[str] = field(default_factory=list)
    baseline: str | None = None
    paired: dict[str, dict[str, Paired]] = field(default_factory=dict)

    @property
    def setting_keys(self) -> list[str]:
        keys: dict[str, None] = {}
        for row in self.rows:
            keys.update(dict.fromkeys(row.settings))
        return list(keys)

    @property
    def score_columns(self) -> list[tuple[str, str]]:
        """``(evaluator, score)`` pairs in order of first appearance."""
        cols: dict[tuple[str, str], None] = {}
        for row in self.rows:
            for ev in row.evaluators:
                cols.update(dict.fromkeys((ev.evaluator, name) for name in ev.scores))
        return list(cols)

    @property
    def evaluators(self) -> list[str]:
        names: dict[str, None] = {}
        for row in self.rows:
            names.update(dict.fromkeys(ev.evaluator for ev in row.evaluators))
        return list(names)

    def columns(self, paired: bool = True) -> list[str]:
        """Every column name (what ``--y`` and the CSV header use); ``paired=False``: those of the main table."""
        cols = ["run", *self.setting_keys, "strategy", "records", "records_total", "stop_reasons"]
        cols += [c for c, *_ in METRIC_COLUMNS]
        for ev in self.evaluators:
            cols += [f"{e}.{s}" for e, s in self.score_columns if e == ev]
            cols += [f"{ev}.n", f"{ev}.failures"]
        if self.baseline is not None and paired:
            cols.append("baseline")
            cols += [f"{q}.{stat}" for q in self.paired_columns() for stat in PAIRED_STATS]
        return cols

    def paired_columns(self) -> list[str]:
        """The quantities compared with the baseline: the answer's length, then every score column."""
        return [LENGTH] + [f"{e}.{s}" for e, s in self.score_columns]

    def values(self, row: RunRow) -> dict[str, Any]:
        """Raw values of one row by column (scores: the mean; ``.lo``/``.hi`` for the interval)."""
        m = row.metrics
        out: dict[str, Any] = {"run": row.name}
        out.update({k: row.settings.get(k) for k in self.setting_keys})
        out["strategy"] = (row.manifest.get("config") or {}).get("strategy", {}).get("name")
        out["records"] = m.records
        out["records_total"] = row.total
        out["stop_reasons"] = ", ".join(f"{k} {v}" for k, v in m.stop_reasons.items())
        for col, attr, scale, _ in METRIC_COLUMNS:
            value = getattr(m, attr)
            out[col] = value * scale if value is not None else None
        for ev in row.evaluators:
            for name, stat in ev.scores.items():
                out[f"{ev.evaluator}.{name}"] = stat.mean
                out[f"{ev.evaluator}.{name}.lo"] = stat.lo
                out[f"{ev.evaluator}.{name}.hi"] = stat.hi
            out[f"{ev.evaluator}.n"] = ev.scored
            out[f"{ev.evaluator}.failures"] = ev.failures
        if self.baseline is not None:
            out["baseline"] = self.baseline
            for column, stat in self.paired.get(row.name, {}).items():
                out[f"{column}.vs_baseline"] = stat.diff
                out[f"{column}.vs_baseline.lo"] = stat.lo
                out[f"{column}.vs_baseline.hi"] = stat.hi
                out[f"{column}.wins"] = stat.wins
                out[f"{column}.ties"] = stat.ties
                out[f"{column}.losses"] = stat.losses
                out[f"{column}.p"] = stat.p
        return out

    def markdown(self) -> str:
        """The table as padded Markdown (readable in a terminal, pasteable in a document); the paired table after it."""
        header = self.columns(paired=False)
        decimals = {c: d for c, _, _, d in METRIC_COLUMNS}
        body = []
        flagged = []
        for row in self.rows:
            v = self.values(row)
            cells = []
            for col in header:
                if col == "records":
                    cells.append(f"{v['records']}/{v['records_total']}")
                elif col == "records_total":
                    continue
                elif col == "budget_hit_share" and v[col] is not None and v[col] > BUDGET_FLAG:
                    cells.append(f"{v[col]:.2f} (!)")
                    flagged.append(row.name)
                elif col in decimals:
                    cells.append(_num(v[col], decimals[col]))
                elif f"{col}.lo" in v:
                    cells.append(f"{v[col]:.2f} [{v[col + '.lo']:.2f}, {v[col + '.hi']:.2f}]")
                else:
                    cells.append(_cell(v.get(col)))
            body.append(cells)
        header = [c for c in header if c != "records_total"]
        lines = _table(header, body)
        if flagged:
            lines.append("")
            lines.append(
                f"(!) more than {BUDGET_FLAG:.0%} of the answers were ended by a token budget in: {', '.join(flagged)}; "
                "their scores compare cut answers with whole ones (raise the budget, or compare with care)"
            )
        if self.baseline is not None:
            lines.append("")
            lines += self.paired_markdown()
        if self.missing:
            lines.append("")
            lines.append("not started yet: " + ", ".join(self.missing))
        return "\n".join(lines)

    def paired_markdown(self) -> list[str]:
        """Lines of the table of every run against the baseline, one row per run and quantity."""
        body = []
        for row in self.rows:
            for column, stat in self.paired.get(row.name, {}).items():
                body.append([
                    row.name, column, str(stat.n),
                    f"{stat.diff:+.2f} [{stat.lo:+.2f}, {stat.hi:+.2f}]",
                    f"{stat.wins}/{stat.ties}/{stat.losses}",
                    _p(stat.p),
                ])
        title = (
            f"against baseline {self.baseline!r}, record by record (mean difference, paired 95 % bootstrap interval; "
            "Wilcoxon signed-rank p):"
        )
        if not body:
            return [title, "(no other run shares records with the baseline)"]
        header = ["run", "quantity", "n", "difference [95% CI]", "win/tie/loss", "p"]
        return [title, *_table(header, body)]


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(cells) for cells in body)]


def _p(p: float) -> str:
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _num(value: Any, decimals: int) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value).replace("|", "\\|")


# --- reading runs --------------------------------------------------------------------------


def expand_dirs(dirs: list[str | Path]) -> tuple[list[tuple[str, Path]], list[str]]:
    """``(name, run directory)`` for every run the arguments name (sweeps expanded), and sub-runs not started."""
    runs: list[tuple[str, Path]] = []
    missing: list[str] = []
    for d in dirs:
        p = Path(d)
        if (p / rundir.MANIFEST).is_file():
            runs.append((p.name or str(p), p))
        elif (p / rundir.SWEEP_MANIFEST).is_file():
            try:
                sweep = json.loads((p / rundir.SWEEP_MANIFEST).read_text(encoding="utf-8"))
                subs = [s["dir"] for s in sweep["runs"]]
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError):
                raise InputError(f"{p / rundir.SWEEP_MANIFEST}: not a sweep manifest; the sweep directory is damaged") from None
            for sub in subs:
                if (p / sub / rundir.MANIFEST).is_file():
                    runs.append((sub, p / sub))
                else:
                    missing.append(sub)
        elif not p.exists():
            raise InputError(f"{str(p)!r} not found; give run or sweep directories (made by `reempathy run` or `sweep`)")
        else:
            raise InputError(
                f"{str(p)!r} is not a run or sweep directory (it has no {rundir.MANIFEST} or {rundir.SWEEP_MANIFEST})"
            )
    return runs, missing


def read_results(directory: Path) -> list[dict[str, Any]]:
    """The results of a run, including shards of a run still going on (read only; duplicates dropped)."""
    files = [directory / rundir.RESULTS]
    shard_dir = directory / rundir.SHARDS
    if shard_dir.is_dir():
        files += sorted(shard_dir.glob("rank-*.jsonl"))
    seen: dict[str, dict[str, Any]] = {}
    for f in files:
        for doc in rundir.scan_results(f).docs:
            seen.setdefault(str(doc["id"]), doc)
    return sorted(seen.values(), key=lambda doc: int(doc["line"]))


def read_scores(directory: Path, ids: set[str]) -> list[EvaluatorScores]:
    """Every ``scores/<evaluator>.jsonl`` of a run, summarised over the records in ``ids``."""
    folder = directory / rundir.SCORES
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.jsonl")):
        lines = rundir.scan_results(path, required=("id",)).docs
        evaluator = path.stem
        names = {line.get("evaluator") for line in lines if line.get("evaluator")}
        if len(names) == 1:
            evaluator = names.pop()
        out.append(evaluator_scores(evaluator, lines, ids))
    return out


def build_report(dirs: list[str | Path], baseline: str | None = None) -> Report:
    """Read every run the arguments name; with ``baseline`` (a run's name), compare every other run with it."""
    runs, missing = expand_dirs(dirs)
    rows = []
    names: dict[str, int] = {}
    for name, path in runs:
        manifest = rundir.read_run_manifest(path) or {}
        docs = read_results(path)
        rate = (manifest.get("backbone") or {}).get("audio_rate_hz") or DEFAULT_AUDIO_RATE_HZ
        ids = {str(doc["id"]) for doc in docs}
        if name in names:  # two runs with one folder name (from different sweeps): show their paths
            name = str(path)
        names[name] = 1
        total = (manifest.get("data") or {}).get("records") or len(docs)
        rows.append(RunRow(name, path, manifest, run_metrics(docs, float(rate)), int(total), read_scores(path, ids)))
    report = Report(rows, missing)
    if baseline is not None:
        compare_with(report, baseline)
    return report


def compare_with(report: Report, baseline: str) -> None:
    """Fill ``report.paired``: every run against the run named ``baseline``, over the records both have."""
    names = [row.name for row in report.rows]
    if baseline not in names:
        raise ConfigError(f"--baseline {baseline!r} is not a run of this report; its runs: {', '.join(names) or '(none)'}")
    report.baseline = baseline
    base = report.rows[names.index(baseline)]
    base_scores = {ev.evaluator: ev.by_record for ev in base.evaluators}
    for row in report.rows:
        if row is base:
            continue
        out: dict[str, Paired] = {}
        lengths = base.metrics.spoken_by_record
        shared = [rid for rid in row.metrics.spoken_by_record if rid in lengths]
        if shared:
            out[LENGTH] = paired([row.metrics.spoken_by_record[r] for r in shared], [lengths[r] for r in shared])
        for ev in row.evaluators:
            theirs = base_scores.get(ev.evaluator, {})
            for name in ev.scores:
                ids = [r for r, s in ev.by_record.items() if name in s and name in theirs.get(r, {})]
                if ids:
                    out[f"{ev.evaluator}.{name}"] = paired([ev.by_record[r][name] for r in ids], [theirs[r][name] for r in ids])
        report.paired[row.name] = out


# --- files -----------------------------------------------------------------------------------


def _atomic(path: str | Path, write: Any) -> None:
    """``write(tmp)`` then rename into place, by the one write discipline (:mod:`reempathy.safe_write`)."""
    write_with(path, lambda tmp: write(str(tmp)), "report output")


def write_csv(report: Report, path: str | Path) -> None:
    """The table as CSV: raw numbers, scores with ``.lo``/``.hi`` columns."""
    header = []
    for col in report.columns():
        header.append(col)
        if any(f"{col}.lo" in report.values(r) for r in report.rows):
            header += [f"{col}.lo", f"{col}.hi"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for row in report.rows:
        v = report.values(row)
        writer.writerow(["" if v.get(c) is None else _csv_value(v[c]) for c in header])
    data = buf.getvalue()
    _atomic(path, lambda tmp: Path(tmp).write_text(data, encoding="utf-8"))


def _csv_value(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return value


def plot_series(report: Report, x: str, y: str) -> list[tuple[str, list[tuple[Any, float, float | None, float | None]]]]:
    """``[(label, [(x, y, lo, hi), …]), …]``: one series per combination of the settings other than ``x``."""
    if not report.rows:
        raise InputError("nothing to plot: no runs")
    if y not in report.columns():
        raise ConfigError(f"--y {y!r} is not a column; choose one of: {', '.join(report.columns()[1:])}")
    xs = [row.lookup(x) for row in report.rows]
    if all(v is None for v in xs):
        keys = ", ".join(report.setting_keys) or "(none swept)"
        raise ConfigError(f"--x {x!r} is neither a swept setting nor a config key of these runs; swept: {keys}")
    others = [k for k in report.setting_keys if k != x]
    series: dict[str, list[tuple[Any, float, float | None, float | None]]] = {}
    for row, xv in zip(report.rows, xs):
        v = report.values(row)
        if xv is None or v.get(y) is None or not isinstance(v[y], (int, float)):
            continue
        label = ", ".join(f"{k}={_cell(row.settings.get(k))}" for k in others) or y
        series.setdefault(label, []).append((xv, float(v[y]), v.get(f"{y}.lo"), v.get(f"{y}.hi")))
    if not series:
        raise InputError(f"no run has both {x!r} and a numeric {y!r}; nothing to plot")
    numeric = all(isinstance(p[0], (int, float)) and not isinstance(p[0], bool) for pts in series.values() for p in pts)
    for pts in series.values():
        if numeric:
            pts.sort(key=lambda p: p[0])
    return list(series.items())


def write_plot(report: Report, path: str | Path, x: str, y: str) -> None:
    """PNG of column ``y`` against key ``x`` (matplotlib's object API, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = plot_series(report, x, y)
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    categories: list[str] = []
    for label, pts in series:
        xs = [p[0] for p in pts]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs):
            for v in xs:
                if _cell(v) not in categories:
                    categories.append(_cell(v))
            xs = [categories.index(_cell(v)) for v in xs]
        ys = [p[1] for p in pts]
        if all(p[2] is not None for p in pts):
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        else:
            ax.plot(xs, ys, marker="o", label=label)
    if categories:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    if len(series) > 1 or series[0][0] != y:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


__all__ = ["Report", "RunRow", "build_report", "compare_with", "PAIRED_STATS", "expand_dirs", "read_results", "read_scores", "write_csv",
           "write_plot", "plot_series", "METRIC_COLUMNS"]
