"""``reempathy.testing``: fixtures and helpers for testing reempathy plugins — a pytest plugin.

Installed with reempathy (entry point group ``pytest11``), so its fixtures are available in any
pytest run without an import:

* ``reempathy_tiny`` — the tiny backbone (a small random GLM with GLM-4-Voice's token layout),
  built once per test session;
* ``reempathy_plugins(*plugins)`` — an isolated discovery holding only the built-ins and the
  given plugin modules or objects (installed plugins and plugins directories excluded); for the
  rest of the test it is also what ``reempathy.cli.main`` and :func:`default_discovery` use;
* ``reempathy_decode(strategy, …)`` — decode one answer on the tiny backbone through the same
  path as ``reempathy decode``, with the plugins of the current discovery, and return a
  :class:`DecodeRun` whose observer saw every token;
* ``reempathy_interleaved_dir`` — a tiny Llama with byte-level text and audio-unit tokens,
  saved with ``save_pretrained`` (for ``hf-interleaved`` and backbone plugins).

The same things are plain functions (:func:`isolated_discovery`, :func:`decode_with`,
:func:`assert_spans`, :func:`save_tiny_interleaved`) for use outside pytest. This module
imports nothing heavy at import time: pytest loads it in every project where reempathy is
installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import pytest

from reempathy.hooks import hookimpl  # pluggy only: cheap to import

if TYPE_CHECKING:
    from reempathy.backbones.base import Backbone
    from reempathy.registry import DiscoveryResult, Registry
    from reempathy.decoding.result import DecodeResult

DEFAULT_PROMPT = "I lost my keys and missed the bus."


# --- helpers -------------------------------------------------------------------------------------


def isolated_discovery(*plugins: object, builtins: bool = True) -> DiscoveryResult:
    """A discovery with the built-ins and ``plugins`` (modules or objects) only; installed plugins are excluded.

    Each plugin is registered under its ``__name__`` (a module) or its class name.
    """
    from reempathy.registry import discover

    named = [(getattr(p, "__name__", None) or type(p).__name__, p) for p in plugins]
    if builtins:
        return discover(named, installed=False, plugins_dirs=[])
    from unittest import mock

    with mock.patch("reempathy.registry._builtin_modules", lambda: []):
        return discover(named, installed=False, plugins_dirs=[])


class TokenRecorder:
    """An observer: every token of the answer with its kind (``sampled``, ``forced``, ``stop``, ``dropped``)."""

    def __init__(self) -> None:
        self.tokens: list[tuple[str, int]] = []

    @hookimpl
    def reempathy_token_appended(self, session: Any, token_id: int, kind: str) -> None:
        """Record one token."""
        self.tokens.append((kind, token_id))


class BanStop:
    """A processor that bans the backbone's stop tokens, so only the budget or the strategy ends the answer."""

    def __init__(self, backbone: Backbone) -> None:
        self.ids = list(backbone.layout.stop_ids)

    @hookimpl
    def reempathy_logits(self, session: Any, logits: Any) -> None:
        """Set the stop tokens' logits to -inf."""
        logits[self.ids] = float("-inf")


def span_runs(result: DecodeResult) -> list[tuple[str, int]]:
    """``(label, length)`` of each span of the answer, in order (the prompt left out)."""
    return [(s["label"], s["end"] - s["start"]) for s in result.spans if s["label"] != "prompt"]


def span_labels(result: DecodeResult) -> list[str]:
    """The label of each span of the answer, in order (the prompt left out)."""
    return [label for label, _ in span_runs(result)]


def assert_spans(result: DecodeResult, expected: Sequence[str | tuple[str, int]], *, prefix: bool = False) -> None:
    """Assert the answer's spans: a list of labels, or of ``(label, length)`` pairs; ``prefix`` compares only the start.

    >>> assert_spans(result, ["spoken_text", "spoken_audio", "control", "reflection", "control"], prefix=True)
    """
    runs = span_runs(result)
    got: list[Any] = [r if isinstance(e, tuple) else r[0] for r, e in zip(runs, expected)]
    if not prefix:
        got += [r[0] for r in runs[len(expected):]]
    if prefix and len(runs) < len(expected):
        got += ["(missing)"] * (len(expected) - len(runs))
    if got != list(expected):
        shown = " ".join(f"{label}*{n}" for label, n in runs)
        raise AssertionError(f"spans differ:\n  expected {list(expected)}\n  got      {got}\n  answer   {shown}")


@dataclass
class DecodeRun:
    """One decoded answer and what an observer saw of it."""

    result: DecodeResult
    tokens: list[tuple[str, int]] = field(default_factory=list)

    @property
    def appended(self) -> list[int]:
        """Ids of every token appended to the answer (sampled and forced), in order."""
        return [t for kind, t in self.tokens if kind in ("sampled", "forced")]

    def span_runs(self) -> list[tuple[str, int]]:
        """``(label, length)`` of each span of the answer."""
        return span_runs(self.result)

    def assert_spans(self, expected: Sequence[str | tuple[str, int]], *, prefix: bool = False) -> None:
        """:func:`assert_spans` on this answer."""
        assert_spans(self.result, expected, prefix=prefix)


def decode_with(
    registry: Registry,
    backbone: Backbone,
    strategy: str = "sft",
    strategy_options: dict[str, Any] | None = None,
    processors: Sequence[str | tuple[str, dict[str, Any]]] = (),
    *,
    plugins: Sequence[object] = (),
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 24,
    greedy: bool = True,
    seed: int = 0,
    ban_stop: bool = False,
) -> DecodeRun:
    """Decode one answer through the path of ``reempathy decode`` (config → registry → loop).

    ``processors`` are registered names, or ``(name, options)``; ``plugins`` are plugin objects
    added after them (observers, test doubles). ``ban_stop`` bans the backbone's stop tokens
    (a random tiny model may otherwise stop anywhere).
    """
    from reempathy.config import ComponentConfig, DecodeConfig, DecodeSettings, SamplingConfig
    from reempathy.runner import run_decode

    procs = [ComponentConfig(name=p) if isinstance(p, str) else ComponentConfig(name=p[0], **p[1]) for p in processors]
    cfg = DecodeConfig(
        backbone=ComponentConfig(name=backbone.name),
        strategy=ComponentConfig(name=strategy, **(strategy_options or {})),
        processors=procs,
        sampling=SamplingConfig(greedy=greedy, seed=seed),
        decode=DecodeSettings(max_new_tokens=max_new_tokens, prompt=prompt),
    )
    recorder = TokenRecorder()
    extra: list[object] = [*plugins, recorder]
    if ban_stop:
        extra.insert(0, BanStop(backbone))
    result = run_decode(cfg, registry, backbone=backbone, observers=extra)
    return DecodeRun(result, recorder.tokens)


def save_tiny_interleaved(
    directory: str | Path,
    *,
    audio_units: int = 64,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    delimiters: bool = False,
) -> dict[str, Any]:
    """Build a tiny random Llama with byte-level text and ``<|audio_N|>`` tokens and save it with ``save_pretrained``.

    Text is the 256 byte tokens (ids 0–255); then control tokens (``<|endoftext|>``,
    ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|begin_of_audio|>``,
    ``<|end_of_audio|>``), then ``audio_units`` audio tokens; a chat template in the tokenizer.
    ``delimiters`` adds the reflection/thought delimiters too (by default the backbone adds them).
    Returns the ``[backbone]`` options that load it as ``hf-interleaved``.
    """
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from reempathy.backbones.base import DELIMITER_TOKENS

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)
    control = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_audio|>", "<|end_of_audio|>"]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in control], special_tokens=True)
    tok.add_tokens(
        [AddedToken(f"<|audio_{i}|>", special=True, normalized=False) for i in range(audio_units)], special_tokens=True
    )
    if delimiters:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in DELIMITER_TOKENS], special_tokens=True)
    tok.eos_token = "<|endoftext|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    vocab = len(tok)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # Default initialisation leaves every logit near 0; wider weights make greedy choices clear-cut.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return {
        "name": "hf-interleaved",
        "path": str(directory),
        "audio_begin": "<|begin_of_audio|>",
        "audio_end": "<|end_of_audio|>",
        "stop_tokens": ["<|user|>", "<|endoftext|>"],
        "stream": {"text_tokens": 4, "audio_tokens": 8},
    }


# --- fixtures ------------------------------------------------------------------------------------


class _Current:
    """Stands in for :func:`default_discovery` while a test's isolated discovery is active."""

    def __init__(self, result: DiscoveryResult) -> None:
        self.result = result

    def __call__(self) -> DiscoveryResult:
        return self.result

    def cache_clear(self) -> None:
        """Nothing to forget: the test chose this discovery."""


@pytest.fixture(scope="session")
def reempathy_tiny() -> Backbone:
    """The tiny backbone (seed 0), built once per test session. Do not change its weights."""
    from reempathy.backbones.tiny import TinyOptions, load_tiny

    return load_tiny(TinyOptions())


@pytest.fixture(scope="session")
def reempathy_interleaved_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``[backbone]`` options of a tiny ``hf-interleaved`` model saved once per session (:func:`save_tiny_interleaved`)."""
    return save_tiny_interleaved(tmp_path_factory.mktemp("tiny-interleaved"))


@pytest.fixture()
def reempathy_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., DiscoveryResult]]:
    """``reempathy_plugins(*plugins)`` → an isolated discovery (built-ins + ``plugins``), current for this test."""
    import reempathy.registry as registry_module

    def activate(*plugins: object) -> DiscoveryResult:
        result = isolated_discovery(*plugins)
        monkeypatch.setattr(registry_module, "default_discovery", _Current(result))
        return result

    yield activate


@pytest.fixture()
def reempathy_decode(reempathy_tiny: Backbone) -> Callable[..., DecodeRun]:
    """``reempathy_decode(strategy="sft", strategy_options=None, processors=(), **kw)`` → :class:`DecodeRun` on the tiny backbone.

    Uses the current discovery: the one a ``reempathy_plugins(...)`` call made in this test, or
    the built-ins alone. Keywords as :func:`decode_with` (``backbone=`` picks another backbone).
    """

    def run(strategy: str = "sft", strategy_options: dict[str, Any] | None = None, processors: Sequence[Any] = (), **kw: Any) -> DecodeRun:
        import reempathy.registry as registry_module

        current = registry_module.default_discovery
        disc = current() if isinstance(current, _Current) else isolated_discovery()
        backbone = kw.pop("backbone", None) or reempathy_tiny
        return decode_with(disc.registry, backbone, strategy, strategy_options, processors, **kw)

    return run


__all__ = [
    "BanStop",
    "DecodeRun",
    "TokenRecorder",
    "assert_spans",
    "decode_with",
    "isolated_discovery",
    "save_tiny_interleaved",
    "span_labels",
    "span_runs",
    "reempathy_decode",
    "reempathy_interleaved_dir",
    "reempathy_plugins",
    "reempathy_tiny",
]
