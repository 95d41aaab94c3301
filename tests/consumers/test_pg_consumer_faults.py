"""Consumers sharing one PostgreSQL store under faults: competing hosts, SIGKILLs, a server crash.

Each test runs ``iotpipe consume`` processes against the shared RabbitMQ (a queue of its own)
and a ``postgresql://`` store, publishes telemetry with re-sent copies, and compares what the
store holds with what was sent (the counting of ``test_consumer_faults``): 0 lost, 0 doubled.
"""

from __future__ import annotations

import random
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pika  # type: ignore[import-untyped]
import pytest

from consumers.settings import PostgresTarget
from tests.conftest import wait_for
from tests.consumers.conftest import SiteQueue, publish
from tests.consumers.test_consumer_faults import (
    Processes,
    kill_while_streaming,
    processes,  # noqa: F401 (fixture)
    report,
    stored_messages,
    stream,
    write_config,
)
from tests.postgres import (
    PrivateCluster,
    private_cluster,  # noqa: F401 (fixture)
    scratch_database,
    shared_server_up,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.rabbitmq,
    pytest.mark.skipif(not shared_server_up(), reason="no PostgreSQL on 127.0.0.1:5432"),
]


def consumers_of(queue: SiteQueue) -> int:
    """How many consumers the queue has (0 before it is declared)."""
    try:
        with pika.BlockingConnection(pika.URLParameters(queue.url)) as conn:
            declared = conn.channel().queue_declare(queue.name, passive=True)
    except pika.exceptions.AMQPError:
        return 0
    return int(declared.method.consumer_count)


@pytest.fixture(scope="module")
def shared_db() -> Iterator[PostgresTarget]:
    with scratch_database() as url:
        yield PostgresTarget(url)


def test_two_consumer_hosts_with_redeliveries_store_every_reading_once(
    site_queue: SiteQueue,
    processes: Processes,  # noqa: F811
    tmp_path: Path,
    shared_db: PostgresTarget,
) -> None:
    """Two consumers on one queue, copies re-sent and batches redelivered after a crash
    between commit and ack: every reading stored once, both consumers did work."""
    config = write_config(
        tmp_path / "consume.toml", site_queue, shared_db, prefetch=200, batch_size=100
    )
    sent = stream(site_queue.site, devices=10, per_device=300, copies=0.2, seed=7)
    distinct = len({m.id for m in sent})
    consumers = [processes.consume(config) for _ in range(2)]
    assert wait_for(lambda: all("consuming" in processes.log(n) for n in range(2)), 60), (
        processes.logs()
    )
    # A third host dies right after its first commit, before the ack: RabbitMQ redelivers
    # that batch to the two others, whose transactions find its ids claimed.
    crasher = processes.crashing(config, after_commits=1)
    assert wait_for(lambda: consumers_of(site_queue) == 3, 60), processes.logs()
    publisher = threading.Thread(target=publish, args=(site_queue.url, sent))
    publisher.start()
    assert crasher.wait(60) == 99, processes.logs()
    publisher.join(120)
    assert wait_for(lambda: stored_messages(shared_db) >= distinct, 120), processes.logs()
    assert wait_for(lambda: site_queue.ready() == 0, 30)
    for proc in consumers:
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(30) for proc in consumers] == [0, 0], processes.logs()
    assert report("2 consumer hosts + 1 crashing, one PostgreSQL", sent, shared_db) == (0, 0)
    assert site_queue.dead_letters() == []
    shares = [
        int(re.findall(r"stopped: stored (\d+) messages", processes.log(n))[-1]) for n in range(2)
    ]
    print(f"messages stored per consumer: {shares}")
    assert all(share > 0 for share in shares), "both consumers shared the work"


def test_sigkill_of_consumers_and_of_postgres_mid_stream_loses_and_doubles_nothing(
    site_queue: SiteQueue,
    processes: Processes,  # noqa: F811
    tmp_path: Path,
    private_cluster: PrivateCluster,  # noqa: F811
) -> None:
    """Consumers SIGKILLed and crashing after commits (3x each) while the PostgreSQL server is
    SIGKILLed and restarted (3x): 0 lost, 0 doubled."""
    db = PostgresTarget(private_cluster.url)
    config = write_config(tmp_path / "consume.toml", site_queue, db)
    sent = stream(site_queue.site, devices=20, per_device=400, copies=0.1, seed=13)
    crashes = 0
    stop = threading.Event()

    def crash_server() -> None:
        nonlocal crashes
        rng = random.Random(17)
        while not stop.is_set() and crashes < 3:
            target = stored_messages(db) + rng.randrange(800, 2000)
            if not wait_for(lambda t=target: stop.is_set() or stored_messages(db) >= t, 120):
                return
            if stop.is_set():
                return
            private_cluster.kill()
            crashes += 1
            private_cluster.start()

    killer = threading.Thread(target=crash_server, name="pg-killer")
    # The server must be up when a consumer starts (a store it cannot reach at start-up
    # is an error): the killer restarts it at once, and the consumer start waits for it.
    killer.start()
    try:
        kills, consumer_crashes = kill_while_streaming(processes, config, site_queue, sent, db)
    finally:
        stop.set()
        killer.join(60)
    lost, doubled = report(
        f"consumer SIGKILLed {kills}x, crashed after commit {consumer_crashes}x, "
        f"PostgreSQL SIGKILLed {crashes}x",
        sent,
        db,
    )
    assert (lost, doubled) == (0, 0)
    assert crashes >= 1, "the server was killed mid-stream"
    outages = sum(
        log.read_text(errors="replace").count("store unavailable, holding the batch")
        for log in tmp_path.glob("*.log")
    )
    print(f"batches held through a server outage: {outages}")
    assert outages >= 1, "a consumer saw the server go and held its batch"
    assert site_queue.dead_letters() == []
