"""Many processes: ``torchrun`` shards a run's records by rank and merges them (issue 10 §3)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from reempathy.cli import main
from reempathy.jobs.shard import Group

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


class _RankZeroOfTwo(Group):
    """Rank 0 of a two-process run whose rank 1 fails (the collectives answered in-process)."""

    def __init__(self) -> None:
        super().__init__(rank=0, size=2)

    def gather(self, obj):
        return [obj, {"rank": 1, "error": {"message": "boom", "exit_code": 1}, "processed": 0, "failures": [], "tally": {}}]

    def broadcast(self, obj):
        return obj


def test_a_failed_rank_fails_the_run_and_the_others_work_is_kept(tmp_path, tiny):
    import pytest

    from reempathy.config import load_config
    from reempathy.registry import default_discovery
    from reempathy.errors import ReempathyError
    from reempathy.experiments.run import RunOptions, run_experiment

    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(EXAMPLES.read_text(encoding="utf-8").splitlines()[:3]) + "\n", encoding="utf-8")
    registry = default_discovery().registry
    cfg = load_config(CONFIG, ["decode.max_new_tokens=6"], registry=registry)
    out = tmp_path / "run"
    with pytest.raises(ReempathyError, match="rank 1 of 2 failed: boom") as err:
        run_experiment(cfg, registry, RunOptions(data=data, out=out), group=_RankZeroOfTwo())
    assert err.value.exit_code == 1  # the failed rank's own exit status (a plugin failure, say)
    ids = [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert ids == ["1", "3"]  # rank 0's share, merged; rank 1's record is left for the next run
    assert json.loads((out / "manifest.json").read_text())["finished"] is None
    run_experiment(cfg, registry, RunOptions(data=data, out=out), group=Group())
    assert [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines()] == ["1", "2", "3"]
