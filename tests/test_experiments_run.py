"""``reempathy run``: a test set decoded into a resumable run directory (issue 10 §2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


from reempathy.backbones.base import Turn
from reempathy.cli import main
from reempathy.jobs import rundir

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "empathy_dialogues.jsonl"
CONFIG = ROOT / "configs" / "reempathy.toml"
FEW = ["--set", "decode.max_new_tokens=8"]


def write_data(path: Path, n: int, ids: bool = False) -> Path:
    """The first ``n`` example dialogues as a test set (optionally with their own ids)."""
    lines = EXAMPLES.read_text(encoding="utf-8").splitlines()[:n]
    if ids:
        lines = [json.dumps({"id": f"dlg-{i}", **json.loads(line)}) for i, line in enumerate(lines, start=1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def answer(doc: dict) -> tuple:
    """What a record's answer is, timings aside."""
    r = doc["result"]
    return doc["id"], r["ids"], r["stop_reason"], r["prompt_ids"]


def test_run_writes_one_line_per_record_with_prompt_reference_and_result(tmp_path, tiny, capsys):
    data = write_data(tmp_path / "test.jsonl", 3)
    out = tmp_path / "run"
    assert main(["run", "--config", str(CONFIG), "--data", str(data), "--out", str(out), *FEW]) == 0
    docs = results(out)
    assert [d["id"] for d in docs] == ["1", "2", "3"] and [d["line"] for d in docs] == [1, 2, 3]
    record = json.loads(data.read_text().splitlines()[0])
    first = docs[0]
    assert first["schema"] == "reempathy.run-record/1"
    assert [m["role"] for m in first["messages"]] == ["user"]
    assert first["messages"][0]["units"] == record["messages"][0]["units"]
    assert first["reference"] == {"text": record["messages"][1]["text"], "units": record["messages"][1]["units"]}
    assert first["result"]["schema"] == "reempathy.result/1" and first["wav"] is None
    # The prompt's ids are kept, so the answer can be replayed: the user is heard as units.
    assert first["result"]["prompt_ids"] == tiny.build_prompt([Turn("user", units=record["messages"][0]["units"])])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema"] == "reempathy.run/1" and manifest["finished"] is not None
    assert manifest["config"]["strategy"]["name"] == "reempathy"
    assert manifest["data"]["records"] == 3 and len(manifest["data"]["sha256"]) == 64
    assert {"reempathy", "torch", "transformers"} <= set(manifest["versions"])
    assert "3 records decoded" in capsys.readouterr().out


def test_a_records_own_id_is_its_record_id(tmp_path):
    data = write_data(tmp_path / "test.jsonl", 2, ids=True)
    assert main(["run", "--config", str(CONFIG), "--data", str(data), "--out", str(tmp_path / "run"), *FEW]) == 0
    assert [d["id"] for d in results(tmp_path / "run")] == ["dlg-1", "dlg-2"]


def test_a_rerun_continues_where_the_last_one_stopped(tmp_path, capsys):
    data = write_data(tmp_path / "test.jsonl", 4)
    out = tmp_path / "run"
    assert main(["run", "--config", str(CONFIG), "--data", str(data), "--out", str(out), "--limit", "2", *FEW]) == 0
    before = (out / "results.jsonl").read_bytes()
    assert json.loads((out / "manifest.json").read_text())["finished"] is None  # 2 of 4 records
    assert main(["run", "--config", str(CONFIG), "--data", str(data), "--out", str(out), *FEW]) == 0
    assert (out / "results.jsonl").read_bytes().startswith(before)  # nothing redone, nothing rewritten
    assert [d["id"] for d in results(out)] == ["1", "2", "3", "4"]
    assert "2 records decoded (2 done before)" in capsys.readouterr().out


def test_answers_do_not_depend_on_the_batch_size(tmp_path):
    data = write_data(tmp_path / "test.jsonl", 4)
    for size in ("1", "3"):
        args = ["run", "--config", str(CONFIG), "--data", str(data), "--out", str(tmp_path / size), "--batch-size", size]
        assert main([*args, *FEW]) == 0
    assert [answer(d) for d in results(tmp_path / "1")] == [answer(d) for d in results(tmp_path / "3")]


KILLER = r"""
import os, signal, sys
from reempathy.experiments import run
from reempathy.jobs import rundir

appended = 0
real_append = rundir.LineAppender.append

def append(self, doc):
    global appended
    real_append(self, doc)
    appended += 1

class KillMidAnswer:
    # An observer: once three records are on disk, the next decode step of any row is killed.
    from reempathy.hooks import hookimpl

    @hookimpl
    def reempathy_logits(self, session, logits):
        if appended >= 3 and len(session.ids) > session.prompt_len + 2:
            os.kill(os.getpid(), signal.SIGKILL)

real_build = run.build_plugins

def build_plugins(cfg, backbone, registry):
    strategy, processors = real_build(cfg, backbone, registry)
    return strategy, [*processors, KillMidAnswer()]

rundir.LineAppender.append = append
run.build_plugins = build_plugins
from reempathy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_run_loses_only_the_answers_in_flight(tmp_path):
    data = write_data(tmp_path / "test.jsonl", 6)
    out = tmp_path / "run"
    args = ["run", "--config", str(CONFIG), "--data", str(data), "--out", str(out), "--batch-size", "2", *FEW]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    written = (out / "results.jsonl").read_bytes()
    lines = written.splitlines()
    assert written.endswith(b"\n") and all(json.loads(line) for line in lines)  # whole lines only
    assert 3 <= len(lines) < 6  # killed with answers still to come (rows of a batch may finish together)
    assert main(args) == 0
    docs = results(out)
    assert [d["id"] for d in docs] == ["1", "2", "3", "4", "5", "6"]  # each once, in record order
    assert main([*args[:-6], "--out", str(tmp_path / "whole"), *args[-4:]]) == 0
    assert [answer(d) for d in docs] == [answer(d) for d in results(tmp_path / "whole")]


def test_a_line_torn_by_a_crash_is_dropped_and_its_record_decoded_again(tmp_path):
    data = write_data(tmp_path / "test.jsonl", 3)
    out = tmp_path / "run"
    args = ["run", "--config", str(CONFIG), "--data", str(data), "--out", str(out), *FEW]
    assert main(args) == 0
    whole = results(out)
    raw = (out / "results.jsonl").read_bytes()
    cut = raw.rstrip(b"\n").rfind(b"\n") + 40
    (out / "results.jsonl").write_bytes(raw[:cut])  # what a crash in the middle of the last write leaves
    assert main(args) == 0
    assert [answer(d) for d in results(out)] == [answer(d) for d in whole]


def test_a_damaged_line_before_the_end_is_reported_not_dropped(tmp_path, capsys):
    data = write_data(tmp_path / "test.jsonl", 3)
    out = tmp_path / "run"
    args = ["run", "--config", str(CONFIG), "--data", str(data), "--out", str(out), *FEW]
    assert main(args) == 0
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text(lines[0] + "{garbage\n" + "".join(lines[2:]))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "results.jsonl:2" in err


# --- bad input: one line, exit 2, nothing misleading written -----------------------------------


def _fails(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("reempathy: error: "), err
    return err


def test_a_record_without_a_prompt_is_named_by_its_line(tmp_path, capsys):
    data = write_data(tmp_path / "test.jsonl", 2)
    with data.open("a") as fh:
        fh.write(json.dumps({"messages": [{"role": "assistant", "text": "Hello."}]}) + "\n")
    out = tmp_path / "run"
    err = _fails(capsys, ["run", "--config", str(CONFIG), "--data", str(data), "--out", str(out), *FEW])
    assert f"{data}:3" in err and "no prompt" in err
    assert not out.exists()


def test_a_missing_data_file_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    err = _fails(capsys, ["run", "--config", str(CONFIG), "--data", str(tmp_path / "nope.jsonl"), "--out", str(out)])
    assert "nope.jsonl" in err and "not found" in err
    assert not out.exists()


def test_two_records_with_one_id_are_refused(tmp_path, capsys):
    line = json.dumps({"id": "a", "messages": [{"role": "user", "text": "Hi."}]})
    data = tmp_path / "test.jsonl"
    data.write_text(line + "\n" + line + "\n")
    err = _fails(capsys, ["run", "--config", str(CONFIG), "--data", str(data), "--out", str(tmp_path / "run")])
    assert f"{data}:2" in err and "'a'" in err


def test_an_out_dir_of_another_config_is_refused_and_left_as_it_was(tmp_path, capsys):
    data = write_data(tmp_path / "test.jsonl", 2)
    out = tmp_path / "run"
    assert main(["run", "--config", str(CONFIG), "--data", str(data), "--out", str(out), *FEW]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other = ["run", "--config", str(CONFIG), "--data", str(data), "--out", str(out), "--set", "decode.max_new_tokens=13"]
    err = _fails(capsys, other)
    assert "decode.max_new_tokens: 8 there, 13 now" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main([*other, "--force"]) == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["decode"]["max_new_tokens"] == 13


def test_an_out_dir_for_other_data_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--config", str(CONFIG), "--data", str(write_data(tmp_path / "a.jsonl", 2)),
                 "--out", str(out), *FEW]) == 0  # fmt: skip
    err = _fails(capsys, ["run", "--config", str(CONFIG), "--data", str(write_data(tmp_path / "b.jsonl", 3)),
                          "--out", str(out), *FEW])  # fmt: skip
    assert "data.sha256" in err


def test_units_outside_the_backbones_range_are_named_by_their_line(tmp_path, capsys):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "units": [1, 5000]}]}) + "\n")
    out = tmp_path / "run"
    err = _fails(capsys, ["run", "--config", str(CONFIG), "--data", str(data), "--out", str(out)])
    assert f"{data}:1" in err and "5000" in err
    assert not out.exists()


# --- speech in and out -------------------------------------------------------------------------


def test_speech_prompts_are_heard_and_answers_written_as_wav(tmp_path):
    import math

    import torch
    from glm4voice_fixture import make_tiny_glm4voice_dir

    from reempathy.speech.audio import read_wav, write_wav
    from reempathy.speech.tiny import make_tiny_decoder_dir, make_tiny_tokenizer_dir

    glm = make_tiny_glm4voice_dir(tmp_path / "glm")
    tok, dec = make_tiny_tokenizer_dir(tmp_path / "tok"), make_tiny_decoder_dir(tmp_path / "dec")
    t = torch.arange(16000, dtype=torch.float64) / 16000
    write_wav(tmp_path / "user.wav", (0.3 * torch.sin(2 * math.pi * 220 * t)).float(), 16000)
    config = tmp_path / "glm.toml"
    config.write_text(
        f'[backbone]\nname = "glm-4-voice"\npath = "{glm}"\ntokenizer_path = "{tok}"\ndecoder_path = "{dec}"\n'
        'device = "cpu"\n[strategy]\nname = "reempathy"\ntext_tokens = 1\naudio_tokens = 5\nreflect = false\n'
        "[sampling]\ngreedy = true\n[decode]\nmax_new_tokens = 7\n"
    )  # reempathy's chunks make audio slots: the answer has spoken units to synthesise
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"id": "spoken", "messages": [{"role": "user", "audio": "user.wav"}]}) + "\n")
    out = tmp_path / "run"
    assert main(["run", "--config", str(config), "--data", str(data), "--out", str(out), "--speech"]) == 0
    (doc,) = results(out)
    assert doc["messages"][0]["audio"] == str(tmp_path / "user.wav")
    assert doc["result"]["spoken"]["audio_units"], doc["result"]["stop_reason"]
    assert doc["wav"] == "wav/spoken.wav"
    assert read_wav(out / doc["wav"]).samples.shape[1] > 0


def test_speech_without_a_speech_decoder_is_refused_before_anything_is_written(tmp_path, capsys):
    data = write_data(tmp_path / "test.jsonl", 1)
    out = tmp_path / "run"
    err = _fails(capsys, ["run", "--config", str(CONFIG), "--data", str(data), "--out", str(out), "--speech"])
    assert "--speech" in err and "speech decoder" in err
    assert not out.exists()


def test_the_torn_tail_of_a_shard_is_dropped_when_shards_are_merged(tmp_path):
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    line = lambda i: json.dumps({"id": str(i), "line": i}) + "\n"  # noqa: E731
    (out / "results.jsonl").write_text(line(1))
    (out / "shards" / "rank-0.jsonl").write_text(line(4) + line(2))
    (out / "shards" / "rank-1.jsonl").write_text(line(3) + line(1) + '{"id": "5", "li')
    docs = rundir.consolidate(out)
    assert [d["id"] for d in docs] == ["1", "2", "3", "4"]
    assert not (out / "shards").exists()
    assert (out / "results.jsonl").read_text() == "".join(
        json.dumps({"id": str(i), "line": i}, separators=(",", ":")) + "\n" for i in range(1, 5)
    )


def test_a_wav_prompt_for_a_backbone_without_a_speech_tokenizer_is_named_by_its_line(tmp_path, capsys):
    (tmp_path / "user.wav").write_bytes(b"RIFF")
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "audio": "user.wav"}]}) + "\n")
    out = tmp_path / "run"
    err = _fails(capsys, ["run", "--config", str(CONFIG), "--data", str(data), "--out", str(out)])
    assert f"{data}:1" in err and "speech tokenizer" in err
    assert not out.exists()


def test_a_backbone_without_audio_units_reads_the_transcript(tmp_path, tiny):
    import dataclasses

    from reempathy.data.testset import check_records, read_records

    text_only = dataclasses.replace(tiny, layout=dataclasses.replace(tiny.layout, audio_count=0))
    data = write_data(tmp_path / "test.jsonl", 1)
    records = read_records(data)
    (inputs,) = check_records(records, text_only).values()
    assert inputs.ids == tiny.build_prompt([Turn("user", text=records.records[0].prompt[0].text)])


def test_a_run_on_the_static_cache_gives_the_answers_of_the_dynamic_one(tmp_path):
    """``decode.cache = "static"`` runs through the batched loop's static path (rows shifted in place at refills)."""
    data = write_data(tmp_path / "test.jsonl", 3)
    common = ["run", "--config", str(CONFIG), "--data", str(data), "--batch-size", "2", *FEW,
              "--set", "sampling.greedy=true"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "dynamic")]) == 0
    assert main([*common, "--out", str(tmp_path / "static"), "--set", 'decode.cache="static"']) == 0
    dynamic, static = results(tmp_path / "dynamic"), results(tmp_path / "static")
    assert len(dynamic) == 3 and [answer(d) for d in static] == [answer(d) for d in dynamic]
    manifest = json.loads((tmp_path / "static" / "manifest.json").read_text())
    assert manifest["config"]["decode"]["cache"] == "static"


def test_a_backbone_that_reads_audio_hears_the_wav_of_a_record(tmp_path, qwen, qwen_dir):
    import math

    import torch
    from qwen25omni_fixture import QWEN_TEST_OPTIONS

    from reempathy.decoding.loop import LoopOptions, decode
    from reempathy.plugins.strategies.sft import SftOptions, SftStrategy
    from reempathy.speech.audio import write_wav

    t = torch.arange(13230) / 22050
    write_wav(tmp_path / "user.wav", 0.2 * torch.sin(2 * math.pi * 220 * t), 22050)
    config = tmp_path / "qwen.toml"
    options = "".join(f"{k} = {json.dumps(v)}\n" for k, v in QWEN_TEST_OPTIONS.items())
    config.write_text(f'[backbone]\nname = "qwen2.5-omni"\npath = {json.dumps(str(qwen_dir))}\n{options}'
                      '[sampling]\ngreedy = true\n[decode]\nmax_new_tokens = 6\n')  # fmt: skip
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "text": "(a sigh)", "units": [3, 4],
                                              "audio": "user.wav"}]}) + "\n")  # fmt: skip
    assert main(["run", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "run")]) == 0
    (doc,) = results(tmp_path / "run")
    inputs = qwen.build_prompt_inputs([Turn("user", audio=str(tmp_path / "user.wav"))])
    alone = decode(qwen, inputs.ids, SftStrategy(SftOptions(), qwen), [], LoopOptions(max_new_tokens=6, greedy=True),
                   prefill_inputs=inputs.prefill_inputs)  # fmt: skip
    assert doc["result"]["prompt_ids"] == inputs.ids  # the audio placeholders: the WAV, not the units or the text
    assert doc["result"]["ids"] == alone.ids


def test_a_run_made_before_a_config_key_existed_still_resumes(tmp_path, capsys):
    # decode.max_spoken_tokens / max_hidden_tokens came later; an old manifest lacks them (null now).
    data = write_data(tmp_path / "test.jsonl", 2)
    out = tmp_path / "run"
    assert main(["run", "--config", str(CONFIG), "--data", str(data), "--out", str(out), "--limit", "1", *FEW]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("max_spoken_tokens", "max_hidden_tokens"):
        del manifest["config"]["decode"][key]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["run", "--config", str(CONFIG), "--data", str(data), "--out", str(out), *FEW]) == 0
    assert [d["id"] for d in results(out)] == ["1", "2"]
    # A key that is set on one side and different on the other is still a different run.
    assert main(["run", "--config", str(CONFIG), "--data", str(data), "--out", str(out), *FEW,
                 "--set", "decode.max_spoken_tokens=5"]) == 2
    assert "config.decode.max_spoken_tokens: null there, 5 now" in capsys.readouterr().err


def test_the_summary_line_of_a_limited_run_says_it_stopped_at_the_limit_not_that_records_are_missing(tmp_path):
    from reempathy.experiments.run import RunSummary

    def summary(decoded, complete):
        return RunSummary(out=tmp_path, records=34, selected=12, already_done=0, decoded=decoded, processes=1,
                          seconds=1.0, generated_tokens=10, stop_reasons={}, complete=complete).line()

    assert "the first 12 of 34 records (--limit)" in summary(12, False)
    assert "not decoded yet" not in summary(12, False)
    assert "27 of 34 records not decoded yet" in summary(7, False)
    assert summary(34, True).endswith("complete")
