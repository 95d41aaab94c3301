"""Settings of the edge agent: the ``[edge]`` section, and the MQTT password from a file.

Loaded like every iotpipe section (:func:`iotpipe.settings.load`): defaults, then the TOML
file's ``[edge]`` table, then ``IOTPIPE_EDGE__<FIELD>`` variables. ``configs/edge.toml`` is the
commented example of every option.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote

from pydantic import AfterValidator, Field

from edge.sensors import SensorConfig
from iotpipe import __version__
from iotpipe.errors import ConfigError
from iotpipe.settings import MqttSettings, Section
from iotpipe.topics import is_valid_name

__all__ = ["AGENT", "EdgeSettings", "default_device", "default_state_dir", "mqtt_settings"]

#: The ``agent`` field of our status messages.
AGENT = f"iotpipe-edge/{__version__}"

#: systemd's ``LoadCredential=mqtt-password:...`` puts the secret in this file of
#: ``$CREDENTIALS_DIRECTORY``.
CREDENTIAL_NAME = "mqtt-password"

_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def default_device() -> str:
    """The host name, made a valid device name (other characters become ``-``, 64 at most)."""
    name = _BAD_NAME_CHARS.sub("-", socket.gethostname().split(".")[0]).strip("-")[:64]
    return name or "device"


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``), else ``/var/lib/iotpipe-edge``."""
    from_systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(from_systemd) if from_systemd else Path("/var/lib/iotpipe-edge")


def _name(value: str) -> str:
    if value and not is_valid_name(value):
        raise ValueError("must be 1-64 characters of A-Z a-z 0-9 _ - (wire contract)")
    return value


def _tags(value: dict[str, str]) -> dict[str, str]:
    if len(value) > 15:
        raise ValueError("at most 15 tags (the contract allows 16; the agent may add 'clock')")
    if "clock" in value:
        raise ValueError("'clock' is set by the agent while the clock is not synchronised")
    return value


class EdgeSettings(Section):
    """The ``[edge]`` section."""

    site: Annotated[str, AfterValidator(_name)] = Field(
        ..., description="site name in the topic (required)"
    )
    device: Annotated[str, AfterValidator(_name)] = Field(
        "", description="device name in the topic; empty = the host name, sanitised"
    )
    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="directory of outbox.db ($STATE_DIRECTORY, else /var/lib/iotpipe-edge)",
    )
    batch_max_readings: int = Field(100, ge=1, le=1000, description="readings per envelope at most")
    batch_max_delay: float = Field(
        5.0, gt=0, le=3600, description="seconds a reading may wait for its envelope"
    )
    commit_max_delay: float = Field(
        1.0, ge=0, le=60, description="seconds a sealed envelope may wait for its group commit"
    )
    commit_max_envelopes: int = Field(
        50, ge=1, le=10_000, description="commit at once when this many envelopes wait"
    )
    durability: Literal["fsync", "process"] = Field(
        "fsync", description="fsync: commits survive power loss; process: a crash only"
    )
    outbox_max_bytes: int = Field(
        64 * 1024 * 1024, ge=64 * 1024, description="outbox budget; beyond it old data is thinned"
    )
    drain_rate: float = Field(50.0, gt=0, description="envelopes published per second at most")
    window: int = Field(100, ge=1, le=10_000, description="unacknowledged publishes at most")
    ack_timeout: float = Field(
        30.0, gt=0, description="seconds without PUBACK before the connection is renewed"
    )
    reconnect_min: float = Field(0.5, gt=0, description="first reconnect delay, seconds")
    reconnect_max: float = Field(60.0, gt=0, description="longest reconnect delay, seconds")
    stop_timeout: float = Field(
        5.0, ge=0, le=300, description="seconds SIGTERM waits for the backlog and PUBACKs"
    )
    clock_sync_files: list[Path] = Field(
        [Path("/run/systemd/timesync/synchronized")],
        description="the clock counts as synchronised while any exists; [] = always",
    )
    boot_id_path: Path = Field(
        Path("/proc/sys/kernel/random/boot_id"), description="the kernel's boot id"
    )
    tags: Annotated[dict[str, str], AfterValidator(_tags)] = Field(
        default_factory=dict, description="labels added to every envelope"
    )
    http_host: str = Field("127.0.0.1", description="address of /metrics and /healthz")
    http_port: int = Field(9183, ge=0, le=65535, description="port of /metrics; 0 = off")
    stats_interval: float = Field(
        60.0, gt=0, description="seconds between backlog log lines and fill estimates"
    )
    mqtt_password_file: Path | None = Field(
        None, description="file holding the MQTT password (default: systemd credential)"
    )
    sensors: list[SensorConfig] = Field(default_factory=list, description="[[edge.sensors]]")

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

    Raises:
        ConfigError: the password file cannot be read, or the URL has no user name for it.
    """
    env = os.environ if environ is None else environ
    update: dict[str, str] = {}
    if not mqtt.client_id:
        update["client_id"] = f"iotpipe-edge-{edge.site}-{edge.device_name}"[:64]
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
            return mqtt.model_copy(update=update) if update else mqtt
        if not url.username:
            raise ConfigError("mqtt.url", url.redacted(), "needs a user name for the password")
        user = quote(url.username, safe="")
        update["url"] = (
            f"{url.scheme}://{user}:{quote(password, safe='')}@{url.host}:{url.port}{url.path}"
        )
    return mqtt.model_copy(update=update) if update else mqtt
