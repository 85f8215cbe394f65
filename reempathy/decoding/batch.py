"""Many answers at once: the interface the experiment runner decodes a test set through.

Each row is one record's answer with its own strategy and processor objects (built per row
from the same factories, since a strategy keeps per-answer state) and its own sampling seed,
derived from the run seed and the record id by :func:`row_seed`, so that a record's answer
does not depend on its neighbours or on the batch size.

:func:`decode_batch` yields ``(key, result)`` as rows finish, not necessarily in the order the
requests came in.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from reempathy.backbones.base import Backbone
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.decoding.result import DecodeResult


@dataclass
class RowRequest:
    """One answer to decode: the caller's ``key`` (returned with the result), the prompt, this row's plugins and seed."""

    key: Any
    prompt_ids: list[int]
    strategy: object
    processors: Sequence[object] = field(default_factory=tuple)
    seed: int = 0


def row_seed(run_seed: int, record_id: str) -> int:
    """The sampling seed of one record: a hash of the run seed and the record id, in ``[0, 2**63)``."""
    digest = hashlib.sha256(f"{run_seed}:{record_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def decode_batch(
    backbone: Backbone,
    requests: Iterable[RowRequest],
    options: LoopOptions | None = None,
    batch_size: int = 8,
) -> Iterator[tuple[Any, DecodeResult]]:
    """Decode every request; yield ``(key, result)`` as each row finishes.

    ``options.seed`` is ignored: each row samples with its own ``RowRequest.seed``. (This first
    version decodes one row at a time; the batched loop replaces it behind the same interface.)
    """
    options = options or LoopOptions()
    for request in requests:
        row_options = dataclasses.replace(options, seed=request.seed)
        yield request.key, decode(backbone, request.prompt_ids, request.strategy, request.processors, row_options)


__all__ = ["RowRequest", "row_seed", "decode_batch"]
