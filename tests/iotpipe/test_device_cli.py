"""``iotpipe device add|revoke|list`` against real brokers: after a revoke the device's next
connect is refused by the embedded broker and by a private Mosquitto reloaded with SIGHUP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from typer.testing import CliRunner

from bridge.broker import BrokerThread
from bridge.settings import BrokerSettings
from iotpipe.cli import app
from iotpipe.errors import ConnectError
from iotpipe.mqtt import MqttClient, pump_until
from iotpipe.settings import MqttSettings
from tests.conftest import MosquittoProcess, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]


def iotpipe(*args: str | Path) -> str:
    """Run ``iotpipe ARGS`` in-process; return its output (failing the test if it failed)."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def login(port: int, user: str, password: str, client_id: str) -> MqttClient:
    """A client connected to 127.0.0.1:port as ``user`` (raises ConnectError if refused)."""
    url = f"mqtt://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{port}"
    client = MqttClient(MqttSettings(url=url, client_id=client_id))
    client.connect(timeout=5)
    return client


def secret(path: Path) -> str:
    """The password ``iotpipe device add --out`` wrote."""
    return path.read_text().strip()


def dropped(client: MqttClient) -> bool:
    """Whether the broker has closed ``client``'s connection (pumps it once)."""
    try:
        client.pump(0.05)
    except ConnectError:
        return True
    return False


@pytest.mark.mqtt
def test_revoked_device_is_dropped_and_refused_by_the_embedded_broker(
    tmp_path: Path, unique: str
) -> None:
    """A rotation ends the connection made with the old password and refuses that password; a
    revoke ends the device's connection and refuses its next connect; other devices stay."""
    passwd = tmp_path / "broker.passwd"
    for device in ("pi-1", "pi-2"):
        out = iotpipe(
            "device", "add", f"{unique}/{device}", "--out", tmp_path / device,
            "--broker-password-file", passwd,
        )  # fmt: skip
        assert f"fresh password written to {tmp_path / device}" in out
        assert secret(tmp_path / device) not in out
    broker = BrokerThread(
        BrokerSettings(
            port=free_port(),
            http_port=0,
            password_file=passwd,
            acl_file=REPO / "configs" / "broker-acl.toml",
        )
    ).start()
    port = broker.settings.port
    try:
        old = secret(tmp_path / "pi-1")
        before = login(port, f"{unique}/pi-1", old, f"a-{unique}")
        other = login(port, f"{unique}/pi-2", secret(tmp_path / "pi-2"), f"o-{unique}")
        iotpipe("device", "add", f"{unique}/pi-1", "-o", tmp_path / "pi-1", "--broker-password-file", passwd)  # fmt: skip
        assert secret(tmp_path / "pi-1") != old
        wait_for(lambda: dropped(before), timeout=10, what="the old password's connection to end")
        with pytest.raises(ConnectError, match="Not authorized"):
            login(port, f"{unique}/pi-1", old, f"b-{unique}")
        device = login(port, f"{unique}/pi-1", secret(tmp_path / "pi-1"), f"c-{unique}")

        out = iotpipe("device", "revoke", f"{unique}/pi-1", "--broker-password-file", passwd)
        assert f"{unique}/pi-1: removed from {passwd}" in out
        wait_for(lambda: dropped(device), timeout=10, what="the revoked device's connection to end")
        with pytest.raises(ConnectError, match="Not authorized"):
            login(port, f"{unique}/pi-1", secret(tmp_path / "pi-1"), f"d-{unique}")
        assert not dropped(other)  # the rest of the fleet stays connected
        other.disconnect()
        login(port, f"{unique}/pi-2", secret(tmp_path / "pi-2"), f"e-{unique}").disconnect()
        listed = iotpipe("device", "list", "--broker-password-file", passwd)
        assert f"{unique}/pi-2" in listed
        assert f"{unique}/pi-1" not in listed
    finally:
        broker.stop()


@pytest.mark.mqtt
@pytest.mark.mosquitto
def test_revoked_device_is_dropped_and_refused_by_mosquitto(tmp_path: Path, unique: str) -> None:
    """revoke --reload-pid: Mosquitto re-reads its password file, drops the device and refuses it."""
    passwd = tmp_path / "mosquitto.passwd"
    for device in ("pi-1", "pi-2"):
        iotpipe(
            "device", "add", f"{unique}/{device}", "--out", tmp_path / device,
            "--mosquitto-password-file", passwd,
        )  # fmt: skip
    port = free_port()
    mosquitto = MosquittoProcess(
        tmp_path / "mosquitto",
        port,
        f"allow_anonymous false\npassword_file {passwd}\n"
        f"acl_file {REPO / 'configs' / 'mosquitto' / 'acl'}\n",
    )
    mosquitto.start()
    assert mosquitto.proc is not None
    try:
        with pytest.raises(ConnectError, match="Not authorized"):
            login(port, f"{unique}/pi-1", "wrong", f"x-{unique}")
        device = login(port, f"{unique}/pi-1", secret(tmp_path / "pi-1"), f"a-{unique}")
        other = login(port, f"{unique}/pi-2", secret(tmp_path / "pi-2"), f"b-{unique}")

        out = iotpipe(
            "device", "revoke", f"{unique}/pi-1", "--mosquitto-password-file", passwd,
            "--reload-pid", str(mosquitto.proc.pid),
        )  # fmt: skip
        assert f"sent SIGHUP to process {mosquitto.proc.pid}" in out

        wait_for(lambda: dropped(device), timeout=10, what="Mosquitto to drop the revoked device")
        with pytest.raises(ConnectError, match="Not authorized"):
            login(port, f"{unique}/pi-1", secret(tmp_path / "pi-1"), f"c-{unique}")
        assert not pump_until(other, lambda: not other.connected, timeout=0.5)
        assert other.connected  # the rest of the fleet stays
        other.disconnect()
    finally:
        mosquitto.stop()


def test_mistakes_are_one_line_and_exit_2(tmp_path: Path) -> None:
    """An unknown device, no file, a bad identity, a dead pid: one line on stderr, exit 2."""
    passwd = tmp_path / "passwd"
    passwd.write_text("home/pi-1:$7$101$x$y\n")
    cases = [
        (["revoke", "home/pi-9", "--broker-password-file", str(passwd)], "no such login"),
        (["revoke", "home/pi-1"], "--mosquitto-password-file"),
        (["revoke", "home/pi-1", "--broker-password-file", str(tmp_path / "nope")],
         "no such file"),
        (["add", "pi-1", "-o", str(tmp_path / "pw"), "--broker-password-file", str(passwd)],
         "SITE/DEVICE"),
        (["revoke", "home/pi-1", "--mosquitto-password-file", str(passwd),
          "--reload-pid", "999999999"], "no such process"),
    ]  # fmt: skip
    for args, message in cases:
        result = subprocess.run(
            [sys.executable, "-m", "iotpipe", "device", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "pw").exists()
    assert passwd.read_text() == "home/pi-1:$7$101$x$y\n"  # a failed command changed nothing
