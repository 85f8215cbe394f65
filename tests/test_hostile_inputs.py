"""The hostile audit's last defects (issue 25): inputs that hung, crashed or destroyed data, each now one clean line.

- a prompt too long for any context is refused before it is tokenized (run data, training data, decode);
- a deeply nested JSON line in a data file, a results.jsonl or a scores file is a bad line ``FILE:LINE``;
- an output is never an input of the same command, nor a file of a run directory the command does not
  own; an empty path is an error, and so is an output onto a dangling symbolic link.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from reempathy.cli import main
from reempathy.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "empathy_dialogues.jsonl"
FEW = ["--set", "decode.max_new_tokens=4"]
NESTED = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"


def _fails(capsys, argv: list[str], status: int = 2) -> str:
    capsys.readouterr()
    assert main(argv) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("reempathy: error: "), err
    assert "internal error" not in err and "Traceback" not in err
    return err


def _data(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _examples(n: int) -> list[str]:
    return EXAMPLES.read_text(encoding="utf-8").splitlines()[:n]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real run directory of two records (with a scores file), to copy and damage."""
    tmp = tmp_path_factory.mktemp("hostile")
    out = tmp / "run"
    assert main(["run", "--data", str(_data(tmp / "data.jsonl", _examples(2))), "--out", str(out), *FEW]) == 0
    (out / "scores").mkdir()
    line = {"schema": "reempathy.score/1", "id": "1", "evaluator": "judge", "scores": {"need_support": 4.0},
            "text": None, "error": None, "raw": None}
    (out / "scores" / "judge.jsonl").write_text(json.dumps(line) + "\n")
    return out


@pytest.fixture()
def run_copy(run_dir, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(run_dir, tmp_path / "run"))


# --- prompts longer than any context ------------------------------------------------------------


def test_a_prompt_too_long_for_the_context_is_refused_before_it_is_tokenized(tiny, tmp_path):
    from reempathy.data.testset import prompt_inputs, read_records

    def never(turns):
        raise AssertionError("the prompt was tokenized")

    backbone = dataclasses.replace(tiny, prompt_builder=never)
    word = "a" * (tiny.max_text_chars + 1)
    path = _data(tmp_path / "long.jsonl", [json.dumps({"messages": [{"role": "user", "text": word}]})])
    with pytest.raises(InputError) as info:
        prompt_inputs(read_records(path).records[0], backbone)
    message = str(info.value)
    assert message.startswith(f"{path}:1: the prompt's text is {len(word):,} characters")
    assert f"context of {tiny.max_context} tokens" in message and "\n" not in message


def test_run_refuses_a_huge_one_word_prompt_naming_its_line(tmp_path, capsys, tiny):
    record = {"messages": [{"role": "user", "text": "x" * (tiny.max_text_chars * 4)}]}
    data = _data(tmp_path / "data.jsonl", [_examples(1)[0], json.dumps(record)])
    err = _fails(capsys, ["run", "--data", str(data), "--out", str(tmp_path / "out"), *FEW])
    assert f"{data}:2: the prompt's text is" in err
    assert not (tmp_path / "out").exists()


def test_a_training_record_too_long_for_the_context_is_a_bad_record_before_tokenizing(tmp_path, tiny):
    from reempathy.data.records import load_records

    long = {"messages": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "y" * (tiny.max_text_chars + 1)}]}
    data = _data(tmp_path / "train.jsonl", [_examples(1)[0], json.dumps(long)])
    with pytest.raises(InputError) as info:
        load_records(data, tiny.layout.audio_count, max_text_chars=tiny.max_text_chars)
    assert f"{data}:2:" in str(info.value) and "characters" in str(info.value)
    kept = load_records(data, tiny.layout.audio_count, skip_bad=True, max_text_chars=tiny.max_text_chars)
    assert len(kept) == 1 and kept.skipped[0].where == f"{data}:2"


def test_decode_refuses_a_prompt_too_long_for_the_context_before_tokenizing(tiny):
    from reempathy.runner import build_prompt_inputs

    backbone = dataclasses.replace(tiny, prompt_builder=lambda turns: pytest.fail("tokenized"))
    with pytest.raises(InputError, match="the prompt's text is .* characters"):
        build_prompt_inputs(backbone, "z" * (tiny.max_text_chars + 1))


def test_the_character_bound_never_refuses_a_prompt_that_fits(tiny):
    """The bound is the context times the longest token of the vocabulary: any text that fits is under it."""
    longest = max(len(t) for t in tiny.tokenizer.get_vocab())
    assert tiny.max_text_chars >= tiny.max_context * longest


# --- deeply nested JSON lines ---------------------------------------------------------------------


def test_a_deeply_nested_data_line_is_a_bad_line_for_run(tmp_path, capsys):
    data = _data(tmp_path / "data.jsonl", [_examples(1)[0], NESTED])
    err = _fails(capsys, ["run", "--data", str(data), "--out", str(tmp_path / "out"), *FEW])
    assert f"{data}:2: " in err and "nested too deeply" in err


def test_a_deeply_nested_results_line_is_a_bad_line_for_report(run_copy, capsys):
    results = run_copy / "results.jsonl"
    results.write_text(NESTED + "\n" + results.read_text())
    err = _fails(capsys, ["report", str(run_copy)])
    assert f"{results}:1:" in err


def test_a_deeply_nested_scores_line_is_a_bad_line_for_report(run_copy, capsys):
    scores = run_copy / "scores" / "judge.jsonl"
    scores.write_text(NESTED + "\n" + scores.read_text())
    err = _fails(capsys, ["report", str(run_copy)])
    assert f"{scores}:1:" in err


def test_a_deeply_nested_results_line_is_a_bad_line_for_eval(run_copy, capsys):
    results = run_copy / "results.jsonl"
    results.write_text(results.read_text() + NESTED + "\n")
    err = _fails(capsys, ["eval", str(run_copy), "--evaluator", "llm-judge",
                          "--set", "endpoint=http://127.0.0.1:9/v1", "--set", "model=m"])
    assert "line 3" in err and "nested too deeply" in err


def test_a_deeply_nested_manifest_is_refused_for_run(run_copy, tmp_path, capsys):
    (run_copy / "manifest.json").write_text(NESTED)
    data = _data(tmp_path / "data.jsonl", _examples(2))
    err = _fails(capsys, ["run", "--data", str(data), "--out", str(run_copy), *FEW])
    assert "manifest.json" in err


def test_a_deeply_nested_line_is_a_bad_record_for_reflect_data(tmp_path, capsys):
    data = _data(tmp_path / "train.jsonl", [_examples(1)[0], NESTED])
    err = _fails(capsys, ["reflect-data", "--data", str(data), "--evaluator", "llm-judge", "--out", str(tmp_path / "o.jsonl"),
                          "--set", "endpoint=http://127.0.0.1:9/v1", "--set", "model=m"])
    assert f"{data}:2: " in err and "nested too deeply" in err


# --- an output is never an input, nor a file of a run directory the command does not own -----------


@pytest.mark.parametrize("target", ["results.jsonl", "manifest.json", "scores/judge.jsonl"])
def test_report_refuses_to_write_its_csv_over_a_file_of_a_run_directory(run_copy, capsys, target):
    before = (run_copy / target).read_bytes()
    err = _fails(capsys, ["report", str(run_copy), "--csv", str(run_copy / target)])
    assert "--csv" in err and "run directory" in err
    assert (run_copy / target).read_bytes() == before


def test_report_refuses_a_plot_over_a_file_of_another_run_directory(run_copy, run_dir, capsys, tmp_path):
    before = (run_copy / "results.jsonl").read_bytes()
    err = _fails(capsys, ["report", str(run_dir), "--plot", str(run_copy / "results.jsonl"), "--x", "sampling.seed", "--y", "records"])
    assert "--plot" in err and (run_copy / "results.jsonl").read_bytes() == before


def test_report_may_write_a_table_of_its_own_inside_a_run_directory(run_copy, capsys):
    assert main(["report", str(run_copy), "--csv", str(run_copy / "table.csv")]) == 0
    assert (run_copy / "table.csv").read_text().startswith("run,")


def test_report_refuses_the_same_file_for_csv_and_plot(run_copy, capsys, tmp_path):
    same = tmp_path / "out.png"
    err = _fails(capsys, ["report", str(run_copy), "--csv", str(same), "--plot", str(same), "--x", "sampling.seed", "--y", "records"])
    assert "--csv" in err and "--plot" in err and not same.exists()


def test_run_refuses_a_data_file_inside_the_run_directory_it_would_overwrite(run_copy, capsys):
    results = run_copy / "results.jsonl"
    before = results.read_bytes()
    err = _fails(capsys, ["run", "--data", str(results), "--out", str(run_copy), "--force", *FEW])
    assert "--data" in err and "--out" in err
    assert results.read_bytes() == before


def test_run_may_read_a_data_file_of_its_own_that_it_does_not_write(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    data = _data(out / "test.jsonl", _examples(1))
    assert main(["run", "--data", str(data), "--out", str(out), "--force", *FEW]) == 0
    assert data.read_text() == _examples(1)[0] + "\n"


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_an_empty_out_path_is_an_error_and_nothing_is_written_here(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    data = _data(tmp_path / "data.jsonl", _examples(1))
    extra = ["--grid", "sampling.seed=1,2"] if command == "sweep" else []
    if command == "sweep":
        extra = ["--config", str(ROOT / "configs" / "sft.toml"), *extra]
    err = _fails(capsys, [command, "--data", str(data), "--out", "", *extra, *FEW])
    assert "--out" in err and "empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_an_out_path_onto_a_dangling_symbolic_link_is_one_clean_line(tmp_path, capsys):
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    data = _data(tmp_path / "data.jsonl", _examples(1))
    err = _fails(capsys, ["run", "--data", str(data), "--out", str(link), *FEW])
    assert "symbolic link" in err and "FileExistsError" not in err
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_plugin_new_refuses_an_empty_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _fails(capsys, ["plugin", "new", "my-notes", "--kind", "strategy", "--dir", ""])
    assert "--dir" in err and "empty" in err and list(tmp_path.iterdir()) == []


def test_reflect_data_refuses_to_write_over_its_own_data_even_with_force(tmp_path, capsys):
    data = _data(tmp_path / "train.jsonl", _examples(2))
    before = data.read_bytes()
    err = _fails(capsys, ["reflect-data", "--data", str(data), "--evaluator", "llm-judge", "--out", str(data), "--force",
                          "--set", "endpoint=http://127.0.0.1:9/v1", "--set", "model=m"])
    assert "--out" in err and "also --data" in err and data.read_bytes() == before


def test_reflect_data_refuses_an_output_among_a_runs_own_files(run_copy, tmp_path, capsys):
    data = _data(tmp_path / "train.jsonl", _examples(2))
    target = run_copy / "results.jsonl"
    before = target.read_bytes()
    err = _fails(capsys, ["reflect-data", "--data", str(data), "--evaluator", "llm-judge", "--out", str(target), "--force",
                          "--set", "endpoint=http://127.0.0.1:9/v1", "--set", "model=m"])
    assert "run directory" in err and target.read_bytes() == before


def test_ab_refuses_to_write_its_verdicts_over_a_runs_results(run_copy, run_dir, capsys):
    target = run_copy / "results.jsonl"
    before = target.read_bytes()
    err = _fails(capsys, ["ab", str(run_dir), str(run_copy), "--judge", "llm-judge", "--out", str(target),
                          "--set", "endpoint=http://127.0.0.1:9/v1", "--set", "model=m"])
    assert "--out" in err and "run directory" in err and target.read_bytes() == before


def test_decode_refuses_to_write_the_spoken_answer_over_the_input_wav(tmp_path, capsys):
    wav = tmp_path / "in.wav"
    wav.write_bytes(b"RIFF")
    err = _fails(capsys, ["decode", "--audio", str(wav), "--out", str(wav)])
    assert "also --audio" in err and wav.read_bytes() == b"RIFF"


def test_speech_synthesize_refuses_to_write_over_its_units_file(tmp_path, capsys):
    units = tmp_path / "units.txt"
    units.write_text("1 2 3\n")
    err = _fails(capsys, ["speech", "synthesize", "--decoder", str(tmp_path / "none"), "--units", str(units), "--out", str(units)])
    assert "also --units" in err and units.read_text() == "1 2 3\n"
