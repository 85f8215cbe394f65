"""Exceptions a user can cause. Each carries a one-line message that names the input and says what to do."""

from __future__ import annotations


class ReempathyError(Exception):
    """Base class: the CLI prints the message on one line and exits with ``exit_code`` (2: the user's input)."""

    exit_code = 2


class ConfigError(ReempathyError):
    """A config file, key or value is wrong."""


class InputError(ReempathyError):
    """A prompt, unit file, audio file or dataset record is wrong."""


class PluginError(ReempathyError):
    """A plugin failed to load or asked for something that does not exist."""


class CheckpointError(ReempathyError):
    """A model or checkpoint directory is missing, incomplete or inconsistent."""


class NotAvailableError(ReempathyError):
    """A feature that is documented as not implemented yet was asked for."""


class UsageError(ReempathyError):
    """A command line the parser cannot read (an unknown flag, a missing argument, a value of the wrong type)."""


class PluginFailure(ReempathyError):
    """A plugin's own code raised while it was called (a hook or a factory).

    Not the user's fault: the CLI prints one line naming the plugin and the hook and exits
    with status 1 (``--debug`` shows the traceback). ``plugin`` and ``hook`` name where it happened.
    """

    exit_code = 1

    def __init__(self, plugin: str, hook: str, error: BaseException) -> None:
        self.plugin = plugin
        self.hook = hook
        self.error = error
        super().__init__(f"plugin {plugin!r} failed in {hook}: {type(error).__name__}: {error}")


class DecodeError(ReempathyError):
    """Decoding cannot go on (every token banned, NaN logits): names the step and what to change."""
