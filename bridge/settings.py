"""Settings of the bridge's commands: ``[bridge]`` (``iotpipe bridge``), ``[broker]``
(``iotpipe broker``) and ``[unpack]`` (``iotpipe unpack``).

Each section is a frozen model filled by :func:`iotpipe.settings.load` from defaults, the TOML
file, ``IOTPIPE_BRIDGE__*`` / ``IOTPIPE_BROKER__*`` / ``IOTPIPE_UNPACK__*`` variables and flags;
``configs/bridge.toml``, ``configs/broker.toml`` and ``configs/unpack.toml`` are the commented
samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from bridge.ingest import IngestRule
from bridge.limits import LimitSettings
from iotpipe.amqp import DEAD_LETTER_QUEUE, UPLINK_QUEUE
from iotpipe.errors import ConfigError
from iotpipe.receipts import ALL_RECEIPTS
from iotpipe.schema import NestedConfigError
from iotpipe.settings import Section
from iotpipe.topics import STATUS_FILTER, TELEMETRY_FILTER, check_filter

__all__ = ["BridgeSettings", "BrokerSettings", "UnpackSettings"]


class BridgeSettings(Section):
    """The ``[bridge]`` section."""

    topics: tuple[str, ...] = Field(
        (TELEMETRY_FILTER, STATUS_FILTER), description="MQTT topic filters to forward"
    )
    client_id: str = Field("iotpipe-bridge", min_length=1, description="fixed MQTT client id")
    shared_group: str = Field(
        "", description="subscribe as $share/<group>/<filter> (Mosquitto; amqtt has no support)"
    )
    window: int = Field(1000, ge=1, le=60_000, description="unconfirmed AMQP publishes at most")
    dead_letter_queue: str = Field(
        DEAD_LETTER_QUEUE, max_length=255, description="queue keeping iotpipe.dead; '' = none"
    )
    spool_path: Path = Field(Path("state/bridge/spool.db"), description="durable spool file")
    spool_max_bytes: int = Field(512 * 1024 * 1024, ge=1024 * 1024, description="spool budget")
    spool_durability: Literal["fsync", "process"] = Field(
        "fsync", description="fsync: survives power loss; process: survives a crash only"
    )
    drain_rate: float = Field(2000.0, gt=0, description="spooled messages re-sent per second")
    http_host: str = Field("127.0.0.1", description="address of /metrics and /healthz")
    http_port: int = Field(9181, ge=0, le=65535, description="port of /metrics and /healthz")
    receipts: bool = Field(True, description="carry receipts from RabbitMQ down to the devices")
    receipt_queue: str = Field(
        "iotpipe.receipts.bridge",
        min_length=1,
        max_length=255,
        description="receipts queue; bridges sharing it share the work (competing consumers)",
    )
    receipt_binding: str = Field(
        ALL_RECEIPTS, min_length=1, description="binding key of receipt_queue on iotpipe.receipts"
    )
    receipt_ttl: int = Field(
        600, ge=1, description="seconds a receipt may wait for delivery before it is dropped"
    )
    limits: LimitSettings = Field(
        default_factory=LimitSettings,
        description="per-device rate and quota ([bridge.limits]); none by default",
    )
    uplink: Literal["messages", "packed"] = Field(
        "messages",
        description="messages: one AMQP message per MQTT message; packed: many per AMQP message, "
        "compressed, to iotpipe.uplink (a central `iotpipe unpack` restores them)",
    )
    uplink_queue: str = Field(
        UPLINK_QUEUE, min_length=1, max_length=255, description="packed: the queue packs go to"
    )
    pack_max_messages: int = Field(
        500, ge=1, le=100_000, description="packed: a pack is sent when it holds this many"
    )
    pack_max_bytes: int = Field(
        256 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="packed: ... or would grow past this many bytes (uncompressed)",
    )
    pack_max_delay: float = Field(
        0.25, ge=0, le=60, description="packed: ... or its oldest message waited this long (s)"
    )
    pack_level: int = Field(3, ge=1, le=19, description="packed: zstd compression level")
    ingest: tuple[IngestRule, ...] = Field(
        (),
        description="[[bridge.ingest]] rules mapping foreign payloads to envelopes (docs/ingest.md)",
    )

    @field_validator("ingest")
    @classmethod
    def _unique_rules(cls, rules: tuple[IngestRule, ...]) -> tuple[IngestRule, ...]:
        seen: set[str] = set()
        for index, rule in enumerate(rules):
            if rule.name in seen:
                raise NestedConfigError(
                    ConfigError(f"{index}.name", rule.name, "rule names must be unique")
                )
            seen.add(rule.name)
        return rules

    def model_post_init(self, _context: Any) -> None:
        """Check every topic filter."""
        for topic in self.topics:
            check_filter(topic)


class BrokerSettings(Section):
    """The ``[broker]`` section: how ``iotpipe broker`` listens and whom it lets in."""

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 = every interface)")
    port: int = Field(1883, ge=1, le=65535, description="TCP port for MQTT")
    password_file: Path | None = Field(
        None,
        description="user:argon2-hash file; when set, clients without valid credentials are refused",
    )
    acl_file: Path | None = Field(None, description="TOML ACL (needs password_file)")
    session_expiry: int = Field(
        0,
        ge=0,
        description="forget a disconnected persistent session after this many seconds; 0 = never",
    )
    max_queued_messages: int = Field(
        10_000,
        ge=0,
        description="QoS>0 messages kept per disconnected session (oldest dropped); 0 = no limit",
    )
    max_inflight_messages: int = Field(
        100,
        ge=1,
        le=65_535,
        description="QoS>0 messages sent to one client and not acknowledged yet, at most; the "
        "rest wait in its queue",
    )
    http_host: str = Field("127.0.0.1", description="address of /metrics and /healthz")
    http_port: int = Field(
        9184, ge=0, le=65535, description="port of /metrics and /healthz; 0 = a free port"
    )
    state_file: Path | None = Field(
        None,
        description="SQLite file keeping persistent sessions, their messages and retained "
        "messages across restarts; none = in memory only",
    )
    autosave_interval: float = Field(
        5.0,
        gt=0,
        description="seconds between saves of the state file when something changed (a crash "
        "loses at most this much; a clean stop saves everything)",
    )

    tls_port: int = Field(
        0, ge=0, le=65535, description="port of an MQTT-over-TLS listener (8883 is usual); 0 = none"
    )
    tls_cert_file: Path | None = Field(
        None, description="server certificate (PEM, chain after it) of the tls_port listener"
    )
    tls_key_file: Path | None = Field(
        None, validate_default=True, description="its private key (PEM, unencrypted)"
    )

    @field_validator("tls_key_file")
    @classmethod
    def _tls_files(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        files = (info.data.get("tls_cert_file"), value)
        if info.data.get("tls_port") and None in files:
            raise ValueError("tls_port needs tls_cert_file and tls_key_file")
        if not info.data.get("tls_port") and files != (None, None):
            raise ValueError("TLS files without tls_port: set the port of the TLS listener")
        return value

    @field_validator("host")
    @classmethod
    def _plain_host(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        if ":" in value:
            # amqtt 0.12 passes "[::1]" to the socket layer with its brackets and cannot bind it.
            raise ValueError(
                "IPv6 addresses are not supported by amqtt 0.12; use an IPv4 address or a name"
            )
        return value

    @field_validator("acl_file")
    @classmethod
    def _acl_needs_auth(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("password_file") is None:
            raise ValueError(
                "needs password_file too: without authentication a username is a claim"
            )
        return value

    @property
    def url(self) -> str:
        """The ``mqtt://host:port`` URL clients should use."""
        return f"mqtt://{self.host}:{self.port}"


class UnpackSettings(Section):
    """The ``[unpack]`` section: the central end of the packed uplink (``iotpipe unpack``)."""

    queue: str = Field(
        UPLINK_QUEUE, min_length=1, max_length=255, description="the queue packs arrive on"
    )
    prefetch: int = Field(
        16, ge=1, le=1000, description="packs handed over unacknowledged at most (and per batch)"
    )
    window: int = Field(
        5000, ge=1, le=60_000, description="unconfirmed AMQP publishes of unpacked messages"
    )
    dead_letter_queue: str = Field(
        DEAD_LETTER_QUEUE, max_length=255, description="queue keeping iotpipe.dead; '' = none"
    )
    max_unpacked_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024 * 1024,
        le=1024 * 1024 * 1024,
        description="a pack that would decompress to more is refused (dead-lettered)",
    )
    seen_path: Path = Field(
        Path("state/unpack/packs.db"), description="SQLite file of the pack ids already unpacked"
    )
    seen_keep: int = Field(
        100_000, ge=100, description="pack ids remembered (the newest); older ones are forgotten"
    )
    http_host: str = Field("127.0.0.1", description="address of /metrics and /healthz")
    http_port: int = Field(
        9185, ge=0, le=65535, description="port of /metrics and /healthz; 0 = a free port"
    )
