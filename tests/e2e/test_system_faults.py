"""System faults: bridge, consumer and RabbitMQ SIGKILLed mid-stream, every id stored exactly once.

The whole pipeline on private brokers: ``iotpipe simulate`` -> a private Mosquitto (persistence
on, no queue limit, a 1000-message window) -> ``iotpipe bridge`` -> a private RabbitMQ node ->
``iotpipe consume`` -> SQLite. While the simulator streams, the bridge, the consumer and the
RabbitMQ node are each SIGKILLed several times and restarted (the bridge's spool absorbs the
RabbitMQ outages). A subscriber on the edge broker records what was sent; at the end every id
sent must be in the store's ``messages`` table with all its readings, nothing else, once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from consumers.query import store_stats
from tests.conftest import MosquittoProcess, free_port
from tests.e2e.conftest import (
    MOSQUITTO_CONFIG,
    DeadLetterObserver,
    Service,
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
from tests.rabbitmq import PrivateRabbit

pytestmark = [pytest.mark.slow, pytest.mark.mqtt, pytest.mark.mosquitto, pytest.mark.rabbitmq]

#: 10 devices x 40 envelopes/s = 400 messages/s: 30,000 take ~75 s. Every fault below has landed
#: by ~15,000-18,000 (two RabbitMQ restarts take ~10 s each): ~30 s of margin for a slow machine.
DEVICES = 10
RATE = 40
COUNT = 30_000
SENSORS = "temperature,humidity,power"

#: The faults, in order, each after ``gap`` more messages were sent since the previous one.
FAULTS = [
    ("bridge", 1500),
    ("consumer", 1200),
    ("rabbitmq", 1200),
    ("bridge", 1200),
    ("consumer", 1200),
    ("rabbitmq", 1200),
    ("consumer", 1200),
    ("bridge", 1200),
]


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A private Mosquitto tuned for the bridge (see MOSQUITTO_CONFIG)."""
    broker = MosquittoProcess(tmp_path / "mosquitto", free_port(), MOSQUITTO_CONFIG)
    broker.start()
    yield broker
    broker.stop()


def test_sigkilled_bridge_consumer_and_rabbitmq_store_every_id_exactly_once(
    mosquitto: MosquittoProcess,
    private_rabbit: PrivateRabbit,
    services: Services,
    capture: CaptureFactory,
    unique: str,
    tmp_path: Path,
) -> None:
    """SIGKILLing bridge, consumer and RabbitMQ 3, 3 and 2 times mid-stream loses and doubles nothing."""
    began = time.monotonic()
    site = f"e2e{unique}"
    mqtt_url = f"mqtt://127.0.0.1:{mosquitto.port}"
    db = tmp_path / "telemetry.db"
    dead = DeadLetterObserver(private_rabbit.url, "e2e.dead", (site,)).declare()
    consumer = services.consumer(
        "consumer",
        amqp_url=private_rabbit.url,
        store=f"sqlite:///{db}",
        queue="e2e.store",
        bindings=["iotpipe.v1.#"],
    )
    bridge = services.bridge(
        "bridge", mqtt_url=mqtt_url, amqp_url=private_rabbit.url, client_id=f"e2e-bridge-{unique}"
    )
    consumer.start().wait_ready()
    bridge.start().wait_ready()
    telemetry = capture(mqtt_url, f"iotpipe/v1/{site}/+/telemetry", qos=1)

    def diagnostics() -> str:
        return f"{services.logs()}\n{private_rabbit.log_tail(10)}"

    simulator = Simulator(
        tmp_path,
        [
            "--mqtt", mqtt_url,
            "--seed", "20261126",
            "--start", "2026-11-01T00:00:00Z",
            "--sites", "1",
            "--site-pattern", site,
            "--devices", str(DEVICES),
            "--sensors", SENSORS,
            "--rate", str(RATE),
            "--count", str(COUNT),
            # Devices as 1.0 agents: this test proves the hops from the broker on (the bridge's
            # spool through RabbitMQ outages); test_receipts_faults.py proves the receipts path.
            "--receipts", "off",
        ],
    )  # fmt: skip
    simulator.start()
    try:
        faults, last = inject(
            FAULTS, simulator, telemetry.count, bridge, consumer, private_rabbit, diagnostics
        )
        summary = simulator.finish(timeout=180)
    finally:
        simulator.kill()
    what = sent(telemetry)
    assert what.publishes == summary["published"], "the subscriber saw every publish"
    assert len(what.readings) == summary["messages"] == COUNT

    # Everything sent has gone through: all ids stored, the bridge idle, the queue empty.
    wait_until(
        lambda: (
            count_rows(db, "messages") >= COUNT
            and bridge.settled()
            and queue_depth(private_rabbit.url, "e2e.store") == 0
        ),
        120,
        f"{COUNT} ids in the store and the pipeline idle",
        diagnostics,
    )
    stored = stored_ids(db)
    lost = what.readings.keys() - stored.keys()
    strangers = stored.keys() - what.readings.keys()
    wrong = {i: n for i, n in stored.items() if i in what.readings and n != what.readings[i]}
    dead_letters = dead.take()
    stats = store_stats(db)
    print_row(
        "system faults (SIGKILL)",
        sent=what.publishes,
        ids=len(what.readings),
        stored=len(stored),
        lost=len(lost),
        duplicates=extra_readings(stored, what.readings) + len(strangers),
        absorbed=stats.duplicates,
        dead_lettered=len(dead_letters),
        kills=",".join(f"{k}:{v}" for k, v in faults.items()),
        last_kill_at=last,
        readings=count_rows(db, "readings"),
        time=f"{time.monotonic() - began:.0f}s",
    )
    assert not lost, f"{len(lost)} ids never stored, e.g. {sorted(lost)[:10]}\n{diagnostics()}"
    assert not strangers, f"ids nobody sent: {sorted(strangers)[:10]}"
    assert not wrong, f"ids with missing or extra readings: {list(wrong.items())[:10]}"
    assert stats.messages == COUNT
    assert dead_letters == [], f"dead-lettered: {dead_letters[:3]}"
    assert bridge.terminate() == 0, diagnostics()
    assert consumer.terminate() == 0, diagnostics()


def inject(
    faults: list[tuple[str, int]],
    simulator: Simulator,
    progress: Callable[[], int],
    bridge: Service,
    consumer: Service,
    rabbit: PrivateRabbit,
    diagnostics: Callable[[], str],
) -> tuple[dict[str, int], int]:
    """SIGKILL and restart each target in turn, ``gap`` messages apart, while the stream flows.

    Returns the kills per target and how many messages had been sent when the last one ended.
    """
    done = dict.fromkeys(("bridge", "consumer", "rabbitmq"), 0)
    mark = 0
    for target, gap in faults:
        goal = mark + gap
        wait_until(lambda g=goal: progress() >= g, 60, f"{goal} messages sent", diagnostics)  # type: ignore[misc]
        assert simulator.running, (
            f"the stream ended before the {target} kill: raise COUNT ({done} so far)"
        )
        if target == "rabbitmq":
            rabbit.kill()
            down_at = progress()
            # The outage lasts until the bridge has spooled and the devices kept sending.
            wait_until(
                lambda d=down_at: (
                    progress() >= d + 600
                    and (bridge.health() or {}).get("spool", {}).get("depth", 0) > 0
                ),  # type: ignore[misc]
                60,
                "the bridge to spool while RabbitMQ is down",
                diagnostics,
            )
            rabbit.start()
        else:
            service = bridge if target == "bridge" else consumer
            service.kill()
            service.start().wait_ready()
        done[target] += 1
        mark = progress()
    assert simulator.running, f"the stream ended during the last fault: raise COUNT ({done})"
    return done, mark
