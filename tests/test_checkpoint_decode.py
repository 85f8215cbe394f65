"""What is trained is what is decoded: teacher forcing through the real strategy, and `decode --checkpoint`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reempathy.cli import main
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy
from reempathy.training.builders import ReempathyBuild, build_reempathy
from reempathy.data.records import load_records
from reempathy.training.reference import teacher_forced_sequence
from reempathy.training.train import train

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "empathy_dialogues.jsonl"


@pytest.mark.parametrize("text_tokens,audio_tokens", [(5, 10), (3, 6), (7, 14)])
def test_reempathy_decoding_forced_to_a_record_reproduces_the_builders_sequence(tiny, text_tokens, audio_tokens):
    """Example records (the first three carry 5+10 reflections; other layouts split their assessments)."""
    records = load_records(EXAMPLES, audio_count=tiny.layout.audio_count).records
    for sr in records[:3]:
        seq = build_reempathy(sr, tiny, ReempathyBuild(text_tokens=text_tokens, audio_tokens=audio_tokens))
        strategy = ReEmpathyStrategy(
            ReEmpathyOptions(text_tokens=text_tokens, audio_tokens=audio_tokens, max_reflection_tokens=1000), tiny
        )
        assert teacher_forced_sequence(tiny, seq.prompt_len, seq.input_ids, strategy) == seq.input_ids, sr.where
        assert seq.input_ids[-1] in tiny.layout.stop_ids


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
