"""``sslplug list``: the installed plugins, the components each provides, the code that runs
under each name, and the core's lifecycle plugins."""

from __future__ import annotations

import argparse

from sslplug.config import COMPONENTS
from sslplug.plugins import PluginRegistry

__all__ = ["HELP", "add_arguments", "run"]

HELP = "show installed plugins and the components each provides"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``list`` takes no arguments."""


def run(args: argparse.Namespace, registry: PluginRegistry) -> int:
    header = ("plugin", "distribution", "version", *COMPONENTS, "settings", "code")
    rows: list[tuple[str, ...]] = [header]
    for info in registry.info():
        marks = tuple("x" if c in info.components else "-" for c in COMPONENTS)
        rows.append(
            (
                info.name,
                info.distribution or "?",
                info.version or "?",
                *marks,
                "yes" if info.has_settings else "-",
                info.module,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    qualified = [info.name for info in registry.info() if ":" in info.name]
    if qualified:
        print(
            f"\nregistered under DISTRIBUTION:NAME because another plugin (a built-in first) holds "
            f"the plain name: {', '.join(qualified)}"
        )
    for failure in registry.failures:
        print(f"\nnot loaded: {failure}")
    print(
        f"\ncore lifecycle plugins (switch one off with --disable NAME): "
        f"{', '.join(registry.internal_names())}"
    )
    return 0
