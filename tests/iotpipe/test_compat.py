"""Each private hook of iotpipe.compat: present and working in the installed release, and its fallback.

End to end, the paho and pika batching fallbacks are also exercised in ``test_mqtt_buffered.py``
(``test_client_falls_back_to_paho_loop``) and ``test_amqp.py``
(``test_queued_publishes_go_out_in_one_write_in_order[fallback]``).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
import pika
import pytest
import uvicorn

from iotpipe import compat
from iotpipe.mqtt import MqttClient
from iotpipe.settings import MqttSettings


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP socket listening on a free loopback port."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


class Recording:
    """A socket wrapper that counts the bytes sent through it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0

    def send(self, data: bytes) -> int:
        self.sent += len(data)
        return self.sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_versions_installed_are_the_verified_ones() -> None:
    """paho-mqtt, pika and uvicorn as installed are releases the hooks were verified against."""
    assert all(compat.check_version(name) for name in compat.VERIFIED)


def test_another_release_is_reported_once_not_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unverified release gives one warning naming it, and no error."""
    monkeypatch.setattr(pika, "__version__", "1.5.0")
    compat.check_version.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="iotpipe.compat"):
            assert not compat.check_version("pika")
            assert not compat.check_version("pika")
    finally:
        compat.check_version.cache_clear()
    assert [r.getMessage()[:16] for r in caplog.records] == ["pika 1.5.0 is no"]


# -- paho Client._sock -----------------------------------------------------------------------


def test_paho_socket_is_replaced_and_carries_paho_writes(listener: socket.socket) -> None:
    """paho 2.2 keeps its socket in ``_sock``: the wrapper goes in, and paho writes through it."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="compat-test")
    client.connect(*listener.getsockname())
    peer, _ = listener.accept()
    with peer:
        wrapped = compat.replace_paho_socket(client, Recording)
        assert wrapped is not None
        assert client.socket() is wrapped
        client.publish("t/compat", b"x" * 100, qos=0)
        assert wrapped.sent >= 100
        client.socket().close()


def test_a_paho_laid_out_differently_is_left_alone() -> None:
    """Without ``_sock`` (or with something else there) nothing is replaced."""

    class Renamed:
        def __init__(self, sock: socket.socket) -> None:
            self._socket = sock

        def socket(self) -> socket.socket:
            return self._socket

    with socket.socket() as sock:
        client = Renamed(sock)
        assert compat.replace_paho_socket(client, Recording) is None
        assert client.socket() is sock


@pytest.mark.parametrize("hook", [True, False], ids=["hook", "fallback"])
def test_mqtt_client_connects_with_or_without_the_hook(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, hook: bool
) -> None:
    """MqttClient gets the CONNACK through the buffered socket, or through paho's own loop."""
    installed: list[object] = []
    replace = compat.replace_paho_socket

    def spy(client: Any, wrap: Any) -> Any:
        installed.append(replace(client, wrap) if hook else None)
        return installed[-1]

    monkeypatch.setattr(compat, "replace_paho_socket", spy)

    def broker() -> None:
        peer, _ = listener.accept()
        with peer:
            peer.recv(1024)  # CONNECT
            peer.sendall(b"\x20\x02\x00\x00")  # CONNACK, accepted
            peer.recv(1024)  # DISCONNECT (or the close)

    thread = threading.Thread(target=broker, name="fake-broker", daemon=True)
    thread.start()
    host, port = listener.getsockname()
    client = MqttClient(MqttSettings(url=f"mqtt://{host}:{port}"), client_id="compat-test")
    client.connect(timeout=5)
    assert client.connected
    assert (installed[0] is not None) == hook
    client.disconnect()
    thread.join(timeout=5)


# -- paho Client._create_socket_connection --------------------------------------------------


@pytest.fixture
def resolved(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The hosts ``socket.getaddrinfo`` is asked to resolve, as given (str or bytes)."""
    hosts: list[object] = []
    real = socket.getaddrinfo

    def spy(host: Any, *args: Any, **kwargs: Any) -> Any:
        hosts.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    return hosts


def test_paho_resolves_an_ascii_host_as_bytes(
    listener: socket.socket, resolved: list[object]
) -> None:
    """paho 2.2 connects through ``_create_socket_connection``: the override resolves bytes."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="compat-test")
    assert compat.connect_paho_by_bytes(client)
    client.connect("localhost", listener.getsockname()[1])
    peer, _ = listener.accept()
    with peer:
        assert client.socket().getpeername()[1] == listener.getsockname()[1]
        client.socket().close()
    assert resolved == [b"localhost"]


@pytest.mark.parametrize("case", ["non-ascii host", "proxy"])
def test_paho_keeps_its_own_connection_for_other_hosts_and_proxies(
    monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """A non-ASCII host or a proxy goes through paho's own ``_create_socket_connection``."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="compat-test")
    own: list[bool] = []
    monkeypatch.setattr(client, "_create_socket_connection", lambda: own.append(True))
    proxy = {"proxy_type": 3, "proxy_addr": "proxy.invalid"} if case == "proxy" else None
    monkeypatch.setattr(client, "_get_proxy", lambda: proxy)
    assert compat.connect_paho_by_bytes(client)
    client._host = "bücher.example" if case == "non-ascii host" else "localhost"
    client._create_socket_connection()
    assert own == [True]


def test_a_paho_without_create_socket_connection_connects_its_own_way(
    listener: socket.socket, resolved: list[object]
) -> None:
    """Without the private method nothing is overridden, and paho connects (resolving a str)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delattr(paho.Client, "_create_socket_connection")
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="compat-test")
        assert not compat.connect_paho_by_bytes(client)
    assert "_create_socket_connection" not in vars(client)
    client.connect("localhost", listener.getsockname()[1])
    peer, _ = listener.accept()
    with peer:
        client.socket().close()
    assert resolved == ["localhost"]


# -- pika Connection._output_marshaled_frames ------------------------------------------------


def test_pika_batching_hook_is_found_or_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    """pika 1.4.4 has the frame writer the batching overrides; without it, no batching."""
    assert compat.pika_can_batch()
    monkeypatch.delattr(pika.connection.Connection, "_output_marshaled_frames")
    assert not compat.pika_can_batch()


# -- pika BlockingConnection._impl -----------------------------------------------------------


@pytest.fixture
def blocking(rabbitmq_url: str) -> Iterator[Any]:
    """A pika BlockingConnection to the shared RabbitMQ."""
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    yield connection
    if connection.is_open:
        connection.close()


@pytest.mark.rabbitmq
def test_server_version_is_read_from_the_connection(blocking: Any) -> None:
    """The broker's version comes from the handshake kept on ``_impl``."""
    assert compat.pika_server_version(blocking).split(".")[0].isdigit()


def test_server_version_without_the_hook_is_unknown() -> None:
    """A connection without ``_impl`` gives an empty version, not an error."""
    assert compat.pika_server_version(object()) == ""


@pytest.mark.rabbitmq
def test_answer_within_tears_a_silent_connection_down(blocking: Any) -> None:
    """A block that outlives its deadline ends with the connection broken, not a hang."""
    with (
        pytest.raises(TimeoutError, match=r"no answer within 0\.1 s \(a test\)"),
        compat.pika_answer_within(blocking, 0.1, "a test"),
    ):
        blocking.sleep(5)
    assert not blocking.is_open


def test_answer_within_without_the_hook_runs_the_block_unbounded() -> None:
    """Without ``_impl`` the block runs as it is, with no deadline and no error."""
    ran = []
    with compat.pika_answer_within(object(), 0.01, "a test"):
        ran.append(True)
    assert ran == [True]


# -- uvicorn Server.capture_signals ----------------------------------------------------------


def test_sigterm_stops_the_server_without_re_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the override, SIGTERM reaches handle_exit, and nothing is re-raised afterwards."""
    assert callable(getattr(uvicorn.Server, "capture_signals", None))
    exits: list[bool] = []
    raised: list[int] = []
    # Should a signal be re-raised, it lands here rather than ending the test run.
    monkeypatch.setattr(signal, "raise_signal", raised.append)
    server = compat.uvicorn_server(lambda: exits.append(True))(uvicorn.Config(app=None))
    before = signal.getsignal(signal.SIGTERM)
    with server.capture_signals():
        assert signal.getsignal(signal.SIGTERM) == server.handle_exit
        server.handle_exit(signal.SIGTERM, None)
    assert signal.getsignal(signal.SIGTERM) == before
    assert exits == [True]
    assert server.should_exit
    assert raised == []


def test_without_capture_signals_uvicorn_keeps_its_own(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where uvicorn lacks the hook, a warning says so and exits still reach the callback."""
    monkeypatch.delattr(uvicorn.Server, "capture_signals")
    exits: list[bool] = []
    with caplog.at_level(logging.WARNING, logger="iotpipe.compat"):
        server_class = compat.uvicorn_server(lambda: exits.append(True))
    assert "capture_signals" in caplog.text
    assert "capture_signals" not in vars(server_class)
    server = server_class(uvicorn.Config(app=None))
    server.handle_exit(signal.SIGINT, None)
    assert exits == [True]
    assert server.should_exit
