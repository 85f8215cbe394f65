"""Weight-only quantization (the ``quantize`` backbone option, torchao): what is quantized, what runs where, clear errors.

int8 runs on CPU and is tested here; int4 needs CUDA (tinygemm) and is refused elsewhere; its
figures come from bench/gpu.sh on a GPU. How close a quantized model's greedy tokens stay to the
unquantized ones is reported by the bench, not asserted (it depends on the weights).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torchao")

from reempathy.backbones.quantize import quantize_weights, weight_bytes  # noqa: E402
from reempathy.backbones.tiny import TinyOptions, load_tiny  # noqa: E402
from reempathy.config import load_config  # noqa: E402
from reempathy.decoding.loop import LoopOptions, decode  # noqa: E402
from reempathy.registry import default_discovery  # noqa: E402
from reempathy.errors import ConfigError, NotAvailableError  # noqa: E402
from reempathy.plugins.processors.attention_reweight import AttentionReweight, AttentionReweightOptions  # noqa: E402
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy  # noqa: E402
from reempathy.runner import run_decode  # noqa: E402

from helpers import NoStop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def int8_tiny():
    return load_tiny(TinyOptions(quantize="int8"))


def test_int8_quantizes_every_linear_weight_but_the_output_head(int8_tiny):
    model = int8_tiny.model
    layer = model.model.layers[0]
    for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert "Int8" in type(linear.weight).__name__
    assert type(model.lm_head.weight).__name__ == "Parameter"
    assert weight_bytes(model) < weight_bytes(load_tiny(TinyOptions()).model)


def test_an_int8_backbone_decodes_reempathy_with_reweighting_on_both_caches(int8_tiny, tiny_prompt):
    answers = []
    for cache in ("dynamic", "static"):
        strategy = ReEmpathyStrategy(ReEmpathyOptions(text_tokens=3, audio_tokens=4, max_reflection_tokens=4), int8_tiny)
        reweight = AttentionReweight(AttentionReweightOptions(factor=1.5, layers="0-1"), int8_tiny)
        options = LoopOptions(max_new_tokens=20, greedy=True, cache=cache)
        answers.append(decode(int8_tiny, tiny_prompt, strategy, [reweight, NoStop(int8_tiny)], options))
    assert answers[0].counts.generated == 20 and answers[0].hidden
    assert answers[1].ids == answers[0].ids


def test_int4_off_cuda_is_refused_naming_int8():
    with pytest.raises(NotAvailableError, match='runs on CUDA only.*quantize = "int8"'):
        load_tiny(TinyOptions(quantize="int4"))


def test_without_torchao_the_error_names_the_extra(monkeypatch):
    model = load_tiny(TinyOptions()).model
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # the import fails as if not installed
    with pytest.raises(NotAvailableError, match=r"reempathy\[quant\]"):
        quantize_weights(model, "int8")


def test_an_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="none, int8 or int4"):
        quantize_weights(load_tiny(TinyOptions()).model, "int3")


def test_quantize_is_a_backbone_option_in_a_config():
    registry = default_discovery().registry
    cfg = load_config(
        ROOT / "configs/sft.toml",
        ['backbone.quantize="int8"', "decode.max_new_tokens=5", "sampling.greedy=true"],
        registry=registry,
    )
    result = run_decode(cfg, registry)
    assert result.counts.generated >= 1
    with pytest.raises(ConfigError, match="quantize"):
        load_config(ROOT / "configs/sft.toml", ['backbone.quantize="int2"'], registry=registry)
