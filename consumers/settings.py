"""Settings of ``iotpipe consume`` and the ``--store`` URL that picks the store.

Store URLs:

- ``sqlite:///state/telemetry.db`` — a file relative to the working directory (three slashes, as
  SQLAlchemy writes it); ``sqlite:////var/lib/iotpipe/telemetry.db`` is absolute; a bare path
  (``state/telemetry.db``) or ``sqlite:state/telemetry.db`` means the same as
  ``sqlite:///state/telemetry.db``.
- ``influxdb://host:8086`` (HTTP) or ``influxdbs://host:8086`` (HTTPS): InfluxDB 2.x/3.x, Cloud,
  or any server speaking the InfluxDB v2 write API. Org, bucket and token come from the
  ``[influxdb]`` section (or ``IOTPIPE_INFLUXDB__TOKEN``), never from the URL.
- ``postgresql://user@host:5432/db`` (or ``postgres://``): a PostgreSQL database shared by any
  number of consumer hosts; any libpq URL (``?sslmode=require`` ...). Keep the password in
  ``PGPASSWORD`` or ``~/.pgpass`` rather than in the URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from iotpipe.errors import ConfigError
from iotpipe.schema import redact_url
from iotpipe.settings import DEFAULT_STORE_URL, Section, TlsSettings

DAY_S = 86_400.0

DEFAULT_STATE_PATH = Path("state/consumer/state.db")
"""Where an InfluxDB store's consumer keeps its dedupe and registry state (``[consume].state_path``)."""


@dataclass(frozen=True, slots=True)
class SqliteTarget:
    """A SQLite store file."""

    path: Path

    def __str__(self) -> str:
        return f"sqlite:///{self.path}"


@dataclass(frozen=True, slots=True)
class InfluxTarget:
    """An InfluxDB (v2 write API) server."""

    url: str

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True, slots=True)
class PostgresTarget:
    """A PostgreSQL database (a libpq connection URL)."""

    url: str

    def __str__(self) -> str:
        return redact_url(self.url)


def parse_store(
    value: str, *, field: str = "--store"
) -> SqliteTarget | InfluxTarget | PostgresTarget:
    """Parse a store URL (see the module docstring).

    Raises:
        ConfigError: the URL has another scheme, no path or no host.
    """
    allowed = (
        "sqlite:///path/to/telemetry.db, a file path, influxdb[s]://host[:port]"
        " or postgresql://user@host[:port]/db"
    )
    if value.startswith("sqlite:") and not value.startswith("sqlite://"):
        if value == "sqlite:":
            raise ConfigError(field, value, "no path; expected sqlite:///path/to/telemetry.db")
        return SqliteTarget(Path(value.removeprefix("sqlite:")))
    if "://" not in value:
        if not value.strip():
            raise ConfigError(field, value, f"empty; expected {allowed}")
        return SqliteTarget(Path(value))
    scheme, _, rest = value.partition("://")
    if scheme == "sqlite":
        if not rest.startswith("/") or len(rest) < 2:
            raise ConfigError(field, value, "expected sqlite:///relative.db or sqlite:////abs.db")
        return SqliteTarget(Path(rest[1:]))
    if scheme in ("influxdb", "influxdbs"):
        if "@" in value:  # credentials: refused before parsing, so no error can echo them
            raise ConfigError(
                field,
                redact_url(value),
                "expected influxdb://host:port (the token goes in [influxdb].token)",
            )
        try:
            parts = urlsplit(value)
            port = parts.port or 8086
        except ValueError as err:
            raise ConfigError(field, value, f"{err}; expected {allowed}") from None
        if not parts.hostname or parts.username or parts.password:
            raise ConfigError(
                field, value, "expected influxdb://host:port (the token goes in [influxdb].token)"
            )
        http = "https" if scheme == "influxdbs" else "http"
        return InfluxTarget(f"{http}://{parts.hostname}:{port}")
    if scheme in ("postgresql", "postgres"):
        return _postgres_target(value, field)
    raise ConfigError(field, value, f"unknown store type {scheme!r}; expected {allowed}")


def _postgres_target(value: str, field: str) -> PostgresTarget:
    """Check a PostgreSQL URL's shape (libpq checks the rest when connecting)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as err:
        raise ConfigError(field, redact_url(value), f"{err}") from None
    if not parts.path.strip("/"):
        raise ConfigError(
            field, redact_url(value), "no database; expected postgresql://user@host[:port]/db"
        )
    return PostgresTarget(value)


def store_path(value: str, *, field: str = "--store") -> Path | InfluxTarget | PostgresTarget:
    """Resolve a store URL to a SQLite file path, or an InfluxDB target.

    Accepts what :func:`parse_store` accepts: ``sqlite:///relative.db``, ``sqlite:////absolute.db``,
    ``sqlite:relative.db``, a plain path, ``influxdb[s]://host:port``, ``postgresql://...``.

    Raises:
        ConfigError: anything else.
    """
    target = parse_store(value, field=field)
    return target.path if isinstance(target, SqliteTarget) else target


class ConsumeSettings(Section):
    """The ``[consume]`` section."""

    store: str = Field(DEFAULT_STORE_URL, description="where readings are written")
    queue: str = Field("iotpipe.store", min_length=1, max_length=255, description="AMQP queue")
    bindings: tuple[str, ...] = Field(
        ("iotpipe.v1.#",), min_length=1, description="routing keys bound on iotpipe.telemetry"
    )
    queue_type: Literal["quorum", "classic"] = Field("quorum", description="queue type")
    delivery_limit: int = Field(
        5, ge=1, le=1000, description="deliveries before a refused message is dead-lettered"
    )
    dead_letter_queue: str = Field(
        "iotpipe.dead", max_length=255, description="queue keeping iotpipe.dead; '' = none"
    )
    quorum_group_size: int = Field(
        0,
        ge=0,
        le=99,
        description="cluster nodes a new quorum queue is replicated on (odd: 3 or 5); "
        "0 = RabbitMQ's default, every node",
    )
    prefetch: int = Field(2000, ge=1, le=65_535, description="unacknowledged deliveries at most")
    batch_size: int = Field(1000, ge=1, le=65_535, description="messages per store write, at most")
    batch_latency: float = Field(
        0.2,
        gt=0,
        le=60,
        description="longest wait for a first message, and longest a batch keeps growing "
        "(a batch is written as soon as what arrived is read)",
    )
    retention_days: float = Field(7.0, gt=0, description="how long message ids are remembered")
    prune_interval: float = Field(600.0, gt=0, description="seconds between prunes of old ids")
    durability: Literal["fsync", "process"] = Field(
        "fsync", description="fsync: survives power loss; process: survives a crash only"
    )
    busy_timeout: float = Field(30.0, gt=0, description="seconds to wait for a locked SQLite file")
    state_path: Path = Field(
        DEFAULT_STATE_PATH, description="InfluxDB stores: local dedupe/registry file"
    )
    dedupe: str = Field("", description="InfluxDB stores: redis://host:port/db to share seen ids")
    receipts: bool = Field(
        True,
        description="publish receipts to iotpipe.receipts after each commit; turn off on a "
        "consumer that is not the store of record",
    )
    receipt_interval: float = Field(
        1.0, ge=0.1, le=60, description="seconds between two receipts of one device"
    )
    http_host: str = Field("127.0.0.1", description="address of /metrics and /healthz")
    http_port: int = Field(9182, ge=0, le=65535, description="port of /metrics and /healthz")

    @field_validator("store")
    @classmethod
    def _valid_store(cls, value: str) -> str:
        try:
            parse_store(value, field="store")
        except ConfigError as err:
            raise ValueError(err.allowed) from None
        return value

    @field_validator("dedupe")
    @classmethod
    def _valid_dedupe(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected redis://[:password@]host[:port][/db], or empty")
        return value

    @property
    def target(self) -> SqliteTarget | InfluxTarget | PostgresTarget:
        """The parsed store URL."""
        return parse_store(self.store, field="consume.store")

    @property
    def retention_ms(self) -> int:
        """The retention window of seen ids, in milliseconds."""
        return int(self.retention_days * DAY_S * 1000)


class InfluxSettings(Section):
    """The ``[influxdb]`` section: used when the store is ``influxdb://``."""

    org: str = Field("iotpipe", description="organisation (ignored by VictoriaMetrics)")
    bucket: str = Field("telemetry", min_length=1, description="bucket (database)")
    token: SecretStr = Field(SecretStr(""), description="API token with write access")
    measurement: str = Field("telemetry", min_length=1, description="measurement name")
    timeout: float = Field(10.0, gt=0, le=300, description="seconds per write request")
    tls: TlsSettings = TlsSettings()
