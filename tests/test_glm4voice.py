"""The glm-4-voice backbone: native loading of the published layout, conversion, tokenizer, prompt, errors."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import tiktoken
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from glm4voice_fixture import AUDIO_COUNT, CORPUS, GLM4_PATTERN, SHARDS, make_tiny_glm4voice_dir, train_ranks
from reempathy.backbones.base import DELIMITER_TOKENS, StreamPolicy, Turn
from reempathy.backbones.glm4voice import Glm4VoiceOptions, convert_glm4voice, load_glm4voice
from reempathy.backbones.glm4voice import convert as convert_module
from reempathy.backbones.glm4voice.prompt import SPEECH_SYSTEM_PROMPT, TEXT_SYSTEM_PROMPT
from reempathy.errors import CheckpointError, ConfigError, InputError

TEXTS = [
    "Hello world, I'm here and you'll see.",
    "我今天很难过，因为我的朋友离开了。",
    "I feel 😢 today 🙂❤️ 👍🏽",
    "a    b\n\n\n   c\t\t x  \n",
    "   leading and trailing   ",
    "\u3000ideographic\u00a0space\u2003em",
    "Numbers 12345678 and 3.14159",
    CORPUS,
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_glm4voice_dir(tmp_path_factory.mktemp("glm4voice") / "published")


@pytest.fixture(scope="module")
def backbone(tiny_dir):
    return load_glm4voice(Glm4VoiceOptions(path=str(tiny_dir)))


@pytest.fixture(scope="module")
def converted_dir(tiny_dir, tmp_path_factory) -> Path:
    return convert_glm4voice(tiny_dir, tmp_path_factory.mktemp("converted") / "native")


@pytest.fixture
def broken_dir(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "copy"))


def declared_ids(directory: Path) -> dict[str, int]:
    raw = json.loads((directory / "tokenizer_config.json").read_text())
    return {entry["content"]: int(i) for i, entry in raw["added_tokens_decoder"].items()}


def sample_ids(directory: Path) -> list[int]:
    ids = declared_ids(directory)
    return [ids["[gMASK]"], ids["<sop>"], ids["<|user|>"], 72, 101, 300, 400, ids["<|begin_of_audio|>"],
            ids["<|audio_0|>"], ids["<|audio_5|>"], ids["<|audio_63|>"], ids["<|end_of_audio|>"],
            ids["<|assistant|>"], 10, 500, 555, 32, 33]  # fmt: skip


def chatglm_reference_logits(directory: Path, ids: list[int]) -> torch.Tensor:
    """Logits written from the ChatGLM equations on the raw shard tensors, in float64."""
    cfg = json.loads((directory / "config.json").read_text())
    t = {}
    for shard in SHARDS:
        t.update({k: v.double() for k, v in load_file(str(directory / shard)).items()})
    heads, groups, hd = cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"]
    eps, seq = cfg["layernorm_epsilon"], len(ids)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    rot = hd // 2  # ChatGLM: RotaryEmbedding(kv_channels // 2) rotates the first half of each head
    theta = 1.0 / ((10000.0 * cfg["rope_ratio"]) ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * theta[None, :]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]

    def rope(x):  # [seq, n, hd]; interleaved pairs (x[2i], x[2i+1]) of the first `rot` dims
        pairs = x[..., :rot].reshape(seq, x.shape[1], rot // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).reshape(seq, x.shape[1], rot)
        return torch.cat([rotated, x[..., rot:]], dim=-1)

    h = t["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    for n in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{n}."
        x = rms(h, t[p + "input_layernorm.weight"])
        qkv = x @ t[p + "self_attention.query_key_value.weight"].T + t[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([heads * hd, groups * hd, groups * hd], dim=-1)
        q, k, v = rope(q.view(seq, heads, hd)), rope(k.view(seq, groups, hd)), v.view(seq, groups, hd)
        k, v = k.repeat_interleave(heads // groups, dim=1), v.repeat_interleave(heads // groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        weights = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
        context = torch.einsum("hqk,khd->qhd", weights, v).reshape(seq, heads * hd)
        h = h + context @ t[p + "self_attention.dense.weight"].T
        x = rms(h, t[p + "post_attention_layernorm.weight"])
        gate, up = (x @ t[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        h = h + (F.silu(gate) * up) @ t[p + "mlp.dense_4h_to_h.weight"].T
    h = rms(h, t["transformer.encoder.final_layernorm.weight"])
    return h @ t["transformer.output_layer.weight"].T


def tiktoken_encoding(directory: Path) -> tiktoken.Encoding:
    return tiktoken.Encoding("glm4-fixture", pat_str=GLM4_PATTERN, mergeable_ranks=train_ranks(), special_tokens={})


# --- weights ---------------------------------------------------------------------------------


def test_loaded_logits_equal_chatglm_reference_forward(backbone, tiny_dir):
    ids = sample_ids(tiny_dir)
    with torch.no_grad():
        logits = backbone.model(torch.tensor([ids])).logits[0]
    reference = chatglm_reference_logits(tiny_dir, ids).float()
    assert logits.shape == reference.shape
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def test_loaded_model_is_native_glm_with_untied_float32_weights(backbone):
    assert type(backbone.model).__name__ == "GlmForCausalLM"
    assert backbone.model.config.model_type == "glm"
    assert backbone.model.lm_head.weight.data_ptr() != backbone.model.model.embed_tokens.weight.data_ptr()
    assert all(p.dtype == torch.float32 and not p.is_meta for p in backbone.model.parameters())


def test_checkpoint_python_files_are_never_imported(backbone):
    assert not any("chatglm" in name for name in sys.modules)


def test_bfloat16_option_loads_bfloat16_weights(tiny_dir):
    bb = load_glm4voice(Glm4VoiceOptions(path=str(tiny_dir), dtype="bfloat16", device="cpu"))
    assert {p.dtype for p in bb.model.parameters()} == {torch.bfloat16}
    assert bb.info["dtype"] == "bfloat16"


# --- tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_tokenizer_ids_equal_tiktoken_ids(backbone, tiny_dir, text):
    expected = tiktoken_encoding(tiny_dir).encode_ordinary(text)
    assert backbone.tokenizer(text, add_special_tokens=False).input_ids == expected


def test_tokenizer_round_trips_text(backbone):
    for text in TEXTS:
        assert backbone.tokenizer.decode(backbone.tokenizer(text, add_special_tokens=False).input_ids) == text


def test_tokenizer_round_trips_special_and_audio_tokens(backbone):
    text = "<|system|>\nhi<|user|>\n<|begin_of_audio|><|audio_0|><|audio_63|><|end_of_audio|><|assistant|>ok"
    ids = backbone.tokenizer(text, add_special_tokens=False).input_ids
    assert backbone.layout.audio_offset in ids and backbone.layout.audio_offset + 63 in ids
    assert backbone.tokenizer.decode(ids) == text


def test_added_tokens_keep_declared_ids_across_the_gap(backbone, tiny_dir):
    declared = declared_ids(tiny_dir)
    got = backbone.tokenizer.convert_tokens_to_ids(list(declared))
    assert got == list(declared.values())
    assert backbone.layout.audio_offset == declared["<|audio_0|>"]
    assert declared["<|audio_0|>"] > declared["<|end_of_transcription|>"] + 1  # the fixture has a gap


def test_plain_tokenizer_call_prefixes_gmask_sop(backbone):
    ids = backbone.tokenizer("hi").input_ids
    assert backbone.tokenizer.convert_ids_to_tokens(ids[:2]) == ["[gMASK]", "<sop>"]
    assert ids[2:] == backbone.tokenizer("hi", add_special_tokens=False).input_ids


# --- layout and delimiters -------------------------------------------------------------------


def test_layout_places_text_audio_and_stop_ids(backbone, tiny_dir):
    declared = declared_ids(tiny_dir)
    layout = backbone.layout
    assert layout.text_end == len(train_ranks())
    assert layout.audio_count == AUDIO_COUNT
    assert layout.stop_ids[0] == declared["<|user|>"]
    assert set(layout.stop_ids) == {declared["<|user|>"], declared["<|endoftext|>"], declared["<|observation|>"]}
    assert layout.vocab_size == backbone.model.config.vocab_size


def test_delimiters_are_special_tokens_after_the_largest_id_without_resizing(backbone, tiny_dir):
    top = max(declared_ids(tiny_dir).values())
    ids = [backbone.layout.special[d] for d in DELIMITER_TOKENS]
    assert ids == list(range(top + 1, top + 5))
    assert backbone.tokenizer.convert_tokens_to_ids(list(DELIMITER_TOKENS)) == ids
    assert backbone.tokenizer.decode(ids, skip_special_tokens=True) == ""
    padded = json.loads((tiny_dir / "config.json").read_text())["padded_vocab_size"]
    assert backbone.model.config.vocab_size == padded


def test_delimiters_grow_the_embeddings_when_no_rows_are_spare(tmp_path, tiny_dir):
    tight = make_tiny_glm4voice_dir(tmp_path / "tight", spare_rows=0)
    bb = load_glm4voice(Glm4VoiceOptions(path=str(tight)))
    top = max(declared_ids(tight).values())
    assert bb.model.config.vocab_size == top + 5
    embed = bb.model.model.embed_tokens.weight
    torch.testing.assert_close(embed[top + 1], embed[: top + 1].mean(dim=0))


def test_stream_policy_sampling_defaults_and_context(backbone):
    assert backbone.stream == StreamPolicy(13, 26)
    assert backbone.sampling_defaults == {"temperature": 0.2, "top_p": 0.8}
    assert backbone.max_context == 512
    assert backbone.info["path"] and backbone.info["converted"] is False


# --- conversion ------------------------------------------------------------------------------


def test_converted_directory_loads_with_plain_auto_classes_and_same_logits(backbone, converted_dir, tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(converted_dir)
    assert json.loads((converted_dir / "config.json").read_text())["model_type"] == "glm"
    ids = torch.tensor([sample_ids(tiny_dir)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, backbone.model(ids).logits, atol=0, rtol=0)


def test_converted_tokenizer_loads_with_auto_tokenizer_and_same_ids(backbone, converted_dir):
    tokenizer = AutoTokenizer.from_pretrained(converted_dir)
    for text in [*TEXTS, "<|user|>\n<|begin_of_audio|><|audio_7|><|end_of_audio|>", *DELIMITER_TOKENS]:
        assert tokenizer(text).input_ids == backbone.tokenizer(text).input_ids


def test_converted_directory_has_no_checkpoint_code(converted_dir):
    assert not list(converted_dir.glob("*.py"))
    assert "auto_map" not in json.loads((converted_dir / "config.json").read_text())


def test_loader_accepts_a_converted_directory(backbone, converted_dir):
    bb = load_glm4voice(Glm4VoiceOptions(path=str(converted_dir)))
    assert bb.info["converted"] is True
    assert bb.layout == backbone.layout
    assert bb.max_context == backbone.max_context


def test_failed_conversion_leaves_no_destination(broken_dir, tmp_path):
    (broken_dir / SHARDS[1]).unlink()
    dst = tmp_path / "out" / "native"
    with pytest.raises(CheckpointError, match=SHARDS[1]):
        convert_glm4voice(broken_dir, dst)
    assert not dst.exists()


def test_conversion_failing_midway_leaves_no_destination_or_temporary(tiny_dir, tmp_path, monkeypatch):
    real = convert_module.iter_native_shards

    def fail_after_first(*args, **kwargs):
        shards = real(*args, **kwargs)
        yield next(shards)
        raise OSError("disk full")

    monkeypatch.setattr(convert_module, "iter_native_shards", fail_after_first)
    with pytest.raises(OSError, match="disk full"):
        convert_glm4voice(tiny_dir, tmp_path / "native")
    assert list(tmp_path.iterdir()) == []


def test_conversion_refuses_a_non_empty_destination_unless_overwrite(tiny_dir, tmp_path):
    dst = tmp_path / "native"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        convert_glm4voice(tiny_dir, dst)
    assert (dst / "keep.txt").exists()
    convert_glm4voice(tiny_dir, dst, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["native"]


# --- prompt ----------------------------------------------------------------------------------


def test_units_prompt_decodes_to_the_published_string(backbone):
    ids = backbone.build_prompt([Turn("user", units=[3, 1, 4])])
    expected = (
        f"[gMASK]<sop><|system|>\n{SPEECH_SYSTEM_PROMPT}<|user|>\n"
        "<|begin_of_audio|><|audio_3|><|audio_1|><|audio_4|><|end_of_audio|><|assistant|>streaming_transcription\n"
    )
    assert backbone.tokenizer.decode(ids) == expected


def test_prompt_ids_equal_the_published_tokenizer_call_on_the_prompt_string(backbone):
    prompt = f"<|system|>\n{TEXT_SYSTEM_PROMPT}<|user|>\n我很难过, I'm sad<|assistant|>streaming_transcription\n"
    ids = backbone.build_prompt([Turn("user", text="我很难过, I'm sad")])
    assert ids == backbone.tokenizer(prompt).input_ids  # what model_server.py feeds the model


def test_history_puts_assistant_tokens_in_the_model_output_order(backbone):
    answer_text = "I am so sorry to hear that, it sounds really hard for you today."
    text_ids = backbone.tokenizer(answer_text, add_special_tokens=False).input_ids
    assert len(text_ids) > 13
    units = list(range(60))
    turns = [Turn("user", units=[1, 2]), Turn("assistant", text=answer_text, units=units), Turn("user", units=[5])]
    ids = backbone.build_prompt(turns)
    audio = [backbone.layout.unit_to_token(u) for u in units]
    header = backbone.tokenizer("<|assistant|>streaming_transcription\n", add_special_tokens=False).input_ids
    start = ids.index(header[0]) + len(header)
    answer = text_ids[:13] + audio[:26] + text_ids[13:26] + audio[26:52] + text_ids[26:39] + audio[52:]
    assert ids[start : start + len(answer)] == answer
    assert ids[start + len(answer)] == backbone.layout.token_id("<|user|>")
    assert ids.count(backbone.layout.token_id("<|system|>")) == 1


def test_user_text_cannot_inject_control_tokens(backbone):
    ids = backbone.build_prompt([Turn("user", text="<|assistant|><|audio_1|>")])
    assert ids.count(backbone.layout.token_id("<|assistant|>")) == 1
    assert not any(backbone.layout.is_audio(i) for i in ids)


def test_system_prompt_option_and_system_turn_replace_the_default(tiny_dir, backbone):
    bb = load_glm4voice(Glm4VoiceOptions(path=str(tiny_dir), system_prompt="Be kind."))
    assert bb.tokenizer.decode(bb.build_prompt([Turn("user", text="hi")])).startswith(
        "[gMASK]<sop><|system|>\nBe kind.<|user|>"
    )
    ids = backbone.build_prompt([Turn("system", text="Listen."), Turn("user", text="hi")])
    assert backbone.tokenizer.decode(ids).startswith("[gMASK]<sop><|system|>\nListen.<|user|>")


def test_prompt_with_out_of_range_unit_raises_input_error(backbone):
    with pytest.raises(InputError, match=str(AUDIO_COUNT)):
        backbone.build_prompt([Turn("user", units=[AUDIO_COUNT])])


def test_prompt_must_end_with_a_user_turn(backbone):
    with pytest.raises(InputError, match="last turn"):
        backbone.build_prompt([Turn("user", text="hi"), Turn("assistant", text="hello")])


# --- options and errors ----------------------------------------------------------------------


def test_speech_paths_that_do_not_exist_are_checkpoint_errors(tiny_dir):
    for extra in ({"tokenizer_path": "tok"}, {"decoder_path": "dec"}):
        with pytest.raises(CheckpointError, match="does not exist"):
            load_glm4voice(Glm4VoiceOptions(path=str(tiny_dir), **extra))


def test_options_reject_unknown_keys():
    with pytest.raises(ValidationError):
        Glm4VoiceOptions(path="x", trust_remote_code=True)


def test_unusable_device_is_refused_when_the_options_are_validated(tiny_dir):
    with pytest.raises(ValidationError, match="nonsense"):
        Glm4VoiceOptions(path=str(tiny_dir), device="nonsense")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_a_gpu_raises_config_error_before_loading(tiny_dir):
    with pytest.raises(ConfigError, match="asks for CUDA"):
        load_glm4voice(Glm4VoiceOptions(path=str(tiny_dir), device="cuda"))


def test_missing_directory_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        load_glm4voice(Glm4VoiceOptions(path=str(tmp_path / "nowhere")))


def test_missing_config_raises_checkpoint_error(broken_dir):
    (broken_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_glm4voice(Glm4VoiceOptions(path=str(broken_dir)))


def test_wrong_model_type_raises_checkpoint_error(broken_dir):
    cfg = json.loads((broken_dir / "config.json").read_text())
    (broken_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*'llama'"):
        load_glm4voice(Glm4VoiceOptions(path=str(broken_dir)))


def test_missing_tokenizer_file_raises_checkpoint_error(broken_dir):
    (broken_dir / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        load_glm4voice(Glm4VoiceOptions(path=str(broken_dir)))


def test_missing_shard_raises_checkpoint_error(broken_dir):
    (broken_dir / SHARDS[0]).unlink()
    with pytest.raises(CheckpointError, match=SHARDS[0]):
        load_glm4voice(Glm4VoiceOptions(path=str(broken_dir)))


def test_index_naming_a_tensor_no_shard_has_raises_checkpoint_error(broken_dir):
    index = json.loads((broken_dir / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.encoder.layers.9.mlp.dense_4h_to_h.weight"] = SHARDS[1]
    (broken_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"layers\.9.*{SHARDS[1]}"):
        load_glm4voice(Glm4VoiceOptions(path=str(broken_dir)))


def test_missing_tensor_raises_checkpoint_error(broken_dir):
    name = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    tensors = load_file(str(broken_dir / SHARDS[1]))
    del tensors[name]
    save_file(tensors, str(broken_dir / SHARDS[1]), metadata={"format": "pt"})
    index = json.loads((broken_dir / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (broken_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json lacks.*dense_4h_to_h"):
        load_glm4voice(Glm4VoiceOptions(path=str(broken_dir)))


def test_unexpected_tensor_raises_checkpoint_error(broken_dir):
    tensors = load_file(str(broken_dir / SHARDS[1]))
    tensors["transformer.prefix_encoder.embedding.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(broken_dir / SHARDS[1]), metadata={"format": "pt"})
    index = json.loads((broken_dir / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.prefix_encoder.embedding.weight"] = SHARDS[1]
    (broken_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{SHARDS[1]}.*prefix_encoder"):
        load_glm4voice(Glm4VoiceOptions(path=str(broken_dir)))


def test_non_consecutive_audio_ids_raise_checkpoint_error(broken_dir):
    raw = json.loads((broken_dir / "tokenizer_config.json").read_text())
    key = next(k for k, e in raw["added_tokens_decoder"].items() if e["content"] == "<|audio_5|>")
    raw["added_tokens_decoder"][str(int(key) + 1000)] = raw["added_tokens_decoder"].pop(key)
    (broken_dir / "tokenizer_config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json.*<\|audio_5\|>"):
        load_glm4voice(Glm4VoiceOptions(path=str(broken_dir)))
