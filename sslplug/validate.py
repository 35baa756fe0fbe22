"""Validators for the settings classes of plugins (``attrs.field(validator=...)``).

Each raises ``sslplug.ConfigError`` naming the setting and the value it got, and saying what
would be valid, so that every plugin refuses bad settings in the same words.
"""

from __future__ import annotations

from typing import Any

import attrs

from sslplug.errors import ConfigError


def positive(instance: object, attribute: attrs.Attribute, value: Any) -> None:
    """The value must be greater than 0."""
    if not value > 0:
        raise ConfigError(f"{attribute.name} must be greater than 0, got {value!r}")


def non_negative(instance: object, attribute: attrs.Attribute, value: Any) -> None:
    """The value must be 0 or more."""
    if not value >= 0:
        raise ConfigError(f"{attribute.name} must be 0 or more, got {value!r}")


def unit_interval(instance: object, attribute: attrs.Attribute, value: Any) -> None:
    """The value must lie between 0 and 1, both included."""
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{attribute.name} must be between 0 and 1, got {value!r}")


def scale_range(instance: object, attribute: attrs.Attribute, value: Any) -> None:
    """A crop scale range ``(low, high)`` with ``0 < low <= high <= 1``."""
    low, high = value
    if not 0.0 < low <= high <= 1.0:
        raise ConfigError(
            f"{attribute.name} must be a range (low, high) with 0 < low <= high <= 1, "
            f"got {tuple(value)!r}"
        )
