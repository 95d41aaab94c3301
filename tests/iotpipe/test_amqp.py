"""ConfirmingPublisher against real RabbitMQ: confirms, returns, nacks, clear errors, lost nodes."""

from __future__ import annotations

import collections
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pika.connection
import pytest

from iotpipe import amqp
from iotpipe.amqp import (
    DEAD_EXCHANGE,
    EXCHANGES,
    TELEMETRY_EXCHANGE,
    ConfirmingPublisher,
    MessageProperties,
    Outcome,
    _pika_properties,
    connection_parameters,
    dead_letter_properties,
    declare_topology,
    encode_properties,
    telemetry_properties,
    vhost_of,
)
from iotpipe.errors import ConnectError
from iotpipe.settings import AmqpSettings, TlsSettings
from iotpipe.topics import Kind, Topic
from tests.conftest import free_port, wait_for
from tests.rabbitmq import PrivateRabbit, blocking_channel

BODY = b'{"v":"1.0","id":"m-1","site":"home","device":"pi-1","seq":0,"ts":0,"readings":[]}'


def wire_properties(
    topic: Topic, message_id: str | None, *, version: str = "1.0", received_at: float
) -> MessageProperties:
    """telemetry_properties() for a parsed topic."""
    return telemetry_properties(
        message_id=message_id,
        version=version,
        site=topic.site,
        device=topic.device,
        topic=topic.mqtt,
        kind=topic.kind,
        received_at=received_at,
    )


class Results:
    """Every outcome the publisher reported, per token, in arrival order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_token: dict[object, list[Outcome]] = collections.defaultdict(list)
        self.order: list[tuple[object, Outcome]] = []

    def __call__(self, token: object, outcome: Outcome) -> None:
        with self.lock:
            self.by_token[token].append(outcome)
            self.order.append((token, outcome))

    def outcome(self, token: object) -> Outcome | None:
        with self.lock:
            got = self.by_token.get(token)
            return got[-1] if got else None

    def count(self, outcome: Outcome | None = None) -> int:
        with self.lock:
            return sum(1 for _, o in self.order if outcome is None or o is outcome)

    def wait(self, tokens: int, timeout: float = 30.0) -> None:
        wait_for(lambda: self.count() >= tokens, timeout, f"{tokens} outcomes")


StartPublisher = Callable[..., tuple[ConfirmingPublisher, Results]]


@pytest.fixture
def start_publisher() -> Iterator[StartPublisher]:
    """Start ConfirmingPublishers (``start_publisher(url, **options)``); all closed after."""
    started: list[ConfirmingPublisher] = []

    def start(url: str, **options: Any) -> tuple[ConfirmingPublisher, Results]:
        results = Results()
        publisher = ConfirmingPublisher(AmqpSettings(url=url), results, **options)
        publisher.start()
        started.append(publisher)
        return publisher, results

    yield start
    for publisher in started:
        publisher.close(timeout=5)


@pytest.fixture
def scratch(rabbitmq_url: str, unique: str) -> Iterator[tuple[Any, str]]:
    """A channel on the shared broker and a test-only topic exchange, deleted afterwards.

    Queues declared on the channel should be exclusive: they vanish with its connection.
    """
    exchange = f"iotpipe-test.{unique}"
    with blocking_channel(rabbitmq_url) as channel:
        channel.exchange_declare(exchange, "topic", auto_delete=False)
        try:
            yield channel, exchange
        finally:
            channel.exchange_delete(exchange)


def test_properties_encode_exactly_as_pika_does() -> None:
    """The fast property encoder produces pika's bytes for every kind of message iotpipe sends."""
    cases = [
        wire_properties(Topic("home", "pi-1", Kind.TELEMETRY), "m-1", received_at=1_764_000_000.9),
        wire_properties(Topic("home", "pi-1", Kind.STATUS), None, version="1.3", received_at=0),
        dead_letter_properties("bad JSON: ünïcödé ✓", topic="a/b/c", received_at=5),
        dead_letter_properties("x" * 5000, topic="t", received_at=5, message_id="id-1"),
        MessageProperties(),
        MessageProperties(headers={}, delivery_mode=1),
    ]
    for props in cases:
        assert encode_properties(props) == b"".join(_pika_properties(props).encode())


def test_properties_that_do_not_fit_amqp_are_refused() -> None:
    """A property that does not fit its AMQP field raises ValueError saying which and why."""
    with pytest.raises(ValueError, match="message_id is 256 bytes"):
        encode_properties(MessageProperties(message_id="x" * 256))
    with pytest.raises(ValueError, match="type"):
        encode_properties(MessageProperties(type="é" * 128))
    with pytest.raises(ValueError, match="out of range"):
        encode_properties(MessageProperties(timestamp=-1))
    publisher = ConfirmingPublisher(AmqpSettings(), Results())
    with pytest.raises(ValueError, match="routing key is 300 bytes"):
        publisher.publish("e", "k" * 300, b"", MessageProperties(), 1)
    assert publisher.pending == 0


def test_wire_properties_follow_the_contract() -> None:
    """Telemetry and status properties carry the type, headers and fields WIRE.md lists."""
    status = telemetry_properties(
        message_id=None,
        version="1.0",
        site="home",
        device="pi-1",
        topic="iotpipe/v1/home/pi-1/status",
        kind="status",
        received_at=12.7,
    )
    assert status == MessageProperties(
        message_id=None,
        content_type="application/json",
        type="iotpipe.status",
        delivery_mode=2,
        timestamp=12,
        app_id="iotpipe-bridge",
        headers={
            "x-iotpipe-version": "1.0",
            "x-iotpipe-site": "home",
            "x-iotpipe-device": "pi-1",
            "x-iotpipe-topic": "iotpipe/v1/home/pi-1/status",
        },
    )


def test_connection_parameters_come_from_the_settings() -> None:
    """Credentials, vhost and TLS options are taken from the URL and the TLS settings."""
    settings = AmqpSettings(
        url="amqps://bridge:p%40ss@rabbit.example:5671/iot%2Fprod",
        tls=TlsSettings(insecure=True),
    )
    params = connection_parameters(settings, timeout=3, heartbeat=15, name="test")
    assert (params.host, params.port, params.virtual_host) == ("rabbit.example", 5671, "iot/prod")
    assert (params.credentials.username, params.credentials.password) == ("bridge", "p@ss")
    assert params.heartbeat == 15
    assert params.ssl_options.server_hostname == "rabbit.example"
    assert params.ssl_options.context.verify_mode == ssl.CERT_NONE
    plain = connection_parameters(AmqpSettings(), timeout=3, heartbeat=None, name="test")
    assert plain.ssl_options is None
    assert plain.virtual_host == "/"


def test_vhost_comes_from_the_url_path() -> None:
    """An empty or ``/`` path means vhost ``/``; anything else is percent-decoded."""
    assert vhost_of("") == "/"
    assert vhost_of("/") == "/"
    assert vhost_of("/%2F") == "/"
    assert vhost_of("/prod") == "prod"
    assert vhost_of("/a%20b") == "a b"


@pytest.mark.rabbitmq
def test_publish_is_confirmed_and_arrives_byte_exact(
    scratch: tuple[Any, str], rabbitmq_url: str, start_publisher: StartPublisher
) -> None:
    """A published message is confirmed and consumed with exactly its body and contract properties."""
    channel, exchange = scratch
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange, "iotpipe.v1.#")
    channel.queue_bind(queue, exchange, "bridge.#")
    publisher, results = start_publisher(rabbitmq_url)
    topic = Topic("home", "pi-1", Kind.TELEMETRY)
    props = wire_properties(topic, "m-1", received_at=1_764_000_000.5)
    dead = encode_properties(  # pre-encoded properties (as a spool keeps them) work too
        dead_letter_properties("not JSON", topic="iotpipe/v1/home/pi-1/telemetry", received_at=7)
    )
    publisher.publish(exchange, topic.routing_key, BODY, props, "good")
    publisher.publish(exchange, "bridge.bad_json", b"\xff\x00 not json", dead, "dead")
    results.wait(2)
    assert results.by_token == {"good": [Outcome.CONFIRMED], "dead": [Outcome.CONFIRMED]}

    method, got, body = channel.basic_get(queue, auto_ack=True)
    assert method.routing_key == "iotpipe.v1.home.pi-1.telemetry"
    assert body == BODY
    assert (got.message_id, got.content_type, got.type) == (
        "m-1",
        "application/json",
        "iotpipe.telemetry",
    )
    assert (got.delivery_mode, got.timestamp, got.app_id) == (2, 1_764_000_000, "iotpipe-bridge")
    assert got.headers == {
        "x-iotpipe-version": "1.0",
        "x-iotpipe-site": "home",
        "x-iotpipe-device": "pi-1",
        "x-iotpipe-topic": "iotpipe/v1/home/pi-1/telemetry",
    }
    assert (got.correlation_id, got.reply_to, got.expiration, got.priority) == (None,) * 4

    method, got, body = channel.basic_get(queue, auto_ack=True)
    assert method.routing_key == "bridge.bad_json"
    assert body == b"\xff\x00 not json"
    assert got.headers == {
        "x-iotpipe-error": "not JSON",
        "x-iotpipe-topic": "iotpipe/v1/home/pi-1/telemetry",
    }
    assert (got.delivery_mode, got.timestamp, got.content_type) == (2, 7, None)


@pytest.mark.rabbitmq
def test_start_declares_the_contract_exchanges(
    rabbitmq_url: str, start_publisher: StartPublisher
) -> None:
    """After start() both contract exchanges exist, and declaring them again is harmless."""
    publisher, _ = start_publisher(rabbitmq_url)
    assert publisher.connected
    assert [name for name, _ in EXCHANGES] == [TELEMETRY_EXCHANGE, DEAD_EXCHANGE]
    with blocking_channel(rabbitmq_url) as channel:
        declare_topology(channel)
        for name, kind in EXCHANGES:
            channel.exchange_declare(name, kind, passive=True)


@pytest.mark.rabbitmq
def test_a_dead_letter_queue_keeps_what_goes_to_the_dead_exchange(
    rabbitmq_url: str, start_publisher: StartPublisher, unique: str
) -> None:
    """With dead_letter_queue set, a dead letter is routed (CONFIRMED, not RETURNED) and kept."""
    queue = f"iotpipe-test.{unique}.dead"
    publisher, results = start_publisher(rabbitmq_url, dead_letter_queue=queue)
    try:
        publisher.publish(DEAD_EXCHANGE, f"bridge.{unique}", BODY, MessageProperties(), "x")
        results.wait(1)
        assert results.by_token == {"x": [Outcome.CONFIRMED]}
        with blocking_channel(rabbitmq_url) as channel:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            assert method is not None
            assert (method.routing_key, body) == (f"bridge.{unique}", BODY)
    finally:
        with blocking_channel(rabbitmq_url) as channel:
            channel.queue_delete(queue)


@pytest.mark.rabbitmq
def test_twenty_thousand_messages_all_confirmed_within_the_window(
    scratch: tuple[Any, str], rabbitmq_url: str, start_publisher: StartPublisher
) -> None:
    """20,000 messages from two threads are each confirmed once and never exceed the window."""
    channel, exchange = scratch
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange, "load.#")
    publisher, results = start_publisher(rabbitmq_url, window=250)
    props = MessageProperties(content_type="application/json")

    def produce(first: int) -> None:
        for token in range(first, first + 10_000):
            publisher.publish(exchange, "load.x", b"%d" % token, props, token)

    threads = [threading.Thread(target=produce, args=(first,)) for first in (0, 10_000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert publisher.flush(timeout=120)
    assert results.count(Outcome.CONFIRMED) == 20_000
    assert set(results.by_token) == set(range(20_000))
    assert all(outcomes == [Outcome.CONFIRMED] for outcomes in results.by_token.values())
    assert publisher.peak_unconfirmed == 250  # filled, never exceeded
    assert publisher.pending == 0
    assert channel.queue_declare(queue, passive=True).method.message_count == 20_000


@pytest.mark.rabbitmq
def test_unroutable_message_is_returned_not_confirmed(
    scratch: tuple[Any, str], rabbitmq_url: str, start_publisher: StartPublisher
) -> None:
    """A message no binding matches is reported RETURNED, its routable neighbours CONFIRMED."""
    channel, exchange = scratch
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange, "bound")
    publisher, results = start_publisher(rabbitmq_url)
    props = MessageProperties()
    for token, key in (("a", "bound"), ("b", "nowhere"), ("c", "bound"), ("d", "nowhere")):
        publisher.publish(exchange, key, BODY, props, token)  # identical bodies on purpose
    results.wait(4)
    assert results.by_token == {
        "a": [Outcome.CONFIRMED],
        "b": [Outcome.RETURNED],
        "c": [Outcome.CONFIRMED],
        "d": [Outcome.RETURNED],
    }
    assert (publisher.confirmed, publisher.returned) == (2, 2)
    assert publisher.flush(timeout=10)


@pytest.mark.rabbitmq
def test_full_queue_with_reject_publish_nacks(
    scratch: tuple[Any, str], rabbitmq_url: str, start_publisher: StartPublisher
) -> None:
    """A queue at x-max-length with x-overflow reject-publish makes the broker nack the rest."""
    channel, exchange = scratch
    arguments = {"x-max-length": 1, "x-overflow": "reject-publish"}
    queue = channel.queue_declare("", exclusive=True, arguments=arguments).method.queue
    channel.queue_bind(queue, exchange, "full")
    publisher, results = start_publisher(rabbitmq_url)
    for token in range(3):
        publisher.publish(exchange, "full", b"%d" % token, MessageProperties(), token)
    results.wait(3)
    assert results.by_token == {
        0: [Outcome.CONFIRMED],
        1: [Outcome.NACKED],
        2: [Outcome.NACKED],
    }


@pytest.mark.rabbitmq
def test_channel_error_fails_in_flight_and_recovers(
    scratch: tuple[Any, str], rabbitmq_url: str, start_publisher: StartPublisher, unique: str
) -> None:
    """A publish to a missing exchange fails (the broker closes the channel); the next succeeds."""
    channel, exchange = scratch
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange, "ok")
    publisher, results = start_publisher(rabbitmq_url, backoff_base=0.05)
    publisher.publish(f"iotpipe-test.{unique}.missing", "x", b"lost", MessageProperties(), "bad")
    results.wait(1)
    assert results.by_token == {"bad": [Outcome.FAILED]}
    publisher.publish(exchange, "ok", b"fine", MessageProperties(), "good")
    results.wait(2)
    assert results.outcome("good") is Outcome.CONFIRMED
    assert publisher.reconnects == 1


@pytest.mark.rabbitmq
def test_close_waits_for_outstanding_confirms(scratch: tuple[Any, str], rabbitmq_url: str) -> None:
    """close() returns only after every queued message was confirmed, then refuses publishes."""
    channel, exchange = scratch
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange, "#")
    results = Results()
    publisher = ConfirmingPublisher(AmqpSettings(url=rabbitmq_url), results, window=100)
    publisher.start()
    for token in range(3000):
        publisher.publish(exchange, "k", b"x", MessageProperties(), token)
    assert publisher.close(timeout=60)
    assert results.count(Outcome.CONFIRMED) == 3000
    assert not publisher.connected
    assert not any(t.name == "iotpipe-amqp" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="closed"):
        publisher.publish(exchange, "k", b"x", MessageProperties(), "late")


def test_close_without_start_fails_what_was_queued() -> None:
    """Messages queued on a publisher that never started are reported FAILED by close()."""
    results = Results()
    publisher = ConfirmingPublisher(AmqpSettings(), results)
    publisher.publish("e", "k", b"x", MessageProperties(), 1)
    assert not publisher.close(timeout=1)
    assert results.by_token == {1: [Outcome.FAILED]}


@pytest.mark.rabbitmq
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("amqp://guest:guest@127.0.0.1:{port}/", "connection refused"),
        ("amqp://guest:s3cret-pw@127.0.0.1:5672/", "login refused"),
        ("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "vhost no-such-vhost not found"),
    ],
    ids=["unreachable", "wrong-password", "unknown-vhost"],
)
def test_connect_failure_is_one_clear_line(rabbitmq_url: str, url: str, reason: str) -> None:
    """start() raises ConnectError naming the broker and the reason, on one line, quickly."""
    url = url.format(port=free_port())
    publisher = ConfirmingPublisher(AmqpSettings(url=url), Results(), connect_timeout=5)
    began = time.monotonic()
    with pytest.raises(ConnectError) as caught:
        publisher.start()
    message = str(caught.value)
    assert reason in message
    assert message.startswith("cannot connect to amqp://guest@127.0.0.1:")
    assert "s3cret-pw" not in message  # the password never shows
    assert "\n" not in message
    assert time.monotonic() - began < 5
    assert not any(t.name == "iotpipe-amqp" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(RuntimeError):
        publisher.publish("e", "k", b"x", MessageProperties(), 1)


def test_silent_server_is_a_connect_error_within_the_timeout() -> None:
    """A server that accepts TCP but never speaks AMQP fails start() after its timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # never accepted: the kernel completes the handshake, nobody answers
        port = server.getsockname()[1]
        publisher = ConfirmingPublisher(
            AmqpSettings(url=f"amqp://127.0.0.1:{port}/"), Results(), connect_timeout=30
        )
        began = time.monotonic()
        with pytest.raises(ConnectError, match="not ready within 1 s"):
            publisher.start(timeout=1)
        assert time.monotonic() - began < 5
    assert not any(t.name == "iotpipe-amqp" and t.is_alive() for t in threading.enumerate())


@pytest.mark.rabbitmq
def test_conflicting_topology_is_a_connect_error(
    scratch: tuple[Any, str], rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exchange that exists with another type makes start() fail with the broker's reason."""
    _channel, exchange = scratch  # a topic exchange; the publisher will want it as fanout
    monkeypatch.setattr("iotpipe.amqp.EXCHANGES", ((exchange, "fanout"),))
    publisher = ConfirmingPublisher(AmqpSettings(url=rabbitmq_url), Results(), connect_timeout=5)
    with pytest.raises(ConnectError, match="406 PRECONDITION_FAILED - inequivalent arg 'type'"):
        publisher.start()


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_killed_node_every_message_gets_one_outcome_and_publishing_resumes(
    private_rabbit: PrivateRabbit, start_publisher: StartPublisher
) -> None:
    """SIGKILLing the node mid-stream fails only unconfirmed messages; every confirmed one survives."""
    publisher, results = start_publisher(private_rabbit.url, backoff_base=0.2, backoff_max=1.0)
    with blocking_channel(private_rabbit.url) as channel:
        declare_topology(channel)
        channel.queue_declare("iotpipe-test.kill", durable=True)
        channel.queue_bind("iotpipe-test.kill", TELEMETRY_EXCHANGE, "iotpipe.v1.#")
    topic = Topic("site", "dev", Kind.TELEMETRY)
    stop = threading.Event()
    produced = 0

    def produce() -> None:
        nonlocal produced
        while not stop.is_set():
            if publisher.pending > 5000:  # keep a backlog, not an unbounded one
                stop.wait(0.005)
                continue
            props = wire_properties(topic, f"m-{produced}", received_at=time.time())
            publisher.publish(
                TELEMETRY_EXCHANGE, topic.routing_key, b"%d" % produced, props, produced
            )
            produced += 1

    producer = threading.Thread(target=produce, name="test-producer")
    producer.start()
    try:
        wait_for(lambda: results.count(Outcome.CONFIRMED) >= 5000, 60, "5000 confirms")
        private_rabbit.kill()
        wait_for(lambda: not publisher.connected, 10, "the publisher to notice the loss")
        confirmed_before = results.count(Outcome.CONFIRMED)
        private_rabbit.start()
        wait_for(
            lambda: results.count(Outcome.CONFIRMED) >= confirmed_before + 5000,
            60,
            "5000 more confirms after the restart",
        )
    finally:
        stop.set()
        producer.join()
    assert publisher.flush(timeout=60)
    assert publisher.reconnects == 1

    assert set(results.by_token) == set(range(produced))
    assert all(len(outcomes) == 1 for outcomes in results.by_token.values())
    confirmed = {t for t, o in results.by_token.items() if o == [Outcome.CONFIRMED]}
    failed = {t for t, o in results.by_token.items() if o == [Outcome.FAILED]}
    assert len(confirmed) + len(failed) == produced
    assert len(failed) <= publisher.window  # only what was unconfirmed at the kill

    stored: set[int] = set()
    with blocking_channel(private_rabbit.url) as channel:
        while True:
            method, _props, body = channel.basic_get("iotpipe-test.kill", auto_ack=True)
            if method is None:
                break
            stored.add(int(body))
    assert confirmed <= stored  # a confirm means it survived the SIGKILL


@pytest.mark.rabbitmq
@pytest.mark.parametrize("batching", [True, False], ids=["batched", "fallback"])
def test_queued_publishes_go_out_in_one_write_in_order(
    scratch: tuple[Any, str],
    rabbitmq_url: str,
    start_publisher: StartPublisher,
    monkeypatch: pytest.MonkeyPatch,
    batching: bool,
) -> None:
    """Messages queued together leave in one transport write (or, without pika's hook, one write
    per frame as pika does it), and arrive complete and in order either way."""
    monkeypatch.setattr(amqp, "_CAN_BATCH", batching)
    writes: list[int] = []
    output = pika.connection.Connection._output_marshaled_frames

    def spy(self: Any, frames: list[bytes]) -> None:
        writes.append(len(frames))
        output(self, frames)

    monkeypatch.setattr(pika.connection.Connection, "_output_marshaled_frames", spy)
    channel, exchange = scratch
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange, "batch.#")
    publisher, results = start_publisher(rabbitmq_url, window=1000)
    gate = threading.Event()
    publisher._ioloop.add_callback_threadsafe(lambda: gate.wait(10))  # the loop waits here...
    props = MessageProperties(content_type="application/json")
    for token in range(300):  # ...while all of them are queued
        publisher.publish(exchange, f"batch.{token % 7}", b"%d" % token, props, token)
    writes.clear()
    gate.set()
    results.wait(300)
    assert results.count(Outcome.CONFIRMED) == 300
    assert writes == ([1] if batching else [3] * 300)  # frames: method, header, body per message
    bodies = []
    for _ in range(300):
        _method, _props, body = channel.basic_get(queue, auto_ack=True)
        bodies.append(int(body))
    assert bodies == list(range(300))


@pytest.mark.rabbitmq
def test_a_dead_first_node_is_skipped_for_the_next(
    scratch: tuple[Any, str], rabbitmq_url: str
) -> None:
    """With url on a closed port and the broker in urls, the publisher connects to the second."""
    channel, exchange = scratch
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange, "#")
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    results = Results()
    publisher = ConfirmingPublisher(
        AmqpSettings(url=dead, urls=(rabbitmq_url,)), results, connect_timeout=5
    )
    publisher.start()
    try:
        assert publisher.url == AmqpSettings(url=rabbitmq_url).broker
        publisher.publish(exchange, "k", BODY, MessageProperties(), "m")
        results.wait(1)
        assert results.by_token == {"m": [Outcome.CONFIRMED]}
    finally:
        publisher.close(timeout=5)


def test_start_fails_only_when_every_node_refuses() -> None:
    """Two closed ports: start() raises one ConnectError naming the last node tried."""
    first, second = (f"amqp://127.0.0.1:{free_port()}/" for _ in range(2))
    publisher = ConfirmingPublisher(
        AmqpSettings(url=first, urls=(second,)), Results(), connect_timeout=5
    )
    with pytest.raises(ConnectError) as caught:
        publisher.start()
    assert caught.value.target == AmqpSettings(url=second).broker.redacted()


@pytest.mark.rabbitmq
def test_a_cluster_name_with_several_addresses_is_tried_address_by_address(
    rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host name resolving to a dead address then a live one connects to the live one."""
    live = AmqpSettings(url=rabbitmq_url).broker
    dead_port = free_port()
    resolve = socket.getaddrinfo

    def cluster_dns(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host != "rabbit-cluster.invalid":
            return resolve(host, port, *args, **kwargs)
        record = resolve(live.host, live.port, *args, **kwargs)[0]
        return [(*record[:4], (live.host, dead_port)), record]  # dead node first

    monkeypatch.setattr(socket, "getaddrinfo", cluster_dns)
    url = rabbitmq_url.replace(f"{live.host}:{live.port}", "rabbit-cluster.invalid:5672")
    publisher = ConfirmingPublisher(AmqpSettings(url=url), Results(), connect_timeout=5)
    publisher.start()
    try:
        assert publisher.connected
    finally:
        publisher.close(timeout=5)
