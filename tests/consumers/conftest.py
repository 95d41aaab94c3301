"""Helpers for consumer tests: wire-conformant AMQP messages, a test queue, a running consumer."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika  # type: ignore[import-untyped]
import pytest

from consumers.service import Consumer
from consumers.settings import ConsumeSettings
from consumers.store import Store
from iotpipe.amqp import (
    DEAD_EXCHANGE,
    TELEMETRY_EXCHANGE,
    ConfirmingPublisher,
    MessageProperties,
    Outcome,
    telemetry_properties,
)
from iotpipe.receipts import EXCHANGE as RECEIPTS_EXCHANGE
from iotpipe.settings import AmqpSettings
from tests.conftest import wait_for

T0_MS = 1_795_000_000_000  # 2026-11-18T...: a fixed, recent reading time


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One AMQP message as the bridge would publish it."""

    routing_key: str
    body: bytes
    properties: MessageProperties
    id: str | None = None
    readings: int = 0


def telemetry(
    site: str,
    device: str,
    seq: int,
    *,
    msg_id: str | None = None,
    boot: str = "b1",
    sensors: Sequence[str] = ("temperature", "humidity"),
    ts_ms: int | None = None,
    value: Any = None,
) -> Outgoing:
    """A telemetry message with one reading per sensor, all at the envelope's time."""
    msg_id = msg_id or f"{site}-{device}-{boot}-{seq}"
    ts = T0_MS + seq * 1000 if ts_ms is None else ts_ms
    readings = [
        {"sensor": s, "value": 20.5 + seq if value is None else value, "unit": "Cel"}
        for s in sensors
    ]
    envelope = {
        "v": "1.0",
        "id": msg_id,
        "site": site,
        "device": device,
        "seq": seq,
        "boot": boot,
        "ts": ts,
        "readings": readings,
    }
    topic = f"iotpipe/v1/{site}/{device}/telemetry"
    props = telemetry_properties(
        message_id=msg_id,
        version="1.0",
        site=site,
        device=device,
        topic=topic,
        kind="telemetry",
        received_at=time.time(),
    )
    body = json.dumps(envelope).encode()
    return Outgoing(topic.replace("/", "."), body, props, msg_id, len(readings))


def status(site: str, device: str, state: str, ts_ms: int) -> Outgoing:
    """A status message (birth or last will)."""
    topic = f"iotpipe/v1/{site}/{device}/status"
    body = json.dumps(
        {"v": "1.0", "site": site, "device": device, "state": state, "ts": ts_ms, "agent": "t/1"}
    ).encode()
    props = telemetry_properties(
        message_id=None,
        version="1.0",
        site=site,
        device=device,
        topic=topic,
        kind="status",
        received_at=time.time(),
    )
    return Outgoing(topic.replace("/", "."), body, props)


def raw(site: str, device: str, body: bytes, *, kind: str = "telemetry") -> Outgoing:
    """A message with arbitrary body bytes on a device's routing key (poison input)."""
    topic = f"iotpipe/v1/{site}/{device}/{kind}"
    return Outgoing(topic.replace("/", "."), body, MessageProperties(message_id=None))


def publish(url: str, messages: Sequence[Outgoing], *, timeout: float = 60.0) -> None:
    """Publish with confirms (a window of 1000) and fail unless every message was confirmed."""
    outcomes: dict[int, Outcome] = {}
    done = threading.Event()

    def on_result(token: object, outcome: Outcome) -> None:
        outcomes[int(str(token))] = outcome
        if len(outcomes) == len(messages):
            done.set()

    publisher = ConfirmingPublisher(AmqpSettings(url=url), on_result, connection_name="test-pub")
    publisher.start()
    try:
        for n, m in enumerate(messages):
            publisher.publish(TELEMETRY_EXCHANGE, m.routing_key, m.body, m.properties, token=n)
        assert done.wait(timeout) or not messages, f"{len(outcomes)}/{len(messages)} confirmed"
    finally:
        publisher.close()
    bad = Counter(o.value for o in outcomes.values() if o is not Outcome.CONFIRMED)
    assert not bad, f"not confirmed: {dict(bad)} of {len(messages)} (is the queue declared?)"


@dataclass
class SiteQueue:
    """A uniquely named store queue bound to one test site, and an observer of iotpipe.dead."""

    url: str
    name: str
    site: str
    dead_queue: str
    extra: list[str] = field(default_factory=list)

    def settings(self, store: str, **overrides: Any) -> ConsumeSettings:
        """Consumer settings for this queue (free HTTP port, short batches)."""
        values: dict[str, Any] = {
            "store": store,
            "queue": self.name,
            "bindings": (f"iotpipe.v1.{self.site}.#",),
            "http_port": 0,
            "batch_latency": 0.05,
        }
        return ConsumeSettings(**(values | overrides))

    def dead_letters(self) -> list[tuple[str, dict[str, Any], bytes]]:
        """What was dead-lettered for this site so far: (routing key, headers, body).

        The observer queue sees every ``consumer.#`` dead letter on the shared broker, so only
        bodies naming this test's site count (poison bodies in these tests always do).
        """
        return [m for m in drain(self.url, self.dead_queue) if self.site.encode() in m[2]]

    def bind_receipts(self) -> str:
        """A queue (deleted afterwards) bound to the receipts exchange for this site's devices."""
        queue = f"{self.name}.receipts"
        self.extra.append(queue)
        with _channel(self.url) as ch:
            ch.exchange_declare(RECEIPTS_EXCHANGE, "topic", durable=True)
            ch.queue_declare(queue, durable=False, auto_delete=False)
            ch.queue_bind(queue, RECEIPTS_EXCHANGE, f"iotpipe.v1.{self.site}.#")
        return queue

    def ready(self) -> int:
        """Messages of the store queue ready for delivery (not counting unacknowledged ones)."""
        with _channel(self.url) as ch:
            return int(ch.queue_declare(self.name, passive=True).method.message_count)


class _channel:  # noqa: N801 - used as a context manager like a function
    def __init__(self, url: str) -> None:
        self._conn = pika.BlockingConnection(pika.URLParameters(url))

    def __enter__(self) -> Any:
        return self._conn.channel()

    def __exit__(self, *exc: object) -> None:
        self._conn.close()


def drain(url: str, queue: str) -> list[tuple[str, dict[str, Any], bytes]]:
    """Take (and ack) every message currently in ``queue``."""
    out: list[tuple[str, dict[str, Any], bytes]] = []
    with _channel(url) as ch:
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((method.routing_key, dict(props.headers or {}), body))


def assert_receipt_properties(props: Any, site: str, device: str) -> None:
    """``props`` (ours or pika's) are a receipt's, as wire contract 1.1 specifies them."""
    assert (props.content_type, props.type, props.delivery_mode, props.app_id) == (
        "application/json",
        "iotpipe.receipt",
        2,
        "iotpipe-consumer",
    )
    assert props.headers == {
        "x-iotpipe-version": "1.1",
        "x-iotpipe-site": site,
        "x-iotpipe-device": device,
    }


def take(url: str, queue: str) -> list[tuple[str, Any, bytes]]:
    """Take (and ack) every message currently in ``queue``: (routing key, properties, body)."""
    out: list[tuple[str, Any, bytes]] = []
    with _channel(url) as ch:
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((method.routing_key, props, body))


@pytest.fixture
def site_queue(rabbitmq_url: str, unique: str) -> Iterator[SiteQueue]:
    """A store queue name for this test, bound to site ``s<unique>``; deleted afterwards."""
    site = f"s{unique}"
    name = f"test.{unique}.store"
    dead = f"test.{unique}.dead"
    with _channel(rabbitmq_url) as ch:
        ch.exchange_declare(DEAD_EXCHANGE, "topic", durable=True)
        ch.queue_declare(dead, durable=False, auto_delete=False)
        ch.queue_bind(dead, DEAD_EXCHANGE, "consumer.#")
    q = SiteQueue(rabbitmq_url, name, site, dead)
    yield q
    with _channel(rabbitmq_url) as ch:
        for queue in (name, dead, *q.extra):
            ch.queue_delete(queue)


@dataclass
class Running:
    """A consumer running on a thread."""

    consumer: Consumer
    thread: threading.Thread

    def stop(self, timeout: float = 30.0) -> None:
        self.consumer.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "consumer did not stop"


@pytest.fixture
def start_consumer() -> Iterator[Callable[[str, ConsumeSettings, Store], Running]]:
    """Start consumers on threads; every one is stopped at teardown."""
    running: list[Running] = []

    def start(url: str, settings: ConsumeSettings, store: Store) -> Running:
        consumer = Consumer.from_settings(AmqpSettings(url=url), settings, store)
        thread = threading.Thread(target=consumer.run, name="test-consumer", daemon=True)
        thread.start()
        assert wait_for(consumer.ready.is_set, 30), "consumer did not connect"
        r = Running(consumer, thread)
        running.append(r)
        return r

    yield start
    for r in running:
        if r.thread.is_alive():
            r.stop()


def unique_id() -> str:
    """A fresh message id."""
    return uuid.uuid4().hex


def db_path(tmp_path: Path) -> str:
    """A SQLite store URL in the test's directory."""
    return f"sqlite:///{tmp_path / 'telemetry.db'}"
