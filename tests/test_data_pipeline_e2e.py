"""The paper's pipeline end to end on the tiny backbone, against a stub LLM on 127.0.0.1 (no network):

make-data (scenario → dialogue → assessment → rejected, the backbone voicing every turn with
read-aloud) → train a ``reempathy`` checkpoint on what was made → ``run`` it over the made records →
``eval`` the answers with llm-judge on the same endpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluation_helpers import ChatServer
from llm_stub import GOOD, DataLLM
from reempathy.cli import main
from reempathy.data.schema import Record


def test_made_data_trains_a_reempathy_checkpoint_that_runs_and_is_scored(tiny, tmp_path, capsys):
    made = tmp_path / "made.jsonl"
    llm = DataLLM()
    with ChatServer(llm) as server:
        endpoint = ["--set", f"endpoint={json.dumps(server.url)}", "--set", 'model="stub"']
        # 1. records from the LLM, every turn voiced by the tiny backbone (read-aloud)
        assert main(["make-data", "--out", str(made), "--n", "4", "--rejected", "--speech", "--concurrency", "4",
                     "--set", "tts.max_tail_audio_tokens=4", "--quiet", *endpoint]) == 0
        records = [json.loads(line) for line in made.read_text().splitlines()]
        assert len(records) == 4
        for r in records:
            record = Record.model_validate(r, context={"audio_count": tiny.layout.audio_count})
            assert all(m.units for m in record.messages) and record.rejected.units and record.assessment.scores

        # 2. a reempathy checkpoint trained on them (reflections: the assessment split per chunk)
        config = tmp_path / "train.toml"
        config.write_text(f'[backbone]\nname = "tiny"\n[strategy]\nname = "reempathy"\ntext_tokens = 5\naudio_tokens = 10\n'
                          f'[data]\npath = "{made}"\n[train]\noutput_dir = "{tmp_path / "ckpt"}"\nmax_steps = 4\n'
                          "batch_size = 2\nsave_steps = 4\n")
        assert main(["train", "--config", str(config), "--quiet"]) == 0
        manifest = json.loads((tmp_path / "ckpt" / "reempathy.json").read_text())
        assert manifest["strategy"]["name"] == "reempathy" and manifest["steps"] == 4

        # 3. the checkpoint answers the made records' prompts (their user turns, heard as units)
        run = tmp_path / "run"
        assert main(["run", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(made), "--out", str(run),
                     "--set", "decode.max_new_tokens=40", "--set", "sampling.greedy=true"]) == 0
        results = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
        assert [r["id"] for r in results] == [r["id"] for r in records]
        assert all(r["result"]["strategy"] == "reempathy" and r["reference"] for r in results)

        # 4. the answers scored by llm-judge on the same endpoint
        assert main(["eval", str(run), "--evaluator", "llm-judge", "--quiet", *endpoint]) == 0
    scores = [json.loads(line) for line in (run / "scores" / "llm-judge.jsonl").read_text().splitlines()]
    assert len(scores) == 4 and all(s["error"] is None and s["scores"] == {k: float(v) for k, v in GOOD.items()} for s in scores)
    assert llm.requests == {"scenario": 4, "dialogue": 4, "assessment": 4, "rejected": 4, "score": 4}
    assert not Path(f"{made}.partial").exists()
