"""Hook specifications, all in one place: the discovery hooks here, the run hooks from the decoder core.

Discovery hooks are called once per process on the global plugin manager (:mod:`reempathy.registry`);
each receives a ``register`` callback and pushes what the plugin provides into the registry (the
pattern of ``llm`` and datasette). Run hooks (:mod:`reempathy.decoding.hookspecs`, re-exported
here) are called by the token loop on a per-session plugin manager that holds only the strategy,
processors and observers chosen for that session. Every hook is documented with its signature in
docs/plugins.md.

``register(name, factory, config_model, description="", **fields)``: ``fields`` are the
registration fields of a kind (:data:`reempathy.registry.KIND_FIELDS`): a strategy's
``special_tokens``, an evaluator's ``trainer``.
"""

from __future__ import annotations

from reempathy.decoding.hookspecs import (  # noqa: F401 - every hook in one place
    RUN_HOOKS,
    reempathy_attention_plan,
    reempathy_decode_end,
    reempathy_decode_start,
    reempathy_logits,
    reempathy_phase_change,
    reempathy_token,
    reempathy_token_appended,
)
from reempathy.hooks import Register, hookspec

# --- discovery hooks (called once) -------------------------------------------------------


@hookspec
def reempathy_register_strategies(register: Register) -> None:
    """Register strategies: ``register(name, factory, config_model, special_tokens=(...))``; ``factory(options, backbone)`` returns the strategy plugin object."""


@hookspec
def reempathy_register_processors(register: Register) -> None:
    """Register logits processors and observers: ``register(name, factory, config_model)``; ``factory(options, backbone)`` returns the plugin object."""


@hookspec
def reempathy_register_backbones(register: Register) -> None:
    """Register backbones: ``register(name, factory, config_model)``; ``factory(options)`` returns a loaded ``Backbone``."""


@hookspec
def reempathy_register_evaluators(register: Register) -> None:
    """Register evaluators: ``register(name, factory, config_model, trainer=None)``; ``factory(options)`` returns an ``Evaluator`` (``reempathy.api``)."""


@hookspec
def reempathy_register_commands(register: Register) -> None:
    """Register CLI commands: ``register(name, add_parser, None, description)``; ``add_parser(subparsers)`` adds the subcommand."""


DISCOVERY_HOOKS = (
    "reempathy_register_strategies",
    "reempathy_register_processors",
    "reempathy_register_backbones",
    "reempathy_register_evaluators",
    "reempathy_register_commands",
)

__all__ = ["hookspec", "Register", "RUN_HOOKS", "DISCOVERY_HOOKS"]
