"""The agent's pure parts: envelopes against the core codec, sd_notify, settings."""

from __future__ import annotations

import math
import os
import socket
import uuid
from pathlib import Path

import pytest

from edge.config import EdgeSettings, default_device, mqtt_settings
from edge.envelopes import build_envelope, sample_problem
from edge.sensors.base import Sample
from iotpipe.envelope import Envelope, Status, decode_status, decode_telemetry
from iotpipe.errors import ConfigError
from iotpipe.settings import MqttSettings, load
from iotpipe.systemd_notify import Notifier
from iotpipe.wire import encode_status

CONFIGS = Path(__file__).parents[2] / "configs"


def test_envelopes_satisfy_the_wire_contract() -> None:
    """What the agent builds decodes with the core codec, reading times and tags intact."""
    samples = [
        Sample("temperature", 21.5, "Cel", 1_700_000_000_000),
        Sample("door", True, None, 1_700_000_000_000),
        Sample("cpu.load1", 3, "1", 1_700_000_001_000),
        Sample("state", "ok", None, 1_700_000_002_000),
    ]
    payload = build_envelope(
        site="s1", device="pi-1", boot="b00t-1", seq=7, samples=samples, tags={"clock": "unsynced"}
    )
    env = decode_telemetry(payload, "iotpipe/v1/s1/pi-1/telemetry")
    assert isinstance(env, Envelope)
    assert (env.id, env.seq, env.boot, env.ts) == ("b00t-1-7", 7, "b00t-1", 1_700_000_000_000)
    assert [r.time_ms(env) for r in env.readings] == [s.ts_ms for s in samples]
    assert [r.value for r in env.readings] == [21.5, True, 3, "ok"]
    assert env.tags == {"clock": "unsynced"}
    status = decode_status(
        encode_status(site="s1", device="pi-1", state="offline", ts=5, agent="a/1"),
        "iotpipe/v1/s1/pi-1/status",
    )
    assert isinstance(status, Status)
    assert status.state == "offline"


@pytest.mark.parametrize(
    ("sample", "problem"),
    [
        (Sample("bad name", 1.0, None, 0), "sensor name"),
        (Sample("t", math.nan, None, 0), "finite"),
        (Sample("t", math.inf, None, 0), "finite"),
        (Sample("t", "x" * 257, None, 0), "257 characters"),
        (Sample("t", 2**63, None, 0), "64 bits"),
        (Sample("t", 1.0, "x" * 17, 0), "unit"),
        (Sample("t", 1.0, None, -1), "epoch"),
        (Sample("t", None, None, 0), "not a number"),  # type: ignore[arg-type]
    ],
)
def test_samples_the_contract_refuses_are_named(sample: Sample, problem: str) -> None:
    """A reading that would make the bridge dead-letter its envelope is caught first."""
    assert problem in (sample_problem(sample, set()) or "")


def test_good_samples_pass() -> None:
    """Numbers, booleans, strings and units within the limits are fine."""
    known: set[str] = set()
    for value in (1.5, -3, True, "x" * 256, 2**63 - 1):
        assert sample_problem(Sample("cpu.load1", value, "Cel", 1), known) is None
    assert known == {"cpu.load1"}


def test_sd_notify_reaches_an_abstract_socket() -> None:
    """READY, WATCHDOG and STOPPING arrive as datagrams on an '@' (abstract) NOTIFY_SOCKET."""
    name = f"iotpipe-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(b"\0" + name.encode())
        server.settimeout(5)
        notifier = Notifier(environ={"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "3000000"})
        assert notifier.enabled
        assert notifier.watchdog_interval == 1.5
        assert notifier.ready("up")
        assert notifier.watchdog()
        assert notifier.stopping()
        notifier.close()
        got = [server.recv(4096) for _ in range(3)]
    assert got == [b"READY=1\nSTATUS=up", b"WATCHDOG=1", b"STOPPING=1"]


def test_sd_notify_is_off_outside_systemd_and_for_other_pids() -> None:
    """No NOTIFY_SOCKET: nothing is sent; WATCHDOG_PID of another process: no pings."""
    assert not Notifier(environ={}).ready()
    other = Notifier(
        environ={"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    )
    assert other.watchdog_interval is None or os.getpid() == 1


def test_settings_validate_names_and_default_the_device() -> None:
    """A bad site is refused naming the field; the device defaults to the sanitised host name."""
    with pytest.raises(ConfigError, match=r"edge\.site"):
        load(EdgeSettings, "edge", overrides={"site": "a/b"}, environ={})
    with pytest.raises(ConfigError, match=r"edge\.site"):
        load(EdgeSettings, "edge", environ={})
    settings = load(EdgeSettings, "edge", overrides={"site": "home"}, environ={})
    assert settings.device_name == default_device()
    assert settings.outbox_path.name == "outbox.db"


def test_the_mqtt_password_comes_from_a_systemd_credential(tmp_path: Path) -> None:
    """$CREDENTIALS_DIRECTORY/mqtt-password fills in the URL's password; client id is fixed."""
    (tmp_path / "mqtt-password").write_text("s3cr:t/\n")
    edge = EdgeSettings(site="home", device="pi1")
    mqtt = mqtt_settings(
        MqttSettings(url="mqtt://pi@broker:1883"),
        edge,
        environ={"CREDENTIALS_DIRECTORY": str(tmp_path)},
    )
    url = mqtt.broker
    assert url.username == "pi"
    assert url.password is not None
    assert url.password.get_secret_value() == "s3cr:t/"
    assert mqtt.client_id == "iotpipe-edge-home-pi1"
    # No user in the URL: the device logs in as its identity, {site}/{device}.
    anonymous = mqtt_settings(
        MqttSettings(url="mqtt://broker"),
        edge,
        environ={"CREDENTIALS_DIRECTORY": str(tmp_path)},
    ).broker
    assert anonymous.username == "home/pi1"
    assert anonymous.password is not None
    assert anonymous.password.get_secret_value() == "s3cr:t/"


def test_an_empty_password_credential_means_no_password(tmp_path: Path) -> None:
    """`iotpipe edge flash` always writes the credential file; empty means anonymous."""
    (tmp_path / "mqtt-password").write_text("")
    edge = EdgeSettings(site="home", device="pi1")
    mqtt = mqtt_settings(
        MqttSettings(url="mqtt://broker:1883"),
        edge,
        environ={"CREDENTIALS_DIRECTORY": str(tmp_path)},
    )
    assert mqtt.broker.password is None
    assert mqtt.broker.username is None


def test_the_example_config_loads() -> None:
    """configs/edge.toml is valid as shipped."""
    path = CONFIGS / "edge.toml"
    settings = load(EdgeSettings, "edge", config_file=path, environ={})
    load(MqttSettings, "mqtt", config_file=path, environ={})
    assert settings.site
    assert settings.sensors
