"""bench/gpu.sh: the GPU bench's smoke run on CPU (the same code path on a tiny shape), and its refusal without CUDA.

The smoke run compiles with torch.compile's "eager" backend (dynamo's graph capture and guards,
without inductor's code generation, whose CPU compile time would dominate): the figures are
meaningless, the point is that every section runs and writes its JSON and table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(
        ["bash", str(ROOT / "bench/gpu.sh"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the refusal cannot be shown")
def test_without_cuda_the_gpu_bench_fails_fast_naming_the_smoke_run(tmp_path):
    done = _run("--out", str(tmp_path))
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--smoke" in done.stderr
    assert not list(tmp_path.iterdir())


def test_the_smoke_run_writes_every_section_with_no_graph_compiled_after_warm_up(tmp_path):
    done = _run("--smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu-bench.json").read_text())
    table = (tmp_path / "gpu-bench.md").read_text()
    assert doc["schema"] == "reempathy.gpu-bench/1" and doc["failed"] == {}
    sides = ["generate-eager", "generate-compiled", "sft-eager", "sft-compiled",
             "reempathy+reweight-eager", "reempathy+reweight-compiled"]  # fmt: skip
    for side in sides:
        s = doc["sections"][side]
        assert s["ms_per_token"] > 0 and s["graphs_after_warmup"] == 0, side
        assert side in table
    assert doc["sections"]["reempathy+reweight-compiled"]["hidden_segments"] >= 1
    pairs = doc["sections"]["compiled-equals-eager"]["compiled_vs_eager"]
    assert set(pairs) == {"generate", "sft", "reempathy+reweight"} and all(p["equal"] for p in pairs.values())
    batches = doc["sections"]["batches"]["reempathy+reweight"]
    assert set(batches) == {"1", "4"} and all(b["graphs_after_warmup"] == 0 for b in batches.values())
    int8 = doc["sections"]["quantized-sft-compiled"]["int8"]
    assert int8["greedy_agreement"]["over_first"] > 0
    assert "CUDA only" in doc["skipped"]["quantize-int4"]
    assert doc["environment"]["date_utc"] in table and "bandwidth limit" in table
    assert "reempathy+reweight/sft (compiled, per step; target <= 1.05)" in doc["ratios"]


def test_shape_and_dtype_can_be_chosen_for_a_quick_equality_check():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "bench"))
    plan, _ = gpu.parse(["--shape", "mid", "--dtype", "float32", "--skip", "batches"])
    assert (plan.shape, plan.dtype, plan.device, plan.skip) == ("mid", "float32", "cuda", ("batches",))
    assert gpu.SHAPES["mid"]["vocab_size"] == gpu.SHAPES["glm-4-voice-9b"]["vocab_size"]
    plan, _ = gpu.parse(["--smoke"])
    assert (plan.shape, plan.dtype) == ("smoke", "float32")
    with pytest.raises(SystemExit):
        gpu.parse(["--shape", "70b"])
