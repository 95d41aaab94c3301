"""Cluster faults: a 3-node RabbitMQ cluster loses a node under load, and the store misses nothing.

The pipeline on private brokers: ``iotpipe simulate`` -> a private Mosquitto -> ``iotpipe bridge``
-> a private 3-node RabbitMQ cluster (:class:`~tests.rabbitmq.PrivateCluster`, one per module,
restored between tests) -> ``iotpipe consume`` -> SQLite. The bridge and the consumer are given
all three nodes (``[amqp] url`` + ``urls``); the store queue is a quorum queue on all three
(``quorum_group_size = 3``). The consumer starts on node 1 (where it declares the queue, so its
leader is there) and the bridge on node 2, so that the two kills below hit different things:

- SIGKILL the node the bridge is connected to: the bridge fails over to the next node;
- SIGKILL the queue's leader: the bridge stays connected, the two followers elect a new leader
  and the confirms resume; the consumer (connected to the dead node) fails over;
- a rolling restart of all three nodes, each stopped only when ``rabbitmq-queues
  check_if_node_is_quorum_critical`` says the queue keeps a majority without it.

Each test prints one row: sent, stored, lost, doubled, and the failover times: from the fault to
the bridge's next confirmed publish (``iotpipe_bridge_forwarded`` rises) and to the next stored
message (``messages`` rows rise). ``pytest -s`` shows them.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from iotpipe.amqp_consumer import BatchConsumer, QueueSpec
from iotpipe.settings import AmqpSettings
from iotpipe.testing import Capture
from tests.conftest import MosquittoProcess, free_port, wait_for
from tests.e2e.conftest import (
    MOSQUITTO_CONFIG,
    Services,
    count_rows,
    extra_readings,
    print_row,
    queue_depth,
    stored_ids,
    wait_until,
)
from tests.e2e.simulation import Simulator, sent
from tests.fixtures_replay import CaptureFactory
from tests.rabbitmq import PrivateCluster, PrivateRabbit, rabbitmq_bin

pytestmark = [pytest.mark.slow, pytest.mark.mqtt, pytest.mark.mosquitto, pytest.mark.rabbitmq]

#: 10 devices x 40 envelopes/s = 400 messages/s.
DEVICES = 10
RATE = 40
#: A kill lands after KILL_AFTER messages; the stream goes on for as long again and more.
KILL_AFTER = 2000
KILL_COUNT = 6000
#: Three graceful restarts take ~10 s each on this machine: 60 s of stream leaves a margin.
ROLLING_COUNT = 24_000
SENSORS = "temperature,humidity"
#: What a failover may take at most before the test calls it a failure.
FAILOVER_LIMIT = 60.0
_NODE_URL = re.compile(r"amqp (?:publisher ready|reconnected) url=\S+:(\d+)/")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    """A 3-node private RabbitMQ cluster for the module; SIGKILLed at the end."""
    if rabbitmq_bin() is None:
        pytest.fail("rabbitmq-server is not installed: run `make setup`", pytrace=False)
    nodes = PrivateCluster(tmp_path_factory.mktemp("cluster"))
    try:
        nodes.start()
        print(f"\ncluster of 3 started in {nodes.start_seconds:.1f} s")
        yield nodes
    finally:
        nodes.kill()


@pytest.fixture
def healthy(cluster: PrivateCluster) -> PrivateCluster:
    """The module's cluster with all three nodes running (whatever the last test left down)."""
    cluster.restore()
    names = {node.name for node in cluster.nodes}
    wait_for(lambda: cluster.running_nodes() == names, 60, "all three nodes in the cluster")
    return cluster


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoProcess]:
    """A private Mosquitto tuned for the bridge (see MOSQUITTO_CONFIG)."""
    broker = MosquittoProcess(tmp_path_factory.mktemp("mosquitto"), free_port(), MOSQUITTO_CONFIG)
    broker.start()
    yield broker
    broker.stop()


class Rig:
    """Bridge, consumer, simulator and capture of one test, wired to every node of the cluster."""

    def __init__(
        self,
        cluster: PrivateCluster,
        mosquitto: MosquittoProcess,
        services: Services,
        capture: CaptureFactory,
        unique: str,
        workdir: Path,
    ) -> None:
        self.cluster = cluster
        self.site = f"cl{unique}"
        self.queue = f"cluster.{unique}"
        self.db = workdir / "telemetry.db"
        self.workdir = workdir
        self.mqtt_url = f"mqtt://127.0.0.1:{mosquitto.port}"
        one, two, three = (node.url for node in cluster.nodes)
        self.consumer = services.consumer(
            "consumer",
            amqp_url=one,
            store=f"sqlite:///{self.db}",
            queue=self.queue,
            bindings=[f"iotpipe.v1.{self.site}.#"],
            quorum_group_size=3,
            sections={"amqp": {"url": one, "urls": [two, three]}},
        )
        self.bridge = services.bridge(
            "bridge",
            mqtt_url=self.mqtt_url,
            amqp_url=two,
            client_id=f"cl-bridge-{unique}",
            sections={"amqp": {"url": two, "urls": [three, one]}},
        )
        self.services = services
        self.capture = capture
        self.simulator: Simulator | None = None
        self.telemetry: Capture | None = None

    def diagnostics(self) -> str:
        tails = "\n".join(node.log_tail(8) for node in self.cluster.nodes)
        return f"{self.services.logs()}\n{tails}"

    def start(self, count: int) -> None:
        """Start consumer and bridge, wait for the queue on all three nodes, start the stream."""
        self.consumer.start().wait_ready()
        # The product's rule, and the 3.10 pitfall it avoids: a quorum queue whose members have
        # not all started yet can be left without a leader by a kill (see docs/scaling.md).
        wait_until(
            lambda: len(self.cluster.queue(self.queue)["online"]) == 3,
            30,
            "the quorum queue online on all three nodes",
            self.diagnostics,
        )
        self.bridge.start().wait_ready()
        self.telemetry = self.capture(self.mqtt_url, f"iotpipe/v1/{self.site}/+/telemetry", qos=1)
        self.simulator = Simulator(
            self.workdir,
            [
                "--mqtt", self.mqtt_url,
                "--seed", "20261207",
                "--sites", "1",
                "--site-pattern", self.site,
                "--devices", str(DEVICES),
                "--sensors", SENSORS,
                "--rate", str(RATE),
                "--count", str(count),
                "--receipts", "off",
            ],
        ).start()  # fmt: skip

    def wait_sent(self, goal: int) -> None:
        """Wait until ``goal`` messages were published (the stream must still be running)."""
        wait_until(lambda: self.sent_count() >= goal, 60, f"{goal} sent", self.diagnostics)
        assert self.simulator is not None
        assert self.simulator.running, "the stream ended too early: raise its count"

    def sent_count(self) -> int:
        """Telemetry publishes the capture has seen so far."""
        assert self.telemetry is not None, "start() first"
        return self.telemetry.count()

    def bridge_node(self) -> PrivateRabbit:
        """The node the bridge is connected to now (from its last ready/reconnected log line)."""
        ports = _NODE_URL.findall(self.bridge.log.read_text(errors="replace"))
        assert ports, f"the bridge never logged its node\n{self.bridge.tail()}"
        return self.cluster.by_port(int(ports[-1]))

    def leader(self) -> PrivateRabbit:
        """The node holding the store queue's leader."""
        return self.cluster.by_name(self.cluster.queue(self.queue)["leader"])

    def failover(self, fault: Callable[[], object]) -> tuple[float, float]:
        """Run ``fault``; the longest stall of confirmed publishes and of stored messages.

        A sampler reads the bridge's ``iotpipe_bridge_forwarded`` and the store's ``messages``
        rows every 20 ms while the fault runs, until both have risen after it. A stall is the
        time from the fault's start (or the last rise after it) to the next rise: for a kill,
        the time from the kill to the next confirmed publish and the next stored message.
        """
        samples: list[tuple[float, float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                forwarded = self.bridge.metric("iotpipe_bridge_forwarded_total")
                samples.append((time.monotonic(), forwarded, count_rows(self.db, "messages")))
                stop.wait(0.02)

        sampler = threading.Thread(target=sample, name="failover-sampler", daemon=True)
        sampler.start()
        try:
            wait_for(lambda: len(samples) >= 3, 10, "the sampler's first readings")
            began = time.monotonic()
            fault()
            done = time.monotonic()
            ended = wait_for(lambda: samples[-1][0] > done and samples[-1], 10, "a sample")
            wait_until(
                lambda: samples[-1][1] > ended[1] and samples[-1][2] > ended[2],
                FAILOVER_LIMIT,
                "confirms and stored messages to resume after the fault",
                self.diagnostics,
            )
        finally:
            stop.set()
            sampler.join()
        return _stall(samples, 1, began), _stall(samples, 2, began)

    def reckon(self, test: str, began: float, **columns: object) -> None:
        """Finish the stream, wait for the store to hold everything; assert 0 lost, 0 doubled."""
        assert self.simulator is not None
        try:
            summary = self.simulator.finish(timeout=180)
        finally:
            self.simulator.kill()
        assert self.telemetry is not None
        what = sent(self.telemetry)
        assert len(what.readings) == summary["messages"]
        wait_until(
            lambda: (
                count_rows(self.db, "messages") >= len(what.readings)
                and self.bridge.settled()
                and queue_depth(self.cluster.any_running().url, self.queue) == 0
            ),
            120,
            f"{len(what.readings)} ids in the store and the pipeline idle",
            self.diagnostics,
        )
        stored = stored_ids(self.db)
        lost = what.readings.keys() - stored.keys()
        strangers = stored.keys() - what.readings.keys()
        doubled = extra_readings(stored, what.readings) + len(strangers)
        print_row(
            test,
            sent=len(what.readings),
            stored=len(stored),
            lost=len(lost),
            doubled=doubled,
            bridge_reconnects=int(self.bridge.metric("iotpipe_bridge_reconnects_total")),
            **columns,
            time=f"{time.monotonic() - began:.0f}s",
        )
        assert not lost, f"{len(lost)} ids never stored, e.g. {sorted(lost)[:5]}"
        assert doubled == 0, f"{doubled} readings stored twice or never sent"
        assert self.bridge.terminate() == 0, self.diagnostics()
        assert self.consumer.terminate() == 0, self.diagnostics()


def _stall(samples: list[tuple[float, float, int]], column: int, began: float) -> float:
    """The longest wait after ``began`` for ``column`` of the samples to rise again."""
    rises = [
        after[0]
        for before, after in itertools.pairwise(samples)
        if after[column] > before[column] and after[0] > began
    ]
    return max((b - a for a, b in itertools.pairwise([began, *rises])), default=0.0)


@pytest.fixture
def rig(
    healthy: PrivateCluster,
    mosquitto: MosquittoProcess,
    services: Services,
    capture: CaptureFactory,
    unique: str,
    tmp_path: Path,
) -> Rig:
    """A bridge and a consumer on the healthy cluster (not started)."""
    return Rig(healthy, mosquitto, services, capture, unique, tmp_path)


def test_sigkill_of_the_bridges_node_loses_and_doubles_nothing(rig: Rig) -> None:
    """SIGKILLing the node the bridge publishes to fails it over to another node, nothing lost."""
    began = time.monotonic()
    rig.start(KILL_COUNT)
    rig.wait_sent(KILL_AFTER)
    victim = rig.bridge_node()
    was_leader = victim is rig.leader()
    confirms, stores = rig.failover(victim.kill)
    assert rig.bridge_node() is not victim
    rig.reckon(
        "cluster: SIGKILL bridge's node",
        began,
        victim_was_leader=was_leader,
        failover_confirm=f"{confirms:.2f}s",
        failover_store=f"{stores:.2f}s",
    )


def test_sigkill_of_the_queue_leader_loses_and_doubles_nothing(rig: Rig) -> None:
    """SIGKILLing the quorum queue's leader elects another; nothing is lost or doubled."""
    began = time.monotonic()
    rig.start(KILL_COUNT)
    rig.wait_sent(KILL_AFTER)
    leader = rig.leader()
    assert leader is not rig.bridge_node(), "the bridge and the leader share a node"
    confirms, stores = rig.failover(leader.kill)
    successor = rig.leader()
    assert successor is not leader
    assert successor.running
    rig.reckon(
        "cluster: SIGKILL queue leader",
        began,
        new_leader=successor.name.rsplit("-", 1)[-1],
        failover_confirm=f"{confirms:.2f}s",
        failover_store=f"{stores:.2f}s",
    )


def test_rolling_restart_of_all_nodes_loses_and_doubles_nothing(rig: Rig) -> None:
    """Restarting the three nodes one after another under load loses and doubles nothing."""
    began = time.monotonic()
    rig.start(ROLLING_COUNT)
    rig.wait_sent(KILL_AFTER)
    times: list[tuple[float, float]] = []
    for node in rig.cluster.nodes:
        wait_until(
            lambda n=node: not rig.cluster.quorum_critical(n),  # type: ignore[misc]
            60,
            f"{node.name} not quorum-critical",
            rig.diagnostics,
        )
        times.append(rig.failover(node.stop))
        node.start()
        rig.wait_sent(rig.sent_count() + 400)  # the stream outlives each restart
    rig.reckon(
        "cluster: rolling restart",
        began,
        failover_confirm="/".join(f"{c:.2f}" for c, _ in times) + "s",
        failover_store="/".join(f"{s:.2f}" for _, s in times) + "s",
    )


def test_the_queue_is_declared_on_the_configured_group_size(
    healthy: PrivateCluster, unique: str
) -> None:
    """quorum_group_size = 2 puts a new queue's replicas on two of the three nodes."""
    settings = AmqpSettings(url=healthy.nodes[0].url, urls=tuple(healthy.urls[1:]))
    name = f"cluster.group.{unique}"
    consumer = BatchConsumer(settings, QueueSpec(name=name, bindings=(), quorum_group_size=2))
    try:
        consumer.connect()
        members = healthy.queue(name)["members"]
    finally:
        consumer.close()
    assert len(members) == 2
