"""The public API: what a plugin and a script may use, under a compatibility promise.

Import from here (``from reempathy.api import hookimpl, Switch, DecodeSession``), not from the
modules these names live in: those may move; these names stay.

**Compatibility promise.** :data:`API_VERSION` is ``MAJOR.MINOR``. Within one major version,
every name in ``reempathy.api.__all__`` keeps working as documented: a function's parameters
are not removed, renamed or reordered (new ones are keyword-only with defaults); a class keeps
its documented attributes and methods; a hook keeps its name, arguments and calling rules; a
directive keeps its fields. A minor version only adds. A name to be removed is first kept for
at least one minor version with a ``DeprecationWarning``. Anything not listed here (a module's
internals, the built-in strategy and processor classes, private ``_`` names, the attributes a
session keeps for the loop) may change in any release — subclassing a built-in strategy is not
covered; wrap or compose instead (docs/plugins.md).
"""

from __future__ import annotations

from reempathy.backbones.base import (
    DELIMITER_TOKENS,
    REFLECTION_CLOSE,
    REFLECTION_OPEN,
    THOUGHT_CLOSE,
    THOUGHT_OPEN,
    Backbone,
    SpeechDecoder,
    SpeechTokenizer,
    StreamPolicy,
    Turn,
    VocabLayout,
)
from reempathy.backbones.contract import check_backbone
from reempathy.backbones.interleaved import (
    AudioIds,
    ChatTemplatePrompt,
    InterleavedBackbone,
    InterleavedOptions,
    StreamOptions,
)
from reempathy.config import DecodeConfig, load_config
from reempathy.decoding.attention import KeyBias
from reempathy.decoding.batch import RowRequest, decode_batch, row_seed
from reempathy.decoding.directives import CONTINUE, Continue, Directive, Stop, Switch
from reempathy.hooks import Register
from reempathy.decoding.loop import LoopOptions, decode
from reempathy.registry import (
    DiscoveryResult,
    PluginInfo,
    Registration,
    Registry,
    default_discovery,
    discover,
)
from reempathy.decoding.result import Counts, DecodeResult, HiddenSegment, SpokenChunk, Timings
from reempathy.decoding.session import DecodeSession
from reempathy.decoding.spans import CONTROL, PROMPT, SPEAK, SPOKEN_AUDIO, SPOKEN_TEXT, Segment, Span
from reempathy.errors import (
    CheckpointError,
    ConfigError,
    DecodeError,
    InputError,
    NotAvailableError,
    PluginError,
    PluginFailure,
    ReempathyError,
)
from reempathy.evaluation.base import (
    EMPATHY_SCORES,
    Comparison,
    EvalItem,
    Evaluation,
    Evaluator,
    PairItem,
    PairwiseEvaluator,
)
from reempathy.hooks import hookimpl
from reempathy.options import PluginOptions
from reempathy.runner import build_plugins, build_prompt_ids, load_backbone, run_decode

API_VERSION = "1.1"
"""The version of this API (``MAJOR.MINOR``); see the compatibility promise above."""

__all__ = [
    "API_VERSION",
    # writing plugins
    "hookimpl",
    "Register",
    "PluginOptions",
    "DecodeSession",
    "Segment",
    "Span",
    "PROMPT",
    "SPOKEN_TEXT",
    "SPOKEN_AUDIO",
    "CONTROL",
    "SPEAK",
    "Continue",
    "Switch",
    "Stop",
    "CONTINUE",
    "Directive",
    "KeyBias",
    # backbones
    "Backbone",
    "VocabLayout",
    "StreamPolicy",
    "Turn",
    "SpeechTokenizer",
    "SpeechDecoder",
    "REFLECTION_OPEN",
    "REFLECTION_CLOSE",
    "THOUGHT_OPEN",
    "THOUGHT_CLOSE",
    "DELIMITER_TOKENS",
    "check_backbone",
    "InterleavedBackbone",
    "InterleavedOptions",
    "StreamOptions",
    "AudioIds",
    "ChatTemplatePrompt",
    # results
    "DecodeResult",
    "SpokenChunk",
    "HiddenSegment",
    "Counts",
    "Timings",
    # evaluators
    "Evaluator",
    "PairwiseEvaluator",
    "EvalItem",
    "Evaluation",
    "PairItem",
    "Comparison",
    "EMPATHY_SCORES",
    # running decodes from a script
    "DecodeConfig",
    "load_config",
    "load_backbone",
    "build_plugins",
    "build_prompt_ids",
    "run_decode",
    "decode",
    "LoopOptions",
    "RowRequest",
    "decode_batch",
    "row_seed",
    # discovery
    "discover",
    "default_discovery",
    "DiscoveryResult",
    "Registry",
    "Registration",
    "PluginInfo",
    # errors
    "ReempathyError",
    "ConfigError",
    "InputError",
    "PluginError",
    "CheckpointError",
    "NotAvailableError",
    "PluginFailure",
    "DecodeError",
]
