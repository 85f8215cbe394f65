"""``reempathy sweep``: a grid or listed runs, each a resumable run; the shipped sweep configs (issue 10 §4)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

import reempathy.runner
from reempathy.cli import main
from reempathy.errors import ConfigError
from reempathy.experiments.sweep import parse_grid, plan_sweep, split_values, toml_value

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "empathy_dialogues.jsonl"
HELDOUT = ROOT / "examples" / "heldout.jsonl"
CONFIG = ROOT / "configs" / "reempathy.toml"
FEW = ["--set", "decode.max_new_tokens=10"]
# The shipped sweeps budget by spoken tokens (160, guard 640): a short answer sets both.
FEW_SPOKEN = ["--set", "decode.max_spoken_tokens=6", "--set", "decode.max_new_tokens=24"]


@pytest.fixture()
def data(tmp_path) -> Path:
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(EXAMPLES.read_text(encoding="utf-8").splitlines()[:2]) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def loads(monkeypatch) -> list[str]:
    """Records each backbone load (its checkpoint, or None)."""
    seen: list[str] = []
    real = reempathy.runner.load_backbone

    def counting(cfg, registry):
        seen.append(cfg.decode.checkpoint and Path(cfg.decode.checkpoint).name)
        return real(cfg, registry)

    monkeypatch.setattr(reempathy.runner, "load_backbone", counting)
    return seen


def _results(run_dir: Path) -> list[tuple]:
    docs = [json.loads(line) for line in (run_dir / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(d["id"], d["result"]["ids"], d["result"]["stop_reason"]) for d in docs]


def test_a_2x2_grid_makes_four_runs_and_a_report_with_four_rows(tmp_path, data, loads, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(CONFIG), "--data", str(data), "--out", str(out), "--limit", "1", *FEW,
            "--grid", "strategy.text_tokens=3,5", "--grid", "processors.0.factor=1.0,1.2"]  # fmt: skip
    assert main(argv) == 0
    names = [r["name"] for r in json.loads((out / "sweep.json").read_text())["runs"]]
    assert names == [
        "strategy.text_tokens=3,processors.0.factor=1.0",
        "strategy.text_tokens=3,processors.0.factor=1.2",
        "strategy.text_tokens=5,processors.0.factor=1.0",
        "strategy.text_tokens=5,processors.0.factor=1.2",
    ]
    for name in names:
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert manifest["config"]["strategy"]["text_tokens"] == manifest["settings"]["strategy.text_tokens"]
        assert manifest["config"]["processors"][0]["factor"] == manifest["settings"]["processors.0.factor"]
        assert len(_results(out / name)) == 1
    assert loads == [None]  # one backbone for the whole grid: only strategy/processor settings change
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[: lines.index("")] if "" in lines else lines  # a note on budget hits may follow the table
    assert table[0].startswith("| run") and "strategy.text_tokens" in table[0] and "processors.0.factor" in table[0]
    assert len(table) == 2 + 4 and all(row.split("|")[1].strip() in names for row in table[2:])


def test_a_rerun_of_a_sweep_decodes_nothing_again(tmp_path, data, capsys):
    argv = ["sweep", "--config", str(CONFIG), "--data", str(data), "--out", str(tmp_path / "s"), "--limit", "1",
            *FEW, "--grid", "processors.0.factor=1.0,1.2"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("0 records decoded (1 done before)") == 2


def test_a_sub_run_answers_exactly_as_a_run_of_its_config(tmp_path, data, checkpoints):
    ckpt = checkpoints / "reempathy"
    argv = ["sweep", "--config", str(CONFIG), "--data", str(data), "--out", str(tmp_path / "s"), "--limit", "1", *FEW,
            "--set", f"decode.checkpoint={json.dumps(str(ckpt))}", "--grid", "strategy.reflect=true,false"]  # fmt: skip
    assert main(argv) == 0
    for reflect in ("true", "false"):
        single = tmp_path / f"run-{reflect}"
        assert main(["run", "--config", str(CONFIG), "--data", str(data), "--out", str(single), "--limit", "1", *FEW,
                     "--checkpoint", str(ckpt), "--set", f"strategy.reflect={reflect}"]) == 0  # fmt: skip
        assert _results(tmp_path / "s" / f"strategy.reflect={reflect}") == _results(single)


def test_an_unknown_grid_key_is_named_and_nothing_is_written(tmp_path, data, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(CONFIG), "--data", str(data), "--out", str(out),
                 "--grid", "strategy.text_tokenz=3,5"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--grid strategy.text_tokenz=3" in err and "unknown option" in err
    assert not out.exists()


def test_a_grid_value_of_the_wrong_type_is_named_and_nothing_is_written(tmp_path, data, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(CONFIG), "--data", str(data), "--out", str(out),
                 "--grid", "processors.0.factor=1.1,high"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--grid processors.0.factor=high" in err and "'high'" in err
    assert not out.exists()


def test_a_sub_run_of_another_config_is_refused_before_any_sub_run_starts(tmp_path, data, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(CONFIG), "--data", str(data), "--out", str(out), "--limit", "1",
            "--grid", "processors.0.factor=1.0,1.2"]  # fmt: skip
    assert main([*argv, *FEW]) == 0
    first = out / "processors.0.factor=1.0" / "results.jsonl"
    before = first.read_bytes()
    capsys.readouterr()
    assert main([*argv, "--set", "decode.max_new_tokens=11"]) == 2
    assert "decode.max_new_tokens: 10 there, 11 now" in capsys.readouterr().err
    assert first.read_bytes() == before


def test_grid_values_split_only_on_commas_outside_brackets_and_quotes():
    assert split_values('1.0,[2, 3],"a,b",x') == ["1.0", "[2, 3]", '"a,b"', "x"]
    assert parse_grid(['processors.0.layers="0-1",[0, 1]', "sampling.greedy=true,false"]) == {
        "processors.0.layers": ["0-1", [0, 1]],
        "sampling.greedy": [True, False],
    }
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["sampling.seed=1,1"])
    with pytest.raises(ConfigError, match="empty"):
        parse_grid(["sampling.seed=1,,2"])


def test_config_values_are_handed_to_the_config_reader_unchanged():
    for value in [1, 1.5, 1e300, float("inf"), True, "a \"quoted\" ü\x7f\n", [1, "x"], {"10": [0, 1], "a b": 2.0}]:
        assert tomllib.loads(f"v = {toml_value(value)}")["v"] == value
    with pytest.raises(ConfigError, match="no TOML form"):
        toml_value(None, "decode.prompt")


# --- the shipped sweep configs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """One-step tiny checkpoints named as ``reempathy demo`` names them (sft, cotbs, reempathy, dpo)."""
    from reempathy.training.config import load_train_config
    from reempathy.training.train import train

    root = tmp_path_factory.mktemp("checkpoints")
    for name in ("sft", "cotbs", "reempathy", "dpo"):
        cfg = load_train_config(
            ROOT / "configs" / f"train-{name}.toml",
            [f"train.output_dir={json.dumps(str(root / name))}", "train.max_steps=1", "train.save_steps=1",
             f"data.path={json.dumps(str(EXAMPLES))}"],  # fmt: skip
        )
        train(cfg, progress=False)
    return root


def test_the_table5_sweep_decodes_each_checkpoint_and_the_reflection_ablation(tmp_path, checkpoints, loads):
    out = tmp_path / "table5"
    assert main(["sweep", "--config", str(ROOT / "configs" / "sweep-table5.toml"), "--checkpoints", str(checkpoints),
                 "--data", str(HELDOUT), "--limit", "1", "--out", str(out), *FEW_SPOKEN]) == 0  # fmt: skip
    runs = {r["name"]: json.loads((out / r["dir"] / "manifest.json").read_text())
            for r in json.loads((out / "sweep.json").read_text())["runs"]}  # fmt: skip
    assert list(runs) == ["untuned", "sft", "dpo", "cotbs", "reempathy", "reempathy-reflect-off"]
    assert {n: m["config"]["strategy"]["name"] for n, m in runs.items()} == {
        "untuned": "sft", "sft": "sft", "dpo": "sft", "cotbs": "cotbs", "reempathy": "reempathy",
        "reempathy-reflect-off": "reempathy",
    }  # fmt: skip
    assert runs["untuned"]["checkpoint"] is None  # the backbone as it ships: the paper's baseline row
    assert runs["reempathy"]["config"]["strategy"]["reflect"] is True
    assert runs["reempathy-reflect-off"]["config"]["strategy"]["reflect"] is False
    assert runs["reempathy-reflect-off"]["checkpoint"]["path"] == str((checkpoints / "reempathy").resolve())
    assert loads == [None, "sft", "dpo", "cotbs", "reempathy"]  # the ablation reuses the reempathy backbone
    reflections = [json.loads(l)["result"]["hidden"] for l in (out / "reempathy-reflect-off" / "results.jsonl").open()]
    assert reflections == [[]]
    assert {m["config"]["decode"]["max_spoken_tokens"] for m in runs.values()} == {6}  # one spoken budget for all


def test_the_chunk_sweep_trains_and_decodes_one_checkpoint_per_layout(tmp_path, loads, monkeypatch):
    import re

    from reempathy.checkpoints import read_manifest

    # The shipped file with one training step per layout (and the examples by absolute path).
    text = (ROOT / "configs" / "sweep-chunks.toml").read_text(encoding="utf-8")
    text = re.sub(r'("strategy.audio_tokens" = \d+) }', rf'\1, "train.max_steps" = 1, "data.path" = {json.dumps(str(EXAMPLES))} }}', text)
    config = tmp_path / "sweep-chunks.toml"
    config.write_text(text, encoding="utf-8")
    monkeypatch.chdir(ROOT)  # the file names configs/train-reempathy.toml
    out = tmp_path / "chunks"
    assert main(["sweep", "--config", str(config), "--data", str(HELDOUT), "--limit", "1", "--out", str(out),
                 *FEW_SPOKEN]) == 0  # fmt: skip
    layouts = []
    for run in json.loads((out / "sweep.json").read_text())["runs"]:
        manifest = json.loads((out / run["dir"] / "manifest.json").read_text())
        strategy = manifest["config"]["strategy"]
        trained = read_manifest(manifest["checkpoint"]["path"]).chunk_layout
        layouts.append((run["name"], strategy["text_tokens"], strategy["audio_tokens"], trained.text_tokens, trained.audio_tokens))
    assert layouts == [("3+6", 3, 6, 3, 6), ("5+10", 5, 10, 5, 10), ("7+14", 7, 14, 7, 14), ("13+26", 13, 26, 13, 26)]
    assert loads == ["3+6", "5+10", "7+14", "13+26"]  # each layout decoded with its own checkpoint


def test_the_alpha_sweep_reweights_the_reempathy_checkpoint(tmp_path, checkpoints, loads):
    plan = plan_sweep(ROOT / "configs" / "sweep-alpha.toml", checkpoints=str(checkpoints),
                      registry=_registry())  # fmt: skip
    assert [s.cfg.processors[0].options["factor"] for s in plan.runs] == [1.0, 1.1, 1.15, 1.2, 1.5, 2.0]
    assert {s.cfg.processors[0].options["layers"] for s in plan.runs} == {"middle"}
    assert {s.cfg.strategy.name for s in plan.runs} == {"reempathy"}
    assert {s.cfg.decode.checkpoint for s in plan.runs} == {str(checkpoints / "reempathy")}


def test_a_checkpoint_key_that_leads_nowhere_says_how_to_get_the_checkpoint(tmp_path, monkeypatch, capsys):
    config = tmp_path / "sweep.toml"
    config.write_text('[sweep.checkpoints]\nsft = "runs/train-sft"\n\n[[sweep.runs]]\nname = "sft"\ncheckpoint = "sft"\n')
    monkeypatch.chdir(tmp_path)  # runs/train-sft does not exist here, and no [sweep.train] makes it
    assert main(["sweep", "--config", str(config), "--data", str(HELDOUT), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sweep run 'sft'" in err and "--checkpoints" in err
    assert not (tmp_path / "out").exists()


def test_a_training_config_that_is_not_there_is_named_by_its_key_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # configs/train-sft.toml is not here
    assert main(["sweep", "--config", str(ROOT / "configs" / "sweep-table5.toml"), "--data", str(HELDOUT),
                 "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sweep.train.sft" in err and "configs/train-sft.toml" in err
    assert not (tmp_path / "out").exists()


def test_demo_checkpoints_that_were_never_trained_say_to_run_the_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--config", str(ROOT / "configs" / "sweep-table5.toml"), "--checkpoints", "demo",
                 "--data", str(HELDOUT), "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    assert "run `reempathy demo` first" in capsys.readouterr().err


def _registry():
    from reempathy.registry import default_discovery

    return default_discovery().registry
