"""Per-token decode latency of each strategy, and of transformers' generate() on the same model, prompt and length.

Each group (one model shape) holds generate() and our strategies, so pytest-benchmark's table
compares them side by side; divide a time by ``extra_info["tokens"]`` for per-token figures.
bench/ratios.py prints the target ratios from interleaved runs.
"""

from __future__ import annotations

import pytest

import harness


@pytest.mark.parametrize("variant", harness.VARIANTS)
def test_decode_per_token(benchmark, model, device, variant, n_tokens, rounds, loop_kwargs, disabled):
    bb = harness.backbone(model, device)
    if not disabled:
        harness.run_decode(harness.decode_args(bb, variant, n_tokens, **loop_kwargs))  # warm-up (and compile)
    benchmark.group = f"decode {model}"
    benchmark.extra_info.update(tokens=n_tokens, model=model, variant=variant, **loop_kwargs)
    result = benchmark.pedantic(
        harness.run_decode,
        setup=lambda: ((harness.decode_args(bb, variant, n_tokens, **loop_kwargs),), {}),
        rounds=rounds,
    )
    assert result.counts.generated == n_tokens


def test_generate_per_token(benchmark, model, device, n_tokens, rounds, loop_kwargs, disabled):
    bb = harness.backbone(model, device)
    inputs = harness.generate_inputs(bb)
    args = (bb, inputs, n_tokens, loop_kwargs["cache"], loop_kwargs["compile"])
    if not disabled:
        harness.run_generate(*args)  # warm-up (and compile)
    benchmark.group = f"decode {model}"
    benchmark.extra_info.update(tokens=n_tokens, model=model, variant="generate()", **loop_kwargs)
    out = benchmark.pedantic(harness.run_generate, args=args, rounds=rounds)
    assert out.shape[1] == inputs["input_ids"].shape[1] + n_tokens
