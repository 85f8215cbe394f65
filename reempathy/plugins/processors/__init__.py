"""Built-in logits processors: sampling controls and attention reweighting."""

from __future__ import annotations

from reempathy.decoding.hookspecs import Register
from reempathy.hooks import hookimpl


@hookimpl
def reempathy_register_processors(register: Register) -> None:
    from reempathy.plugins.processors.sampling import SAMPLING_PROCESSORS

    for name, (cls, options, description) in SAMPLING_PROCESSORS.items():
        register(name, cls, options, description)
