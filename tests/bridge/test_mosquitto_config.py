"""configs/mosquitto: the production Mosquitto config and ACL, run for real in a private instance."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from iotpipe.errors import ConnectError
from iotpipe.mqtt import Message, MqttClient, Will, pump_until
from iotpipe.settings import MqttSettings, TlsSettings
from tests.bridge.conftest import CONFIGS, password_of
from tests.conftest import free_port, wait_for, wait_port

pytestmark = [pytest.mark.mqtt, pytest.mark.mosquitto]

USERS = ("home/dev1", "home/dev2", "bridge")


@dataclass
class PrivateMosquitto:
    """The shipped config, started on private ports with its paths moved into a temporary directory."""

    port: int
    tls_port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start ``mosquitto -c`` with the rewritten config; fail the test with its log if it dies."""
        log = (self.workdir / "stderr.log").open("ab")
        self.proc = proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.workdir / "mosquitto.conf")], stderr=log, stdout=log
        )
        log.close()
        wait_for(
            lambda: proc.poll() is not None or _accepting(self.port), what="mosquitto to start"
        )
        if proc.poll() is not None:
            pytest.fail(f"mosquitto did not start:\n{(self.workdir / 'stderr.log').read_text()}")
        wait_port(self.tls_port)

    def stop(self) -> int:
        """SIGTERM (a clean stop, which saves the database); return the exit code."""
        if self.proc is None:
            return 0
        self.proc.terminate()
        code = self.proc.wait(timeout=10)
        self.proc = None
        return code

    @property
    def ca_file(self) -> Path:
        """The self-signed certificate clients trust for the TLS listener."""
        return self.workdir / "server.crt"

    def client(self, username: str | None, *, tls: bool = False, **kwargs: Any) -> MqttClient:
        """A client logged in as ``username`` (its test password), over TLS if asked."""
        auth = (
            f"{quote(username, safe='')}:{quote(password_of(username), safe='')}@"
            if username
            else ""
        )
        if tls:
            settings = MqttSettings(
                url=f"mqtts://{auth}127.0.0.1:{self.tls_port}",
                tls=TlsSettings(ca_file=self.ca_file),
            )
        else:
            settings = MqttSettings(url=f"mqtt://{auth}127.0.0.1:{self.port}")
        return MqttClient(settings, **kwargs)


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _rewrite(config: str, replacements: dict[str, str]) -> str:
    """Replace the value of each ``key value`` line named in ``replacements`` (each must occur)."""
    seen: set[str] = set()
    lines = []
    for line in config.splitlines():
        key = line.split(" ", 1)[0]
        if key in replacements and not line.startswith("#"):
            lines.append(f"{key} {replacements[key]}")
            seen.add(key)
        elif line.startswith("listener "):
            lines.append(line)  # handled below
        else:
            lines.append(line)
    missing = set(replacements) - seen
    assert not missing, f"the sample config no longer sets {sorted(missing)}"
    return "\n".join(lines) + "\n"


@pytest.fixture
def private_mosquitto() -> Iterator[PrivateMosquitto]:
    """configs/mosquitto/iotpipe.conf + acl on free ports, with a mosquitto_passwd file and a test certificate."""
    for tool in ("mosquitto", "mosquitto_passwd", "openssl"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run `make setup`")
    # Not under pytest's tmp_path: its parents are private to root, and Mosquitto drops root for
    # the `mosquitto` user, which must reach the files and own the data directory.
    work = Path(tempfile.mkdtemp(prefix="iotpipe-mosquitto-"))
    try:
        yield from _run_mosquitto(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_mosquitto(work: Path) -> Iterator[PrivateMosquitto]:
    passwd = work / "passwd"
    for index, username in enumerate(USERS):
        create = ["-c"] if index == 0 else []
        subprocess.run(
            ["mosquitto_passwd", *create, "-b", str(passwd), username, password_of(username)],
            check=True,
        )
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(work / "server.key"), "-out", str(work / "server.crt"),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    shutil.copy(CONFIGS / "mosquitto" / "acl", work / "acl")

    port, tls_port = free_port(), free_port()
    config = _rewrite(
        (CONFIGS / "mosquitto" / "iotpipe.conf").read_text(),
        {
            "pid_file": str(work / "mosquitto.pid"),
            "password_file": str(passwd),
            "acl_file": str(work / "acl"),
            "persistence_location": f"{work}/",
            "cafile": str(work / "server.crt"),
            "certfile": str(work / "server.crt"),
            "keyfile": str(work / "server.key"),
        },
    )
    assert re.search(r"^listener 1883$", config, re.M)
    assert re.search(r"^listener 8883$", config, re.M)
    config = re.sub(r"^listener 1883$", f"listener {port} 127.0.0.1", config, flags=re.M)
    config = re.sub(r"^listener 8883$", f"listener {tls_port} 127.0.0.1", config, flags=re.M)
    conf = work / "mosquitto.conf"
    conf.write_text(config)
    for path in (work, *work.iterdir()):
        shutil.chown(path, "mosquitto", "mosquitto")

    broker = PrivateMosquitto(port, tls_port, work)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_devices_publish_only_under_their_own_prefix(
    private_mosquitto: PrivateMosquitto, unique: str
) -> None:
    """With the shipped config and ACL, a device's own topics reach the bridge and another device's do not."""
    got: list[Message] = []
    bridge = private_mosquitto.client("bridge", client_id=f"bridge-{unique}", on_message=got.append)
    bridge.connect()
    bridge.subscribe([("iotpipe/#", 1)])
    device = private_mosquitto.client("home/dev1", client_id=f"dev1-{unique}")
    device.connect()
    device.publish("iotpipe/v1/home/dev2/telemetry", b"forged", qos=1)
    device.publish("iotpipe/v1/home/dev1/telemetry", b"mine", qos=1)
    assert device.flush(timeout=10)
    assert device.acknowledged == 2, "Mosquitto acknowledges the denied publish too"
    # One client's messages are handled in order: the forged one would have arrived first.
    assert pump_until(bridge, lambda: len(got) >= 1, timeout=10)
    assert [(m.topic, m.payload) for m in got] == [("iotpipe/v1/home/dev1/telemetry", b"mine")]
    device.disconnect()
    bridge.disconnect()


def test_anonymous_and_unknown_clients_are_refused(
    private_mosquitto: PrivateMosquitto, unique: str
) -> None:
    """allow_anonymous false and the password file: no username or a wrong password is refused."""
    with pytest.raises(ConnectError, match="Not authorized"):
        private_mosquitto.client(None, client_id=f"anon-{unique}").connect(timeout=5)
    intruder = MqttClient(
        MqttSettings(url=f"mqtt://bridge:wrong@127.0.0.1:{private_mosquitto.port}"),
        client_id=f"bad-{unique}",
    )
    with pytest.raises(ConnectError, match="Not authorized"):
        intruder.connect(timeout=5)


def test_devices_read_nothing(private_mosquitto: PrivateMosquitto, unique: str) -> None:
    """The device pattern grants write only: Mosquitto grants the SUBACK but delivers a device nothing."""
    seen_by_device: list[Message] = []
    device = private_mosquitto.client(
        "home/dev1", client_id=f"dev1-{unique}", on_message=seen_by_device.append
    )
    device.connect()
    device.subscribe([("iotpipe/#", 1)])  # Mosquitto checks read access per message, not here
    seen_by_bridge: list[Message] = []
    bridge = private_mosquitto.client(
        "bridge", client_id=f"bridge-{unique}", on_message=seen_by_bridge.append
    )
    bridge.connect()
    bridge.subscribe([("iotpipe/#", 1)])
    other = private_mosquitto.client("home/dev2", client_id=f"dev2-{unique}")
    other.connect()
    other.publish("iotpipe/v1/home/dev2/telemetry", b"not for dev1", qos=1)
    assert other.flush(timeout=10)
    assert pump_until(bridge, lambda: len(seen_by_bridge) >= 1, timeout=10)
    # Mosquitto fanned the message out before it handles this SUBSCRIBE, and one connection is
    # ordered: anything delivered to the device would arrive before this SUBACK.
    device.subscribe([(f"unused/{unique}", 1)])
    assert seen_by_device == []
    for c in (other, bridge, device):
        c.disconnect()


def test_tls_listener_serves_devices(private_mosquitto: PrivateMosquitto, unique: str) -> None:
    """The 8883 listener speaks TLS with the configured certificate and applies the same ACL."""
    got: list[Message] = []
    bridge = private_mosquitto.client("bridge", client_id=f"bridge-{unique}", on_message=got.append)
    bridge.connect()
    bridge.subscribe([("iotpipe/#", 1)])
    device = private_mosquitto.client("home/dev2", tls=True, client_id=f"dev2-{unique}")
    device.connect()
    device.publish("iotpipe/v1/home/dev2/telemetry", b"over tls", qos=1)
    assert device.flush(timeout=10)
    assert pump_until(bridge, lambda: len(got) >= 1, timeout=10)
    assert got[0].payload == b"over tls"
    device.disconnect()
    bridge.disconnect()


def test_queued_messages_survive_a_clean_restart(
    private_mosquitto: PrivateMosquitto, unique: str
) -> None:
    """persistence + persistence_location: a message queued for the offline bridge survives a restart."""
    bridge_id = f"bridge-{unique}"
    bridge = private_mosquitto.client("bridge", client_id=bridge_id, clean_session=False)
    bridge.connect()
    bridge.subscribe([("iotpipe/#", 1)])
    bridge.disconnect()
    device = private_mosquitto.client("home/dev1", client_id=f"dev1-{unique}")
    device.connect()
    device.publish("iotpipe/v1/home/dev1/telemetry", b"queued", qos=1)
    assert device.flush(timeout=10)
    device.disconnect()

    assert private_mosquitto.stop() == 0
    assert (private_mosquitto.workdir / "mosquitto.db").exists()
    private_mosquitto.start()

    got: list[Message] = []
    back = private_mosquitto.client(
        "bridge", client_id=bridge_id, clean_session=False, on_message=got.append
    )
    back.connect()
    assert back.session_present
    assert pump_until(back, lambda: len(got) >= 1, timeout=10)
    assert [m.payload for m in got] == [b"queued"]
    back.disconnect()


def _vanish(broker: PrivateMosquitto, username: str, client_id: str, will: Will) -> None:
    """Connect with a last will, then drop the TCP connection without DISCONNECT."""
    private = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv311,
    )
    private.username_pw_set(username, password_of(username))
    private.will_set(will.topic, will.payload, will.qos, will.retain)
    connected: list[bool] = []
    private.on_connect = lambda *_args: connected.append(True)
    private.connect("127.0.0.1", broker.port)

    def up() -> bool:
        private.loop(timeout=0.05)
        return bool(connected)

    wait_for(up, what=f"{client_id} to connect")
    sock = private.socket()
    assert sock is not None
    sock.close()
    # Mosquitto decides about the will as it notices the disconnect, which it logs.
    log = broker.workdir / "stderr.log"
    wait_for(
        lambda: f"Client {client_id} closed its connection" in log.read_text(),
        what="the disconnect",
    )


def test_a_will_on_another_devices_topic_is_dropped(
    private_mosquitto: PrivateMosquitto, unique: str
) -> None:
    """Mosquitto accepts a forged last will at CONNECT but drops it on disconnect; the device's own will is sent."""
    got: list[Message] = []
    bridge = private_mosquitto.client("bridge", client_id=f"bridge-{unique}", on_message=got.append)
    bridge.connect()
    bridge.subscribe([("iotpipe/#", 1)])
    _vanish(
        private_mosquitto,
        "home/dev1",
        f"forger-{unique}",
        Will("iotpipe/v1/home/dev2/status", b"forged", retain=False),
    )
    _vanish(
        private_mosquitto,
        "home/dev1",
        f"honest-{unique}",
        Will("iotpipe/v1/home/dev1/status", b"own", retain=False),
    )
    assert pump_until(bridge, lambda: len(got) >= 1, timeout=10)
    bridge.subscribe([(f"unused/{unique}", 1)])  # a round trip: anything else queued comes first
    assert [(m.topic, m.payload) for m in got] == [("iotpipe/v1/home/dev1/status", b"own")]
    bridge.disconnect()
