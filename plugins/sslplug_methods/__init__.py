"""sslplug's built-in methods, one module each, registered through the entry-point group
``sslplug`` exactly as a third party's plugins are (``byol = "sslplug_methods.byol"``).

They live in one package so that no installed top-level module can take their place: a third
party's ``sslplug_dino`` is another module than ``sslplug_methods.dino``. Each module imports
nothing from the core but ``sslplug``'s public API, which is the proof that the API is enough to
write a method.
"""

from __future__ import annotations

import importlib
import sys
import warnings

METHODS = (
    "byol", "simclr", "barlow_twins", "rotnet", "jigsaw", "cpc", "moco_v2", "moco_v3", "swav",
    "dino", "vicreg", "nnclr", "simsiam", "mae", "ijepa", "distill", "ibot", "dinov2",
)


def alias_old_module(old: str) -> None:
    """Make the module named ``old`` (``sslplug_byol``, the name of sslplug 0.1) this package's
    module of the same method, with a ``DeprecationWarning`` saying what to import instead."""
    method = old.removeprefix("sslplug_")
    new = f"{__name__}.{method}"
    warnings.warn(
        f"the module {old!r} is now {new!r}: import {new} (or `from sslplug_methods import "
        f"{method}`); the old name keeps working until sslplug 0.3",
        DeprecationWarning,
        stacklevel=3,
    )
    sys.modules[old] = importlib.import_module(new)
