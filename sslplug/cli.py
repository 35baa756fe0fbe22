"""The ``sslplug`` command line's old home: the commands are in :mod:`sslplug.commands`, one
module each; ``main`` stays importable from here for code written against it."""

from __future__ import annotations

from sslplug.commands import main

__all__ = ["main"]
