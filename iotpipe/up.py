"""``iotpipe up``: the whole pipeline on one machine, started, watched and stopped in order.

Every component runs as a child process of this command (``iotpipe broker``, ``bridge``,
``consume``, ``simulate``), so ``iotpipe`` never imports the components' code. Each child gets
its own process group (Ctrl-C on the terminal reaches only ``up``, which then stops them in
order) and a log file ``state/up/<component>.log``.

Start order: RabbitMQ (the configured one, the one on 127.0.0.1:5672, or a private node whose
data stays under ``state/up/rabbitmq``), the edge broker and the consumer (it declares the queue
before anything is forwarded), the bridge, then the simulated fleet.

Stop order, so nothing acknowledged is lost: the simulator (it publishes its offline status),
a bounded wait until the bridge has forwarded what it received, the bridge (flushes confirms,
acknowledges), the consumer (finishes its batch), the edge broker, and the private RabbitMQ node
if we started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import inspect
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from iotpipe.errors import ConfigError, ConnectError, IotpipeError
from iotpipe.options import ConfigOption, warn_password_in_flag
from iotpipe.rabbitmq import DEFAULT_VHOST as RABBITMQ_VHOST
from iotpipe.rabbitmq import STORE_QUEUE, apply, definitions, roles_for, secret_file
from iotpipe.schema import layered
from iotpipe.settings import (
    DEFAULT_STORE_URL,
    AmqpSettings,
    MqttSettings,
    UpSettings,
    config_path,
    load,
)
from iotpipe.status import COMPONENTS_FILE, Probe, accepting, counters, probe

#: ``iotpipe`` itself, run by the interpreter running us (the entry point may not be on PATH).
IOTPIPE = [sys.executable, "-c", "from iotpipe.cli import main; main()"]

#: Where Debian keeps the real scripts (``/usr/sbin/rabbitmq-*`` are ``su`` wrappers around them,
#: which switch to the ``rabbitmq`` user and use the shared node's cookie).
_DEBIAN_RABBITMQ = Path("/usr/lib/rabbitmq/bin")

_LOCAL_AMQP = "amqp://guest:guest@127.0.0.1:5672/"


# -- the components ---------------------------------------------------------------------------


@dataclass
class Component:
    """One part of the pipeline: a child process we started, or a service we only use.

    Attributes:
        name: ``rabbitmq``, ``broker``, ``consumer``, ``bridge`` or ``simulator``.
        url: where it serves (no password), or a short description.
        http: base URL of its ``/healthz`` and ``/metrics``, if it has them.
        note: what it is (``amqtt (embedded)``, ``shared``, ...).
        proc: the child process, None for a service we did not start.
        state: starting, running, healthy, unhealthy, finished, exited (N), stopped.
    """

    name: str
    url: str
    note: str = ""
    http: str | None = None
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    state: str = "starting"
    launched: float = field(default_factory=time.monotonic)
    ready_after: float | None = None
    last: Probe | None = None
    rates: dict[str, float] = field(default_factory=dict)
    _sample: tuple[float, dict[str, float]] | None = None

    @property
    def pid(self) -> int | None:
        """The child's pid, if we started it."""
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        """Whether its process is still alive (services we did not start always are)."""
        return self.proc is None or self.proc.poll() is None

    def observe(self, *, metrics: bool = True) -> Probe | None:
        """Read its /healthz (and /metrics, turning counters into per-second rates)."""
        if self.http is None:
            return None
        found = probe(self.http, timeout=1.0, metrics=metrics)
        self.last = found
        if metrics and found.metrics:
            now = time.monotonic()
            totals = counters(self.name, found.metrics)
            if self._sample is not None and now > self._sample[0]:
                then, before = self._sample
                self.rates = {
                    k: max(0.0, (v - before.get(k, 0.0)) / (now - then)) for k, v in totals.items()
                }
            self._sample = (now, totals)
        return found

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of its log, indented, for an error report."""
        if self.log is None or not self.log.is_file():
            return ""
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"    {line}" for line in text)


class StartFailedError(Exception):
    """A component exited or did not become ready while starting (reported by ``up``)."""

    def __init__(self, component: Component, reason: str) -> None:
        self.component = component
        super().__init__(f"the {component.name} {reason}")


class StartInterruptedError(Exception):
    """Ctrl-C or SIGTERM arrived while starting."""


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if ``up`` itself is killed (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def rabbitmq_bin() -> Path | None:
    """The directory holding the real ``rabbitmq-server`` and ``rabbitmqctl`` scripts, if any."""
    if (_DEBIAN_RABBITMQ / "rabbitmq-server").is_file():
        return _DEBIAN_RABBITMQ
    found = shutil.which("rabbitmq-server")
    if found is None:
        return None
    path = Path(found).resolve()
    return None if path.name == "rabbitmq-script-wrapper" else path.parent


def answers_amqp(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether an AMQP 0-9-1 server answers on ``host:port`` (protocol header → Connection.Start)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            first = sock.recv(1)
    except OSError:
        return False
    return first == b"\x01"  # a method frame


class PrivateRabbitNode:
    """A RabbitMQ node of our own: own node name, ports, cookie and ``$HOME``; data under ``workdir``.

    The node name is derived from the state directory, so the next ``iotpipe up`` in the same
    project finds the same data again (queued messages survive a restart).
    """

    def __init__(self, workdir: Path, port: int, dist_port: int) -> None:
        binaries = rabbitmq_bin()
        if binaries is None:
            raise ConnectError(
                "RabbitMQ",
                "none is running on 127.0.0.1:5672 and rabbitmq-server is not installed: run "
                "`make setup` (apt-get install rabbitmq-server), or pass --amqp URL",
            )
        self.bin = binaries
        # Absolute: rabbitmqctl runs in workdir, and Erlang finds the cookie through $HOME.
        workdir = workdir.resolve()
        self.workdir = workdir
        tag = hashlib.sha256(str(workdir.resolve()).encode()).hexdigest()[:8]
        self.name = f"iotpipe-up-{tag}@localhost"
        self.port = port
        self.dist_port = dist_port
        self.home = workdir / "home"
        self.log = workdir / "console.log"
        for directory in (self.home, workdir / "mnesia", workdir / "log"):
            directory.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16).upper())
            cookie.chmod(0o400)  # Erlang refuses a cookie others can read
        (workdir / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{port}\n")
        (workdir / "enabled_plugins").write_text("[].\n")
        # Replaces /etc/rabbitmq/rabbitmq-env.conf, which names the machine's shared node.
        (workdir / "rabbitmq-env.conf").write_text("# private node of iotpipe up\n")

    @property
    def url(self) -> str:
        """guest may log in over loopback."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        """The environment for ``rabbitmq-server`` and ``rabbitmqctl`` of this node."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.home),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.workdir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.workdir / "log"),
            RABBITMQ_CONFIG_FILE=str(self.workdir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.workdir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.workdir / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.workdir / "rabbitmq-env.conf"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def ctl(
        self, *args: str, timeout: float = 30.0, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n NAME ARGS`` against this node (never the shared one)."""
        return subprocess.run(  # noqa: S603 - our own argv, no shell
            [str(self.bin / "rabbitmqctl"), "-n", self.name, *args],
            input=stdin,
            env=self.env(),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


# -- the orchestrator -------------------------------------------------------------------------


class Pipeline:
    """Starts the components, shows their health, and stops them in order."""

    def __init__(
        self,
        settings: UpSettings,
        mqtt: MqttSettings,
        amqp: AmqpSettings,
        *,
        config: Path | None,
        store: str | None,
        console: Console,
        err: Console,
    ) -> None:
        self.settings = settings
        self.mqtt = mqtt
        self.amqp = amqp
        self.config = config
        self.store = store
        self.console = console
        self.err = err
        self.dir = settings.state_dir / "up"
        self.components: list[Component] = []
        self.signals = 0
        self.rabbit: PrivateRabbitNode | None = None
        self.rabbit_users: Path | None = None  # password files of the private node's users
        self.began = time.monotonic()
        self.clean = True

    # -- helpers ------------------------------------------------------------------------------

    def say(self, message: str) -> None:
        """One progress line on stderr."""
        self.err.print(Text.assemble(("iotpipe up", "bold"), f": {message}"), highlight=False)

    def get(self, name: str) -> Component | None:
        """The component called ``name``, if it is part of this run."""
        return next((c for c in self.components if c.name == name), None)

    def on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        """First Ctrl-C/SIGTERM: stop in order; second: skip the drain; third: kill."""
        self.signals += 1
        if self.signals == 2:
            self.say("second interrupt: not waiting for the bridge to drain")
        elif self.signals >= 3:
            self.say("third interrupt: killing what is left")

    def _child_env(self) -> dict[str, str]:
        # URLs go through the environment, not argv, so passwords never show up in `ps`.
        env = dict(os.environ)
        env["IOTPIPE_MQTT__URL"] = self.mqtt.url
        env["IOTPIPE_AMQP__URL"] = self.amqp.url
        return env

    def _amqp_url(self, user: str) -> str:
        """The RabbitMQ URL (no password) the component of ``user`` connects with."""
        if self.rabbit is None or self.rabbit_users is None:
            return self.amqp.broker.redacted()
        return f"amqp://{user}@127.0.0.1:{self.rabbit.port}/{RABBITMQ_VHOST}"

    def _amqp_env(self, env: dict[str, str], user: str) -> dict[str, str]:
        """``env`` with the RabbitMQ user ``user`` of our private node, if we set users up."""
        if self.rabbit_users is None:
            return env
        return {
            **env,
            "IOTPIPE_AMQP__URL": self._amqp_url(user),
            "IOTPIPE_AMQP__PASSWORD_FILE": str(self.rabbit_users / user),
        }

    def _launch(self, component: Component, argv: list[str], env: dict[str, str]) -> None:
        assert component.log is not None
        with component.log.open("ab") as log:
            log.write(f"=== iotpipe up {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
            log.flush()
            component.proc = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C on the terminal reaches only `up`
                # Launched before any thread of ours exists, so the usual preexec_fn caveat
                # does not apply; it ends the children if `up` is SIGKILLed.
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )
        component.launched = time.monotonic()
        self.components.append(component)
        self.write_components()

    def _iotpipe(self, command: str, *args: str) -> list[str]:
        config = ["--config", str(self.config)] if self.config is not None else []
        return [*IOTPIPE, "--log-level", "info", command, *config, *args]

    def write_components(self) -> None:
        """``state/up/components.json``: what runs where, for ``iotpipe status``."""
        listing = {
            "up_pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "components": [
                {
                    "name": c.name,
                    "kind": c.name,
                    "pid": c.pid,
                    "url": c.url,
                    "http": c.http,
                    "note": c.note,
                    "log": str(c.log) if c.log else None,
                }
                for c in self.components
            ],
        }
        path = self.settings.state_dir / COMPONENTS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(listing, indent=2) + "\n")
        tmp.replace(path)

    def _wait_ready(self, component: Component, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.settings.start_timeout
        while not ready():
            if self.signals:
                raise StartInterruptedError
            if not component.running:
                assert component.proc is not None
                component.state = f"exited ({component.proc.returncode})"
                raise StartFailedError(component, f"exited with code {component.proc.returncode}")
            if time.monotonic() > deadline:
                raise StartFailedError(
                    component, f"did not become ready within {self.settings.start_timeout:g} s"
                )
            time.sleep(0.1)
        component.state = "healthy" if component.http else "running"
        component.ready_after = time.monotonic() - component.launched

    # -- start --------------------------------------------------------------------------------

    def check_free(self) -> None:
        """Fail early, in one line, when a port we would listen on is taken."""
        ports: list[tuple[str, int, str]] = [
            ("up.bridge_http_port", self.settings.bridge_http_port, "--bridge-port"),
            ("up.consumer_http_port", self.settings.consumer_http_port, "--consumer-port"),
        ]
        if self.settings.dashboard:
            ports.append(("up.dashboard_port", self.settings.dashboard_port, "--dashboard-port"))
        if self.edge_started:
            edge = [("up.mqtt_port", self.settings.mqtt_port, "--mqtt-port")]
            if self.settings.edge_broker == "amqtt":
                edge.append(
                    ("up.broker_http_port", self.settings.broker_http_port, "--broker-http-port")
                )
            ports[:0] = edge
        for name, port, flag in ports:
            if accepting("127.0.0.1", port):
                hint = f"pass {flag} PORT"
                if name == "up.mqtt_port":
                    hint += f", or --mqtt mqtt://127.0.0.1:{port} to use the broker there"
                raise ConfigError(name, port, f"port already in use; {hint}")

    @property
    def edge_started(self) -> bool:
        """Whether we start the edge broker (no --mqtt / [mqtt] url given)."""
        return "url" not in self.mqtt.fields_set

    def start(self) -> None:
        """Start every component in order and wait until each is ready."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.write_components()
        self._start_rabbitmq()
        env = self._child_env()
        broker = self._start_edge_broker(env)
        consumer = Component(
            "consumer",
            f"http://127.0.0.1:{self.settings.consumer_http_port}",
            note=f"-> {self.store or _consumer_store(self.config)}",
            http=f"http://127.0.0.1:{self.settings.consumer_http_port}",
            log=self.dir / "consumer.log",
        )
        store = ["--store", self.store] if self.store else []
        args = ["--http-port", str(self.settings.consumer_http_port), *store]
        self._launch(consumer, self._iotpipe("consume", *args), self._amqp_env(env, "consumer"))
        broker_host, broker_port = self.mqtt.broker.host, self.mqtt.broker.port
        self._wait_ready(broker, lambda: accepting(broker_host, broker_port))
        bridge = Component(
            "bridge",
            f"http://127.0.0.1:{self.settings.bridge_http_port}",
            note=f"{self.mqtt.broker} -> {self._amqp_url('bridge')}",
            http=f"http://127.0.0.1:{self.settings.bridge_http_port}",
            log=self.dir / "bridge.log",
        )
        self._launch(
            bridge,
            self._iotpipe("bridge", "--http-port", str(self.settings.bridge_http_port)),
            self._amqp_env(env, "bridge"),
        )
        for component in (consumer, bridge):
            assert component.http is not None
            base = component.http
            self._wait_ready(component, lambda base=base: probe(base, metrics=False).healthy)  # type: ignore[misc]
        if self.settings.dashboard:
            self._start_dashboard(env)
        if self.settings.simulator:
            self._start_simulator(env)
        self.write_components()

    def _start_dashboard(self, env: dict[str, str]) -> None:
        """The web page on the consumer's store (which the consumer has created by now)."""
        port = self.settings.dashboard_port
        store = self.store or _consumer_store(self.config)
        dashboard = Component(
            "dashboard",
            f"http://127.0.0.1:{port}/",
            note=f"web page and /api/v1 on {store}",
            log=self.dir / "dashboard.log",
        )
        args = ["--store", store, "--host", "127.0.0.1", "--port", str(port)]
        self._launch(dashboard, self._iotpipe("dashboard", *args), env)
        self._wait_ready(dashboard, lambda: accepting("127.0.0.1", port))

    def _start_rabbitmq(self) -> None:
        mode = self.settings.rabbitmq
        configured = "url" in self.amqp.model_fields_set
        broker = self.amqp.broker
        if configured or mode == "external":
            reachable = (
                accepting(broker.host, broker.port, timeout=2.0)
                if broker.tls
                else answers_amqp(broker.host, broker.port, timeout=2.0)
            )
            if not reachable:
                raise ConnectError(
                    broker.redacted(),
                    "RabbitMQ does not answer there; start it, or leave out --amqp (and "
                    "[amqp] url) to use or start a local one",
                )
            self.components.append(Component("rabbitmq", broker.redacted(), note="external"))
            return
        if mode == "auto" and answers_amqp("127.0.0.1", 5672):
            self.amqp = AmqpSettings(url=_LOCAL_AMQP, tls=self.amqp.tls)
            self.components.append(
                Component("rabbitmq", self.amqp.broker.redacted(), note="shared (already running)")
            )
            return
        port = self.settings.rabbitmq_port
        if accepting("127.0.0.1", port):
            raise ConfigError(
                "up.rabbitmq_port", port, "port already in use; pass --rabbitmq-port PORT"
            )
        node = PrivateRabbitNode(self.dir / "rabbitmq", port, self.settings.rabbitmq_dist_port)
        self.rabbit = node
        self.amqp = AmqpSettings(url=node.url, tls=self.amqp.tls)
        component = Component(
            "rabbitmq", self.amqp.broker.redacted(), note=f"private node {node.name}", log=node.log
        )
        self.say(f"starting a private RabbitMQ node ({node.name}, data in {node.workdir})")
        bin_ = node.bin
        self._launch(component, [str(bin_ / "rabbitmq-server")], node.env())
        self._wait_ready(component, lambda: self._rabbit_booted(component, node))
        self._set_up_users(node)

    def _set_up_users(self, node: PrivateRabbitNode) -> None:
        """Vhost ``iotpipe`` with a least-privilege user for the bridge and the consumer.

        Passwords are made once and kept in ``state/up/rabbitmq/secrets`` (0600 files); the
        consumer's user may read the queue the config names (``[consume] queue``).
        """
        secrets_dir = node.workdir / "secrets"
        queue = _consume_queue(self.config)
        roles = roles_for(("bridge", "consumer"), consumer_queue=queue)
        users = [(role, secret_file(secrets_dir, role.name)[1]) for role in roles]
        apply(
            lambda args, stdin: node.ctl(*args, stdin=stdin),
            definitions(RABBITMQ_VHOST, users),
            vhost=RABBITMQ_VHOST,
        )
        self.rabbit_users = secrets_dir
        self.say(
            f"RabbitMQ vhost {RABBITMQ_VHOST!r}: users bridge and consumer "
            f"(passwords in {secrets_dir})"
        )

    def _rabbit_booted(self, component: Component, node: PrivateRabbitNode) -> bool:
        # `rabbitmqctl await_startup` fails at once until the node has registered with epmd and
        # each call boots an Erlang VM, so first wait cheaply for the AMQP port (it opens late).
        if not component.running or not accepting("127.0.0.1", node.port):
            return False
        remaining = max(1, int(self.settings.start_timeout))
        result = node.ctl("await_startup", "--timeout", str(remaining), timeout=remaining + 10)
        return result.returncode == 0

    def _start_edge_broker(self, env: dict[str, str]) -> Component:
        if not self.edge_started:
            component = Component("broker", self.mqtt.broker.redacted(), note="external")
            self.components.append(component)
            return component
        host, port = self.settings.mqtt_host, self.settings.mqtt_port
        self.mqtt = MqttSettings(url=f"mqtt://{host}:{port}", tls=self.mqtt.tls)
        # The components started after the broker connect to it, not to the default URL.
        env["IOTPIPE_MQTT__URL"] = self.mqtt.url
        log = self.dir / "broker.log"
        if self.settings.edge_broker == "mosquitto":
            argv = [_mosquitto_binary(), "-c", str(self._mosquitto_config(host, port))]
            component = Component("broker", self.mqtt.url, note="mosquitto (private)", log=log)
        else:
            http = self.settings.broker_http_port
            # Sessions and queued messages outlive a restart of `iotpipe up`, as with Mosquitto.
            state = self.dir / "broker-state.db"
            argv = self._iotpipe(
                "broker",
                "--host",
                host,
                "--port",
                str(port),
                "--http-port",
                str(http),
                "--state-file",
                str(state),
            )
            component = Component(
                "broker",
                self.mqtt.url,
                note="amqtt (embedded)",
                http=f"http://127.0.0.1:{http}",
                log=log,
            )
        self._launch(component, argv, env)
        return component

    def _mosquitto_config(self, host: str, port: int) -> Path:
        data = self.dir / "mosquitto"
        data.mkdir(parents=True, exist_ok=True)
        conf = data / "mosquitto.conf"
        # The limits of configs/mosquitto/iotpipe.conf; `user` matters only when run as root
        # (Mosquitto would switch to the `mosquitto` user, who cannot write our state dir).
        conf.write_text(
            "# written by iotpipe up: a private Mosquitto (see configs/mosquitto/iotpipe.conf)\n"
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
            f"listener {port} {host}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {data.resolve()}/\n"
            "autosave_interval 30\n"
            "persistent_client_expiration 14d\n"
            "max_queued_messages 200000\n"
            "max_queued_bytes 134217728\n"
            "max_inflight_messages 100\n"
            "max_packet_size 266240\n"
            "set_tcp_nodelay true\n"
            "log_dest stderr\n"
            "log_timestamp_format %Y-%m-%dT%H:%M:%S\n"
        )
        return conf

    def _start_simulator(self, env: dict[str, str]) -> None:
        s = self.settings
        faults = [arg for k, v in s.faults.items() for arg in ("--fault", f"{k}={v:g}")]
        args = ["--sites", str(s.sites), "--devices", str(s.devices), "--rate", s.rate]
        component = Component(
            "simulator",
            self.mqtt.broker.redacted(),
            note=f"{s.sites} sites x {s.devices} devices at {s.rate}"
            + (" Hz" if s.rate != "max" else ""),
            log=self.dir / "simulator.log",
        )
        self._launch(component, self._iotpipe("simulate", *args, "--no-progress", *faults), env)
        component.state = "running"
        component.ready_after = 0.0

    # -- run ----------------------------------------------------------------------------------

    def where(self) -> str:
        """What runs where, a few lines."""
        lines = []
        for c in self.components:
            log = f"  log {c.log}" if c.log else ""
            lines.append(f"  {c.name:<10} {c.url:<36} {c.note}{log}")
        return "\n".join(lines)

    def observe(self) -> Component | None:
        """Refresh every component's state; return one that died, if any."""
        dead = None
        for c in self.components:
            if c.proc is not None and c.proc.poll() is not None:
                code = c.proc.returncode
                if c.name == "simulator" and code == 0:
                    c.state = "finished"
                    continue
                if not c.state.startswith("exited"):
                    c.state = f"exited ({code})"
                dead = dead or c
                continue
            found = c.observe()
            if found is not None:
                c.state = (
                    "healthy"
                    if found.healthy
                    else ("unhealthy" if found.reachable else "not answering")
                )
        # Brokers without an HTTP endpoint: the bridge and consumer say whether they reach them.
        bridge, consumer = self.get("bridge"), self.get("consumer")
        for name, probe_of, key, good in (
            ("broker", bridge, "mqtt", "up"),
            ("rabbitmq", consumer, "amqp", "connected"),
        ):
            target = self.get(name)
            if target is None or target.http is not None or not target.running:
                continue
            if probe_of is None or probe_of.last is None:
                continue
            if probe_of.last.reachable:
                healthy = probe_of.last.health.get(key) == good
                target.state = "healthy" if healthy else "unreachable"
        return dead

    def table(self, note: str = "") -> Table:
        """The live view."""
        elapsed = time.monotonic() - self.began
        title = f"iotpipe up - {elapsed:,.0f} s - Ctrl-C stops everything in order"
        table = Table(title=title, caption=note or None, expand=False)
        for column in ("component", "state", "where", "activity"):
            table.add_column(column)
        for c in self.components:
            colour = {"healthy": "green", "running": "green", "finished": "cyan"}.get(
                c.state, "yellow" if c.state in {"starting", "stopping"} else "red"
            )
            table.add_row(c.name, Text(c.state, style=colour), c.url, self.activity(c))
        return table

    def activity(self, c: Component) -> str:
        """Rates and counters of one component, or what it is."""
        r, totals = c.rates, counters(c.name, c.last.metrics) if c.last else {}
        if c.name == "broker" and totals:
            return (
                f"received {r.get('received', 0):.1f}/s, sessions {totals['sessions']:.0f}, "
                f"queued {totals['queued']:.0f}, dropped {totals['dropped']:.0f}"
            )
        if c.name == "bridge" and totals:
            return (
                f"received {r.get('received', 0):.1f}/s, forwarded {r.get('forwarded', 0):.1f}/s, "
                f"dead-lettered {r.get('dead-lettered', 0):.1f}/s, spool {totals['spool']:.0f}"
            )
        if c.name == "consumer" and totals:
            return (
                f"stored {r.get('stored readings', 0):.1f} readings/s "
                f"({totals['stored readings']:.0f} in all), duplicates "
                f"{totals['duplicates']:.0f}, dead-lettered {totals['dead-lettered']:.0f}"
            )
        return c.note

    def line(self) -> str:
        """The live view as one plain line (stdout is not a terminal)."""
        elapsed = time.monotonic() - self.began
        counted = {"bridge", "consumer"} | {c.name for c in self.components if c.http}
        parts = [f"{c.name} {c.state}" for c in self.components if c.name not in counted]
        for name in ("broker", "bridge", "consumer"):
            c = self.get(name)
            if c is not None and name in counted:
                parts.append(f"{name} {c.state}: {self.activity(c)}")
        return f"[{elapsed:6.0f} s] " + "; ".join(parts)

    def watch(self, duration: float | None) -> Component | None:
        """Show live health until Ctrl-C, ``duration`` or a component dies (returned)."""
        deadline = None if duration is None else time.monotonic() + duration
        refresh = self.settings.refresh
        plain_every = max(5.0, refresh)

        def done() -> bool:
            return self.signals > 0 or (deadline is not None and time.monotonic() >= deadline)

        def nap(seconds: float) -> None:
            until = time.monotonic() + seconds
            while not done() and time.monotonic() < until:
                time.sleep(min(0.1, max(0.0, until - time.monotonic())))

        if self.console.is_terminal:
            with Live(self.table(), console=self.console, auto_refresh=False) as live:
                while not done():
                    dead = self.observe()
                    live.update(self.table(), refresh=True)
                    if dead is not None:
                        return dead
                    nap(refresh)
            return None
        next_line = time.monotonic() + plain_every
        while not done():
            dead = self.observe()
            if dead is not None:
                return dead
            if time.monotonic() >= next_line:
                self.console.print(self.line(), highlight=False, soft_wrap=True)
                next_line += plain_every
            nap(refresh)
        return None

    # -- stop ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop everything that runs, in order (see the module docstring)."""
        began = time.monotonic()
        if (c := self.get("dashboard")) is not None:
            self._terminate(c, timeout=15)
        if (c := self.get("simulator")) is not None:
            self._terminate(c, timeout=30)
        if (c := self.get("bridge")) is not None and c.running:
            self._drain_bridge(c)
            self._terminate(c, timeout=45)
        if (c := self.get("consumer")) is not None and c.running:
            self._settle_consumer(c)
            self._terminate(c, timeout=45)
        if (c := self.get("broker")) is not None:
            self._terminate(c, timeout=15)
        if (c := self.get("rabbitmq")) is not None and c.proc is not None:
            self._stop_rabbit(c)
        self.say(f"stopped in {time.monotonic() - began:.1f} s")

    def _terminate(self, c: Component, timeout: float) -> None:
        if c.proc is None or c.proc.poll() is not None:
            return
        began = time.monotonic()
        c.state = "stopping"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(c.proc.pid, signal.SIGTERM)
        deadline = began + timeout
        while c.proc.poll() is None:
            if self.signals >= 3 or time.monotonic() > deadline:
                self.say(f"{c.name} did not stop in time: killing it")
                self.clean = False
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait(timeout=10)
                break
            time.sleep(0.05)
        code = c.proc.returncode
        ok = code in (0, -signal.SIGTERM, 128 + signal.SIGTERM, 143)
        if not ok:
            self.clean = False
        c.state = "stopped" if ok else f"exited ({code})"
        self.say(f"{c.name} stopped ({time.monotonic() - began:.1f} s, exit {code})")

    def _drain_bridge(self, c: Component) -> None:
        """Wait (bounded) until the bridge has taken responsibility for all it received.

        That is: nothing left unacknowledged to MQTT, and no new message for half a second (the
        edge broker may still hold some for it). A message is then confirmed by RabbitMQ or
        committed to the spool, which is durable and forwarded after the next start.
        """
        assert c.http is not None
        timeout = self.settings.drain_timeout
        began = time.monotonic()
        last_received: float | None = None
        quiet_since = began
        next_note = began + 2.0
        unacked, depth = 0, 0
        while c.running and self.signals < 2:
            found = probe(c.http, timeout=1.0)
            if not found.reachable:
                return
            received = counters("bridge", found.metrics).get("received", 0.0)
            if received != last_received:
                last_received, quiet_since = received, time.monotonic()
            unacked = int(found.health.get("unacked", 0))
            spool = found.health.get("spool", {})
            depth = int(spool.get("depth", 0)) if isinstance(spool, dict) else 0
            now = time.monotonic()
            if unacked == 0 and now - quiet_since >= 0.5:
                kept = f"; {depth} stay in its spool until RabbitMQ takes them" if depth else ""
                self.say(f"bridge drained ({received:.0f} received, {now - began:.1f} s{kept})")
                return
            if now - began > timeout:
                self.say(
                    f"bridge still busy after {timeout:g} s ({unacked} unacknowledged); "
                    "stopping it anyway: it acknowledges only what RabbitMQ or its spool took"
                )
                return
            if now >= next_note:
                self.say(f"waiting for the bridge: {unacked} unacknowledged, spool {depth}")
                next_note = now + 2.0
            time.sleep(0.2)

    def _settle_consumer(self, c: Component) -> None:
        """Give the consumer a moment (≤5 s) to store what the bridge just forwarded."""
        assert c.http is not None
        deadline = time.monotonic() + 5.0
        last: float | None = None
        quiet_since = time.monotonic()
        while c.running and self.signals < 2 and time.monotonic() < deadline:
            found = probe(c.http, timeout=1.0)
            if not found.reachable:
                return
            received = found.metrics.get("iotpipe_consumer_received_total", 0.0)
            if received != last:
                last, quiet_since = received, time.monotonic()
            elif time.monotonic() - quiet_since >= 0.6:
                return
            time.sleep(0.1)

    def _stop_rabbit(self, c: Component) -> None:
        assert c.proc is not None
        assert self.rabbit is not None
        if c.proc.poll() is None:
            began = time.monotonic()
            c.state = "stopping"
            self.say(f"stopping the private RabbitMQ node {self.rabbit.name}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.rabbit.ctl("stop", timeout=60)
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=30)
            self._terminate(c, timeout=30)  # only if `rabbitmqctl stop` did not do it
            c.state = "stopped"
            self.say(
                f"rabbitmq stopped ({time.monotonic() - began:.1f} s; data kept in "
                f"{self.rabbit.workdir})"
            )
        # The launcher exits once the VM has; no straggler of its group may outlive it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(c.proc.pid, signal.SIGKILL)

    def kill_all(self) -> None:
        """Last resort (an unexpected error): no child may outlive ``up``."""
        for c in reversed(self.components):
            if c.proc is not None and c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait(timeout=10)

    def forget(self) -> None:
        """Remove components.json (nothing runs any more)."""
        with contextlib.suppress(OSError):
            (self.settings.state_dir / COMPONENTS_FILE).unlink()


def _mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").is_file() else None
    )
    if found is None:
        raise ConfigError(
            "up.edge_broker",
            "mosquitto",
            "mosquitto is not installed: run `make setup` (apt-get install mosquitto)",
        )
    return found


def _consumer_store(config: Path | None) -> str:
    """The store ``iotpipe consume`` will use without ``--store``: env, else file, else default."""
    store = layered("consume", config_file=config).get("store")
    return store if isinstance(store, str) and store else DEFAULT_STORE_URL


def _consume_queue(config: Path | None) -> str:
    """The queue ``iotpipe consume`` will read: env, else file, else ``iotpipe.store``."""
    queue = layered("consume", config_file=config).get("queue")
    return queue if isinstance(queue, str) and queue else STORE_QUEUE


def _already_running(state_dir: Path) -> int | None:
    from iotpipe.status import pid_alive, read_components

    listing = read_components(state_dir)
    pid = listing.get("up_pid") if listing else None
    if isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
        return pid
    return None


@contextlib.contextmanager
def _signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    names = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.getsignal(sig) for sig in names}
    for sig in names:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -- the command ------------------------------------------------------------------------------

_EXAMPLES = """

[bold]Examples[/bold]

  [dim]# everything on this machine: amqtt on 1884, RabbitMQ (local or private), SQLite[/dim]
  iotpipe up

  [dim]# brokers you already run[/dim]
  iotpipe up --mqtt mqtt://127.0.0.1:1883 --amqp amqp://iot:pw@rabbit:5672/

  [dim]# a private Mosquitto instead of amqtt, 20 devices per site at 2 Hz[/dim]
  iotpipe up --mosquitto --devices 20 --rate 2

  [dim]# scripted: run 60 s, stop cleanly, look at what was stored[/dim]
  iotpipe up --duration 60 && iotpipe stats --store sqlite:///state/telemetry.db

  [dim]# everything from a file (commented sample: configs/up.toml)[/dim]
  iotpipe up --config configs/up.toml
"""


def up(  # noqa: PLR0917 - typer maps every parameter to an option
    config: ConfigOption = None,
    mqtt: Annotated[
        str | None,
        typer.Option(
            "--mqtt",
            help="Use this edge broker (mqtt:// or mqtts://) instead of starting one.",
            show_default=False,
            callback=warn_password_in_flag("--mqtt", "mqtt"),
        ),
    ] = None,
    mosquitto: Annotated[
        bool,
        typer.Option(
            "--mosquitto", help="Start a private Mosquitto instead of the embedded amqtt broker."
        ),
    ] = False,
    mqtt_port: Annotated[
        int | None,
        typer.Option(
            help="Port of the edge broker we start. \\[default: 1884]", show_default=False
        ),
    ] = None,
    amqp: Annotated[
        str | None,
        typer.Option(
            "--amqp",
            help="Use this RabbitMQ (amqp:// or amqps://). \\[default: the one on 127.0.0.1:5672, "
            "else a private node]",
            show_default=False,
            callback=warn_password_in_flag("--amqp", "amqp"),
        ),
    ] = None,
    rabbitmq: Annotated[
        str | None,
        typer.Option(
            help="auto, private (always start our own node) or external. \\[default: auto]",
            show_default=False,
        ),
    ] = None,
    rabbitmq_port: Annotated[
        int | None,
        typer.Option(help="AMQP port of a private node. \\[default: 5673]", show_default=False),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            help=f"Consumer store URL. \\[default: {DEFAULT_STORE_URL}]", show_default=False
        ),
    ] = None,
    broker_http_port: Annotated[
        int | None,
        typer.Option(
            help="Embedded broker /metrics and /healthz port. \\[default: 9184]",
            show_default=False,
        ),
    ] = None,
    bridge_port: Annotated[
        int | None,
        typer.Option(
            help="Bridge /metrics and /healthz port. \\[default: 9181]", show_default=False
        ),
    ] = None,
    consumer_port: Annotated[
        int | None,
        typer.Option(
            help="Consumer /metrics and /healthz port. \\[default: 9182]", show_default=False
        ),
    ] = None,
    dashboard_port: Annotated[
        int | None,
        typer.Option(help="Port of the web dashboard. \\[default: 8080]", show_default=False),
    ] = None,
    dashboard: Annotated[
        bool | None,
        typer.Option(
            "--dashboard/--no-dashboard",
            help="Serve the web dashboard. \\[default: --dashboard]",
            show_default=False,
        ),
    ] = None,
    sites: Annotated[
        int | None, typer.Option(help="Simulated sites. \\[default: 2]", show_default=False)
    ] = None,
    devices: Annotated[
        int | None,
        typer.Option(help="Simulated devices per site. \\[default: 3]", show_default=False),
    ] = None,
    rate: Annotated[
        str | None,
        typer.Option(
            help="Samples per second per device (0.1-100) or 'max'. \\[default: 1]",
            show_default=False,
        ),
    ] = None,
    simulator: Annotated[
        bool | None,
        typer.Option(
            "--simulator/--no-simulator",
            help="Run the simulated fleet. \\[default: --simulator]",
            show_default=False,
        ),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option(
            help="Stop cleanly after S seconds of running. \\[default: until Ctrl-C]",
            show_default=False,
            min=0,
        ),
    ] = None,
) -> None:
    """Run the whole pipeline here: edge broker, RabbitMQ, bridge, consumer, dashboard, fleet.

    Starts what is missing on loopback (the embedded amqtt broker on 1884; RabbitMQ: the one
    on 127.0.0.1:5672, else a private node with its data in state/up/rabbitmq), prints what runs
    where, shows live health and rates, and on Ctrl-C or SIGTERM stops everything in order
    without losing acknowledged data. Logs: state/up/<component>.log; [bold]iotpipe status[/bold]
    reports health from another terminal. A component that dies stops the rest: exit 1.
    """
    path = config_path(config)
    flags: dict[str, Any] = {
        "edge_broker": "mosquitto" if mosquitto else None,
        "mqtt_port": mqtt_port,
        "rabbitmq": rabbitmq,
        "rabbitmq_port": rabbitmq_port,
        "broker_http_port": broker_http_port,
        "bridge_http_port": bridge_port,
        "consumer_http_port": consumer_port,
        "dashboard_port": dashboard_port,
        "dashboard": dashboard,
        "sites": sites,
        "devices": devices,
        "rate": rate,
        "simulator": simulator,
    }
    settings = load(UpSettings, "up", config_file=path, overrides=flags)
    mqtt_settings = load(MqttSettings, "mqtt", config_file=path, overrides={"url": mqtt})
    amqp_settings = load(AmqpSettings, "amqp", config_file=path, overrides={"url": amqp})
    if mosquitto and mqtt:
        raise ConfigError("--mosquitto", True, "starts a broker; --mqtt uses an existing one")
    running = _already_running(settings.state_dir)
    if running is not None:
        raise ConfigError(
            "up.state_dir",
            settings.state_dir,
            f"`iotpipe up` already runs here (pid {running}); `iotpipe status` shows it",
        )
    pipeline = Pipeline(
        settings,
        mqtt_settings,
        amqp_settings,
        config=path,
        store=store,
        console=Console(),
        err=Console(stderr=True, soft_wrap=True),
    )
    pipeline.check_free()
    code = _run(pipeline, duration)
    raise typer.Exit(code)


def _run(pipeline: Pipeline, duration: float | None) -> int:
    """Start, watch, stop; the exit code."""
    code = 0
    with _signals(pipeline.on_signal):
        try:
            try:
                pipeline.start()
            except StartInterruptedError:
                pipeline.say("interrupted while starting: stopping what runs")
                pipeline.stop()
                return 0
            except StartFailedError as failed:
                _report(pipeline, failed.component, str(failed))
                pipeline.stop()
                return 1
            except IotpipeError:
                pipeline.stop()
                raise
            ready = time.monotonic() - pipeline.began
            pipeline.say(
                f"pipeline running (started in {ready:.1f} s); Ctrl-C stops it\n"
                f"{pipeline.where()}\n  status:    iotpipe status"
            )
            dead = pipeline.watch(duration)
            if dead is not None:
                assert dead.proc is not None
                _report(pipeline, dead, f"the {dead.name} exited with code {dead.proc.returncode}")
                code = 1
            pipeline.stop()
            if not pipeline.clean and code == 0:
                code = 1
        except BaseException:
            pipeline.kill_all()
            raise
        finally:
            pipeline.forget()
    return code


def _report(pipeline: Pipeline, component: Component, message: str) -> None:
    tail = component.log_tail()
    where = f"; last lines of {component.log}:\n{tail}" if tail else ""
    pipeline.err.print(Text.assemble((f"iotpipe up: error: {message}", "red"), where))


up.__doc__ = inspect.cleandoc(up.__doc__ or "") + _EXAMPLES
