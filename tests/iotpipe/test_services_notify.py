"""Each central service, run as a process against real brokers, talks systemd's sd_notify.

The test plays systemd: it binds a datagram socket, hands its name to the service in
``$NOTIFY_SOCKET`` with ``$WATCHDOG_USEC`` = 0.4 s, and reads ``READY=1``, then ``WATCHDOG=1``
every 0.2 s, then ``STOPPING=1`` after SIGTERM (and exit status 0). The watchdog's stall rule is
checked in-process: a loop that stops turning stops the pings.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pika  # type: ignore[import-untyped]
import pytest

from iotpipe.systemd_notify import Notifier
from iotpipe.watchdog import Liveness, Supervisor
from tests.conftest import BrokerInfo, free_port, wait_for

WATCHDOG_USEC = 400_000


class FakeSystemd:
    """The receiving end of ``$NOTIFY_SOCKET``: an abstract datagram socket and what arrived."""

    def __init__(self, name: str) -> None:
        self.address = f"@{name}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + name.encode())
        self.sock.setblocking(False)
        self.lines: list[str] = []

    def received(self) -> list[str]:
        """Every line so far (reads what is waiting first)."""
        while True:
            try:
                self.lines.extend(self.sock.recv(4096).decode().splitlines())
            except BlockingIOError:
                return self.lines

    def count(self, line: str) -> int:
        return self.received().count(line)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(unique: str) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(f"iotpipe-test-notify-{unique}")
    yield fake
    fake.close()


@pytest.fixture
def queues(rabbitmq_url: str) -> Iterator[list[str]]:
    """Queue names a test's service declares on the shared RabbitMQ; deleted afterwards."""
    names: list[str] = []
    yield names
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        channel = connection.channel()
        for name in names:
            channel.queue_delete(name)
    finally:
        connection.close()


#: A service's command line and environment, given the test's fixtures.
Command = Callable[[pytest.FixtureRequest, Path, str], tuple[list[str], dict[str, str]]]


def _broker(
    request: pytest.FixtureRequest, tmp: Path, unique: str
) -> tuple[list[str], dict[str, str]]:
    args = ["broker", "--port", str(free_port()), "--http-port", "0"]
    return args, {"IOTPIPE_BROKER__STATE_FILE": str(tmp / "broker.db")}


def _bridge(
    request: pytest.FixtureRequest, tmp: Path, unique: str
) -> tuple[list[str], dict[str, str]]:
    mqtt: BrokerInfo = request.getfixturevalue("mosquitto_broker")
    amqp: str = request.getfixturevalue("rabbitmq_url")
    args = ["bridge", "--spool", str(tmp / "spool.db"), "--http-port", "0"]
    return args, {
        "IOTPIPE_MQTT__URL": mqtt.url,
        "IOTPIPE_MQTT__CLIENT_ID": f"bridge-{unique}",
        "IOTPIPE_AMQP__URL": amqp,
    }


def _consume(
    request: pytest.FixtureRequest, tmp: Path, unique: str
) -> tuple[list[str], dict[str, str]]:
    amqp: str = request.getfixturevalue("rabbitmq_url")
    queue = f"test.{unique}.store"
    request.getfixturevalue("queues").append(queue)
    store = f"sqlite:///{tmp / 'telemetry.db'}"
    args = ["consume", "--queue", queue, "--store", store, "--http-port", "0"]
    return args, {"IOTPIPE_AMQP__URL": amqp, "IOTPIPE_CONSUME__RECEIPTS": "false"}


def _unpack(
    request: pytest.FixtureRequest, tmp: Path, unique: str
) -> tuple[list[str], dict[str, str]]:
    amqp: str = request.getfixturevalue("rabbitmq_url")
    queue = f"test.{unique}.uplink"
    request.getfixturevalue("queues").append(queue)
    args = ["unpack", "--queue", queue, "--http-port", "0"]
    return args, {"IOTPIPE_AMQP__URL": amqp, "IOTPIPE_UNPACK__SEEN_PATH": str(tmp / "packs.db")}


def _dashboard(
    request: pytest.FixtureRequest, tmp: Path, unique: str
) -> tuple[list[str], dict[str, str]]:
    store = f"sqlite:///{tmp / 'telemetry.db'}"
    return ["dashboard", "--store", store, "--port", "0"], {}


SERVICES: dict[str, Command] = {
    "broker": _broker,
    "bridge": _bridge,
    "consume": _consume,
    "unpack": _unpack,
    "dashboard": _dashboard,
}


@pytest.mark.parametrize("service", list(SERVICES))
def test_service_sends_ready_watchdog_and_stopping(
    service: str,
    request: pytest.FixtureRequest,
    systemd: FakeSystemd,
    tmp_path: Path,
    unique: str,
) -> None:
    """READY=1 once serving, WATCHDOG=1 every half WATCHDOG_USEC, STOPPING=1 on SIGTERM, exit 0."""
    args, extra = SERVICES[service](request, tmp_path, unique)
    env = {
        **os.environ,
        **extra,
        "NOTIFY_SOCKET": systemd.address,
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
    }
    env.pop("WATCHDOG_PID", None)
    env.pop("IOTPIPE_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "iotpipe", *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: systemd.count("READY=1") == 1, 30, f"{service}: READY=1")
        assert "WATCHDOG=1" not in systemd.lines[: systemd.lines.index("READY=1")]
        wait_for(lambda: systemd.count("WATCHDOG=1") >= 3, 10, f"{service}: 3 x WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(45) == 0, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert systemd.count("STOPPING=1") == 1
    assert systemd.received()[-1] == "STOPPING=1"


def test_a_stalled_loop_stops_the_pings(systemd: FakeSystemd) -> None:
    """Nothing before ready; pings while the loop turns, none once it stalls, again in a wait."""
    liveness = Liveness()
    # pings every 0.05 s while the loop turned within the last 0.1 s (WatchdogSec=)
    notifier = Notifier(environ={"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "100000"})
    supervisor = Supervisor(liveness, "test", notifier).start()
    turning = threading.Event()

    def loop() -> None:
        while turning.is_set():
            liveness.turn()
            time.sleep(0.01)  # the loop's own pace, not synchronisation

    try:
        assert _arrivals(systemd, 0.3) == [], "sent before the service was ready"
        turning.set()
        liveness.ready()
        threading.Thread(target=loop, daemon=True).start()
        wait_for(lambda: systemd.count("WATCHDOG=1") >= 3, 5, "pings while turning")
        turning.clear()
        wait_for(lambda: liveness.stalled_for() > 0.2, 5, "a stall past WatchdogSec")
        systemd.received()  # what was sent before the stall showed
        assert _arrivals(systemd, 0.4) == [], "pinged while the loop stalled"
        pings = systemd.count("WATCHDOG=1")
        with liveness.waiting():
            wait_for(lambda: systemd.count("WATCHDOG=1") > pings, 5, "pings in a declared wait")
    finally:
        turning.clear()
        supervisor.stop()
        supervisor.join()
    assert systemd.lines[:2] == ["READY=1", "STATUS=test running"]


def _arrivals(systemd: FakeSystemd, seconds: float) -> list[str]:
    """The lines that arrive within the next ``seconds`` (an observation window)."""
    before = len(systemd.received())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
    return systemd.received()[before:]
