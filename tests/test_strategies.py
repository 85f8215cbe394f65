"""Strategies cotbs and reempathy on the tiny backbone: chunk layout, delimiters, hidden traces, rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reempathy.backbones.base import REFLECTION_CLOSE, REFLECTION_OPEN, THOUGHT_CLOSE, THOUGHT_OPEN
from reempathy.cli import main
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.hooks import hookimpl

from helpers import NoStop
from reempathy.plugins.strategies.cotbs import CotbsOptions, CotbsStrategy
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy

ROOT = Path(__file__).resolve().parents[1]




def _reempathy(tiny, prompt, n=120, seed=0, procs=(), **opts):
    strategy = ReEmpathyStrategy(ReEmpathyOptions(**opts), tiny)
    return decode(tiny, prompt, strategy, [NoStop(tiny), *procs], LoopOptions(max_new_tokens=n, seed=seed))


def _walk(tiny, ids):
    """Split generated ids into ('spoken', [...]) and ('reflection', [...]) runs at the delimiters."""
    bor, eor = tiny.layout.special[REFLECTION_OPEN], tiny.layout.special[REFLECTION_CLOSE]
    runs, cur, kind = [], [], "spoken"
    for t in ids:
        if t == bor:
            runs.append((kind, cur))
            cur, kind = [], "reflection"
        elif t == eor:
            runs.append((kind, cur))
            cur, kind = [], "spoken"
        else:
            cur.append(t)
    runs.append((kind, cur))
    return runs


@pytest.mark.parametrize("text_tokens,audio_tokens", [(5, 10), (3, 6), (7, 14)])
def test_reempathy_output_has_exactly_the_configured_chunk_layout(tiny, tiny_prompt, text_tokens, audio_tokens):
    r = _reempathy(tiny, tiny_prompt, n=150, text_tokens=text_tokens, audio_tokens=audio_tokens, max_reflection_tokens=6)
    runs = _walk(tiny, r.ids)
    layout = tiny.layout
    size = text_tokens + audio_tokens
    kinds = [k for k, _ in runs]
    assert kinds[:4] == ["spoken", "reflection", "spoken", "reflection"]
    text_done = False
    for kind, toks in runs[:-1]:
        if kind == "spoken":
            assert len(toks) == size
            n_text = sum(layout.is_text(t) for t in toks)
            assert all(layout.is_text(t) for t in toks[:n_text]), "text slots come first"
            assert all(layout.is_audio(t) for t in toks[n_text:])
            if text_done:
                assert n_text == 0
            else:
                assert n_text <= text_tokens
                text_done = n_text < text_tokens
        else:
            assert 1 <= len(toks) <= 6 and all(layout.is_text(t) for t in toks)


def test_reempathy_result_keeps_spoken_stream_and_reflection_trace_apart(tiny, tiny_prompt):
    r = _reempathy(tiny, tiny_prompt, n=100, max_reflection_tokens=5)
    reflection_ids = {i for h in r.hidden for i in h.ids}
    assert [h.kind for h in r.hidden] == ["reflection"] * len(r.hidden) and r.hidden
    assert [h.index for h in r.hidden] == list(range(1, len(r.hidden) + 1))
    spoken_positions = [s for s in r.spans if s["label"] in ("spoken_text", "spoken_audio")]
    hidden_positions = {p for h in r.hidden for p in range(h.start, h.end)}
    assert all(not hidden_positions & set(range(s["start"], s["end"])) for s in spoken_positions)
    assert sum(len(c.text_ids) + len(c.audio_units) for c in r.chunks) == sum(
        s["end"] - s["start"] for s in spoken_positions
    )
    delims = {tiny.layout.special[REFLECTION_OPEN], tiny.layout.special[REFLECTION_CLOSE]}
    assert not delims & set(r.spoken_text_ids)
    assert reflection_ids  # reflections hold text tokens


def test_reflect_false_gives_the_same_spoken_chunking_and_no_reflections(tiny, tiny_prompt):
    r = _reempathy(tiny, tiny_prompt, n=60, reflect=False)
    delims = {tiny.layout.special[REFLECTION_OPEN], tiny.layout.special[REFLECTION_CLOSE]}
    assert not delims & set(r.ids)
    assert r.hidden == [] and r.counts.forced == 0
    assert [len(c.text_ids) + len(c.audio_units) for c in r.chunks] == [15, 15, 15, 15]


class AudioAt:
    """Forces an audio token at the given sampled-token steps (the model 'finishes its text')."""

    def __init__(self, backbone, steps):
        self.audio = backbone.layout.audio_offset
        self.steps = set(steps)

    @hookimpl
    def reempathy_logits(self, session, logits):
        if session.generated in self.steps:
            logits.fill_(float("-inf"))
            logits[self.audio] = 0.0


class TextWhereAllowed:
    """Prefers text whenever text is allowed, so only AudioAt can end the text."""

    def __init__(self, backbone):
        self.text_end = backbone.layout.text_end

    @hookimpl(trylast=True)
    def reempathy_logits(self, session, logits):
        if logits[: self.text_end].isfinite().any():
            logits[self.text_end :] = float("-inf")


def test_audio_in_a_text_slot_finishes_the_text_and_later_chunks_are_audio_only(tiny, tiny_prompt):
    # chunk 1: 5 text + 10 audio; chunk 2: 2 text, then audio at its third slot; after: audio only
    r = _reempathy(
        tiny, tiny_prompt, n=75, reflect=False,
        procs=[AudioAt(tiny, {17}), TextWhereAllowed(tiny)],
    )
    shapes = [(len(c.text_ids), len(c.audio_units)) for c in r.chunks]
    assert shapes == [(5, 10), (2, 13), (0, 15), (0, 15), (0, 15)]


def test_fixed_length_reflections_are_exactly_n_tokens(tiny, tiny_prompt):
    r = _reempathy(tiny, tiny_prompt, n=100, reflection_tokens=4)
    assert r.hidden and all(len(h.ids) == 4 for h in r.hidden[:-1])
    eor = tiny.layout.special[REFLECTION_CLOSE]
    assert r.counts.forced == r.ids.count(eor) + len(r.hidden)  # every open and close is forced


def test_reempathy_never_reencodes_across_phase_switches(tiny, tiny_prompt):
    r = _reempathy(tiny, tiny_prompt, n=90, max_reflection_tokens=5)
    c = r.counts
    assert c.forced >= 4
    assert c.forwarded + c.unforwarded == c.prompt + c.generated + c.forced


def test_cotbs_thought_is_hidden_capped_and_never_spoken(tiny, tiny_prompt):
    strategy = CotbsStrategy(CotbsOptions(max_thought_tokens=7), tiny)
    r = decode(tiny, tiny_prompt, strategy, [NoStop(tiny)], LoopOptions(max_new_tokens=40, seed=3))
    bot, eot = tiny.layout.special[THOUGHT_OPEN], tiny.layout.special[THOUGHT_CLOSE]
    assert r.ids[0] == bot and r.ids.count(bot) == 1  # forced once, at the start
    assert r.spans[1]["label"] == "control" and r.spans[1]["end"] - r.spans[1]["start"] == 1
    assert [h.kind for h in r.hidden] == ["thought"]
    thought = r.hidden[0]
    assert 1 <= len(thought.ids) <= 7
    assert r.ids.count(eot) == 1
    assert not {bot, eot} & (set(r.spoken_text_ids))
    assert r.spans[-1]["label"] in ("spoken_text", "spoken_audio")
    c = r.counts
    assert c.forwarded + c.unforwarded == c.prompt + c.generated + c.forced


def test_decode_reempathy_config_json_has_spoken_answer_and_reflection_trace(capsys):
    code = main(["decode", "--config", str(ROOT / "configs/reempathy.toml"), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    assert data["strategy"] == "reempathy"
    assert data["spoken"]["chunks"] and data["hidden"]
    assert all(h["kind"] == "reflection" for h in data["hidden"])


def test_strategy_is_one_flag_away(capsys):
    for name in ("sft", "cotbs", "reempathy"):
        code = main(["decode", "--config", str(ROOT / "configs/reempathy.toml"), "--strategy", name, "--json"])
        assert code == 0 and json.loads(capsys.readouterr().out)["strategy"] == name


@pytest.mark.parametrize(
    "override,needle",
    [
        ("strategy.text_tokens=0", "'text_tokens'"),
        ("strategy.audio_tokens=0", "'audio_tokens'"),
        ("strategy.max_reflection_tokens=0", "'max_reflection_tokens'"),
        ("strategy.colour=1", "unknown option 'colour'"),
        ("processors.0.factor=0", "'factor'"),
        ("processors.0.factor=-1.5", "'factor'"),
        ("processors.0.layers='0-7'", "layer 7 is beyond the model's depth (2 layers"),
        ("processors.0.heads=[0, 9]", "head 9 is out of range"),
        ("processors.0.heads={'5' = [0]}", "'heads.5'"),
        ("processors.0.wobble=1", "unknown option 'wobble'"),
    ],
)
def test_invalid_options_give_a_one_line_config_error_naming_the_option(capsys, override, needle):
    code = main(["decode", "--config", str(ROOT / "configs/reempathy.toml"), "--set", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert needle in err[0], err[0]
