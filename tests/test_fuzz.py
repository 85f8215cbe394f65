"""Fuzz suite (issue 16): generated configs, command lines, training records, units files and WAVs never crash a command.

Every property runs the real code in-process (``reempathy.cli.main`` where a command reads the
input, the record loader and builders for training data) and checks the promise of
docs/errors.md: exit 0 or 2, never 1 for the user's input, never a traceback, an error on one
line, and nothing written outside the example's own folder (a symbolic link in the sandbox
points outside: a command asked to write through it must refuse). The tiny backbone is built
once per distinct option set and cached, so most of the time goes into the code under test.
The number of inputs each property tried is printed at the end of the pytest run.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import tempfile
import tomllib
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from fuzz_support import COUNTS, EXITS, Deep, check_outcome, json_line, make_sandbox, populate, run_cli, snapshot, toml_dump
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reempathy.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
# Explicit, so that no profile changes them: hypothesis's CI profile would derandomize (the same
# inputs in every CI run); here each run draws new ones, and a failure prints the blob that
# reproduces it (@reproduce_failure). No example database: nothing is written into the checkout.
SETTINGS = dict(deadline=None, database=None, derandomize=False, suppress_health_check=list(HealthCheck), print_blob=True)
# REEMPATHY_FUZZ_SCALE=10 tries ten times as many inputs per property (a deeper local run; CI uses 1).
SCALE = max(1, int(os.environ.get("REEMPATHY_FUZZ_SCALE", "1") or 1))
MIN_TOTAL = 1000  # generated inputs per CI run (issue 16), checked by the last test of this module when every property ran
PROPERTIES = (
    "test_fuzz_toml_configs", "test_fuzz_command_lines", "test_fuzz_training_records", "test_fuzz_units_files",
    "test_fuzz_wav_files_read", "test_fuzz_wav_files_tokenize",
)
RAN: set[str] = set()  # the properties that ran to their end in this session


def examples(n: int) -> int:
    return n * SCALE


# --- shared fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The sandbox, the folder that must not change, and the repository's state before the module."""
    root = tmp_path_factory.mktemp("fuzz")
    sandbox, outside = make_sandbox(root)
    git = ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=all"]
    before_repo = subprocess.run(git, capture_output=True, text=True).stdout
    before_outside = snapshot(outside)
    yield sandbox, outside
    assert snapshot(outside) == before_outside
    assert subprocess.run(git, capture_output=True, text=True).stdout == before_repo, "the fuzz wrote into the repository"


@pytest.fixture(autouse=True)
def record_property(request):
    """Note each property that ran, so the total is checked only when all of them did (not under ``-k``)."""
    yield
    RAN.add(request.node.originalname)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: one thread avoids the contention of a shared CPU (a 4x difference under load).
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def cached_tiny():
    """Build each tiny backbone once: decoding does not change a backbone it did not load a checkpoint into."""
    from reempathy.backbones.tiny import load_tiny
    from reempathy.registry import default_discovery

    reg = default_discovery().registry.get("backbone", "tiny")
    real = reg.factory

    @lru_cache(maxsize=16)
    def build(key: str):
        return real(reg.config_model.model_validate_json(key))

    reg.factory = lambda options: build(options.model_dump_json())
    yield
    reg.factory = real
    assert real is load_tiny


def example_dir(sandbox: Path) -> Path:
    """A fresh working directory for one example, holding the awkward entries generated paths point at."""
    d = Path(tempfile.mkdtemp(dir=sandbox, prefix="ex-"))
    populate(d, sandbox.parent / "outside")
    return d


def checked(property_name: str, world, argv: list[str], cwd: Path) -> None:
    sandbox, outside = world
    before = snapshot(outside)
    outcome = run_cli(argv, cwd)
    check_outcome(outcome, argv)
    assert snapshot(outside) == before, f"{argv} changed files outside its folder"
    COUNTS[property_name] += 1
    EXITS.setdefault(property_name, Counter())[outcome.code] += 1


# --- values -------------------------------------------------------------------------------------

SPECIAL_INTS = [0, 1, -1, 2, 3, 7, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, -(2**63), 10**30]
SPECIAL_FLOATS = [0.0, -0.0, 1e-300, 5e-324, 1e300, 0.5, 1.0, 1.15, 2.0, float("inf"), float("-inf"), float("nan")]
SPECIAL_TEXT = ["", " ", "\ud800", "a\udcffb", "x" * 300, "auto", "cpu", "cuda", "banana", "0-1", "1-0", "a-b",
                "none", "1", "true", "<|user|>", "<|audio_3|>", "../outside/target.wav", "/dev/zero", "adir", "afile",
                "afile/x", "link.wav", "units.txt", "missing.txt", "sft.toml", "\x00", "\n[x]\n"]

scalars = st.one_of(
    st.booleans(),
    st.integers(-3, 70),
    st.sampled_from(SPECIAL_INTS),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from(SPECIAL_FLOATS),
    st.text(max_size=12),
    st.sampled_from(SPECIAL_TEXT),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=5
)


deep = st.integers(20, 3000).map(Deep)
wrong_types = st.one_of(st.booleans(), st.text(max_size=4), st.sampled_from([1.5, float("nan"), [], {}]))


def ints(good: list[int], bad: list[int]):
    """Two draws in three from ``good``, else an invalid value or a wrong type."""
    return st.integers(0, 2).flatmap(lambda roll: st.sampled_from(good) if roll else st.sampled_from(bad) | wrong_types)


# The tiny backbone's shape: small valid values (a valid 4096-wide, 64-layer model would take minutes
# to build — a correct but slow answer), and every kind of invalid one.
BACKBONE_VALUES = {
    "name": st.sampled_from(["tiny", "tiny", "tiny", "glm-4-voice", "nope", "", 5]),
    "seed": ints([0, 1, 7, 2**63 - 1], [-1, 2**63]),
    "hidden_size": ints([16, 32, 64], [8, 3, 0, 4097, 2**63 - 1]),
    "num_layers": ints([1, 2], [0, -1, 65, 2**63 - 1]),
    "num_heads": ints([1, 2, 4], [3, 16, 0, 257]),
    "num_kv_heads": ints([1, 2], [3, 0, 257]),
    "intermediate_size": ints([16, 64], [7, 16385, 2**63 - 1]),
    "text_vocab": ints([300, 512], [299, 8193]),
    "audio_units": ints([16, 64, 1024], [15, 16385]),
    "max_context": ints([256, 2048], [64, 63, 131073, 2**63 - 1]),
    "dtype": st.sampled_from(["float32", "float32", "bfloat16", "float16", "float64", "", 1]),
    "device": st.sampled_from(["cpu", "cpu", "auto", "cuda", "cuda:7", "banana", "", "meta", 0]),
    "path": st.sampled_from(["adir", "afile", "missing", "x" * 300, "", "link.wav", 1]),
    "bogus": values,
}
# Plausible values per key (two thirds of the draws), so that many generated configs get as far as decoding.
GOOD = {
    "text_tokens": st.integers(1, 20), "audio_tokens": st.integers(1, 20), "reflect": st.booleans(),
    "max_reflection_tokens": st.integers(1, 40), "reflection_tokens": st.integers(1, 10),
    "max_thought_tokens": st.integers(1, 40),
    "greedy": st.booleans(), "temperature": st.floats(0.1, 2.0), "top_k": st.integers(0, 50),
    "top_p": st.floats(0.05, 1.0), "repetition_penalty": st.floats(0.5, 2.0), "seed": st.integers(0, 2**63 - 1),
    "max_new_tokens": st.integers(1, 100), "prompt": st.text(min_size=1, max_size=20),
    "units": st.sampled_from(["units.txt"]), "system_prompt": st.text(max_size=20), "cache": st.sampled_from(["dynamic", "static"]),
    "compile": st.just(False), "checkpoint": st.sampled_from(["adir", "missing"]),
    "factor": st.floats(0.5, 2.0), "layers": st.sampled_from(["0-1", "0", [0, 1], "1-1"]), "heads": st.sampled_from([[0], [0, 1]]),
    "value": st.floats(0.1, 2.0), "k": st.integers(1, 50), "p": st.floats(0.05, 1.0), "penalty": st.floats(0.5, 2.0),
}
STRATEGY_KEYS = ["text_tokens", "audio_tokens", "reflect", "max_reflection_tokens", "reflection_tokens",
                 "max_thought_tokens", "bogus"]
SECTION_KEYS = {
    "sampling": ["greedy", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "bogus"],
    "decode": ["max_new_tokens", "prompt", "units", "system_prompt", "checkpoint", "cache", "compile", "bogus"],
}
PROCESSORS = ["attention-reweight", "temperature", "top-k", "top-p", "repetition-penalty", "nope", ""]
PROCESSOR_KEYS = ["factor", "layers", "heads", "value", "k", "p", "penalty", "bogus"]


def value_for(draw, key: str):
    if key in GOOD and draw(st.integers(0, 2)) > 0:
        return draw(GOOD[key])
    return draw(values)


SKELETONS = [tomllib.loads((ROOT / "configs" / f"{n}.toml").read_text()) for n in ("sft", "cotbs", "reempathy")]


def table(data: dict, name: str) -> dict:
    if not isinstance(data.get(name), dict):
        data[name] = {}
    return data[name]


@st.composite
def decode_configs(draw) -> dict:
    data = copy.deepcopy(draw(st.sampled_from(SKELETONS)))
    for _ in range(draw(st.integers(0, 3))):
        section = draw(st.sampled_from(["backbone", "backbone", "strategy", "strategy", "sampling", "sampling", "decode",
                                        "processors", "processors", "top", "deep"]))
        if section == "backbone":
            key = draw(st.sampled_from(sorted(BACKBONE_VALUES)))
            table(data, "backbone")[key] = draw(BACKBONE_VALUES[key])
        elif section == "strategy":
            key = draw(st.sampled_from(["name", *STRATEGY_KEYS]))
            value = draw(st.sampled_from(["sft", "cotbs", "reempathy", "nope", ""]) | values) if key == "name" else value_for(draw, key)
            table(data, "strategy")[key] = value
        elif section in SECTION_KEYS:
            key = draw(st.sampled_from(SECTION_KEYS[section]))
            table(data, section)[key] = value_for(draw, key)
        elif section == "processors":
            entry = {"name": draw(st.sampled_from(PROCESSORS))}
            for key in draw(st.lists(st.sampled_from(PROCESSOR_KEYS), max_size=3, unique=True)):
                entry[key] = value_for(draw, key)
            before = data.get("processors") if isinstance(data.get("processors"), list) else []
            data["processors"] = [*before, entry][-2:]
        elif section == "top":
            data[draw(st.sampled_from(["bogus", "backbone", "strategy", "sampling", "decode", "processors"]))] = draw(values)
        else:
            name = draw(st.sampled_from(["strategy", "decode"]))
            if isinstance(data.get(name), dict):
                data[name][draw(st.sampled_from(["text_tokens", "prompt"]))] = draw(deep)
    return data


def _slow_but_valid(data: dict) -> bool:
    decode = data.get("decode")
    # torch.compile is correct but takes tens of seconds per example.
    return isinstance(decode, dict) and decode.get("compile") is True and decode.get("cache") == "static"


# --- 1. TOML configs -----------------------------------------------------------------------------


@settings(max_examples=examples(250), **SETTINGS)
@given(data=decode_configs(), corrupt=st.integers(0, 9), at=st.integers(0, 400), junk=st.binary(min_size=1, max_size=4),
       prompt=st.booleans())
def test_fuzz_toml_configs(world, data, corrupt, at, junk, prompt):
    assume(not _slow_but_valid(data))
    cwd = example_dir(world[0])
    text = toml_dump(data).encode("utf-8", "surrogatepass")
    if corrupt == 0:  # one file in ten has bytes inserted somewhere
        text = text[:at] + junk + text[at:]
    (cwd / "c.toml").write_bytes(text)
    argv = ["decode", "--config", "c.toml", "--max-new-tokens", "1"] + (["--prompt", "hi"] if prompt else [])
    checked("toml config -> decode", world, argv, cwd)


# --- 2. command lines ----------------------------------------------------------------------------

PATHS = ["afile", "adir", "missing", "afile/x", "adir/new.wav", "link.wav", "x" * 300, "", "/dev/zero", "/dev/null",
         "units.txt", "garbage.toml", "sft.toml", "train.toml", "-", "--", "new.wav", "fifo"]
INPUT_PATHS = [p for p in PATHS if p != "fifo"]  # reading a pipe with no writer waits for one, as it should
NUMBERS = ["0", "1", "2", "-1", "x", "", "1.5", str(2**63), str(2**63 - 1), "1e3", " 3", "١", "9" * 5000]
TEXTS = ["hi", "", " ", "\udcff\udcfe hello", "x" * 5000, "<|user|>", "--prompt"]
SETS = ["strategy.name=cotbs", "strategy.name=", "strategy.text_tokens=true", "backbone.seed=-1", "sampling.seed=1e400",
        "decode.prompt=[[[[1]]]]", "processors.0.factor=2", "x", "=", "a..b=1", "backbone=5", "decode.units=adir",
        "backbone.device=\"banana\"", "decode.checkpoint=\"adir\"", "train.max_steps=0", "train.output_dir=\"afile\""]

FLAGS = {
    "decode": {"--config": INPUT_PATHS, "--strategy": ["sft", "cotbs", "reempathy", "", "nope"],
               "--backbone": ["tiny", "nope", ""], "--set": SETS, "--prompt": TEXTS, "--units": INPUT_PATHS,
               "--audio": INPUT_PATHS, "--out": PATHS, "--seed": NUMBERS, "--max-new-tokens": ["1", "2", "0", "x", "-5"],
               "--greedy": None, "--checkpoint": INPUT_PATHS, "--json": None, "--debug": None},
    "plugins": {"--json": None},
    "train": {"--config": INPUT_PATHS, "--max-steps": NUMBERS, "--resume": None, "--set": SETS, "--quiet": None},
    "speech tokenize": {"--tokenizer": INPUT_PATHS, "--json": None, "--device": ["cpu", "cuda", "banana", ""]},
    "speech synthesize": {"--decoder": INPUT_PATHS, "--units": INPUT_PATHS, "--out": PATHS, "--seed": NUMBERS,
                          "--float": None, "--save-mel": PATHS, "--device": ["cpu", "banana"]},
    "speech convert-decoder": {"--overwrite": None},
    "convert": {"--overwrite": None},
}
POSITIONALS = {"speech tokenize": INPUT_PATHS, "speech convert-decoder": INPUT_PATHS, "convert": ["glm-4-voice", "gguf", *INPUT_PATHS]}


@st.composite
def command_lines(draw) -> list[str]:
    command = draw(st.sampled_from([*FLAGS, "bogus", ""]))
    argv = command.split() if command else []
    flags = FLAGS.get(command, {})
    for _ in range(draw(st.integers(0, 5))):
        if flags and draw(st.integers(0, 9)) > 0:
            flag = draw(st.sampled_from(sorted(flags)))
            argv.append(flag)
            if flags[flag] is not None and draw(st.integers(0, 19)) > 0:
                argv.append(draw(st.sampled_from(flags[flag])))
        else:
            argv.append(draw(st.sampled_from(["--nope", "-x", "extra", "--help", "--", "--debug"])))
    for _ in range(draw(st.integers(0, 3))) if command in POSITIONALS else []:
        argv.append(draw(st.sampled_from(POSITIONALS[command])))
    return argv


@settings(max_examples=examples(250), **SETTINGS)
@given(argv=command_lines())
def test_fuzz_command_lines(world, argv):
    if argv[:1] == ["decode"] and "--max-new-tokens" not in argv:
        argv = [*argv, "--max-new-tokens", "1"]
    checked("command line", world, argv, example_dir(world[0]))


# --- 3. training records --------------------------------------------------------------------------

EXAMPLE_LINES = (ROOT / "examples" / "empathy_dialogues.jsonl").read_text(encoding="utf-8").splitlines()
RECORDS = [json.loads(line) for line in EXAMPLE_LINES if line.strip()][:6]
RECORD_PATHS = [("messages",), ("messages", 0), ("messages", 0, "role"), ("messages", 0, "text"), ("messages", 0, "units"),
                ("messages", -1, "text"), ("messages", -1, "units"), ("assessment",), ("assessment", "text"),
                ("assessment", "scores"), ("assessment", "scores", "need_support"), ("rejected",), ("rejected", "units"),
                ("rejected", "assessment", "scores", "emotional_support"), ("bogus",)]
RECORD_VALUES = st.one_of(values, deep, st.sampled_from(["<|audio_1|><|audio_2|>", "<|audio_99999|>", "hello <|audio_3|>",
                                                        "<|user|>", "user", "assistant", "system", [1, 2, 3], [-1], [2**70]]))


def set_path(record, path, value) -> None:
    node = record
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return
    try:
        node[path[-1]] = value
    except (IndexError, TypeError):
        pass


@st.composite
def jsonl_files(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(1, 3))):
        record = copy.deepcopy(draw(st.sampled_from(RECORDS)))
        for _ in range(draw(st.integers(0, 3))):
            set_path(record, draw(st.sampled_from(RECORD_PATHS)), draw(RECORD_VALUES))
        line = json_line(record).encode("utf-8", "surrogatepass")
        damage = draw(st.sampled_from(["none", "none", "none", "bytes", "cut", "surrogate"]))
        if damage == "bytes":
            at = draw(st.integers(0, len(line)))
            line = line[:at] + draw(st.binary(min_size=1, max_size=3)) + line[at:]
        elif damage == "cut":
            line = line[: draw(st.integers(0, len(line)))]
        elif damage == "surrogate":
            line = line.replace(b'"text": "', b'"text": "\\udc80', 1)
        lines.append(line)
    return b"\n".join(lines) + b"\n"


@settings(max_examples=examples(300), **SETTINGS)
@given(content=jsonl_files(), strategy=st.sampled_from(["sft", "cotbs", "reempathy", "dpo"]), skip_bad=st.booleans())
def test_fuzz_training_records(world, tiny, content, strategy, skip_bad):
    from reempathy.training.builders import BUILDERS, build_all
    from reempathy.data.records import load_records

    cwd = example_dir(world[0])
    path = cwd / "d.jsonl"
    path.write_bytes(content)
    spec = BUILDERS[strategy]
    code = 0
    try:
        records = load_records(str(path), tiny.layout.audio_count, skip_bad)
        build_all(records, tiny, spec, spec.options_model(), skip_bad)
    except InputError as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)
        assert str(path) in str(exc), str(exc)
        code = 2
    COUNTS["training records -> load + build"] += 1
    EXITS.setdefault("training records -> load + build", Counter())[code] += 1


# --- 4. units files -------------------------------------------------------------------------------

unit_ids = st.integers(0, 9).flatmap(
    lambda roll: st.integers(0, 1023) if roll else st.sampled_from([-1, 1024, 2**31, 2**63, 10**40])
)
units_text = st.one_of(
    st.lists(unit_ids, max_size=6).map(json.dumps),
    st.lists(unit_ids, max_size=6).map(lambda u: " ".join(map(str, u))),
    st.lists(unit_ids, max_size=6).map(lambda u: ",".join(map(str, u))),
    st.lists(unit_ids, max_size=6).map(lambda u: "".join(f"<|audio_{x}|>" for x in u)),
    st.lists(st.one_of(unit_ids, st.booleans(), st.floats(), st.text(max_size=3)), max_size=5).map(json.dumps),
    st.text(max_size=30),
    st.sampled_from(["hello <|audio_3|> 5 6", "[" * 4000 + "]" * 4000, "1_000", "1.5", "٣ ٤", "", "\n\n"]),
)


@settings(max_examples=examples(150), **SETTINGS)
@given(text=units_text, damage=st.integers(0, 9), junk=st.binary(min_size=1, max_size=3))
def test_fuzz_units_files(world, text, damage, junk):
    cwd = example_dir(world[0])
    raw = text.encode("utf-8", "surrogatepass") + (junk if damage == 0 else b"")
    (cwd / "u.txt").write_bytes(raw)
    checked("units file -> decode", world, ["decode", "--units", "u.txt", "--max-new-tokens", "1", "--greedy"], cwd)


# --- 5. WAV headers and bodies --------------------------------------------------------------------

FORMATS = [(1, 8), (1, 16), (1, 24), (1, 32), (3, 32), (3, 64), (0xFFFE, 16), (2, 16), (1, 12), (1, 0), (3, 16)]
RATES = [8000, 16000, 22050, 44100, 44101, 48000, 96001, 4000, 192000, 0, 1, 3999, 192001, 2**32 - 1]


def sometimes(draw, good, bad, odds: int = 4):
    """``good`` most of the time, ``bad`` one draw in ``odds``."""
    return draw(bad) if draw(st.integers(1, odds)) == 1 else draw(good)


@st.composite
def wav_files(draw) -> bytes:
    tag, bits = sometimes(draw, st.sampled_from(FORMATS[:7]), st.sampled_from(FORMATS[7:]), odds=6)
    channels = sometimes(draw, st.integers(1, 2), st.sampled_from([0, 3, 64, 65, 65535]), odds=6)
    rate = sometimes(draw, st.sampled_from(RATES[:9]), st.one_of(st.sampled_from(RATES[9:]), st.integers(0, 2**32 - 1)))
    width = max(bits // 8, 1)
    frames = draw(st.integers(0, 3000))
    samples = frames * min(channels, 2)
    if draw(st.integers(0, 4)) == 0:
        body = draw(st.binary(max_size=samples * width))
    elif tag == 3:
        wave = np.sin(np.arange(samples) / 7.0) * 0.3
        body = wave.astype("<f4" if bits == 32 else "<f8").tobytes()[: samples * width]
    else:  # integer PCM of any width: noise, never silent
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        body = rng.integers(0, 256, size=samples * width, dtype=np.uint8).tobytes()
    declared = sometimes(draw, st.just(len(body)), st.one_of(st.sampled_from([0, 0xFFFFFFFF]), st.integers(0, 2**32 - 1)))
    fmt = struct.pack("<HHIIHH", tag, channels, rate, (rate * width * channels) % 2**32, (width * channels) % 2**16, bits)
    if tag == 0xFFFE:
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", draw(st.sampled_from([1, 3, 7]))) + bytes(14)
    fmt_size = sometimes(draw, st.just(len(fmt)), st.integers(0, 64), odds=8)
    chunks = [b"fmt " + struct.pack("<I", fmt_size) + fmt]
    if draw(st.booleans()):
        extra = draw(st.binary(max_size=9))
        chunks.insert(draw(st.integers(0, 1)), b"LIST" + struct.pack("<I", len(extra)) + extra + b"\x00" * (len(extra) & 1))
    chunks.append(b"data" + struct.pack("<I", declared) + body)
    riff = b"".join(chunks)
    size = sometimes(draw, st.just(4 + len(riff)), st.integers(0, 2**32 - 1), odds=8)
    data = b"RIFF" + struct.pack("<I", size) + b"WAVE" + riff
    if draw(st.integers(0, 7)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.integers(0, 11)) == 0:
        data = draw(st.sampled_from([b"fLaC" + data, b"OggS", b"ID3", b"", b"RIFF"]))
    return data


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from reempathy.speech.tiny import make_tiny_tokenizer_dir

    return make_tiny_tokenizer_dir(tmp_path_factory.mktemp("fuzz-tok") / "tokenizer")


@settings(max_examples=examples(300), **SETTINGS)
@given(data=wav_files())
def test_fuzz_wav_files_read(world, data):
    from reempathy.speech.audio import load_speech, read_wav

    cwd = example_dir(world[0])
    (cwd / "in.wav").write_bytes(data)
    code = 0
    try:
        audio = read_wav(cwd / "in.wav")
        assert audio.samples.ndim == 2 and np.isfinite(audio.samples).all()
        load_speech(cwd / "in.wav")
    except InputError as exc:
        assert len(str(exc).splitlines()) == 1 and "in.wav" in str(exc)
        code = 2
    COUNTS["wav -> read"] += 1
    EXITS.setdefault("wav -> read", Counter())[code] += 1


@settings(max_examples=examples(60), **SETTINGS)
@given(data=wav_files())
def test_fuzz_wav_files_tokenize(world, tokenizer_dir, data):
    cwd = example_dir(world[0])
    (cwd / "in.wav").write_bytes(data)
    argv = ["speech", "tokenize", "--tokenizer", str(tokenizer_dir), "--device", "cpu", "in.wav"]
    checked("wav -> speech tokenize", world, argv, cwd)


# --- the total ------------------------------------------------------------------------------------


def test_fuzz_tried_at_least_1000_generated_inputs_in_total():
    """Hypothesis can stop a property short of max_examples (a small space, inputs filtered out): the sum is checked."""
    missing = [name for name in PROPERTIES if name not in RAN]
    if missing:
        pytest.skip(f"{len(missing)} fuzz properties did not run in this session (e.g. {missing[0]}): the total is checked "
                    "when all of them run")
    total = sum(COUNTS.values())
    counts = ", ".join(f"{name}: {n}" for name, n in sorted(COUNTS.items()))
    assert total >= MIN_TOTAL * SCALE, f"only {total} generated inputs were tried ({counts}); the suite promises {MIN_TOTAL * SCALE}"
