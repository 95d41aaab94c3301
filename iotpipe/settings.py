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
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from iotpipe.errors import ConfigError
from iotpipe.topics import check_filter

ENV_PREFIX = "IOTPIPE_"
CONFIG_ENV = "IOTPIPE_CONFIG"

DEFAULT_STORE_URL = "sqlite:///state/telemetry.db"
"""Where ``iotpipe consume`` writes readings, and ``stats``/``dashboard``/``up`` read them, by default."""

_SECRET_FIELDS = frozenset({"password", "token", "url"})


class Section(BaseModel):
    """Base of every settings section: immutable, and unknown keys are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


S = TypeVar("S", bound=Section)


class BrokerUrl(BaseModel):
    """A parsed ``scheme://user:pass@host:port/vhost`` connection URL."""

    model_config = ConfigDict(frozen=True)

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: SecretStr | None = None
    path: str = ""

    @property
    def tls(self) -> bool:
        """Whether the scheme asks for TLS (``mqtts``, ``amqps``)."""
        return self.scheme.endswith("s")

    def redacted(self) -> str:
        """The URL without the password, safe to log."""
        user = f"{self.username}@" if self.username else ""
        return f"{self.scheme}://{user}{self.host}:{self.port}{self.path}"

    def __str__(self) -> str:
        return self.redacted()


_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883, "amqp": 5672, "amqps": 5671}


def parse_url(value: str, schemes: tuple[str, ...]) -> BrokerUrl:
    """Parse a connection URL whose scheme must be one of ``schemes``.

    Raises:
        ValueError: the URL is malformed or uses another scheme (the message says what is allowed).
    """
    allowed = " or ".join(f"{s}://[user:pass@]host[:port]" for s in schemes)
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as err:
        raise ValueError(f"{err}; expected {allowed}") from None
    if parts.scheme not in schemes:
        raise ValueError(f"scheme must be {' or '.join(schemes)}; expected {allowed}")
    if not parts.hostname:
        raise ValueError(f"missing host; expected {allowed}")
    return BrokerUrl(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port or _DEFAULT_PORTS[parts.scheme],
        username=unquote(parts.username) if parts.username else None,
        password=SecretStr(unquote(parts.password)) if parts.password is not None else None,
        path=parts.path,
    )


class TlsSettings(Section):
    """TLS material for ``mqtts://`` and ``amqps://`` connections."""

    ca_file: Path | None = Field(None, description="CA bundle to verify the server (PEM)")
    cert_file: Path | None = Field(None, description="client certificate (PEM) for mutual TLS")
    key_file: Path | None = Field(None, description="client private key (PEM) for mutual TLS")
    insecure: bool = Field(False, description="skip server certificate verification (testing only)")

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _must_exist(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError("file does not exist")
        return path


class MqttSettings(Section):
    """How to reach an MQTT broker."""

    url: str = Field(
        "mqtt://127.0.0.1:1883", description="mqtt://[user:pass@]host[:port] or mqtts://"
    )
    client_id: str = Field("", description="MQTT client id; empty picks a random one")
    keepalive: int = Field(30, ge=5, le=3600, description="keep-alive interval, seconds")
    tls: TlsSettings = TlsSettings()

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        parse_url(value, ("mqtt", "mqtts"))
        return value

    @property
    def broker(self) -> BrokerUrl:
        """The parsed URL."""
        return parse_url(self.url, ("mqtt", "mqtts"))


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


def _env_layer(section: str, environ: Mapping[str, str]) -> dict[str, Any]:
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


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(section: str, err: ValidationError) -> ConfigError:
    """Turn pydantic's first error into one line: field, value, what is allowed."""
    first = err.errors(include_url=False)[0]
    location = ".".join(str(part) for part in (section, *first["loc"]))
    value: object = first.get("input")
    if first["type"] == "extra_forbidden":
        return ConfigError(location, value, "unknown setting (check the spelling)")
    if first["type"] == "missing":
        return ConfigError(location, None, "required")
    if any(str(part) in _SECRET_FIELDS for part in first["loc"]) and isinstance(value, str):
        value = _redact(value)
    message = str(first["msg"]).removeprefix("Value error, ")
    return ConfigError(location, value, message)


def _redact(value: str) -> str:
    """Hide the password part of a URL-looking value."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return "***"
    if parts.password is None:
        return value
    return value.replace(f":{parts.password}@", ":***@", 1)


def section_data(
    section: str,
    *,
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A section's raw values, file then environment then flags merged, before validation.

    :func:`load` validates this against the section's model. Code that must not import a
    component's model (``iotpipe up`` reading ``[consume] store``) reads single keys from it,
    with the same precedence the component will apply.

    Args:
        section: the TOML table and environment infix, as for :func:`load`.
        config_file: a TOML file, or None for the environment and flags only.
        overrides: command-line flag values; ``None`` means "flag not given".
        environ: the environment (defaults to ``os.environ``).

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
    data = _merge(data, _env_layer(env_section, os.environ if environ is None else environ))
    return _merge(data, overrides or {})


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
    data = section_data(section, config_file=config_file, overrides=overrides, environ=environ)
    try:
        return model.model_validate(data)
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
