"""Errors meant for people: each says what was wrong, with the value, and what would be valid.

The command line prints these without a traceback; anything else that escapes is a bug.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ComponentMismatchError",
    "ConfigError",
    "DataError",
    "OutputError",
    "PluginError",
    "SslplugError",
]


class SslplugError(Exception):
    """Base class of every error sslplug raises on purpose."""


class ConfigError(SslplugError, ValueError):
    """A settings key or value is unknown or invalid."""


class PluginError(SslplugError):
    """A plugin is unknown, failed to load, or does not provide a component asked of it."""


class ComponentMismatchError(PluginError):
    """The components chosen for a run cannot work together."""


class DataError(SslplugError):
    """A data set is missing, empty or unreadable."""


class CheckpointError(SslplugError):
    """A file is not a usable sslplug checkpoint."""


class OutputError(SslplugError):
    """A file cannot be written where it was asked (a read-only place, a folder, a path under a
    file, a full disk), or writing it would replace a checkpoint or a file that exists."""
