"""The shipped recording, replayed twice through the real chain, stores every reading exactly once.

edge broker -> ``iotpipe bridge`` -> the shared RabbitMQ -> ``iotpipe consume`` -> SQLite (a
private Mosquitto at the edge) or InfluxDB (the embedded amqtt broker at the edge, a private
VictoriaMetrics as the server). The recording (``tests/data/README.md``) holds duplicates,
reordered ``seq``, truncated JSON, schema violations, an oversized payload, spoofed
site/device (topic mismatch), skewed clocks and offline bursts re-sent on reconnect. What the
store and ``iotpipe.dead`` must hold is computed from the recording with the core codec
(``iotpipe.envelope.decode``, ``Message.from_envelope``), then compared exactly: no reading
lost, none doubled, every rejected message dead-lettered once per replay with its reason.

The recording's sites are renamed to names of the test's own, so the test can share RabbitMQ.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from consumers.query import iter_readings, store_stats
from iotpipe.envelope import Envelope, Rejection, Status, decode
from iotpipe.recording import RecordedMessage, read_recording
from tests.conftest import BrokerInfo
from tests.e2e.conftest import (
    DeadLetterObserver,
    Expectation,
    QueueNames,
    ReadingKey,
    Service,
    Services,
    StoredReading,
    comparable,
    print_row,
    relabel,
    wait_until,
)
from tests.fixtures_replay import Replayer
from tests.victoria import Victoria

pytestmark = [pytest.mark.mqtt, pytest.mark.rabbitmq]

#: What tests/data/README.md promises of the shipped recording (checked after the renaming).
MESSAGES = 233
REJECTED = {
    "bridge.bad_json": 7,
    "bridge.schema": 9,
    "bridge.too_large": 1,
    "bridge.topic_mismatch": 7,
}
DISTINCT_READINGS = 1232


@dataclass
class Chain:
    """One test's pipeline: the replayed messages, what they must give, and the processes."""

    messages: list[RecordedMessage]
    expected: Expectation
    sites: tuple[str, ...]
    queue: str
    bridge: Service
    consumer: Service
    dead: DeadLetterObserver
    services: Services
    began: float

    def wait_for_pass(self, n: int, timeout: float = 60.0) -> None:
        """Wait until the ``n``-th replay went all the way through bridge and consumer."""
        e, bridge, consumer = self.expected, self.bridge, self.consumer
        rejected = sum(e.rejected.values())

        def through() -> bool:
            return (
                bridge.metric("iotpipe_bridge_received_total") >= n * len(self.messages)
                and bridge.metric("iotpipe_bridge_dead_lettered_total") >= n * rejected
                and bridge.settled()
                and consumer.metric("iotpipe_consumer_stored_messages_total")
                + consumer.metric("iotpipe_consumer_duplicates_total")
                >= n * e.envelopes
                and consumer.metric("iotpipe_consumer_statuses_total") >= n * e.statuses
            )

        wait_until(through, timeout, f"replay {n} to pass the chain", self.services.logs)


def recording_chain(
    recording: Path,
    unique: str,
    rabbitmq_url: str,
    services: Services,
    queues: QueueNames,
    mqtt_url: str,
    store: str,
    **consume: object,
) -> Chain:
    """Rename the recording's sites, compute what it must give, start the bridge and consumer."""
    _header, original = read_recording(recording, allow_truncated=False)
    old_sites = sorted({m.topic.split("/")[2] for m in original})
    new_sites = {old: f"e2e{unique}-{n}" for n, old in enumerate(old_sites, start=1)}
    messages = relabel(original, new_sites)
    expected = Expectation.of(messages)
    sites = tuple(new_sites.values())
    # The fault mix the README promises survived the renaming.
    assert len(messages) == MESSAGES
    assert expected.reasons == REJECTED
    assert len(expected.readings) == DISTINCT_READINGS

    began = time.monotonic()
    queue = queues.store
    dead = DeadLetterObserver(rabbitmq_url, queues.dead, sites).declare()
    consumer = services.consumer(
        "consumer",
        amqp_url=rabbitmq_url,
        store=store,
        queue=queue,
        bindings=[f"iotpipe.v1.{site}.#" for site in sites],
        **consume,
    )
    bridge = services.bridge(
        "bridge", mqtt_url=mqtt_url, amqp_url=rabbitmq_url, client_id=f"e2e-bridge-{unique}"
    )
    # The consumer declares and binds its queue: until then the bridge's publishes would be
    # unroutable (spooled and retried, not lost, but slower).
    consumer.start().wait_ready()
    bridge.start().wait_ready()
    return Chain(messages, expected, sites, queue, bridge, consumer, dead, services, began)


def check_fault_mix(messages: list[RecordedMessage]) -> dict[str, int]:
    """Count what the recording exercises; each kind the issue names must be there."""
    decoded = [decode(m.topic, m.payload) for m in messages]
    envelopes = [d for d in decoded if isinstance(d, Envelope)]
    ids = Counter(e.id for e in envelopes)
    seqs: dict[tuple[str, str], list[int]] = {}
    for e in envelopes:
        seqs.setdefault((e.site, e.device), []).append(e.seq)
    reordered = sum(1 for s in seqs.values() for a, b in itertools.pairwise(s) if b < a)
    # An offline burst: a device's "online" after an "offline", followed by its backlog.
    states: dict[tuple[str, str], str] = {}
    bursts = 0
    for d in decoded:
        if isinstance(d, Status):
            if d.state == "online" and states.get((d.site, d.device)) == "offline":
                bursts += 1
            states[d.site, d.device] = d.state
    reasons = Counter(d.reason.value for d in decoded if isinstance(d, Rejection))
    mix = {
        "repeated_ids": sum(n - 1 for n in ids.values() if n > 1),
        "reordered": reordered,
        "malformed": reasons["bad_json"] + reasons["schema"] + reasons["too_large"],
        "spoofed": reasons["topic_mismatch"],
        "offline_bursts": bursts,
    }
    missing = [kind for kind, n in mix.items() if n == 0]
    assert not missing, f"the recording lacks {missing}: regenerate it (tests/data/README.md)"
    return mix


def check_dead_letters(chain: Chain, replays: int) -> int:
    """``iotpipe.dead`` got exactly the rejected messages, once per replay, with their reasons."""
    got = Counter(chain.dead.take())
    want = Counter({key: n * replays for key, n in chain.expected.rejected.items()})
    assert got == want, (
        f"dead letters differ: missing {list((want - got).elements())[:5]}, "
        f"unexpected {list((got - want).elements())[:5]}"
    )
    assert not [d for d in got if not d[0].startswith("bridge.")], "no consumer dead letters"
    return sum(got.values())


def check_states(expected: Expectation, states: dict[tuple[str, str], str | None]) -> None:
    """Each device's registry state is its last status.

    Except where that last status has the same ``ts`` as an earlier one of the other state: the
    simulator stamps a device's "online" (end of an outage) and its final "offline" with one
    simulated time, and the store keeps the first of equal timestamps, so such a device still
    reads "online" (a bug, reported; the row counts these devices as ``status_ties``).
    """
    ties = expected.state_ties
    want = {device: state for device, state in expected.last_state.items() if device not in ties}
    assert {d: s for d, s in states.items() if d not in ties} == want, "last status applied"


# -- SQLite ---------------------------------------------------------------------------------------


def sqlite_snapshot(db: Path) -> Counter[tuple[ReadingKey, StoredReading]]:
    """Every stored reading with what it holds, counted (a count above 1 is a double)."""
    snapshot: Counter[tuple[ReadingKey, StoredReading]] = Counter()
    for row in iter_readings(db):
        ts_ms = _parse_ms(row.ts)
        tags = tuple(sorted(row.tags.items()))
        key = (row.site, row.device, row.sensor, ts_ms)
        snapshot[key, StoredReading(row.id, comparable(row.value), row.unit, tags)] += 1
    return snapshot


def _parse_ms(ts: str) -> int:
    return round(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)


@pytest.mark.mosquitto
def test_recording_through_the_chain_into_sqlite_stores_each_reading_exactly_once(
    mosquitto_broker: BrokerInfo,
    rabbitmq_url: str,
    services: Services,
    shared_queues: QueueNames,
    replayer: Replayer,
    shipped_recording: Path,
    unique: str,
    tmp_path: Path,
) -> None:
    """Replayed twice through Mosquitto, bridge, RabbitMQ and consumer, SQLite holds each reading once."""
    db = tmp_path / "telemetry.db"
    chain = recording_chain(
        shipped_recording,
        unique,
        rabbitmq_url,
        services,
        shared_queues,
        mosquitto_broker.url,
        f"sqlite:///{db}",
    )
    mix = check_fault_mix(chain.messages)
    want = Counter(dict.fromkeys(chain.expected.readings.items(), 1))

    replayer(chain.messages, mosquitto_broker.url)
    chain.wait_for_pass(1)
    first = sqlite_snapshot(db)
    _assert_same(first, want)
    check_dead_letters(chain, 1)

    replayer(chain.messages, mosquitto_broker.url)
    chain.wait_for_pass(2)
    second = sqlite_snapshot(db)
    assert second == first, "the second replay changed the store"
    check_dead_letters(chain, 1)  # the second replay's own 24

    stats = store_stats(db)
    states = {(d.site, d.device): d.state for d in stats.devices}
    print_row(
        "recording x2 -> sqlite",
        replayed=2 * len(chain.messages),
        readings=sum(second.values()),
        expected=len(want),
        lost=len(want - second),
        doubled=sum(n - 1 for n in second.values() if n > 1),
        dead=len(chain.dead.taken),
        messages=stats.messages,
        dups_absorbed=stats.duplicates,
        status_ties=len(chain.expected.state_ties),
        mix=",".join(f"{k}:{v}" for k, v in mix.items()),
        time=f"{time.monotonic() - chain.began:.1f}s",
    )
    assert stats.messages == len(chain.expected.ids)
    # Copies within a replay (9), then every envelope of the second replay.
    assert stats.duplicates == 2 * chain.expected.envelopes - len(chain.expected.ids)
    check_states(chain.expected, states)
    assert chain.consumer.metric("iotpipe_consumer_dead_lettered_total") == 0
    assert chain.bridge.terminate() == 0, chain.services.logs()
    assert chain.consumer.terminate() == 0, chain.services.logs()


def _assert_same(
    got: Counter[tuple[ReadingKey, StoredReading]], want: Counter[tuple[ReadingKey, StoredReading]]
) -> None:
    lost, extra = want - got, got - want
    assert (sum(lost.values()), sum(extra.values())) == (0, 0), (
        f"{sum(lost.values())} readings missing or different, e.g. {list(lost)[:3]}; "
        f"{sum(extra.values())} unexpected or doubled, e.g. {list(extra)[:3]}"
    )


# -- InfluxDB (VictoriaMetrics) -------------------------------------------------------------------

#: A sample as VictoriaMetrics exports it: (metric name, labels without __name__, time in ms).
SampleKey = tuple[str, tuple[tuple[str, str], ...], int]


def expected_samples(expected: Expectation) -> dict[SampleKey, list[float]]:
    """One sample per reading, named and labelled as docs/influxdb.md documents for VictoriaMetrics."""
    out: dict[SampleKey, list[float]] = {}
    for (site, device, sensor, ts_ms), reading in expected.readings.items():
        kind, value = reading.value
        assert kind != "string", "VictoriaMetrics stores no strings: the comparison would be blind"
        name = "telemetry_value_bool" if kind == "boolean" else "telemetry_value"
        labels = {"site": site, "device": device, "sensor": sensor, **dict(reading.tags)}
        if reading.unit is not None:
            labels["unit"] = reading.unit
        out[name, tuple(sorted(labels.items())), ts_ms] = [float(value)]  # type: ignore[arg-type]
    return out


def victoria_samples(victoria: Victoria, sites: tuple[str, ...]) -> dict[SampleKey, list[float]]:
    """Every raw sample of the sites' series (a list longer than 1 is a reading written twice)."""
    selector = f'{{__name__=~"telemetry_.*",site=~"{"|".join(sites)}"}}'
    out: dict[SampleKey, list[float]] = {}
    for series in victoria.export(selector):
        labels = tuple(sorted((k, v) for k, v in series.labels.items() if k != "__name__"))
        for ts, value in zip(series.timestamps, series.values, strict=True):
            out.setdefault((series.name, labels, ts), []).append(value)
    return out


@pytest.mark.tsdb
def test_recording_through_the_chain_into_influxdb_writes_each_reading_once(
    amqtt_broker: BrokerInfo,
    rabbitmq_url: str,
    victoria: Victoria,
    services: Services,
    shared_queues: QueueNames,
    replayer: Replayer,
    shipped_recording: Path,
    unique: str,
    tmp_path: Path,
) -> None:
    """Replayed twice through amqtt, bridge, RabbitMQ and consumer, VictoriaMetrics has one sample per reading."""
    state = tmp_path / "state.db"
    chain = recording_chain(
        shipped_recording,
        unique,
        rabbitmq_url,
        services,
        shared_queues,
        amqtt_broker.url,
        f"influxdb://127.0.0.1:{victoria.port}",
        state_path=state,
    )
    want = expected_samples(chain.expected)
    got: dict[SampleKey, list[float]] = {}
    for n in (1, 2):
        replayer(chain.messages, amqtt_broker.url)
        chain.wait_for_pass(n)
        check_dead_letters(chain, 1)
        got = _wait_for_samples(victoria, chain, want)
        _assert_samples(got, want)

    stats = store_stats(state)
    check_states(chain.expected, {(d.site, d.device): d.state for d in stats.devices})
    lost = sum(1 for key in want if key not in got)
    print_row(
        "recording x2 -> influxdb",
        replayed=2 * len(chain.messages),
        samples=sum(map(len, got.values())),
        series=len({(name, labels) for name, labels, _ in got}),
        expected=len(want),
        lost=lost,
        doubled=sum(1 for v in got.values() if len(v) > 1),
        dead=len(chain.dead.taken),
        dups_absorbed=stats.duplicates,
        status_ties=len(chain.expected.state_ties),
        time=f"{time.monotonic() - chain.began:.1f}s",
    )
    assert stats.messages == len(chain.expected.ids)
    assert stats.duplicates == 2 * chain.expected.envelopes - len(chain.expected.ids)
    assert chain.bridge.terminate() == 0, chain.services.logs()
    assert chain.consumer.terminate() == 0, chain.services.logs()


def _wait_for_samples(
    victoria: Victoria, chain: Chain, want: dict[SampleKey, list[float]]
) -> dict[SampleKey, list[float]]:
    """The samples once every expected one is visible (the consumer's writes were acknowledged)."""
    got: dict[SampleKey, list[float]] = {}

    def visible() -> bool:
        nonlocal got
        got = victoria_samples(victoria, chain.sites)
        return want.keys() <= got.keys()

    probe: Callable[[], bool] = visible
    wait_until(probe, 30, "every reading to be visible in VictoriaMetrics", chain.services.logs)
    return got


def _assert_samples(got: dict[SampleKey, list[float]], want: dict[SampleKey, list[float]]) -> None:
    missing = [key for key in want if key not in got]
    extra = [key for key in got if key not in want]
    differing = {key: got[key] for key in want if key in got and got[key] != want[key]}
    assert (len(missing), len(extra), len(differing)) == (0, 0, 0), (
        f"{len(missing)} readings missing, e.g. {missing[:3]}; {len(extra)} unexpected, "
        f"e.g. {extra[:3]}; {len(differing)} with other or doubled samples, "
        f"e.g. {list(differing.items())[:3]}"
    )
