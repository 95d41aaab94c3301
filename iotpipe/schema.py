"""Typed settings sections without pydantic: frozen records checked when they are built.

The edge agent runs on a small Pi, where importing pydantic alone costs ~7 MB of resident
memory; its settings (``[edge]``, ``[[edge.sensors]]``, ``[mqtt]``, the simulated sensor's
profiles) are :class:`Schema` sections instead, checked here with the standard library. The
other components keep their pydantic sections (:mod:`iotpipe.settings`), and may nest a Schema
in them: pydantic validates it through :meth:`Schema.__get_pydantic_core_schema__`.

A section is declared once, its fields from the class annotations (in order, base classes
first), each with a :func:`setting`; sections are frozen and built from keywords only::

    class Batch(Schema):
        size: int = setting(100, "readings per envelope at most", ge=1, le=1000)
        mode: Literal["fsync", "process"] = setting("fsync", "how commits are made durable")

Building one (``Batch(size=5)`` or :meth:`Schema.from_mapping`) converts values as pydantic's
lax mode does for config files and environment variables (``"5"`` -> 5, ``"true"`` -> True,
``"/x"`` -> Path), checks the bounds, then calls :meth:`Schema.check` for rules spanning fields.
Any mistake raises one :class:`~iotpipe.errors.ConfigError` naming the dotted field, the value
and what is allowed, in pydantic's words ("Input should be greater than or equal to 1").

Sections are not dataclasses: ``dataclasses`` imports ``inspect`` (and ``ast``, ``dis``, ...),
~1 MB resident in the agent. :func:`replace` is their ``dataclasses.replace``.

Also here, shared with :mod:`iotpipe.settings`: reading TOML, the ``IOTPIPE_<SECTION>__<FIELD>``
environment layer and :func:`load` (defaults < TOML < environment < flags).
"""

from __future__ import annotations

import importlib
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

from iotpipe.errors import ConfigError

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "LazyTagged",
    "NestedConfigError",
    "Schema",
    "config_path",
    "env_layer",
    "load",
    "merge",
    "read_toml",
    "redact_url",
    "replace",
    "setting",
]

ENV_PREFIX = "IOTPIPE_"
CONFIG_ENV = "IOTPIPE_CONFIG"

T = TypeVar("T", bound="Schema")

_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


class _Missing:
    """The default of a required field (``dataclasses.MISSING``'s role)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class _Setting:
    """What :func:`setting` declares about one field; the class keeps them by name."""

    __slots__ = ("default", "factory", "meta")

    def __init__(
        self, default: Any, factory: Callable[[], Any] | None, meta: dict[str, Any]
    ) -> None:
        self.default = default
        self.factory = factory
        self.meta = meta

    def make_default(self) -> Any:
        """The default value (a fresh one from the factory), or :data:`MISSING`."""
        return self.factory() if self.factory is not None else self.default


def setting(
    default: Any = MISSING,
    description: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    min_length: int | None = None,
    pattern: str | None = None,
    check: Callable[[Any], object] | None = None,
    secret: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A field of a :class:`Schema`: its default, what it means, and what it accepts.

    Args:
        default: the default (lists, dicts and Schema values are copied per instance); leave
            it out for a required field.
        description: one line for humans (``configs/*.toml`` say the same).
        ge: ``value >= ge`` (gt, le, lt alike).
        min_length: a list needs at least this many items.
        pattern: a string must match this regular expression.
        check: called with the converted value; a ``ValueError`` it raises is the message.
        secret: the value is a URL whose password must not appear in errors.
        factory: builds the default when it depends on the environment.
    """
    metadata = {
        "description": description,
        "bounds": tuple(
            (op, limit)
            for op, limit in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt))
            if limit is not None
        ),
        "min_length": min_length,
        "pattern": re.compile(pattern) if pattern is not None else None,
        "check": check,
        "secret": secret,
    }
    if factory is None and isinstance(default, list | dict):
        factory = default.copy
    return _Setting(default if factory is None else MISSING, factory, metadata)


class NestedConfigError(ValueError):
    """A Schema nested in a pydantic model was refused; pydantic carries this in its error.

    Attributes:
        error: the ConfigError, its field relative to the Schema.
    """

    def __init__(self, error: ConfigError) -> None:
        super().__init__(str(error))
        self.error = error


class Schema:
    """Base of every pydantic-free settings section (frozen, built from keywords only).

    Attributes:
        fields_set: the fields given explicitly: the keys of the mapping it was loaded from, or,
            when built directly, the fields that differ from their defaults.
    """

    _settings: ClassVar[dict[str, _Setting]] = {}
    _hints: ClassVar[dict[str, Any]]
    fields_set: frozenset[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Collect the fields: the annotated names of the Schema classes, base classes first."""
        super().__init_subclass__(**kwargs)
        settings: dict[str, _Setting] = {}
        for base in reversed(cls.__mro__[1:]):
            settings.update(base.__dict__.get("_settings", {}))
        own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063  # inspect costs ~1 MB
        for name, hint in own.items():
            if str(hint).startswith(("ClassVar", "typing.ClassVar")):
                continue
            declared = cls.__dict__.get(name, MISSING)
            if isinstance(declared, _Setting):
                settings[name] = declared
            elif name not in settings or declared is not MISSING:
                settings[name] = _Setting(declared, None, {})
        for name, spec in settings.items():
            if name in cls.__dict__ and spec.default is MISSING:
                delattr(cls, name)  # as dataclasses do: a factory or required field has none
            elif spec.default is not MISSING:
                setattr(cls, name, spec.default)
        cls._settings = settings

    def __init__(self, **values: Any) -> None:
        cls = type(self)
        settings = cls._settings
        for name in values:
            if name not in settings:
                raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {name!r}")
        if "_hints" not in cls.__dict__:
            cls._hints = typing.get_type_hints(cls)
        raws: dict[str, Any] = {}
        for name, spec in settings.items():
            raws[name] = values[name] if name in values else spec.make_default()
            if raws[name] is MISSING:
                raise TypeError(f"{cls.__name__}() missing required keyword argument {name!r}")
        given: set[str] = set()
        for name, spec in settings.items():
            value = _field_value(cls._hints[name], name, spec, raws[name])
            object.__setattr__(self, name, value)
            if value != spec.make_default():
                given.add(name)
        object.__setattr__(self, "fields_set", frozenset(given))
        self.check()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r} (settings are frozen)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} (settings are frozen)")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._settings)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Schema)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._settings)
        return f"{type(self).__qualname__}({shown})"

    def check(self) -> None:
        """Rules spanning several fields; raise :class:`ConfigError` naming one of them."""

    @classmethod
    def from_mapping(cls: type[T], data: Mapping[str, Any]) -> T:
        """Build from a TOML table (unknown keys and missing required fields are errors).

        Raises:
            ConfigError: a value is invalid (the field is relative to this section).
        """
        known = cls._settings
        for key in data:
            if key not in known:
                raise ConfigError(str(key), data[key], "unknown setting (check the spelling)")
        for name, spec in known.items():
            if name not in data and spec.default is MISSING and spec.factory is None:
                raise ConfigError(name, None, "required")
        built = cls(**data)
        object.__setattr__(built, "fields_set", frozenset(data))
        return built

    def to_dict(self) -> dict[str, Any]:
        """The section as plain values (nested sections as dicts)."""
        return {name: _plain(getattr(self, name)) for name in self._settings}

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        """Let a pydantic model hold this section as a field (validated here, not by pydantic)."""
        from pydantic_core import core_schema

        def validate(value: Any) -> Schema:
            if isinstance(value, cls):
                return value
            if not isinstance(value, Mapping):
                raise ValueError("Input should be a table")
            try:
                return cls.from_mapping(value)
            except ConfigError as err:
                raise NestedConfigError(err) from None

        return core_schema.no_info_plain_validator_function(
            validate,
            serialization=core_schema.plain_serializer_function_ser_schema(Schema.to_dict),
        )


def replace(section: T, /, **changes: Any) -> T:
    """A copy of ``section`` with ``changes`` (checked again), as ``dataclasses.replace`` does."""
    values = {name: getattr(section, name) for name in section._settings}
    return type(section)(**(values | changes))


def _plain(value: Any) -> Any:
    """``value`` with sections as dicts and containers copied (``dataclasses.asdict``'s rule)."""
    if isinstance(value, Schema):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def _field_value(hint: Any, name: str, spec: _Setting, raw: Any) -> Any:
    meta = spec.meta
    try:
        value = convert(hint, raw)
        for op, limit in meta.get("bounds", ()):
            _bound(value, op, limit)
        min_length = meta.get("min_length")
        if min_length is not None and len(value) < min_length:
            noun = "item" if min_length == 1 else "items"
            raise ValueError(f"List should have at least {min_length} {noun} after validation")
        pattern = meta.get("pattern")
        if pattern is not None and not pattern.search(value):
            raise ValueError(f"String should match pattern '{pattern.pattern}'")
        check = meta.get("check")
        if check is not None:
            check(value)
    except ConfigError as err:
        raise ConfigError(_join(name, err.field), err.value, err.allowed) from None
    except ValueError as err:
        shown = redact_url(raw) if meta.get("secret") and isinstance(raw, str) else raw
        raise ConfigError(name, shown, str(err)) from None
    return value


def _join(outer: str, inner: str) -> str:
    return f"{outer}.{inner}" if inner else outer


_BOUND_WORDS: dict[str, tuple[str, Callable[[Any, float], bool]]] = {
    "ge": ("greater than or equal to", lambda v, x: bool(v >= x)),
    "gt": ("greater than", lambda v, x: bool(v > x)),
    "le": ("less than or equal to", lambda v, x: bool(v <= x)),
    "lt": ("less than", lambda v, x: bool(v < x)),
}


def _bound(value: Any, op: str, limit: float) -> None:
    words, holds = _BOUND_WORDS[op]
    if value is not None and not holds(value, limit):
        shown = int(limit) if float(limit).is_integer() else limit
        raise ValueError(f"Input should be {words} {shown}")


def convert(hint: Any, value: Any) -> Any:
    """``value`` as type ``hint`` (lax, like pydantic for config input).

    Raises:
        ValueError: it cannot be one (the message says what would be).
        ConfigError: a nested section refused it (field relative to ``value``).
    """
    origin = get_origin(hint)
    if origin is types.UnionType or origin is typing.Union:
        return _convert_union(get_args(hint), value)
    if origin is Literal:
        return _convert_literal(get_args(hint), value)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ValueError("Input should be a valid list")
        (item,) = get_args(hint)
        return [_nested(str(i), item, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError("Input should be a valid dictionary")
        key_type, item = get_args(hint)
        return {convert(key_type, k): _nested(str(k), item, v) for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Schema):
        return _convert_tagged([hint], value)
    return _convert_scalar(hint, value)


def _nested(where: str, hint: Any, value: Any) -> Any:
    try:
        return convert(hint, value)
    except ConfigError as err:
        raise ConfigError(_join(where, err.field), err.value, err.allowed) from None
    except ValueError as err:
        raise ConfigError(where, value, str(err)) from None


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in {0, 1}:
        return bool(value)
    word = value.strip().lower() if isinstance(value, str) else None
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError("Input should be a valid boolean")


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return int(value.strip()) if isinstance(value, str) else _fail()
    except ValueError:
        raise ValueError("Input should be a valid integer") from None


def _to_float(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        return float(value.strip()) if isinstance(value, str) else _fail()
    except ValueError:
        raise ValueError("Input should be a valid number") from None


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError("Input should be a valid string")


def _to_path(value: Any) -> Path:
    if isinstance(value, str | Path):
        return Path(value)
    raise ValueError("Input should be a valid path")


def _fail() -> Any:
    raise ValueError


_SCALARS: dict[Any, Callable[[Any], Any]] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    Path: _to_path,
    Any: lambda value: value,
}


def _convert_scalar(hint: Any, value: Any) -> Any:
    if isinstance(hint, LazyTagged):
        return hint.convert(value)
    try:
        to_type = _SCALARS[hint]
    except KeyError:
        raise TypeError(f"settings of type {hint!r} are not supported") from None
    return to_type(value)


def _convert_literal(choices: tuple[Any, ...], value: Any) -> Any:
    for choice in choices:
        if value == choice and type(value) is type(choice):
            return choice
        if isinstance(value, str) and isinstance(choice, int) and value.strip() == str(choice):
            return choice
    shown = [repr(choice) for choice in choices]
    listed = shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"
    raise ValueError(f"Input should be {listed}")


def _convert_union(members: tuple[Any, ...], value: Any) -> Any:
    if value is None and type(None) in members:
        return None
    options = [m for m in members if m is not type(None)]
    if all(isinstance(m, type) and issubclass(m, Schema) for m in options):
        return _convert_tagged(options, value)
    first: Exception | None = None
    for member in options:
        try:
            return convert(member, value)
        except (ValueError, ConfigError) as err:
            first = first or err
    assert first is not None
    raise first


def _convert_tagged(options: list[type[Schema]], value: Any) -> Schema:
    """One of several sections, told apart by their ``type`` field's Literal default."""
    if isinstance(value, Schema) and isinstance(value, tuple(options)):
        return value
    if not isinstance(value, Mapping):
        raise ValueError("Input should be a table")
    if len(options) == 1:
        return options[0].from_mapping(value)
    tags = {typing.get_type_hints(m)["type"].__args__[0]: m for m in options}
    return tags[_tag(list(tags), value)].from_mapping(value)


def _tag(tags: list[str], value: Mapping[str, Any]) -> str:
    expected = ", ".join(repr(tag) for tag in tags)
    if "type" not in value:
        raise ConfigError("type", None, f"required, one of: {expected}")
    tag = value["type"]
    if tag not in tags:
        raise ConfigError(
            "type",
            tag,
            f"Input tag {tag!r} found using 'type' does not match any of the expected tags: "
            f"{expected}",
        )
    return str(tag)


class LazyTagged:
    """A union of sections told apart by ``type``, each imported when a table names it.

    The hint of a field whose choices live in modules not worth importing until used (the edge
    agent's sensor drivers): ``LazyTagged({"thermal": "edge.sensors.thermal:ThermalConfig"})``.
    Values are checked as for a union of the sections, with the same errors.
    """

    def __init__(self, sections: Mapping[str, str]) -> None:
        self.sections = dict(sections)
        self.paths = frozenset(self.sections.values())

    def section(self, tag: str) -> type[Schema]:
        """The section class of ``tag`` (its module imported now)."""
        module, _, name = self.sections[tag].partition(":")
        found: type[Schema] = getattr(importlib.import_module(module), name)
        return found

    def convert(self, value: Any) -> Schema:
        """``value`` as the section its ``type`` names.

        Raises:
            ValueError: it is not a table.
            ConfigError: the tag is missing or unknown, or the section refused the table.
        """
        kind = type(value)
        if isinstance(value, Schema) and f"{kind.__module__}:{kind.__qualname__}" in self.paths:
            return value
        if not isinstance(value, Mapping):
            raise ValueError("Input should be a table")
        return self.section(_tag(list(self.sections), value)).from_mapping(value)

    def __repr__(self) -> str:
        return f"LazyTagged({self.sections!r})"


# -- files, environment and precedence --------------------------------------------------------


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file.

    Raises:
        ConfigError: the file is missing, unreadable or not valid TOML.
    """
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("--config", str(path), "no such file") from None
    except OSError as err:
        raise ConfigError("--config", str(path), f"cannot read it ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("--config", str(path), f"not valid TOML ({err})") from None


def config_path(flag: Path | None) -> Path | None:
    """The config file to use: the ``--config`` flag, else ``$IOTPIPE_CONFIG``, else none."""
    if flag is not None:
        return flag
    from_env = os.environ.get(CONFIG_ENV)
    return Path(from_env) if from_env else None


def env_layer(section: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """Nested dict of ``IOTPIPE_<SECTION>__A__B=value`` variables (values stay strings)."""
    prefix = f"{ENV_PREFIX}{section.upper()}__"
    layer: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(prefix):
            continue
        path = [part.lower() for part in key[len(prefix) :].split("__") if part]
        if not path:
            continue
        node = layer
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return layer


def merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``top``'s values over it, tables merged key by key; None values skipped."""
    merged = dict(base)
    for key, value in top.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def layered(
    section: str,
    *,
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The raw values of ``section``: the TOML table, then the environment, then the flags.

    Raises:
        ConfigError: the file cannot be read, or the section is not a table.
    """
    data: dict[str, Any] = {}
    if config_file is not None:
        table: Any = read_toml(config_file)
        for part in section.split("."):
            table = table.get(part, {}) if isinstance(table, dict) else {}
        if not isinstance(table, dict):
            raise ConfigError(section, table, "must be a TOML table")
        data = table
    env_section = section.replace(".", "__")
    data = merge(data, env_layer(env_section, os.environ if environ is None else environ))
    return merge(data, overrides or {})


def load(
    model: type[T],
    section: str,
    *,
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build a :class:`Schema` section from defaults, the TOML file, the environment and flags.

    The same contract as :func:`iotpipe.settings.load` (which calls this for Schema sections).

    Raises:
        ConfigError: a value is invalid (the field is named from the section on).
    """
    data = layered(section, config_file=config_file, overrides=overrides, environ=environ)
    try:
        return model.from_mapping(data)
    except ConfigError as err:
        raise ConfigError(_join(section, err.field), err.value, err.allowed) from None


def redact_url(value: str) -> str:
    """Hide the password part of a URL-looking value.

    Reads the URL as a person would, not as :func:`~urllib.parse.urlsplit` does: everything
    between ``://`` and the last ``@`` is the user information, so a password holding an
    unencoded ``/``, ``?`` or ``#`` (which ``urlsplit`` would take for the path) is hidden too.
    """
    scheme, sep, rest = value.partition("://")
    userinfo, at, host = rest.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    if not (sep and at and colon):
        return value
    return f"{scheme}://{user}:***@{host}"
