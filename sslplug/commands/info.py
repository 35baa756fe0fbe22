"""``sslplug info PLUGIN``: one plugin's distribution, components, capabilities, and settings
with their defaults."""

from __future__ import annotations

import argparse
import inspect

import attrs

from sslplug.errors import ConfigError
from sslplug.plugins import PluginRegistry

__all__ = ["HELP", "add_arguments", "run"]

HELP = "one plugin: its distribution, components, and settings with their defaults"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="PLUGIN")


def run(args: argparse.Namespace, registry: PluginRegistry) -> int:
    entry = next((i for i in registry.info() if i.name == args.name), None)
    if entry is None:
        raise ConfigError(
            f"no plugin named {args.name!r}; installed: {', '.join(registry.names()) or '(none)'}"
        )
    module = registry.pm.get_plugin(args.name)
    print(f"{entry.name}: from {entry.distribution or '?'} {entry.version or '?'}")
    print(f"code: {entry.module}")
    doc = inspect.getdoc(module)
    if doc:
        print("\n" + doc.split("\n\n")[0])
    print(f"\ncomponents: {', '.join(entry.components) or '(none)'}")
    capabilities = registry.capabilities_of(args.name)
    if capabilities:
        print("capabilities it registers:")
        for capability in capabilities:
            print(f"  {capability.name}: {capability.description}")
    _print_settings(args.name, registry)
    return 0


def _print_settings(name: str, registry: PluginRegistry) -> None:
    """The plugin's settings class, each field with its default and type (or that it has
    none)."""
    settings = registry.settings_classes().get(name)
    if settings is None:
        print("settings: none")
        return
    print(f"settings ([{name}] in a TOML file, or --set {name}.KEY=VALUE):")
    settings_doc = inspect.getdoc(settings)
    if settings_doc:
        print("  " + settings_doc.split("\n\n")[0].replace("\n", "\n  "))
    for field in attrs.fields(settings):
        # attrs' stubs declare Factory a function (it pretends to return the value it makes)
        is_factory = isinstance(field.default, attrs.Factory)  # type: ignore[arg-type]
        default = field.default.factory() if is_factory else field.default
        kind = getattr(field.type, "__name__", None) or str(field.type)
        print(f"  {field.name} = {default!r}  ({kind})")
