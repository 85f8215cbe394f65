"""What is trained is what is decoded: teacher forcing through the real strategy, and `decode --checkpoint`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reempathy.cli import main
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.hooks import hookimpl
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy
from reempathy.training.builders import ReempathyBuild, build_reempathy
from reempathy.training.data import load_records
from reempathy.training.train import train

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "empathy_dialogues.jsonl"


class TeacherForcing:
    """At every sampled position, allows only the token the training sequence has there."""

    def __init__(self, target: list[int], prompt_len: int):
        self.target = target
        self.prompt_len = prompt_len

    @hookimpl
    def reempathy_logits(self, session, logits):
        pos = len(session.ids)
        keep = logits[self.target[pos]].clone() if pos < len(self.target) else None
        logits.fill_(float("-inf"))
        if keep is not None:
            # the strategy must allow the training token here, or the test fails on -inf
            logits[self.target[pos]] = keep if keep.isfinite() else float("-inf")


@pytest.mark.parametrize("text_tokens,audio_tokens", [(5, 10), (3, 6), (7, 14)])
def test_reempathy_decoding_forced_to_a_record_reproduces_the_builders_sequence(tiny, text_tokens, audio_tokens):
    records = load_records(EXAMPLES, audio_count=tiny.layout.audio_count).records
    checked = 0
    for sr in records[:3]:
        seq = build_reempathy(sr, tiny, ReempathyBuild(text_tokens=text_tokens, audio_tokens=audio_tokens))
        prompt = seq.input_ids[: seq.prompt_len]
        # A generous cap: the builder's reflections are the assessment split evenly.
        longest = max(
            (len(run) for run in _reflections(seq.input_ids, tiny)), default=1
        )
        strategy = ReEmpathyStrategy(
            ReEmpathyOptions(text_tokens=text_tokens, audio_tokens=audio_tokens, max_reflection_tokens=longest + 1),
            tiny,
        )
        forcer = TeacherForcing(seq.input_ids, seq.prompt_len)
        result = decode(tiny, prompt, strategy, [forcer], LoopOptions(max_new_tokens=len(seq.input_ids), greedy=True))
        assert result.stop_reason == "stop_token", sr
        # the builder ends with the stop token, which the decoder reads but does not keep
        assert prompt + result.ids == seq.input_ids[:-1]
        assert seq.input_ids[-1] in tiny.layout.stop_ids
        checked += 1
    assert checked == 3


def _reflections(ids, tiny):
    bor = tiny.layout.special["<|begin_of_reflection|>"]
    eor = tiny.layout.special["<|end_of_reflection|>"]
    runs, cur, inside = [], [], False
    for t in ids:
        if t == bor:
            inside, cur = True, []
        elif t == eor:
            inside = False
            runs.append(cur)
        elif inside:
            cur.append(t)
    return runs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from reempathy.training.config import load_train_config

    out = tmp_path_factory.mktemp("ckpt") / "reempathy"
    cfg = load_train_config(
        ROOT / "configs" / "train-reempathy.toml",
        [f"train.output_dir={json.dumps(str(out))}", "train.max_steps=2", "train.save_steps=2",
         f"data.path={json.dumps(str(EXAMPLES))}"],
    )
    return train(cfg, progress=False).output_dir


def test_decode_checkpoint_uses_the_manifests_strategy_through_the_cli(checkpoint, capsys):
    code = main(["decode", "--checkpoint", str(checkpoint), "--prompt", "I lost my job.", "--json",
                 "--max-new-tokens", "20"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    assert data["strategy"] == "reempathy"
    assert data["extra"]["chunk_layout"] == {"text_tokens": 5, "audio_tokens": 10}


def test_decode_checkpoint_refuses_a_contradicting_strategy(checkpoint, capsys):
    code = main(["decode", "--checkpoint", str(checkpoint), "--strategy", "sft", "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "trained for strategy 'reempathy', not 'sft'" in err[0]


def test_decode_checkpoint_refuses_a_contradicting_chunk_layout(checkpoint, capsys):
    code = main(["decode", "--checkpoint", str(checkpoint), "--set", "strategy.text_tokens=7", "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "text_tokens" in err[0] and "5+10" in err[0]


def test_decode_checkpoint_takes_decode_only_options_from_the_config(checkpoint, capsys):
    code = main(["decode", "--checkpoint", str(checkpoint), "--set", "strategy.max_reflection_tokens=3",
                 "--prompt", "hi", "--json", "--max-new-tokens", "40"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["strategy"] == "reempathy"
    assert all(len(h["ids"]) <= 3 for h in data["hidden"])


def test_decode_checkpoint_that_does_not_exist_is_a_one_line_error(capsys, tmp_path):
    code = main(["decode", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nothing" in err[0]
