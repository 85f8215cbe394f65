"""Speech out of qwen2.5-omni: the talker fed the spoken positions' thinker states only, then token2wav.

Equal to transformers' own Qwen2_5OmniForConditionalGeneration.generate() when nothing is hidden;
with reflections, the talker's input holds no hidden position and equals what transformers'
talker would read for the spoken positions alone; streaming gates the talker on completed chunks.
"""

from __future__ import annotations

import json
import math
import wave as wavelib
from pathlib import Path

import pytest
import torch
from helpers import NoStop
from qwen25omni_fixture import QWEN_TEST_OPTIONS
from transformers import Qwen2_5OmniForConditionalGeneration

from reempathy.backbones.qwen25omni import Qwen25OmniOptions, load_qwen25omni
from reempathy.cli import main
from reempathy.config import load_config
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.registry import default_discovery
from reempathy.decoding.spans import SPOKEN_TEXT
from reempathy.hooks import hookimpl
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy
from reempathy.plugins.strategies.sft import SftOptions, SftStrategy
from reempathy.speech.audio import write_wav
from reempathy.streaming import (
    AudioEvent,
    DoneEvent,
    ReflectionEvent,
    run_spoken_turn,
    stream_spoken_turn,
)

SEED = 7


@pytest.fixture(scope="module")
def reference(qwen_dir):
    """transformers' own whole model, loaded plainly from the same directory."""
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return Qwen2_5OmniForConditionalGeneration.from_pretrained(str(qwen_dir)).eval()
    finally:
        logging.set_verbosity(before)


def spoken_turn(backbone, prompt, strategy, processors=(), max_new_tokens=8, seed=SEED):
    """Decode with the talker observing; returns the result, the turn and the waveform."""
    turn = backbone.talker.turn(seed)
    with turn:
        result = decode(backbone, prompt, strategy, [*processors, turn], LoopOptions(max_new_tokens=max_new_tokens, greedy=True))
    return result, turn, turn.finish()


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy talker", "sampled talker"])
def test_sft_speech_equals_transformers_generate(qwen, qwen_dir, qwen_prompt, reference, greedy):
    backbone = qwen if greedy else load_qwen25omni(
        Qwen25OmniOptions(path=str(qwen_dir), **{**QWEN_TEST_OPTIONS, "talker_greedy": False})
    )
    result, turn, wave = spoken_turn(backbone, qwen_prompt, SftStrategy(SftOptions(), backbone))
    talker = reference.talker
    ids = torch.tensor([qwen_prompt])
    torch.manual_seed(SEED)
    sequences, ref_wave = reference.generate(
        ids, attention_mask=torch.ones_like(ids), speaker="Chelsie",
        thinker_max_new_tokens=8, thinker_do_sample=False, thinker_eos_token_id=list(qwen.layout.stop_ids),
        talker_do_sample=not greedy, talker_max_new_tokens=QWEN_TEST_OPTIONS["talker_max_new_tokens"],
        # the published ids of codec pad and end, which generate() defaults to ([8292, 8294]), in the tiny config
        talker_eos_token_id=[talker.codec_pad_token, talker.codec_eos_token],
        token2wav_num_steps=QWEN_TEST_OPTIONS["token2wav_steps"],
    )  # fmt: skip
    assert result.ids == sequences[0, len(qwen_prompt):].tolist()
    assert turn.codes and len(wave) > 0
    assert torch.equal(wave, ref_wave)


def test_the_talker_starts_from_the_prompt_rows_and_ends_with_eos_then_pad_rows(qwen, qwen_prompt):
    result, turn, _ = spoken_turn(qwen, qwen_prompt, SftStrategy(SftOptions(), qwen), max_new_tokens=6)
    inputs = turn.inputs
    speaker = qwen.talker.speakers["Chelsie"]["bos_token"]
    assert inputs.text_ids == qwen_prompt + [speaker, result.ids[0]]
    assert inputs.prefill_embeds.shape[0] == len(qwen_prompt) + 2
    # every spoken token but the last (appended at the budget, never through the thinker), then eos, then pad
    # for every later step — as far as the talker read before its own end
    expected = list(range(len(qwen_prompt) + 1, len(qwen_prompt) + 5)) + ["eos"] + ["pad"] * 20
    assert inputs.reply_positions == expected[: len(inputs.reply_positions)]
    # one row per codec token after the first; the talker stops at its own end or at its budget
    budget = QWEN_TEST_OPTIONS["talker_max_new_tokens"]
    assert len(inputs.reply_positions) == (budget - 1 if len(turn.codes) == budget else len(turn.codes))


def _full_rows(backbone, seq):
    """Each position's row from one uncached thinker forward: last-layer state + input embedding."""
    with torch.inference_mode():
        out = backbone.model(input_ids=torch.tensor([seq]), output_hidden_states=True)
        return out.hidden_states[-1][0] + backbone.model.get_input_embeddings()(torch.tensor(seq))


def test_reempathy_talker_reads_no_hidden_position(qwen, qwen_prompt):
    strategy = ReEmpathyStrategy(ReEmpathyOptions(text_tokens=3, max_reflection_tokens=3), qwen)
    result, turn, _ = spoken_turn(qwen, qwen_prompt, strategy, [NoStop(qwen)], max_new_tokens=16)
    seq = qwen_prompt + result.ids
    assert result.hidden, "the answer should hold reflections"
    spoken = [p for p in range(len(qwen_prompt), len(seq)) if result.spans and _label(result, p) == SPOKEN_TEXT]
    forwarded = result.counts.forwarded
    fed = [turn.inputs.first_position] + [p for p in turn.inputs.reply_positions if isinstance(p, int)]
    assert fed == [p for p in spoken if p < forwarded]
    hidden = {p for h in result.hidden for p in range(h.start - 1, min(h.end + 1, len(seq)))}  # with delimiters
    assert hidden and not hidden & set(fed)
    # checked on the tensors the talker read: each is its spoken position's row, none a hidden row's
    rows = _full_rows(qwen, seq)
    read = torch.stack([turn.inputs.prefill_embeds[-1]] + [r for p, r in zip(turn.inputs.reply_positions, turn.inputs.reply_rows) if isinstance(p, int)])
    torch.testing.assert_close(read, rows[fed], atol=2e-5, rtol=0)
    distance = torch.cdist(read, rows[sorted(hidden)]).min()
    assert distance > 1e-2


def _label(result, position):
    for span in result.spans:
        if span["start"] <= position < span["end"]:
            return span["label"]
    return None


def test_reempathy_speech_equals_transformers_talker_on_the_spoken_rows_alone(qwen, qwen_prompt, reference):
    strategy = ReEmpathyStrategy(ReEmpathyOptions(text_tokens=3, max_reflection_tokens=3), qwen)
    result, turn, wave = spoken_turn(qwen, qwen_prompt, strategy, [NoStop(qwen)], max_new_tokens=16)
    seq = qwen_prompt + result.ids
    fed = [turn.inputs.first_position] + [p for p in turn.inputs.reply_positions if isinstance(p, int)]
    # transformers' talker input for an answer made of these spoken tokens only, built as its generate() builds it
    rows = _full_rows(qwen, seq)
    talker, embed = reference.talker, reference.thinker.get_input_embeddings()
    speaker = reference.speaker_map["Chelsie"]
    prompt_rows = rows[: len(qwen_prompt)]
    bos = embed(torch.tensor([speaker["bos_token"]]))
    tail = embed(torch.tensor([talker.text_eos_token, talker.text_pad_token]))
    with torch.inference_mode():
        codes = talker.generate(
            input_ids=torch.tensor([[talker.codec_mask_token] * len(qwen_prompt) + [talker.codec_pad_token, talker.codec_bos_token]]),
            input_text_ids=torch.tensor([qwen_prompt + [speaker["bos_token"], seq[fed[0]]]]),
            inputs_embeds=torch.cat([prompt_rows, bos, rows[fed[:1]]])[None],
            thinker_reply_part=torch.cat([rows[fed[1:]], tail])[None],
            suppress_tokens=[talker.codec_bos_token], eos_token_id=[talker.codec_pad_token, talker.codec_eos_token],
            do_sample=False, repetition_penalty=1.05, max_new_tokens=QWEN_TEST_OPTIONS["talker_max_new_tokens"],
        )[0, len(qwen_prompt) + 2:].tolist()  # fmt: skip
        codes = [c for c in codes[: next((i for i, c in enumerate(codes) if c in (talker.codec_pad_token, talker.codec_eos_token)), len(codes))]]
        torch.manual_seed(SEED)  # a greedy talker draws nothing: token2wav's noise starts from the seed
        ref_wave = reference.token2wav(torch.tensor([codes]), conditioning=speaker["cond"].float(),
                                       reference_mel=speaker["ref_mel"].float(),
                                       num_steps=QWEN_TEST_OPTIONS["token2wav_steps"]).reshape(-1)
    assert codes and turn.codes == codes
    assert wave.shape == ref_wave.shape and torch.allclose(wave, ref_wave, atol=1e-5)
    # the audio is exactly token2wav's length for these codes: the reflections add nothing to hear
    t2w = reference.config.token2wav_config
    per_code = t2w.dit_config.repeats * math.prod(t2w.bigvgan_config.upsample_rates)
    assert len(wave) == len(codes) * per_code


class Consumer:
    """Plays the streaming consumer in the decoding thread: advances the talker at every step, noting when."""

    def __init__(self, turn):
        self.turn = turn
        self.steps_at: list[tuple[int, int]] = []  # (tokens generated, talker rows read so far)

    @hookimpl
    def reempathy_logits(self, session, logits):
        self.turn.advance()
        self.steps_at.append((session.generated, len(self.turn.inputs.reply_rows)))


def test_the_talker_is_gated_on_completed_spoken_chunks_and_ends_as_a_whole_answer_run(qwen, qwen_prompt):
    def strategy():
        return ReEmpathyStrategy(ReEmpathyOptions(text_tokens=3, max_reflection_tokens=3), qwen)

    turn = qwen.talker.turn(SEED)
    consumer = Consumer(turn)
    with turn:
        result = decode(qwen, qwen_prompt, strategy(), [NoStop(qwen), turn, consumer], LoopOptions(max_new_tokens=16, greedy=True))
    streamed = turn.finish()
    # rows reach the talker one completed spoken chunk at a time, and while the answer is still being decoded
    chunk_positions = [[p for p in range(c.start, c.end)] for c in result.chunks]
    assert turn.released[0] == chunk_positions[0] and turn.released[1] == chunk_positions[1]
    assert any(rows > 0 for generated, rows in consumer.steps_at if generated < result.counts.generated)
    # no end-of-text or pad row before the answer ended
    before_end = [p for p in turn.inputs.reply_positions[: consumer.steps_at[-1][1]]]
    assert "eos" not in before_end and "pad" not in before_end
    _, offline, wave = spoken_turn(qwen, qwen_prompt, strategy(), [NoStop(qwen)], max_new_tokens=16)
    assert turn.codes == offline.codes and torch.equal(streamed, wave)


# --- the speech pipeline and the CLI -----------------------------------------------------------


def tone(path: Path, seconds: float = 0.6, rate: int = 16000) -> Path:
    t = torch.arange(int(seconds * rate)) / rate
    write_wav(path, 0.2 * torch.sin(2 * math.pi * 220 * t), rate)
    return path


def speech_config(tmp_path: Path, qwen_dir: Path, reweight: bool = False, **backbone):
    options = {**QWEN_TEST_OPTIONS, **backbone}
    lines = ["[backbone]", 'name = "qwen2.5-omni"', f"path = {json.dumps(str(qwen_dir))}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
    lines += ["[strategy]", 'name = "reempathy"', "text_tokens = 3", "max_reflection_tokens = 3",
              "[sampling]", "greedy = true", "[decode]", "max_new_tokens = 12"]  # fmt: skip
    if reweight:
        lines += ["[[processors]]", 'name = "attention-reweight"', "factor = 1.5"]
    path = tmp_path / "qwen-speech.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_stream_spoken_turn_yields_text_reflections_and_the_same_audio_as_the_offline_turn(tmp_path, qwen_dir, qwen):
    registry = default_discovery().registry
    cfg = load_config(speech_config(tmp_path, qwen_dir), [], None, registry)
    wav = tone(tmp_path / "in.wav")
    offline = run_spoken_turn(cfg, registry, str(wav), str(tmp_path / "offline.wav"), backbone=qwen, seed=SEED)
    events = list(stream_spoken_turn(cfg, registry, str(wav), out_path=str(tmp_path / "streamed.wav"), backbone=qwen, seed=SEED))
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.result.ids == offline.ids
    assert any(isinstance(e, ReflectionEvent) for e in events)
    audio = [e for e in events if isinstance(e, AudioEvent)]
    assert len(audio) == 1 and audio[0].sample_rate == 24000
    assert (tmp_path / "offline.wav").read_bytes() == (tmp_path / "streamed.wav").read_bytes()
    assert done.result.extra["speech"]["codec_tokens"] == offline.extra["speech"]["codec_tokens"] > 0


def test_decode_audio_in_wav_out_on_the_command_line(tmp_path, qwen_dir, capsys):
    cfg = speech_config(tmp_path, qwen_dir, reweight=True)
    out = tmp_path / "answer.wav"
    code = main(["decode", "--config", str(cfg), "--audio", str(tone(tmp_path / "in.wav")), "--out", str(out), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["backbone"] == "qwen2.5-omni" and data["hidden"]
    with wavelib.open(str(out)) as f:
        assert f.getframerate() == 24000 and f.getnframes() == round(data["extra"]["speech"]["audio_s"] * 24000) > 0


def test_writing_speech_without_the_talker_is_a_one_line_error(tmp_path, qwen_dir, capsys):
    cfg = speech_config(tmp_path, qwen_dir, talker=False)
    out = tmp_path / "answer.wav"
    capsys.readouterr()
    code = main(["decode", "--config", str(cfg), "--audio", str(tone(tmp_path / "in.wav")), "--out", str(out)])
    err = capsys.readouterr().err.splitlines()  # no loading bar before it: exactly one line
    assert code == 2 and len(err) == 1 and err[0].startswith("reempathy: error: ") and "talker = true" in err[0]
    assert not out.exists()
