"""Issues 15 and 26's GPU figures: a GLM-4-Voice-9B-shape model, every side, against the bandwidth limit.

    bash bench/gpu.sh [--out DIR] [--budget-s 450]     # a CUDA machine: the sections that fit in 8 minutes
    bash bench/gpu.sh --only batches,prefill,quantized-sft-compiled   # a second run: the rows never measured
    bash bench/gpu.sh --profile [--profile-steps N]   # one profiled decode step per side (profile.md, traces)
    bash bench/gpu.sh --smoke [--out DIR] [--profile] # a tiny shape on CPU: the same code path
    bash bench/gpu.sh --shape mid --dtype float32 --tokens 64 --skip batches,quantized-sft-compiled
                                                      # compiled = eager in float32 on a small model, in seconds

The model is transformers' ``GlmForCausalLM`` (GLM-4-Voice's architecture) built from a config
with random weights directly on the device, in bfloat16: 40 layers, hidden 4096, 32 heads, 2 KV
heads, MLP 13696, vocabulary 168960 (nothing is downloaded). Its vocabulary is laid out as
GLM-4-Voice's (text ids below 151329, control tokens after them, 16384 audio units from 151552,
our delimiters after those), so the strategies decode real chunks and reflections on it:
``reempathy`` speaks 5 text + 10 audio tokens, then reflects for exactly 12 tokens, the issue's
arithmetic. The prompt is 150 token ids; every side decodes exactly ``--tokens`` (256) new tokens
greedily, stop tokens banned.

Sections, in the order they run (each one's results are written at once, so a run cut short
keeps what it measured; a section that would not fit in what is left of ``--budget-s`` is
skipped and says so):

1. environment, the model's weight bytes, the device-to-device copy bandwidth (a 4 GiB copy,
   bytes read + written / time, median of 10) and the bandwidth limit per token: the weight bytes
   one decode step reads (every parameter but the embedding table, of which one row) / that
   bandwidth;
2. ``generate()`` eager and with a static cache + compile (transformers' own CUDA-graph path);
3. our ``sft`` eager and compiled (``cache = "static"``, ``compile = true``);
4. ``reempathy`` + ``attention-reweight`` (α 1.15, layers 10–29) eager and compiled, and compiled
   with ``attention = "flex"`` (the plan in FlexAttention's kernel); whether the compiled tokens
   equal the eager ones (and flex's the SDPA-bias ones); time to first audio; real-time margin;
5. batches of 1, 8 and 32 rows of ``reempathy`` + ``attention-reweight`` through the batched loop
   (compiled), prompts of 144–156 tokens: tokens per second, and some rows' greedy agreement with
   the eager single-row loop;
6. a test set's refills prefilled together against one at a time (``prefill``, bench/prefill.py);
7. weight-only ``int8`` and ``int4`` (torchao) of the same model, ``sft`` compiled: ms per token and
   greedy agreement with bfloat16 over the first tokens (reported, not asserted).

``--only``/``--skip`` pick sections; ``--profile`` replaces the timings by a profile of one decode
step of each side (:func:`profile`, bench/step_profile.py).

Per side: ``ms_per_token`` = the whole call (prefill included) / new tokens, median of
``--runs`` (compiled sides; eager ones are timed once); ``ms_per_step`` = (whole call of N tokens - whole call of 1 token) / (N - 1), the
steady decode step, compared with the bandwidth limit. Each side is warmed up once first (the
compiled ones compile then); ``graphs_after_warmup`` counts graphs dynamo compiled during the
timed runs (0 expected). Peak memory is ``torch.cuda.max_memory_allocated`` per section.

Outputs: ``DIR/gpu-bench.json`` (schema ``reempathy.gpu-bench/1``) and ``DIR/gpu-bench.md``,
both with the device name and the date, written atomically.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reempathy.hooks import hookimpl  # noqa: E402  (pluggy only; the rest is imported once checked)

SCHEMA = "reempathy.gpu-bench/1"
# GLM-4-Voice-9B's shape (its config: 40 layers, hidden 4096, 32 heads, multi-query groups 2,
# kv channels 128, ffn 13696, padded vocabulary 168960, rotary on half of each head).
SHAPES: dict[str, dict[str, int]] = {
    "glm-4-voice-9b": {
        "hidden_size": 4096, "num_layers": 40, "num_heads": 32, "num_kv_heads": 2, "head_dim": 128,
        "intermediate_size": 13696, "vocab_size": 168960,
    },
    # A small model of the same family for quick checks (compiles in seconds): --shape mid.
    "mid": {
        "hidden_size": 2048, "num_layers": 8, "num_heads": 16, "num_kv_heads": 2, "head_dim": 128,
        "intermediate_size": 6848, "vocab_size": 168960,
    },
    "smoke": {
        "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
        "intermediate_size": 128, "vocab_size": 168960,
    },
}  # fmt: skip
TEXT_END = 151329  # GLM-4-Voice: text ids below this, control tokens from it
AUDIO_OFFSET, AUDIO_COUNT = 151552, 16384  # <|audio_0|> .. <|audio_16383|>
PROMPT_TOKENS = 150
REWEIGHT = {"factor": 1.15}  # default layers: the middle half (10-29 of 40)
REEMPATHY = {"text_tokens": 5, "audio_tokens": 10, "reflection_tokens": 12}  # the arithmetic
AGREEMENT_TOKENS = 64  # quantized vs bfloat16 greedy tokens compared over this many


SECTIONS = (
    "setup", "generate-eager", "generate-compiled", "sft-eager", "sft-compiled", "reempathy+reweight-eager",
    "reempathy+reweight-compiled", "reempathy+reweight-compiled-flex", "compiled-equals-eager", "batches", "prefill",
    "quantized-sft-compiled",
)  # fmt: skip
"""Every section, in the order a run takes them (also the sides ``--profile`` records, where they are sides)."""


class Skip(Exception):
    """A section that cannot run here (time budget, a missing package); recorded, not fatal."""


# --- the model ----------------------------------------------------------------------------------


def build_backbone(shape: dict[str, int], device: str, dtype: Any, seed: int = 0) -> Any:
    """A random ``GlmForCausalLM`` of ``shape`` built on ``device`` in ``dtype``, with a GLM-4-Voice vocabulary layout."""
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    from reempathy.backbones.base import Backbone, VocabLayout
    from reempathy.backbones.glm4voice.prompt import GLM4_VOICE_STREAM
    from reempathy.backbones.tiny import CONTROL_TOKENS, build_tokenizer

    config = GlmConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"],
        max_position_embeddings=8192,
        partial_rotary_factor=0.5,
        attention_bias=True,
        pad_token_id=0,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = GlmForCausalLM(config)  # transformers' own random init, on the device, in dtype
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    special = {name: TEXT_END + i for i, name in enumerate(CONTROL_TOKENS)}
    layout = VocabLayout(
        vocab_size=shape["vocab_size"],
        text_end=TEXT_END,
        audio_offset=AUDIO_OFFSET,
        audio_count=AUDIO_COUNT,
        special=special,
        stop_ids=(special["<|user|>"], special["<|endoftext|>"]),
    )
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, TEXT_END, (PROMPT_TOKENS,), generator=generator).tolist()
    prompt[0:2] = [special["[gMASK]"], special["<sop>"]]
    prompt[2] = special["<|user|>"]
    prompt[-1] = special["<|assistant|>"]
    return Backbone(
        name="glm-4-voice-9b-shape",
        model=model,
        tokenizer=build_tokenizer(),  # renders text ids it knows; the weights are random anyway
        layout=layout,
        stream=GLM4_VOICE_STREAM,
        max_context=8192,
        prompt_builder=lambda turns: list(prompt),
        info={"random": True, "seed": seed},
    )


def prompt_of(bb: Any, extra: int = 0) -> list[int]:
    """The bench prompt, ``extra`` tokens longer (>0) or shorter (<0), for rows of different lengths."""
    ids = bb.build_prompt([])
    if extra > 0:
        return ids[:-1] + [(7 * i + 11) % TEXT_END for i in range(extra)] + ids[-1:]
    if extra < 0:
        return ids[: 3] + ids[3 - extra :]
    return ids


def weight_bytes_per_step(model: Any) -> int:
    """Bytes a decode step reads from the weights: every parameter, but only one row of the embedding table."""
    from reempathy.backbones.quantize import weight_bytes

    total = weight_bytes(model)
    embed = model.get_input_embeddings().weight
    return total - embed.numel() * embed.element_size() + embed.shape[1] * embed.element_size()


def copy_bandwidth(device: str, size_bytes: int) -> dict[str, float]:
    """Bytes read + written per second by a device-to-device copy of ``size_bytes`` (median of 10, after 3 warm-ups)."""
    import torch

    src = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start = time.perf_counter()
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            b.synchronize()
            seconds = a.elapsed_time(b) / 1e3
        else:
            dst.copy_(src)
            seconds = time.perf_counter() - start
        if i >= 3:
            times.append(seconds)
    del src, dst
    t = statistics.median(times)
    return {"bytes": size_bytes, "seconds": t, "bytes_per_s": 2 * size_bytes / t}


# --- timing one side ----------------------------------------------------------------------------


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    synchronize(device)
    gc.collect()
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure(make_run: Callable[[int], Callable[[], Any]], n: int, runs: int, device: str) -> dict[str, Any]:
    """Warm up, then ``runs`` timed calls of ``n`` tokens and of 1 token; per-token and per-step ms."""
    make_run(n)()  # warm-up: compiles (on its first use of each shape) and captures
    before = graphs_compiled()
    long, short, outputs = [], [], []
    for _ in range(runs):
        out, seconds = timed(make_run(n), device)
        long.append(seconds)
        outputs.append(out)
        _, seconds = timed(make_run(1), device)
        short.append(seconds)
    t_n, t_1 = statistics.median(long), statistics.median(short)
    return {
        "ms_per_token": 1e3 * t_n / n,
        "ms_per_step": 1e3 * (t_n - t_1) / max(n - 1, 1),
        "call_s": long,
        "one_token_call_s": short,
        "graphs_after_warmup": graphs_compiled() - before,
        "last": outputs[-1],
    }


class BanStops:
    """Bans the stop tokens, so every answer decodes the whole budget."""

    def __init__(self, bb: Any) -> None:
        import torch

        self.ids = torch.tensor(bb.layout.stop_ids, device=bb.model.device)

    @hookimpl
    def reempathy_logits(self, session: Any, logits: Any) -> None:
        logits.index_fill_(0, self.ids, float("-inf"))


def plugins(bb: Any, variant: str) -> tuple[Any, list[Any]]:
    """A fresh strategy and processors for ``sft`` or ``reempathy+reweight``, through the registry."""
    from reempathy.registry import default_discovery

    registry = default_discovery().registry
    if variant == "sft":
        return registry.create("strategy", "sft", {}, bb), [BanStops(bb)]
    strategy = registry.create("strategy", "reempathy", dict(REEMPATHY), bb)
    reweight = registry.create("processor", "attention-reweight", dict(REWEIGHT), bb)
    return strategy, [reweight, BanStops(bb)]


def ours(
    bb: Any, variant: str, compiled: bool, attention: str = "sdpa-bias", extra: Callable[[], list[Any]] = list, prompt: int = 0
) -> Callable[[int], Callable[[], Any]]:
    """Our decode of ``variant`` (``n`` tokens per call); ``extra()`` adds processors (a profiler's step marker)."""
    from reempathy.decoding.loop import LoopOptions, decode

    def make(n: int) -> Callable[[], Any]:
        strategy, processors = plugins(bb, variant)
        cache = "static" if compiled else "dynamic"
        options = LoopOptions(
            max_new_tokens=n, greedy=True, strategy_name=variant, cache=cache, compile=compiled, attention=attention
        )
        return lambda: decode(bb, prompt_of(bb, prompt), strategy, [*processors, *extra()], options)

    return make


def transformers_generate(
    bb: Any, compiled: bool, backend: str, logits_processor: Callable[[], list[Any]] = list
) -> Callable[[int], Callable[[], Any]]:
    import torch
    from transformers import CompileConfig, LogitsProcessorList

    ids = torch.tensor([prompt_of(bb)], device=bb.model.device)
    kwargs: dict[str, Any] = {}
    if compiled:
        config = CompileConfig(backend=backend, mode="reduce-overhead" if bb.model.device.type == "cuda" else None)
        config._compile_all_devices = True  # generate() compiles by itself on CUDA only; the smoke runs on CPU
        kwargs = {"cache_implementation": "static", "compile_config": config}
    else:
        kwargs = {"disable_compile": True}

    def make(n: int) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                out = bb.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    eos_token_id=list(bb.layout.stop_ids),
                    pad_token_id=bb.layout.special["<|endoftext|>"],
                    logits_processor=LogitsProcessorList(logits_processor()),
                    **kwargs,
                )
            if out.shape[1] - ids.shape[1] != n:
                raise RuntimeError(f"generate() produced {out.shape[1] - ids.shape[1]} tokens, not {n}")
            return out[0, ids.shape[1] :].tolist()

        return call

    return make


def batch_tokens_per_s(bb: Any, rows: int, n: int, runs: int, device: str) -> dict[str, Any]:
    """``rows`` answers of ``reempathy+reweight`` through the compiled batched loop, one batch of ``rows``."""
    from reempathy.decoding.batch import RowRequest, decode_batch
    from reempathy.decoding.loop import LoopOptions

    options = LoopOptions(max_new_tokens=n, greedy=True, strategy_name="reempathy+reweight", cache="static", compile=True)
    answers: dict[int, list[int]] = {}

    def call() -> int:
        requests = []
        for r in range(rows):
            strategy, processors = plugins(bb, "reempathy+reweight")
            requests.append(RowRequest(r, prompt_of(bb, batch_extra(r)), strategy, processors, seed=r))
        total = 0
        for key, result in decode_batch(bb, requests, options, batch_size=rows):
            if result.counts.generated != n:
                raise RuntimeError(f"row {key} stopped after {result.counts.generated} tokens ({result.stop_reason})")
            answers[key] = list(result.ids)  # the answer's tokens (the prompt is not in them)
            total += n
        return total

    call()  # warm-up: compiles this batch shape
    before = graphs_compiled()
    times = [timed(call, device)[1] for _ in range(runs)]
    t = statistics.median(times)
    out = {"rows": rows, "tokens_per_s": rows * n / t, "call_s": times, "graphs_after_warmup": graphs_compiled() - before}
    # Greedy agreement of some rows with the eager single-row loop (the reference path), over the first tokens.
    agreement = {}
    for r in sorted({0, rows // 2, rows - 1}):
        single = ours(bb, "reempathy+reweight", False, prompt=batch_extra(r))(min(n, AGREEMENT_TOKENS))()
        agreement[str(r)] = _agreement(list(single.ids), answers[r])
    out["greedy_agreement_with_single_row"] = agreement
    return out


def batch_extra(row: int) -> int:
    """Row ``row``'s prompt is the bench prompt this many tokens longer (or shorter): 144-156 tokens."""
    return (row % 13) - 6


def _agreement(reference: list[int], got: list[int]) -> dict[str, Any]:
    """How far ``got`` follows ``reference`` over their first :data:`AGREEMENT_TOKENS` tokens."""
    k = min(AGREEMENT_TOKENS, len(got), len(reference))
    first = _first_difference(reference[:k], got[:k])
    return {
        "over_first": k,
        "equal_prefix": k if first is None else first,
        "equal_fraction": sum(a == b for a, b in zip(reference[:k], got[:k])) / max(k, 1),
    }


# --- the run --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What one run measures and how big it is."""

    shape: str
    device: str
    dtype: str
    tokens: int
    runs: int
    batches: tuple[int, ...]
    budget_s: float
    backend: str
    copy_bytes: int
    quantize: tuple[str, ...]
    smoke: bool
    skip: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    prefill: tuple[int, int, int] = (256, 32, 16)  # records, batch, tokens of the prefill section
    profile: bool = False
    profile_steps: int = 1


class Report:
    """The JSON document and the Markdown table, rewritten (atomically) after every section."""

    def __init__(self, out: Path, plan: Plan) -> None:
        self.out = out
        self.doc: dict[str, Any] = {"schema": SCHEMA, "plan": vars(plan).copy(), "sections": {}, "skipped": {}, "failed": {}}
        self.doc["plan"]["batches"] = list(plan.batches)
        self.doc["plan"]["quantize"] = list(plan.quantize)
        self.doc["plan"]["skip"] = list(plan.skip)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic(self.out / "gpu-bench.json", json.dumps(self.doc, indent=2, default=str) + "\n")
        _atomic(self.out / "gpu-bench.md", markdown(self.doc))


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def environment(plan: Plan) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": plan.device,
        "gpu": None,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
    try:
        import torchao

        env["torchao"] = torchao.__version__
    except ImportError:
        env["torchao"] = None
    return env


def peak_gib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def side_summary(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k != "last"}


def run(plan: Plan, out: Path) -> dict[str, Any]:
    import torch

    from reempathy.decoding import static

    started = time.perf_counter()
    report = Report(out, plan)
    doc = report.doc
    doc["environment"] = environment(plan)
    print(f"gpu bench: {doc['environment']['gpu'] or 'CPU'} — {doc['environment']['date_utc']}", flush=True)
    dtype = getattr(torch, plan.dtype)
    shape = SHAPES[plan.shape]
    n, runs, device = plan.tokens, plan.runs, plan.device

    def left() -> float:
        return plan.budget_s - (time.perf_counter() - started)

    def section(name: str, estimate_s: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        if name in plan.skip:
            doc["skipped"][name] = "--skip"
            return None
        if plan.only and name != "setup" and name not in plan.only:
            doc["skipped"][name] = "not in --only"
            return None
        if left() < estimate_s:
            doc["skipped"][name] = f"time budget: {left():.0f} s left, about {estimate_s:.0f} s needed"
            print(f"  {name}: skipped ({doc['skipped'][name]})", flush=True)
            report.write()
            return None
        t0 = time.perf_counter()
        reset_peak(device)
        try:
            result = fn()
        except Skip as exc:
            doc["skipped"][name] = str(exc)
            print(f"  {name}: skipped ({exc})", flush=True)
            report.write()
            return None
        except Exception as exc:  # noqa: BLE001 - one failing side must not lose the others' figures
            doc["failed"][name] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
            print(f"  {name}: FAILED ({doc['failed'][name]})", flush=True)
            report.write()
            return None
        result["seconds"] = round(time.perf_counter() - t0, 1)
        result["peak_gib"] = peak_gib(device)
        doc["sections"][name] = result
        report.write()
        print(f"  {name}: {result['seconds']} s", flush=True)
        return result

    # Rough costs on an H100/H200 for the 9B shape: a compile of the decode graph about a minute.
    scale = 0.1 if plan.smoke else 1.0
    state: dict[str, Any] = {}

    def setup() -> dict[str, Any]:
        bb = state["bb"] = build_backbone(shape, device, dtype)
        static.engine(bb.model).backend = plan.backend
        step_bytes = weight_bytes_per_step(bb.model)
        bw = copy_bandwidth(device, plan.copy_bytes)
        return {
            "shape": shape,
            "dtype": plan.dtype,
            "parameters": sum(p.numel() for p in bb.model.parameters()),
            "weight_bytes_per_step": step_bytes,
            "copy_bandwidth": bw,
            "bandwidth_limit_ms_per_step": 1e3 * step_bytes / bw["bytes_per_s"],
            "prompt_tokens": len(prompt_of(bb)),
            "new_tokens": n,
        }

    if section("setup", 30 * scale, setup) is None:
        return doc
    bb = state["bb"]
    tokens: dict[str, list[int]] = {}

    # Eager sides take one timed run: a GPU's run-to-run spread is small next to what they show,
    # and the time goes to the compiles.
    def generate_side(compiled: bool) -> dict[str, Any]:
        m = measure(transformers_generate(bb, compiled, plan.backend), n, runs if compiled else 1, device)
        tokens[f"generate-{'compiled' if compiled else 'eager'}"] = m["last"]
        return side_summary(m)

    def our_side(variant: str, compiled: bool, attention: str = "sdpa-bias") -> dict[str, Any]:
        m = measure(ours(bb, variant, compiled, attention), n, runs if compiled else 1, device)
        result = m["last"]
        name = f"{variant}-{'compiled' if compiled else 'eager'}{'-flex' if attention == 'flex' else ''}"
        tokens[name] = list(result.ids)
        summary = side_summary(m)
        t = result.timings
        summary.update(
            time_to_first_token_s=t.time_to_first_token_s,
            time_to_first_audio_s=t.time_to_first_audio_s,
            itl_p50_ms=1e3 * statistics.median(t.token_latencies_s[1:] or t.token_latencies_s),
            generated=result.counts.generated,
            forced=result.counts.forced,
            audio_units=len(result.audio_units),
            hidden_segments=len(result.hidden),
            decode_s=t.total_s,
            realtime_margin=(len(result.audio_units) / t.total_s) / bb.stream.audio_rate_hz if t.total_s else None,
        )
        speech_s = len(result.audio_units) / bb.stream.audio_rate_hz
        if speech_s:
            # Decode tokens (sampled; forced ones ride in two-token steps) per second of speech, and
            # the margin at the steady step time: speech produced per second of decoding.
            summary["tokens_per_speech_s"] = result.counts.generated / speech_s
            summary["realtime_margin_steady"] = speech_s / (result.counts.generated * summary["ms_per_step"] / 1e3)
        return summary

    compile_s = 60 * scale
    eager_s = 6 * 2 * n / 256 * scale
    section("generate-eager", eager_s, lambda: generate_side(False))
    section("generate-compiled", compile_s + eager_s / 3, lambda: generate_side(True))
    section("sft-eager", eager_s, lambda: our_side("sft", False))
    section("sft-compiled", compile_s + eager_s / 3, lambda: our_side("sft", True))
    section("reempathy+reweight-eager", eager_s, lambda: our_side("reempathy+reweight", False))
    section("reempathy+reweight-compiled", 2 * compile_s + eager_s / 3, lambda: our_side("reempathy+reweight", True))
    section(
        "reempathy+reweight-compiled-flex",
        2 * compile_s + eager_s / 3,
        lambda: our_side("reempathy+reweight", True, attention="flex"),
    )

    def agreement() -> dict[str, Any]:
        pairs = {}
        for variant in ("generate", "sft", "reempathy+reweight"):  # generate(): how far bf16 alone moves greedy tokens
            a, b = tokens.get(f"{variant}-eager"), tokens.get(f"{variant}-compiled")
            if a is None or b is None:
                continue
            pairs[variant] = {"equal": a == b, "first_difference": _first_difference(a, b), "tokens": len(a)}
        a, b = tokens.get("reempathy+reweight-compiled"), tokens.get("reempathy+reweight-compiled-flex")
        if a is not None and b is not None:  # the two kernels that carry the plan, both compiled
            pairs["reempathy+reweight flex vs sdpa-bias"] = {  # not eager vs compiled: the two compiled kernels
                "equal": a == b, "first_difference": _first_difference(a, b), "tokens": len(a)
            }
        if not pairs:
            raise Skip("no eager/compiled pair was measured")
        return {"compiled_vs_eager": pairs}

    section("compiled-equals-eager", 0, agreement)

    def batches() -> dict[str, Any]:
        out = {}
        for rows in plan.batches:
            if left() < compile_s + 10 * scale:
                doc["skipped"][f"batch-{rows}"] = f"time budget: {left():.0f} s left"
                continue
            out[str(rows)] = batch_tokens_per_s(bb, rows, n, max(1, runs - 1), device)
            doc["sections"]["batches-partial"] = out
            report.write()
        doc["sections"].pop("batches-partial", None)
        return {"reempathy+reweight": out}

    section("batches", compile_s + 10 * scale, batches)

    def prefills() -> dict[str, Any]:
        # Issue 26 item 5: a test set's refills prefilled together (right-padded) against one at a time.
        import prefill as prefill_bench

        records, batch, new_tokens = plan.prefill

        def make() -> list[Any]:
            from reempathy.decoding.batch import RowRequest

            requests = []
            for r in range(records):
                strategy, processors = plugins(bb, "reempathy+reweight")
                requests.append(RowRequest(r, prompt_of(bb, batch_extra(r)), strategy, processors, seed=r))
            return requests

        sync = lambda: synchronize(device)  # noqa: E731
        out: dict[str, Any] = {"records": records, "batch": batch, "tokens": new_tokens, "sides": {}}
        answers = {}
        for rows in sorted({1, min(8, batch), batch}):
            prefill_bench.records_per_s(bb, make, new_tokens, batch, rows, sync=sync)  # warm-up
            rates = []
            for _ in range(runs):
                rate, answers[rows] = prefill_bench.records_per_s(bb, make, new_tokens, batch, rows, sync=sync)
                rates.append(rate)
            side = {"records_per_s": statistics.median(rates), "runs": rates}
            if rows != 1:
                side["answers_equal_to_one_at_a_time"] = sum(answers[rows][k] == answers[1][k] for k in answers[1]) / len(answers[1])
                side["over_one_at_a_time"] = side["records_per_s"] / out["sides"]["1"]["records_per_s"]
            out["sides"][str(rows)] = side
        return out

    section("prefill", 60 * scale, prefills)

    def quantized() -> dict[str, Any]:
        from reempathy.backbones.quantize import quantize_weights

        out: dict[str, Any] = {}
        reference = tokens.get("sft-compiled") or tokens.get("sft-eager")
        if reference is None:  # the bf16 sides were left out of this run: an eager bf16 answer is the reference
            reference = list(ours(bb, "sft", False)(AGREEMENT_TOKENS)().ids)
        for kind in plan.quantize:
            if left() < compile_s + eager_s / 3:
                doc["skipped"][f"quantize-{kind}"] = f"time budget: {left():.0f} s left"
                continue
            try:
                qbb = state.setdefault("q", {}).get(kind)
                if qbb is None:
                    qbb = build_backbone(shape, device, dtype)  # the same seed: the same weights as bf16
                    quantize_weights(qbb.model, kind)
                    static.engine(qbb.model).backend = plan.backend
            except Exception as exc:  # noqa: BLE001 - a missing extra or an unsupported kind is reported
                doc["skipped"][f"quantize-{kind}"] = f"{type(exc).__name__}: {exc}"
                continue
            try:
                m = measure(ours(qbb, "sft", True), n, runs, device)
            except Exception as exc:  # noqa: BLE001 - reported; the other kind may still run
                doc["failed"][f"quantize-{kind}"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
                continue
            got = list(m["last"].ids)
            summary = side_summary(m)
            summary["weight_bytes_per_step"] = weight_bytes_per_step(qbb.model)
            summary["greedy_agreement"] = _agreement(reference, got)
            out[kind] = summary
            del qbb
            state.get("q", {}).pop(kind, None)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        if not out:
            raise Skip("; ".join(f"{k}: {v}" for k, v in doc["skipped"].items() if k.startswith("quantize-")) or "none")
        return out

    if plan.quantize:
        section("quantized-sft-compiled", compile_s + eager_s / 3, quantized)
    doc["ratios"] = ratios(doc)
    doc["total_s"] = round(time.perf_counter() - started, 1)
    report.write()
    return doc


def profile(plan: Plan, out: Path) -> dict[str, Any]:
    """``--profile``: one decode step of each side under ``torch.profiler`` (bench/step_profile.py); profile.md, profile.json, traces."""
    import torch

    import step_profile
    from reempathy.decoding import static

    doc: dict[str, Any] = {"schema": SCHEMA + "/profile", "plan": vars(plan).copy(), "sides": {}}
    doc["plan"]["batches"], doc["plan"]["quantize"] = list(plan.batches), list(plan.quantize)
    doc["environment"] = environment(plan)
    print(f"gpu bench profile: {doc['environment']['gpu'] or 'CPU'} — {doc['environment']['date_utc']}", flush=True)
    bb = build_backbone(SHAPES[plan.shape], plan.device, getattr(torch, plan.dtype))
    static.engine(bb.model).backend = plan.backend
    n = step_profile.tokens_needed(plan.profile_steps)
    sides: dict[str, Callable[[Callable[[], list[Any]]], Callable[[int], Callable[[], Any]]]] = {
        "generate-eager": lambda extra: transformers_generate(bb, False, plan.backend, extra),
        "generate-compiled": lambda extra: transformers_generate(bb, True, plan.backend, extra),
        "sft-eager": lambda extra: ours(bb, "sft", False, extra=extra),
        "sft-compiled": lambda extra: ours(bb, "sft", True, extra=extra),
        "reempathy+reweight-eager": lambda extra: ours(bb, "reempathy+reweight", False, extra=extra),
        "reempathy+reweight-compiled": lambda extra: ours(bb, "reempathy+reweight", True, extra=extra),
        "reempathy+reweight-compiled-flex": lambda extra: ours(bb, "reempathy+reweight", True, "flex", extra=extra),
    }
    out.mkdir(parents=True, exist_ok=True)
    title = f"Decode step profile ({'smoke, ' if plan.smoke else ''}{plan.shape}, {plan.dtype}) — {doc['environment']['gpu'] or 'CPU'}, {doc['environment']['date_utc']}"
    for name, side in sides.items():
        if name in plan.skip or (plan.only and name not in plan.only):
            continue
        t0 = time.perf_counter()
        try:
            side(list)(n)()  # warm-up: the compiled sides compile here
            synchronize(plan.device)
            with step_profile.step_profiler(plan.device, plan.profile_steps) as (prof, marker):
                side(lambda: [marker])(n)()
                synchronize(plan.device)
            summary = step_profile.summarise(prof, plan.device)
            trace = out / f"trace-{name}.json"
            prof.export_chrome_trace(str(trace))
            summary["trace"] = trace.name
        except Exception as exc:  # noqa: BLE001 - one failing side must not lose the others' profiles
            summary = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
        doc["sides"][name] = summary
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        _atomic(out / "profile.json", json.dumps(doc, indent=2, default=str) + "\n")
        _atomic(out / "profile.md", step_profile.markdown(doc["sides"], plan.device, title))
    return doc


def _first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where ``a`` and ``b`` differ (None: equal over the shorter)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def ratios(doc: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, from whatever sections ran."""
    s = doc["sections"]
    out: dict[str, Any] = {}

    def step(name: str) -> float | None:
        return s.get(name, {}).get("ms_per_step")

    pairs = {
        "reempathy+reweight/sft (compiled, per step; target <= 1.05)": ("reempathy+reweight-compiled", "sft-compiled"),
        "reempathy+reweight flex/sft (compiled, per step; target <= 1.05)": ("reempathy+reweight-compiled-flex", "sft-compiled"),
        "reempathy+reweight flex/sdpa-bias (compiled, per step)": ("reempathy+reweight-compiled-flex", "reempathy+reweight-compiled"),
        "sft/generate (eager, per step; target <= 1.00)": ("sft-eager", "generate-eager"),
        "sft/generate (compiled, per step; target <= 1.00)": ("sft-compiled", "generate-compiled"),
        "compiled/eager sft (per step)": ("sft-compiled", "sft-eager"),
        "compiled/eager reempathy+reweight (per step)": ("reempathy+reweight-compiled", "reempathy+reweight-eager"),
    }
    for label, (a, b) in pairs.items():
        if step(a) and step(b):
            out[label] = step(a) / step(b)
    limit = s.get("setup", {}).get("bandwidth_limit_ms_per_step")
    if limit:
        for name in ("sft-compiled", "reempathy+reweight-compiled", "reempathy+reweight-compiled-flex", "generate-compiled"):
            if step(name):
                out[f"{name} / bandwidth limit (target <= 1.3)"] = step(name) / limit
    re = s.get("reempathy+reweight-compiled")
    if re and re.get("ms_per_step"):
        # The arithmetic: each spoken chunk of 5 text + 10 audio tokens (10 units = 0.8 s of
        # speech) is followed by a 12-token reflection, so 27 sampled tokens per 0.8 s (the two
        # delimiters ride in two-token steps). A random model's own text/audio mix says nothing about
        # a trained one's, so the target is computed from the layout and the measured step time.
        chunk = REEMPATHY["text_tokens"] + REEMPATHY["audio_tokens"] + REEMPATHY["reflection_tokens"]
        needed = chunk / (REEMPATHY["audio_tokens"] / 12.5)
        out["reempathy tokens/s needed for real time (5+10 chunks, 12-token reflections)"] = needed
        out["reempathy+reweight real-time margin at the compiled step time (target >= 2)"] = (
            1e3 / re["ms_per_step"]
        ) / needed
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


def markdown(doc: dict[str, Any]) -> str:
    """The table of a run, with the device and the date."""
    env = doc.get("environment", {})
    s = doc["sections"]
    setup = s.get("setup", {})
    limit = setup.get("bandwidth_limit_ms_per_step")
    lines = [
        f"# GPU bench ({'smoke, ' if doc['plan']['smoke'] else ''}{doc['plan']['shape']})",
        "",
        f"- device: {env.get('gpu') or 'CPU (' + str(env.get('cpu')) + ')'}; date: {env.get('date_utc')}",
        f"- torch {env.get('torch')}, transformers {env.get('transformers')}, torchao {env.get('torchao')}, "
        f"compile backend {doc['plan']['backend']}",
    ]
    if setup:
        bw = setup["copy_bandwidth"]["bytes_per_s"] / 1e9
        lines += [
            f"- model: {setup['parameters'] / 1e9:.2f} B parameters, {setup['dtype']}; weights read per step "
            f"{setup['weight_bytes_per_step'] / 1e9:.2f} GB; copy bandwidth {bw:.0f} GB/s (read + written); bandwidth limit "
            f"{_fmt(limit, 3)} ms/step",
            f"- prompt {setup['prompt_tokens']} tokens, {setup['new_tokens']} new tokens, greedy, stop tokens banned",
        ]
    lines += ["", "| side | ms/token | ms/step | tokens/s (step) | × bandwidth limit | graphs after warm-up | peak GiB |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name in (
        "generate-eager", "generate-compiled", "sft-eager", "sft-compiled",
        "reempathy+reweight-eager", "reempathy+reweight-compiled", "reempathy+reweight-compiled-flex",
    ):  # fmt: skip
        r = s.get(name)
        if r is None:
            lines.append(f"| {name} | {doc['skipped'].get(name, 'not run')} | | | | | |")
            continue
        tps = 1e3 / r["ms_per_step"] if r["ms_per_step"] > 0 else None
        over = r["ms_per_step"] / limit if limit else None
        lines.append(
            f"| {name} | {_fmt(r['ms_per_token'])} | {_fmt(r['ms_per_step'])} | {_fmt(tps, 1)} | {_fmt(over)} | "
            f"{r['graphs_after_warmup']} | {_fmt(r.get('peak_gib'))} |"
        )
    for kind, r in (s.get("quantized-sft-compiled") or {}).items():
        if not isinstance(r, dict) or "ms_per_step" not in r:
            continue
        agree = r.get("greedy_agreement") or {}
        tps = 1e3 / r["ms_per_step"] if r["ms_per_step"] > 0 else None
        over = r["ms_per_step"] / limit if limit else None
        lines.append(
            f"| sft-compiled {kind} (greedy = bf16 on {_fmt(agree.get('equal_prefix'))} of first "
            f"{_fmt(agree.get('over_first'))}) | {_fmt(r['ms_per_token'])} | {_fmt(r['ms_per_step'])} | {_fmt(tps, 1)} | "
            f"{_fmt(over)} | {r['graphs_after_warmup']} | {_fmt(r.get('peak_gib'))} |"
        )
    batches = (s.get("batches") or {}).get("reempathy+reweight", {})
    if batches:
        lines += [
            "",
            "| reempathy+reweight, batched (compiled) | tokens/s | graphs after warm-up | greedy = eager single row (rows: equal prefix of first) |",
            "|---|---:|---:|---|",
        ]
        for rows, r in batches.items():
            agree = ", ".join(
                f"{row}: {a['equal_prefix']}/{a['over_first']}" for row, a in (r.get("greedy_agreement_with_single_row") or {}).items()
            )
            lines.append(f"| batch {rows} | {_fmt(r['tokens_per_s'], 1)} | {r['graphs_after_warmup']} | {agree or '–'} |")
    pre = s.get("prefill")
    if pre:
        lines += [
            "",
            f"| refills prefilled (eager batched loop, {pre['records']} records, batch {pre['batch']}, {pre['tokens']} tokens each) "
            "| records/s | × one at a time | answers equal to one at a time |",
            "|---|---:|---:|---:|",
        ]
        for rows, r in pre["sides"].items():
            lines.append(
                f"| {'one at a time' if rows == '1' else f'up to {rows} together'} | {_fmt(r['records_per_s'], 1)} | "
                f"{_fmt(r.get('over_one_at_a_time'))} | {_fmt(r.get('answers_equal_to_one_at_a_time'))} |"
            )
    re = s.get("reempathy+reweight-compiled")
    if re:
        lines += [
            "",
            f"- reempathy+reweight compiled: time to first audio {_fmt(re.get('time_to_first_audio_s'), 3)} s, "
            f"{re.get('hidden_segments')} reflections and {re.get('audio_units')} audio units in {re.get('generated')} "
            f"tokens, real-time margin (audio produced / played, whole answer) {_fmt(re.get('realtime_margin'))}",
        ]
    agree = (s.get("compiled-equals-eager") or {}).get("compiled_vs_eager", {})
    for variant, a in agree.items():
        what = "tokens {} sdpa-bias's (both compiled)" if " vs " in variant else "compiled tokens {} eager"
        lines.append(
            f"- {variant}: " + what.format("equal" if a["equal"] else "differ from")
            + ("" if a["equal"] else f" (first difference at token {a['first_difference']})")
        )
    if doc.get("ratios"):
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v, 3)} |" for k, v in doc["ratios"].items()]
    if doc["skipped"]:
        lines += ["", "Skipped:"] + [f"- {k}: {v}" for k, v in doc["skipped"].items()]
    if doc.get("failed"):
        lines += ["", "Failed:"] + [f"- {k}: {v}" for k, v in doc["failed"].items()]
    if "total_s" in doc:
        lines += ["", f"Total {doc['total_s']} s."]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> tuple[Plan, Path]:
    p = argparse.ArgumentParser(prog="bench/gpu.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny shape on CPU, the same code path (about a minute)")
    p.add_argument("--out", default=None, help="output folder (default bench/out/gpu, or bench/out/gpu-smoke)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per answer (default 256; smoke 16)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per side (default 2; smoke 1)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting sections after this (default 450)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; smoke: eager)")
    p.add_argument("--quantize", default=None, help="comma-separated kinds for the quantized rows (default int8,int4)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="model shape (default glm-4-voice-9b; smoke: smoke)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None, help="weights' dtype (default bfloat16; smoke: float32)")
    p.add_argument("--skip", default="", help="comma-separated section names not to run (e.g. generate-eager,batches)")
    p.add_argument("--only", default="", help="comma-separated section names to run, the rest skipped (setup always runs)")
    p.add_argument("--profile", action="store_true", help="profile one decode step of each side instead (profile.md, traces)")
    p.add_argument("--profile-steps", type=int, default=1, help="decode steps each profile records (default 1)")
    args = p.parse_args(argv)
    if args.smoke:
        plan = Plan(
            shape="smoke", device="cpu", dtype="float32", tokens=args.tokens or 16, runs=args.runs or 1,
            batches=(1, 4), budget_s=args.budget_s or 300, backend=args.backend or "eager",
            copy_bytes=64 * 2**20, quantize=tuple((args.quantize or "int8,int4").split(",")), smoke=True,
        )  # fmt: skip
        out = Path(args.out or ROOT / "bench/out/gpu-smoke")
    else:
        plan = Plan(
            shape="glm-4-voice-9b", device="cuda", dtype="bfloat16", tokens=args.tokens or 256,
            runs=args.runs or 2, batches=(1, 8, 32), budget_s=args.budget_s or 450,
            backend=args.backend or "inductor", copy_bytes=4 * 2**30,
            quantize=tuple((args.quantize or "int8,int4").split(",")), smoke=False,
        )  # fmt: skip
        out = Path(args.out or ROOT / "bench/out/gpu")
    plan.shape = args.shape or plan.shape
    plan.dtype = args.dtype or plan.dtype
    plan.quantize = tuple(k for k in plan.quantize if k and k != "none")
    plan.skip = tuple(k.strip() for k in args.skip.split(",") if k.strip())
    plan.only = tuple(k.strip() for k in args.only.split(",") if k.strip())
    unknown = [k for k in plan.skip + plan.only if k not in SECTIONS]
    if unknown:
        p.error(f"unknown section {unknown[0]!r}; sections: {', '.join(SECTIONS)}")
    plan.profile = args.profile
    plan.profile_steps = max(1, args.profile_steps)
    if plan.smoke:
        plan.prefill = (8, 4, 4)
    return plan, out


def main(argv: list[str] | None = None) -> int:
    plan, out = parse(argv)
    try:
        import torch
    except ImportError:
        print("bench/gpu.sh: error: PyTorch is not importable by this Python", file=sys.stderr)
        return 2
    if plan.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench/gpu.sh: error: no CUDA device is visible (torch.cuda.is_available() is False); this bench "
            "needs an H100/H200-class GPU. Run `bash bench/gpu.sh --smoke` for the CPU smoke run.",
            file=sys.stderr,
        )
        return 2
    missing = [m for m in ("pydantic", "pluggy", "transformers", "tokenizers") if not _importable(m)]
    if missing:
        print(f"bench/gpu.sh: error: missing Python packages: {', '.join(missing)} (see bench/README.md)", file=sys.stderr)
        return 2
    if plan.profile:
        profile(plan, out)
        print((out / "profile.md").read_text())
        print(f"wrote {out / 'profile.md'}, {out / 'profile.json'} and the traces (trace-*.json, chrome://tracing or Perfetto)")
        return 0
    doc = run(plan, out)
    print(markdown(doc))
    print(f"wrote {out / 'gpu-bench.json'} and {out / 'gpu-bench.md'}")
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    raise SystemExit(main())
