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
             "reempathy+reweight-eager", "reempathy+reweight-compiled", "reempathy+reweight-compiled-flex"]  # fmt: skip
    for side in sides:
        s = doc["sections"][side]
        assert s["ms_per_token"] > 0 and s["graphs_after_warmup"] == 0, side
        assert side in table
    assert doc["sections"]["reempathy+reweight-compiled"]["hidden_segments"] >= 1
    pairs = doc["sections"]["compiled-equals-eager"]["compiled_vs_eager"]
    assert set(pairs) == {"generate", "sft", "reempathy+reweight", "reempathy+reweight flex vs sdpa-bias"}
    assert all(p["equal"] for p in pairs.values())
    batches = doc["sections"]["batches"]["reempathy+reweight"]
    assert set(batches) == {"1", "4"} and all(b["graphs_after_warmup"] == 0 for b in batches.values())
    for b in batches.values():  # float32 on CPU: every batch row decodes what the eager single-row loop does
        assert all(a["equal_prefix"] == a["over_first"] > 0 for a in b["greedy_agreement_with_single_row"].values())
    prefill = doc["sections"]["prefill"]["sides"]
    assert set(prefill) == {"1", "4"} and all(p.get("answers_equal_to_one_at_a_time", 1.0) == 1.0 for p in prefill.values())
    int8 = doc["sections"]["quantized-sft-compiled"]["int8"]
    assert int8["greedy_agreement"]["over_first"] == 16  # the smoke run's answer length
    assert "CUDA only" in doc["skipped"]["quantize-int4"]
    assert doc["environment"]["date_utc"] in table and "bandwidth limit" in table
    assert "reempathy+reweight/sft (compiled, per step; target <= 1.05)" in doc["ratios"]


def test_the_rows_never_measured_run_alone_with_their_bf16_reference(tmp_path):
    # What a second GPU invocation runs: the batches and quantized rows only, the agreement reference made on the spot.
    done = _run("--smoke", "--out", str(tmp_path), "--only", "batches,quantized-sft-compiled", "--quantize", "int8")
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert set(doc["sections"]) == {"setup", "batches", "quantized-sft-compiled"}
    assert doc["skipped"]["sft-compiled"] == "not in --only"
    assert doc["sections"]["quantized-sft-compiled"]["int8"]["greedy_agreement"]["over_first"] == 16


def test_the_smoke_profile_writes_each_sides_step_table_and_trace(tmp_path):
    sides = ["generate-eager", "sft-compiled", "reempathy+reweight-compiled"]
    done = _run("--smoke", "--profile", "--out", str(tmp_path), "--only", ",".join(sides))
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "profile.json").read_text())
    table = (tmp_path / "profile.md").read_text()
    assert list(doc["sides"]) == sides
    for side in sides:
        s = doc["sides"][side]
        assert "error" not in s, s
        assert s["steps"] == 1 and s["wall_us"] > 0 and 0 <= s["host_gaps_us"] <= s["wall_us"]
        assert s["top_ops"] and all(o["calls_per_step"] > 0 for o in s["top_ops"])
        assert (tmp_path / s["trace"]).stat().st_size > 0
        assert f"## {side}" in table
    assert "host gaps" in table and doc["environment"]["date_utc"] in table


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
    with pytest.raises(SystemExit):
        gpu.parse(["--only", "batch-32"])  # a section name, not a row: --only batches
