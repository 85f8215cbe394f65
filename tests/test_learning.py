"""On-policy training learns (issue 23, done-when): GRPO and two rounds of whole-trace DPO raise the mean reward.

The reward is a user's plugin (``tests/reward_plugins.py``): the share (GRPO) or the number (DPO)
of spoken words from a target list, registered with ``reward=``. The policy is the tiny backbone
with 16 audio units (a random model that speaks words often enough for a reward to find them), the
``reempathy`` strategy with attention reweighting: every rollout reflects between its spoken
chunks, and the reflections are in the loss. Three seeds each, fixed; one CPU thread, so that the
sampled tokens do not depend on the machine's thread count.

These are the slowest tests of the suite (about a minute each on a quiet 2-core machine); the
learning curves they check are in docs/training.md ("What is verified only on tiny models").
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from reward_plugins import TargetWordsPlugin, count, tiny_target_words
from reempathy import registry as registry_module

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "empathy_dialogues.jsonl"
SEEDS = (0, 1, 2)
BACKBONE = {"name": "tiny", "audio_units": 16}
STRATEGY = {"name": "reempathy", "text_tokens": 5, "audio_tokens": 10, "max_reflection_tokens": 4}
REWEIGHT = {"name": "attention-reweight", "factor": 1.15, "layers": "0-1"}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def disc():
    return registry_module.discover(extra_plugins=[("target-words-plugin", TargetWordsPlugin())], installed=False)


@pytest.fixture(scope="module")
def words():
    from reempathy.backbones.tiny import TinyOptions, load_tiny

    return tiny_target_words(load_tiny(TinyOptions(audio_units=16)).tokenizer, 3)


def text_prompts(path: Path, copies: int, first: int | None = None) -> Path:
    """The example dialogues' user turns as text prompts (units are for 1024 audio units), ``copies`` times, unique ids."""
    turns = [json.loads(line)["messages"][0]["text"] for line in EXAMPLES.read_text(encoding="utf-8").splitlines()]
    turns = turns[:first] if first else turns
    lines = [json.dumps({"id": str(n), "messages": [{"role": "user", "text": text}]})
             for n, text in enumerate((t for _ in range(copies) for t in turns), start=1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_raises_the_mean_reward(tmp_path, disc, words, seed):
    from reempathy.training.grpo import train_grpo
    from reempathy.training.grpo_config import load_grpo_config

    data = {
        "backbone": BACKBONE, "strategy": STRATEGY, "processors": [REWEIGHT],
        "sampling": {"temperature": 1.0, "seed": seed}, "decode": {"max_new_tokens": 24},
        "data": {"path": str(text_prompts(tmp_path / "prompts.jsonl", 1, first=8))},
        "train": {"output_dir": str(tmp_path / "grpo"), "max_steps": 24, "learning_rate": 0.1, "batch_size": 16,
                  "seed": seed, "save_steps": 1000},
        "grpo": {"num_generations": 8, "beta": 0.04},
        "reward": {"evaluator": "target-words", "options": {"words": words}},
    }
    result = train_grpo(load_grpo_config(None, data=data, registry=disc.registry), disc.registry, progress=False)
    rewards = result.manifest.training["rewards"]
    assert len(rewards["per_step"]) == 24 and all(r is not None for r in rewards["per_step"])
    # the last tenth of the steps (their mean reward) clearly above the first tenth
    assert rewards["last_tenth"] >= rewards["first_tenth"] + 0.2, rewards["per_step"]


def policy_reward(cfg, registry, words, prompts: Path, samples: int = 4) -> float:
    """The mean number of target words in ``samples`` sampled answers to each prompt, with fixed seeds."""
    from reempathy.data.testset import check_records, read_records
    from reempathy.decoding.batch import RowRequest, decode_batch
    from reempathy.runner import build_plugins, load_backbone, loop_options, run_config

    cfg = run_config(cfg)
    backbone = load_backbone(cfg, registry)
    data = read_records(prompts)
    ready = check_records(data, backbone)

    def requests():
        for record in data.records:
            for i in range(samples):
                strategy, processors = build_plugins(cfg, backbone, registry)
                yield RowRequest((record.id, i), ready[record.index].ids, strategy, processors, seed=1000 + i)

    target = set(words)
    return statistics.mean(count(result.spoken_text, target) for _, result in decode_batch(backbone, requests(), loop_options(cfg), 32))


@pytest.mark.parametrize("seed", SEEDS)
def test_two_rounds_of_whole_trace_dpo_raise_the_mean_reward(tmp_path, disc, words, seed):
    from reempathy.config import load_config
    from reempathy.training.config import load_train_config
    from reempathy.training.pairs import PairsOptions, make_pairs
    from reempathy.training.train import train

    registry = disc.registry
    prompts = text_prompts(tmp_path / "prompts.jsonl", 4)
    heldout = text_prompts(tmp_path / "measure.jsonl", 1)
    decode = ['backbone.name="tiny"', "backbone.audio_units=16", 'strategy.name="reempathy"', "strategy.text_tokens=5",
              "strategy.audio_tokens=10", "strategy.max_reflection_tokens=6", 'processors.0.name="attention-reweight"',
              "processors.0.factor=1.15", 'processors.0.layers="0-1"', "sampling.temperature=1.0",
              f"sampling.seed={seed}", "decode.max_new_tokens=24"]

    def policy(checkpoint):
        keep = [o for o in decode if not (checkpoint and o.startswith(("backbone.", "strategy.")))]
        return load_config(None, keep + ([f"decode.checkpoint={json.dumps(str(checkpoint))}"] if checkpoint else []), None, registry)

    def pairs(checkpoint, name):
        out = tmp_path / name
        make_pairs(policy(checkpoint), registry, PairsOptions(
            data=str(prompts), out=str(out), samples=4, evaluator="target-words",
            evaluator_options={"words": words, "score": "count"}, batch_size=32, progress=False))
        return out

    def dpo(data, name, start=None):
        settings = {"output_dir": str(tmp_path / name), "max_steps": 34, "learning_rate": 0.02, "batch_size": 4,
                    "seed": seed, "save_steps": 1000}
        if start is not None:
            settings["init_from"] = str(start)
        cfg = load_train_config(None, data={"backbone": BACKBONE, "strategy": {"name": "dpo", "beta": 0.1},
                                            "data": {"path": str(data)}, "train": settings})
        return train(cfg, progress=False)

    first = dpo(pairs(None, "pairs-1.jsonl"), "dpo-1")
    second = dpo(pairs(first.output_dir, "pairs-2.jsonl"), "dpo-2", start=first.output_dir)
    assert second.manifest.training["init_from"]["path"] == str(first.output_dir)
    assert second.manifest.strategy.name == "reempathy"  # trained on reempathy traces, decodes with reempathy
    before = policy_reward(policy(None), registry, words, heldout)
    after = policy_reward(policy(second.output_dir), registry, words, heldout)
    assert after >= before + 0.5, (before, after)
