"""Receipts under faults: every envelope the agents committed ends in the store once, whatever drops.

Real processes on private brokers: ``iotpipe edge run`` agents (3 simulated sensors at 10 Hz,
one reading per envelope: 30 envelopes/s each) -> an edge broker (a private Mosquitto, or
``iotpipe broker``) -> ``iotpipe bridge`` -> a private RabbitMQ node -> ``iotpipe consume`` ->
SQLite, receipts flowing back the same way. Each test breaks one hop while the agents stream,
repairs it, stops the agents (SIGTERM) and reckons per (device, boot, seq): what the agents
committed (their outbox's ``next_seq``) against the store's ``messages`` table. 0 lost, 0
doubled, every outbox empty. Resend timeouts are clamped to a few seconds
(``receipt_timeout_max``) so that a lost envelope comes back within the test's time.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from consumers.query import store_stats
from iotpipe.envelope import Envelope, decode
from tests.conftest import MosquittoProcess, free_port, wait_port
from tests.consumers.crashing_consumer import EXIT_CODE
from tests.e2e.conftest import (
    IOTPIPE,
    EdgeAgent,
    Reckoning,
    Service,
    Services,
    count_rows,
    print_row,
    readonly,
    reckon,
    wait_until,
)
from tests.fixtures_replay import CaptureFactory
from tests.rabbitmq import PrivateRabbit, rabbitmq_bin

pytestmark = [pytest.mark.slow, pytest.mark.mqtt, pytest.mark.mosquitto, pytest.mark.rabbitmq]

#: Agent settings of every test: a lost envelope is resent 2-5 s (+-20 %) after its PUBACK.
RECEIPTS: dict[str, object] = {
    "receipts": "on",
    "receipt_timeout_min": 2.0,
    "receipt_timeout_max": 5.0,
}

#: Debian's stock Mosquitto limits: at most 1000 messages queued per client, 20 in flight.
STOCK_MOSQUITTO = "max_queued_messages 1000\nmax_inflight_messages 20\n"

#: What Mosquitto logs when a client's queue overflows.
MOSQUITTO_DROPS = "Outgoing messages are being dropped for client"

#: The repository root (``python -m tests...`` runs from there).
ROOT = Path(__file__).resolve().parents[2]


class Deadline:
    """A test's hard deadline: every wait gets at most what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.began = time.monotonic()
        self.end = self.began + seconds

    def left(self, cap: float) -> float:
        """At most ``cap`` seconds, and no more than remain (fails once the deadline passed)."""
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            pytest.fail("the test's deadline passed", pytrace=False)
        return min(cap, remaining)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.began


@pytest.fixture(scope="module")
def module_rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbit]:
    """A private RabbitMQ node for the tests that do not stop it (no stray consumer receipts)."""
    if rabbitmq_bin() is None:
        pytest.fail("rabbitmq-server is not installed: run `make setup`", pytrace=False)
    node = PrivateRabbit(tmp_path_factory.mktemp("receipts-rabbitmq"))
    try:
        node.start()
        yield node
    finally:
        node.kill()
        shutil.rmtree(node.mnesia, ignore_errors=True)


def mosquitto(tmp_path: Path, config: str = "") -> MosquittoProcess:
    """A started private Mosquitto (persistence on, default autosave) with ``config`` added."""
    broker = MosquittoProcess(tmp_path / "mosquitto", free_port(), config)
    broker.start()
    return broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A private Mosquitto without queue limits (see tests/conftest.py)."""
    started = mosquitto(tmp_path)
    yield started
    started.stop()


@pytest.fixture
def stock_mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A private Mosquitto with Debian's default queue limits."""
    broker = mosquitto(tmp_path, STOCK_MOSQUITTO)
    yield broker
    broker.stop()


def mosquitto_drops(broker: MosquittoProcess) -> int:
    """How often Mosquitto logged that it dropped messages for a client."""
    log = broker.workdir / "mosquitto.log"
    return log.read_text(errors="replace").count(MOSQUITTO_DROPS) if log.is_file() else 0


@dataclass
class Rig:
    """One pipeline: agents -> edge broker -> bridge -> RabbitMQ -> consumer -> SQLite."""

    site: str
    db: Path
    services: Services
    bridge: Service
    consumer: Service
    agents: list[EdgeAgent]
    deadline: Deadline

    def diagnostics(self) -> str:
        return self.services.logs()

    def wait(self, condition: Callable[[], object], cap: float, what: str) -> None:
        wait_until(condition, self.deadline.left(cap), what, self.diagnostics)

    def stored(self) -> int:
        """Envelopes in the store."""
        return count_rows(self.db, "messages")

    def total(self, metric: str, agents: Sequence[EdgeAgent] | None = None) -> float:
        """The sum of an agent metric over ``agents`` (default: all)."""
        return sum(agent.metric(metric) for agent in agents or self.agents)

    def start(self) -> Rig:
        self.consumer.start().wait_ready()
        self.bridge.start().wait_ready()
        for agent in self.agents:
            agent.start()
        for agent in self.agents:
            agent.wait_ready()
        return self

    def streaming(self, envelopes: int) -> None:
        """Wait until ``envelopes`` more of the site are stored."""
        goal = self.stored() + envelopes
        self.wait(lambda: self.stored() >= goal, 60, f"{goal} envelopes stored")

    def finish(self, agents: Sequence[EdgeAgent] | None = None) -> tuple[Reckoning, int]:
        """Let the agents catch up, stop them (SIGTERM) and reckon once the store has it all.

        Returns:
            The reckoning and how many envelopes the agents resent.
        """
        agents = list(agents or self.agents)
        # Caught up: at most ~3 s of data (90 envelopes) waits or is unconfirmed per agent.
        self.wait(
            lambda: all(agent.metric("iotpipe_edge_outbox_envelopes") <= 90 for agent in agents),
            90,
            "the agents' outboxes back to a few seconds of data",
        )
        resent = int(self.total("iotpipe_edge_envelopes_resent_total", agents))
        for agent in agents:
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGTERM)
        for agent in agents:  # one SIGTERM each: a second one could land during its exit
            assert agent.proc is not None
            assert agent.proc.wait(timeout=self.deadline.left(40)) == 0, agent.tail()
        result = reckon(self.db, self.site, agents)
        # What the last agent publishes may still be on its way to the store.
        end = time.monotonic() + self.deadline.left(30)
        while result.lost and time.monotonic() < end:
            time.sleep(0.1)  # a poll: the loop ends on the condition or the deadline
            result = reckon(self.db, self.site, agents)
        return result, resent


def rig(
    services: Services,
    deadline: Deadline,
    unique: str,
    mqtt_url: str,
    amqp_url: str,
    *,
    agents: int = 2,
    bridge: dict[str, object] | None = None,
    edge: dict[str, object] | None = None,
) -> Rig:
    """A pipeline of site ``rf<unique>`` on the test's own queues (not started yet)."""
    site = f"rf{unique}"
    db = services.workdir / "telemetry.db"
    consumer = services.consumer(
        "consumer",
        amqp_url=amqp_url,
        store=f"sqlite:///{db}",
        queue=f"{site}.store",
        bindings=[f"iotpipe.v1.{site}.#"],
    )
    receipts: dict[str, Any] = {
        "receipt_queue": f"{site}.receipts",
        "receipt_binding": f"iotpipe.v1.{site}.*.receipt",
    }
    bridge_service = services.bridge(
        "bridge",
        mqtt_url=mqtt_url,
        amqp_url=amqp_url,
        client_id=f"{site}-bridge",
        **(receipts | (bridge or {})),
    )
    fleet = [
        services.agent(f"pi{n}", mqtt_url=mqtt_url, site=site, **(RECEIPTS | (edge or {})))
        for n in range(1, agents + 1)
    ]
    return Rig(site, db, services, bridge_service, consumer, fleet, deadline)


def check(test: str, rig: Rig, result: Reckoning, resent: int, **more: object) -> None:
    """Print the test's row and assert the promise: nothing lost, nothing doubled, outboxes empty."""
    print_row(
        test,
        sent=result.sent,
        stored=result.stored,
        lost=result.lost,
        doubled=result.doubled,
        resent=resent,
        thinned=result.thinned,
        left=result.left,
        **more,
        time=f"{rig.deadline.elapsed:.0f}s",
    )
    assert result.sent > 0
    assert result.lost == 0, f"{result.lost} of {result.sent} envelopes never stored"
    assert result.doubled == 0, f"{result.doubled} envelopes stored twice"
    assert result.strangers == 0, f"{result.strangers} stored envelopes nobody committed"
    assert result.thinned == 0, "an agent thinned its outbox within its budget"
    assert result.left == 0, f"{result.left} envelopes left in the outboxes"


def test_stock_mosquitto_overflowing_its_queue_loses_nothing(
    stock_mosquitto: MosquittoProcess,
    module_rabbit: PrivateRabbit,
    services: Services,
    unique: str,
) -> None:
    """With the bridge away until stock Mosquitto drops messages, 4 agents still lose and double nothing."""
    deadline = Deadline(150)
    # A window of 500 per agent: 4 x 500 queued for the absent bridge overflow Mosquitto's 1000.
    pipeline = rig(
        services,
        deadline,
        unique,
        f"mqtt://127.0.0.1:{stock_mosquitto.port}",
        module_rabbit.url,
        agents=4,
        edge={"receipt_window": 500},
    ).start()
    pipeline.streaming(300)
    pipeline.bridge.terminate()
    down = time.monotonic()
    pipeline.wait(
        lambda: (
            mosquitto_drops(stock_mosquitto) > 0
            and pipeline.total("iotpipe_edge_unconfirmed") >= 4 * 500
        ),
        60,
        "Mosquitto to drop messages and every agent's window to fill",
    )
    held = int(pipeline.total("iotpipe_edge_outbox_envelopes"))
    outage = time.monotonic() - down
    pipeline.bridge.start().wait_ready()
    result, resent = pipeline.finish()
    check(
        "receipts: stock mosquitto overflow",
        pipeline,
        result,
        resent,
        mosquitto_drops=mosquitto_drops(stock_mosquitto),
        held_at_restart=held,
        bridge_down=f"{outage:.0f}s",
    )
    assert mosquitto_drops(stock_mosquitto) > 0
    assert resent > 0, "the envelopes Mosquitto dropped were resent"


def test_sigkilled_mosquitto_loses_nothing(
    broker: MosquittoProcess, module_rabbit: PrivateRabbit, services: Services, unique: str
) -> None:
    """Mosquitto SIGKILLed (persistence on, default autosave) holding acknowledged envelopes loses nothing."""
    deadline = Deadline(120)
    pipeline = rig(
        services, deadline, unique, f"mqtt://127.0.0.1:{broker.port}", module_rabbit.url
    ).start()
    pipeline.streaming(200)
    # The bridge paused (SIGSTOP): Mosquitto holds what it acknowledged in memory only.
    bridge = pipeline.bridge.proc
    assert bridge is not None
    assert broker.proc is not None
    bridge.send_signal(signal.SIGSTOP)
    try:
        goal = pipeline.total("iotpipe_edge_envelopes_published_total") + 100
        pipeline.wait(
            lambda: pipeline.total("iotpipe_edge_envelopes_published_total") >= goal,
            30,
            "100 envelopes acknowledged by Mosquitto while the bridge is paused",
        )
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait(timeout=10)
        broker.start()
    finally:
        bridge.send_signal(signal.SIGCONT)
    pipeline.streaming(200)
    result, resent = pipeline.finish()
    check("receipts: mosquitto SIGKILL", pipeline, result, resent)


@pytest.fixture
def embedded_broker(services: Services) -> str:
    """``iotpipe broker`` as a process on a free port; its URL."""
    port = free_port()
    services.spawn("broker", [*IOTPIPE, "broker", "--port", str(port), "--http-port", "0"])
    wait_port(port, timeout=30)
    return f"mqtt://127.0.0.1:{port}"


def test_embedded_broker_with_sigkilled_bridge_loses_nothing(
    embedded_broker: str, module_rabbit: PrivateRabbit, services: Services, unique: str
) -> None:
    """Through ``iotpipe broker``, a bridge SIGKILLed mid-stream and restarted loses nothing."""
    deadline = Deadline(120)
    pipeline = rig(services, deadline, unique, embedded_broker, module_rabbit.url).start()
    pipeline.streaming(200)
    pipeline.bridge.kill()
    pipeline.bridge.start().wait_ready()
    pipeline.streaming(200)
    result, resent = pipeline.finish()
    check("receipts: amqtt, bridge SIGKILL", pipeline, result, resent)


def test_consumer_killed_between_commit_and_receipt_gets_the_envelopes_resent_and_stores_once(
    broker: MosquittoProcess,
    module_rabbit: PrivateRabbit,
    services: Services,
    capture: CaptureFactory,
    unique: str,
) -> None:
    """A consumer dying after a commit, before its receipt: the agents resend, the store keeps one copy."""
    deadline = Deadline(120)
    mqtt_url = f"mqtt://127.0.0.1:{broker.port}"
    pipeline = rig(services, deadline, unique, mqtt_url, module_rabbit.url)
    published = capture(mqtt_url, f"iotpipe/v1/{pipeline.site}/+/telemetry", qos=1)
    # The crashing consumer on the same config: exits right after its 40th commit.
    crashing = services.spawn(
        "crashing-consumer",
        [
            # a test harness around the consumer: this checkout's code, whatever IOTPIPE_CLI says
            sys.executable,
            "-m",
            "tests.consumers.crashing_consumer",
            str(pipeline.consumer.config),
            "40",
        ],
        cwd=ROOT,
    )
    pipeline.bridge.start().wait_ready()
    for agent in pipeline.agents:
        agent.start()
    pipeline.wait(lambda: crashing.poll() is not None, 60, "the consumer to crash")
    assert crashing.returncode == EXIT_CODE
    with readonly(pipeline.db) as conn:
        last = [
            row[0]
            for row in conn.execute(
                "SELECT id FROM messages WHERE stored_ms = (SELECT max(stored_ms) FROM messages)"
            )
        ]
    assert last, "the crashed consumer committed a batch"

    def copies() -> Counter[str]:
        seen: Counter[str] = Counter()
        for message in list(published.messages):
            decoded = decode(message.topic, message.payload)
            if isinstance(decoded, Envelope):
                seen[decoded.id] += 1
        return seen

    pipeline.wait(
        lambda: all(copies()[i] >= 2 for i in last),
        30,
        "the agents to resend the envelopes of the unreceipted commit",
    )
    pipeline.consumer.start().wait_ready()
    result, resent = pipeline.finish()
    absorbed = store_stats(pipeline.db).duplicates
    check(
        "receipts: consumer dies before receipt",
        pipeline,
        result,
        resent,
        crash_batch=len(last),
        absorbed=absorbed,
    )
    assert absorbed > 0, "the resent copies reached the store and were absorbed"


def test_rabbitmq_stopped_under_load_devices_hold_the_data(
    broker: MosquittoProcess, private_rabbit: PrivateRabbit, services: Services, unique: str
) -> None:
    """RabbitMQ stopped 30 s under load: the agents hold their window and keep the rest, nothing lost."""
    deadline = Deadline(150)
    outage = 30.0
    pipeline = rig(
        services, deadline, unique, f"mqtt://127.0.0.1:{broker.port}", private_rabbit.url
    ).start()
    pipeline.streaming(200)
    private_rabbit.stop()
    down = time.monotonic()
    pipeline.wait(
        lambda: pipeline.total("iotpipe_edge_unconfirmed") >= 2 * 256,
        outage,
        "the agents' windows to fill",
    )
    # The rest of the outage: data waits in the outboxes.
    pipeline.wait(lambda: time.monotonic() - down >= outage, outage, "the outage to last")
    held = int(pipeline.total("iotpipe_edge_outbox_envelopes"))
    unconfirmed = int(pipeline.total("iotpipe_edge_unconfirmed"))
    thinned = int(pipeline.total("iotpipe_edge_outbox_dropped_total"))
    private_rabbit.start(timeout=deadline.left(90))
    result, resent = pipeline.finish()
    check(
        "receipts: rabbitmq stopped 30 s",
        pipeline,
        result,
        resent,
        held_at_restart=held,
        unconfirmed_at_restart=unconfirmed,
        outage=f"{outage:.0f}s",
    )
    assert unconfirmed == 2 * 256, "each agent held its window, no more"
    assert held > unconfirmed, "the rest waited in the outboxes"
    assert thinned == 0


def test_without_receipts_auto_agents_fall_back_and_on_agents_hold_their_window(
    broker: MosquittoProcess, module_rabbit: PrivateRabbit, services: Services, unique: str
) -> None:
    """A bridge carrying no receipts: an auto agent deletes on PUBACK (receipts_active 0), an on agent
    holds its window of unconfirmed envelopes while its outbox grows up to its budget."""
    deadline = Deadline(90)
    mqtt_url = f"mqtt://127.0.0.1:{broker.port}"
    pipeline = rig(
        services,
        deadline,
        unique,
        mqtt_url,
        module_rabbit.url,
        agents=0,
        bridge={"receipts": False},
    )
    auto = services.agent("auto", mqtt_url=mqtt_url, site=pipeline.site, receipts="auto")
    on = services.agent(
        "on",
        mqtt_url=mqtt_url,
        site=pipeline.site,
        receipts="on",
        receipt_window=60,
        outbox_max_bytes=64 * 1024,
    )
    pipeline.agents = [auto, on]
    pipeline.start()
    pipeline.wait(
        lambda: on.metric("iotpipe_edge_outbox_dropped_total") > 0,
        40,
        "the on agent's outbox to reach its budget",
    )
    assert on.metric("iotpipe_edge_unconfirmed") == 60
    assert on.metric("iotpipe_edge_outbox_bytes") <= 64 * 1024
    assert auto.metric("iotpipe_edge_receipts_active") == 0
    assert auto.metric("iotpipe_edge_unconfirmed") == 0
    assert auto.metric("iotpipe_edge_outbox_envelopes") <= 30
    assert (auto.health() or {}).get("receipts") == "inactive"
    result, resent = pipeline.finish([auto])
    warnings = [line for line in auto.log.read_text().splitlines() if "WARNING" in line]
    check(
        "receipts: none flowing (auto agent)",
        pipeline,
        result,
        resent,
        on_unconfirmed=60,
        on_thinned=int(on.metric("iotpipe_edge_outbox_dropped_total")),
    )
    assert any("receipt" in line for line in warnings), "one warning says receipts are off"
