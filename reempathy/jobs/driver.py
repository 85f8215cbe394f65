"""The one driver of resumable jobs: ``run``, ``eval``, ``reflect-data`` and ``pairs`` are descriptions it runs.

Every resumable command has the same skeleton, and it is written here once::

    check    the store refuses what it cannot continue (another job's output, a finished one) — reads only
    to do    the job's items whose ids the store does not hold yet
    build    the expensive part (a model, an evaluator), only when there is something to do
    claim    rank 0 takes the store (identity written, a crash's torn tail cut, shards merged); the others wait
    share    every process takes every n-th item still to do
    work     each finished item's entry appended as one whole, durable line; a progress bar
    finish   rank 0 completes the store (merge, rename, summary) once every process is done
    report   counts over every process

A job (:class:`Job`) names its items, its store and two callables: ``build`` (what is expensive)
and ``work`` (items in, :class:`Outcome` s out, as they finish). A store (:class:`Store`) is one
of three: a run directory (:class:`reempathy.jobs.rundir.RunStore`), a score file
(:class:`reempathy.jobs.scores.ScoreStore`), or a JSONL made whole at the end
(:class:`reempathy.jobs.partial.PartialJsonl`). What each command adds — its items, its
identity, its summary line — is in its own module and reads top to bottom, like a torchtune
recipe; the crash safety is the stores' and this driver's.

Where it decides: :func:`run_job`. An item that fails (``Outcome.failure``) is not written, so
a rerun tries it again; an error (a ``ReempathyError``) ends the job where it happened, and in
a group of processes every rank still meets every collective, so none waits for ever.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Protocol, Sequence, TypeVar

from reempathy.errors import ReempathyError
from reempathy.jobs.shard import Group

I = TypeVar("I")  # noqa: E741 - an item of work
W = TypeVar("W")  # what build() returns: the model, the evaluator


@dataclass
class Outcome:
    """One item finished: its ``entry`` to append, or its ``failure`` (not written: a rerun tries it again).

    A ``failure`` is the message, or an object whose ``str`` is (``BadRecord``: ``FILE:LINE: …``).
    ``tally`` is added to the job's counters (stop reasons, tokens…), summed over processes.
    """

    key: str
    entry: dict[str, Any] | None = None
    failure: Any = None
    tally: dict[str, float] = field(default_factory=dict)


class Writer(Protocol):
    """Where one process appends its entries."""

    def append(self, entry: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class Store(Protocol):
    """A job's output, as the driver uses it (module docstring)."""

    def check(self, force: bool) -> None:
        """Refuse, reading only, an output that cannot be continued (``force``: it will be discarded)."""

    def done_ids(self, force: bool) -> set[str]:
        """The ids whose entries the output holds (read only; none with ``force``)."""

    def claim(self, force: bool) -> None:
        """Take the output (rank 0 only): discard it (``force``), write the identity, repair a crash's leftovers."""

    def writer(self, group: Group) -> Writer:
        """This process's writer (each rank its own file when there are several)."""

    def finish(self, report: "JobReport") -> bool:
        """Complete the output (rank 0 only, after every rank); True when the job is complete."""


@dataclass
class Job(Generic[I, W]):
    """A resumable job: what to do (``items``, keyed by ``key``), where it goes (``store``), how (``build``, ``work``).

    ``postfix`` turns the counters and the seconds so far into the progress bar's tail.
    """

    name: str
    unit: str
    items: Sequence[I]
    key: Callable[[I], str]
    store: Store
    build: Callable[[], W]
    work: Callable[[W, list[I]], Iterator[Outcome]]
    postfix: Callable[[Counter, float], str] | None = None


@dataclass
class JobReport:
    """What one invocation did, over every process (as rank 0 sees it)."""

    total: int
    already_done: int
    processed: int = 0
    failures: list[Any] = field(default_factory=list)
    tally: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    processes: int = 1
    complete: bool = False

    @property
    def left(self) -> int:
        """Items still not done after this invocation."""
        return self.total - self.already_done - self.processed


def run_job(job: Job[Any, Any], *, force: bool = False, progress: bool | None = None, group: Group | None = None) -> JobReport:
    """Run ``job`` to the end (or to its first error), resuming whatever an earlier invocation left (module docstring)."""
    group = group or Group()
    store = job.store
    store.check(force)
    before = store.done_ids(force)
    worker = job.build() if any(job.key(i) not in before for i in job.items) else None

    error = None
    if group.main:
        try:
            store.claim(force)
        except (ReempathyError, OSError) as exc:
            error = error_report(exc)
    error = group.broadcast(error)
    if error is not None:
        raise reraise(error)

    started = time.perf_counter()
    done = store.done_ids(False)  # after the claim: what a crashed attempt left is merged in
    todo = [i for i in job.items if job.key(i) not in done]
    mine = group.share(todo)
    tally: Counter = Counter()
    failures: list[Any] = []
    processed = 0
    failure: dict[str, Any] | None = None
    try:
        writer = store.writer(group)
        try:
            bar = progress_bar(len(mine) if group.size > 1 else len(job.items),
                               0 if group.size > 1 else len(job.items) - len(todo), job.unit,
                               job.name if group.size == 1 else f"{job.name} (rank 0 of {group.size})",
                               progress if group.main else False)
            try:
                if mine:
                    if worker is None:
                        worker = job.build()
                    for outcome in job.work(worker, mine):
                        if outcome.failure is not None:
                            failures.append(outcome.failure)
                        elif outcome.entry is not None:
                            writer.append(outcome.entry)
                        processed += 1
                        tally.update(outcome.tally)
                        if job.postfix is not None:
                            bar.set_postfix_str(job.postfix(tally, time.perf_counter() - started), refresh=False)
                        bar.update(1)
            finally:
                bar.close()
        finally:
            writer.close()
    except ReempathyError as exc:
        if group.size == 1:
            raise
        failure = error_report(exc)  # told to every rank below, so none waits for this one forever

    # Every rank meets here, failed or not; rank 0 completes what was written either way.
    reports = group.gather({"rank": group.rank, "error": failure, "processed": processed, "failures": failures,
                            "tally": dict(tally)})
    report = JobReport(total=len(job.items), already_done=len(job.items) - len(todo), processes=group.size)
    for rep in reports:
        report.processed += rep["processed"]
        report.failures += rep["failures"]
        report.tally.update(rep["tally"])
    report.seconds = time.perf_counter() - started
    complete = False
    if group.main:
        complete = store.finish(report)
    report.complete = bool(group.broadcast(complete))
    failed = [rep for rep in reports if rep["error"] is not None]
    if failed:
        first = failed[0]
        raise reraise(dict(first["error"], message=f"rank {first['rank']} of {group.size} failed: {first['error']['message']}"))
    return report


def error_report(exc: BaseException) -> dict[str, Any]:
    """An error as it travels between ranks: its message and the exit status it stands for."""
    if isinstance(exc, ReempathyError):
        return {"message": str(exc), "exit_code": exc.exit_code}
    return {"message": f"{type(exc).__name__}: {exc}", "exit_code": 2}


def reraise(report: dict[str, Any]) -> ReempathyError:
    """The error a rank reported, raised again (with its exit status) on this rank."""
    error = ReempathyError(report["message"])
    error.exit_code = report["exit_code"]
    return error


def progress_bar(total: int, initial: int, unit: str, desc: str, enabled: bool | None) -> Any:
    """The tqdm bar on stderr: ``initial`` items already done; ``enabled=None`` lets tqdm decide (a terminal)."""
    from tqdm.auto import tqdm

    disable = None if enabled is None else not enabled
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, disable=disable, dynamic_ncols=True, file=sys.stderr)


__all__ = ["Job", "JobReport", "Outcome", "Store", "Writer", "run_job", "progress_bar", "error_report", "reraise"]
