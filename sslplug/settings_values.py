"""Reading settings: TOML files, ``--set section.key=value``, and each value checked against the
type of its field in an attrs settings class.

``sslplug.config`` composes these into ``load_config``; they know nothing of which sections a
run has. A bad value raises ``ConfigError`` naming the key and what is valid; ``Problems``
gathers the errors of settings read together, so that one message reports every bad key and
value rather than the first (a user fixes them all in one go), in the form ``one_message``
gives every error that gathers several. ``did_you_mean`` is the one way an unknown name (a
section, a key, a plugin) is answered with the closest valid one.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import sys
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from sslplug.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "Problems",
    "build_section",
    "coerce",
    "did_you_mean",
    "fields_of",
    "one_message",
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
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
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
    if origin in (typing.Union, types.UnionType):  # the first type the value fits
        for option in typing.get_args(tp):
            try:
                return coerce(value, option, key)
            except ConfigError:
                continue
        raise bad
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


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """`` Did you mean 'byol'?`` naming the valid name closest to ``name`` (``difflib``'s
    similarity of at least 0.6), or ``""`` when none is close: the hint of every message about
    an unknown name."""
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown(kind: str, name: str, valid: Iterable[str]) -> ConfigError:
    """The error for an unknown ``name``: it lists what is ``valid`` and suggests the closest."""
    valid = sorted(valid)
    hint = did_you_mean(name, valid)
    return ConfigError(f"unknown {kind} {name!r}.{hint} Valid: {', '.join(valid) or '(none)'}")


@attrs.define
class Problems:
    """The ``ConfigError`` messages of settings read together, each a line of one error.

    Reading goes on past a bad section, key or value (``noting``), so that ``raise_any``
    reports them all at once, in the order met.
    """

    messages: list[str] = attrs.Factory(list)

    @contextlib.contextmanager
    def noting(self) -> Iterator[None]:
        """Run the block; a ``ConfigError`` it raises is noted (each of its messages, when it
        holds several), not raised."""
        try:
            yield
        except _SeveralErrors as exc:
            self.messages.extend(exc.messages)
        except ConfigError as exc:
            self.messages.append(str(exc))

    def raise_any(self) -> None:
        """Raise one ``ConfigError`` holding every message noted (one line each), if any."""
        if len(self.messages) == 1:
            raise ConfigError(self.messages[0])
        if self.messages:
            raise _SeveralErrors(self.messages)


class _SeveralErrors(ConfigError):
    """Several settings errors in one: a line that counts them, then one line each."""

    def __init__(self, messages: list[str]) -> None:
        self.messages = list(messages)
        super().__init__(one_message(self.messages, "settings"))


def one_message(messages: list[str], what: str) -> str:
    """The text of one error reporting every message: a single one as it is; several as a line
    counting them (``2 settings are not valid:``), then one indented line each. The one form of
    every error that gathers the mistakes a user makes together (settings, plugin names)."""
    if len(messages) == 1:
        return messages[0]
    lines = "\n".join(f"  {message}" for message in messages)
    return f"{len(messages)} {what} are not valid:\n{lines}"


def build_section(
    cls: type, values: Mapping[str, Any], section: str, names: Mapping[str, str] | None = None
) -> Any:
    """An instance of the settings class ``cls`` from ``values``, each checked against its field.

    An error names a value by ``section.key``, or by ``names[key]`` where the value was given
    under another name (a setting's deprecated name). Every unknown key and bad value of the
    section is reported, one line each, in one ``ConfigError``.
    """
    fields = fields_of(cls)
    names = names or {}
    problems = Problems()
    kwargs = {}
    for key, value in values.items():
        with problems.noting():
            if key not in fields:
                raise unknown(f"key in [{section}]", key, fields)
            kwargs[key] = coerce(value, fields[key].type, names.get(key, f"{section}.{key}"))
    for key, value in kwargs.items():
        with problems.noting():
            _check_field(cls, fields[key], value, section)
            # after the field's own validator, which can say more (the range of a seed)
            _fits_64_bits(value, names.get(key, f"{section}.{key}"))
    problems.raise_any()
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"[{section}] {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{section}] invalid settings: {exc}") from None


def _check_field(cls: type, field: attrs.Attribute, value: Any, section: str) -> None:
    """Run the validator of ``field`` on ``value`` alone, so that each bad value of a section is
    reported, not only the first the class's ``__init__`` meets. The validators take the value
    on its own (``sslplug.validate``); the instance they are given holds the defaults."""
    if field.validator is None:
        return
    try:
        field.validator(cls(), field, value)
    except ConfigError as exc:
        raise ConfigError(f"[{section}] {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{section}] invalid settings: {exc}") from None


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
