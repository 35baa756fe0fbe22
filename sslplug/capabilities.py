"""Capabilities: the names components declare in ``requires`` and ``provides``, who registered
each, and the check that a mix of components fits together before the first step."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from sslplug.errors import ComponentMismatchError

if TYPE_CHECKING:
    from sslplug.plugins import Components

__all__ = ["Capability", "check_compatible"]


@attrs.frozen
class Capability:
    """A capability name, what it promises, and the plugin that registered it."""

    name: str
    description: str
    plugin: str


def _register_on_behalf(name: str, component: str, plugin: str) -> Capability:
    """A capability a component declares that nobody registered: capability names were free
    strings in the first API, so such a plugin keeps working, with a warning saying what to
    change."""
    warnings.warn(
        f"the {component} of plugin {plugin!r} declares the capability {name!r}, which no plugin "
        f"registers; sslplug registers it on the plugin's behalf for now. Register it in the "
        f"plugin with the sslplug_capabilities hook (register({name!r}, 'what it promises')): "
        f"from sslplug 0.3 an unregistered capability is an error",
        DeprecationWarning,
        stacklevel=3,
    )
    return Capability(name, f"declared by plugin {plugin!r} without being registered", plugin)


def check_compatible(
    parts: Components, capabilities: dict[str, Capability], backbone: str = "the backbone"
) -> None:
    """Check every component's ``requires`` against what the components before it provide,
    and that every name is a registered capability: a name nobody registered is registered on
    behalf of the plugin that declares it, with a ``DeprecationWarning`` (the first API's free
    capability strings).

    Order of the data flow: the backbone (``patch_tokens`` for a ViT, under the name
    ``backbone``), augmentation, views, encoder, target update, loss. A component may require
    what any component before it provides.
    """
    sources = parts.sources
    chain: Sequence[tuple[str, Any]] = [
        ("augmentation", parts.augmentations),
        ("views", parts.views),
        ("encoder", parts.encoder),
        ("target_update", parts.target_update),
        ("loss", parts.loss),
    ]
    available: dict[str, str] = {
        cap: backbone for cap in getattr(getattr(parts.encoder, "backbone", None), "provides", ())
    }
    for component, obj in chain:
        if obj is None:
            continue
        requires = set(getattr(obj, "requires", ()))
        provides = set(getattr(obj, "provides", ()))
        for name in sorted((requires | provides) - set(capabilities)):
            capabilities[name] = _register_on_behalf(name, component, sources[component])
        missing = sorted(requires - set(available))
        if missing:
            have = ", ".join(f"{cap} (from {available[cap]})" for cap in sorted(available))
            raise ComponentMismatchError(
                f"the {component} from plugin {sources[component]!r} requires "
                f"{', '.join(missing)}, which no component before it provides "
                f"({backbone}, augmentation from {sources['augmentation']!r}, views from "
                f"{sources['views']!r}, encoder from {sources['encoder']!r}, target update from "
                f"{sources['target_update']!r}). Available: {have or '(nothing)'}"
            )
        for cap in provides:
            available[cap] = f"{component} of {sources[component]!r}"
