"""Settings: pydantic models filled from a TOML file, ``IOTPIPE_*`` variables and flags.

Precedence, lowest first: the model's defaults, the TOML file's ``[section]`` table, environment
variables ``IOTPIPE_<SECTION>__<FIELD>`` (``IOTPIPE_MQTT__URL=mqtt://pi:1883``), then command-line
flags. Every section is a frozen model that forbids unknown keys, so a typo in a config file fails
at start-up instead of being ignored. A bad value raises :class:`~iotpipe.errors.ConfigError`
naming the field, the value and what is allowed.

The sections the edge agent needs (``[mqtt]``, TLS) are pydantic-free :class:`~iotpipe.schema.Schema`
dataclasses from :mod:`iotpipe.connection`, re-exported here; :func:`load` builds both kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from iotpipe import schema
from iotpipe.connection import BrokerUrl, MqttSettings, Secret, TlsSettings, parse_url
from iotpipe.errors import ConfigError
from iotpipe.schema import CONFIG_ENV, ENV_PREFIX, Schema, config_path, read_toml

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "AmqpSettings",
    "BrokerUrl",
    "LogLevel",
    "MqttSettings",
    "Secret",
    "Section",
    "TlsSettings",
    "config_path",
    "load",
    "parse_url",
    "read_toml",
]

_SECRET_FIELDS = frozenset({"password", "token", "url"})


class Section(BaseModel):
    """Base of every settings section: immutable, and unknown keys are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


S = TypeVar("S", bound=Section | Schema)


class AmqpSettings(Section):
    """How to reach RabbitMQ (or any AMQP 0-9-1 broker)."""

    url: str = Field("amqp://guest:guest@127.0.0.1:5672/", description="amqp:// or amqps:// URL")
    tls: TlsSettings = TlsSettings()

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        parse_url(value, ("amqp", "amqps"))
        return value

    @property
    def broker(self) -> BrokerUrl:
        """The parsed URL."""
        return parse_url(self.url, ("amqp", "amqps"))


LogLevel = Literal["debug", "info", "warning", "error"]


def _describe(section: str, err: ValidationError) -> ConfigError:
    """Turn pydantic's first error into one line: field, value, what is allowed."""
    first = err.errors(include_url=False)[0]
    location = ".".join(str(part) for part in (section, *first["loc"]))
    nested = first.get("ctx", {}).get("error")
    if isinstance(nested, schema.NestedConfigError):  # a Schema section inside a model
        inner = nested.error
        return ConfigError(f"{location}.{inner.field}", inner.value, inner.allowed)
    value: object = first.get("input")
    if first["type"] == "extra_forbidden":
        return ConfigError(location, value, "unknown setting (check the spelling)")
    if first["type"] == "missing":
        return ConfigError(location, None, "required")
    if any(str(part) in _SECRET_FIELDS for part in first["loc"]) and isinstance(value, str):
        value = schema.redact_url(value)
    message = str(first["msg"]).removeprefix("Value error, ")
    return ConfigError(location, value, message)


def load(
    model: type[S],
    section: str,
    *,
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> S:
    """Build a settings section from defaults, the TOML file, the environment and flags.

    Args:
        model: the section's model.
        section: the TOML table and environment infix (``mqtt`` → ``[mqtt]``, ``IOTPIPE_MQTT__*``).
            Dotted names address nested tables (``simulate.faults``).
        config_file: a TOML file, or None for defaults + environment only.
        overrides: command-line flag values; ``None`` means "flag not given".
        environ: the environment (defaults to ``os.environ``).

    Raises:
        ConfigError: a value is invalid, or the file cannot be read.
    """
    if issubclass(model, Schema):
        return cast(
            "S",
            schema.load(
                model, section, config_file=config_file, overrides=overrides, environ=environ
            ),
        )
    data = schema.layered(section, config_file=config_file, overrides=overrides, environ=environ)
    try:
        return cast("S", model.model_validate(data))
    except ValidationError as err:
        raise _describe(section, err) from None
