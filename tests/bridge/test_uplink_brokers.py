"""The packed uplink against real brokers: Mosquitto -> bridge (packed) -> RabbitMQ -> unpack.

What consumers of ``iotpipe.telemetry`` receive must not change: the same messages, once each,
with the same bodies and properties as the bridge publishes in messages mode.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from bridge.service import Bridge
from bridge.settings import BridgeSettings, UnpackSettings
from bridge.unpack import Unpacker
from bridge.uplink import PackingPublisher, pack_properties, uplink_queue
from iotpipe.amqp import (
    DEAD_EXCHANGE,
    HEADER_ERROR,
    TELEMETRY_EXCHANGE,
    UPLINK_EXCHANGE,
    encode_telemetry_properties,
)
from iotpipe.mqtt import MqttClient
from iotpipe.pack import PackedMessage, PackEncoder, PackError, decode
from iotpipe.settings import AmqpSettings, MqttSettings, load
from tests.conftest import IOTPIPE, BrokerInfo, wait_for
from tests.rabbitmq import blocking_channel

pytestmark = [pytest.mark.mqtt, pytest.mark.rabbitmq]

DEVICES = ("d1", "d2", "d3")


def envelope(site: str, device: str, seq: int) -> bytes:
    body = {
        "v": "1.0",
        "id": f"{site}-{device}-{seq}",
        "site": site,
        "device": device,
        "seq": seq,
        "ts": "2026-11-26T08:15:02.125Z",
        "readings": [{"sensor": "temperature", "value": 21.5 + seq / 10, "unit": "Cel"}],
    }
    return json.dumps(body, separators=(",", ":")).encode()


class Queues:
    """Test queues on the telemetry and dead exchanges for one site, and the uplink queue."""

    def __init__(self, url: str, unique: str) -> None:
        self.url = url
        self.site = f"s{unique}"
        self.telemetry = f"test.{unique}.telemetry"
        self.dead = f"test.{unique}.dead"
        self.uplink = f"test.{unique}.uplink"
        with blocking_channel(url) as channel:
            for exchange in (TELEMETRY_EXCHANGE, DEAD_EXCHANGE):
                channel.exchange_declare(exchange, "topic", durable=True)
            for queue in (self.telemetry, self.dead):
                channel.queue_declare(queue, arguments={"x-expires": 600_000})
            channel.queue_bind(self.telemetry, TELEMETRY_EXCHANGE, f"iotpipe.v1.{self.site}.#")
            channel.queue_bind(self.dead, DEAD_EXCHANGE, "bridge.#")
            channel.queue_bind(self.dead, DEAD_EXCHANGE, "unpack.#")

    def depth(self, queue: str) -> int:
        with blocking_channel(self.url) as channel:
            return int(channel.queue_declare(queue, passive=True).method.message_count)

    def drain(self, queue: str, expected: int, timeout: float = 30.0) -> list[tuple[Any, bytes]]:
        """Consume at least ``expected`` messages (then whatever else is there right now)."""
        got: list[tuple[Any, bytes]] = []
        with blocking_channel(self.url) as channel:

            def enough() -> bool:
                while True:
                    method, props, body = channel.basic_get(queue, auto_ack=True)
                    if method is None:
                        return len(got) >= expected
                    got.append((props, body))

            wait_for(enough, timeout, f"{expected} messages on {queue}")
        return got

    def delete(self) -> None:
        with blocking_channel(self.url) as channel:
            for queue in (self.telemetry, self.dead, self.uplink):
                channel.queue_delete(queue)


@pytest.fixture
def queues(rabbitmq_url: str, unique: str) -> Iterator[Queues]:
    made = Queues(rabbitmq_url, unique)
    try:
        yield made
    finally:
        made.delete()


@contextlib.contextmanager
def running(service: Bridge | Unpacker, name: str) -> Iterator[None]:
    """Run ``service`` on a thread until the block ends; ready (subscribed) when it begins."""
    ready = threading.Event()
    if isinstance(service, Bridge):
        subscribe = service.mqtt.subscribe

        def subscribed(*args: Any, **kwargs: Any) -> list[int]:
            granted = subscribe(*args, **kwargs)
            ready.set()
            return granted

        service.mqtt.subscribe = subscribed  # type: ignore[method-assign]
        connected = lambda: ready.is_set() and service.publisher.connected  # noqa: E731
    else:
        connected = lambda: service.source.connected and service.publisher.connected  # noqa: E731
    thread = threading.Thread(target=service.run, name=name)
    thread.start()
    try:
        wait_for(connected, 20, f"{name} connected")
        yield
    finally:
        service.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), f"{name} did not stop"


def bridge(mqtt_url: str, queues: Queues, tmp_path: Path, name: str, **fields: Any) -> Bridge:
    site = queues.site
    settings = BridgeSettings(
        topics=(f"iotpipe/v1/{site}/+/telemetry", f"iotpipe/v1/{site}/+/status"),
        client_id=f"bridge-{name}-{site}",
        spool_path=tmp_path / f"spool-{name}.db",
        http_port=0,
        receipts=False,
        **fields,
    )
    return Bridge.from_settings(
        MqttSettings(url=mqtt_url), AmqpSettings(url=queues.url), settings, serve_http=False
    )


def unpacker(queues: Queues, tmp_path: Path, **fields: Any) -> Unpacker:
    settings = UnpackSettings(
        queue=queues.uplink, seen_path=tmp_path / "packs.db", http_port=0, **fields
    )
    return Unpacker.from_settings(AmqpSettings(url=queues.url), settings)


def publish_traffic(mqtt_url: str, site: str, name: str, count: int) -> list[bytes]:
    """``count`` envelopes from each of DEVICES, interleaved, plus two poison messages."""
    client = MqttClient(MqttSettings(url=mqtt_url), client_id=f"pub-{name}-{site}")
    client.connect()
    sent = []
    for seq in range(count):
        for device in DEVICES:
            body = envelope(site, device, seq)
            client.publish(f"iotpipe/v1/{site}/{device}/telemetry", body, qos=1)
            sent.append(body)
    client.publish(f"iotpipe/v1/{site}/d1/telemetry", b"{not json", qos=1)
    client.publish(f"iotpipe/v1/{site}/d2/telemetry", envelope(site, "other", 1), qos=1)
    assert client.flush(timeout=20)
    client.disconnect()
    return sent


def _without_timestamp(props: Any) -> tuple[Any, ...]:
    """Every basic property as RabbitMQ delivered it, but the receive timestamp."""
    names = sorted(pika.spec.BasicProperties().__dict__)
    return tuple((name, getattr(props, name)) for name in names if name != "timestamp")


def _mine(dead: list[tuple[Any, bytes]], site: str) -> list[tuple[Any, bytes]]:
    topic = f"iotpipe/v1/{site}/"
    return [(p, b) for p, b in dead if str(p.headers.get("x-iotpipe-topic")).startswith(topic)]


def test_packed_uplink_delivers_what_messages_mode_delivers(
    mosquitto_broker: BrokerInfo, queues: Queues, tmp_path: Path
) -> None:
    """Same bodies, same properties (but the receive time), once each, dead letters included."""
    n = 40
    with running(bridge(mosquitto_broker.url, queues, tmp_path, "messages"), "bridge-messages"):
        sent = publish_traffic(mosquitto_broker.url, queues.site, "messages", n)
        plain = queues.drain(queues.telemetry, len(sent))
        plain_dead = _mine(queues.drain(queues.dead, 2), queues.site)

    packed_bridge = bridge(
        mosquitto_broker.url,
        queues,
        tmp_path,
        "packed",
        uplink="packed",
        uplink_queue=queues.uplink,
        pack_max_messages=25,
    )
    unpack = unpacker(queues, tmp_path)
    with running(unpack, "unpack"), running(packed_bridge, "bridge-packed"):
        assert publish_traffic(mosquitto_broker.url, queues.site, "packed", n) == sent
        packed = queues.drain(queues.telemetry, len(sent))
        packed_dead = _mine(queues.drain(queues.dead, 2), queues.site)
        wait_for(lambda: queues.depth(queues.uplink) == 0, 10, "uplink queue empty")
        assert isinstance(packed_bridge.publisher, PackingPublisher)
        assert packed_bridge.publisher.packs_sent < len(sent) / 10
        registry = packed_bridge.metrics.registry
        assert registry.get_sample_value("iotpipe_bridge_uplink_packs") == (
            packed_bridge.publisher.packs_sent
        )
        sent_bytes = registry.get_sample_value("iotpipe_bridge_uplink_bytes_out")
        assert sent_bytes is not None
        assert 0 < sent_bytes < registry.get_sample_value("iotpipe_bridge_uplink_bytes_in")  # type: ignore[operator]
    assert queues.depth(queues.telemetry) == 0  # nothing more came: exactly once

    assert [b for _, b in packed] == [b for _, b in plain] == sent  # one publisher: order kept
    assert [_without_timestamp(p) for p, _ in packed] == [_without_timestamp(p) for p, _ in plain]
    assert all(p.timestamp is not None for p, _ in packed)
    assert [(_without_timestamp(p), b) for p, b in packed_dead] == [
        (_without_timestamp(p), b) for p, b in plain_dead
    ]
    assert len(packed_dead) == 2


def _pack(site: str, seqs: range, device: str = "d1") -> bytes:
    messages = [
        PackedMessage(
            TELEMETRY_EXCHANGE,
            f"iotpipe.v1.{site}.{device}.telemetry",
            encode_telemetry_properties(
                message_id=f"{site}-{device}-{seq}",
                version="1.0",
                site=site,
                device=device,
                topic=f"iotpipe/v1/{site}/{device}/telemetry",
                kind="telemetry",
                received_at=time.time(),
            ),
            envelope(site, device, seq),
        )
        for seq in seqs
    ]
    return PackEncoder().encode(messages)


def _send_pack(channel: Any, queue: str, data: bytes, pack_id: str, count: int) -> None:
    props = pika.spec.BasicProperties()
    props.decode(pack_properties(pack_id, count, time.time()))
    channel.basic_publish(UPLINK_EXCHANGE, queue, data, props)


def _declare_uplink(channel: Any, queue: str) -> None:
    spec = uplink_queue(queue)
    channel.exchange_declare(UPLINK_EXCHANGE, "topic", durable=True)
    channel.queue_declare(queue, durable=True, arguments=spec.arguments())
    channel.queue_bind(queue, UPLINK_EXCHANGE, queue)


def test_a_pack_delivered_twice_is_unpacked_once_and_a_bad_one_is_dead_lettered(
    queues: Queues, tmp_path: Path
) -> None:
    site = queues.site
    with blocking_channel(queues.url) as channel:
        _declare_uplink(channel, queues.uplink)
        channel.confirm_delivery()
        first, second = _pack(site, range(10)), _pack(site, range(10, 15))
        _send_pack(channel, queues.uplink, first, "pack-a", 10)
        _send_pack(channel, queues.uplink, first, "pack-a", 10)  # the bridge sent it again
        _send_pack(channel, queues.uplink, b"IPAK\x01garbage", "pack-bad", 3)
        _send_pack(channel, queues.uplink, second, "pack-b", 5)
    unpack = unpacker(queues, tmp_path)
    with running(unpack, "unpack"):
        got = queues.drain(queues.telemetry, 15)
        dead = queues.drain(queues.dead, 1)
        wait_for(lambda: queues.depth(queues.uplink) == 0, 10, "uplink queue empty")
    assert [p.message_id for p, _ in got] == [f"{site}-d1-{i}" for i in range(15)]
    [(props, body)] = [(p, b) for p, b in dead if p.message_id == "pack-bad"]
    assert body == b"IPAK\x01garbage"
    with pytest.raises(PackError) as refused:
        decode(b"IPAK\x01garbage")
    assert props.headers[HEADER_ERROR] == refused.value.reason
    assert queues.depth(queues.telemetry) == 0

    # Restarted, it still knows both packs: a third delivery of pack-a publishes nothing.
    with blocking_channel(queues.url) as channel:
        channel.confirm_delivery()
        _send_pack(channel, queues.uplink, first, "pack-a", 10)
    again = unpacker(queues, tmp_path)
    with running(again, "unpack-again"):
        wait_for(lambda: queues.depth(queues.uplink) == 0, 10, "uplink queue empty")
        wait_for(lambda: again.metrics.packs.labels("duplicate")._value.get() == 1, 10, "duplicate")
    assert queues.depth(queues.telemetry) == 0


def test_killing_unpack_mid_stream_loses_nothing(queues: Queues, tmp_path: Path) -> None:
    """SIGKILL while unpacking, restart: every envelope arrives; duplicates only as repeated ids."""
    site = queues.site
    packs, per_pack = 150, 40
    with blocking_channel(queues.url) as channel:
        _declare_uplink(channel, queues.uplink)
        channel.confirm_delivery()
        for i in range(packs):
            seqs = range(i * per_pack, (i + 1) * per_pack)
            _send_pack(channel, queues.uplink, _pack(site, seqs), f"pack-{site}-{i}", per_pack)
    total = packs * per_pack
    config = tmp_path / "unpack.toml"
    config.write_text(
        f'[amqp]\nurl = "{queues.url}"\n'
        f'[unpack]\nqueue = "{queues.uplink}"\nprefetch = 1\nhttp_port = 0\n'
        f'seen_path = "{tmp_path / "packs.db"}"\n'
    )

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*IOTPIPE, "unpack", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    first = start()
    try:
        wait_for(lambda: queues.depth(queues.telemetry) > 0, 30, "unpacking started")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    at_kill = queues.depth(queues.telemetry)
    assert at_kill < total, "unpack finished before it was killed: the test proves nothing"

    second = start()
    try:
        wait_for(lambda: queues.depth(queues.uplink) == 0, 40, "uplink queue empty")
        arrived = queues.drain(queues.telemetry, total, timeout=40)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0, second.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    finally:
        if second.poll() is None:
            second.kill()
    ids = Counter(p.message_id for p, _ in arrived)
    assert set(ids) == {f"{site}-d1-{i}" for i in range(total)}
    bodies = {p.message_id: b for p, b in arrived}
    assert all(body == envelope(site, "d1", int(i.rsplit("-", 1)[1])) for i, body in bodies.items())
    # At most the packs in hand at the kill come twice (prefetch 1: one or two packs).
    assert sum(ids.values()) - total <= 2 * per_pack


def test_sample_config_loads_as_the_defaults_and_lists_every_option(tmp_path: Path) -> None:
    """configs/unpack.toml loads as the defaults, and uncommenting its options changes none."""
    sample = Path(__file__).resolve().parents[2] / "configs" / "unpack.toml"
    assert load(UnpackSettings, "unpack", config_file=sample, environ={}) == UnpackSettings()
    assert load(AmqpSettings, "amqp", config_file=sample, environ={}) == AmqpSettings()
    uncommented = tmp_path / "unpack.toml"
    uncommented.write_text(
        "\n".join(
            line.removeprefix("# ") if line.startswith("# ") and " = " in line else line
            for line in sample.read_text().splitlines()
            if not line.startswith(("# [", "# ca_file", "# cert_file", "# key_file", "# insecure"))
        )
    )
    data = tomllib.loads(uncommented.read_text())
    assert set(data["unpack"]) == set(UnpackSettings.model_fields), "every option is in the sample"
    assert load(UnpackSettings, "unpack", config_file=uncommented, environ={}) == UnpackSettings()
