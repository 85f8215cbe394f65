"""The ``qwen2.5-omni`` backbone: Qwen2.5-Omni's thinker decodes the answer's text, its talker speaks it.

- ``load_qwen25omni(Qwen25OmniOptions(path=...))`` → ``Backbone`` (text-only spoken stream; ``talker`` set
  unless ``talker = false``)
- :mod:`.prompt`: the checkpoint's chat template; WAV → Whisper features for the audio encoder
- :mod:`.talker`: the talker fed with the spoken positions' thinker states, then token2wav

See docs/backbones-qwen2.5-omni.md.
"""

from reempathy.backbones.qwen25omni.loader import (
    QWEN25OMNI_STREAM,
    Qwen25OmniOptions,
    load_qwen25omni,
)
from reempathy.backbones.qwen25omni.prompt import (
    DEFAULT_SYSTEM_PROMPT,
    Qwen25OmniPrompt,
)
from reempathy.backbones.qwen25omni.talker import (
    Qwen25OmniTalker,
    TalkerSettings,
    TalkerTurn,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "QWEN25OMNI_STREAM",
    "Qwen25OmniOptions",
    "Qwen25OmniPrompt",
    "Qwen25OmniTalker",
    "TalkerSettings",
    "TalkerTurn",
    "load_qwen25omni",
]
