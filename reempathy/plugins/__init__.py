"""The strategies, processors and backbones that ship with reempathy; they use the same hooks a third-party plugin uses.

The registry loads them by name (:data:`reempathy.registry.BUILTIN_PLUGINS`), beside the built-in
evaluators (:mod:`reempathy.evaluation.plugin`) and commands (:mod:`reempathy.commands`).
"""
