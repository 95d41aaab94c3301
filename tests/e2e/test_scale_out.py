"""Scale-out: two bridges sharing one subscription and three competing consumers, exactly once.

``iotpipe simulate`` (with retransmitted copies and some malformed payloads) -> a private
Mosquitto -> two ``iotpipe bridge`` processes splitting the traffic with an MQTT shared
subscription (``shared_group``, each its own client id and spool) -> the shared RabbitMQ -> three
``iotpipe consume`` processes competing on one store queue -> one SQLite file. Every id sent is
stored once with all its readings, every copy is absorbed by the dedupe, and every malformed
payload is dead-lettered once, whichever bridge or consumer handled it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.query import store_stats
from tests.conftest import MosquittoProcess, free_port
from tests.e2e.conftest import (
    MOSQUITTO_CONFIG,
    DeadLetterObserver,
    QueueNames,
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

pytestmark = [pytest.mark.slow, pytest.mark.mqtt, pytest.mark.mosquitto, pytest.mark.rabbitmq]

COUNT = 6_000
BRIDGES = 2
CONSUMERS = 3


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A private Mosquitto tuned for the bridge (see MOSQUITTO_CONFIG)."""
    broker = MosquittoProcess(tmp_path / "mosquitto", free_port(), MOSQUITTO_CONFIG)
    broker.start()
    yield broker
    broker.stop()


def test_two_shared_bridges_and_three_competing_consumers_store_every_id_exactly_once(
    mosquitto: MosquittoProcess,
    rabbitmq_url: str,
    services: Services,
    shared_queues: QueueNames,
    capture: CaptureFactory,
    unique: str,
    tmp_path: Path,
) -> None:
    """Two bridges on a shared subscription and three consumers on one queue store each id once."""
    began = time.monotonic()
    site = f"e2e{unique}"
    mqtt_url = f"mqtt://127.0.0.1:{mosquitto.port}"
    db = tmp_path / "telemetry.db"
    queue = shared_queues.store
    dead = DeadLetterObserver(rabbitmq_url, shared_queues.dead, (site,)).declare()
    consumers = [
        services.consumer(
            f"consumer{n}",
            amqp_url=rabbitmq_url,
            store=f"sqlite:///{db}",
            queue=queue,
            bindings=[f"iotpipe.v1.{site}.#"],
            prefetch=200,
            batch_size=100,
        )
        for n in range(1, CONSUMERS + 1)
    ]
    bridges = [
        services.bridge(
            f"bridge{n}",
            mqtt_url=mqtt_url,
            amqp_url=rabbitmq_url,
            client_id=f"e2e-bridge{n}-{unique}",
            shared_group=f"bridges{unique}",
        )
        for n in range(1, BRIDGES + 1)
    ]
    for service in [*consumers, *bridges]:
        service.start()
    for service in [*consumers, *bridges]:
        service.wait_ready()
    telemetry = capture(mqtt_url, f"iotpipe/v1/{site}/+/telemetry", qos=1)
    simulator = Simulator(
        tmp_path,
        [
            "--mqtt", mqtt_url,
            "--seed", "5",
            "--start", "2026-11-01T00:00:00Z",
            "--sites", "1",
            "--site-pattern", site,
            "--devices", "10",
            "--sensors", "temperature,humidity,door",
            "--rate", "100",
            "--count", str(COUNT),
            "--fault", "duplicate=0.08",
            "--fault", "malformed=0.005",
        ],
    )  # fmt: skip
    try:
        summary = simulator.start().finish(timeout=120)
    finally:
        simulator.kill()
    what = sent(telemetry)
    assert what.publishes == summary["published"], "the subscriber saw every publish"
    assert summary["messages"] == COUNT
    # A malformed message is one of the COUNT envelopes whose id never reaches the store.
    assert len(what.readings) == COUNT - summary["rejected"]
    assert what.rejected == summary["rejected"]
    assert what.copies > 0, summary
    assert what.rejected > 0, summary

    wait_until(
        lambda: (
            count_rows(db, "messages") >= len(what.readings)
            and sum(b.metric("iotpipe_bridge_dead_lettered_total") for b in bridges)
            >= what.rejected
            and all(b.settled() for b in bridges)
            and queue_depth(rabbitmq_url, queue) == 0
        ),
        90,
        f"{len(what.readings)} ids in the store and the pipeline idle",
        services.logs,
    )
    # Copies are absorbed after the originals: wait until every delivery was handled.
    wait_until(
        lambda: store_stats(db).duplicates >= what.copies,
        30,
        f"{what.copies} copies absorbed",
        services.logs,
    )
    bridge_shares = [int(b.metric("iotpipe_bridge_received_total")) for b in bridges]
    consumer_shares = [int(c.metric("iotpipe_consumer_stored_messages_total")) for c in consumers]
    stored = stored_ids(db)
    lost = what.readings.keys() - stored.keys()
    strangers = stored.keys() - what.readings.keys()
    wrong = {i: n for i, n in stored.items() if i in what.readings and n != what.readings[i]}
    dead_letters = dead.take()
    stats = store_stats(db)
    print_row(
        "2 bridges + 3 consumers",
        sent=what.publishes,
        ids=len(what.readings),
        stored=len(stored),
        lost=len(lost),
        duplicates=extra_readings(stored, what.readings) + len(strangers),
        absorbed=stats.duplicates,
        copies_sent=what.copies,
        dead_lettered=len(dead_letters),
        rejected_sent=what.rejected,
        per_bridge="/".join(map(str, bridge_shares)),
        per_consumer="/".join(map(str, consumer_shares)),
        time=f"{time.monotonic() - began:.0f}s",
    )
    assert not lost, f"{len(lost)} ids never stored, e.g. {sorted(lost)[:10]}"
    assert not strangers, f"ids nobody sent: {sorted(strangers)[:10]}"
    assert not wrong, f"ids with missing or extra readings: {list(wrong.items())[:10]}"
    assert stats.messages == len(what.readings)
    assert stats.duplicates == what.copies, "each copy absorbed once, nothing redelivered"
    assert len(dead_letters) == what.rejected
    assert {key for key, *_ in dead_letters} == {"bridge.bad_json"}
    assert all(share > 0 for share in bridge_shares), "both bridges took traffic"
    assert all(share > 0 for share in consumer_shares), "all three consumers stored"
    codes = [service.terminate() for service in [*bridges, *consumers]]
    assert codes == [0] * (BRIDGES + CONSUMERS), services.logs()
