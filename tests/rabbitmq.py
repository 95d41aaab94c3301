"""RabbitMQ for tests: the machine's shared broker, and private nodes that tests may kill.

A pytest plugin (``pytest_plugins = [..., "tests.rabbitmq"]`` in ``tests/conftest.py``) with:

``rabbitmq_url``
    The shared broker, ``amqp://guest:guest@127.0.0.1:5672/`` (or ``$IOTPIPE_TEST_AMQP_URL``).
    Tests only declare uniquely named exchanges and queues on it, and delete them again; they
    never stop, kill or reconfigure it.
``private_rabbit``
    A :class:`PrivateRabbit`: a RabbitMQ node of its own (own node name, ports, data, logs and
    Erlang cookie) that a test may stop, SIGKILL and start again on the same data. Killed at
    teardown whatever happened. Starting one takes several seconds: mark such tests ``slow``.
:class:`PrivateCluster`
    Three (or more) private nodes sharing one cookie of their own, joined into a cluster; for a
    module-scoped fixture (see ``tests/e2e/test_cluster_faults.py``).

The private node runs the ``rabbitmq-server`` script directly as the current user, not through
Debian's ``/usr/sbin`` wrapper (which switches to the ``rabbitmq`` user, writes its logs under
``/var/log`` and uses the shared node's cookie). Its ``$HOME`` is a private directory holding a
fresh ``.erlang.cookie``, so the node and the ``rabbitmqctl`` calls made by :meth:`PrivateRabbit.ctl`
share a cookie that neither the shared node nor anyone else knows.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pika  # type: ignore[import-untyped]
import pytest

from iotpipe.amqp import describe_error
from iotpipe.settings import AmqpSettings
from tests.conftest import free_port
from tests.tlsca import ServerTls

SHARED_URL = "amqp://guest:guest@127.0.0.1:5672/"
URL_ENV = "IOTPIPE_TEST_AMQP_URL"

#: Where Debian keeps the real scripts (``/usr/sbin/rabbitmq-*`` are ``su`` wrappers around them).
_DEBIAN_BIN = Path("/usr/lib/rabbitmq/bin")


def rabbitmq_bin() -> Path | None:
    """The directory holding the real ``rabbitmq-server`` and ``rabbitmqctl`` scripts, if any."""
    if (_DEBIAN_BIN / "rabbitmq-server").is_file():
        return _DEBIAN_BIN
    found = shutil.which("rabbitmq-server")
    if found is None:
        return None
    path = Path(found).resolve()
    return None if path.name == "rabbitmq-script-wrapper" else path.parent


class PrivateRabbit:
    """A private RabbitMQ node on free loopback ports with its data under ``workdir``.

    Attributes:
        name: the Erlang node name, ``iotpipe-test-<hex>@localhost``.
        port: its AMQP port.
        dist_port: its Erlang distribution port.
        mqtt_port: its MQTT port, when started with the MQTT plugin (else None).
        tls_port: its AMQPS port, when made with ``tls`` (else None).
        start_seconds: how long each :meth:`start` took, in order.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        mqtt: bool = False,
        mqtt_port: int | None = None,
        tls: ServerTls | None = None,
        name: str | None = None,
        cookie: str | None = None,
        schedulers: int | None = None,
    ) -> None:
        """``name``: the node name (default ``iotpipe-test-<hex>@localhost``); ``cookie``: its
        Erlang cookie (default a fresh one; cluster nodes share one); ``schedulers``: Erlang
        scheduler threads (``+S N:N``; default one per core; several nodes on 2 cores want 1)."""
        binaries = rabbitmq_bin()
        if binaries is None:
            raise RuntimeError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        self.bin = binaries
        self.workdir = workdir
        self.name = name or f"iotpipe-test-{secrets.token_hex(4)}@localhost"
        self.schedulers = schedulers
        self.port = free_port()
        self.dist_port = free_port()
        self.mqtt_port = (mqtt_port or free_port()) if mqtt or mqtt_port else None
        self.start_seconds: list[float] = []
        self.proc: subprocess.Popen[bytes] | None = None

        self.home = workdir / "home"
        self.mnesia = workdir / "mnesia"
        self.logs = workdir / "log"
        for directory in (self.home, self.mnesia, self.logs):
            directory.mkdir(parents=True, exist_ok=True)
        cookie_text, cookie = cookie, self.home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(cookie_text or secrets.token_hex(16).upper())
            cookie.chmod(0o400)  # Erlang refuses a cookie others can read
        config = [f"listeners.tcp.1 = 127.0.0.1:{self.port}"]
        plugins = []
        if self.mqtt_port is not None:
            plugins.append("rabbitmq_mqtt")
            config.append(f"mqtt.listeners.tcp.1 = 127.0.0.1:{self.mqtt_port}")
        self.tls_port = free_port() if tls is not None else None
        if tls is not None:
            # Clients with a certificate of the CA may present it; none is required.
            config += [
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {tls.ca}",
                f"ssl_options.certfile = {tls.cert}",
                f"ssl_options.keyfile = {tls.key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        (workdir / "rabbitmq.conf").write_text("\n".join(config) + "\n")
        (workdir / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
        # Replaces /etc/rabbitmq/rabbitmq-env.conf, which names the shared node.
        (workdir / "rabbitmq-env.conf").write_text("# private test node: see tests/rabbitmq.py\n")

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:PORT/`` (guest may log in over loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def tls_url(self) -> str:
        """``amqps://guest:guest@127.0.0.1:TLS_PORT/`` (a node made with ``tls``)."""
        assert self.tls_port is not None, "this node has no TLS listener"
        return f"amqps://guest:guest@127.0.0.1:{self.tls_port}/"

    @property
    def running(self) -> bool:
        """Whether the node's process group is alive (it may still be booting)."""
        return self.proc is not None and self.proc.poll() is None

    def env(self) -> dict[str, str]:
        """The environment for ``rabbitmq-server`` and ``rabbitmqctl`` of this node."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.home),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.mnesia),
            RABBITMQ_LOG_BASE=str(self.logs),
            RABBITMQ_CONFIG_FILE=str(self.workdir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.workdir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.workdir / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.workdir / "rabbitmq-env.conf"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
            + ("" if self.schedulers is None else f" +S {self.schedulers}:{self.schedulers}"),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def ctl(
        self, *args: str, timeout: float = 30.0, tool: str = "rabbitmqctl"
    ) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n NAME ARGS`` (or another ``tool``, e.g. ``rabbitmq-queues``)
        against this node (never the shared one)."""
        return subprocess.run(
            [str(self.bin / tool), "-n", self.name, *args],
            env=self.env(),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout: float = 90.0) -> float:
        """Start the node (again, on the same data) and wait until it has fully booted.

        Returns:
            The seconds it took.

        Raises:
            RuntimeError: it exited or did not finish booting in time (with its log's tail).
        """
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        began = time.monotonic()
        deadline = began + timeout
        with (self.logs / "console.log").open("ab") as console:
            self.proc = subprocess.Popen(
                [str(self.bin / "rabbitmq-server")],
                env=self.env(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # one process group: kill() takes the whole node down
            )
        # `rabbitmqctl await_startup` fails at once until the node has registered with epmd, and
        # each call boots an Erlang VM (~1 s of CPU), so first wait cheaply for the AMQP port,
        # which opens late in the boot, then let await_startup confirm the rest (plugins).
        last = "the AMQP port never opened"
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"{self.name} exited while starting:\n{self.log_tail()}")
            if _accepting(self.port):
                remaining = max(1, int(deadline - time.monotonic()))
                result = self.ctl(
                    "await_startup", "--timeout", str(remaining), timeout=remaining + 10
                )
                if result.returncode == 0:
                    elapsed = time.monotonic() - began
                    self.start_seconds.append(elapsed)
                    return elapsed
                last = (result.stderr or result.stdout).strip()
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(
            f"{self.name} did not start within {timeout:g} s ({last}):\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 60.0) -> None:
        """Shut the node down gracefully (SIGTERM to its launcher script); SIGKILL if it hangs."""
        if self.proc is None:
            return
        if self.running:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._reap()

    def kill(self) -> None:
        """SIGKILL every process of the node at once, as a power cut would."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._reap()

    def _reap(self) -> None:
        # The launcher exits once the VM has; make sure no straggler of the group outlives it.
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the node's console and main log."""
        out = []
        for path in (self.logs / "console.log", self.logs / f"{self.name}.log"):
            if path.is_file():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)


class PrivateCluster:
    """``size`` private nodes joined into one RabbitMQ cluster with a cookie of its own.

    Node names are ``iotpipe-test-<hex>-N@localhost``; each node has its own AMQP and
    distribution ports and data directory, and runs one Erlang scheduler (``+S 1:1``) so that
    three VMs on two cores do not starve each other (or the services under test).

    Attributes:
        nodes: the nodes, the first one the node the others join.
        start_seconds: how long :meth:`start` took.
    """

    def __init__(self, workdir: Path, size: int = 3) -> None:
        tag = secrets.token_hex(4)
        cookie = secrets.token_hex(16).upper()
        self.nodes = [
            PrivateRabbit(
                workdir / f"node{n}",
                name=f"iotpipe-test-{tag}-{n}@localhost",
                cookie=cookie,
                schedulers=1,
            )
            for n in range(1, size + 1)
        ]
        self.start_seconds = 0.0

    @property
    def urls(self) -> list[str]:
        """Every node's AMQP URL, node 1 first."""
        return [node.url for node in self.nodes]

    def start(self) -> float:
        """Start node 1, then the others at once, each joining node 1; returns the seconds."""
        began = time.monotonic()
        self.nodes[0].start()
        with ThreadPoolExecutor(len(self.nodes) - 1) as pool:
            list(pool.map(self._join, self.nodes[1:]))
        self.start_seconds = time.monotonic() - began
        return self.start_seconds

    def _join(self, node: PrivateRabbit) -> None:
        node.start()
        for args in (("stop_app",), ("join_cluster", self.nodes[0].name), ("start_app",)):
            result = node.ctl(*args, timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"{node.name}: rabbitmqctl {' '.join(args)}: {result.stderr}")

    def any_running(self) -> PrivateRabbit:
        """A node whose process runs (to ask the cluster something)."""
        return next(node for node in self.nodes if node.running)

    def by_port(self, port: int) -> PrivateRabbit:
        """The node listening for AMQP on ``port``."""
        return next(node for node in self.nodes if node.port == port)

    def by_name(self, name: str) -> PrivateRabbit:
        """The node called ``name``."""
        return next(node for node in self.nodes if node.name == name)

    def query(self, *args: str, tool: str = "rabbitmqctl") -> Any:
        """``tool ARGS --formatter json`` on a running node, parsed (raises on failure)."""
        result = self.any_running().ctl(*args, "--formatter", "json", tool=tool)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)}: {result.stderr or result.stdout}")
        return json.loads(result.stdout)

    def running_nodes(self) -> set[str]:
        """The names of the nodes the cluster reports running."""
        return set(self.query("cluster_status")["running_nodes"])

    def queue(self, name: str) -> dict[str, Any]:
        """``list_queues`` of one queue: its leader, members and online members."""
        rows = self.query("list_queues", "name", "leader", "members", "online", "messages")
        return next(row for row in rows if row["name"] == name)

    def quorum_critical(self, node: PrivateRabbit) -> bool:
        """Whether stopping ``node`` would leave a quorum queue without a majority."""
        result = node.ctl("check_if_node_is_quorum_critical", tool="rabbitmq-queues")
        return result.returncode != 0

    def restore(self) -> None:
        """Start every node that is down; they rejoin the cluster from their data."""
        for node in self.nodes:
            if not node.running:
                node.start()

    def kill(self) -> None:
        """SIGKILL every node."""
        for node in self.nodes:
            node.kill()


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def blocking_channel(url: str) -> Iterator[Any]:
    """A pika ``BlockingChannel`` on ``url``, closed (with its connection) after the block."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


@pytest.fixture(scope="session")
def isolated_rabbitmq_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private RabbitMQ node for the session, for tests that need a broker nobody else binds.

    On the shared broker anything may be bound to ``iotpipe.v1.#`` (``iotpipe consume`` declares
    ``iotpipe.store`` so, and ``make run`` leaves it there), so a test proving that a message is
    *unroutable* needs a broker of its own. Started on first use (several seconds).
    """
    if rabbitmq_bin() is None:
        pytest.fail("rabbitmq-server is not installed: run `make setup`", pytrace=False)
    node = PrivateRabbit(tmp_path_factory.mktemp("isolated-rabbitmq"))
    try:
        node.start()
        yield node.url
    finally:
        node.kill()
        shutil.rmtree(node.mnesia, ignore_errors=True)


@pytest.fixture(scope="session")
def rabbitmq_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A RabbitMQ for tests that do not stop it: the running one, else a private session node.

    ``$IOTPIPE_TEST_AMQP_URL`` (default: the local broker on 5672) is used when it answers;
    otherwise a private node is started for the whole session, so ``make test`` does not depend
    on a RabbitMQ service being up.
    """
    url = os.environ.get(URL_ENV, SHARED_URL)
    try:
        with blocking_channel(url):
            pass
    except pika.exceptions.AMQPError as err:
        reason = describe_error(err)
    else:
        yield url
        return
    if rabbitmq_bin() is None:
        pytest.fail(
            f"RabbitMQ is not reachable at {AmqpSettings(url=url).broker.redacted()} ({reason}) "
            f"and rabbitmq-server is not installed: run `make setup` or point ${URL_ENV} at one",
            pytrace=False,
        )
    node = PrivateRabbit(tmp_path_factory.mktemp("session-rabbitmq"))
    try:
        node.start()
        yield node.url
    finally:
        node.kill()
        shutil.rmtree(node.mnesia, ignore_errors=True)


@pytest.fixture
def private_rabbit(tmp_path: Path) -> Iterator[PrivateRabbit]:
    """A started private RabbitMQ node; SIGKILLed and its data deleted at teardown."""
    if rabbitmq_bin() is None:
        pytest.fail("rabbitmq-server is not installed: run `make setup`", pytrace=False)
    node = PrivateRabbit(tmp_path / "rabbitmq")
    try:
        node.start()
        yield node
    finally:
        node.kill()
        shutil.rmtree(node.mnesia, ignore_errors=True)  # logs stay for a failed test's report
