"""Hook dispatch cost per token with 0, 1 and 5 no-op plugins registered.

Two views: the bare dispatch (the loop's two per-token hook calls on a session plugin manager)
and a whole tiny-model ``sft`` decode with the no-op plugins in it.
"""

from __future__ import annotations

import pytest

import harness

NOOPS = (0, 1, 5)


@pytest.mark.parametrize("noops", NOOPS)
def test_hook_dispatch_per_token(benchmark, device, noops):
    pm, session, logits = harness.dispatch_pm(harness.backbone("tiny", device), noops)
    benchmark.group = "hook dispatch per token"
    benchmark.extra_info.update(noops=noops)
    benchmark(harness.dispatch_once, pm, session, logits)
    assert len(pm.hook.reempathy_token.get_hookimpls()) == noops


@pytest.mark.parametrize("noops", NOOPS)
def test_tiny_decode_with_noop_plugins(benchmark, device, noops, n_tokens, rounds, disabled):
    bb = harness.backbone("tiny", device)
    if not disabled:
        harness.run_decode(harness.decode_args(bb, "sft", n_tokens, noops=noops))  # warm-up
    benchmark.group = "tiny sft decode with no-op plugins"
    benchmark.extra_info.update(tokens=n_tokens, noops=noops)
    result = benchmark.pedantic(
        harness.run_decode,
        setup=lambda: ((harness.decode_args(bb, "sft", n_tokens, noops=noops),), {}),
        rounds=rounds,
    )
    assert result.counts.generated == n_tokens
