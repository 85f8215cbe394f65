"""Built-in strategies: ``sft``, ``cotbs``, ``reempathy``."""

from __future__ import annotations

from reempathy.backbones.base import REFLECTION_CLOSE, REFLECTION_OPEN, THOUGHT_CLOSE, THOUGHT_OPEN
from reempathy.hooks import Register, hookimpl


@hookimpl
def reempathy_register_strategies(register: Register) -> None:
    from reempathy.plugins.strategies.cotbs import CotbsOptions, CotbsStrategy
    from reempathy.plugins.strategies.reempathy import ReEmpathyOptions, ReEmpathyStrategy
    from reempathy.plugins.strategies.sft import SftOptions, SftStrategy

    register("sft", SftStrategy, SftOptions, "plain decoding of the spoken stream")
    register("cotbs", CotbsStrategy, CotbsOptions, "chain of thought (hidden) before speaking",
             special_tokens=(THOUGHT_OPEN, THOUGHT_CLOSE))
    register("reempathy", ReEmpathyStrategy, ReEmpathyOptions, "spoken chunks alternating with hidden reflections",
             special_tokens=(REFLECTION_OPEN, REFLECTION_CLOSE))
