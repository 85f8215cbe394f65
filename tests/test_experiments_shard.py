"""Many processes: ``torchrun`` shards a run's records by rank and merges them (issue 10 §3)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from reempathy.cli import main
from reempathy.experiments.shard import Group

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "empathy_dialogues.jsonl"
CONFIG = ROOT / "configs" / "reempathy.toml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(out: Path) -> list[tuple]:
    docs = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(d["id"], d["line"], d["messages"], d["reference"], d["result"]["ids"], d["result"]["prompt_ids"],
             d["result"]["stop_reason"], d["result"]["counts"]) for d in docs]  # fmt: skip


def test_two_processes_give_the_same_results_as_one(tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(EXAMPLES.read_text(encoding="utf-8").splitlines()[:5]) + "\n", encoding="utf-8")
    args = ["run", "--config", str(CONFIG), "--data", str(data), "--set", "decode.max_new_tokens=10"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "reempathy"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([*launcher, *args, "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    assert not (tmp_path / "two" / "shards").exists()  # merged into results.jsonl
    assert _answers(tmp_path / "two") == _answers(tmp_path / "one")
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["finished"] is not None


def test_each_rank_takes_every_nth_record():
    items = list(range(7))
    shares = [Group(rank=r, size=3).share(items) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(x for share in shares for x in share) == items
