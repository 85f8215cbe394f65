"""The plugins that ship with reempathy; they use the same hooks a third-party plugin uses."""

from reempathy.plugins import backbones, evaluators, processors, strategies

BUILTIN_PLUGINS = (strategies, processors, backbones, evaluators)
