"""End-to-end rigs: the real processes of the pipeline, wired together on this machine.

devices (a replayed recording or ``iotpipe simulate``) -> an edge broker (a private Mosquitto,
or the embedded amqtt) -> ``iotpipe bridge`` -> RabbitMQ -> ``iotpipe consume`` -> SQLite or
InfluxDB (a private VictoriaMetrics). Bridges and consumers run as subprocesses of the real CLI,
each with its own config file, log file and HTTP port; :class:`Service` starts, kills and
inspects them (``/metrics``, ``/healthz``).

Tests on the shared RabbitMQ use names of their own: sites ``e2e<unique>...``, a store queue
``e2e.<unique>.store`` and an observer queue on ``iotpipe.dead`` whose messages are filtered by
site, since other tests dead-letter there too. Everything is deleted or killed at teardown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika  # type: ignore[import-untyped]
import pytest

from consumers.store import Message, Value
from iotpipe.amqp import DEAD_EXCHANGE, HEADER_ERROR, HEADER_TOPIC
from iotpipe.envelope import Envelope, Rejection, Status, decode
from iotpipe.recording import RecordedMessage
from tests.conftest import IOTPIPE, free_port, wait_for
from tests.rabbitmq import blocking_channel

# Mosquitto for the fault and scale-out tests (see tests/bridge/test_bridge_faults.py): no cap on
# what waits for an absent bridge (its default silently drops beyond 1000), and a window of
# unacknowledged messages as large as the bridge's, so Mosquitto does not throttle the bridge.
MOSQUITTO_CONFIG = "max_queued_messages 0\nmax_inflight_messages 1000\n"


def _env() -> dict[str, str]:
    """This environment without IOTPIPE_* settings: only the test's config files count."""
    return {key: value for key, value in os.environ.items() if not key.startswith("IOTPIPE_")}


def _toml(value: object) -> str:
    """A TOML value (JSON's strings, numbers, booleans and arrays are valid TOML)."""
    return json.dumps(str(value) if isinstance(value, Path) else value)


def write_config(path: Path, sections: Mapping[str, Mapping[str, object]]) -> Path:
    """Write ``{section: {key: value}}`` as a TOML file."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


# -- metrics --------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``, in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        found = _SAMPLE.match(line)
        if found is None or found.group(1) != name:
            continue
        have = dict(_LABEL.findall(found.group(2) or ""))
        if all(have.get(key) == value for key, value in labels.items()):
            total += float(found.group(3))
    return total


# -- bridge and consumer processes ----------------------------------------------------------------


class Service:
    """``iotpipe bridge`` or ``iotpipe consume`` as a subprocess, restartable on the same config.

    Every start gets its own log file (``<name>-<n>.log``) and a fresh HTTP port (passed as
    ``--http-port``), so what a run logged and served is never confused with an earlier one.
    """

    def __init__(self, workdir: Path, name: str, command: str, config: Path) -> None:
        self.workdir = workdir
        self.name = name
        self.command = command
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.http_port = 0
        self.starts = 0
        self.kills = 0

    @property
    def log(self) -> Path:
        """The log of the current (or last) run."""
        return self.workdir / f"{self.name}-{self.starts}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Service:
        """Start the process (does not wait: see :meth:`wait_ready`)."""
        assert not self.running, f"{self.name} is already running"
        self.starts += 1
        self.http_port = self.next_port()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(),
                cwd=self.workdir,
            )
        return self

    def next_port(self) -> int:
        """The HTTP port of the next run."""
        return free_port()

    def argv(self) -> list[str]:
        """The command line of a run."""
        return [
            *IOTPIPE,
            "--log-level",
            "info",
            self.command,
            "--config",
            str(self.config),
            "--http-port",
            str(self.http_port),
        ]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the process serves /healthz with MQTT up (bridge) or is consuming (consumer)."""

        def ready() -> bool:
            if not self.running:
                pytest.fail(f"{self.name} exited\n{self.tail()}", pytrace=False)
            if self.command == "consume":
                return "consuming queue=" in self.log.read_text(errors="replace")
            health = self.health()
            return health is not None and health.get("mqtt") == "up"

        wait_for(ready, timeout, f"{self.name} to be ready")

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut would."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.kills += 1

    def terminate(self, timeout: float = 40.0) -> int | None:
        """SIGTERM and wait for the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.proc.returncode

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}{path}", timeout=5
            ) as response:
                body: bytes = response.read()
                return body
        except urllib.error.HTTPError as err:  # 503 still carries the JSON
            return err.read()
        except OSError:
            return None

    def health(self) -> dict[str, Any] | None:
        """/healthz as a dict, or None while nothing answers."""
        body = self._get("/healthz")
        return None if body is None else dict(json.loads(body))

    def metric(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples matching ``labels`` on /metrics (0 while unreachable)."""
        body = self._get("/metrics")
        return 0.0 if body is None else metric_sum(body.decode(), name, **labels)

    def settled(self) -> bool:
        """Bridge only: connected both ways, spool empty, nothing unacknowledged to MQTT."""
        health = self.health()
        return (
            health is not None
            and health["mqtt"] == "up"
            and health["amqp"] == "up"
            and health["spool"]["depth"] == 0
            and health["unacked"] == 0
        )

    def tail(self, lines: int = 25) -> str:
        """The last lines of every run's log."""
        out = []
        for n in range(1, self.starts + 1):
            path = self.workdir / f"{self.name}-{n}.log"
            text = path.read_text(errors="replace").splitlines() if path.is_file() else []
            out.append(f"--- {path.name}\n" + "\n".join(text[-lines:]))
        return "\n".join(out)


class Services:
    """Every bridge and consumer a test started; all SIGKILLed at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.all: list[Service] = []
        self.others: list[subprocess.Popen[bytes]] = []

    def bridge(
        self,
        name: str,
        *,
        mqtt_url: str,
        amqp_url: str,
        client_id: str,
        shared_group: str = "",
        topics: Sequence[str] | None = None,
        sections: Mapping[str, Mapping[str, object]] | None = None,
        **more: object,
    ) -> Service:
        """A bridge with its own client id and spool (not started yet); ``more``: [bridge] settings,
        ``sections``: more sections of its config (e.g. ``{"mqtt.tls": {...}}``)."""
        bridge: dict[str, object] = {
            "client_id": client_id,
            "spool_path": self.workdir / f"{name}.spool.db",
            # The machine is shared by several test suites: fsync buys nothing here.
            "spool_durability": "process",
        } | more
        if shared_group:
            bridge["shared_group"] = shared_group
        if topics is not None:
            bridge["topics"] = list(topics)
        config_sections: dict[str, Mapping[str, object]] = {
            "mqtt": {"url": mqtt_url},
            "amqp": {"url": amqp_url},
            "bridge": bridge,
        }
        config = write_config(self.workdir / f"{name}.toml", config_sections | dict(sections or {}))
        return self._add(Service(self.workdir, name, "bridge", config))

    def consumer(
        self,
        name: str,
        *,
        amqp_url: str,
        store: str,
        queue: str,
        bindings: Sequence[str],
        sections: Mapping[str, Mapping[str, object]] | None = None,
        **more: object,
    ) -> Service:
        """A consumer on ``queue`` writing to ``store`` (not started yet); ``sections`` as for
        :meth:`bridge`."""
        consume: dict[str, object] = {
            "store": store,
            "queue": queue,
            "bindings": list(bindings),
            "batch_latency": 0.05,
            "durability": "process",
            # A free port for whatever runs on this config without --http-port (the crashing
            # consumer): the default 9182 may belong to a pipeline running on this machine.
            "http_port": 0,
        } | more
        config_sections: dict[str, Mapping[str, object]] = {
            "amqp": {"url": amqp_url},
            "consume": consume,
        }
        config = write_config(self.workdir / f"{name}.toml", config_sections | dict(sections or {}))
        return self._add(Service(self.workdir, name, "consume", config))

    def agent(self, name: str, *, mqtt_url: str, site: str, **edge: object) -> EdgeAgent:
        """An edge agent ``name`` (its device name too) with :data:`AGENT_SETTINGS` updated by
        ``edge`` and :data:`AGENT_SENSORS` (not started yet)."""
        port = free_port()
        settings = AGENT_SETTINGS | {
            "site": site,
            "device": name,
            "state_dir": self.workdir / name,
            "http_port": port,
        }
        config = write_config(
            self.workdir / f"{name}.toml",
            {"mqtt": {"url": mqtt_url, "keepalive": 5}, "edge": settings | edge},
        )
        with config.open("a") as out:
            out.write(AGENT_SENSORS)
        agent = EdgeAgent(self.workdir, name, "edge run", config, port)
        self.all.append(agent)
        return agent

    def spawn(
        self, name: str, argv: Sequence[str], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Another process of the test (output to ``<name>.log``), SIGKILLed at teardown."""
        with (self.workdir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(),
                cwd=cwd or self.workdir,
            )
        self.others.append(proc)
        return proc

    def _add(self, service: Service) -> Service:
        self.all.append(service)
        return service

    def logs(self) -> str:
        """Every service's log tails, for a failure message."""
        return "\n".join(service.tail() for service in self.all)

    def kill_all(self) -> None:
        for service in self.all:
            service.kill()
        for proc in self.others:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


# -- edge agents ----------------------------------------------------------------------------------

#: Agents of the fault tests: one reading per envelope, committed at once, reconnecting within 2 s,
#: draining a backlog fast (``drain_rate``), no clock-sync marker needed.
AGENT_SETTINGS: dict[str, object] = {
    "batch_max_readings": 1,
    "batch_max_delay": 0.5,
    "commit_max_delay": 0.0,
    "durability": "process",
    "drain_rate": 200.0,
    "reconnect_min": 0.2,
    "reconnect_max": 2.0,
    "stop_timeout": 10.0,
    "clock_sync_files": [],
    "stats_interval": 5.0,
}

#: Three simulated sensors read at 10 Hz: 30 envelopes/s per agent.
AGENT_SENSORS = """
[[edge.sensors]]
type = "simulated"
interval = 0.1
sensors = ["temperature", "humidity", "pressure"]
seed = 1
"""


class EdgeAgent(Service):
    """``iotpipe edge run`` as a subprocess; its HTTP port is fixed in its config file."""

    def __init__(self, workdir: Path, name: str, command: str, config: Path, port: int) -> None:
        super().__init__(workdir, name, command, config)
        self.port = port

    @property
    def outbox(self) -> Path:
        return self.workdir / self.name / "outbox.db"

    def next_port(self) -> int:
        return self.port

    def argv(self) -> list[str]:
        return [
            *IOTPIPE,
            "--log-level",
            "info",
            *self.command.split(),
            "--config",
            str(self.config),
        ]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the agent serves /healthz connected to its broker."""

        def ready() -> bool:
            if not self.running:
                pytest.fail(f"{self.name} exited\n{self.tail()}", pytrace=False)
            health = self.health()
            return health is not None and bool(health.get("connected"))

        wait_for(ready, timeout, f"{self.name} to be connected")


@dataclass(frozen=True)
class OutboxState:
    """What an agent's outbox file says once the agent stopped.

    Attributes:
        boot: the boot of its envelopes.
        next_seq: envelopes committed in that boot (seq 0 .. next_seq - 1).
        left: envelopes still in the outbox.
        dropped: envelopes thinned to stay under the budget.
    """

    boot: str
    next_seq: int
    left: int
    dropped: int


def read_outbox(path: Path) -> OutboxState:
    """The counters and depth of an outbox file (of an agent that is not running)."""
    with readonly(path) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        left = int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    return OutboxState(
        meta["boot"], int(meta["next_seq"]), left, int(meta.get("dropped_envelopes", 0))
    )


@dataclass(frozen=True)
class Reckoning:
    """Every envelope the agents committed against what the store holds, per (device, boot, seq).

    Attributes:
        sent: envelopes the agents committed.
        stored: distinct committed envelopes in the store.
        lost: committed and not stored (thinned ones included: they count as lost).
        doubled: envelopes stored more than once (a second id or a second reading).
        strangers: stored envelopes of the site that no agent committed.
        thinned: envelopes the agents dropped to stay under their budget.
        left: envelopes still in the agents' outboxes.
    """

    sent: int
    stored: int
    lost: int
    doubled: int
    strangers: int
    thinned: int
    left: int


def reckon(db: Path, site: str, agents: Iterable[EdgeAgent]) -> Reckoning:
    """Compare the stopped ``agents``' outbox counters with what the store holds of their devices."""
    outboxes = {agent.name: read_outbox(agent.outbox) for agent in agents}
    committed = {
        (device, state.boot, seq)
        for device, state in outboxes.items()
        for seq in range(state.next_seq)
    }
    with readonly(db) as conn:
        copies: Counter[tuple[str, str, int]] = Counter(
            (device, boot, int(seq))
            for device, boot, seq in conn.execute(
                "SELECT device, boot, seq FROM messages WHERE site = ?", (site,)
            )
            if device in outboxes
        )
        ids = [
            msg_id
            for msg_id, device in conn.execute(
                "SELECT id, device FROM messages WHERE site = ?", (site,)
            )
            if device in outboxes
        ]
    everything = stored_ids(db)
    readings = {msg_id: everything[msg_id] for msg_id in ids}
    return Reckoning(
        sent=len(committed),
        stored=len(committed & copies.keys()),
        lost=len(committed - copies.keys()),
        doubled=sum(n - 1 for n in copies.values())
        + extra_readings(readings, dict.fromkeys(readings, 1)),
        strangers=len(copies.keys() - committed),
        thinned=sum(s.dropped for s in outboxes.values()),
        left=sum(s.left for s in outboxes.values()),
    )


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    """Start bridges and consumers as subprocesses; every one is killed at teardown."""
    started = Services(tmp_path)
    yield started
    started.kill_all()


@dataclass(frozen=True)
class QueueNames:
    """The test's own queues on the shared RabbitMQ: the store queue and a dead-letter observer."""

    store: str
    dead: str


@pytest.fixture
def shared_queues(rabbitmq_url: str, unique: str, services: Services) -> Iterator[QueueNames]:
    """Queue names of the test's own; the queues are deleted at teardown, after the services died.

    (A consumer still running would declare its queue again.)
    """
    names = QueueNames(f"e2e.{unique}.store", f"e2e.{unique}.dead")
    yield names
    services.kill_all()
    with blocking_channel(rabbitmq_url) as channel:
        for queue in (names.store, names.dead):
            channel.queue_delete(queue)


# -- dead letters ---------------------------------------------------------------------------------

#: One dead letter as compared: (routing key, x-iotpipe-topic, x-iotpipe-error, body).
DeadLetter = tuple[str, str, str, bytes]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class DeadLetterObserver:
    """A queue of the test's own bound to ``iotpipe.dead`` (``bridge.#`` and ``consumer.#``).

    Other tests dead-letter on the same broker, so :meth:`take` keeps only messages whose
    ``x-iotpipe-topic`` (bridge) or body (consumer) names one of the test's sites.
    """

    url: str
    queue: str
    sites: tuple[str, ...]
    taken: list[DeadLetter] = field(default_factory=list)

    def declare(self) -> DeadLetterObserver:
        with blocking_channel(self.url) as channel:
            channel.exchange_declare(DEAD_EXCHANGE, exchange_type="topic", durable=True)
            channel.queue_declare(self.queue, durable=True)
            for key in ("bridge.#", "consumer.#"):
                channel.queue_bind(self.queue, DEAD_EXCHANGE, routing_key=key)
        return self

    def _ours(self, topic: str, body: bytes) -> bool:
        parts = topic.split("/")
        if len(parts) > 2 and parts[2] in self.sites:
            return True
        return any(site.encode() in body for site in self.sites)

    def take(self) -> list[DeadLetter]:
        """Take (and ack) every message now in the queue; returns the test's, also kept in ``taken``."""
        new: list[DeadLetter] = []
        with blocking_channel(self.url) as channel:
            while True:
                method, properties, body = channel.basic_get(self.queue, auto_ack=True)
                if method is None:
                    break
                headers = dict(properties.headers or {})
                topic = _text(headers.get(HEADER_TOPIC, ""))
                if self._ours(topic, body):
                    error = _text(headers.get(HEADER_ERROR, ""))
                    new.append((method.routing_key, topic, error, body))
        self.taken.extend(new)
        return new


# -- what a recording must produce ----------------------------------------------------------------

#: A reading as the store identifies it: (site, device, sensor, reading time in ms).
ReadingKey = tuple[str, str, str, int]


def comparable(value: Value) -> tuple[str, object]:
    """A value with its kind, so that ``True`` and ``1.0`` (or ``21`` and ``21.0``) compare right."""
    if isinstance(value, bool):
        return ("boolean", value)
    if isinstance(value, int | float):
        return ("number", float(value))
    return ("string", value)


@dataclass(frozen=True)
class StoredReading:
    """What the store must hold for one reading."""

    msg_id: str
    value: tuple[str, object]
    unit: str | None
    tags: tuple[tuple[str, str], ...]


@dataclass
class Expectation:
    """What a pipeline storing each reading exactly once must end with, computed with the codec.

    Attributes:
        readings: every distinct reading of the valid envelopes, from the first copy of its id
            (copies of an id carry the same payload; the store keeps the first).
        rejected: the dead letters the bridge must publish, one per rejected message, counted.
        envelopes: valid telemetry publishes (copies included).
        ids: distinct envelope ids.
        statuses: status messages.
        last_state: each device's last status in arrival order.
        state_ties: devices whose last status shares its ``ts`` with an earlier one of another
            state (the store keeps the first of equal timestamps, so its state differs).
    """

    readings: dict[ReadingKey, StoredReading] = field(default_factory=dict)
    rejected: Counter[DeadLetter] = field(default_factory=Counter)
    envelopes: int = 0
    ids: set[str] = field(default_factory=set)
    statuses: int = 0
    last_state: dict[tuple[str, str], str] = field(default_factory=dict)
    state_ties: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def of(cls, messages: Iterable[RecordedMessage]) -> Expectation:
        out = cls()
        history: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for recorded in messages:
            decoded = decode(recorded.topic, recorded.payload)
            if isinstance(decoded, Rejection):
                key = f"bridge.{decoded.reason.value}"
                out.rejected[key, recorded.topic, str(decoded), recorded.payload] += 1
            elif isinstance(decoded, Status):
                out.statuses += 1
                device = (decoded.site, decoded.device)
                history.setdefault(device, []).append((decoded.timestamp_ms, decoded.state))
                out.last_state[device] = decoded.state
            elif isinstance(decoded, Envelope):
                out.envelopes += 1
                if decoded.id in out.ids:
                    continue
                out.ids.add(decoded.id)
                message = Message.from_envelope(decoded)
                tags = tuple(sorted(message.tags.items()))
                for reading in message.readings:
                    out.readings.setdefault(
                        (message.site, message.device, reading.sensor, reading.ts_ms),
                        StoredReading(message.id, comparable(reading.value), reading.unit, tags),
                    )
        for device, seen in history.items():
            newest = max(ts for ts, _state in seen)
            if len({state for ts, state in seen if ts == newest}) > 1:
                out.state_ties.add(device)
        return out

    @property
    def reasons(self) -> Counter[str]:
        """Rejections by routing key."""
        counts: Counter[str] = Counter()
        for (key, *_rest), n in self.rejected.items():
            counts[key] += n
        return counts


def relabel(messages: Iterable[RecordedMessage], sites: Mapping[str, str]) -> list[RecordedMessage]:
    """The messages with every site name replaced, in topics and payloads alike.

    The new names must not be shorter than the old ones: the oversized payload of a recording
    is often just one byte over the limit.
    """
    out = []
    for message in messages:
        topic, payload = message.topic, message.payload
        for old, new in sites.items():
            assert len(new) >= len(old), f"{new!r} is shorter than {old!r}"
            topic = topic.replace(f"/{old}/", f"/{new}/")
            payload = payload.replace(old.encode(), new.encode())
        out.append(dataclasses.replace(message, topic=topic, payload=payload))
    return out


# -- reading a SQLite store -----------------------------------------------------------------------


def readonly(db: Path) -> contextlib.closing[sqlite3.Connection]:
    """A read-only connection to a store file (never blocks a writing consumer)."""
    return contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30))


def count_rows(db: Path, table: str) -> int:
    """Rows in ``table`` (0 while the file or table does not exist yet)."""
    if not db.exists():
        return 0
    with readonly(db) as conn:
        try:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def stored_ids(db: Path) -> Counter[str]:
    """Readings stored per message id, for every id in the ``messages`` table (0 if none)."""
    with readonly(db) as conn:
        counts: Counter[str] = Counter(
            {row[0]: 0 for row in conn.execute("SELECT id FROM messages")}
        )
        for msg_id, n in conn.execute("SELECT msg_id, count(*) FROM readings GROUP BY msg_id"):
            counts[msg_id] += n
    return counts


def extra_readings(stored: Mapping[str, int], sent: Mapping[str, int]) -> int:
    """Readings stored beyond what each id carried (a message stored twice would show here)."""
    return sum(max(0, n - sent.get(msg_id, 0)) for msg_id, n in stored.items())


# -- the printed row ------------------------------------------------------------------------------


def print_row(test: str, **columns: object) -> str:
    """Print one summary row (``pytest -s`` shows it) and return it."""
    cells = "  ".join(f"{key}={value}" for key, value in columns.items())
    row = f"E2E {test:<34} {cells}"
    print(f"\n{row}")
    return row


def wait_until(
    condition: Callable[[], object], timeout: float, what: str, diagnostics: Callable[[], str]
) -> None:
    """``wait_for`` that adds ``diagnostics()`` (the services' logs) to the failure."""
    try:
        wait_for(condition, timeout, what)
    except pytest.fail.Exception as failed:
        pytest.fail(f"{failed.msg}\n{diagnostics()}", pytrace=False)


def queue_depth(url: str, queue: str) -> int:
    """Messages ready in ``queue`` (-1 if the broker cannot be reached or it does not exist)."""
    try:
        with blocking_channel(url) as channel:
            return int(channel.queue_declare(queue, passive=True).method.message_count)
    except pika.exceptions.AMQPError:
        return -1


def elapsed_since(began: float) -> str:
    return f"{time.monotonic() - began:.1f}s"
