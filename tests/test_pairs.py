"""``reempathy pairs``: on-policy DPO pairs sampled from a tiny trained checkpoint, scored by a scripted evaluator (issue 12 §5)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data_evaluators import Scripted, ScriptedPlugin, unit_scores
from reempathy.cli import main
from reempathy import registry as registry_module
from reempathy.evaluation.base import Evaluation
from reempathy.data.records import load_records
from reempathy.training.pairs import NoPair, pick_pair, sample_seed, score_total

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "empathy_dialogues.jsonl"
# Long enough for a spoken answer with audio on the tiny backbone's 13+26 stream.
SHORT = ["--set", "decode.max_new_tokens=40"]


@pytest.fixture(scope="module")
def scripted_discovery():
    """The scripted evaluator, found through the real discovery hook, for every test of this module."""
    registry_module.default_discovery.cache_clear()
    disc = registry_module.discover(extra_plugins=[("scripted-evaluators", ScriptedPlugin())])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry_module, "default_discovery", lambda: disc)
        yield disc
    registry_module.default_discovery.cache_clear()


@pytest.fixture()
def scripted(scripted_discovery):
    Scripted.reset()
    yield Scripted
    Scripted.reset()


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny sft checkpoint (two steps): the policy the pairs are sampled from."""
    from reempathy.training.config import load_train_config
    from reempathy.training.train import train

    tmp = tmp_path_factory.mktemp("policy")
    cfg = load_train_config(None, data={
        "backbone": {"name": "tiny"}, "strategy": {"name": "sft"}, "data": {"path": str(EXAMPLES)},
        "train": {"output_dir": str(tmp / "sft"), "max_steps": 2, "batch_size": 2, "save_steps": 100},
    })
    return train(cfg, progress=False).output_dir


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Three example dialogues (their answers are not used: the policy answers)."""
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("\n".join(EXAMPLES.read_text(encoding="utf-8").splitlines()[:3]) + "\n", encoding="utf-8")
    return path


def pairs(policy, data, out, *extra: str, samples: int = 3) -> int:
    return main(["pairs", "--checkpoint", str(policy), "--data", str(data), "--samples", str(samples),
                 "--evaluator", "scripted", "--out", str(out), "--quiet", *SHORT, *extra])


@pytest.fixture(scope="module")
def reference(scripted_discovery, policy, prompts, tmp_path_factory):
    """One uninterrupted run (batch size 4): what every other run of the same settings must equal."""
    out = tmp_path_factory.mktemp("reference") / "pairs.jsonl"
    Scripted.reset()
    assert pairs(policy, prompts, out, "--batch-size", "4") == 0
    return out


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def total(message: dict) -> float:
    return sum(unit_scores(len(message.get("units") or [])).values())


def test_each_pair_is_the_best_and_the_worst_scored_sample(reference, prompts):
    written = records(reference)
    assert written, "the scripted scores should give at least one pair"
    ids = [str(n) for n in range(1, 4)]
    for doc in written:
        assert doc["id"] in ids
        prompt = json.loads(prompts.read_text().splitlines()[int(doc["id"]) - 1])["messages"][:-1]
        assert [(m["role"], m["text"], m["units"]) for m in doc["messages"][:-1]] == \
               [(m["role"], m["text"], m["units"]) for m in prompt]
        chosen, rejected = doc["messages"][-1], doc["rejected"]
        meta = doc["sampled"]
        totals = [s["total"] for s in meta["samples"] if s["total"] is not None]
        assert total(chosen) == max(totals) and total(rejected) == min(totals) and max(totals) > min(totals)
        assert doc["assessment"]["scores"] == unit_scores(len(chosen["units"]))
        assert rejected["assessment"]["scores"] == unit_scores(len(rejected["units"]))
        # Ties go to the earlier sample: the chosen index is the first with the best total.
        assert meta["chosen"] == next(s["index"] for s in meta["samples"] if s["total"] == max(totals))


def test_each_sample_is_a_row_with_its_own_seed_and_the_batch_size_changes_nothing(scripted, policy, prompts, reference, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert pairs(policy, prompts, out, "--batch-size", "1") == 0
    assert out.read_bytes() == reference.read_bytes()
    for doc in records(out):
        assert [s["seed"] for s in doc["sampled"]["samples"]] == [sample_seed(0, doc["id"], i) for i in range(3)]
    # The evaluator is asked once per prompt, about that prompt's usable samples.
    assert sorted(c[0].split("#")[0] for c in scripted.calls) == ["1", "2", "3"]
    assert all(len({i.split("#")[0] for i in c}) == 1 for c in scripted.calls)


def test_the_pairs_file_trains_a_dpo_checkpoint_unchanged(reference, tiny, tmp_path):
    from reempathy.training.builders import build_dpo

    for sr in load_records(reference, tiny.layout.audio_count).records:
        pair = build_dpo(sr, tiny)
        assert pair is not None and not pair.swapped  # the chosen answer stays chosen
    config = tmp_path / "train-dpo.toml"
    config.write_text(f'[backbone]\nname = "tiny"\n[strategy]\nname = "dpo"\n[data]\npath = "{reference}"\n'
                      f'[train]\noutput_dir = "{tmp_path / "dpo"}"\nmax_steps = 2\nbatch_size = 2\nsave_steps = 100\n')
    assert main(["train", "--config", str(config), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "dpo" / "reempathy.json").read_text())
    assert manifest["training"]["method"] == "dpo" and manifest["training"]["records"] == len(records(reference))
    assert manifest["strategy"]["name"] == "sft"


def test_an_interrupted_run_resumes_without_duplicates_or_torn_lines(scripted, policy, prompts, reference, tmp_path):
    out = tmp_path / "pairs.jsonl"
    scripted.crash_on_call = 2  # the evaluator's own code fails on the second prompt
    assert pairs(policy, prompts, out, "--batch-size", "4") != 0
    partial = Path(f"{out}.partial")
    done = records(partial)
    assert len(done) == 1 and not out.exists()
    with partial.open("a") as fh:  # and the process died in the middle of the next line
        fh.write('{"id": "2", "line": 2, "record": {"mess')
    scripted.reset()
    assert pairs(policy, prompts, out, "--batch-size", "4") == 0
    asked = {item.id.split("#")[0] for item in scripted.items}
    assert done[0]["id"] not in asked and len(asked) == 2  # the prompt done is not sampled or scored again
    assert out.read_bytes() == reference.read_bytes()  # each pair once, in data order, as an uninterrupted run


def test_a_bad_record_names_its_line_and_nothing_is_written(scripted, policy, tmp_path, capsys):
    lines = EXAMPLES.read_text(encoding="utf-8").splitlines()[:2]
    data = tmp_path / "prompts.jsonl"
    data.write_text(lines[0] + "\n" + '{"messages": [{"role": "assistant", "text": "hi"}]}' + "\n" + lines[1] + "\n")
    out = tmp_path / "pairs.jsonl"
    assert pairs(policy, data, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{data}:2: the record has no prompt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"] and scripted.calls == []


def test_a_prompt_given_only_as_a_wav_is_refused_naming_its_line(scripted, policy, tmp_path, capsys):
    from reempathy.speech.audio import write_wav
    import torch

    write_wav(tmp_path / "user.wav", torch.zeros(1600), 16000)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "audio": "user.wav"}]}) + "\n")
    assert pairs(policy, data, tmp_path / "pairs.jsonl") == 2
    err = capsys.readouterr().err
    assert f"{data}:1: the prompt is read from a WAV ('audio'), which a training record does not carry" in err


def test_prompts_whose_samples_all_tie_give_no_pair_and_are_counted(scripted, policy, prompts, tmp_path, capsys):
    scripted.constant = True
    out = tmp_path / "pairs.jsonl"
    assert pairs(policy, prompts, out, "--batch-size", "9") == 0
    assert out.read_text() == ""
    said = capsys.readouterr().out
    assert "0 pairs made" in said and "no pair for 3 (all samples tied" in said
    # The reference run of the same samples made pairs, so some of these prompts had two usable samples.
    assert re.search(r"all samples tied [1-3]", said)


def test_a_failed_sample_is_left_out_and_a_prompt_left_without_a_pair_by_failures_is_retried(
    scripted, policy, prompts, reference, tmp_path, capsys
):
    out = tmp_path / "pairs.jsonl"
    scripted.fail = {f"2#{i}" for i in range(3)}  # every sample of prompt 2
    assert pairs(policy, prompts, out, "--batch-size", "9") == 1
    err = capsys.readouterr().err
    assert re.search(rf"first: {re.escape(str(prompts))}:2: no pair: sample \d: the evaluator failed: scripted failure", err)
    assert "rerun" in err and not out.exists()
    scripted.reset()
    assert pairs(policy, prompts, out, "--batch-size", "9") == 0
    assert {item.id.split("#")[0] for item in scripted.items} == {"2"}
    assert out.read_bytes() == reference.read_bytes()


def test_skip_bad_finishes_without_the_prompts_the_evaluator_failed_on(scripted, policy, prompts, reference, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    scripted.fail = {f"1#{i}" for i in range(3)}
    assert pairs(policy, prompts, out, "--batch-size", "9", "--skip-bad") == 0
    assert [d["id"] for d in records(out)] == [d["id"] for d in records(reference) if d["id"] != "1"]
    assert "1 prompts failed in the evaluator" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "sampling.greedy=true"], "greedy decoding gives the same answer every time"),
        (["--samples", "1"], "--samples must be at least 2"),
        (["--set", "nonsense=1"], "nonsense"),
    ],
)
def test_settings_that_cannot_make_pairs_are_refused_in_one_line(scripted, policy, prompts, tmp_path, capsys, extra, message):
    args = ["pairs", "--checkpoint", str(policy), "--data", str(prompts), "--samples", "3", "--evaluator", "scripted",
            "--out", str(tmp_path / "pairs.jsonl"), "--quiet", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not any(tmp_path.iterdir())


def test_pick_pair_takes_the_best_and_the_worst_and_the_earlier_of_equals():
    assert pick_pair([3.0, 5.0, 1.0, 5.0, 1.0]) == (1, 2)
    assert pick_pair([None, 2.0, None, 4.0]) == (3, 1)
    assert pick_pair([2.0, 2.0, None]) == NoPair("tie", "all 2 scored samples have the same total, 2")
    assert pick_pair([None, 7.0, None]).code == "too-few"


def test_a_score_total_is_the_sum_of_the_evaluators_score_names():
    names = ("a", "b")
    assert score_total(Evaluation("x", {"a": 2.0, "b": 3.0, "c": 9.0}), names) == 5.0
    assert score_total(Evaluation("x", {"a": 2.0}), names) == "the evaluation has no score 'b'"
    assert score_total(Evaluation("x", {}, None, "HTTP 500"), names) == "the evaluator failed: HTTP 500"
