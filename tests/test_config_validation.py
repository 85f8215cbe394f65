"""Decode and training configs: strict TOML types, bounds, nesting, and flags that replace a plugin (issues 14, 16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reempathy.cli import main
from reempathy.config import load_config
from reempathy.registry import default_discovery
from reempathy.errors import ConfigError
from reempathy.training.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registry():
    return default_discovery().registry


def error_line(capsys, *args) -> str:
    code = main(list(args))
    _, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reempathy: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("strategy.text_tokens=true", "text_tokens"),  # true is not 1
        ("sampling.greedy=\"yes\"", "sampling.greedy"),  # "yes" is not true
        ("decode.max_new_tokens=4.0", "decode.max_new_tokens"),  # 4.0 is not an integer
        ("backbone.seed=\"3\"", "seed"),
        ("sampling.temperature=nan", "sampling.temperature"),
        ("sampling.top_p=inf", "sampling.top_p"),
    ],
)
def test_loose_toml_types_are_refused_naming_the_key(registry, override, needle):
    cfg_strategy = "reempathy" if override.startswith("strategy.") else None
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override], cfg_strategy, registry)


def test_an_integer_is_accepted_where_a_float_is_expected(registry):
    assert load_config(None, ["sampling.temperature=2"], None, registry).sampling.temperature == 2.0


@pytest.mark.parametrize(
    "processor, option, value, message",
    [
        ("attention-reweight", "factor", "true", "valid number"),  # true is not a float
        ("attention-reweight", "factor", '"1.2"', "valid number"),
        ("attention-reweight", "factor", "nan", "finite number"),
        ("attention-reweight", "heads", "[true]", "valid integer"),
        ("attention-reweight", "layers", "[false]", "'layers' takes str | list[int | str] | None"),
        ("temperature", "value", "true", "valid number"),
        ("top-k", "k", "true", "valid integer"),
        ("top-k", "k", "5.0", "valid integer"),  # 5.0 is not an integer
        ("top-p", "p", '"0.9"', "valid number"),
        ("repetition-penalty", "penalty", "inf", "finite number"),
    ],
)
def test_built_in_processor_options_are_strict_and_the_error_names_the_option(capsys, processor, option, value, message):
    line = error_line(capsys, "decode", "--set", f'processors=[{{name="{processor}", {option}={value}}}]', "--set", "decode.prompt=hi")
    assert f"processor {processor!r} (processors.0): option '{option}" in line and message in line
    if value == "true":
        assert "(got true)" in line  # the value as it was written in TOML, not Python's True


def test_every_built_in_processor_option_model_is_strict(registry):
    for name in ("attention-reweight", "temperature", "top-k", "top-p", "repetition-penalty"):
        config = registry.get("processor", name).config_model.model_config
        assert (config.get("strict"), config.get("extra"), config.get("allow_inf_nan")) == (True, "forbid", False), name


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampling.temperature=1e-9", "sampling.temperature: Input should be greater than or equal to 0.001 (got 1e-09)"),
        ("sampling.temperature=5000", "sampling.temperature: Input should be less than or equal to 1000 (got 5000"),
        ("sampling.repetition_penalty=1000", "sampling.repetition_penalty: Input should be less than or equal to 100"),
        ("sampling.top_p=1e-9", "sampling.top_p: Input should be greater than or equal to 0.000001 (got 1e-09)"),
    ],
)
def test_a_sampling_value_out_of_its_processors_bounds_names_the_sampling_key(capsys, override, message):
    line = error_line(capsys, "decode", "--set", override, "--set", "decode.prompt=hi")
    assert message in line and "processor" not in line


def test_a_sampling_value_that_adds_no_processor_is_not_checked_against_one(registry):
    cfg = load_config(None, ["sampling.top_k=0", "sampling.temperature=1.0", "sampling.greedy=true"], None, registry)
    assert cfg.sampling.top_k == 0
    # Out-of-range values are refused by the [sampling] field itself, greedy or not: one place for the bounds.
    with pytest.raises(ConfigError, match="sampling.temperature"):
        load_config(None, ["sampling.greedy=true", "sampling.temperature=1e-9"], None, registry)


@pytest.mark.parametrize("override", [f"sampling.seed={2**63}", "sampling.seed=-1", f"backbone.seed={2**63}"])
def test_seeds_outside_0_to_2_63_are_refused(registry, override):
    with pytest.raises(ConfigError, match="seed"):
        load_config(None, [override], None, registry)


def test_the_largest_seed_is_accepted(registry):
    assert load_config(None, [f"sampling.seed={2**63 - 1}"], None, registry).sampling.seed == 2**63 - 1


def test_a_training_seed_must_fit_numpy(tmp_path):
    data = {"strategy": {"name": "sft"}, "data": {"path": "d.jsonl"}, "train": {"output_dir": "o", "seed": 2**32}}
    with pytest.raises(ConfigError, match="train.seed"):
        load_train_config(None, data=data)


def test_a_deeply_nested_config_file_is_one_error_not_a_recursion(capsys, tmp_path):
    cfg = tmp_path / "deep.toml"
    cfg.write_text("[decode]\nprompt = " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nest" in error_line(capsys, "decode", "--config", str(cfg))


def test_a_deeply_nested_override_is_one_error(capsys):
    assert "nest" in error_line(capsys, "decode", "--set", "decode.prompt=" + "[" * 3000 + "]" * 3000)


def test_an_empty_config_path_says_so(capsys):
    line = error_line(capsys, "decode", "--config", "")
    assert "the path is empty" in line and "'.'" not in line


def test_a_directory_as_config_says_it_is_a_directory(capsys, tmp_path):
    assert "is a directory" in error_line(capsys, "decode", "--config", str(tmp_path))


def test_a_config_that_is_not_utf8_is_named(capsys, tmp_path):
    cfg = tmp_path / "latin1.toml"
    cfg.write_bytes(b'[decode]\nprompt = "caf\xe9"\n')
    assert "not UTF-8" in error_line(capsys, "decode", "--config", str(cfg))


def test_an_empty_strategy_name_is_refused(capsys):
    assert "--strategy: give a strategy name" in error_line(capsys, "decode", "--strategy", "")


def test_an_empty_checkpoint_is_refused(capsys):
    assert "decode.checkpoint" in error_line(capsys, "decode", "--checkpoint", "")


def test_prompt_and_units_both_in_the_config_are_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[decode]\nprompt = "hi"\nunits = "missing.txt"\n')
    with pytest.raises(ConfigError, match="decode.prompt or decode.units, not both"):
        load_config(cfg)


def test_set_strategy_name_drops_the_old_strategys_options_like_strategy_flag(registry):
    by_set = load_config(ROOT / "configs/reempathy.toml", ["strategy.name=cotbs"], None, registry)
    by_flag = load_config(ROOT / "configs/reempathy.toml", [], "cotbs", registry)
    assert by_set.strategy == by_flag.strategy
    assert by_set.strategy.name == "cotbs" and "text_tokens" not in by_set.strategy.options


def test_options_set_for_the_new_strategy_are_kept_whatever_the_order(registry):
    cfg = load_config(
        ROOT / "configs/reempathy.toml", ["strategy.max_thought_tokens=9", "strategy.name=cotbs"], None, registry
    )
    assert cfg.strategy.options == {"max_thought_tokens": 9}


def test_set_strategy_name_to_the_same_name_keeps_the_options(registry):
    cfg = load_config(ROOT / "configs/reempathy.toml", ["strategy.name=reempathy"], None, registry)
    assert cfg.strategy.options.get("text_tokens") is not None


def test_backbone_flag_replaces_the_backbone_and_drops_its_options(registry, tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[backbone]\nname = "tiny"\nhidden_size = 32\n')
    same = load_config(cfg_file, [], None, registry, backbone="tiny")
    assert same.backbone.options == {"hidden_size": 32}
    with pytest.raises(ConfigError, match="unknown backbone 'nope'"):
        load_config(cfg_file, [], None, registry, backbone="nope")


def test_backbone_flag_with_another_backbone_drops_the_old_backbones_options(registry, tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[backbone]\nname = "tiny"\nhidden_size = 32\n')  # hidden_size: an option hf-interleaved lacks
    other = load_config(cfg_file, ["backbone.path=/models/mine"], None, registry, backbone="hf-interleaved")
    assert other.backbone.name == "hf-interleaved" and other.backbone.options == {"path": "/models/mine"}


def test_backbone_flag_on_the_command_line(capsys):
    assert "unknown backbone 'nope'" in error_line(capsys, "decode", "--backbone", "nope")


def test_training_config_set_strategy_name_drops_the_old_options():
    data = {
        "strategy": {"name": "reempathy", "text_tokens": 3},
        "data": {"path": "d.jsonl"},
        "train": {"output_dir": "o"},
    }
    cfg = load_train_config(None, ["strategy.name=sft"], data=data)
    assert cfg.strategy.name == "sft" and cfg.strategy.options == {}


def test_training_and_decode_configs_word_unknown_keys_the_same_way(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'decode.promt'; valid keys in \[decode\]"):
        load_config(None, ["decode.promt=1"])
    data = {"strategy": {"name": "sft"}, "data": {"path": "d"}, "train": {"output_dir": "o", "max_step": 1}}
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_step'; valid keys in \[train\]"):
        load_train_config(None, data=data)


def test_a_training_value_error_shows_the_toml_value(tmp_path):
    data = {"strategy": {"name": "sft"}, "data": {"path": "d"}, "train": {"output_dir": "o", "resume": 1}}
    with pytest.raises(ConfigError, match=r"train.resume: .*\(got 1\)"):
        load_train_config(None, data=data)


# --- --set on processors (issue 25) -------------------------------------------------------------


def test_set_processors_n_name_creates_the_entry(registry):
    cfg = load_config(None, ["processors.0.name=attention-reweight", "processors.0.factor=1.2",
                             "processors.1.name=temperature", "processors.1.value=0.7"], registry=registry)
    assert [(p.name, p.options) for p in cfg.processors] == [
        ("attention-reweight", {"factor": 1.2}), ("temperature", {"value": 0.7})
    ]


def test_set_processors_n_extends_the_files_list(registry, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[processors]]\nname = "top-k"\nk = 5\n')
    cfg = load_config(path, ["processors.1.name=top-p", "processors.1.p=0.9", "processors.0.k=7"], registry=registry)
    assert [(p.name, p.options) for p in cfg.processors] == [("top-k", {"k": 7}), ("top-p", {"p": 0.9})]


def test_set_processors_with_a_gap_says_which_index_comes_next(registry):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["processors.2.name=top-k"], registry=registry)
    message = str(info.value)
    assert "processors has 0 entries" in message and "processors.0.name=" in message and "\n" not in message


def test_processors_written_as_a_table_says_to_write_an_array_of_tables(registry, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[processors]\nname = "top-k"\nk = 5\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, registry=registry)
    message = str(info.value)
    assert "Input should be a valid list" not in message
    assert "[[processors]]" in message and "--set processors.0.name=" in message


def test_processors_set_to_a_table_on_the_command_line_says_what_to_write(registry):
    with pytest.raises(ConfigError, match=r"\[\[processors\]\]"):
        load_config(None, ['processors={name="top-k"}'], registry=registry)
