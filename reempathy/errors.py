"""Exceptions a user can cause. Each carries a one-line message that names the input and says what to do."""

from __future__ import annotations


class ReempathyError(Exception):
    """Base class: the CLI prints the message on one line and exits with status 2."""


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
