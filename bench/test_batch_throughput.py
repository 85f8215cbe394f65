"""The batched loop: throughput of batches of 4 and 16 against 1, and a batch of one against the single-row loop.

Two groups per model shape (the `cpu512` figures are the ones that count; `tiny` is dominated by
Python):

* ``batch throughput <model>``: the same 16 rows of ``reempathy`` + ``attention-reweight`` (prompts
  of different lengths, exactly ``--bench-tokens`` tokens each, stop tokens banned) decoded with
  batch sizes 1, 4 and 16. Every call generates the same number of tokens, so the ratio of two
  calls' times is the inverse of their tokens/s ratio: tokens/s of batch 16 over batch 1 is
  ``time(batch 1) / time(batch 16)``.
* ``batch of one <model>``: one answer through the batched loop and through the single-row loop;
  per-token latency is the time divided by ``extra_info["tokens"]`` (target: batched ≤ 1.05 × single).

``bench/ratios.py`` prints both as ratios from interleaved runs.
"""

from __future__ import annotations

import pytest

import harness

ROWS = 16


@pytest.mark.parametrize("batch_size", harness.BATCH_SIZES)
def test_batched_throughput(benchmark, model, device, batch_size, n_tokens, rounds, disabled):
    bb = harness.backbone(model, device)
    variant = harness.BATCH_VARIANT
    if not disabled:
        harness.run_batch(bb, harness.batch_requests(bb, variant, batch_size), n_tokens, batch_size, variant)  # warm-up
    benchmark.group = f"batch throughput {model}"
    benchmark.extra_info.update(tokens=ROWS * n_tokens, rows=ROWS, batch_size=batch_size, model=model, variant=variant)
    total = benchmark.pedantic(
        harness.run_batch,
        setup=lambda: ((bb, harness.batch_requests(bb, variant, ROWS), n_tokens, batch_size, variant), {}),
        rounds=min(rounds, 3),
    )
    assert total == ROWS * n_tokens


@pytest.mark.parametrize("loop", ["single-row", "batched"])
def test_batch_of_one_per_token(benchmark, model, device, loop, n_tokens, rounds, disabled):
    bb = harness.backbone(model, device)
    variant = harness.BATCH_VARIANT
    if loop == "batched":

        def setup():
            return (bb, harness.batch_requests(bb, variant, 1), n_tokens, 1, variant), {}

        call = harness.run_batch
    else:

        def setup():
            return (harness.decode_args(bb, variant, n_tokens),), {}

        call = harness.run_decode
    if not disabled:
        args, _ = setup()
        call(*args)  # warm-up
    benchmark.group = f"batch of one {model}"
    benchmark.extra_info.update(tokens=n_tokens, model=model, variant=variant, loop=loop)
    benchmark.pedantic(call, setup=setup, rounds=rounds)
