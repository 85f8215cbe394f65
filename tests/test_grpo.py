"""GRPO through TRL (issue 23 §2-4): rollouts from our batched decoder, rewards from evaluator plugins, chunk credit."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from reward_plugins import TargetWordsPlugin, share, tiny_target_words
from reempathy import registry as registry_module
from reempathy.cli import main
from reempathy.errors import ConfigError
from reempathy.evaluation.base import Evaluation
from reempathy.training.grpo_config import PenaltySettings, RewardSettings, load_grpo_config
from reempathy.training.rewards import ChunkScores, Rollout, chunk_advantages, first_heard, penalty, scalar_rule, segments
from reempathy.training.trace import FORCED, HIDDEN

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "empathy_dialogues.jsonl"


@pytest.fixture(scope="module")
def disc():
    """The built-ins and a user's reward plugin (target-words), found through the real discovery hook."""
    return registry_module.discover(extra_plugins=[("target-words-plugin", TargetWordsPlugin())], installed=False)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(EXAMPLES.read_text(encoding="utf-8").splitlines()[:4]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def words(tiny):
    return tiny_target_words(tiny.tokenizer, 2)


def grpo_config(tmp_path, prompts, words, **tables):
    """A small GRPO config on the tiny backbone: reempathy with attention reweighting, the target-words reward."""
    data = {
        "backbone": {"name": "tiny"},
        "strategy": {"name": "reempathy", "text_tokens": 5, "audio_tokens": 10, "max_reflection_tokens": 6},
        "processors": [{"name": "attention-reweight", "factor": 1.15, "layers": "0-1"}],
        "sampling": {"temperature": 1.0, "seed": 0},
        "decode": {"max_new_tokens": 24},
        "data": {"path": str(prompts)},
        "train": {"output_dir": str(tmp_path / "grpo"), "max_steps": 2, "learning_rate": 2e-2, "batch_size": 8,
                  "save_steps": 1, "seed": 0},
        "grpo": {"num_generations": 4},
        "reward": {"evaluator": "target-words", "options": {"words": words}},
    }
    for key, value in tables.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


# --- configs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"sampling": {"greedy": True}}, "sampling.greedy = true gives every answer of a group the same tokens"),
    ({"decode": {"checkpoint": "runs/x"}}, "start from the checkpoint with [train] init_from instead"),
    ({"train": {"batch_size": 6}}, "not a multiple of grpo.num_generations = 4"),
    ({"grpo": {"num_generations": 1}}, "grpo.num_generations"),
    ({"grpo": {"credit": "token"}}, "grpo.credit"),
    ({"reward": {"weights": {"share": 0.0}}}, "reward.weights gives no score a weight"),
    ({"rollouts": {}}, "unknown key 'rollouts'"),
])
def test_settings_that_cannot_make_a_grpo_run_are_refused_in_one_line(tmp_path, prompts, words, disc, change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_grpo_config(None, data=grpo_config(tmp_path, prompts, words, **change), registry=disc.registry)


def test_an_unknown_evaluator_or_option_is_named(tmp_path, prompts, words, disc):
    with pytest.raises(ConfigError, match="unknown evaluator 'nope'"):
        load_grpo_config(None, data=grpo_config(tmp_path, prompts, words, reward={"evaluator": "nope"}), registry=disc.registry)
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        load_grpo_config(None, data=grpo_config(tmp_path, prompts, words, reward={"options": {"words": [], "colour": 1}}),
                         registry=disc.registry)


# --- rewards ----------------------------------------------------------------------------------------------


def test_weights_make_the_reward_a_weighted_sum_of_named_scores(disc):
    rule = scalar_rule(RewardSettings(evaluator="keyword-empathy", weights={"need_support": 2.0, "emotional_support": 1.0}),
                       disc.registry, ("need_support", "wording_appropriateness", "emotion_understanding", "emotional_support"))
    assert rule(Evaluation("x", {"need_support": 3.0, "emotional_support": 4.0})) == 10.0
    assert rule(Evaluation("x", {"need_support": 3.0})) is None  # a weighted score missing: no reward


def test_without_weights_the_evaluators_registered_reward_is_used(disc):
    names = ("need_support", "wording_appropriateness", "emotion_understanding", "emotional_support")
    rule = scalar_rule(RewardSettings(evaluator="keyword-empathy"), disc.registry, names)
    assert rule(Evaluation("x", dict(zip(names, (1.0, 2.0, 3.0, 4.0))))) == 2.5  # the mean of the four
    user = scalar_rule(RewardSettings(evaluator="target-words"), disc.registry, ("share",))
    assert user(Evaluation("x", {"share": 0.25})) == 0.25


def test_a_reward_of_numpy_or_tensor_type_counts_and_a_reward_that_is_no_number_is_the_plugins_failure():
    import numpy as np
    import torch

    from reempathy.errors import PluginFailure
    from reempathy.training.rewards import RewardFunction

    def value(reward):
        return RewardFunction(RewardSettings(evaluator="mine"), None, lambda ev: reward, None, False)._value(Evaluation("x", {}))

    assert value(np.float32(0.5)) == 0.5 and value(np.int64(2)) == 2.0 and value(torch.tensor(0.25)) == 0.25
    assert value(None) is None and value(float("nan")) is None  # worth nothing, as an evaluation error is
    with pytest.raises(PluginFailure, match=r"mine.*the reward is 'good' \(str\), not a number or None"):
        value("good")
    rule = scalar_rule(RewardSettings(evaluator="keyword-empathy", weights={"need_support": 1.0}), None, ("need_support",))
    assert rule(Evaluation("x", {"need_support": np.float64(3.0)})) == 3.0


def test_several_scores_without_weights_or_a_registered_reward_is_a_config_error(disc):
    with pytest.raises(ConfigError, match=r"evaluator 'audio-stats' gives 2 scores .* \[reward.weights\]"):
        scalar_rule(RewardSettings(evaluator="audio-stats"), disc.registry, ("duration_s", "silence_share"))
    with pytest.raises(ConfigError, match="reward.weights names 'warmth', which evaluator 'keyword-empathy' does not give"):
        scalar_rule(RewardSettings(evaluator="keyword-empathy", weights={"warmth": 1.0}), disc.registry, ("need_support",))


@dataclass
class _Counts:
    spoken: int


def _rollout(trace, spoken):
    @dataclass
    class Result:
        counts: _Counts
    return Rollout("1", 0, [], Result(_Counts(spoken)), trace)  # type: ignore[arg-type]


def test_penalties_count_hidden_per_spoken_length_and_tokens_before_the_first_heard(tiny):
    from reempathy.training.trace import Trace

    # forced, 2 hidden, then 3 text and 2 audio spoken: the first audio unit is the 7th token
    labels = ["control", "reflection", "reflection", "spoken_text", "spoken_text", "spoken_text", "spoken_audio", "spoken_audio"]
    trace = Trace(list(range(8)), "fhhssssss"[:8], labels, "x")
    rollout = _rollout(trace, spoken=5)
    assert first_heard(trace, tiny) == 6
    got = penalty(PenaltySettings(hidden_per_spoken=1.0, length=0.5, length_budget=3, latency=0.25, latency_budget=2), rollout, tiny)
    assert got == {"hidden_per_spoken": 2 / 5, "length": 1.0, "latency": 1.0}
    assert penalty(PenaltySettings(), rollout, tiny) == {}


def test_chunk_advantages_give_each_segment_the_group_advantage_of_its_prefix():
    # two answers of one group; the first has two segments (tokens 0-2, 3-5), the second ended after one
    scores = ChunkScores(rewards=[[1.0, 3.0], [2.0]], starts=[[0, 3], [0]])
    adv = chunk_advantages(scores, group=2, width=6, scale="none")
    # chunk 1: mean 1.5; chunk 2: the second answer stands with its final reward 2.0, mean 2.5
    assert adv[0].tolist() == [-0.5] * 3 + [0.5] * 3
    assert adv[1].tolist() == [0.5] * 6
    scaled = chunk_advantages(scores, group=2, width=6, scale="group")
    assert math.isclose(scaled[0, 0].item(), -0.5 / (math.sqrt(0.5) + 1e-4), rel_tol=1e-5)


def test_a_rollout_that_could_not_be_scored_gets_no_chunk_advantage():
    scores = ChunkScores(rewards=[[math.nan], [1.0], [3.0]], starts=[[0], [0], [0]])
    adv = chunk_advantages(scores, group=3, width=2, scale="none")
    assert adv[0].tolist() == [0.0, 0.0] and adv[1].tolist() == [-1.0, -1.0] and adv[2].tolist() == [1.0, 1.0]


# --- rollouts ---------------------------------------------------------------------------------------------


class FakeTrainer:
    """What the rollout function reads of TRL's trainer: the step and the process."""

    def __init__(self, step=0, rank=0):
        self.state = type("State", (), {"global_step": step})()
        self.accelerator = type("Accelerator", (), {"process_index": rank})()


def make_rollouts(tmp_path, prompts, words, disc, batch_size=4, hidden="train", **tables):
    from reempathy.backbones.tiny import TinyOptions, load_tiny
    from reempathy.data.testset import read_records
    from reempathy.runner import loop_options
    from reempathy.training.grpo import grpo_prompts
    from reempathy.training.rollouts import Rollouts

    cfg = load_grpo_config(None, data=grpo_config(tmp_path, prompts, words, **tables), registry=disc.registry)
    backbone = load_tiny(TinyOptions())
    data = read_records(prompts)
    ready = grpo_prompts(data, backbone, None)
    messages = {r.id: [m.to_json() for m in r.prompt] for r in data.records}
    options = disc.registry.validate("strategy", cfg.decode.strategy.name, cfg.decode.strategy.options).model_dump(mode="json")
    return Rollouts(backbone, cfg.decode, disc.registry, ready, messages, loop_options(cfg.decode), batch_size,
                    hidden == "train", options)


def test_each_completion_is_a_row_of_the_batched_decoder_and_the_batch_size_changes_nothing(tmp_path, prompts, words, disc):
    asked = ["1", "1", "1", "2", "2", "2"]
    one = make_rollouts(tmp_path, prompts, words, disc, batch_size=1)(asked, FakeTrainer(step=3))
    many = make_rollouts(tmp_path, prompts, words, disc, batch_size=6)(asked, FakeTrainer(step=3))
    assert one["completion_ids"] == many["completion_ids"] and one["logprobs"] is None
    assert len({tuple(c) for c in one["completion_ids"]}) == 6  # each completion its own seed
    for ids, mask, rollout in zip(one["completion_ids"], one["env_mask"], one["rollout"]):
        assert ids == rollout.trace.ids and mask == rollout.trace.loss_mask(True)
        assert rollout.result.strategy == "reempathy"
    assert any(r.result.hidden for r in one["rollout"])  # reflections between chunks
    assert [r.index for r in one["rollout"]] == [0, 1, 2, 0, 1, 2]


def test_rollouts_of_another_step_or_process_draw_other_answers(tmp_path, prompts, words, disc):
    rollouts = make_rollouts(tmp_path, prompts, words, disc)
    first = rollouts(["1", "1"], FakeTrainer(step=0))["completion_ids"]
    assert rollouts(["1", "1"], FakeTrainer(step=0))["completion_ids"] == first
    assert rollouts(["1", "1"], FakeTrainer(step=1))["completion_ids"] != first
    assert rollouts(["1", "1"], FakeTrainer(step=0, rank=1))["completion_ids"] != first


def test_masked_hidden_tokens_leave_the_env_mask(tmp_path, prompts, words, disc):
    out = make_rollouts(tmp_path, prompts, words, disc, hidden="mask")(["1", "1", "2", "2"], FakeTrainer())
    for mask, rollout in zip(out["env_mask"], out["rollout"]):
        assert mask == [int(r not in (HIDDEN, FORCED)) for r in rollout.trace.roles]
    assert any(HIDDEN in r.trace.roles for r in out["rollout"])


def test_segments_begin_where_spoken_chunks_begin(tmp_path, prompts, words, disc, tiny):
    out = make_rollouts(tmp_path, prompts, words, disc)(["1"], FakeTrainer())
    rollout = out["rollout"][0]
    cut = segments(rollout, tiny)
    chunks = rollout.result.chunks
    assert cut.starts[0] == 0 and len(cut.starts) == len(chunks) >= 2
    offset = len(rollout.result.prompt_ids)
    assert cut.starts[1:] == [c.start - offset for c in chunks[1:]]
    # each segment but the last ends with the reflection after its chunk
    assert rollout.trace.labels[cut.starts[1] - 2] == "reflection" or rollout.trace.roles[cut.starts[1] - 1] == FORCED
    assert cut.prefixes[-1][1] == rollout.result.audio_units


# --- training ---------------------------------------------------------------------------------------------


def test_grpo_trains_a_checkpoint_that_decodes_with_its_strategy_and_records_the_reward(tmp_path, prompts, words, disc):
    from reempathy.training.grpo import train_grpo

    cfg = load_grpo_config(None, data=grpo_config(tmp_path, prompts, words), registry=disc.registry)
    result = train_grpo(cfg, disc.registry, progress=False)
    manifest = json.loads((tmp_path / "grpo" / "reempathy.json").read_text())
    assert result.steps == 2 and manifest["steps"] == 2
    assert manifest["strategy"]["name"] == "reempathy" and manifest["chunk_layout"] == {"text_tokens": 5, "audio_tokens": 10}
    training = manifest["training"]
    assert training["method"] == "grpo" and training["reward"]["evaluator"] == "target-words"
    assert len(training["rewards"]["per_step"]) == 2 and training["rewards"]["per_step"] == result.rewards
    assert training["rollouts"]["processors"] == [{"name": "attention-reweight", "factor": 1.15, "layers": "0-1"}]
    assert main(["decode", "--checkpoint", str(tmp_path / "grpo"), "--prompt", "I lost my job.",
                 "--set", "decode.max_new_tokens=20"]) == 0


def test_a_grpo_run_resumes_from_its_last_checkpoint_with_the_same_rollouts(tmp_path, prompts, words, disc):
    from reempathy.training.grpo import train_grpo

    # one prompt per step: the three steps stay within one pass over the four prompts (TRL's sampler order)
    one = {"max_steps": 3, "batch_size": 4}
    whole = train_grpo(load_grpo_config(None, data=grpo_config(tmp_path / "a", prompts, words, train=one),
                                        registry=disc.registry), disc.registry, progress=False)
    cut = grpo_config(tmp_path / "b", prompts, words, train={**one, "max_steps": 2})
    train_grpo(load_grpo_config(None, data=cut, registry=disc.registry), disc.registry, progress=False)
    cut["train"].update(max_steps=3, resume=True)
    resumed = train_grpo(load_grpo_config(None, data=cut, registry=disc.registry), disc.registry, progress=False)
    assert resumed.resumed_from.endswith("checkpoint-2")
    assert resumed.rewards == pytest.approx(whole.rewards)
    # the manifest counts the rollouts before the resumption too (saved with each checkpoint-N)
    assert resumed.manifest.training["rollouts"]["rows"] == whole.manifest.training["rollouts"]["rows"] == 12
    assert resumed.manifest.longest == whole.manifest.longest


def test_a_checkpoint_without_the_rollout_counts_resumes_and_says_the_manifest_counts_from_there(tmp_path, prompts, words, disc):
    from reempathy.training.grpo import ROLLOUT_STATE, train_grpo

    data = grpo_config(tmp_path, prompts, words, train={"max_steps": 1})
    train_grpo(load_grpo_config(None, data=data, registry=disc.registry), disc.registry, progress=False)
    (tmp_path / "grpo" / "checkpoint-1" / ROLLOUT_STATE).unlink()  # as a checkpoint written before the counts were kept
    (tmp_path / "grpo" / "reempathy.json").unlink()
    (tmp_path / "grpo" / "adapter_model.safetensors").unlink()
    data["train"].update(max_steps=2, resume=True)
    notes: list[str] = []
    resumed = train_grpo(load_grpo_config(None, data=data, registry=disc.registry), disc.registry, progress=False,
                         on_note=notes.append)
    assert any(f"has no {ROLLOUT_STATE}: the manifest counts the rollouts from here on only" in n for n in notes), notes
    assert resumed.manifest.training["rollouts"]["rows"] == 8  # the one step after the resumption


def test_a_changed_reward_is_refused_on_resume(tmp_path, prompts, words, disc):
    from reempathy.training.grpo import train_grpo

    data = grpo_config(tmp_path, prompts, words, train={"max_steps": 1})
    train_grpo(load_grpo_config(None, data=data, registry=disc.registry), disc.registry, progress=False)
    data["train"].update(max_steps=2, resume=True)
    data["reward"]["penalties"] = {"length": 0.1}
    with pytest.raises(ConfigError, match="cannot resume, the run's reward changed"):
        train_grpo(load_grpo_config(None, data=data, registry=disc.registry), disc.registry, progress=False)


def test_rollout_batch_size_and_the_evaluators_runtime_options_may_change_on_resume(tmp_path, prompts, words, disc):
    from reempathy.training.grpo import train_grpo

    data = grpo_config(tmp_path, prompts, words, train={"max_steps": 1})
    train_grpo(load_grpo_config(None, data=data, registry=disc.registry), disc.registry, progress=False)
    data["train"].update(max_steps=2, resume=True)
    data["grpo"]["rollout_batch_size"] = 3  # rows per forward call: every row keeps its own seed
    data["reward"]["options"]["workers"] = 4  # the evaluator's runtime option
    resumed = train_grpo(load_grpo_config(None, data=data, registry=disc.registry), disc.registry, progress=False)
    assert resumed.resumed_from.endswith("checkpoint-1") and resumed.steps == 2


def test_chunk_credit_trains_with_per_token_advantages(tmp_path, prompts, words, disc):
    from reempathy.training.grpo import train_grpo

    cfg = load_grpo_config(None, data=grpo_config(tmp_path, prompts, words, grpo={"credit": "chunk"}), registry=disc.registry)
    result = train_grpo(cfg, disc.registry, progress=False)
    assert result.steps == 2 and result.manifest.training["grpo"]["credit"] == "chunk"


@pytest.mark.parametrize("hidden", ["train", "mask"])
def test_hidden_tokens_get_gradient_in_grpo_and_none_when_masked(tmp_path, prompts, words, disc, hidden):
    import torch

    from reempathy.evaluation.registry import build_evaluator
    from reempathy.training.grpo import make_grpo_trainer, strategy_delimiters
    from reempathy.training.rewards import RewardFunction
    from test_traces import final_hidden_grads

    data = grpo_config(tmp_path, prompts, words, grpo={"hidden": hidden, "beta": 0.0})
    cfg = load_grpo_config(None, data=data, registry=disc.registry)
    rollouts = make_rollouts(tmp_path, prompts, words, disc, hidden=hidden)
    backbone = rollouts.backbone
    evaluator = build_evaluator(disc.registry, "target-words", {"words": words})
    reward = RewardFunction(cfg.reward, evaluator, scalar_rule(cfg.reward, disc.registry, ("share",)), backbone, False)
    trainer = make_grpo_trainer(cfg, backbone, rollouts, reward, strategy_delimiters(cfg, backbone, disc.registry), None, (), False)
    batch = trainer._generate_and_score_completions([{"prompt": "1"}] * 4)
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])  # any rewards: the question is which tokens learn
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this test does not run
    grads = final_hidden_grads(trainer.model, lambda: trainer.compute_loss(trainer.model, batch))
    width = batch["prompt_ids"].shape[1]
    for row, rollout in enumerate(rollouts_of(batch, rollouts)):
        for c, role in enumerate(rollout.trace.roles):
            got = grads[row, width + c - 1].abs().sum().item()
            if role == FORCED or (role == HIDDEN and hidden == "mask"):
                assert got == 0.0
            else:
                assert got > 0.0


def rollouts_of(batch, rollouts):
    """The rollouts of the batch TRL built, matched to its rows by their completion ids."""
    # TRL keeps the rows in the order the rollout function returned them
    rows = []
    last = rollouts.last
    for row in range(batch["completion_ids"].shape[0]):
        ids = batch["completion_ids"][row][: len(last[row].trace.ids)].tolist()
        assert ids == last[row].trace.ids
        rows.append(last[row])
    return rows


def test_the_shipped_grpo_config_trains_through_the_cli(tmp_path, capsys):
    out = tmp_path / "grpo"
    code = main(["train", "--config", str(ROOT / "configs" / "train-grpo.toml"), "--max-steps", "1", "--quiet",
                 "--set", f"train.output_dir={json.dumps(str(out))}", "--set", "decode.max_new_tokens=12",
                 "--set", f"data.path={json.dumps(str(EXAMPLES))}"])
    said = capsys.readouterr().out
    assert code == 0 and "trained 'grpo' for 1 steps on 34 prompts" in said
    manifest = json.loads((out / "reempathy.json").read_text())
    assert manifest["training"]["reward"]["evaluator"] == "keyword-empathy" and manifest["strategy"]["name"] == "reempathy"


def test_the_share_reward_counts_words_of_the_target_list():
    assert share("I feel sorry for you", {"feel", "you"}) == 0.4
    assert share("", {"feel"}) == 0.0
