"""The agent's receipts (wire 1.1) against an in-memory MQTT client: hold after PUBACK, delete on
receipt, the window, paced resends, the capability negotiation, metrics and /healthz."""

from __future__ import annotations

import collections
import json
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.agent import Agent, AgentStats, Publisher
from edge.envelopes import build_envelope
from edge.outbox import Outbox, Pending
from edge.sensors.base import Sample
from edge.unconfirmed import Unconfirmed
from iotpipe.connection import MqttSettings
from iotpipe.mqtt import Message, MessageHandler, MqttClient, Will
from iotpipe.receipts import (
    CAPABILITY_TOPIC,
    BootReceipt,
    Receipt,
    SeqSet,
    encode_receipt,
    receipt_topic,
)
from iotpipe.systemd_notify import Notifier
from tests.conftest import BrokerInfo, wait_for
from tests.edge.conftest import Subscriber, make_settings
from tests.edge.test_agent_process import committed_rows, start, write_config

SITE, DEVICE, BOOT = "s", "pi1", "b00t-1"
RECEIPTS = receipt_topic(SITE, DEVICE)


class FakeBroker:
    """What the fake clients publish to and receive from; PUBACKs at once unless ``hold_acks``."""

    def __init__(self) -> None:
        self.published: list[tuple[float, str, bytes]] = []
        self.subscriptions: list[list[tuple[str, int]]] = []
        self.retained: dict[str, bytes] = {}
        self.pumps = 0
        self.client: FakeClient | None = None
        self.lock = threading.Lock()

    def factory(
        self, _settings: MqttSettings, _will: Will, _window: int, on_message: MessageHandler
    ) -> FakeClient:
        self.client = FakeClient(self, on_message)
        return self.client

    def send(self, topic: str, payload: bytes) -> None:
        """Publish retained to the agent (delivered in its next pump)."""
        with self.lock:
            self.retained[topic] = payload
            if self.client is not None:
                self.client.inbox.append(Message(topic, payload, retain=True))

    def telemetry(self) -> list[tuple[float, bytes]]:
        with self.lock:
            return [(t, p) for t, topic, p in self.published if topic.endswith("/telemetry")]


class FakeClient:
    """The part of :class:`iotpipe.mqtt.MqttClient` the publisher uses."""

    def __init__(self, broker: FakeBroker, on_message: MessageHandler) -> None:
        self.broker = broker
        self.on_message = on_message
        self.inbox: list[Message] = []
        self.unacknowledged = 0

    def connect(self, timeout: float = 10.0) -> None:
        pass

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        with self.broker.lock:
            self.broker.published.append((time.monotonic(), topic, payload))
        self.unacknowledged += 1
        return 1

    def subscribe(self, filters: Iterable[tuple[str, int]], timeout: float = 10.0) -> list[int]:
        wanted = list(filters)
        with self.broker.lock:
            self.broker.subscriptions.append(wanted)
            self.inbox.extend(
                Message(t, p, retain=True)
                for t, p in self.broker.retained.items()
                if t in {f for f, _ in wanted}
            )
        self.pump()
        return [1 for _ in wanted]

    def pump(self, timeout: float = 0.0) -> None:
        time.sleep(min(timeout, 0.005))  # the real one blocks on its socket
        self.unacknowledged = 0
        with self.broker.lock:
            inbox, self.inbox = self.inbox, []
            self.broker.pumps += 1
        for message in inbox:
            self.on_message(message)

    def flush(self, timeout: float) -> bool:
        self.pump()
        return True

    def disconnect(self) -> None:
        pass


def pending(seqs: Iterable[int], boot: str = BOOT) -> list[Pending]:
    topic = f"iotpipe/v1/{SITE}/{DEVICE}/telemetry"
    out = []
    for seq in seqs:
        sample = Sample("t", float(seq), "Cel", 1_700_000_000_000 + seq)
        payload = build_envelope(
            site=SITE, device=DEVICE, boot=boot, seq=seq, samples=[sample], tags=None
        )
        out.append(Pending(topic, payload, seq, 1, sample.ts_ms))
    return out


def receipt(*entries: BootReceipt, device: str = DEVICE) -> bytes:
    return encode_receipt(Receipt(site=SITE, device=device, ts=1, stored=entries))


class Running:
    """A :class:`Publisher` on its thread, with its outbox and the fake broker."""

    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.settings = make_settings(tmp_path, SITE, **settings)
        self.outbox = Outbox(tmp_path / "outbox.db")
        self.stats = AgentStats()
        self.broker = FakeBroker()
        self.publisher = Publisher(
            self.settings,
            MqttSettings(url="mqtt://127.0.0.1:1"),
            self.outbox,
            self.stats,
            site=SITE,
            device=DEVICE,
            client_factory=self.broker.factory,
        )

    def start(self, seqs: Iterable[int] = ()) -> Running:
        self.outbox.append(pending(seqs))
        self.publisher.start()
        return self

    def pumps(self, n: int) -> None:
        """Wait until the publisher has looped ``n`` more times."""
        target = self.broker.pumps + n
        wait_for(lambda: self.broker.pumps >= target, 10, f"{n} more loops")

    def close(self) -> None:
        self.publisher.stop(0.0)
        self.outbox.close()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    made: list[Running] = []

    def make(**settings: Any) -> Running:
        made.append(Running(tmp_path / f"p{len(made)}", **settings))
        return made[-1]

    yield make
    for item in made:
        item.close()


def test_held_after_puback_and_deleted_only_when_a_receipt_covers_them(
    running: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    """Receipts covering several, reordered, duplicated, for another boot or device, malformed:
    an envelope leaves the outbox exactly when some receipt covered its (boot, seq)."""
    run = running(receipts="on").start(range(10))
    wait_for(lambda: run.stats.unconfirmed == 10, 10, "10 held envelopes")
    assert run.outbox.depth == 10
    assert run.stats.envelopes_published == 10
    assert run.broker.subscriptions == [[(RECEIPTS, 1)]]
    run.broker.send(RECEIPTS, receipt(BootReceipt(BOOT, ranges=((5, 6),), through=3)))
    wait_for(lambda: run.outbox.depth == 4, 10, "seqs 0-3, 5, 6 deleted")
    run.broker.send(RECEIPTS, receipt(BootReceipt("other-boot", through=9)))
    run.broker.send(RECEIPTS, b'{"v":"1.1","site":"s","device":"pi1","ts":1,"stored":[]}')
    run.broker.send(RECEIPTS, receipt(BootReceipt(BOOT, through=9), device="pi2"))
    run.broker.send(RECEIPTS, receipt(BootReceipt(BOOT, ranges=((4, 4),))))  # out of order
    run.broker.send(RECEIPTS, receipt(BootReceipt(BOOT, ranges=((4, 4),))))  # duplicate
    wait_for(lambda: run.stats.receipts_received == 4, 10, "four valid receipts")
    assert run.outbox.depth == 3
    assert run.stats.unconfirmed == 3
    assert run.stats.receipts_malformed == 2
    assert sum("receipt ignored" in r.message for r in caplog.records) == 2
    run.broker.send(RECEIPTS, receipt(BootReceipt(BOOT, ranges=((7, 9),))))
    wait_for(lambda: run.outbox.depth == 0, 10, "an empty outbox")
    assert run.stats.unconfirmed == 0
    assert run.stats.receipt_latency_p99 is not None
    assert len(run.broker.telemetry()) == 10  # nothing resent within the 5 s timeout


def test_a_full_window_publishes_nothing_new(running: Callable[..., Running]) -> None:
    """receipt_window envelopes unreceipted: the rest waits in the outbox until a receipt."""
    run = running(receipts="on", receipt_window=5).start(range(12))
    wait_for(lambda: run.stats.unconfirmed == 5, 10, "a full window")
    run.pumps(20)
    assert len(run.broker.telemetry()) == 5
    assert run.outbox.depth == 12
    run.broker.send(RECEIPTS, receipt(BootReceipt(BOOT, through=2)))
    wait_for(lambda: len(run.broker.telemetry()) == 8, 10, "three more published")
    run.pumps(20)
    assert len(run.broker.telemetry()) == 8
    assert (run.outbox.depth, run.stats.unconfirmed) == (9, 5)


def test_unreceipted_envelopes_are_resent_with_the_same_bytes_paced(
    running: Callable[..., Running],
) -> None:
    """After the (jittered) timeout every held envelope goes again, byte for byte, and never
    faster than drain_rate together with new publishes."""
    run = running(
        receipts="on", drain_rate=20.0, receipt_timeout_min=0.3, receipt_timeout_max=0.3
    ).start(range(30))
    order = [p.payload for p in pending(range(30))]

    def each_sent_twice() -> bool:
        counts = collections.Counter(payload for _, payload in run.broker.telemetry())
        return all(counts[payload] >= 2 for payload in order)

    wait_for(each_sent_twice, 20, "every envelope resent")
    sent = run.broker.telemetry()
    assert {payload for _, payload in sent} == set(order)  # resends are the same bytes
    first_sent: dict[bytes, float] = {}
    for at, payload in sent:
        if payload in first_sent:  # its first resend: not before the (jittered) timeout
            assert at - first_sent[payload] >= 0.8 * 0.3
        first_sent.setdefault(payload, at)
    assert run.stats.envelopes_resent >= 30
    start = sent[0][0]
    for i, (at, _) in enumerate(sent):  # token bucket: burst 20, then 20 per second
        assert i + 1 <= 20 + 20 * (at - start) + 1
    assert run.outbox.depth == 30


def test_auto_without_capability_goes_off_and_follows_later_changes(
    running: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    """auto: held until the wait ends without a capability, then off (held ones deleted, one
    WARNING); a capability true turns receipts on, false off again, each logged once."""
    caplog.set_level(logging.INFO, logger="edge.agent")
    run = running()
    run.publisher.capability_wait = 0.5
    run.start(range(4))
    assert run.stats.receipts == "undecided"
    wait_for(lambda: run.stats.receipts == "inactive", 10, "receipts decided off")
    wait_for(lambda: run.outbox.depth == 0, 10, "the held envelopes deleted")
    assert run.broker.subscriptions == [[(RECEIPTS, 1), (CAPABILITY_TOPIC, 1)]]
    capability = b'{"v":"1.1","receipts":true,"agent":"iotpipe-bridge/1","ts":1}'
    run.broker.send(CAPABILITY_TOPIC, capability)
    run.broker.send(CAPABILITY_TOPIC, capability)
    wait_for(lambda: run.stats.receipts == "active", 10, "receipts on")
    run.outbox.append(pending(range(4, 7)))
    wait_for(lambda: run.stats.unconfirmed == 3, 10, "new envelopes held")
    assert run.outbox.depth == 3
    run.broker.send(CAPABILITY_TOPIC, capability.replace(b"true", b"false"))
    wait_for(lambda: run.outbox.depth == 0, 10, "held envelopes deleted when receipts stop")
    assert run.stats.receipts == "inactive"
    changes = [r for r in caplog.records if r.message.startswith("receipts ")]
    assert [(r.levelname, r.message.split()[1]) for r in changes] == [
        ("WARNING", "inactive"),
        ("INFO", "active"),
        ("WARNING", "inactive"),
    ]


def test_auto_with_a_retained_capability_holds_at_once(running: Callable[..., Running]) -> None:
    """A retained capability true found at connect turns receipts on before any decision wait."""
    run = running()
    run.broker.retained[CAPABILITY_TOPIC] = b'{"v":"1.1","receipts":true,"ts":1}'
    run.start(range(3))
    wait_for(lambda: run.stats.unconfirmed == 3, 10, "held envelopes")
    assert run.stats.receipts == "active"


def test_off_deletes_on_puback_and_subscribes_to_nothing(running: Callable[..., Running]) -> None:
    """receipts = "off" is the 1.0 agent: no subscription, deleted on PUBACK, never held."""
    run = running(receipts="off").start(range(5))
    wait_for(lambda: run.outbox.depth == 0, 10, "an empty outbox")
    assert run.broker.subscriptions == []
    assert (run.stats.receipts, run.stats.unconfirmed) == ("inactive", 0)


def test_metrics_and_healthz_show_the_receipts(tmp_path: Path) -> None:
    """/healthz and /metrics carry receipts state, unconfirmed count and age, latency, counters."""
    broker = FakeBroker()
    settings = make_settings(tmp_path, SITE, receipts="on")
    agent = Agent(
        settings,
        MqttSettings(url="mqtt://127.0.0.1:1"),
        [],
        client_factory=broker.factory,
        notifier=Notifier(environ={}),
    )
    agent.outbox.append(pending(range(3)))
    agent.publisher.start()
    try:
        wait_for(lambda: agent.stats.unconfirmed == 3, 10, "three held")
        broker.send(RECEIPTS, receipt(BootReceipt(BOOT, through=0)))
        wait_for(lambda: agent.stats.receipts_received == 1, 10, "a receipt")
        _, health = agent.health()
        samples = {
            (f.name, labels): value for f in agent.metric_families() for labels, value in f.samples
        }
    finally:
        agent.publisher.stop(0.0)
        agent.outbox.close()
    assert health["receipts"] == "active"
    assert health["unconfirmed"] == 2
    assert health["oldest_unconfirmed_age"] >= 0
    assert health["receipt_latency_p50"] == health["receipt_latency_p99"] >= 0
    assert samples[("iotpipe_edge_receipts_active", ())] == 1.0
    assert samples[("iotpipe_edge_unconfirmed", ())] == 2.0
    assert samples[("iotpipe_edge_receipts_received", ())] == 1.0
    assert samples[("iotpipe_edge_envelopes_resent", ())] == 0.0
    assert samples[("iotpipe_edge_receipt_latency_seconds", ("0.99",))] >= 0


@pytest.mark.mqtt
@pytest.mark.mosquitto
@pytest.mark.slow
def test_edge_run_with_a_receipting_store_drains_and_resends_what_was_not_receipted(
    tmp_path: Path, unique: str, mosquitto_broker: BrokerInfo
) -> None:
    """`iotpipe edge run` with receipts on and a test store that receipts what it saw (except
    two envelopes at first): those two come again byte for byte, and after SIGTERM the outbox
    is empty."""
    site, url, state = f"t{unique}", mosquitto_broker.url, tmp_path / "state"
    config = write_config(tmp_path / "edge.toml", url, site, state, drain_rate=100.0)
    config.write_text(
        config.read_text().replace(
            "[[edge.sensors]]",
            'receipts = "on"\nreceipt_timeout_min = 1.0\nreceipt_timeout_max = 2.0\n\n'
            "[[edge.sensors]]",
            1,
        )
    )
    seen = Subscriber(url, f"iotpipe/v1/{site}/+/telemetry", f"store-{unique}").start()
    store = MqttClient(MqttSettings(url=url), client_id=f"receipts-{unique}")
    store.connect()
    held_back = {2, 3}

    def receipt_what_was_seen() -> None:
        envelopes = seen.envelopes()
        if not envelopes:
            return
        arrivals = collections.Counter(e["seq"] for e in envelopes)
        stored = SeqSet()
        for seq, count in arrivals.items():
            if seq not in held_back or count >= 2:
                stored.add(seq)
        boot = envelopes[0]["boot"]
        payload = encode_receipt(
            Receipt(site, "pi1", 1, (BootReceipt(boot, tuple(stored.ranges()[-256:])),))
        )
        store.publish(receipt_topic(site, "pi1"), payload, qos=1, retain=True)
        store.flush(5.0)

    log = tmp_path / "agent.log"
    agent = start(config, log)
    try:

        def resent() -> bool:
            receipt_what_was_seen()
            arrivals = collections.Counter(e["seq"] for e in seen.envelopes())
            return all(arrivals[seq] >= 2 for seq in held_back) and len(arrivals) >= 10

        wait_for(resent, 60, "the two unreceipted envelopes resent")
        agent.send_signal(signal.SIGTERM)

        def stopped() -> bool:
            receipt_what_was_seen()
            return agent.poll() is not None

        wait_for(stopped, 30, "the agent to exit")
        assert agent.returncode == 0, log.read_text()[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        seen.stop()
        store.disconnect()
    payloads: dict[str, bytes] = {}
    for message in seen.messages:
        env_id = json.loads(message.payload)["id"]
        assert payloads.setdefault(env_id, message.payload) == message.payload
    *left, _ = committed_rows(state / "outbox.db")
    assert left == []  # every envelope receipted, none left
    assert "receipts=active" in log.read_text()


def test_resends_go_least_recently_sent_first_and_back_off() -> None:
    """Due envelopes come oldest first, a resent one goes to the back and waits twice as long."""
    rng = random.Random(1)
    rng.uniform = lambda a, b: 1.0  # type: ignore[method-assign]  # no jitter
    book = Unconfirmed(5.0, 300.0, rng)
    for seq in range(3):
        assert book.hold(seq, BOOT, seq, "t", b"p", acked_at=0.0, sent_at=float(seq))
    assert [h.seq for h in book.due(7.5, 10)] == [0, 1, 2]
    first = book.due(7.5, 1)[0]
    book.resent(first, 7.5)
    assert first.due == 7.5 + 10.0  # 2 x timeout
    assert [h.seq for h in book.due(7.5, 10)] == [1, 2]
    assert [h.seq for h in book.due(100.0, 10)] == [1, 2, 0]
    entry = BootReceipt(BOOT, ranges=((5, 5),), through=1)
    done = book.apply(Receipt(SITE, DEVICE, 1, (entry,)), 8.0)
    assert done == [1, 0]
    assert not book.hold(5, BOOT, 5, "t", b"p", acked_at=9.0, sent_at=9.0)  # already receipted
    assert len(book) == 1
