"""Checks the plugin registry makes of what a plugin declares: its registered name when its
plain name is taken, its settings class, the types its hooks return."""

from __future__ import annotations

import re
from typing import Any

import attrs

from sslplug.errors import PluginError

__all__ = ["check_settings", "describe_type", "qualified_name"]


def describe_type(expected: type | tuple[type, ...]) -> str:
    """How the error names the type a component hook must return."""
    if isinstance(expected, tuple):
        return "sslplug.Augmentations (or a list or tuple of augmentation modules)"
    return f"a {expected.__module__}.{expected.__qualname__}"


def qualified_name(distribution: str | None, name: str) -> str:
    """``DISTRIBUTION:NAME``: the name under which a plugin is registered when its plain name is
    taken. The distribution's name is normalised as pip writes it (``Sslplug_Dino`` ->
    ``sslplug-dino``), so it holds no dot and ``--set DISTRIBUTION:NAME.key=value`` parses."""
    return f"{re.sub(r'[-_.]+', '-', distribution or 'unknown').lower()}:{name}"


def check_settings(settings: Any) -> type | None:
    """A plugin's settings class must be an attrs class that builds with its defaults."""
    if settings is None:
        return None
    if not attrs.has(settings):
        raise PluginError(f"sslplug_settings must return an attrs class or None, got {settings!r}")
    try:
        attrs.resolve_types(settings)
        settings()
    except Exception as exc:
        raise PluginError(
            f"its settings class {settings.__qualname__} cannot be built from its defaults "
            f"({exc}); give every field a default"
        ) from None
    return settings
