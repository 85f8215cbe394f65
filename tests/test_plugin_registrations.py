"""Explicit plugin contracts (issue 21 §3): a strategy's own special tokens, registration fields, plugin commands.

A strategy declares the special tokens it forces (``register(..., special_tokens=...)``) and every
backbone adds the ones it lacks — tested on a fresh tiny backbone, a tiny checkpoint in
GLM-4-Voice's published format and a tiny Qwen2.5-Omni, each loaded through the registry as a
user's config would. A plugin's command is listed by ``reempathy --help`` and runs.
"""

from __future__ import annotations

import pytest

from reempathy import registry as registry_module
from reempathy.cli import main
from reempathy.config import ComponentConfig, DecodeConfig, DecodeSettings, SamplingConfig
from reempathy.decoding.directives import Switch
from reempathy.decoding.spans import SPEAK
from reempathy.hooks import hookimpl
from reempathy.options import PluginOptions
from reempathy.runner import load_backbone, run_decode

OPEN, CLOSE = "<|begin_of_aside|>", "<|end_of_aside|>"


class AsideOptions(PluginOptions):
    every: int = 3  # spoken tokens between asides
    length: int = 2  # tokens of an aside


class Aside:
    """After every ``every`` spoken tokens, an unspoken aside of ``length`` text tokens, between its own delimiters."""

    def __init__(self, options: AsideOptions, backbone) -> None:
        self.options = options
        self.open = backbone.layout.token_id(OPEN)
        self.close = backbone.layout.token_id(CLOSE)
        self.ban = ~backbone.layout.allowed_mask(text=True, device=backbone.model.device)
        self.stop = list(backbone.layout.stop_ids)
        self.spoken = 0

    @hookimpl(tryfirst=True)
    def reempathy_logits(self, session, logits):
        if session.hidden:
            logits.masked_fill_(self.ban, float("-inf"))
        else:
            logits[self.stop] = float("-inf")

    @hookimpl
    def reempathy_token(self, session, token_id):
        if session.hidden:
            if len(session.segment) + 1 >= self.options.length:
                return Switch(SPEAK, forced=(self.close,))
            return None
        self.spoken += 1
        if self.spoken % self.options.every == 0:
            return Switch("aside", forced=(self.open,), hidden=True)
        return None


class AsidePlugin:
    @hookimpl
    def reempathy_register_strategies(self, register):
        register("aside", Aside, AsideOptions, "asides between spoken tokens (tests)", special_tokens=(OPEN, CLOSE))


@pytest.fixture()
def aside_registry(monkeypatch, fresh_discovery):
    disc = registry_module.discover(extra_plugins=[("aside-plugin", AsidePlugin())], installed=False)
    monkeypatch.setattr(registry_module, "default_discovery", lambda: disc)
    return disc.registry


def _config(name: str, **options) -> DecodeConfig:
    return DecodeConfig(
        backbone=ComponentConfig(name=name, **options),
        strategy=ComponentConfig(name="aside"),
        sampling=SamplingConfig(greedy=True),
        decode=DecodeSettings(max_new_tokens=14, prompt="I lost my keys."),
    )


def _backbones(request):
    """(config) for each backbone family: fresh tiny, GLM-4-Voice's format, Qwen2.5-Omni (thinker only)."""
    tmp = request.getfixturevalue("tmp_path_factory")
    kind = request.param
    if kind == "tiny":
        return _config("tiny")
    if kind == "glm-4-voice":
        from glm4voice_fixture import make_tiny_glm4voice_dir

        return _config("glm-4-voice", path=str(make_tiny_glm4voice_dir(tmp.mktemp("glm") / "ckpt")), device="cpu")
    qwen_dir = request.getfixturevalue("qwen_dir")
    return _config("qwen2.5-omni", path=str(qwen_dir), talker=False, device="cpu")


@pytest.fixture(params=["tiny", "glm-4-voice", "qwen2.5-omni"])
def config(request):
    return _backbones(request)


def test_a_strategy_brings_its_own_special_tokens_and_decodes_with_them(aside_registry, config):
    backbone = load_backbone(config, aside_registry)
    layout = backbone.layout
    open_id, close_id = layout.token_id(OPEN), layout.token_id(CLOSE)
    assert not layout.is_text(open_id) and not layout.is_audio(open_id) and close_id == open_id + 1
    assert backbone.model.get_input_embeddings().weight.shape[0] > close_id
    result = run_decode(config, aside_registry, backbone=backbone)
    asides = [h for h in result.hidden if h.kind == "aside"]
    assert len(asides) >= 2 and all(len(h.ids) == 2 for h in asides[:-1])
    assert result.ids.count(open_id) == len(asides)  # each aside opened by the strategy's own token
    assert [s["label"] for s in result.spans if s["label"] == "aside"]  # the aside's text is labelled as its phase


def test_the_same_tokens_get_the_same_ids_on_every_load(aside_registry):
    ids = [load_backbone(_config("tiny"), aside_registry).layout.token_id(OPEN) for _ in range(2)]
    assert ids[0] == ids[1]


def test_whole_trace_dpo_adds_the_special_tokens_of_the_strategy_its_traces_were_decoded_with(aside_registry, tmp_path):
    import json

    from reempathy.data.records import load_records
    from reempathy.errors import ConfigError
    from reempathy.training.train import trace_special_tokens

    def records(strategy):
        trace = {"strategy": {"name": strategy}, "ids": [5, 6], "roles": "sf", "labels": [["spoken_text", 1], ["control", 1]]}
        doc = {"messages": [{"role": "user", "text": "Hi."}, {"role": "assistant", "units": [1], "trace": trace}],
               "rejected": {"role": "assistant", "units": [2], "trace": trace}}
        path = tmp_path / f"{strategy}.jsonl"
        path.write_text(json.dumps(doc) + "\n", encoding="utf-8")
        return load_records(path)

    from reempathy.backbones.tiny import TinyOptions, load_tiny

    backbone = load_backbone(_config("tiny"), aside_registry)

    plain = load_tiny(TinyOptions())  # no strategy's tokens added yet
    assert OPEN not in plain.layout.special
    assert trace_special_tokens(records("aside"), aside_registry, plain) == [OPEN, CLOSE]
    assert plain.layout.token_id(OPEN) == backbone.layout.token_id(OPEN)  # the ids decoding gives them
    with pytest.raises(ConfigError, match="decoded with strategy 'nope', which is not installed here"):
        trace_special_tokens(records("nope"), aside_registry, plain)


def test_the_built_in_strategies_declare_their_delimiters(aside_registry):
    assert aside_registry.get("strategy", "reempathy").special_tokens == ("<|begin_of_reflection|>", "<|end_of_reflection|>")
    assert aside_registry.get("strategy", "cotbs").special_tokens == ("<|begin_of_thought|>", "<|end_of_thought|>")
    assert aside_registry.get("strategy", "sft").special_tokens is None
    assert callable(aside_registry.get("evaluator", "empathyeval").trainer)


def test_the_empathy_evaluators_register_the_mean_of_their_four_scores_as_their_reward(aside_registry):
    from reempathy.evaluation.base import EMPATHY_SCORES, Evaluation

    scores = dict(zip(EMPATHY_SCORES, (1.0, 2.0, 4.0, 5.0)))
    for name in ("empathyeval", "llm-judge", "keyword-empathy"):
        reward = aside_registry.get("evaluator", name).reward
        assert reward(Evaluation("x", scores)) == 3.0 and reward(Evaluation("x", {})) is None
    assert aside_registry.get("evaluator", "audio-stats").reward is None  # several unrelated scores: weights decide


@pytest.mark.parametrize("fields, message", [
    ({"special_tokens": ("aside",)}, "special_tokens must be distinct strings such as '<|begin_of_aside|>'"),
    ({"special_tokens": (OPEN, OPEN)}, "special_tokens must be distinct strings"),
    ({"trainer": lambda *a: None}, "unknown strategy field 'trainer' (fields of a strategy: special_tokens)"),
])
def test_a_bad_registration_field_breaks_only_that_plugin(fresh_discovery, fields, message):
    class Bad:
        @hookimpl
        def reempathy_register_strategies(self, register):
            register("bad", Aside, AsideOptions, "", **fields)

    disc = registry_module.discover(extra_plugins=[("bad-plugin", Bad())], installed=False)
    row = disc.plugin("bad-plugin")
    assert row.broken and message in row.error
    assert "reempathy" in disc.registry.names("strategy")


def test_an_evaluator_reward_that_is_not_callable_breaks_only_that_plugin(fresh_discovery):
    from pydantic import BaseModel

    class Bad:
        @hookimpl
        def reempathy_register_evaluators(self, register):
            register("bad-reward", object, BaseModel, "", reward=0.5)

    disc = registry_module.discover(extra_plugins=[("bad-reward-plugin", Bad())], installed=False)
    row = disc.plugin("bad-reward-plugin")
    assert row.broken and "reward must be callable, got 0.5" in row.error
    assert "keyword-empathy" in disc.registry.names("evaluator")


COMMAND_PLUGIN = '''
from reempathy.api import hookimpl


def add_parser(subparsers):
    p = subparsers.add_parser("hello", help="say hello (a plugin's command)")
    p.add_argument("--name", default="world")
    p.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)
    return p


@hookimpl
def reempathy_register_commands(register):
    register("hello", add_parser, None, "say hello")
    register("run", add_parser, None, "a name already taken")
'''


def test_reempathy_register_commands_adds_a_command_that_help_lists_and_that_runs(tmp_path, capsys, caplog, fresh_discovery):
    (tmp_path / "hello_plugin.py").write_text(COMMAND_PLUGIN)
    assert main(["--plugins-dir", str(tmp_path), "--help"]) == 0
    out = capsys.readouterr().out
    assert "hello" in out and "say hello (a plugin's command)" in out
    assert main(["--plugins-dir", str(tmp_path), "hello", "--name", "reempathy"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "hello reempathy"
    # The built-in `run` kept its name; the plugin's is listed as lost.
    assert "command 'run' (already registered by 'reempathy.commands')" in caplog.text


def test_a_command_whose_parser_fails_is_left_out_and_the_rest_works(tmp_path, capsys, caplog, fresh_discovery):
    (tmp_path / "broken_command.py").write_text(
        "from reempathy.api import hookimpl\n\n"
        "def add_parser(subparsers):\n    raise RuntimeError('no parser today')\n\n"
        "@hookimpl\ndef reempathy_register_commands(register):\n    register('broken', add_parser, None, '')\n"
    )
    assert main(["--plugins-dir", str(tmp_path), "plugins"]) == 0
    assert "command 'broken' failed to add its parser: RuntimeError: no parser today" in caplog.text
    assert "broken_command" in capsys.readouterr().out  # the plugin is listed; only its command is left out
