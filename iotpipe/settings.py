"""Settings: pydantic models filled from a TOML file, ``IOTPIPE_*`` variables and flags.

Precedence, lowest first: the model's defaults, the TOML file's ``[section]`` table, environment
variables ``IOTPIPE_<SECTION>__<FIELD>`` (``IOTPIPE_MQTT__URL=mqtt://pi:1883``), then command-line
flags. Every section is a frozen model that forbids unknown keys, so a typo in a config file fails
at start-up instead of being ignored. A bad value raises :class:`~iotpipe.errors.ConfigError`
naming the field, the value and what is allowed.

This module holds the shared sections (``[mqtt]``, ``[amqp]`` and their TLS), the defaults the
components share (:data:`DEFAULT_STORE_URL`), and the sections of the core's own commands
(``[record]``, ``[up]``); each component keeps its sections in its own ``settings`` module
(:mod:`bridge.settings`, :mod:`consumers.settings`, :mod:`simulator.settings`, ...).

The sections the edge agent needs (``[mqtt]``, TLS) are pydantic-free :class:`~iotpipe.schema.Schema`
dataclasses from :mod:`iotpipe.connection`, re-exported here; :func:`load` builds both kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from iotpipe import schema
from iotpipe.connection import BrokerUrl, MqttSettings, Secret, TlsSettings, parse_url
from iotpipe.errors import ConfigError
from iotpipe.schema import CONFIG_ENV, ENV_PREFIX, Schema, config_path, read_toml
from iotpipe.topics import check_filter

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

DEFAULT_STORE_URL = "sqlite:///state/telemetry.db"
"""Where ``iotpipe consume`` writes readings, and ``stats``/``dashboard``/``up`` read them, by default."""

_SECRET_FIELDS = frozenset({"password", "token", "url", "urls", "store", "dedupe"})  # may hold one


class Section(BaseModel):
    """Base of every settings section: immutable, and unknown keys are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


S = TypeVar("S", bound=Section | Schema)


class AmqpSettings(Section):
    """How to reach RabbitMQ (or any AMQP 0-9-1 broker)."""

    url: str = Field("amqp://guest:guest@127.0.0.1:5672/", description="amqp:// or amqps:// URL")
    password_file: Path | None = Field(
        None,
        description="file holding the password of the URL's user (first line), read at every "
        "connect; instead of a password in the URL (see `iotpipe rabbitmq setup`)",
    )
    urls: tuple[str, ...] = Field(
        (),
        description="more nodes of the same RabbitMQ cluster, tried in turn after url on every "
        "(re)connect (round-robin); a list, or one comma-separated string",
    )
    tls: TlsSettings = TlsSettings()

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        parse_url(value, ("amqp", "amqps"))
        return value

    @field_validator("urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        # IOTPIPE_AMQP__URLS=amqp://a,amqp://b: an environment variable holds one string.
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("urls")
    @classmethod
    def _valid_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            parse_url(url, ("amqp", "amqps"))
        return value

    @field_validator("password_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("file does not exist")
        return value

    @model_validator(mode="after")
    def _user_for_password_file(self) -> AmqpSettings:
        if self.password_file is not None and any(
            parse_url(url, ("amqp", "amqps")).username is None for url in (self.url, *self.urls)
        ):
            raise ValueError(
                "password_file needs a user in url and urls (amqp://USER@host:port/vhost)"
            )
        return self

    @property
    def broker(self) -> BrokerUrl:
        """The parsed URL, with the password from :attr:`password_file` when that is set.

        Raises:
            ConfigError: the password file cannot be read.
        """
        return self.brokers[0]

    @property
    def brokers(self) -> tuple[BrokerUrl, ...]:
        """Every node to try, :attr:`url` first then :attr:`urls` (duplicates dropped), parsed.

        A host name that resolves to several addresses (a cluster behind DNS) is one entry:
        pika tries each address it resolves to, in order.

        Raises:
            ConfigError: the password file cannot be read.
        """
        urls = [parse_url(url, ("amqp", "amqps")) for url in dict.fromkeys((self.url, *self.urls))]
        if self.password_file is None:
            return tuple(urls)
        try:
            password = self.password_file.read_text().splitlines()[0]
        except (OSError, IndexError) as err:
            reason = err.strerror if isinstance(err, OSError) else "empty file"
            raise ConfigError("amqp.password_file", self.password_file, str(reason)) from None
        return tuple(url._replace(password=Secret(password)) for url in urls)


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
    if any(str(part) in _SECRET_FIELDS for part in first["loc"]):
        if isinstance(value, str):
            value = schema.redact_url(value)
        elif isinstance(value, list | tuple):  # [amqp] urls
            value = [schema.redact_url(v) if isinstance(v, str) else v for v in value]
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


# -- the core's commands ---------------------------------------------------------------------


class RecordSettings(Section):
    """The ``[record]`` section: what ``iotpipe record`` subscribes to and where it writes."""

    topics: tuple[str, ...] = Field(
        ("iotpipe/#",), min_length=1, description="MQTT topic filters to record"
    )
    qos: int = Field(
        1, ge=0, le=2, description="subscription QoS (messages keep their own QoS up to it)"
    )
    out: Path | None = Field(None, description="the recording file to create")
    count: int | None = Field(None, ge=1, description="stop after this many messages")
    duration: float | None = Field(None, gt=0, description="stop after this many seconds")
    overwrite: bool = Field(False, description="replace an existing output file")

    @field_validator("topics")
    @classmethod
    def _valid_filters(cls, topics: tuple[str, ...]) -> tuple[str, ...]:
        for topic in topics:
            check_filter(topic)
        return topics


class UpSettings(Section):
    """The ``[up]`` section: what ``iotpipe up`` starts, on which ports, and how long it waits."""

    state_dir: Path = Field(Path("state"), description="logs, components.json, private RabbitMQ")
    edge_broker: Literal["amqtt", "mosquitto"] = Field("amqtt", description="broker to start")
    mqtt_host: str = Field("127.0.0.1", description="address the started edge broker listens on")
    mqtt_port: int = Field(1884, ge=1, le=65535, description="port of the started edge broker")
    rabbitmq: Literal["auto", "private", "external"] = Field(
        "auto", description="auto: configured or local one, else a private node"
    )
    rabbitmq_port: int = Field(5673, ge=1, le=65535, description="AMQP port of a private node")
    rabbitmq_dist_port: int = Field(25673, ge=1, le=65535, description="its Erlang dist port")
    broker_http_port: int = Field(
        9184, ge=1, le=65535, description="embedded broker /metrics, /healthz"
    )
    bridge_http_port: int = Field(9181, ge=1, le=65535, description="bridge /metrics, /healthz")
    consumer_http_port: int = Field(9182, ge=1, le=65535, description="consumer /metrics, /healthz")
    dashboard: bool = Field(True, description="serve the web dashboard on the consumer's store")
    dashboard_port: int = Field(8080, ge=1, le=65535, description="port of the web dashboard")
    simulator: bool = Field(True, description="run a simulated fleet")
    sites: int = Field(2, ge=1, le=1000, description="simulated sites")
    devices: int = Field(3, ge=1, le=10_000, description="simulated devices per site")
    rate: str = Field("1", description="samples per second per device (0.1-100) or 'max'")
    faults: dict[str, float] = Field(
        {"duplicate": 0.02, "malformed": 0.01, "mismatch": 0.01},
        description="simulator fault injection (see iotpipe simulate --fault)",
    )
    start_timeout: float = Field(60.0, gt=0, description="seconds a component may take to start")
    drain_timeout: float = Field(10.0, ge=0, description="seconds to wait for the bridge to drain")
    refresh: float = Field(1.0, ge=0.2, le=60, description="seconds between live view updates")

    @field_validator("rate")
    @classmethod
    def _valid_rate(cls, value: str) -> str:
        if value == "max":
            return value
        try:
            hz = float(value)
        except ValueError:
            raise ValueError("expected a number of samples per second or 'max'") from None
        if not 0.1 <= hz <= 100:
            raise ValueError("expected 0.1 to 100 samples per second, or 'max'")
        return value
