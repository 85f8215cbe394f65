"""What a checkpoint remembers of its hidden segments: the reflection mode and length, the longest thought and
reflection; decoding refuses another reflection mode and warns when a cap cuts trained segments short."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest

from reempathy.checkpoints import MANIFEST, CapWarning, checkpoint_config_overrides, read_manifest
from reempathy.cli import main
from reempathy.errors import ConfigError
from reempathy.plugins.strategies.cotbs import CotbsOptions
from reempathy.plugins.strategies.reempathy import ReEmpathyOptions
from reempathy.training.builders import BUILDERS, build_all
from reempathy.training.config import load_train_config
from reempathy.data.records import load_records
from reempathy.training.train import longest_hidden, train

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "empathy_dialogues.jsonl"


def two_records(path: Path) -> Path:
    lines = [line for line in EXAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()]
    path.write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    return path


def train_reempathy(tmp: Path, **options):
    cfg = load_train_config(None, data={
        "backbone": {"name": "tiny"},
        "strategy": {"name": "reempathy", **options},
        "data": {"path": str(two_records(tmp / "d.jsonl"))},
        "train": {"output_dir": str(tmp / "out"), "max_steps": 1, "batch_size": 2, "save_steps": 100},
    })
    return train(cfg, progress=False)


@pytest.fixture(scope="module")
def free(tmp_path_factory):
    return train_reempathy(tmp_path_factory.mktemp("free"))


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    return train_reempathy(tmp_path_factory.mktemp("fixed"), reflection_tokens=6)


def longest_of(path, tiny, name, **options):
    spec = BUILDERS[name]
    built = build_all(load_records(path, tiny.layout.audio_count), tiny, spec, spec.options_model(**options))
    return longest_hidden(built.items)


def test_the_manifest_records_free_length_reflections_and_the_longest_one(free, tiny):
    data = json.loads((free.output_dir / MANIFEST).read_text())
    assert data["reflection"] == {"mode": "free", "tokens": None}
    expected = longest_of(free.output_dir.parent / "d.jsonl", tiny, "reempathy")
    assert data["longest"] == {"thought": None, "reflection": expected.reflection}
    assert expected.reflection > 0


def test_the_manifest_records_fixed_length_reflections(fixed):
    data = json.loads((fixed.output_dir / MANIFEST).read_text())
    assert data["reflection"] == {"mode": "fixed", "tokens": 6}
    assert data["longest"]["reflection"] == 6


def test_a_fixed_length_checkpoint_decodes_in_fixed_length_mode(fixed):
    name, options = checkpoint_config_overrides(read_manifest(fixed.output_dir))
    assert (name, options["reflection_tokens"]) == ("reempathy", 6)


def test_another_reflection_length_than_trained_is_refused(fixed):
    with pytest.raises(ConfigError, match=r"fixed-length reflections of 6 tokens, .* reflection_tokens = 4; drop"):
        checkpoint_config_overrides(read_manifest(fixed.output_dir), None, {"reflection_tokens": 4})


def test_fixed_length_decoding_of_a_free_length_checkpoint_is_refused(free):
    with pytest.raises(ConfigError, match=r"free-length reflections .* reflection_tokens = 4"):
        checkpoint_config_overrides(read_manifest(free.output_dir), None, {"reflection_tokens": 4})


def test_the_longest_thought_is_the_longest_assessment(tiny):
    longest = longest_of(EXAMPLES, tiny, "cotbs")
    records = load_records(EXAMPLES, tiny.layout.audio_count).records
    assert longest.thought == max(len(tiny.tokenizer.encode(r.record.assessment.text, add_special_tokens=False)) for r in records)
    assert longest.reflection is None


def test_a_cap_shorter_than_the_longest_trained_reflection_warns(free):
    manifest = read_manifest(free.output_dir)
    longest = manifest.longest.reflection
    with pytest.warns(CapWarning, match=rf"reflections of up to {longest} tokens, but strategy.max_reflection_tokens = 2 cuts"):
        checkpoint_config_overrides(manifest, None, {"max_reflection_tokens": 2})


def test_a_cap_that_covers_the_trained_reflections_does_not_warn(free, recwarn):
    manifest = read_manifest(free.output_dir)
    checkpoint_config_overrides(manifest, None, {"max_reflection_tokens": manifest.longest.reflection})
    assert not [w for w in recwarn if issubclass(w.category, CapWarning)]


def test_a_default_cap_shorter_than_the_trained_thoughts_warns(free, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(free.output_dir, copy)
    data = json.loads((copy / MANIFEST).read_text())
    data.update(strategy={"name": "cotbs", "options": {}}, chunk_layout=None, reflection=None,
                longest={"thought": 100, "reflection": None})
    (copy / MANIFEST).write_text(json.dumps(data))
    with pytest.warns(CapWarning, match=r"thoughts of up to 100 tokens, but strategy.max_thought_tokens = 64 \(the default\)"):
        checkpoint_config_overrides(read_manifest(copy))


def test_the_cli_prints_a_cap_warning_as_one_line(free, capsys):
    code = main(["decode", "--checkpoint", str(free.output_dir), "--prompt", "I lost my job.", "--max-new-tokens", "3",
                 "--set", "strategy.max_reflection_tokens=1"])
    assert code == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("reempathy: warning: checkpoint ")
    assert "strategy.max_reflection_tokens = 1 cuts them short; set strategy.max_reflection_tokens = " in err[0]


def test_shipped_caps_and_defaults_cover_the_example_data(tiny):
    """configs/cotbs.toml, configs/reempathy.toml and the strategies' defaults never cut an example short."""
    thought = longest_of(EXAMPLES, tiny, "cotbs").thought
    reempathy = tomllib.loads((ROOT / "configs" / "train-reempathy.toml").read_text())["strategy"]
    options = {k: v for k, v in reempathy.items() if k != "name"}
    reflection = longest_of(EXAMPLES, tiny, "reempathy", **options).reflection
    cotbs = tomllib.loads((ROOT / "configs" / "cotbs.toml").read_text())["strategy"]
    decode_reempathy = tomllib.loads((ROOT / "configs" / "reempathy.toml").read_text())["strategy"]
    assert cotbs["max_thought_tokens"] >= thought
    assert CotbsOptions().max_thought_tokens >= thought
    assert decode_reempathy["max_reflection_tokens"] >= reflection
    assert ReEmpathyOptions().max_reflection_tokens >= reflection
