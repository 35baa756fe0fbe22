"""Deprecated: sslplug 0.1's name for ``sslplug_methods.mae``, which it now imports."""

from sslplug_methods import alias_old_module

alias_old_module(__name__)
