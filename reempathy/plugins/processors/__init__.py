"""Built-in logits processors: sampling controls and attention reweighting."""

from __future__ import annotations

from reempathy.hooks import Register
from reempathy.hooks import hookimpl


@hookimpl
def reempathy_register_processors(register: Register) -> None:
    from reempathy.plugins.processors.sampling import SAMPLING_PROCESSORS

    from reempathy.plugins.processors.attention_reweight import AttentionReweight, AttentionReweightOptions

    register(
        "attention-reweight",
        AttentionReweight,
        AttentionReweightOptions,
        "strengthen attention between spoken chunks and the latest reflection or thought",
    )
    for name, (cls, options, description) in SAMPLING_PROCESSORS.items():
        register(name, cls, options, description)
