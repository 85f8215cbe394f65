"""What a checkpoint's manifest means for a decode config: the strategy and chunk layout it was trained for."""

from __future__ import annotations

from typing import Any

from reempathy.errors import ConfigError
from reempathy.training.checkpoint import Manifest

LAYOUT_KEYS = ("text_tokens", "audio_tokens")


def checkpoint_config_overrides(
    manifest: Manifest,
    requested_strategy: str | None = None,
    requested_options: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The strategy name and options to decode a checkpoint with.

    With no request the manifest's strategy and options are used. A requested strategy must be
    the manifest's; requested options are laid over the manifest's, except that the chunk layout
    (``text_tokens``, ``audio_tokens``) must equal the one trained. Anything else is a
    ConfigError that says what the checkpoint was trained for.
    """
    where = f"checkpoint {manifest.directory!r}" if manifest.directory else "the checkpoint"
    trained = manifest.strategy.name
    if requested_strategy is not None and requested_strategy != trained:
        raise ConfigError(
            f"{where} was trained for strategy {trained!r}, not {requested_strategy!r}; "
            f"decode it with strategy {trained!r} (or leave the strategy unset), or use a checkpoint trained for "
            f"{requested_strategy!r}"
        )
    requested = dict(requested_options or {})
    layout = manifest.chunk_layout
    if layout is not None:
        trained_layout = {"text_tokens": layout.text_tokens, "audio_tokens": layout.audio_tokens}
        for key in LAYOUT_KEYS:
            if key in requested and requested[key] != trained_layout[key]:
                raise ConfigError(
                    f"{where} was trained with {trained!r} chunks of {layout.text_tokens}+{layout.audio_tokens} "
                    f"text+audio tokens, but the config asks for {key} = {requested[key]!r}; "
                    f"drop strategy.{key} or set it to {trained_layout[key]}"
                )
    options = dict(manifest.strategy.options)
    options.update(requested)
    return trained, options


__all__ = ["checkpoint_config_overrides"]
