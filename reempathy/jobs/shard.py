"""Many processes: which share of the records this process decodes, and how the processes meet.

``torchrun`` and ``accelerate launch`` start one process per device and tell each its rank in
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``).
When ``WORLD_SIZE`` is above 1 we join their process group through accelerate's
``PartialState`` (NCCL on GPUs, gloo on CPUs; it also pins each process to its local GPU); we
write no scheduler of our own. With one process nothing is initialised and every collective
below is a no-op.

Where it decides:

- **the share** (:meth:`Group.share`): every rank sees the same list of records still to do
  (read after rank 0 has consolidated the directory) and takes every ``size``-th one starting
  at its rank, so shares differ by at most one record and a resumed run rebalances.
- **errors** (:meth:`Group.gather`): a rank that fails does not leave the others waiting at a
  collective forever: every rank reaches the same gathers, carrying its error (or None), and
  every rank then raises if any failed.
- **the timeout**: a rank that finishes its share early waits for the slowest; the process
  group's default timeout (10–30 minutes) would kill a long test set, so it is 24 hours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence, TypeVar

T = TypeVar("T")

TIMEOUT = timedelta(hours=24)


@dataclass
class Group:
    """This process's place among the run's processes (rank 0 of 1 when run alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on the process that writes the manifest and merges the shards."""
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's part of ``items``: every ``size``-th item from position ``rank``."""
        return list(items[self.rank :: self.size])

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order (a collective: every rank must call it)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a collective)."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Leave the process group (at the end of a command)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


_GROUP: Group | None = None


def world_size_from_env() -> int:
    """The number of processes the launcher started (1 when run directly)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def process_group() -> Group:
    """This process's :class:`Group`, joining the launcher's process group on first use."""
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    if world_size_from_env() == 1:
        _GROUP = Group()
        return _GROUP
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    # cpu=True is what makes accelerate use gloo on a machine without GPUs (else it would see no backend).
    state = PartialState(cpu=cpu, backend="gloo" if cpu else None, timeout=TIMEOUT)
    _GROUP = Group(rank=state.process_index, size=state.num_processes, local_rank=state.local_process_index)
    return _GROUP


def release_group() -> None:
    """Close the process group, if one was joined (the CLI calls this when a command ends)."""
    global _GROUP
    if _GROUP is not None:
        _GROUP.close()
        _GROUP = None


__all__ = ["Group", "process_group", "release_group", "world_size_from_env", "TIMEOUT"]
