"""The embedded broker's trimmed paths: coalesced socket writes and direct topic checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from bridge.broker import BrokerThread
from bridge.broker_speed import FLUSH_BYTES, MAX_DELAY, CoalescingWriter, Flusher
from iotpipe.mqtt import Message, pump_until
from tests.bridge.conftest import client
from tests.conftest import wait_for

Connected = tuple[CoalescingWriter, asyncio.StreamReader, list[bytes]]


def on_socket(test: Callable[[Connected], Awaitable[None]]) -> None:
    """Run ``test`` with a CoalescingWriter on a real loopback TCP connection.

    It gets the writer, the peer's reader and the list of what reached ``transport.write``.
    """

    async def main() -> None:
        accepted: asyncio.Queue[asyncio.StreamReader] = asyncio.Queue()

        async def on_connect(reader: asyncio.StreamReader, _w: asyncio.StreamWriter) -> None:
            await accepted.put(reader)

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, stream = await asyncio.open_connection("127.0.0.1", port)
        peer = await accepted.get()
        handed: list[bytes] = []
        transport_write = stream.write

        def record(data: bytes) -> None:
            handed.append(bytes(data))
            transport_write(data)

        stream.write = record  # type: ignore[method-assign]
        writer = CoalescingWriter(stream, Flusher(asyncio.get_running_loop()))
        try:
            await asyncio.wait_for(test((writer, peer, handed)), timeout=10)
        finally:
            await writer.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_packets_written_together_leave_in_one_transport_write() -> None:
    """Packets written in one stretch of work reach the transport as one write, in order."""

    async def test(connected: Connected) -> None:
        writer, peer, handed = connected
        for packet in (b"\x40\x02\x00\x01", b"\x40\x02\x00\x02", b"\x30\x03\x00\x01x"):
            writer.write(packet)
        assert handed == []  # gathered, not yet sent
        assert await peer.readexactly(13) == b"\x40\x02\x00\x01\x40\x02\x00\x02\x30\x03\x00\x01x"
        assert handed == [b"\x40\x02\x00\x01\x40\x02\x00\x02\x30\x03\x00\x01x"]

    on_socket(test)


def test_a_busy_loop_still_sends_after_the_maximum_delay() -> None:
    """While other work keeps the loop busy, gathered bytes leave after MAX_DELAY, not never."""

    async def test(connected: Connected) -> None:
        writer, peer, handed = connected
        loop = asyncio.get_running_loop()
        busy_until = time.monotonic() + 250 * MAX_DELAY  # half a second of work
        sent_while_busy: list[bool] = []

        def busy() -> None:  # one callback per loop iteration: never idle
            if handed and not sent_while_busy:
                sent_while_busy.append(time.monotonic() < busy_until)
            if time.monotonic() < busy_until:
                loop.call_soon(busy)

        loop.call_soon(busy)
        writer.write(b"\xd0\x00")
        assert await peer.readexactly(2) == b"\xd0\x00"
        assert sent_while_busy == [True]

    on_socket(test)


def test_drain_hands_a_large_backlog_over_at_once() -> None:
    """Past FLUSH_BYTES gathered, drain() writes them out before it waits on the transport."""

    async def test(connected: Connected) -> None:
        writer, peer, handed = connected
        chunk = b"x" * 1024
        for _ in range(FLUSH_BYTES // len(chunk)):
            writer.write(chunk)
        await writer.drain()
        assert [len(data) for data in handed] == [FLUSH_BYTES]
        assert await peer.readexactly(FLUSH_BYTES) == chunk * (FLUSH_BYTES // len(chunk))

    on_socket(test)


def test_close_sends_what_was_gathered_first() -> None:
    """Closing the writer sends the gathered bytes, then ends the stream."""

    async def test(connected: Connected) -> None:
        writer, peer, _handed = connected
        writer.write(b"\xe0\x00")  # DISCONNECT, gathered
        await writer.close()
        assert await peer.read() == b"\xe0\x00"  # everything up to the end of the stream
        writer.write(b"late")  # after close: dropped, as amqtt's own adapter does

    on_socket(test)


@pytest.mark.mqtt
def test_a_burst_of_qos1_messages_arrives_complete_and_in_order(
    embedded_broker: BrokerThread, unique: str
) -> None:
    """2000 QoS 1 messages published without waiting reach a subscriber all, once and in order."""
    count = 2000
    topic = f"iotpipe/v1/site-{unique}/dev/telemetry"
    got: list[Message] = []
    sub = client(embedded_broker, client_id=f"sub-{unique}", on_message=got.append)
    sub.connect()
    sub.subscribe([(topic, 1)])
    pub = client(embedded_broker, client_id=f"pub-{unique}", max_inflight=500)
    pub.connect()
    for i in range(count):
        pub.publish(topic, f"{i:06d}".encode().ljust(265), qos=1)
        if i % 100 == 0:
            sub.pump(timeout=0)

    def all_arrived() -> bool:
        pub.pump(timeout=0)
        sub.pump(timeout=0.01)
        return len(got) >= count

    # The publisher stays connected until everything arrived: amqtt 0.12 forgets publishes it
    # acknowledged but has not forwarded yet when their publisher disconnects.
    wait_for(all_arrived, timeout=30, what=f"{count} messages")
    assert pub.flush(timeout=10)
    assert [int(m.payload) for m in got] == list(range(count))
    pub.disconnect()
    sub.disconnect()


@pytest.mark.mqtt
def test_topic_checks_still_deny_and_count_with_an_acl(
    secured_broker: BrokerThread, unique: str
) -> None:
    """With the ACL asked directly (no task per check), a foreign publish is still dropped and
    counted while the device's own publishes are forwarded."""
    broker = secured_broker
    site = f"home-{unique}"
    got: list[Message] = []
    reader = client(broker, "bridge", client_id=f"bridge-{unique}", on_message=got.append)
    reader.connect()
    reader.subscribe([("iotpipe/#", 1)])
    device = client(broker, "home/dev1", client_id=f"dev1-{unique}")
    device.connect()
    device.publish(f"iotpipe/v1/{site}/dev2/telemetry", b"foreign", qos=1)
    device.publish("iotpipe/v1/home/dev1/telemetry", b"own", qos=1)
    assert device.flush(timeout=10)
    assert pump_until(reader, lambda: len(got) >= 1, timeout=10)
    assert [m.payload for m in got] == [b"own"]
    assert broker.stats.denied_publishes == 1
    device.disconnect()
    reader.disconnect()
