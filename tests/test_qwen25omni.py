"""The qwen2.5-omni backbone on a tiny checkpoint in the published format: loading, prompts, audio in,
every strategy on its text-only spoken stream, attention reweighting on the thinker, training."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import NoStop
from qwen25omni_fixture import QWEN_TEST_OPTIONS
from transformers import (
    AttentionInterface,
    Qwen2_5OmniThinkerForConditionalGeneration,
    WhisperFeatureExtractor,
)

from reempathy.backbones.base import (
    DELIMITER_TOKENS,
    REFLECTION_CLOSE,
    REFLECTION_OPEN,
    Turn,
)
from reempathy.backbones.qwen25omni import (
    DEFAULT_SYSTEM_PROMPT,
    Qwen25OmniOptions,
    load_qwen25omni,
)
from reempathy.backbones.qwen25omni.prompt import audio_token_count
from reempathy.cli import main
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.decoding.spans import SPOKEN_AUDIO, SPOKEN_TEXT
from reempathy.errors import ConfigError, InputError
from reempathy.hooks import hookimpl
from reempathy.plugins.processors.attention_reweight import (
    AttentionReweight,
    AttentionReweightOptions,
)
from reempathy.plugins.strategies.cotbs import CotbsOptions, CotbsStrategy
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy
from reempathy.plugins.strategies.sft import SftOptions, SftStrategy
from reempathy.speech.audio import write_wav

ROOT = Path(__file__).resolve().parents[1]


def tone(path: Path, seconds: float = 0.6, rate: int = 22050, channels: int = 1) -> Path:
    """A WAV of a quiet chord (a stand-in for speech; the tiny model only needs samples)."""
    t = torch.arange(int(seconds * rate)) / rate
    wave = 0.2 * torch.sin(2 * math.pi * 220 * t) + 0.1 * torch.sin(2 * math.pi * 330 * t)
    write_wav(path, wave, rate)
    return path


def write_config(tmp_path: Path, qwen_dir: Path, strategy: str = "sft", extra: str = "", **backbone) -> Path:
    options = {**QWEN_TEST_OPTIONS, **backbone}
    lines = ["[backbone]", 'name = "qwen2.5-omni"', f"path = {json.dumps(str(qwen_dir))}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    lines += ["[strategy]", f'name = "{strategy}"', "[sampling]", "greedy = true", "[decode]", "max_new_tokens = 8", extra]
    path = tmp_path / "qwen.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- loading ---------------------------------------------------------------------------------


def test_loads_the_thinker_as_the_decoder_with_a_text_only_stream_and_a_talker(qwen):
    assert isinstance(qwen.model, Qwen2_5OmniThinkerForConditionalGeneration)
    assert qwen.stream.text_only and qwen.layout.audio_count == 0
    assert qwen.talker is not None and qwen.reads_audio
    assert qwen.num_layers == 2 and qwen.num_heads == 4  # read from the thinker's text config


def test_stop_ids_come_from_generation_config(qwen):
    tok = qwen.tokenizer
    assert qwen.layout.stop_ids == (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>"))


def test_text_ids_end_before_the_first_special_token(qwen):
    assert qwen.layout.text_end == qwen.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert all(qwen.layout.is_text(i) for i in qwen.tokenizer.encode("I hear you.", add_special_tokens=False))


def test_delimiters_take_the_spare_rows_after_the_largest_id(qwen, qwen_dir):
    from transformers import AutoTokenizer

    largest = max(AutoTokenizer.from_pretrained(str(qwen_dir)).get_vocab().values())
    ids = [qwen.layout.token_id(name) for name in DELIMITER_TOKENS]
    assert ids == list(range(largest + 1, largest + 5))
    assert qwen.layout.vocab_size == int(json.loads((qwen_dir / "config.json").read_text())["thinker_config"]["text_config"]["vocab_size"])


def test_delimiters_grow_the_thinker_rows_when_none_are_spare(tmp_path):
    from qwen25omni_fixture import make_tiny_qwen25omni_dir

    directory = make_tiny_qwen25omni_dir(tmp_path / "ckpt", spare_rows=0)
    bb = load_qwen25omni(Qwen25OmniOptions(path=str(directory), talker=False))
    last = max(bb.layout.token_id(name) for name in DELIMITER_TOKENS)
    assert bb.layout.vocab_size == last + 1 == bb.model.get_output_embeddings().weight.shape[0]


def test_talker_false_loads_the_same_thinker_alone(qwen, qwen_dir, qwen_prompt):
    alone = load_qwen25omni(Qwen25OmniOptions(path=str(qwen_dir), talker=False))
    assert alone.talker is None
    with torch.inference_mode():
        a = alone.model(input_ids=torch.tensor([qwen_prompt])).logits
        b = qwen.model(input_ids=torch.tensor([qwen_prompt])).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- prompts ---------------------------------------------------------------------------------


def test_prompt_is_the_chat_template_with_the_published_system_prompt(qwen, qwen_prompt):
    text = qwen.tokenizer.decode(qwen_prompt)
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nI hear you. That sounds really hard.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_system_prompt_option_and_system_turn_replace_the_default(qwen, qwen_dir):
    own = qwen.build_prompt([Turn("system", text="Be brief."), Turn("user", text="Hi")])
    assert "Be brief." in qwen.tokenizer.decode(own) and DEFAULT_SYSTEM_PROMPT not in qwen.tokenizer.decode(own)
    none = load_qwen25omni(Qwen25OmniOptions(path=str(qwen_dir), talker=False, system_prompt=""))
    # no system message of ours: the template writes its own default
    assert none.tokenizer.decode(none.build_prompt([Turn("user", text="Hi")])).startswith(
        "<|im_start|>system\nYou are a helpful assistant."
    )


def test_special_token_text_in_a_turn_is_refused(qwen):
    with pytest.raises(InputError, match="special token '<\\|im_end\\|>'"):
        qwen.build_prompt([Turn("user", text="hi<|im_end|> there")])


def test_speech_units_are_refused_with_a_clear_error(qwen):
    with pytest.raises(InputError, match="no audio-unit tokens"):
        qwen.build_prompt([Turn("user", units=[1, 2, 3])])


def test_audio_prompt_reads_the_wav_through_the_feature_extractor(qwen, qwen_dir, tmp_path):
    wav = tone(tmp_path / "in.wav", seconds=0.7, rate=22050)
    inputs = qwen.build_prompt_inputs([Turn("user", audio=str(wav))])
    fe = WhisperFeatureExtractor.from_pretrained(str(qwen_dir))
    import torchaudio.functional as F

    from reempathy.speech.audio import read_wav

    wave = F.resample(torch.from_numpy(read_wav(wav).samples).mean(0)[None], 22050, 16000)[0].numpy()
    ref = fe([wave], sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
    frames = int(ref["attention_mask"].sum())
    audio_id = qwen.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert inputs.ids.count(audio_id) == audio_token_count(frames) == ((frames - 1) // 2 + 1 - 2) // 2 + 1
    torch.testing.assert_close(inputs.prefill_inputs["input_features"], ref["input_features"])
    assert torch.equal(inputs.prefill_inputs["feature_attention_mask"], ref["attention_mask"])
    with pytest.raises(InputError, match="build_prompt_inputs"):
        qwen.build_prompt([Turn("user", audio=str(wav))])  # ids alone would decode without the audio


def test_audio_prompt_decodes_as_thinker_generate_reads_it(qwen, tmp_path):
    inputs = qwen.build_prompt_inputs([Turn("user", audio=str(tone(tmp_path / "in.wav")), text="Listen.")])
    r = decode(qwen, inputs.ids, SftStrategy(SftOptions(), qwen), [], LoopOptions(max_new_tokens=6, greedy=True),
               prefill_inputs=inputs.prefill_inputs)
    ids = torch.tensor([inputs.ids])
    with torch.inference_mode():
        out = qwen.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                  eos_token_id=list(qwen.layout.stop_ids), **inputs.prefill_inputs)
    assert r.ids == out[0, len(inputs.ids):].tolist()


def test_audio_longer_than_the_feature_window_is_refused(qwen, tmp_path):
    wav = tone(tmp_path / "long.wav", seconds=2.5)  # the tiny feature extractor takes 2 s
    with pytest.raises(InputError, match="long.wav.*2.5 s long"):
        qwen.build_prompt_inputs([Turn("user", audio=str(wav))])


# --- decoding: the must-show equality and every strategy --------------------------------------


def test_sft_greedy_tokens_equal_thinker_generate(qwen, qwen_prompt):
    r = decode(qwen, qwen_prompt, SftStrategy(SftOptions(), qwen), [], LoopOptions(max_new_tokens=12, greedy=True))
    ids = torch.tensor([qwen_prompt])
    with torch.inference_mode():
        out = qwen.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                  do_sample=False, eos_token_id=list(qwen.layout.stop_ids))
    assert r.ids == out[0, len(qwen_prompt):].tolist()
    assert r.audio_units == [] and all(label != SPOKEN_AUDIO for label in (s["label"] for s in r.spans))


def test_decode_after_generate_is_not_thrown_by_the_thinkers_remembered_rope_deltas(qwen, qwen_prompt):
    def ours():
        return decode(qwen, qwen_prompt, SftStrategy(SftOptions(), qwen), [], LoopOptions(max_new_tokens=6, greedy=True)).ids

    before = ours()
    qwen.model.model.rope_deltas = torch.full((4, 1), 7)  # what a 4-row training batch with other positions leaves
    assert ours() == before


def test_reempathy_on_a_text_only_stream_alternates_n_text_tokens_and_reflections(qwen, qwen_prompt):
    strategy = ReEmpathyStrategy(ReEmpathyOptions(text_tokens=3, max_reflection_tokens=4), qwen)
    r = decode(qwen, qwen_prompt, strategy, [NoStop(qwen)], LoopOptions(max_new_tokens=30, seed=1))
    assert r.extra["chunk_layout"] == {"text_tokens": 3, "audio_tokens": 0}
    assert [len(c.text_ids) for c in r.chunks[:-1]] == [3] * (len(r.chunks) - 1) and r.hidden
    for chunk, reflection in zip(r.chunks, r.hidden):
        opener = r.ids[chunk.end - len(qwen_prompt)]
        assert opener == qwen.layout.token_id(REFLECTION_OPEN) and reflection.start == chunk.end + 1
    assert all(c.audio_units == [] for c in r.chunks)


@pytest.mark.parametrize("name", ["sft", "cotbs", "reempathy"])
def test_every_strategy_runs_from_its_shipped_config(qwen_dir, capsys, name):
    config = ROOT / "configs" / f"qwen2.5-omni-{name}.toml"
    overrides = [f"backbone.path={json.dumps(str(qwen_dir))}", "backbone.talker=false"]
    argv = ["decode", "--config", str(config), "--json", "--max-new-tokens", "16", "--seed", "1"]
    code = main(argv + [arg for o in overrides for arg in ("--set", o)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["backbone"] == "qwen2.5-omni" and out["strategy"] == name
    assert out["counts"]["generated"] >= 1 and out["spoken"]["audio_units"] == []


def test_audio_tokens_must_fit_the_backbones_stream(qwen, tiny):
    with pytest.raises(ConfigError, match="'audio_tokens' = 10.*speaks text only"):
        ReEmpathyStrategy(ReEmpathyOptions(audio_tokens=10), qwen)
    with pytest.raises(ConfigError, match="'audio_tokens' = 0.*interleaves 13 text and 26 audio"):
        ReEmpathyStrategy(ReEmpathyOptions(audio_tokens=0), tiny)
    assert ReEmpathyStrategy(ReEmpathyOptions(), tiny).layout.audio_tokens == 10  # defaults follow the stream
    assert ReEmpathyStrategy(ReEmpathyOptions(), qwen).layout.audio_tokens == 0


def test_cotbs_thought_is_hidden_and_the_answer_is_text(qwen, qwen_prompt):
    r = decode(qwen, qwen_prompt, CotbsStrategy(CotbsOptions(max_thought_tokens=4), qwen), [NoStop(qwen)],
               LoopOptions(max_new_tokens=10, seed=3))
    assert r.hidden[0].kind == "thought" and len(r.hidden[0].ids) <= 4
    assert r.spoken_text_ids and all(qwen.layout.is_text(i) for i in r.spoken_text_ids)


# --- attention reweighting against an eager reference on the thinker --------------------------

_TARGETS: dict[int, list[tuple[int, int, int, float]]] = {}
REF = "reempathy_test_qwen_reference"


def _reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager softmax over the causal keys; each query row's target keys × α; renormalised."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    scores = (query @ key.transpose(-1, -2)) * scaling
    q_len, k_len = scores.shape[-2:]
    visible = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    for row, start, end, alpha in _TARGETS.get(getattr(module, "layer_idx", -1), []):
        weights[:, :, row, start:end] *= alpha
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights @ value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(REF, _reference)


class PlanSpy(AttentionReweight):
    """The real processor, recording each plan with the first query position it holds for, and the logits."""

    def __init__(self, options, backbone):
        super().__init__(options, backbone)
        self.plans, self.logits = [], []

    @hookimpl
    def reempathy_attention_plan(self, session):
        plan = super().reempathy_attention_plan(session)
        self.plans.append((session.forwarded, plan))
        return plan

    @hookimpl
    def reempathy_logits(self, session, logits):
        self.logits.append((len(session.ids) - 1, logits.clone()))


def test_reweighting_on_the_thinker_matches_an_eager_reference(qwen, qwen_prompt):
    alpha = 1.6
    spy = PlanSpy(AttentionReweightOptions(factor=alpha, layers=[1]), qwen)
    strategy = ReEmpathyStrategy(ReEmpathyOptions(text_tokens=3, max_reflection_tokens=3), qwen)
    r = decode(qwen, qwen_prompt, strategy, [NoStop(qwen), spy], LoopOptions(max_new_tokens=20, seed=4))
    seq = qwen_prompt + r.ids
    _TARGETS.clear()
    for row in range(len(seq)):
        active = [plan for start, plan in spy.plans if start <= row]
        plan = active[-1] if active else None
        for layer, biases in (plan or {}).items():
            _TARGETS.setdefault(layer, []).extend((row, b.start, b.end, math.exp(b.bias)) for b in biases)
    assert _TARGETS, "the decode should have planned biases"
    model = qwen.model
    before = model.config.get_text_config(decoder=True)._attn_implementation

    def reference_logits():
        model.set_attn_implementation(REF)
        try:
            with torch.inference_mode():
                return model(input_ids=torch.tensor([seq])).logits[0].float()
        finally:
            model.set_attn_implementation(before)

    ref = reference_logits()
    for pos, logits in spy.logits:
        finite = torch.isfinite(logits)
        torch.testing.assert_close(logits[finite], ref[pos][finite], atol=5e-5, rtol=0)
    _TARGETS.clear()
    plain = reference_logits()
    assert (plain[len(qwen_prompt):] - ref[len(qwen_prompt):]).abs().max() > 1e-2  # the bias mattered


# --- training builders and LoRA on the thinker ------------------------------------------------


def record(answer: str, assessment: str = "The user feels alone; name it and stay warm."):
    from reempathy.data.records import SourcedRecord
    from reempathy.data.schema import Record

    rec = Record.model_validate({
        "messages": [{"role": "user", "text": "I feel alone.", "units": [1, 2, 3]},
                     {"role": "assistant", "text": answer, "units": [4, 5]}],
        "assessment": {"text": assessment},
    })
    return SourcedRecord("data.jsonl:1", rec)


def test_builders_lay_out_text_only_answers_as_the_strategy_decodes_them(qwen):
    from reempathy.decoding.chunking import ChunkLayout
    from reempathy.training.builders import (
        ReempathyBuild,
        build_reempathy,
        build_sft,
        encode_text,
        prompt_ids,
    )
    from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy
    from reempathy.training.reference import teacher_forced_sequence

    sr = record("I hear you. That sounds really hard, and it makes sense.")
    prompt = prompt_ids(sr, qwen)
    assert "I feel alone." in qwen.tokenizer.decode(prompt)  # read as text: units cannot be heard here
    text = encode_text(qwen, sr.record.messages[-1].text, "", "")
    sft = build_sft(sr, qwen)
    assert sft.input_ids == prompt + text + [qwen.layout.stop_ids[0]]
    assert set(sft.spans[len(prompt):-1]) == {SPOKEN_TEXT}
    seq = build_reempathy(sr, qwen, ReempathyBuild(text_tokens=4))
    full = len(text) // 4
    pieces = [seq.input_ids[i + 1 : j] for i, j in zip(
        [k for k, t in enumerate(seq.input_ids) if t == qwen.layout.token_id(REFLECTION_OPEN)],
        [k for k, t in enumerate(seq.input_ids) if t == qwen.layout.token_id(REFLECTION_CLOSE)])]
    # teacher forcing through the real loop and strategy: the decoder writes the training sequence
    strategy = ReEmpathyStrategy(ReEmpathyOptions(text_tokens=4, max_reflection_tokens=1000), qwen)
    assert strategy.layout == ChunkLayout(4, 0)
    assert len(pieces) == full
    assert teacher_forced_sequence(qwen, seq.prompt_len, seq.input_ids, strategy) == seq.input_ids


def test_text_only_answers_need_their_text(qwen):
    from reempathy.training.builders import build_sft
    from reempathy.data.records import SourcedRecord
    from reempathy.data.schema import Record

    rec = Record.model_validate({"messages": [{"role": "user", "text": "hi"}, {"role": "assistant", "units": [4, 5]}]})
    with pytest.raises(InputError, match="no text.*speaks text only"):
        build_sft(SourcedRecord("data.jsonl:3", rec), qwen)


def test_lora_on_the_thinker_trains_the_delimiters_and_decodes_from_the_checkpoint(tmp_path, qwen_dir):
    from reempathy.checkpoints import apply_checkpoint
    from reempathy.training.config import load_train_config
    from reempathy.training.train import train

    data = tmp_path / "data.jsonl"
    rows = [record(f"I hear you. That sounds really hard, friend number {i}.").record.model_dump(exclude_none=True)
            for i in range(2)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    backbone = {"name": "qwen2.5-omni", "path": str(qwen_dir), "talker": False}
    cfg = load_train_config(None, data={
        "backbone": backbone, "strategy": {"name": "reempathy", "text_tokens": 4},
        "data": {"path": str(data)},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "learning_rate": 5e-2, "batch_size": 2,
                  "save_steps": 2, "logging_steps": 1},
    })
    result = train(cfg, progress=False)
    assert result.manifest.chunk_layout.text_tokens == 4 and result.manifest.chunk_layout.audio_tokens == 0
    base = load_qwen25omni(Qwen25OmniOptions(path=str(qwen_dir), talker=False))
    before = base.model.get_input_embeddings().weight.detach().clone()
    tuned = apply_checkpoint(base, result.output_dir)
    after = tuned.model.get_input_embeddings().weight.detach()
    changed = set(torch.nonzero((after - before).abs().sum(-1) > 0).flatten().tolist())
    assert changed == {base.layout.token_id(REFLECTION_OPEN), base.layout.token_id(REFLECTION_CLOSE)}
    prompt = tuned.build_prompt([Turn("user", text="I feel alone.")])
    r = decode(tuned, prompt, ReEmpathyStrategy(ReEmpathyOptions(text_tokens=4), tuned), [NoStop(tuned)],
               LoopOptions(max_new_tokens=8, greedy=True))
    assert r.counts.generated == 8


# --- bad input: one line, exit status 2 -------------------------------------------------------


def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_a_directory_of_another_model_type_is_a_one_line_error(tmp_path, qwen_dir, capsys, tiny):
    other = tmp_path / "glm"
    tiny.model.save_pretrained(other)
    err = _one_line_error(capsys, ["decode", "--config", str(write_config(tmp_path, other)), "--prompt", "hi"])
    assert "model_type 'glm'" in err and "qwen2_5_omni" in err


def test_missing_weights_are_a_one_line_error(tmp_path, qwen_dir, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(qwen_dir, broken)
    (broken / "model.safetensors").unlink()
    err = _one_line_error(capsys, ["decode", "--config", str(write_config(tmp_path, broken)), "--prompt", "hi"])
    assert "no weights" in err or "model.safetensors" in err


def test_a_wav_that_cannot_be_read_is_a_one_line_error(tmp_path, qwen_dir, capsys):
    bad = tmp_path / "notes.wav"
    bad.write_text("not a recording\n")
    cfg = write_config(tmp_path, qwen_dir, talker=False)
    err = _one_line_error(capsys, ["decode", "--config", str(cfg), "--audio", str(bad)])
    assert "notes.wav" in err and "WAV" in err


# --- what a checkpoint pins, and what a user may change after training -----------------------


@pytest.fixture(scope="module")
def text_only_checkpoint(tmp_path_factory, qwen_dir) -> Path:
    """A checkpoint trained on the command line with talker = false, as docs/backbones-qwen2.5-omni.md recommends."""
    tmp = tmp_path_factory.mktemp("qwen-text-only")
    data = tmp / "data.jsonl"
    rows = [record(f"I hear you, friend {i}.").record.model_dump(exclude_none=True) for i in range(2)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    cfg = tmp / "train.toml"
    cfg.write_text(
        f'[backbone]\nname = "qwen2.5-omni"\npath = {json.dumps(str(qwen_dir))}\ntalker = false\n'
        f'[strategy]\nname = "sft"\n[data]\npath = {json.dumps(str(data))}\n'
        f'[train]\noutput_dir = {json.dumps(str(tmp / "ck"))}\nmax_steps = 1\nbatch_size = 2\nsave_steps = 1\n',
        encoding="utf-8",
    )
    assert main(["train", "--config", str(cfg), "--quiet"]) == 0
    return tmp / "ck"


def test_a_checkpoint_trained_without_the_talker_speaks_with_it(tmp_path, qwen_dir, text_only_checkpoint, capsys):
    cfg = write_config(tmp_path, qwen_dir, talker=True, talker_speaker="Chelsie")
    out = tmp_path / "o.wav"
    wav = tone(tmp_path / "in.wav", rate=16000)
    capsys.readouterr()
    code = main(["decode", "--config", str(cfg), "--checkpoint", str(text_only_checkpoint),
                 "--audio", str(wav), "--out", str(out), "--json"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["extra"]["speech"]["codec_tokens"] > 0 and out.stat().st_size > 44


def test_a_checkpoint_decodes_from_a_moved_model_directory(tmp_path, qwen_dir, text_only_checkpoint, capsys):
    moved = tmp_path / "elsewhere"
    shutil.copytree(qwen_dir, moved)
    cfg = write_config(tmp_path, moved, talker=False)
    capsys.readouterr()
    code = main(["decode", "--config", str(cfg), "--checkpoint", str(text_only_checkpoint), "--prompt", "hi", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["backbone"] == "qwen2.5-omni"


def test_the_system_prompt_a_checkpoint_was_trained_with_is_pinned(tmp_path, qwen_dir, text_only_checkpoint, capsys):
    # Training writes the system prompt into every sequence, so the adapter learnt it: not a runtime option.
    cfg = write_config(tmp_path, qwen_dir, talker=False, system_prompt="Be brief.")
    err = _one_line_error(capsys, ["decode", "--config", str(cfg), "--checkpoint", str(text_only_checkpoint), "--prompt", "hi"])
    assert "system_prompt" in err and "drop backbone.system_prompt" in err


@pytest.mark.parametrize(
    "override, key",
    [
        ('backbone.talker="yes"', "talker"),
        ("backbone.talker_top_k=true", "talker_top_k"),
        ("backbone.talker_temperature=inf", "talker_temperature"),
        (f"backbone.talker_max_new_tokens={2**63}", "talker_max_new_tokens"),
        (f"backbone.token2wav_steps={10**12}", "token2wav_steps"),
        ("backbone.talker_repetition_penalty=1e-300", "talker_repetition_penalty"),
        ("backbone.talker_top_p=0.0", "talker_top_p"),
        ('backbone.device="gpu"', "device"),
    ],
)
def test_loose_or_unbounded_backbone_options_are_one_line_config_errors(tmp_path, qwen_dir, capsys, override, key):
    cfg = write_config(tmp_path, qwen_dir, talker=False)
    err = _one_line_error(capsys, ["decode", "--config", str(cfg), "--set", override, "--prompt", "hi"])
    assert key in err


def test_a_wav_at_an_odd_rate_is_resampled_at_a_nearby_small_ratio(tmp_path):
    from reempathy.backbones.qwen25omni.prompt import read_mono_16k

    # 44101 Hz reduces to 44101:16000, which torchaudio would build a kernel of about 10 GB for.
    wave = read_mono_16k(str(tone(tmp_path / "odd.wav", seconds=0.5, rate=44101)), 16000, 30.0)
    assert wave.dtype == np.float32 and abs(wave.shape[0] - 8000) <= 1


def test_an_error_after_loading_is_the_only_stderr_line(tmp_path, qwen_dir, capsys):
    cfg = write_config(tmp_path, qwen_dir, talker=False)
    capsys.readouterr()
    code = main(["decode", "--config", str(cfg), "--prompt", "hi <|im_end|>"])  # refused after the load
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("reempathy: error: ") and "<|im_end|>" in err, err
