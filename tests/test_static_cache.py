"""A preallocated (static) KV cache decodes exactly what the dynamic one does."""

from __future__ import annotations

from pathlib import Path

import pytest

from reempathy.config import load_config
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.registry import default_discovery
from reempathy.errors import ConfigError
from reempathy.plugins.processors.attention_reweight import AttentionReweight, AttentionReweightOptions
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy
from reempathy.plugins.strategies.sft import SftOptions, SftStrategy
from reempathy.runner import run_decode

from helpers import NoStop

ROOT = Path(__file__).resolve().parents[1]


def _both(tiny, prompt, make, n=40, **loop):
    results = []
    for cache in ("dynamic", "static"):
        strategy, processors = make()
        options = LoopOptions(max_new_tokens=n, greedy=True, cache=cache, **loop)
        results.append(decode(tiny, prompt, strategy, processors, options))
    return results


def test_static_cache_gives_the_same_greedy_tokens_as_dynamic_for_sft(tiny, tiny_prompt):
    dynamic, static = _both(tiny, tiny_prompt, lambda: (SftStrategy(SftOptions(), tiny), [NoStop(tiny)]))
    assert static.counts.generated == 40
    assert static.ids == dynamic.ids


def test_static_cache_gives_the_same_greedy_tokens_with_switches_and_attention_bias(tiny, tiny_prompt):
    # Forced delimiters (two tokens in one forward call) and the bias over a static cache's mask.
    def make():
        strategy = ReEmpathyStrategy(ReEmpathyOptions(text_tokens=3, audio_tokens=4, max_reflection_tokens=5), tiny)
        reweight = AttentionReweight(AttentionReweightOptions(factor=1.5, layers="0-1"), tiny)
        return strategy, [NoStop(tiny), reweight]

    dynamic, static = _both(tiny, tiny_prompt, make, n=50)
    assert static.counts.forced > 2 and static.hidden
    assert static.ids == dynamic.ids
    c = static.counts
    assert c.forwarded + c.unforwarded == c.prompt + c.generated + c.forced


def test_static_cache_and_compile_are_config_keys_passed_to_the_loop():
    registry = default_discovery().registry
    cfg = load_config(
        ROOT / "configs/sft.toml",
        ['decode.cache="static"', "decode.max_new_tokens=6", "sampling.greedy=true"],
        registry=registry,
    )
    assert cfg.decode.cache == "static" and cfg.decode.compile is False
    dynamic = load_config(ROOT / "configs/sft.toml", ["decode.max_new_tokens=6", "sampling.greedy=true"], registry=registry)
    assert run_decode(cfg, registry).ids == run_decode(dynamic, registry).ids


def test_compile_without_a_static_cache_is_a_config_error():
    registry = default_discovery().registry
    cfg = load_config(ROOT / "configs/sft.toml", ["decode.compile=true"], registry=registry)
    with pytest.raises(ConfigError, match='needs decode.cache = "static"'):
        run_decode(cfg, registry)


def test_unknown_cache_kind_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="decode.cache"):
        load_config(ROOT / "configs/sft.toml", ['decode.cache="paged"'])
