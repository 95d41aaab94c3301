"""Ingest rules through the whole chain: foreign payloads replayed twice are stored once each.

A private Mosquitto -> ``iotpipe bridge`` with ``[[bridge.ingest]]`` rules (the four presets,
a line-protocol rule, a Sparkplug B rule; native envelopes take the contract's own path) ->
the shared RabbitMQ -> ``iotpipe consume`` -> SQLite. Each test publishes its traffic twice
and compares the store with what the payloads carry:

- per format, with expectations written out from the payloads (not computed by the mapping);
- Sparkplug B in depth: aliases, a seq wrap, a device, a death, a new birth, a lost message
  (exactly one gap in the store's completeness) and data without a birth (a dead letter and a
  rebirth request on MQTT);
- the mixed-fleet recording of ``tests/data`` with a rule for every format in it, the rules
  themselves (``bridge.ingest.Ingest``, the code ``iotpipe ingest try`` runs) as the oracle
  of what each message must become.

Identity, as docs/ingest.md promises it: a payload with a time or counter (Tasmota, Zigbee2MQTT
with ``last_seen``, Shelly, line protocol with timestamps, envelopes, Sparkplug) keeps its id,
so the second replay stores nothing new. A plain ESPHome state has neither: a replay is a new
publish (no MQTT DUP flag), so it is a new message with a new id, stored again at its new
receive time, exactly what the docs say of "the same value sent twice" (the DUP-redelivery
cache is covered by tests/bridge/test_ingest.py).

Names are the test's own (site ``e2e<unique>``, rule names ending in ``-<unique>``) so the
shared RabbitMQ's dead letters of other tests are told apart.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest

from bridge.ingest import Ingest, IngestRule
from bridge.sparkplug import SparkplugIngest
from consumers.query import iter_readings, store_stats
from iotpipe.amqp import DEAD_EXCHANGE, HEADER_ERROR, HEADER_TOPIC
from iotpipe.envelope import Envelope, Rejection, Status, decode
from iotpipe.recording import RecordedMessage, read_recording
from iotpipe.sparkplug import (
    REBIRTH_METRIC,
    DataType,
    MessageType,
    Metric,
    Payload,
    build_topic,
    decode_payload,
    encode_payload,
)
from tests.conftest import BrokerInfo
from tests.e2e.conftest import (
    QueueNames,
    Service,
    Services,
    comparable,
    print_row,
    readonly,
    wait_until,
)
from tests.fixtures_replay import CaptureFactory, Replayer
from tests.rabbitmq import blocking_channel

pytestmark = [pytest.mark.mqtt, pytest.mark.rabbitmq, pytest.mark.mosquitto]

MIXED_FLEET = Path(__file__).resolve().parents[1] / "data" / "mixed-fleet.jsonl"
HEADER_RULE = "x-iotpipe-rule"

#: A stored reading as compared: (device, sensor, ts_ms, (kind, value), unit).
Row = tuple[str, str, int, tuple[str, object], str | None]


# -- the chain ------------------------------------------------------------------------------------


def _toml(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def rules_of(site: str, unique: str) -> list[dict[str, object]]:
    """One rule per foreign format, on ``site``; names end with ``unique``.

    Line protocol on Telegraf's ``telegraf/<host>/<measurement>`` (the device from the ``host``
    tag); Sparkplug B on every group (the group is the site).
    """
    return [
        {"name": f"tasmota-{unique}", "preset": "tasmota", "site": site},
        {"name": f"esphome-{unique}", "preset": "esphome", "site": site},
        {"name": f"z2m-{unique}", "preset": "zigbee2mqtt", "site": site},
        {"name": f"shelly-{unique}", "preset": "shelly", "site": site},
        {"name": f"line-{unique}", "filter": "telegraf/+/+", "format": "line", "site": site},
        {
            "name": f"spb-{unique}",
            "filter": "spBv1.0/#",
            "format": "sparkplug",
            "units": {"temperature": "Cel"},
        },
    ]


@dataclass(frozen=True)
class Dead:
    """A dead letter as compared: routing key, original topic, rule, body."""

    key: str
    topic: str
    rule: str
    body: bytes


@dataclass
class Chain:
    """Mosquitto -> bridge (with rules) -> RabbitMQ -> consumer -> SQLite, for one test."""

    site: str
    unique: str
    rules: list[dict[str, object]]
    mqtt_url: str
    amqp_url: str
    db: Path
    dead_queue: str
    bridge: Service
    consumer: Service
    services: Services
    began: float
    dead: list[Dead] = field(default_factory=list)

    def wait_for_pass(self, n: int, *, received: int, envelopes: int, statuses: int = 0) -> None:
        """Wait until the ``n``-th publish of the traffic went through bridge and consumer."""
        bridge, consumer = self.bridge, self.consumer

        def through() -> bool:
            return (
                bridge.metric("iotpipe_bridge_received_total") >= n * received
                and bridge.settled()
                and consumer.metric("iotpipe_consumer_stored_messages_total")
                + consumer.metric("iotpipe_consumer_duplicates_total")
                >= n * envelopes
                and consumer.metric("iotpipe_consumer_statuses_total") >= n * statuses
            )

        wait_until(through, 60, f"pass {n} to go through the chain", self.services.logs)

    def take_dead(self) -> list[Dead]:
        """Dead letters of this test now in the observer queue (by rule name or site)."""
        names = {str(rule["name"]) for rule in self.rules}
        new: list[Dead] = []
        with blocking_channel(self.amqp_url) as channel:
            while True:
                method, properties, body = channel.basic_get(self.dead_queue, auto_ack=True)
                if method is None:
                    break
                headers = dict(properties.headers or {})
                topic = _text(headers.get(HEADER_TOPIC, ""))
                rule = _text(headers.get(HEADER_RULE, ""))
                if rule in names or f"/{self.site}/" in f"{topic}/":
                    assert headers.get(HEADER_ERROR), "a dead letter says why"
                    new.append(Dead(method.routing_key, topic, rule, body))
        self.dead.extend(new)
        return new


def dead_letters_reach(chain: Chain, n: int) -> bool:
    """Take the test's new dead letters; True once ``n`` were taken in all."""
    chain.take_dead()
    return len(chain.dead) >= n


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def start_chain(
    services: Services,
    queues: QueueNames,
    broker: BrokerInfo,
    rabbitmq_url: str,
    unique: str,
    tmp_path: Path,
) -> Chain:
    """Declare the dead-letter observer, start consumer and bridge (with the rules) and wait."""
    began = time.monotonic()
    site = f"e2e{unique}"
    rules = rules_of(site, unique)
    with blocking_channel(rabbitmq_url) as channel:
        channel.exchange_declare(DEAD_EXCHANGE, exchange_type="topic", durable=True)
        channel.queue_declare(queues.dead, durable=True)
        channel.queue_bind(queues.dead, DEAD_EXCHANGE, routing_key="bridge.#")
    db = tmp_path / "telemetry.db"
    consumer = services.consumer(
        "consumer",
        amqp_url=rabbitmq_url,
        store=f"sqlite:///{db}",
        queue=queues.store,
        bindings=[f"iotpipe.v1.{site}.#"],
    )
    bridge = services.bridge(
        "bridge", mqtt_url=broker.url, amqp_url=rabbitmq_url, client_id=f"e2e-bridge-{unique}"
    )
    with bridge.config.open("a") as config:
        for rule in rules:
            config.write("\n[[bridge.ingest]]\n")
            config.writelines(f"{key} = {_toml(value)}\n" for key, value in rule.items())
    consumer.start().wait_ready()
    bridge.start().wait_ready()
    return Chain(
        site,
        unique,
        rules,
        broker.url,
        rabbitmq_url,
        db,
        queues.dead,
        bridge,
        consumer,
        services,
        began,
    )


def publish(replayer: Replayer, chain: Chain, messages: Sequence[tuple[str, bytes]]) -> None:
    """Publish ``messages`` in order, QoS 1, not retained (as a replayed recording is)."""
    recorded = [RecordedMessage(0.0, topic, payload, 1, False) for topic, payload in messages]
    replayer(recorded, chain.mqtt_url)


# -- reading the store ----------------------------------------------------------------------------


def stored_rows(db: Path, site: str) -> Counter[Row]:
    """Every stored reading of ``site``, counted (a count above 1 would be a double)."""
    rows: Counter[Row] = Counter()
    for row in iter_readings(db, site=site):
        ts = datetime.fromisoformat(row.ts.replace("Z", "+00:00"))
        rows[
            row.device, row.sensor, round(ts.timestamp() * 1000), comparable(row.value), row.unit
        ] += 1
    return rows


def stored_messages(db: Path, site: str) -> list[tuple[str, str, str, int]]:
    """(id, device, boot, seq) of every stored message of ``site``."""
    with readonly(db) as conn:
        return [
            (i, d, b, int(s))
            for i, d, b, s in conn.execute(
                "SELECT id, device, boot, seq FROM messages WHERE site = ?", (site,)
            )
        ]


def _diff(got: Counter[Row], want: Counter[Row]) -> str:
    return (
        f"missing or different: {sorted(want - got, key=str)[:4]}; "
        f"unexpected or doubled: {sorted(got - want, key=str)[:4]}"
    )


# -- 1. per format --------------------------------------------------------------------------------

T0_S = 1_796_000_000  # 2026-11-30T00:53:20Z
T0_MS = T0_S * 1000


@dataclass
class Sample:
    """One published message and the readings it must give: (device, sensor, ts, value, unit).

    ``ts`` None: the payload has no time (the reading is at the bridge's receive time).
    """

    fmt: str
    topic: str
    payload: bytes
    readings: list[tuple[str, str, int | None, object, str | None]]
    envelopes: int = 1


def per_format_samples(site: str, unique: str) -> list[Sample]:
    """Traffic of every format, with what each message carries written out by hand."""
    out: list[Sample] = []
    for i in range(3):  # Tasmota: Time is local time (the rule's zone: UTC)
        t = T0_S + 10 * i
        payload: dict[str, object] = {
            "Time": datetime.fromtimestamp(t, tz=UTC).replace(tzinfo=None).isoformat(),
            "ENERGY": {"TotalStartTime": "2026-01-01T00:00:00", "Power": 12 + i, "Voltage": 230},
            "AM2301": {"Temperature": 21.5 + i, "Humidity": 45.25},
            "TempUnit": "C",
        }
        device = f"plug-{unique}"
        out.append(
            Sample(
                "tasmota",
                f"tele/{device}/SENSOR",
                json.dumps(payload).encode(),
                [
                    (device, "ENERGY.Power", t * 1000, 12 + i, "W"),
                    (device, "ENERGY.Voltage", t * 1000, 230, "V"),
                    (device, "AM2301.Temperature", t * 1000, 21.5 + i, "Cel"),
                    (device, "AM2301.Humidity", t * 1000, 45.25, "%RH"),
                ],
            )
        )
    node = f"esp-{unique}"  # ESPHome: one state per topic, no time, no units
    out += [
        Sample(
            "esphome",
            f"{node}/sensor/temperature/state",
            b"21.5",
            [(node, "temperature", None, 21.5, None)],
        ),
        Sample(
            "esphome", f"{node}/sensor/humidity/state", b"48", [(node, "humidity", None, 48, None)]
        ),
        Sample(
            "esphome",
            f"{node}/binary_sensor/motion/state",
            b"ON",
            [(node, "motion", None, True, None)],
        ),
    ]
    for i in range(2):  # Zigbee2MQTT with last_seen (ISO 8601)
        t = T0_S + 5 + 10 * i
        z2m = f"kitchen-{unique}"
        payload = {
            "battery": 97 - i,
            "humidity": 48.5,
            "linkquality": 120,
            "temperature": 20.25 + i,
            "last_seen": datetime.fromtimestamp(t, tz=UTC).isoformat(),
        }
        out.append(
            Sample(
                "zigbee2mqtt",
                f"zigbee2mqtt/{z2m}",
                json.dumps(payload).encode(),
                [
                    (z2m, "battery", t * 1000, 97 - i, "%"),
                    (z2m, "humidity", t * 1000, 48.5, "%RH"),
                    (z2m, "linkquality", t * 1000, 120, None),
                    (z2m, "temperature", t * 1000, 20.25 + i, "Cel"),
                ],
            )
        )
    for i in range(2):  # Shelly Gen2 NotifyStatus, params.ts in epoch seconds with a fraction
        shelly = f"shellyplus1pm-{unique}"
        ts = T0_S + 7 + 10 * i
        payload = {
            "src": shelly,
            "dst": f"{shelly}/events",
            "method": "NotifyStatus",
            "params": {
                "ts": ts + 0.25,
                "switch:0": {
                    "id": 0,
                    "apower": 12.5 + i,
                    "aenergy": {"total": 1234.5, "minute_ts": ts},
                },
            },
        }
        ms = ts * 1000 + 250
        out.append(
            Sample(
                "shelly",
                f"{shelly}/events/rpc",
                json.dumps(payload).encode(),
                [
                    (shelly, "switch_0.apower", ms, 12.5 + i, "W"),
                    (shelly, "switch_0.aenergy.total", ms, 1234.5, "W.h"),
                ],
            )
        )
    # Line protocol: two hosts in one message: two envelopes (ns timestamps).
    pi1, pi2 = f"pi1-{unique}", f"pi2-{unique}"
    lines = (
        f"weather,host={pi1},room=kitchen temperature=21.5,humidity=45i,ok=true {T0_MS + 3}000000\n"
        f"weather,host={pi2} temperature=19 {T0_MS + 4}000000\n"
    ).encode()
    out.append(
        Sample(
            "line",
            f"telegraf/{unique}/weather",
            lines,
            [
                (pi1, "weather.temperature", T0_MS + 3, 21.5, None),
                (pi1, "weather.humidity", T0_MS + 3, 45, None),
                (pi1, "weather.ok", T0_MS + 3, True, None),
                (pi2, "weather.temperature", T0_MS + 4, 19.0, None),
            ],
            envelopes=2,
        )
    )
    # Sparkplug B: a birth with aliases, two data messages by alias.
    gw = f"gw-{unique}"
    birth = Payload(
        timestamp=T0_MS,
        seq=0,
        metrics=(
            Metric("bdSeq", timestamp=T0_MS, datatype=DataType.INT64, value=0),
            Metric("temperature", 1, T0_MS, DataType.DOUBLE, 18.5),
            Metric("Motor/RPM", 2, T0_MS, DataType.INT16, 1500),
        ),
    )
    out.append(
        Sample(
            "sparkplug",
            build_topic(site, MessageType.NBIRTH, gw),
            encode_payload(birth),
            [(gw, "temperature", T0_MS, 18.5, "Cel"), (gw, "Motor.RPM", T0_MS, 1500, None)],
        )
    )
    for seq in (1, 2):
        ts = T0_MS + 1000 * seq
        data = Payload(ts, seq, (Metric(alias=1, timestamp=ts, value=18.5 + seq),))
        out.append(
            Sample(
                "sparkplug",
                build_topic(site, MessageType.NDATA, gw),
                encode_payload(data),
                [(gw, "temperature", ts, 18.5 + seq, "Cel")],
            )
        )
    # Our own envelope, on the contract's topic: the native path, beside the rules.
    env = f"env-{unique}"
    for seq in (0, 1):
        envelope = {
            "v": "1.0",
            "id": f"{unique}-{seq}",
            "site": site,
            "device": env,
            "seq": seq,
            "boot": f"b{unique}",
            "ts": T0_MS + seq,
            "readings": [{"sensor": "temperature", "value": 22.5 + seq, "unit": "Cel"}],
        }
        out.append(
            Sample(
                "envelope",
                f"iotpipe/v1/{site}/{env}/telemetry",
                json.dumps(envelope).encode(),
                [(env, "temperature", T0_MS + seq, 22.5 + seq, "Cel")],
            )
        )
    return out


def test_every_format_replayed_twice_is_stored_once_each(
    mosquitto_broker: BrokerInfo,
    rabbitmq_url: str,
    services: Services,
    shared_queues: QueueNames,
    replayer: Replayer,
    unique: str,
    tmp_path: Path,
) -> None:
    """Tasmota, ESPHome, Zigbee2MQTT, Shelly, line protocol, Sparkplug B and envelopes, twice.

    Every reading with a time in its payload is stored exactly once, with the value, unit and
    time the payload says; ESPHome's plain states (no time) are stored once per publish, at
    their receive time, with new ids (docs/ingest.md, identity).
    """
    chain = start_chain(services, shared_queues, mosquitto_broker, rabbitmq_url, unique, tmp_path)
    samples = per_format_samples(chain.site, unique)
    assert {s.fmt for s in samples} == {
        "tasmota",
        "esphome",
        "zigbee2mqtt",
        "shelly",
        "line",
        "sparkplug",
        "envelope",
    }
    messages = [(s.topic, s.payload) for s in samples]
    envelopes = sum(s.envelopes for s in samples)
    timed: Counter[Row] = Counter(
        (device, sensor, ts, comparable(value), unit)  # type: ignore[arg-type]
        for s in samples
        for device, sensor, ts, value, unit in s.readings
        if ts is not None
    )
    untimed = [r for s in samples for r in s.readings if r[2] is None]

    windows: list[tuple[int, int]] = []
    for n in (1, 2):
        began = int(time.time() * 1000)
        publish(replayer, chain, messages)
        chain.wait_for_pass(n, received=len(messages), envelopes=envelopes)
        windows.append((began, int(time.time() * 1000)))
        rows = stored_rows(chain.db, chain.site)
        got_timed = Counter({r: c for r, c in rows.items() if r[0] not in {u[0] for u in untimed}})
        assert got_timed == timed, f"after pass {n}: {_diff(got_timed, timed)}"
        # The plain states: one reading per publish, at the receive time, with the payload's value.
        for device, sensor, _ts, value, unit in untimed:
            got = sorted((r, c) for r, c in rows.items() if r[:2] == (device, sensor))
            assert [c for _r, c in got] == [1] * n, f"{sensor} after pass {n}: {got}"
            for (_d, _s, ts, stored, stored_unit), _c in got:
                assert stored == comparable(value)  # type: ignore[arg-type]
                assert stored_unit == unit
                assert any(lo <= ts <= hi for lo, hi in windows), (ts, windows)
        assert chain.take_dead() == [], "nothing dead-lettered"

    # Ids: the timed formats' second pass found every id stored; ESPHome's are new each time.
    stats = store_stats(chain.db)
    devices = {d.device: d for d in stats.devices if d.site == chain.site}
    esp = f"esp-{unique}"
    per_device = Counter(
        device for _id, device, _boot, _seq in stored_messages(chain.db, chain.site)
    )
    assert per_device[esp] == 2 * 3
    assert (devices[esp].duplicates, devices[esp].gaps) == (0, 0)
    # One envelope per device and message (the line message holds two devices).
    sent = Counter(device for s in samples for device in {r[0] for r in s.readings})
    assert sum(sent.values()) == envelopes
    for device, want in sent.items():
        if device == esp:
            continue
        assert per_device[device] == want, (device, per_device[device], want)
        assert devices[device].duplicates == want, device  # the whole second pass
        assert devices[device].gaps == 0, device
    print_row(
        "ingest per format x2 -> sqlite",
        published=2 * len(messages),
        envelopes=2 * envelopes,
        readings=sum(stored_rows(chain.db, chain.site).values()),
        dups_absorbed=stats.duplicates,
        time=f"{time.monotonic() - chain.began:.1f}s",
    )
    assert chain.consumer.metric("iotpipe_consumer_dead_lettered_total") == 0
    assert chain.bridge.terminate() == 0, chain.services.logs()
    assert chain.consumer.terminate() == 0, chain.services.logs()


# -- 2. Sparkplug B in depth ----------------------------------------------------------------------


@dataclass
class EdgeNode:
    """An edge node as the specification has it behave: one ``seq`` for all it sends."""

    group: str
    node: str
    bdseq: int = 0
    seq: int = 0
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    readings: list[tuple[str, str, int, object, str | None]] = field(default_factory=list)

    def send(
        self,
        kind: MessageType,
        metrics: Sequence[Metric],
        ts: int,
        *,
        device: str | None = None,
        lose: bool = False,
    ) -> None:
        """Build the next message; ``lose``: it never reaches the broker (a gap)."""
        seq = None if kind is MessageType.NDEATH else self.seq
        if seq is not None:
            self.seq = (self.seq + 1) % 256
        payload = encode_payload(Payload(timestamp=ts, seq=seq, metrics=tuple(metrics)))
        if not lose:
            self.sent.append((build_topic(self.group, kind, self.node, device), payload))

    def nbirth(self, ts: int, *, seq: int) -> None:
        self.seq = seq
        self.send(
            MessageType.NBIRTH,
            [
                Metric("bdSeq", timestamp=ts, datatype=DataType.INT64, value=self.bdseq),
                Metric(REBIRTH_METRIC, timestamp=ts, datatype=DataType.BOOLEAN, value=False),
                Metric("temperature", 1, ts, DataType.DOUBLE, 20.0),
                Metric("Motor/RPM", 2, ts, DataType.INT16, -40),
            ],
            ts,
        )
        self.readings += [
            (self.node, "temperature", ts, 20.0, "Cel"),
            (self.node, "Motor.RPM", ts, -40, None),
        ]

    def ndata(self, ts: int, value: float, *, lose: bool = False) -> None:
        """The temperature by alias, sampled 500 ms before it is sent."""
        self.send(
            MessageType.NDATA, [Metric(alias=1, timestamp=ts - 500, value=value)], ts, lose=lose
        )
        if not lose:
            self.readings.append((self.node, "temperature", ts - 500, value, "Cel"))


def test_sparkplug_births_aliases_wrap_death_rebirth_and_a_gap_through_the_chain(
    mosquitto_broker: BrokerInfo,
    rabbitmq_url: str,
    services: Services,
    shared_queues: QueueNames,
    replayer: Replayer,
    capture: CaptureFactory,
    unique: str,
    tmp_path: Path,
) -> None:
    """An edge node's life replayed twice: each reading stored once, completeness exactly one gap.

    NBIRTH (bdSeq 0, aliases), NDATA by alias with seq 250..255, 0..5 (a wrap), a DBIRTH and
    DDATA of a device, an NDEATH, a new NBIRTH (bdSeq 1) and data with one NDATA lost; and a
    node with no birth: its data is dead-lettered ``bridge.mapping_no_birth`` and the bridge
    asks it for a rebirth (NCMD) on MQTT.
    """
    chain = start_chain(services, shared_queues, mosquitto_broker, rabbitmq_url, unique, tmp_path)
    site = chain.site
    gw = EdgeNode(site, "gw1")
    t0, t1 = T0_MS, T0_MS + 3_600_000
    gw.nbirth(t0, seq=249)
    for i in range(12):  # seq 250..255, 0..5
        gw.ndata(t0 + 1000 * (i + 1), 20.5 + i)
    pump_birth = Metric(
        "Flow Rate", 10, t0 + 13_000, DataType.FLOAT, 1.5, properties={"engUnit": "l/min"}
    )
    gw.send(MessageType.DBIRTH, [pump_birth], t0 + 13_000, device="pump 1")
    gw.readings.append(("gw1", "pump_1.Flow_Rate", t0 + 13_000, 1.5, "l/min"))
    for i in range(2):
        ts = t0 + 14_000 + 1000 * i
        gw.send(
            MessageType.DDATA, [Metric(alias=10, timestamp=ts, value=2.25 + i)], ts, device="pump 1"
        )
        gw.readings.append(("gw1", "pump_1.Flow_Rate", ts, 2.25 + i, "l/min"))
    gw.send(
        MessageType.NDEATH,
        [Metric("bdSeq", timestamp=t0 + 20_000, datatype=DataType.INT64, value=0)],
        t0 + 20_000,
    )
    gw.bdseq = 1
    gw.nbirth(t1, seq=0)
    for i in range(5):  # seq 1..5, the third (seq 3) lost
        gw.ndata(t1 + 1000 * (i + 1), 30.5 + i, lose=i == 2)
    ghost = EdgeNode(site, "ghost")
    ghost.seq = 7
    ghost.send(MessageType.NDATA, [Metric(alias=1, timestamp=t1, value=1.0)], t1)
    messages = gw.sent + ghost.sent
    envelopes = 1 + 12 + 1 + 2 + 1 + 4  # births and data with readings; not the death, not the lost
    want: Counter[Row] = Counter(
        (d, s, ts, comparable(v), u)  # type: ignore[arg-type]
        for d, s, ts, v, u in gw.readings
    )
    assert sum(want.values()) == envelopes + 1 + 1  # the births carry two readings each

    commands = capture(chain.mqtt_url, f"spBv1.0/{site}/NCMD/+", qos=1)
    for n in (1, 2):
        publish(replayer, chain, messages)
        chain.wait_for_pass(n, received=len(messages), envelopes=envelopes)
        got = stored_rows(chain.db, site)
        assert got == want, f"after pass {n}: {_diff(got, want)}"
        wait_until(
            partial(dead_letters_reach, chain, n),  # the no-birth message's, once per pass
            15,
            f"the no-birth dead letter of pass {n}",
            chain.services.logs,
        )
        if n == 1:
            wait_until(lambda: commands.messages, 15, "a rebirth request", chain.services.logs)
    assert [(d.key, d.topic, d.rule, d.body) for d in chain.dead] == [
        ("bridge.mapping_no_birth", ghost.sent[0][0], f"spb-{unique}", ghost.sent[0][1])
    ] * 2
    # The rebirth request: NCMD to the node without a birth only, metric Node Control/Rebirth.
    asked = list(commands.messages)
    assert {m.topic for m in asked} == {f"spBv1.0/{site}/NCMD/ghost"}
    request = decode_payload(asked[0].payload)
    assert isinstance(request, Payload)
    assert [(m.name, m.value) for m in request.metrics] == [(REBIRTH_METRIC, True)]

    # Completeness: two boots (bdseq-<bdSeq>-<NBIRTH timestamp>), exactly the one lost NDATA.
    stored = stored_messages(chain.db, site)
    assert {device for _i, device, _b, _s in stored} == {"gw1"}
    boots = Counter(boot for _i, _d, boot, _s in stored)
    assert boots == {f"bdseq-0-{t0}": 16, f"bdseq-1-{t1}": 5}
    assert sorted(s for _i, _d, b, s in stored if b.startswith("bdseq-1")) == [0, 1, 2, 4, 5]
    assert all(i.startswith("spb:") for i, _d, _b, _s in stored)
    (node,) = [d for d in store_stats(chain.db).devices if d.site == site]
    assert (node.messages, node.gaps, node.boots, node.out_of_order) == (21, 1, 2, 0)
    assert node.duplicates == 21  # the whole second pass
    print_row(
        "ingest sparkplug x2 -> sqlite",
        published=2 * len(messages),
        readings=sum(got.values()),
        gaps=node.gaps,
        boots=node.boots,
        dead=len(chain.dead),
        ncmd=len(asked),
        time=f"{time.monotonic() - chain.began:.1f}s",
    )
    assert chain.bridge.terminate() == 0, chain.services.logs()
    assert chain.consumer.terminate() == 0, chain.services.logs()


# -- 3. the mixed-fleet recording -----------------------------------------------------------------


def relabel_fleet(messages: Iterable[RecordedMessage], site: str) -> list[RecordedMessage]:
    """The recording on the test's site: the contract's topics and payloads renamed, every
    Sparkplug group renamed (the group is the site). Foreign formats take the site from the rules.

    Every message is published at QoS 1, so the bridge receives them in the recording's order,
    which the oracle assumes: the recorded Sparkplug NBIRTHs are QoS 0 (as the specification
    has them) and the NDATA QoS 1, and at full replay speed a QoS 0 message overtakes QoS 1
    ones still queued in the publisher's in-flight window; an NBIRTH ahead of its predecessor
    session's last NDATA changes what they map to.
    """
    out = []
    for message in messages:
        levels = message.topic.split("/")
        topic, payload = message.topic, message.payload
        if levels[:2] == ["iotpipe", "v1"] and len(levels) > 2:
            old = levels[2]
            assert len(site) >= len(old)
            topic = "/".join([*levels[:2], site, *levels[3:]])
            payload = payload.replace(f'"site":"{old}"'.encode(), f'"site":"{site}"'.encode())
        elif levels[0] == "spBv1.0" and len(levels) > 3 and levels[1] != "STATE":
            topic = "/".join([levels[0], site, *levels[2:]])
        out.append(replace(message, topic=topic, payload=payload, qos=1))
    return out


@dataclass
class FleetExpectation:
    """What one pass of the recording must give, worked out by the rules themselves.

    ``bridge.ingest.Ingest`` (what the bridge and ``iotpipe ingest try`` run) maps each foreign
    message; the core codec decodes the contract's own. Readings of payloads with a time or
    counter are keyed as the store keys them; those without (no identity: ESPHome) are kept
    apart, their time being the bridge's receive time.

    Attributes:
        received: messages the bridge subscribes to (a rule's filter or the contract's topics).
        unsubscribed: messages of no rule (availability: LWT, status, online), by topic end.
        envelopes: envelopes made (copies included).
        statuses: the contract's status messages.
        timed: each distinct reading with a time: (device, sensor, ts, value, unit).
        untimed: per (device, sensor), the values of readings without a time, one per message.
        untimed_messages: envelopes without a time, per device.
        dead: the dead letters: (routing key, topic, rule, body), counted.
        formats: subscribed messages per format (rule name without the test's token).
        devices: the devices each format's envelopes name.
        ids: distinct ids of the envelopes with a time.
    """

    received: int = 0
    unsubscribed: Counter[str] = field(default_factory=Counter)
    envelopes: int = 0
    statuses: int = 0
    timed: dict[tuple[str, str, int], Row] = field(default_factory=dict)
    untimed: dict[tuple[str, str], list[tuple[tuple[str, object], str | None]]] = field(
        default_factory=dict
    )
    untimed_messages: Counter[str] = field(default_factory=Counter)
    dead: Counter[Dead] = field(default_factory=Counter)
    formats: Counter[str] = field(default_factory=Counter)
    devices: dict[str, set[str]] = field(default_factory=dict)
    ids: int = 0

    @classmethod
    def of(
        cls, messages: Sequence[RecordedMessage], oracle: Ingest, twin: Ingest
    ) -> FleetExpectation:
        """One pass through ``oracle``; ``twin`` (the same rules, another run label) tells
        which ids the payload decides (the same in both) from those of the run (not)."""
        out = cls()
        ids: set[str] = set()
        for n, m in enumerate(messages):
            if m.topic.startswith("iotpipe/v1/"):
                out.received += 1
                out.formats["envelope"] += 1
                decoded = decode(m.topic, m.payload)
                if isinstance(decoded, Rejection):
                    out.dead[Dead(f"bridge.{decoded.reason.value}", m.topic, "", m.payload)] += 1
                elif isinstance(decoded, Status):
                    out.statuses += 1
                elif isinstance(decoded, Envelope):
                    out.envelopes += 1
                    if decoded.id not in ids:
                        ids.add(decoded.id)
                        for r in decoded.readings:
                            ts = r.time_ms(decoded)
                            out.timed.setdefault(
                                (decoded.device, r.sensor, ts),
                                (decoded.device, r.sensor, ts, comparable(r.value), r.unit),
                            )
                continue
            result = oracle.map(m.topic, m.payload, T0_MS + n)
            other = twin.map(m.topic, m.payload, T0_MS + n)
            if result is None:
                out.unsubscribed[m.topic.rsplit("/", 1)[-1]] += 1
                continue
            rule, outcome = result
            out.received += 1
            out.formats[rule.rsplit("-", 1)[0]] += 1
            if outcome.error is not None:
                key = f"bridge.mapping_{outcome.error.what}"
                out.dead[Dead(key, m.topic, rule, m.payload)] += 1
            assert other is not None
            for mapped, again in zip(outcome.mapped, other[1].mapped, strict=True):
                out.envelopes += 1
                out.devices.setdefault(rule.rsplit("-", 1)[0], set()).add(mapped.device)
                if mapped.id != again.id:  # no time, no counter: a new message each time
                    out.untimed_messages[mapped.device] += 1
                    for reading in mapped.readings:
                        out.untimed.setdefault((mapped.device, reading.sensor), []).append(
                            (comparable(reading.value), reading.unit)
                        )
                    continue
                if mapped.id in ids:
                    continue
                ids.add(mapped.id)
                for reading in mapped.readings:
                    ts = mapped.ts_ms if reading.ts_ms is None else reading.ts_ms
                    out.timed.setdefault(
                        (mapped.device, reading.sensor, ts),
                        (
                            mapped.device,
                            reading.sensor,
                            ts,
                            comparable(reading.value),
                            reading.unit,
                        ),
                    )
        out.ids = len(ids)
        return out


def test_mixed_fleet_recording_replayed_twice_stores_each_reading_once(
    mosquitto_broker: BrokerInfo,
    rabbitmq_url: str,
    services: Services,
    shared_queues: QueueNames,
    replayer: Replayer,
    capture: CaptureFactory,
    unique: str,
    tmp_path: Path,
) -> None:
    """tests/data/mixed-fleet.jsonl, with a rule for every format, through the chain twice.

    Every valid message's readings stored exactly once (those without a time once per
    publish); every malformed payload dead-lettered once per pass with its rule's reason (the
    contract's own for envelopes); nothing else dead-lettered; availability messages (Tasmota
    LWT, ESPHome status, Zigbee2MQTT availability, Shelly online) match no rule, so the bridge
    does not subscribe to them: neither stored nor dead-lettered (docs/ingest.md).
    """
    chain = start_chain(services, shared_queues, mosquitto_broker, rabbitmq_url, unique, tmp_path)
    _header, original = read_recording(MIXED_FLEET, allow_truncated=False)
    messages = relabel_fleet(original, chain.site)
    rules = [IngestRule(**rule) for rule in chain.rules]
    oracle, twin = Ingest(rules, run="oracle-run"), Ingest(rules, run="twin-run")
    first = FleetExpectation.of(messages, oracle, twin)
    sparkplug = oracle.rules[-1].stateful
    assert isinstance(sparkplug, SparkplugIngest)
    spb_gaps = sparkplug.gaps  # seq positions the rule left free in one pass
    second = FleetExpectation.of(messages, oracle, twin)  # the rules' state, as in the bridge
    assert (second.timed, second.dead) == (first.timed, first.dead), "a pass is a pass"
    # The recording exercises what the test claims (counts from the file, never hard-coded).
    present = {"envelope", "tasmota", "esphome", "z2m", "shelly", "line"}
    assert present <= set(first.formats), first.formats
    assert first.dead, "malformed payloads"
    assert set(first.unsubscribed) <= {"LWT", "status", "availability", "online"}, (
        first.unsubscribed
    )
    untimed_devices = {device for device, _sensor in first.untimed}
    untimed_count = sum(first.untimed_messages.values())
    want_timed: Counter[Row] = Counter(dict.fromkeys(first.timed.values(), 1))

    commands = capture(chain.mqtt_url, "spBv1.0/+/NCMD/+", qos=1)
    for n in (1, 2):
        replayer(messages, chain.mqtt_url)
        chain.wait_for_pass(
            n, received=first.received, envelopes=first.envelopes, statuses=first.statuses
        )
        rows = stored_rows(chain.db, chain.site)
        timed = Counter({r: c for r, c in rows.items() if r[0] not in untimed_devices})
        assert timed == want_timed, f"after pass {n}: {_diff(timed, want_timed)}"
        # Without a time: stored once per publish, at the receive time; the store keys a reading
        # by (site, device, sensor, ms), so two states of one sensor received within the same
        # millisecond (a duplicate replayed at full speed) keep the first.
        for (device, sensor), published in first.untimed.items():
            got = [
                (value, unit)
                for (d, s, _t, value, unit), c in rows.items()
                if (d, s) == (device, sensor)
                for _ in range(c)
            ]
            assert n <= len(got) <= n * len(published), (device, sensor, len(got))
            assert not Counter(got) - Counter(published * n), (
                f"values not published: {device}/{sensor}"
            )
        chain.take_dead()
        want_dead = Counter({d: c * n for d, c in first.dead.items()})
        assert Counter(chain.dead) == want_dead, (
            f"dead letters after pass {n}: missing {list((want_dead - Counter(chain.dead)).elements())[:3]}, "
            f"unexpected {list((Counter(chain.dead) - want_dead).elements())[:3]}"
        )

    stored = stored_messages(chain.db, chain.site)
    untimed_stored = Counter(d for _i, d, _b, _s in stored if d in untimed_devices)
    assert sum(untimed_stored.values()) == 2 * untimed_count, "each no-time message is a new one"
    assert len(stored) == 2 * untimed_count + first.ids, "every id with a time stored once"
    # Every envelope made is stored once or absorbed as a duplicate of its id, nothing else.
    ours_dups = sum(d.duplicates for d in store_stats(chain.db).devices if d.site == chain.site)
    assert len(stored) + ours_dups == 2 * first.envelopes, (len(stored), ours_dups)
    stats = store_stats(chain.db)
    ours = [d for d in stats.devices if d.site == chain.site]
    for stat in ours:
        if stat.device in untimed_devices:
            assert (stat.gaps, stat.duplicates, stat.boots) == (0, 0, 1), stat
    # Completeness: the bridge's own counters leave no gap (a malformed payload takes no seq);
    # Sparkplug's counts the messages that did not map after their birth, as the rule did.
    gaps = {stat.device: stat.gaps for stat in ours}
    for kind, names in first.devices.items():
        if kind != "spb":
            assert {gaps[name] for name in names} == {0}, (kind, gaps)
    assert sum(gaps[name] for name in first.devices.get("spb", ())) == spb_gaps
    # Everything the bridge received is a subscribed message of the recording, or its own
    # rebirth requests coming back (the sparkplug rule's filter covers NCMD).
    received = chain.bridge.metric("iotpipe_bridge_received_total")
    assert received == 2 * first.received + len(commands.messages)
    print_row(
        "ingest mixed fleet x2 -> sqlite",
        replayed=2 * len(messages),
        received=int(received),
        readings=sum(stored_rows(chain.db, chain.site).values()),
        timed=len(want_timed),
        untimed_msgs=untimed_count,
        dead=len(chain.dead),
        spb_gaps=spb_gaps,
        unsubscribed=sum(first.unsubscribed.values()),
        stored=len(stored),
        dups_absorbed=stats.duplicates,
        formats=",".join(f"{k}:{v}" for k, v in sorted(first.formats.items())),
        time=f"{time.monotonic() - chain.began:.1f}s",
    )
    assert chain.consumer.metric("iotpipe_consumer_dead_lettered_total") == 0
    assert chain.bridge.terminate() == 0, chain.services.logs()
    assert chain.consumer.terminate() == 0, chain.services.logs()
