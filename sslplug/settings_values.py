"""Reading settings: TOML files, ``--set section.key=value``, and each value checked against the
type of its field in an attrs settings class.

``sslplug.config`` composes these into ``load_config``; they know nothing of which sections a
run has. A bad value raises ``ConfigError`` naming the key and what is valid.
"""

from __future__ import annotations

import difflib
import math
import sys
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from sslplug.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "build_section",
    "coerce",
    "fields_of",
    "parse_assignment",
    "read_toml",
    "unknown",
]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the field type ``tp``; return it converted, or raise ConfigError
    naming the setting as ``key``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise bad
        try:
            return tuple(coerce(v, a, key) for v, a in zip(value, args))
        except ConfigError as exc:
            raise ConfigError(f"{exc} in {value!r}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        # NaN passes every "> 0" check and poisons what it touches; an int past 1.8e308 is inf
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    return value


def fields_of(cls: type) -> dict[str, attrs.Attribute]:
    """The fields of the settings class ``cls``, by name, with their types resolved."""
    attrs.resolve_types(cls)
    return {f.name: f for f in attrs.fields(cls)}


def unknown(kind: str, name: str, valid: Iterable[str]) -> ConfigError:
    """The error for an unknown ``name``: it lists what is ``valid`` and suggests the closest."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {kind} {name!r}.{hint} Valid: {', '.join(valid) or '(none)'}")


def build_section(
    cls: type, values: Mapping[str, Any], section: str, names: Mapping[str, str] | None = None
) -> Any:
    """An instance of the settings class ``cls`` from ``values``, each checked against its field.

    An error names a value by ``section.key``, or by ``names[key]`` where the value was given
    under another name (a setting's deprecated name).
    """
    fields = fields_of(cls)
    names = names or {}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise unknown(f"key in [{section}]", key, fields)
        kwargs[key] = coerce(value, fields[key].type, names.get(key, f"{section}.{key}"))
    try:
        settings = cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"[{section}] {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{section}] invalid settings: {exc}") from None
    # after the field's own validator, which can say more (the range of a seed)
    for key, value in kwargs.items():
        _fits_64_bits(value, names.get(key, f"{section}.{key}"))
    return settings


def _fits_64_bits(value: Any, key: str) -> None:
    """Refuse a whole number torch cannot take: it would fail deep inside, far from the cause."""
    if isinstance(value, tuple):
        for item in value:
            _fits_64_bits(item, key)
    elif isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ConfigError(f"{key} must fit in 64 bits (at most {2**63 - 1}), got {value!r}")


def parse_assignment(text: str) -> tuple[str, str, Any]:
    """Split ``section.key=value`` into its parts; the value is read as a TOML value when it
    is one (``0.5``, ``true``, ``[0.1, 0.2]``, ``"text"``) and kept as a string otherwise."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    if dotted.count(".") != 1:
        raise ConfigError(
            f"--set expects section.key=value with one dot in the name, got {dotted!r}"
        )
    section, key = (part.strip() for part in dotted.split("."))
    raw = raw.strip()
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, (value, raw)


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The tables of the TOML file ``path``; ``ConfigError`` naming it as ``what`` when it is
    missing or not TOML. The one place that reads TOML files (``tomli`` before Python 3.11)."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {exc}") from None
