"""The bridge against real brokers: routing, properties, dead letters, ordered acks, spool, ops."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.service import Bridge, route
from bridge.settings import BridgeSettings
from iotpipe.amqp import DEAD_EXCHANGE, TELEMETRY_EXCHANGE
from iotpipe.mqtt import Message, MqttClient
from iotpipe.settings import AmqpSettings, MqttSettings, load
from tests.conftest import IOTPIPE, BrokerInfo, free_port, wait_for
from tests.rabbitmq import blocking_channel

pytestmark = [pytest.mark.mqtt, pytest.mark.rabbitmq]


def envelope(site: str, device: str, seq: int, /, **extra: Any) -> bytes:
    body = {
        "v": "1.0",
        "id": f"{site}-{device}-{seq}",
        "site": site,
        "device": device,
        "seq": seq,
        "ts": "2026-11-26T08:15:02.125Z",
        "readings": [{"sensor": "temperature", "value": 21.5, "unit": "Cel"}],
        **extra,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def test_route_valid_telemetry_keeps_body_and_sets_wire_properties() -> None:
    """A valid envelope goes to iotpipe.telemetry with the WIRE.md properties, body unchanged."""
    body = envelope("s1", "d1", 7, extra_field={"future": True})
    routed = route(Message("iotpipe/v1/s1/d1/telemetry", body), received_at=1795600000.9)
    assert routed.exchange == TELEMETRY_EXCHANGE
    assert routed.routing_key == "iotpipe.v1.s1.d1.telemetry"
    assert routed.body is body
    props = routed.properties
    assert (props.message_id, props.type, props.delivery_mode) == (
        "s1-d1-7",
        "iotpipe.telemetry",
        2,
    )
    assert (props.content_type, props.app_id, props.timestamp) == (
        "application/json",
        "iotpipe-bridge",
        1795600000,
    )
    assert props.headers == {
        "x-iotpipe-version": "1.0",
        "x-iotpipe-site": "s1",
        "x-iotpipe-device": "d1",
        "x-iotpipe-topic": "iotpipe/v1/s1/d1/telemetry",
    }


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("iotpipe/v1/s1/d1/telemetry", b"{not json", "bad_json"),
        ("iotpipe/v1/s1/d1/telemetry", envelope("s1", "d1", 1, seq=-1), "schema"),
        ("iotpipe/v1/s1/d1/telemetry", envelope("s1", "other", 1), "topic_mismatch"),
        ("iotpipe/v1/s1/d1/telemetry", envelope("s1", "d1", 1, v="2.0"), "unsupported_version"),
        ("iotpipe/v1/s1/d1/telemetry", b"x" * (256 * 1024 + 1), "too_large"),
        ("iotpipe/v1/s1/d1/telemetry", b"\xff\xfe", "bad_encoding"),
        ("iotpipe/v1/s.1/d1/telemetry", envelope("s1", "d1", 1), "bad_topic"),
    ],
)
def test_route_rejections_go_to_dead_with_reason(topic: str, payload: bytes, reason: str) -> None:
    """Every WIRE.md violation is routed to iotpipe.dead as bridge.<reason>, with the error."""
    routed = route(Message(topic, payload), received_at=0.0)
    assert (routed.exchange, routed.routing_key) == (DEAD_EXCHANGE, f"bridge.{reason}")
    assert routed.body is payload
    assert routed.properties.headers is not None
    assert routed.properties.headers["x-iotpipe-topic"] == topic
    assert routed.properties.headers["x-iotpipe-error"].startswith(reason)


@dataclass
class RunningBridge:
    """A bridge on its own thread, with the queues a test reads from."""

    bridge: Bridge
    thread: threading.Thread
    amqp_url: str
    queue: str
    dead_queue: str
    site: str

    def http(self, path: str) -> tuple[int, bytes]:
        assert self.bridge._http is not None
        url = f"http://127.0.0.1:{self.bridge._http.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def drain(self, queue: str, expected: int, timeout: float = 30.0) -> list[tuple[Any, bytes]]:
        """Consume ``expected`` messages from ``queue`` (fails the test after ``timeout``)."""
        got: list[tuple[Any, bytes]] = []
        with blocking_channel(self.amqp_url) as channel:

            def enough() -> bool:
                while len(got) < expected:
                    method, props, body = channel.basic_get(queue, auto_ack=True)
                    if method is None:
                        return False
                    got.append((props, body))
                return True

            wait_for(enough, timeout, f"{expected} messages on {queue}")
        return got


@pytest.fixture
def running_bridge(
    mosquitto_broker: BrokerInfo, rabbitmq_url: str, tmp_path: Path, unique: str
) -> Iterator[RunningBridge]:
    """A bridge between a private Mosquitto and RabbitMQ, forwarding one unique site."""
    with _running_bridge(mosquitto_broker, rabbitmq_url, tmp_path, unique) as running:
        yield running


@pytest.fixture
def isolated_bridge(
    mosquitto_broker: BrokerInfo, isolated_rabbitmq_url: str, tmp_path: Path, unique: str
) -> Iterator[RunningBridge]:
    """The same, on a private RabbitMQ node where nothing else is bound."""
    with _running_bridge(mosquitto_broker, isolated_rabbitmq_url, tmp_path, unique) as running:
        yield running


@contextlib.contextmanager
def _running_bridge(
    mosquitto_broker: BrokerInfo, rabbitmq_url: str, tmp_path: Path, unique: str, **fields: Any
) -> Iterator[RunningBridge]:
    site = f"s{unique}"
    queue, dead_queue = f"test.{unique}.telemetry", f"test.{unique}.dead"
    with blocking_channel(rabbitmq_url) as channel:
        for exchange in (TELEMETRY_EXCHANGE, DEAD_EXCHANGE):
            channel.exchange_declare(exchange, "topic", durable=True)
        channel.queue_declare(queue, auto_delete=False, arguments={"x-expires": 600_000})
        channel.queue_bind(queue, TELEMETRY_EXCHANGE, f"iotpipe.v1.{site}.#")
        channel.queue_declare(dead_queue, auto_delete=False, arguments={"x-expires": 600_000})
        channel.queue_bind(dead_queue, DEAD_EXCHANGE, "bridge.#")
    settings = BridgeSettings(
        topics=(f"iotpipe/v1/{site}/+/telemetry", f"iotpipe/v1/{site}/+/status"),
        client_id=f"bridge-{unique}",
        spool_path=tmp_path / "spool.db",
        http_port=0,
        **fields,
    )
    bridge = Bridge.from_settings(
        MqttSettings(url=mosquitto_broker.url), AmqpSettings(url=rabbitmq_url), settings
    )
    thread = threading.Thread(target=bridge.run, name="test-bridge")
    thread.start()
    wait_for(lambda: bridge.mqtt.connected and bridge.publisher.connected, 20, "bridge connected")
    try:
        yield RunningBridge(bridge, thread, rabbitmq_url, queue, dead_queue, site)
    finally:
        bridge.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "bridge did not stop"
        with blocking_channel(rabbitmq_url) as channel:
            channel.queue_delete(queue)
            channel.queue_delete(dead_queue)


def bind_site_queue(url: str, queue: str, site: str) -> str:
    """Declare ``queue`` (expiring when unused) bound to one site's telemetry; return its name."""
    with blocking_channel(url) as channel:
        channel.exchange_declare(TELEMETRY_EXCHANGE, "topic", durable=True)
        channel.queue_declare(queue, arguments={"x-expires": 600_000})
        channel.queue_bind(queue, TELEMETRY_EXCHANGE, f"iotpipe.v1.{site}.#")
    return queue


def publisher(url: str, unique: str) -> MqttClient:
    client = MqttClient(MqttSettings(url=url), client_id=f"pub-{unique}")
    client.connect()
    return client


def test_valid_and_poison_messages_each_reach_their_exchange(
    running_bridge: RunningBridge, mosquitto_broker: BrokerInfo, unique: str
) -> None:
    """Good messages arrive byte-exact with their id; poison ones land in iotpipe.dead by reason."""
    site = running_bridge.site
    pub = publisher(mosquitto_broker.url, unique)
    good = [envelope(site, "d1", seq) for seq in range(50)]
    poison = {
        "bad_json": b"{not json",
        "schema": envelope(site, "d1", 99, readings=[]),
        "topic_mismatch": envelope(site, "intruder", 1),
        "unsupported_version": envelope(site, "d1", 98, v="2.0"),
    }
    for body in good[:25]:
        pub.publish(f"iotpipe/v1/{site}/d1/telemetry", body)
    for body in poison.values():
        pub.publish(f"iotpipe/v1/{site}/d1/telemetry", body)
    for body in good[25:]:
        pub.publish(f"iotpipe/v1/{site}/d1/telemetry", body)
    assert pub.flush(timeout=20)

    arrived = running_bridge.drain(running_bridge.queue, len(good))
    assert [body for _, body in arrived] == good  # one publisher, one topic: order kept
    assert [props.message_id for props, _ in arrived] == [f"{site}-d1-{i}" for i in range(50)]
    dead = running_bridge.drain(running_bridge.dead_queue, len(poison))
    mine = [
        (p, b) for p, b in dead if p.headers["x-iotpipe-topic"].startswith(f"iotpipe/v1/{site}/")
    ]
    reasons = {p.headers["x-iotpipe-error"].split(":", 1)[0]: b for p, b in mine}
    assert reasons == poison
    pub.disconnect()


def test_status_messages_are_forwarded_and_retained_clears_are_not(
    running_bridge: RunningBridge, mosquitto_broker: BrokerInfo, unique: str
) -> None:
    """A status message arrives typed iotpipe.status; clearing a retained status is not forwarded."""
    site = running_bridge.site
    pub = publisher(mosquitto_broker.url, unique)
    status = {"v": "1.0", "site": site, "device": "d1", "state": "online", "ts": 1, "agent": "t/1"}
    pub.publish(f"iotpipe/v1/{site}/d1/status", json.dumps(status).encode(), retain=True)
    pub.publish(f"iotpipe/v1/{site}/d1/status", b"", retain=True)
    pub.publish(f"iotpipe/v1/{site}/d1/telemetry", envelope(site, "d1", 0))
    assert pub.flush(timeout=20)
    arrived = running_bridge.drain(running_bridge.queue, 2)
    assert [props.type for props, _ in arrived] == ["iotpipe.status", "iotpipe.telemetry"]
    assert arrived[0][0].message_id is None
    metrics = running_bridge.http("/metrics")[1].decode()
    assert 'iotpipe_bridge_received_total{kind="status"} 1.0' in metrics
    pub.disconnect()


def test_metrics_and_health_report_traffic_and_connectivity(
    running_bridge: RunningBridge, mosquitto_broker: BrokerInfo, unique: str
) -> None:
    """/metrics counts forwarded and dead-lettered messages; /healthz says both sides are up."""
    site = running_bridge.site
    pub = publisher(mosquitto_broker.url, unique)
    for seq in range(10):
        pub.publish(f"iotpipe/v1/{site}/d1/telemetry", envelope(site, "d1", seq))
    pub.publish(f"iotpipe/v1/{site}/d1/telemetry", b"[]")
    assert pub.flush(timeout=20)
    running_bridge.drain(running_bridge.queue, 10)

    def counted() -> bool:
        text = running_bridge.http("/metrics")[1].decode()
        return (
            "iotpipe_bridge_forwarded_total 10.0" in text
            and 'iotpipe_bridge_dead_lettered_total{reason="schema"} 1.0' in text
        )

    wait_for(counted, 10, "metrics to count the traffic")
    status, body = running_bridge.http("/healthz")
    health = json.loads(body)
    assert status == 200
    assert (health["healthy"], health["mqtt"], health["amqp"]) == (True, "up", "up")
    assert health["spool"]["depth"] == 0
    pub.disconnect()


def test_unroutable_messages_are_spooled_not_lost(
    isolated_bridge: RunningBridge, mosquitto_broker: BrokerInfo, unique: str
) -> None:
    """With no queue bound for a device, its messages wait in the spool until one is bound."""
    running_bridge = isolated_bridge
    rabbitmq_url = isolated_bridge.amqp_url
    site = running_bridge.site
    with blocking_channel(rabbitmq_url) as channel:
        channel.queue_unbind(running_bridge.queue, TELEMETRY_EXCHANGE, f"iotpipe.v1.{site}.#")
    pub = publisher(mosquitto_broker.url, unique)
    bodies = [envelope(site, "d1", seq) for seq in range(5)]
    for body in bodies:
        pub.publish(f"iotpipe/v1/{site}/d1/telemetry", body)
    assert pub.flush(timeout=20)  # acknowledged: committed to the spool
    wait_for(lambda: running_bridge.bridge.spool.depth == 5, 20, "5 messages in the spool")

    with blocking_channel(rabbitmq_url) as channel:
        channel.queue_bind(running_bridge.queue, TELEMETRY_EXCHANGE, f"iotpipe.v1.{site}.#")
    arrived = running_bridge.drain(running_bridge.queue, 5, timeout=60)
    assert sorted(body for _, body in arrived) == sorted(bodies)
    wait_for(lambda: running_bridge.bridge.spool.depth == 0, 20, "an empty spool")
    pub.disconnect()


def test_cli_bridge_forwards_and_exits_cleanly_on_sigterm(
    mosquitto_broker: BrokerInfo, rabbitmq_url: str, tmp_path: Path, unique: str
) -> None:
    """`iotpipe bridge` forwards what arrives, and SIGTERM makes it finish and exit 0."""
    site = f"s{unique}"
    queue = bind_site_queue(rabbitmq_url, f"test.{unique}.cli", site)
    http_port = free_port()
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'[bridge]\ntopics = ["iotpipe/v1/{site}/+/telemetry"]\nclient_id = "cli-{unique}"\n'
        f'spool_path = "{tmp_path / "spool.db"}"\nhttp_port = {http_port}\n'
    )
    proc = subprocess.Popen(
        [
            *IOTPIPE,
            "bridge",
            "-c",
            str(config),
            "--mqtt",
            mosquitto_broker.url,
            "--amqp",
            rabbitmq_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1):
                    return True
            except OSError:
                return False

        wait_for(healthy, 30, "the bridge's /healthz")  # subscribed before it serves HTTP
        pub = publisher(mosquitto_broker.url, unique)
        pub.publish(f"iotpipe/v1/{site}/d1/telemetry", envelope(site, "d1", 0))
        assert pub.flush(timeout=20)

        def arrived() -> bool:
            with blocking_channel(rabbitmq_url) as channel:
                return bool(channel.queue_declare(queue, passive=True).method.message_count)

        wait_for(arrived, 30, "the forwarded message")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
        pub.disconnect()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with blocking_channel(rabbitmq_url) as channel:
            channel.queue_delete(queue)


def test_cli_bridge_rejects_bad_settings_in_one_line(tmp_path: Path) -> None:
    """A bad AMQP URL stops `iotpipe bridge` at start-up with one line naming the field."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from iotpipe.cli import main; main()",
            "bridge",
            "--amqp",
            "http://nope",
            "--spool",
            str(tmp_path / "s.db"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "iotpipe: error: invalid setting amqp.url='http://nope': "
        "scheme must be amqp or amqps; expected amqp://[user:pass@]host[:port] or "
        "amqps://[user:pass@]host[:port]"
    ]


def test_sample_config_loads_as_the_defaults_and_lists_every_option(tmp_path: Path) -> None:
    """configs/bridge.toml loads as the defaults, and uncommenting its options changes none."""
    sample = Path(__file__).resolve().parents[2] / "configs" / "bridge.toml"
    assert load(BridgeSettings, "bridge", config_file=sample, environ={}) == BridgeSettings()
    assert load(MqttSettings, "mqtt", config_file=sample, environ={}) == MqttSettings()
    assert load(AmqpSettings, "amqp", config_file=sample, environ={}) == AmqpSettings()
    uncommented = tmp_path / "bridge.toml"
    # [bridge.limits] and [[bridge.ingest]], the last tables, are examples, not defaults
    # (test_limits_units, test_ingest).
    text = sample.read_text().split("\n# [bridge.limits]")[0]
    uncommented.write_text(
        "\n".join(
            line.removeprefix("# ") if line.startswith("# ") and " = " in line else line
            for line in text.splitlines()
            if not line.startswith(("# [", "# ca_file", "# cert_file", "# key_file", "# insecure"))
        )
    )
    data = tomllib.loads(uncommented.read_text())
    options = {*data["bridge"], "limits", "ingest"}
    assert options == set(BridgeSettings.model_fields), "every option is in the sample"
    assert load(BridgeSettings, "bridge", config_file=uncommented, environ={}) == BridgeSettings()


def test_two_bridges_split_a_shared_subscription(
    mosquitto_broker: BrokerInfo, rabbitmq_url: str, tmp_path: Path, unique: str
) -> None:
    """Two bridges in one shared-subscription group split the traffic; every id arrives once."""
    site = f"s{unique}"
    queue = bind_site_queue(rabbitmq_url, f"test.{unique}.shared", site)
    bridges: list[tuple[Bridge, threading.Thread]] = []
    try:
        for n in range(2):
            settings = BridgeSettings(
                topics=(f"iotpipe/v1/{site}/+/telemetry",),
                client_id=f"bridge-{unique}-{n}",
                shared_group=f"g{unique}",
                spool_path=tmp_path / f"spool-{n}.db",
                http_port=0,
            )
            bridge = Bridge.from_settings(
                MqttSettings(url=mosquitto_broker.url), AmqpSettings(url=rabbitmq_url), settings
            )
            thread = threading.Thread(target=bridge.run, name=f"test-bridge-{n}")
            thread.start()
            bridges.append((bridge, thread))
        wait_for(
            lambda: all(b.mqtt.connected and b.publisher.connected for b, _ in bridges),
            20,
            "both bridges connected",
        )
        pub = publisher(mosquitto_broker.url, unique)
        for seq in range(1000):
            pub.publish(
                f"iotpipe/v1/{site}/d{seq % 10}/telemetry", envelope(site, f"d{seq % 10}", seq)
            )
        assert pub.flush(timeout=30)
        got = RunningBridge(bridges[0][0], bridges[0][1], rabbitmq_url, queue, "", site).drain(
            queue, 1000
        )
        ids = [props.message_id for props, _ in got]
        assert len(set(ids)) == 1000
        forwarded = [b.metrics.forwarded._value.get() for b, _ in bridges]
        assert all(count > 0 for count in forwarded), forwarded
        assert sum(forwarded) == 1000
        pub.disconnect()
    finally:
        for bridge, thread in bridges:
            bridge.stop()
            thread.join(timeout=30)
        with blocking_channel(rabbitmq_url) as channel:
            channel.queue_delete(queue)
