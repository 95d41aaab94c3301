"""The buffered socket under paho: reads served from one recv(), corked writes, safe fallback."""

from __future__ import annotations

import select
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from iotpipe import mqtt
from iotpipe.mqtt import Message, MqttClient, _BufferedSocket, _install_buffer, pump_until
from iotpipe.settings import MqttSettings
from tests.conftest import BrokerInfo, wait_for


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of non-blocking stream sockets: (ours, the peer's)."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    yield ours, peer
    ours.close()
    peer.close()


def read_all(sock: socket.socket) -> bytes:
    """Everything the kernel holds for ``sock`` right now."""
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


# -- reads ---------------------------------------------------------------------------------------


def test_small_reads_are_served_from_one_recv(pair: tuple[socket.socket, socket.socket]) -> None:
    """paho's 1-byte and n-byte reads come from the buffer, and pending() counts what is left."""
    ours, peer = pair
    buffered = _BufferedSocket(ours)
    peer.sendall(b"\x30\x05hello\x40\x02\x00\x01")
    assert buffered.recv(1) == b"\x30"
    assert buffered.pending() == 10
    assert buffered.recv(1) == b"\x05"
    assert buffered.recv(5) == b"hello"
    assert buffered.recv(1) == b"\x40"
    assert buffered.recv(100) == b"\x02\x00\x01"  # a short read, as a socket gives
    assert buffered.pending() == 0
    with pytest.raises(BlockingIOError):  # paho's "nothing more for now"
        buffered.recv(1)


def test_packet_split_across_reads_is_reassembled(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A packet whose rest arrives later is returned in order: buffer first, then the socket."""
    ours, peer = pair
    buffered = _BufferedSocket(ours)
    peer.sendall(b"\x30\x0aabc")
    assert buffered.recv(1) == b"\x30"
    assert buffered.recv(1) == b"\x0a"
    assert buffered.recv(10) == b"abc"
    with pytest.raises(BlockingIOError):
        buffered.recv(7)
    peer.sendall(b"defghij\xd0\x00")
    assert buffered.recv(7) == b"defghij"
    assert buffered.pending() == 2
    assert buffered.recv(1) == b"\xd0"
    assert buffered.recv(1) == b"\x00"


def test_eof_comes_after_the_buffered_bytes(pair: tuple[socket.socket, socket.socket]) -> None:
    """When the peer closes, buffered bytes are still read, then b"" (paho: connection lost)."""
    ours, peer = pair
    buffered = _BufferedSocket(ours)
    peer.sendall(b"\x40\x02\x00\x07")
    peer.shutdown(socket.SHUT_WR)
    assert buffered.recv(1) == b"\x40"
    assert buffered.recv(1) == b"\x02"
    assert buffered.recv(2) == b"\x00\x07"
    assert buffered.recv(1) == b""
    assert buffered.recv(1) == b""


def test_pending_includes_what_a_tls_socket_holds() -> None:
    """pending() adds the inner socket's pending() (decrypted TLS bytes select() cannot see)."""

    class FakeTls:
        def recv(self, _bufsize: int) -> bytes:
            return b"abcd"

        def pending(self) -> int:
            return 5

    buffered = _BufferedSocket(FakeTls())  # type: ignore[arg-type]
    assert buffered.pending() == 5
    assert buffered.recv(1) == b"a"
    assert buffered.pending() == 3 + 5


# -- writes --------------------------------------------------------------------------------------


def test_corked_writes_go_out_together_on_flush(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """While corked nothing is sent; flush() sends everything, in order, and uncorks."""
    ours, peer = pair
    buffered = _BufferedSocket(ours)
    buffered.corked = True
    for mid in range(3):
        assert buffered.send(b"\x40\x02\x00" + bytes([mid])) == 4
    assert buffered.unsent == 12
    assert read_all(peer) == b""
    buffered.flush()
    assert not buffered.corked
    assert buffered.unsent == 0
    assert read_all(peer) == b"\x40\x02\x00\x00\x40\x02\x00\x01\x40\x02\x00\x02"
    assert buffered.send(b"\xc0\x00") == 2  # uncorked: straight to the socket
    assert read_all(peer) == b"\xc0\x00"


def test_writes_behind_an_unsent_backlog_keep_their_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """What the kernel did not take stays queued, and later writes queue behind it."""
    ours, peer = pair
    buffered = _BufferedSocket(ours)
    big = bytes(range(256)) * 40_000  # ~10 MB: more than the socket buffers hold
    buffered.corked = True
    buffered.send(big)
    buffered.flush()
    assert 0 < buffered.unsent < len(big)  # partly sent; the rest waits
    assert buffered.send(b"tail") == 4  # not sent ahead of the backlog
    received = b""
    while buffered.unsent:
        received += read_all(peer)
        buffered.flush()
    received += read_all(peer)
    assert received == big + b"tail"


def test_close_sends_held_writes_first(pair: tuple[socket.socket, socket.socket]) -> None:
    """paho queues DISCONNECT and closes at once: held PUBACKs and the DISCONNECT still go out."""
    ours, peer = pair
    buffered = _BufferedSocket(ours)
    buffered.corked = True
    buffered.send(b"\x40\x02\x00\x01")
    buffered.send(b"\xe0\x00")
    buffered.close()
    peer.setblocking(True)
    assert peer.recv(100) == b"\x40\x02\x00\x01\xe0\x00"
    assert peer.recv(100) == b""


def test_flush_to_a_vanished_peer_drops_quietly(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A broken connection at flush time is left for paho's next read to report, not raised."""
    ours, peer = pair
    buffered = _BufferedSocket(ours)
    buffered.corked = True
    buffered.send(b"\x40\x02\x00\x01")
    peer.close()
    buffered.flush()
    assert buffered.unsent == 0
    assert buffered.recv(1) == b""  # what paho turns into "connection lost"


# -- TLS -----------------------------------------------------------------------------------------


@pytest.fixture
def tls_pair(tmp_path: Path) -> Iterator[tuple[ssl.SSLSocket, ssl.SSLSocket]]:
    """A TLS connection over a socket pair: (ours, non-blocking; the server's, blocking)."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is missing: run `make setup`", pytrace=False)
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.load_verify_locations(cert)
    raw_ours, raw_server = socket.socketpair()
    wrapped: list[ssl.SSLSocket] = []
    handshake = threading.Thread(
        target=lambda: wrapped.append(server_context.wrap_socket(raw_server, server_side=True))
    )
    handshake.start()
    ours = client_context.wrap_socket(raw_ours, server_hostname="localhost")
    handshake.join(timeout=10)
    server = wrapped[0]
    ours.setblocking(False)
    yield ours, server
    ours.close()
    server.close()


def test_tls_reads_span_records_and_want_read_reaches_paho(
    tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    """Over TLS, data spanning several records reads back intact through select() + pending()."""
    ours, server = tls_pair
    buffered = _BufferedSocket(ours)
    with pytest.raises(ssl.SSLWantReadError):  # paho's _sock_recv maps it to BlockingIOError
        buffered.recv(1)
    sent = bytes(range(256)) * 200  # 51,200 bytes: four TLS records
    server.sendall(sent)
    received = b""
    sizes = [1, 1, 265, 7, 4096]
    while len(received) < len(sent):
        if not buffered.pending():
            assert select.select([buffered], [], [], 5)[0], "data never became readable"
        try:
            received += buffered.recv(sizes[len(received) % len(sizes)])
        except ssl.SSLWantReadError:
            continue
    assert received == sent
    assert buffered.pending() == 0


# -- installing it under paho, and the fallback --------------------------------------------------


def test_direct_pubacks_are_the_bytes_paho_writes(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """ack() of a QoS 1 message writes paho's own PUBACK, behind bytes paho already sent."""
    ours, peer = pair
    direct = MqttClient(MqttSettings(), client_id="direct", manual_ack=True)
    buffered = _BufferedSocket(ours)
    direct._client._sock = buffered  # as connect() installs it
    buffered.send(b"earlier")
    for mid in (1, 258, 65535):
        direct.ack(mid, 1)
    assert read_all(peer) == b"earlier"  # corked until the next pump
    buffered.flush()
    sent = read_all(peer)

    theirs, their_peer = socket.socketpair()
    with theirs, their_peer:
        theirs.setblocking(False)
        their_peer.setblocking(False)
        paho_client = MqttClient(MqttSettings(), client_id="paho", manual_ack=True)._client
        paho_client._sock = theirs
        for mid in (1, 258, 65535):
            paho_client.ack(mid, 1)
        assert sent == read_all(their_peer) == bytes.fromhex("40020001 40020102 4002ffff")


def test_install_refuses_a_client_laid_out_differently() -> None:
    """Without paho 2.2's private ``_sock`` (or with a non-socket) nothing is replaced."""

    class NoPrivateSock:
        def socket(self) -> socket.socket:
            return sock

    class NotASocket:
        def __init__(self) -> None:
            self._sock = object()

        def socket(self) -> object:
            return self._sock

    with socket.socket() as sock:
        assert _install_buffer(NoPrivateSock()) is None  # type: ignore[arg-type]
    odd = NotASocket()
    assert _install_buffer(odd) is None  # type: ignore[arg-type]
    assert not isinstance(odd._sock, _BufferedSocket)


def exchange_with_manual_acks(url: str, unique: str, count: int) -> list[Message]:
    """``count`` QoS 1 messages to a manual-ack subscriber that acks each; what it received."""
    got: list[Message] = []
    settings = MqttSettings(url=url)
    sub = MqttClient(settings, client_id=f"sub-{unique}", on_message=got.append, manual_ack=True)
    sub.connect()
    sub.subscribe([(f"t/{unique}/#", 1)])
    pub = MqttClient(settings, client_id=f"pub-{unique}", max_inflight=50)
    pub.connect()
    acked = 0

    def ack_new() -> bool:
        nonlocal acked
        for message in got[acked:]:
            sub.ack(message.mid, message.qos)
        acked = len(got)
        return acked >= count

    for i in range(count):
        pub.publish(f"t/{unique}/x", b"%d" % i, qos=1)
        sub.pump()
        ack_new()
    assert pub.flush(timeout=20)
    assert pump_until(sub, ack_new, timeout=20)  # unacked, Mosquitto holds back the rest
    pub.disconnect()
    sub.disconnect()
    return got


@pytest.mark.mqtt
def test_client_uses_the_buffered_socket(mqtt_broker: BrokerInfo, unique: str) -> None:
    """With paho 2.2 the buffered socket is installed on connect, and messages flow through it."""
    client = MqttClient(MqttSettings(url=mqtt_broker.url), client_id=f"c-{unique}")
    client.connect()
    assert isinstance(client._client.socket(), _BufferedSocket)
    client.disconnect()
    got = exchange_with_manual_acks(mqtt_broker.url, unique, 300)
    assert [int(m.payload) for m in got] == list(range(300))


@pytest.mark.mqtt
def test_client_falls_back_to_paho_loop(
    mqtt_broker: BrokerInfo, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the buffered socket cannot be installed, paho's own loop carries the same traffic."""
    monkeypatch.setattr(mqtt, "_install_buffer", lambda _client: None)
    client = MqttClient(MqttSettings(url=mqtt_broker.url), client_id=f"c-{unique}")
    client.connect()
    assert not isinstance(client._client.socket(), _BufferedSocket)
    client.disconnect()
    got = exchange_with_manual_acks(mqtt_broker.url, unique, 300)
    assert [int(m.payload) for m in got] == list(range(300))


@pytest.mark.mqtt
@pytest.mark.mosquitto
def test_acks_held_at_disconnect_still_reach_the_broker(
    mosquitto_broker: BrokerInfo, unique: str, tmp_path: Path
) -> None:
    """PUBACKs corked by ack() and not yet pumped are sent before DISCONNECT: no redelivery."""
    settings = MqttSettings(url=mosquitto_broker.url)
    got: list[Message] = []

    def subscriber() -> MqttClient:
        client = MqttClient(
            settings,
            client_id=f"sub-{unique}",
            clean_session=False,
            manual_ack=True,
            on_message=got.append,
        )
        client.connect()
        return client

    sub = subscriber()
    sub.subscribe([(f"t/{unique}/#", 1)])
    pub = MqttClient(settings, client_id=f"pub-{unique}")
    pub.connect()
    for i in range(10):  # fewer than Mosquitto sends before it waits for PUBACKs (20)
        pub.publish(f"t/{unique}/x", b"%d" % i, qos=1)
    assert pub.flush(timeout=20)
    assert pump_until(sub, lambda: len(got) >= 10, timeout=20)
    for message in got:
        sub.ack(message.mid, message.qos)  # held until the next pump...
    sub.disconnect()  # ...which never comes: disconnect must send them
    got.clear()
    # Reconnecting under the same client id before Mosquitto has read the old connection would
    # make it take the session over and drop that socket's unread bytes (our PUBACKs with it).
    log = tmp_path / "mosquitto" / "mosquitto.log"
    wait_for(
        lambda: f"Client sub-{unique} disconnected" in log.read_text(errors="replace"),
        20,
        "Mosquitto to process the disconnect",
    )

    sub = subscriber()
    assert sub.session_present
    pub.publish(f"t/{unique}/x", b"marker", qos=1)  # redeliveries would come before it
    assert pub.flush(timeout=20)
    assert pump_until(sub, lambda: any(m.payload == b"marker" for m in got), timeout=20)
    assert [m.payload for m in got] == [b"marker"]
    sub.ack(got[0].mid, got[0].qos)
    pub.disconnect()
    sub.disconnect()
