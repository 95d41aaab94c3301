"""Shared fixtures: real MQTT brokers on free ports, unique topics, waiting with deadlines.

Brokers are real: amqtt runs in-process on a private port (in its own thread and event loop),
and Mosquitto runs as a private process with its own port and data directory. Tests never kill
or reconfigure the machine's shared brokers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["tests.fixtures_replay", "tests.tlsca", "tests.rabbitmq", "tests.victoria"]

#: How tests run the ``iotpipe`` command as a subprocess. ``IOTPIPE_CLI`` names an installed
#: ``iotpipe`` executable (CI: the wheel installed into a clean venv, so a file missing from the
#: package fails there); without it, the code of this checkout.
IOTPIPE: list[str] = (
    [os.environ["IOTPIPE_CLI"]]
    if os.environ.get("IOTPIPE_CLI")
    else [sys.executable, "-c", "from iotpipe.cli import main; main()"]
)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Show a failure with the garbage collector paused, so no finalizer runs inside pytest's parse.

    pytest calls ``ast.parse`` on the test's source to show where it failed. A garbage collection
    inside it runs whatever finalizers are due; when one of them formats a traceback (asyncio
    reporting an exception nobody read, pytest's own unraisable-exception hook), that calls
    ``ast.parse`` again, and CPython 3.11 then fails the outer parse with ``SystemError: AST
    constructor recursion depth mismatch``, an INTERNALERROR that ends the run. With collection
    paused, building the AST runs no Python code, so nothing can nest in it or interleave with it.
    """
    if call.excinfo is None or not gc.isenabled():
        return (yield)
    gc.disable()
    try:
        return (yield)
    finally:
        gc.enable()


@pytest.fixture(autouse=True)
def _no_logging_to_closed_streams() -> Iterator[None]:
    """Drop root-logger handlers whose stream was closed during the test.

    A command run in-process (typer's ``CliRunner``) sets up logging on the stderr it was
    given, which the runner closes afterwards; left on the root logger, that handler makes every
    later log record print a "Logging error" traceback, and when that happens in a finalizer
    inside ``ast.parse`` CPython 3.11 fails the parse (see tests/test_interpreter.py).
    """
    yield
    root = logging.getLogger()
    for handler in root.handlers[:]:
        stream = getattr(handler, "stream", None)
        if stream is not None and getattr(stream, "closed", False):
            root.removeHandler(handler)


#: Ports handed out by :func:`free_port`: below Linux's ephemeral range (32768-60999), so no
#: ``bind(0)`` of a server started meanwhile and no outgoing connection can take one before the
#: process it was meant for binds it (an edge agent's fixed HTTP port once lost that race).
_FIXED_PORTS = range(20_000, 32_768)
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 and was not handed out before in this run."""
    while True:
        port = random.choice(_FIXED_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""

    def accepting() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_for(accepting, timeout, f"port {port} to accept connections")


@dataclass
class BrokerInfo:
    """A running MQTT broker for one test."""

    name: str
    url: str
    port: int


class AmqttThread:
    """amqtt running in a background thread with its own event loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        from bridge.broker import report_loop_error

        self.loop = asyncio.new_event_loop()
        # Plain amqtt, but its loop reports errors like iotpipe's broker (see report_loop_error).
        self.loop.set_exception_handler(report_loop_error)
        self.broker: Any = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="amqtt", daemon=True)

    def start(self) -> None:
        from amqtt.broker import Broker

        self._thread.start()

        async def _start() -> None:
            self.broker = Broker(self.config)
            await self.broker.start()

        asyncio.run_coroutine_threadsafe(_start(), self.loop).result(timeout=15)

    def stop(self) -> None:
        if self.broker is not None:
            asyncio.run_coroutine_threadsafe(self.broker.shutdown(), self.loop).result(timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


def amqtt_config(port: int, *, allow_anonymous: bool = True) -> dict[str, Any]:
    """A minimal explicit amqtt config bound to loopback (its default binds 0.0.0.0:1883)."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": allow_anonymous}
        },
    }


class MosquittoProcess:
    """A private Mosquitto with its own port, config and data directory."""

    def __init__(self, workdir: Path, port: int, extra_config: str = "") -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        # As root, Mosquitto drops to the `mosquitto` user, which cannot enter pytest's private
        # tmp dirs; a private test instance may keep running as root instead.
        as_root = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            as_root + f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            f"log_dest file {workdir}/mosquitto.log\n"
            "max_queued_messages 0\n"
            f"{extra_config}"
        )

    def start(self) -> None:
        # It logs to a file; its stdout must not hold the test runner's pipe open.
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class EmbeddedBrokerProcess:
    """A private ``iotpipe broker`` process keeping its state in ``workdir`` (MosquittoProcess's API)."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "broker.log"

    def start(self) -> None:
        argv = [sys.executable, "-m", "iotpipe", "--log-level", "info", "broker"]
        argv += ["--port", str(self.port), "--http-port", "0"]
        argv += ["--state-file", str(self.workdir / "broker-state.db")]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port)

    def stop(self) -> None:
        """SIGTERM: a clean stop, which saves the state file."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@contextlib.contextmanager
def running_broker(kind: str, workdir: Path) -> Iterator[BrokerInfo]:
    """Start a private broker of ``kind`` on a free port for the duration of the block.

    ``amqtt`` is iotpipe's embedded broker (``iotpipe broker``) in-process; ``mosquitto`` is a
    private Mosquitto process with its data in ``workdir``.
    """
    port = free_port()
    if kind == "amqtt":
        from bridge.broker import BrokerThread
        from bridge.settings import BrokerSettings

        runner = BrokerThread(BrokerSettings(port=port)).start()
        try:
            yield BrokerInfo("amqtt", f"mqtt://127.0.0.1:{port}", port)
        finally:
            runner.stop()
        return
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed: run `make setup` (apt-get install mosquitto)")
    process = MosquittoProcess(workdir, port)
    process.start()
    try:
        yield BrokerInfo("mosquitto", f"mqtt://127.0.0.1:{port}", port)
    finally:
        process.stop()


@pytest.fixture
def amqtt_broker(tmp_path: Path) -> Iterator[BrokerInfo]:
    """iotpipe's embedded amqtt broker, in-process on a free port."""
    with running_broker("amqtt", tmp_path) as info:
        yield info


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[BrokerInfo]:
    """A private Mosquitto instance on a free port (needs the ``mosquitto`` binary)."""
    with running_broker("mosquitto", tmp_path / "mosquitto") as info:
        yield info


@pytest.fixture(params=["amqtt", "mosquitto"])
def mqtt_broker(request: pytest.FixtureRequest) -> BrokerInfo:
    """Each test using this runs twice: against in-process amqtt and a private Mosquitto."""
    fixture = "amqtt_broker" if request.param == "amqtt" else "mosquitto_broker"
    info: BrokerInfo = request.getfixturevalue(fixture)
    return info


@pytest.fixture
def unique() -> str:
    """A short unique token for topics, client ids and queue names of one test."""
    return uuid.uuid4().hex[:10]


SHARED_MOSQUITTO = ("127.0.0.1", 1883)


@pytest.fixture(scope="session", autouse=True)
def no_retained_capability_on_the_shared_broker() -> None:
    """The shared Mosquitto starts the session without a retained pipeline capability.

    A bridge (receipts on) pointed at the shared broker by an earlier run, or by hand, leaves
    ``iotpipe/v1/pipeline`` retained there; simulators and agents in ``auto`` mode would then
    wait for receipts nothing sends. Tests that want a capability publish it on a private broker.
    """
    from iotpipe.mqtt import MqttClient
    from iotpipe.receipts import CAPABILITY_TOPIC
    from iotpipe.settings import MqttSettings

    host, port = SHARED_MOSQUITTO
    with contextlib.closing(socket.socket()) as probe:
        probe.settimeout(1.0)
        if probe.connect_ex((host, port)) != 0:
            return  # no shared broker: nothing retained there
    client = MqttClient(
        MqttSettings(url=f"mqtt://{host}:{port}", client_id=f"t-{uuid.uuid4().hex[:8]}")
    )
    client.connect(timeout=5.0)
    try:
        client.publish(CAPABILITY_TOPIC, b"", qos=1, retain=True)
        assert client.flush(timeout=5.0), "the shared Mosquitto did not acknowledge"
    finally:
        client.disconnect()
