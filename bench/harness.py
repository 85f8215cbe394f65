"""What the benchmarks and ratios.py share: model shapes, equal-length runs of our decode and of generate(), no-op plugins.

Every comparison decodes the same prompt for exactly the same number of new tokens, greedily:
our decode bans the stop tokens with :class:`BanStops`, transformers' ``generate()`` gets the
same stop tokens as ``eos_token_id`` with ``min_new_tokens == max_new_tokens`` (its own
processor that bans them). Both pay one small logits processor per step.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from reempathy.backbones.base import Backbone, Turn
from reempathy.backbones.tiny import TinyOptions, load_tiny
from reempathy.decoding.batch import RowRequest, decode_batch
from reempathy.decoding.loop import LoopOptions, decode, session_plugin_manager
from reempathy.registry import default_discovery
from reempathy.decoding.result import DecodeResult
from reempathy.decoding.session import DecodeSession
from reempathy.hooks import hookimpl

# The CPU shapes the suite measures: the tests' tiny model, one large enough that the model
# (not Python) dominates a step, and the tests' tiny Qwen2.5-Omni checkpoint (its thinker: our
# decode against the thinker's own generate()).
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "cpu512": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 2, "intermediate_size": 1024},
    "qwen-tiny": {},
}
QWEN_MODELS = ("qwen-tiny",)
# The strategies measured; "+reweight" adds attention-reweight (α 1.15, default layers: the middle half).
VARIANTS = ("sft", "cotbs", "reempathy", "reempathy+reweight")
PROMPT = "I failed my driving test today and I feel stupid."
# Batched runs: rows whose prompts differ in length (PROMPT plus 0–12 words of this), so that a
# batch pads as a real test set does.
FILLER = "and my instructor said I was close but I do not believe it at all now".split()
BATCH_SIZES = (1, 4, 16)
BATCH_VARIANT = "reempathy+reweight"


class BanStops:
    """Bans the backbone's stop tokens, so every run decodes the whole budget."""

    def __init__(self, backbone: Backbone) -> None:
        self.ids = torch.tensor(backbone.layout.stop_ids, device=backbone.model.device)

    @hookimpl
    def reempathy_logits(self, session: DecodeSession, logits: torch.Tensor) -> None:
        logits.index_fill_(0, self.ids, float("-inf"))


class NoOp:
    """A plugin that implements the two per-token hooks and does nothing: pure dispatch cost."""

    @hookimpl
    def reempathy_logits(self, session: DecodeSession, logits: torch.Tensor) -> None:
        return None

    @hookimpl
    def reempathy_token(self, session: DecodeSession, token_id: int) -> None:
        return None


@lru_cache(maxsize=4)
def backbone(name: str, device: str = "cpu") -> Backbone:
    """The named model shape (built once per process)."""
    if name in QWEN_MODELS:
        return qwen_backbone(device)
    return load_tiny(TinyOptions(**MODELS[name], device=device))


def qwen_backbone(device: str) -> Backbone:
    """The tests' tiny Qwen2.5-Omni checkpoint, written to a temporary directory, loaded as a user's download is (thinker only)."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    from qwen25omni_fixture import make_tiny_qwen25omni_dir

    from reempathy.backbones.qwen25omni import Qwen25OmniOptions, load_qwen25omni

    root = Path(tempfile.mkdtemp(prefix="reempathy-bench-qwen-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    directory = make_tiny_qwen25omni_dir(root / "ckpt")
    return load_qwen25omni(Qwen25OmniOptions(path=str(directory), talker=False, device=device, dtype="float32"))


def prompt_ids(bb: Backbone) -> list[int]:
    return bb.build_prompt([Turn("user", text=PROMPT)])


def make_plugins(bb: Backbone, variant: str) -> tuple[object, list[object]]:
    """A fresh strategy object and processors for ``variant`` (strategies keep per-answer state)."""
    registry = default_discovery().registry
    name, _, extra = variant.partition("+")
    strategy = registry.get("strategy", name).factory(registry.validate("strategy", name, {}), bb)
    processors: list[object] = []
    if extra == "reweight":
        options = registry.validate("processor", "attention-reweight", {"factor": 1.15})
        processors.append(registry.get("processor", "attention-reweight").factory(options, bb))
    return strategy, processors


@dataclass
class DecodeArgs:
    """Everything one timed decode call needs, built outside the timed region."""

    bb: Backbone
    ids: list[int]
    strategy: object
    processors: list[object]
    options: LoopOptions


def decode_args(
    bb: Backbone, variant: str, n: int, noops: int = 0, cache: str = "dynamic", compile: bool = False
) -> DecodeArgs:
    strategy, processors = make_plugins(bb, variant)
    processors = [*processors, BanStops(bb), *(NoOp() for _ in range(noops))]
    options = LoopOptions(max_new_tokens=n, greedy=True, strategy_name=variant, cache=cache, compile=compile)
    return DecodeArgs(bb, prompt_ids(bb), strategy, processors, options)


def run_decode(a: DecodeArgs) -> DecodeResult:
    """Our decode of exactly ``a.options.max_new_tokens`` tokens."""
    result = decode(a.bb, a.ids, a.strategy, a.processors, a.options)
    if result.counts.generated != a.options.max_new_tokens:
        raise RuntimeError(f"decode stopped after {result.counts.generated} tokens ({result.stop_reason})")
    return result


def generate_inputs(bb: Backbone) -> dict[str, torch.Tensor]:
    ids = torch.tensor([prompt_ids(bb)], device=bb.model.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run_generate(
    bb: Backbone, inputs: dict[str, torch.Tensor], n: int, cache: str = "dynamic", compile: bool = False
) -> torch.Tensor:
    """transformers' ``generate()``, greedy, exactly ``n`` new tokens, the same stop tokens banned.

    With a static cache, generate() compiles its decode steps exactly when our side compiles too
    (on CUDA by itself, elsewhere told to through its ``compile_config``).
    """
    kwargs: dict[str, Any] = {}
    if cache == "static":
        kwargs["cache_implementation"] = "static"
        kwargs["disable_compile"] = not compile
        if compile and bb.model.device.type != "cuda":
            from transformers import CompileConfig

            config = CompileConfig(mode=None)  # inductor's default on CPU, as our compiled steps there
            config._compile_all_devices = True  # generate() compiles by itself on CUDA only
            kwargs["compile_config"] = config
    with torch.inference_mode():
        out = bb.model.generate(
            **inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=list(bb.layout.stop_ids),
            pad_token_id=bb.layout.special["<|endoftext|>"],
            **kwargs,
        )
    if out.shape[1] - inputs["input_ids"].shape[1] != n:
        raise RuntimeError(f"generate() produced {out.shape[1] - inputs['input_ids'].shape[1]} tokens, not {n}")
    return out


def dispatch_pm(bb: Backbone, noops: int) -> tuple[Any, DecodeSession, torch.Tensor]:
    """The per-session plugin manager of an ``sft`` decode with ``noops`` no-op plugins, a session and logits to call it with."""
    strategy, _ = make_plugins(bb, "sft")
    pm = session_plugin_manager(strategy, [NoOp() for _ in range(noops)])
    session = DecodeSession(bb, prompt_ids(bb), torch.Generator(), LoopOptions())
    logits = torch.zeros(bb.layout.vocab_size)
    return pm, session, logits


def dispatch_once(pm: Any, session: DecodeSession, logits: torch.Tensor) -> None:
    """The two hook calls the loop makes for every sampled token."""
    hook = pm.hook
    hook.reempathy_logits(session=session, logits=logits)
    hook.reempathy_token(session=session, token_id=0)


def row_prompt(bb: Backbone, row: int) -> list[int]:
    """Row ``row``'s prompt: ``PROMPT`` plus ``3 * (row % 5)`` filler words."""
    words = FILLER[: 3 * (row % 5)]
    return bb.build_prompt([Turn("user", text=" ".join([PROMPT, *words]))])


def batch_requests(bb: Backbone, variant: str, rows: int) -> list[RowRequest]:
    """``rows`` requests with fresh plugins each (strategy, processors of ``variant``, stop tokens banned)."""
    requests = []
    for row in range(rows):
        strategy, processors = make_plugins(bb, variant)
        requests.append(RowRequest(row, row_prompt(bb, row), strategy, [*processors, BanStops(bb)], seed=row))
    return requests


def run_batch(
    bb: Backbone,
    requests: list[RowRequest],
    n: int,
    batch_size: int,
    variant: str,
    cache: str = "dynamic",
    compile: bool = False,
) -> int:
    """Decode ``requests`` through the batched loop, exactly ``n`` tokens each; the tokens generated."""
    options = LoopOptions(max_new_tokens=n, greedy=True, strategy_name=variant, cache=cache, compile=compile)
    total = 0
    for key, result in decode_batch(bb, requests, options, batch_size):
        if result.counts.generated != n:
            raise RuntimeError(f"row {key} stopped after {result.counts.generated} tokens ({result.stop_reason})")
        total += n
    return total
