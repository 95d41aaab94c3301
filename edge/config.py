"""Settings of the edge agent: the ``[edge]`` section, and the MQTT password from a file.

Loaded like every iotpipe section (:func:`iotpipe.schema.load`): defaults, then the TOML
file's ``[edge]`` table, then ``IOTPIPE_EDGE__<FIELD>`` variables, then flags. A
:class:`~iotpipe.schema.Schema` rather than a pydantic model, so the agent runs without
pydantic (its footprint on a small Pi). ``configs/edge.toml`` is the
commented example of every option.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from edge.sensors import SensorConfig
from iotpipe import __version__
from iotpipe.connection import MqttSettings, TlsSettings
from iotpipe.errors import ConfigError
from iotpipe.schema import Schema, replace, setting
from iotpipe.topics import is_valid_name

__all__ = [
    "AGENT",
    "EdgeSettings",
    "default_device",
    "default_state_dir",
    "device_identity",
    "mqtt_settings",
]

#: The ``agent`` field of our status messages.
AGENT = f"iotpipe-edge/{__version__}"

#: systemd's ``LoadCredential=mqtt-password:...`` puts the secret in this file of
#: ``$CREDENTIALS_DIRECTORY``.
CREDENTIAL_NAME = "mqtt-password"
#: The client certificate ``iotpipe edge flash --client-cert`` puts on a card, as credentials
#: (``[mqtt.tls]`` field -> credential name); an empty file means none.
TLS_CREDENTIALS = {
    "cert_file": "mqtt-client.crt",
    "key_file": "mqtt-client.key",
    "ca_file": "mqtt-ca.crt",
}

_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def default_device() -> str:
    """The host name, made a valid device name (other characters become ``-``, 64 at most)."""
    name = _BAD_NAME_CHARS.sub("-", socket.gethostname().split(".")[0]).strip("-")[:64]
    return name or "device"


def device_identity(edge: EdgeSettings) -> str:
    """The MQTT user name of a device: ``{site}/{device}`` (docs/edge-flash.md)."""
    return f"{edge.site}/{edge.device_name}"


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``), else ``/var/lib/iotpipe-edge``."""
    from_systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(from_systemd) if from_systemd else Path("/var/lib/iotpipe-edge")


def _name(value: str) -> None:
    if value and not is_valid_name(value):
        raise ValueError("must be 1-64 characters of A-Z a-z 0-9 _ - (wire contract)")


def _tags(value: dict[str, str]) -> None:
    if len(value) > 15:
        raise ValueError("at most 15 tags (the contract allows 16; the agent may add 'clock')")
    if "clock" in value:
        raise ValueError("'clock' is set by the agent while the clock is not synchronised")


class EdgeSettings(Schema):
    """The ``[edge]`` section."""

    site: str = setting(description="site name in the topic (required)", check=_name)
    device: str = setting(
        "", "device name in the topic; empty = the host name, sanitised", check=_name
    )
    state_dir: Path = setting(
        description="directory of outbox.db ($STATE_DIRECTORY, else /var/lib/iotpipe-edge)",
        factory=default_state_dir,
    )
    batch_max_readings: int = setting(100, "readings per envelope at most", ge=1, le=1000)
    batch_max_delay: float = setting(
        5.0, "seconds a reading may wait for its envelope", gt=0, le=3600
    )
    commit_max_delay: float = setting(
        1.0, "seconds a sealed envelope may wait for its group commit", ge=0, le=60
    )
    commit_max_envelopes: int = setting(
        50, "commit at once when this many envelopes wait", ge=1, le=10_000
    )
    durability: Literal["fsync", "process"] = setting(
        "fsync", "fsync: commits survive power loss; process: a crash only"
    )
    outbox_max_bytes: int = setting(
        64 * 1024 * 1024, "outbox budget; beyond it old data is thinned", ge=64 * 1024
    )
    drain_rate: float = setting(50.0, "envelopes published per second at most", gt=0)
    window: int = setting(100, "unacknowledged publishes at most", ge=1, le=10_000)
    ack_timeout: float = setting(
        30.0, "seconds without PUBACK before the connection is renewed", gt=0
    )
    receipts: Literal["auto", "on", "off"] = setting(
        "auto",
        "on: delete an envelope on its receipt; off: on PUBACK; auto: as the pipeline says",
    )
    receipt_window: int = setting(
        256, "envelopes published and not yet receipted at most", ge=1, le=10_000
    )
    receipt_timeout_min: float = setting(
        5.0, "an unreceipted envelope is resent after at least this many seconds", gt=0
    )
    receipt_timeout_max: float = setting(300.0, "... and after at most this many seconds", gt=0)
    reconnect_min: float = setting(0.5, "first reconnect delay, seconds", gt=0)
    reconnect_max: float = setting(60.0, "longest reconnect delay, seconds", gt=0)
    stop_timeout: float = setting(
        5.0, "seconds SIGTERM waits for the backlog and PUBACKs", ge=0, le=300
    )
    clock_sync_files: list[Path] = setting(
        [Path("/run/systemd/timesync/synchronized")],
        "the clock counts as synchronised while any exists; [] = always",
    )
    boot_id_path: Path = setting(Path("/proc/sys/kernel/random/boot_id"), "the kernel's boot id")
    tags: dict[str, str] = setting({}, "labels added to every envelope", check=_tags)
    http_host: str = setting("127.0.0.1", "address of /metrics and /healthz")
    http_port: int = setting(9183, "port of /metrics; 0 = off", ge=0, le=65535)
    stats_interval: float = setting(
        60.0, "seconds between backlog log lines and fill estimates", gt=0
    )
    mqtt_password_file: Path | None = setting(
        None, "file holding the MQTT password (default: systemd credential)"
    )
    sensors: list[SensorConfig] = setting([], "[[edge.sensors]]")

    def check(self) -> None:
        """``receipt_timeout_min`` must not exceed ``receipt_timeout_max``."""
        if self.receipt_timeout_min > self.receipt_timeout_max:
            raise ConfigError(
                "edge.receipt_timeout_min",
                self.receipt_timeout_min,
                f"must not exceed edge.receipt_timeout_max ({self.receipt_timeout_max:g})",
            )

    @property
    def device_name(self) -> str:
        """``device``, or the sanitised host name."""
        return self.device or default_device()

    @property
    def outbox_path(self) -> Path:
        """The outbox file in ``state_dir``."""
        return self.state_dir / "outbox.db"


def mqtt_settings(
    mqtt: MqttSettings, edge: EdgeSettings, environ: dict[str, str] | None = None
) -> MqttSettings:
    """Complete ``[mqtt]`` for the agent: a fixed client id, and the password from a file.

    The password comes from the URL, else ``edge.mqtt_password_file``, else
    ``$CREDENTIALS_DIRECTORY/mqtt-password`` (systemd ``LoadCredential=``) if it exists.
    ``[mqtt.tls]`` files not set come from the credentials ``mqtt-client.crt``,
    ``mqtt-client.key``, ``mqtt-ca.crt`` when they are not empty. With a
    password from a file and no user name in the URL, the agent logs in as its identity
    ``{site}/{device}``: the user name ``iotpipe edge flash`` registers and the brokers' device
    ACLs expect.

    Raises:
        ConfigError: the password file cannot be read.
    """
    env = os.environ if environ is None else environ
    update: dict[str, Any] = {}
    if not mqtt.client_id:
        update["client_id"] = f"iotpipe-edge-{edge.site}-{edge.device_name}"[:64]
    tls = _tls_from_credentials(mqtt, env.get("CREDENTIALS_DIRECTORY"))
    if tls is not None:
        update["tls"] = tls
    url = mqtt.broker
    field, path = "edge.mqtt_password_file", edge.mqtt_password_file
    if path is None and env.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME
        if candidate.is_file():
            field, path = "$CREDENTIALS_DIRECTORY", candidate
    if url.password is None and path is not None:
        try:
            password = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as err:
            raise ConfigError(field, path, f"cannot read it ({err.strerror})") from None
        if not password:
            # An empty file means "no password": `iotpipe edge flash` always writes the
            # credential, because the systemd unit's LoadCredential= needs the file to exist.
            return replace(mqtt, **update) if update else mqtt
        user = quote(url.username or device_identity(edge), safe="")
        update["url"] = (
            f"{url.scheme}://{user}:{quote(password, safe='')}@{url.host}:{url.port}{url.path}"
        )
    return replace(mqtt, **update) if update else mqtt


def _tls_from_credentials(mqtt: MqttSettings, directory: str | None) -> TlsSettings | None:
    """``[mqtt.tls]`` with the files it leaves unset taken from non-empty credentials, or None."""
    if not directory:
        return None
    found: dict[str, Path] = {}
    for name, credential in TLS_CREDENTIALS.items():
        path = Path(directory) / credential
        if getattr(mqtt.tls, name) is None and path.is_file() and path.stat().st_size > 0:
            found[name] = path
    return replace(mqtt.tls, **found) if found else None
