"""The ``glm-4-voice`` backbone: the published glm-4-voice-9b checkpoint on transformers' native GLM, no remote code.

- ``load_glm4voice(Glm4VoiceOptions(path=...))`` → ``Backbone`` (published or converted directory)
- ``convert_glm4voice(src, dst)`` → a native checkpoint that plain ``from_pretrained`` loads
"""

from reempathy.backbones.glm4voice.convert import convert_glm4voice
from reempathy.backbones.glm4voice.loader import Glm4VoiceOptions, load_glm4voice
from reempathy.backbones.glm4voice.prompt import Glm4VoicePrompt

__all__ = ["Glm4VoiceOptions", "Glm4VoicePrompt", "convert_glm4voice", "load_glm4voice"]
