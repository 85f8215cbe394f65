"""``reempathy plugin new``: the files of a new plugin package, one template per kind.

Every template imports only ``reempathy.api`` (the plugin) and ``reempathy.testing`` (its
tests), so a generated package starts on the public API, and its options derive from
``reempathy.api.PluginOptions``, so they are as strict as the built-ins'. Where it decides: :func:`render`
picks the kind's plugin and test text and fills in the names; :func:`write_package` writes
the package into a temporary sibling folder and renames it into place, so a refused or
interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from reempathy.errors import InputError
from reempathy.paths import check_name
from reempathy.safe_write import replacing_dir

KINDS = ("strategy", "processor", "observer", "backbone")
_NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")


@dataclass(frozen=True)
class Names:
    """The names a package is built from: ``name`` (registered, and the distribution), ``module`` (import name)."""

    name: str
    module: str


def names_for(name: str) -> Names:
    """Check ``name`` (lower case letters, digits, ``-`` or ``_``) and derive the module name."""
    if not _NAME.fullmatch(name):
        raise InputError(
            f"plugin name {name!r}: use lower-case letters and digits, words joined by '-' or '_' (e.g. my-strategy)"
        )
    return Names(name=name, module=name.replace("-", "_"))


PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "__NAME__"
version = "0.1.0"
description = "A reempathy __KIND__ plugin: __NAME__"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["reempathy>=0.1"]

[project.optional-dependencies]
test = ["pytest>=8"]

# reempathy finds the plugin through this entry point once the package is installed.
[project.entry-points.reempathy]
__MODULE__ = "__MODULE__"

[tool.setuptools]
package-dir = {"" = "src"}
packages = ["__MODULE__"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

README = '''# __NAME__

A reempathy __KIND__ plugin (written against `reempathy.api`, API version 1).

    pip install -e ".[test]"     # reempathy finds it through its `reempathy` entry point
    reempathy plugins --options  # lists __NAME__ with its options
    pytest                       # its tests, with the fixtures of reempathy.testing

__USAGE__

The plugin is `src/__MODULE__/__init__.py`; its tests are `tests/test___MODULE__.py`. Hooks, the
session and directives: reempathy's docs/plugins.md; testing helpers: docs/testing.md.
'''

USAGE = {
    "strategy": '''Use it in a decode config:

```toml
[strategy]
name = "__NAME__"
spoken = 8
hidden = 4
```''',
    "processor": '''Use it in a decode config (processors run in the order listed):

```toml
[[processors]]
name = "__NAME__"
audio_bias = 2.0
```''',
    "observer": '''Use it in a decode config (an observer is listed like a processor):

```toml
[[processors]]
name = "__NAME__"
```

The counts land in the result's `extra["__NAME__"]` (`reempathy decode --json`).''',
    "backbone": '''Use it in a decode config:

```toml
[backbone]
name = "__NAME__"
path = "/models/my-model"    # a save_pretrained directory with tokenizer and chat template
```''',
}

PLUGINS = {
    "strategy": '''"""__NAME__: a reempathy strategy that speaks in chunks of ``spoken`` tokens with hidden notes of ``hidden`` tokens between them.

Where it decides: ``Strategy.reempathy_token`` switches to a hidden note when a spoken chunk is
full and back to speaking when the note is; ``Strategy.reempathy_logits`` keeps notes to text.
The delimiters are forced by the decoder in the same forward call as the sampled token.
"""

from __future__ import annotations

import torch
from pydantic import Field

from reempathy.api import (
    REFLECTION_CLOSE,
    REFLECTION_OPEN,
    SPEAK,
    Backbone,
    DecodeSession,
    Directive,
    PluginOptions,
    Register,
    Switch,
    hookimpl,
)

NOTE = "note"


class Options(PluginOptions):
    """Options of ``__NAME__`` (the ``[strategy]`` table of a decode config); strict, like reempathy's own."""

    spoken: int = Field(8, ge=1, description="tokens per spoken chunk")
    hidden: int = Field(4, ge=1, description="tokens per hidden note")


class Strategy:
    """Alternates spoken chunks and hidden notes of fixed sizes."""

    def __init__(self, options: Options, backbone: Backbone) -> None:
        self.options = options
        layout = backbone.layout
        self.open_id = layout.token_id(REFLECTION_OPEN)
        self.close_id = layout.token_id(REFLECTION_CLOSE)
        self.not_text = ~layout.text_mask(backbone.model.device)

    @hookimpl(tryfirst=True)
    def reempathy_logits(self, session: DecodeSession, logits: torch.Tensor) -> None:
        if session.hidden:
            logits.masked_fill_(self.not_text, float("-inf"))

    @hookimpl
    def reempathy_token(self, session: DecodeSession, token_id: int) -> Directive | None:
        done = len(session.segment) + 1  # this token included
        if not session.hidden and done >= self.options.spoken:
            return Switch(NOTE, forced=(self.open_id,), hidden=True)
        if session.hidden and done >= self.options.hidden:
            return Switch(SPEAK, forced=(self.close_id,))
        return None


@hookimpl
def reempathy_register_strategies(register: Register) -> None:
    register("__NAME__", Strategy, Options, "spoken chunks with hidden notes of fixed sizes between them")
''',
    "processor": '''"""__NAME__: a reempathy logits processor that adds ``audio_bias`` to every audio-unit token's logit.

Where it decides: ``AudioBias.reempathy_logits`` changes the logits in place, after the
strategy's constraints and before sampling (processors run in config order).
"""

from __future__ import annotations

import torch
from pydantic import Field

from reempathy.api import Backbone, DecodeSession, PluginOptions, Register, hookimpl


class Options(PluginOptions):
    """Options of ``__NAME__`` (a ``[[processors]]`` entry of a decode config); strict, like reempathy's own."""

    audio_bias: float = Field(0.0, ge=-1e4, le=1e4, description="added to audio-unit logits (negative: fewer audio tokens)")


class AudioBias:
    """Shifts the logits of the audio-unit tokens."""

    def __init__(self, options: Options, backbone: Backbone) -> None:
        self.bias = options.audio_bias
        self.audio = backbone.layout.audio_mask(backbone.model.device)

    @hookimpl
    def reempathy_logits(self, session: DecodeSession, logits: torch.Tensor) -> None:
        if self.bias:
            logits[self.audio] += self.bias


@hookimpl
def reempathy_register_processors(register: Register) -> None:
    register("__NAME__", AudioBias, Options, "adds a bias to audio-unit logits")
''',
    "observer": '''"""__NAME__: a reempathy observer that counts every token of an answer by kind and phase.

Where it decides: nothing — ``Counter.reempathy_token_appended`` sees every token whatever the
strategy answered, and ``Counter.reempathy_decode_end`` writes the counts into ``result.extra``.
"""

from __future__ import annotations

from collections import Counter as Tally

from reempathy.api import Backbone, DecodeResult, DecodeSession, PluginOptions, Register, hookimpl


class Options(PluginOptions):
    """``__NAME__`` has no options (any option given is an error that says so)."""


class Counter:
    """Counts tokens by kind (sampled, forced, stop, dropped) and sampled tokens by phase."""

    def __init__(self, options: Options, backbone: Backbone) -> None:
        self.kinds: Tally[str] = Tally()
        self.phases: Tally[str] = Tally()

    @hookimpl
    def reempathy_token_appended(self, session: DecodeSession, token_id: int, kind: str) -> None:
        self.kinds[kind] += 1
        if kind == "sampled":
            self.phases[session.phase or "?"] += 1

    @hookimpl
    def reempathy_decode_end(self, session: DecodeSession, result: DecodeResult) -> None:
        result.extra["__NAME__"] = {"kinds": dict(self.kinds), "phases": dict(self.phases)}


@hookimpl
def reempathy_register_processors(register: Register) -> None:
    register("__NAME__", Counter, Options, "counts the tokens of each answer by kind and phase")
''',
    "backbone": '''"""__NAME__: a reempathy backbone for a family of interleaved text+audio causal LMs.

It is ``hf-interleaved`` with this family's declaration as defaults, so a config needs only
``path``. Where it decides: ``Loader`` is the documented base ``InterleavedBackbone``; override
one of its steps (``prompt_builder``, ``vocab_layout``, …) where the family differs.
"""

from __future__ import annotations

from pydantic import Field

from reempathy.api import Backbone, InterleavedBackbone, InterleavedOptions, Register, StreamOptions, hookimpl


class Options(InterleavedOptions):
    """Options of ``__NAME__``: ``path`` to a local model directory; the rest defaults to this family's layout.

    ``InterleavedOptions`` is a ``PluginOptions``: strict, like every option model of reempathy.
    """

    audio_token: str = "<|audio_{}|>"
    audio_begin: str | None = "<|begin_of_audio|>"
    audio_end: str | None = "<|end_of_audio|>"
    stop_tokens: list[str] | None = Field(default_factory=lambda: ["<|user|>", "<|endoftext|>"])
    stream: StreamOptions = Field(default_factory=lambda: StreamOptions(text_tokens=4, audio_tokens=8))
    name: str = "__NAME__"


class Loader(InterleavedBackbone):
    """This family's loader (override a step here where the family differs from the declaration)."""


def load(options: Options) -> Backbone:
    """Build the backbone."""
    return Loader(options).load()


@hookimpl
def reempathy_register_backbones(register: Register) -> None:
    register("__NAME__", load, Options, "an interleaved text+audio causal LM of the __NAME__ family")
''',
}

TESTS = {
    "strategy": '''"""__NAME__ decodes through reempathy's own loop, with only this plugin and the built-ins."""

import __MODULE__


def test_notes_alternate_with_spoken_chunks(reempathy_plugins, reempathy_decode):
    reempathy_plugins(__MODULE__)
    run = reempathy_decode("__NAME__", {"spoken": 3, "hidden": 2}, max_new_tokens=20, ban_stop=True)
    notes = run.result.hidden
    assert notes and all(n.kind == "note" for n in notes)
    assert all(len(n.ids) == 2 for n in notes[:-1])
    # spoken, delimiter, note, delimiter, spoken …
    assert run.span_runs()[0][0] in ("spoken_text", "spoken_audio")
    assert ("note", 2) in run.span_runs()


def test_the_strategy_is_found_through_its_entry_point():
    from reempathy.api import discover

    assert "__NAME__" in discover().registry.names("strategy")
''',
    "processor": '''"""__NAME__ changes what is sampled, with only this plugin and the built-ins."""

import __MODULE__


def test_a_large_negative_bias_removes_audio(reempathy_plugins, reempathy_decode):
    reempathy_plugins(__MODULE__)
    run = reempathy_decode("sft", processors=[("__NAME__", {"audio_bias": -1e4})], max_new_tokens=16, ban_stop=True)
    assert run.result.audio_units == []
    assert "spoken_audio" not in [label for label, _ in run.span_runs()]


def test_a_large_positive_bias_speaks_only_audio(reempathy_plugins, reempathy_decode):
    reempathy_plugins(__MODULE__)
    run = reempathy_decode("sft", processors=[("__NAME__", {"audio_bias": 1e4})], max_new_tokens=8, ban_stop=True)
    run.assert_spans([("spoken_audio", 8)])


def test_the_processor_is_found_through_its_entry_point():
    from reempathy.api import discover

    assert "__NAME__" in discover().registry.names("processor")
''',
    "observer": '''"""__NAME__ sees every token of an answer, whatever the strategy answers."""

import __MODULE__


def test_counts_every_sampled_and_forced_token(reempathy_plugins, reempathy_decode):
    reempathy_plugins(__MODULE__)
    run = reempathy_decode(
        "reempathy", {"text_tokens": 2, "audio_tokens": 3, "max_reflection_tokens": 3},
        processors=["__NAME__"], max_new_tokens=24, ban_stop=True,
    )
    counts = run.result.extra["__NAME__"]["kinds"]
    assert counts["sampled"] == run.result.counts.generated
    assert counts.get("forced", 0) == run.result.counts.forced > 0


def test_the_observer_is_found_through_its_entry_point():
    from reempathy.api import discover

    assert "__NAME__" in discover().registry.names("processor")
''',
    "backbone": '''"""__NAME__ loads a saved model directory and decodes with every built-in strategy."""

import pytest

import __MODULE__


@pytest.fixture(scope="module")
def backbone(reempathy_interleaved_dir):
    from reempathy.testing import isolated_discovery

    registry = isolated_discovery(__MODULE__).registry
    return registry.create("backbone", "__NAME__", {"path": reempathy_interleaved_dir["path"]})


@pytest.mark.parametrize("strategy", ["sft", "cotbs", "reempathy"])
def test_decodes_with_each_strategy(backbone, reempathy_plugins, reempathy_decode, strategy):
    reempathy_plugins(__MODULE__)
    run = reempathy_decode(strategy, backbone=backbone, max_new_tokens=12, ban_stop=True)
    assert run.result.backbone == "__NAME__"
    assert run.result.counts.generated == 12


def test_the_backbone_is_found_through_its_entry_point():
    from reempathy.api import discover

    assert "__NAME__" in discover().registry.names("backbone")
''',
}


def render(name: str, kind: str) -> dict[str, str]:
    """The package's files, relative path → text."""
    if kind not in KINDS:
        raise InputError(f"--kind {kind!r}: choose one of {', '.join(KINDS)}")
    n = names_for(name)

    def fill(text: str) -> str:
        return text.replace("__USAGE__", USAGE[kind]).replace("__NAME__", n.name).replace(
            "__MODULE__", n.module
        ).replace("__KIND__", kind)

    return {
        "pyproject.toml": fill(PYPROJECT),
        "README.md": fill(README),
        f"src/{n.module}/__init__.py": fill(PLUGINS[kind]),
        f"tests/test_{n.module}.py": fill(TESTS[kind]),
    }


def write_package(name: str, kind: str, parent: str | Path = ".") -> Path:
    """Write the package into ``parent/name``; refuses an existing non-empty folder or a file there."""
    files = render(name, kind)
    parent = check_name(parent, "--dir")  # '' would be the current folder without saying so
    target = parent / name
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"{str(target)!r} already exists; choose another name or --dir")
    if not parent.is_dir():
        raise InputError(f"--dir {str(parent)!r} is not a directory")
    # Written beside the target, synced and renamed into place (the shared write discipline):
    # an interrupted `plugin new` leaves no half package.
    with replacing_dir(target, "new") as staging:
        for rel, text in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return target


__all__ = ["KINDS", "Names", "names_for", "render", "write_package"]
