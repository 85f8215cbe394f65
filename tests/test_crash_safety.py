"""Crash safety (issue 16): SIGKILL at random points of `train`, `convert`, `speech synthesize` and `run`, in real processes.

Each command first runs to the end in this process, counting its file-system writes
(tests/crash_points.py); then it runs again in a subprocess that kills itself with SIGKILL at a
point drawn from that count (one in the first half, one in the second). The points come from a
seed drawn afresh for every pytest run, so each CI run tries other points; the seed is printed
in the summary and in every assertion message, and ``REEMPATHY_CRASH_SEED=N`` repeats a run's
points. Afterwards the previous complete output is intact or the new one is
complete — nothing incomplete looks complete — and the next ordinary run resumes or cleans up
and finishes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from crash_points import DRAWN, SEED
from glm4voice_fixture import make_tiny_glm4voice_dir
from safetensors.torch import load_file

from reempathy.backbones.tiny import TinyOptions, load_tiny
from reempathy.checkpoints import apply_checkpoint, read_manifest
from reempathy.cli import main
from reempathy.errors import CheckpointError
from reempathy.jobs.trainrun import checkpoint_dirs, checkpoint_step

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The subprocesses run with one thread too: tiny models, a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_with_points(kill_at: int, args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, int | None]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(HERE / "crash_points.py"), str(kill_at), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    found = re.search(r"points: (\d+)", proc.stderr)
    return proc, int(found.group(1)) if found else None


def count_points(args: list[str], cwd: Path) -> int:
    """Run the command to the end here, counting its kill points."""
    from crash_points import Points, patched

    before = os.getcwd()
    os.chdir(cwd)
    try:
        with patched(Points()) as points:
            assert main(args) == 0
    finally:
        os.chdir(before)
    return points.count


def kill_points(count: int, label: str) -> list[int]:
    """One point in the first half of the run, one in the second (recorded for the run's summary).

    ``REEMPATHY_CRASH_ALL=1`` takes every point instead (minutes per command: a sweep to run by hand).
    """
    rng = random.Random(f"{SEED}:{label}")
    half = max(1, count // 2)
    points = [rng.randint(1, half), rng.randint(half + 1, max(half + 1, count))]
    if os.environ.get("REEMPATHY_CRASH_ALL", "") not in ("", "0"):
        points = list(range(1, count + 1))
    DRAWN[label] = (points, count)
    print(f"{label}: kill points {points} of {count} (REEMPATHY_CRASH_SEED={SEED})")
    return points


def at(k: int) -> str:
    """How an assertion names a kill point: with the seed that repeats it."""
    return f"kill point {k} (rerun with REEMPATHY_CRASH_SEED={SEED})"


def killed(kill_at: int, args: list[str], cwd: Path) -> None:
    """Run the command in a subprocess that SIGKILLs itself at point ``kill_at``."""
    proc, _ = run_with_points(kill_at, args, cwd)
    assert proc.returncode == -9, f"not killed at {kill_at} (REEMPATHY_CRASH_SEED={SEED}): exit {proc.returncode}: {proc.stderr[-3000:]}"


def digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# --- train ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-train")
    lines = [x for x in (ROOT / "examples" / "empathy_dialogues.jsonl").read_text().splitlines() if x.strip()][:4]
    (root / "d.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_train_config(root: Path, out: str) -> Path:
    cfg = root / f"{out}.toml"
    cfg.write_text(
        '[strategy]\nname = "sft"\n[data]\npath = "d.jsonl"\n'
        f'[train]\noutput_dir = "{out}"\nmax_steps = 3\nsave_steps = 1\nbatch_size = 2\nlearning_rate = 0.01\n'
    )
    return cfg


def test_train_killed_anywhere_resumes_to_the_same_adapter(train_setup):
    root = train_setup
    reference = write_train_config(root, "reference")
    count = count_points(["train", "--config", reference.name, "--quiet"], root)
    want = load_file(root / "reference" / "adapter_model.safetensors")
    for k in kill_points(count, "train"):
        name = f"killed-{k}"
        cfg = write_train_config(root, name)
        killed(k, ["train", "--config", cfg.name, "--quiet"], root)
        out = root / name
        try:
            manifest = read_manifest(out)
        except CheckpointError as exc:
            assert "incomplete" in str(exc) or "not found" in str(exc), f"{at(k)}: {exc}"
        else:  # complete-looking: it must be the finished checkpoint, and load
            assert manifest.steps == 3, f"{at(k)}"
            apply_checkpoint(load_tiny(TinyOptions()), out)
        for ckpt in checkpoint_dirs(out) if out.exists() else []:
            assert checkpoint_step(ckpt) in (None, int(ckpt.name.split("-")[1])), f"{at(k)}: {ckpt}"
        cwd = os.getcwd()
        os.chdir(root)
        try:
            assert main(["train", "--config", cfg.name, "--quiet", "--resume"]) == 0, f"resume after {at(k)}"
        finally:
            os.chdir(cwd)
        assert read_manifest(out).steps == 3
        got = load_file(out / "adapter_model.safetensors")
        assert got.keys() == want.keys()
        for key in want:
            assert torch.allclose(got[key], want[key], rtol=1e-3, atol=1e-5), f"{at(k)}: {key} differs after resume"
        assert not (out / ".adapter.partial").exists()


# --- convert --------------------------------------------------------------------------------------


def test_convert_killed_anywhere_leaves_the_old_or_the_new_destination(tmp_path):
    old_src = make_tiny_glm4voice_dir(tmp_path / "old-src", seed=1)
    new_src = make_tiny_glm4voice_dir(tmp_path / "new-src", seed=2)
    reference = tmp_path / "reference"
    count = count_points(["convert", "glm-4-voice", str(new_src), str(reference)], tmp_path)
    new = digest(reference)
    for k in kill_points(count, "convert"):
        work = tmp_path / f"k{k}"
        work.mkdir()
        dst = work / "native"
        assert main(["convert", "glm-4-voice", str(old_src), str(dst)]) == 0
        old = digest(dst)
        assert old != new
        killed(k, ["convert", "glm-4-voice", str(new_src), str(dst), "--overwrite"], work)
        if dst.exists():
            assert digest(dst) in (old, new), f"{at(k)}: DST is neither the old nor the new conversion"
        else:  # killed between the two renames of the swap: the old one waits beside, whole
            aside = [p for p in work.iterdir() if p.name.startswith(".native.replaced-")]
            assert len(aside) == 1 and digest(aside[0]) == old, f"{at(k)}"
        visible = [p.name for p in work.iterdir() if not p.name.startswith(".")]
        assert visible in ([], ["native"]), f"{at(k)}: {visible}"
        assert main(["convert", "glm-4-voice", str(new_src), str(dst), "--overwrite"]) == 0
        assert digest(dst) == new
        assert [p.name for p in work.iterdir()] == ["native"], f"{at(k)}: leftovers not cleaned"


# --- speech synthesize ----------------------------------------------------------------------------


def test_synthesize_killed_anywhere_leaves_the_old_or_the_new_wav(tmp_path):
    from reempathy.speech.audio import read_wav, write_wav
    from reempathy.speech.tiny import make_tiny_decoder_dir

    decoder = make_tiny_decoder_dir(tmp_path / "decoder")
    (tmp_path / "u.json").write_text(json.dumps([1, 2, 3, 4]))
    out = tmp_path / "out.wav"
    args = ["speech", "synthesize", "--decoder", str(decoder), "--units", str(tmp_path / "u.json"), "--device", "cpu",
            "--out", str(out)]
    count = count_points(args, tmp_path)
    new_size = out.stat().st_size
    write_wav(out, torch.zeros(100), 22050)  # the previous complete output: another, shorter WAV
    old = out.read_bytes()
    for k in kill_points(count, "synthesize"):
        out.write_bytes(old)
        killed(k, args, tmp_path)
        after = out.read_bytes()
        # the old file, or a complete new one (same length; its samples may differ by thread count)
        assert after == old or (len(after) == new_size and read_wav(out).sample_rate == 22050), f"{at(k)}"
        assert main(args) == 0
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert leftovers == [], f"{at(k)}: {leftovers} not cleaned by the next run"


# --- run ------------------------------------------------------------------------------------------


def test_run_killed_anywhere_resumes_to_the_same_results(tmp_path):
    lines = [x for x in (ROOT / "examples" / "empathy_dialogues.jsonl").read_text().splitlines() if x.strip()][:4]
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "run.toml").write_text('[strategy]\nname = "sft"\n[sampling]\ngreedy = true\n[decode]\nmax_new_tokens = 4\n')

    def args(out: str) -> list[str]:
        return ["run", "--config", "run.toml", "--data", "test.jsonl", "--out", out, "--batch-size", "1"]

    count = count_points(args("reference"), tmp_path)
    want = {doc["id"]: doc["result"]["ids"] for doc in map(json.loads, (tmp_path / "reference/results.jsonl").read_text().splitlines())}
    assert len(want) == 4
    for k in kill_points(count, "run"):
        out = tmp_path / f"killed-{k}"
        killed(k, args(out.name), tmp_path)
        results = out / "results.jsonl"
        if results.exists():
            text = results.read_text()
            complete = text.split("\n")[:-1]  # the piece after the last newline may be a torn line
            assert all(json.loads(line)["schema"] == "reempathy.run-record/1" for line in complete), f"{at(k)}"
        if (out / "manifest.json").exists():
            json.loads((out / "manifest.json").read_text())  # written whole, never half
        before = os.getcwd()
        os.chdir(tmp_path)
        try:
            assert main(args(out.name)) == 0, f"rerun after {at(k)}"
        finally:
            os.chdir(before)
        got = {doc["id"]: doc["result"]["ids"] for doc in map(json.loads, results.read_text().splitlines())}
        assert got == want, f"{at(k)}: the resumed run's answers differ"
