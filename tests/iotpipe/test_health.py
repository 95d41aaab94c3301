"""iotpipe.health: the /metrics and /healthz server shared by the agent, bridge and consumer."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter

from iotpipe.errors import ConfigError
from iotpipe.health import Exposition, HealthCheck, HealthServer


def _exchange(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send ``request`` raw; return the status line, the headers and the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status, headers, body


def _get(port: int, path: str) -> tuple[str, dict[str, str], bytes]:
    return _exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n".encode())


@pytest.fixture
def serve() -> Iterator[Any]:
    """Start HealthServers on free ports; stop them at teardown."""
    servers: list[HealthServer] = []

    def start(
        metrics: Exposition | CollectorRegistry, health: HealthCheck, **options: Any
    ) -> HealthServer:
        server = HealthServer("127.0.0.1", 0, metrics, health, **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _healthy() -> tuple[bool, Mapping[str, Any]]:
    return True, {"backlog": 3}


def test_metrics_and_healthz_answer_with_length_and_close(serve: Any) -> None:
    """/metrics answers the exposition's body and type; /healthz the check as JSON; both close."""
    server = serve(lambda: ("text/plain; version=0.0.4; charset=utf-8", b"x_total 1.0\n"), _healthy)
    status, headers, body = _get(server.port, "/metrics?x=1")
    assert status == "HTTP/1.1 200 OK"
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert headers["Content-Length"] == str(len(body))
    assert headers["Connection"] == "close"
    assert body == b"x_total 1.0\n"
    status, headers, body = _get(server.port, "/healthz")
    assert status == "HTTP/1.1 200 OK"
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"healthy": True, "backlog": 3}


def test_unhealthy_is_503_with_details(serve: Any) -> None:
    """An unhealthy check answers 503 and still says why."""
    server = serve(lambda: ("text/plain", b""), lambda: (False, {"connected": False}))
    status, _, body = _get(server.port, "/healthz")
    assert status == "HTTP/1.1 503 Service Unavailable"
    assert json.loads(body) == {"healthy": False, "connected": False}


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /nope HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "HTTP/1.1 405 Method Not Allowed"),
        (b"nonsense\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    ],
)
def test_other_requests_are_refused(serve: Any, request_bytes: bytes, status: str) -> None:
    """Unknown paths are 404, other methods 405, a malformed request line 400."""
    server = serve(lambda: ("text/plain", b""), _healthy)
    assert _exchange(server.port, request_bytes)[0] == status


def test_a_failing_exposition_is_a_500_and_a_log_line(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception while rendering answers 500 and is logged, and the server keeps serving."""

    def broken() -> tuple[str, bytes]:
        raise RuntimeError("boom")

    server = serve(broken, _healthy)
    with caplog.at_level(logging.ERROR, logger="iotpipe.health"):
        assert _get(server.port, "/metrics")[0] == "HTTP/1.1 500 Internal Server Error"
    assert "http path=/metrics failed" in caplog.text
    assert _get(server.port, "/healthz")[0] == "HTTP/1.1 200 OK"


def test_a_prometheus_client_registry_is_served_as_generate_latest_writes_it(serve: Any) -> None:
    """The bridge's and consumer's registries are served with prometheus_client's content type."""
    registry = CollectorRegistry()
    Counter("x_forwarded", "forwarded", registry=registry).inc(2)
    server = serve(registry, _healthy)
    _, headers, body = _get(server.port, "/metrics")
    assert headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert b"x_forwarded_total 2.0\n" in body


def test_a_silent_client_is_closed_after_the_idle_timeout(serve: Any) -> None:
    """A connection that sends nothing is closed by the server once the idle timeout passes."""
    server = serve(lambda: ("text/plain", b""), _healthy, idle_timeout=0.2)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as silent:
        assert silent.recv(1) == b""  # closed by the server, well before our 5 s timeout


def test_a_silent_client_holds_no_one_up(serve: Any) -> None:
    """While a client sends nothing (10 s idle timeout), another is answered (within 5 s)."""
    server = serve(lambda: ("text/plain", b""), _healthy)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        assert _get(server.port, "/healthz")[0] == "HTTP/1.1 200 OK"


def test_stop_frees_the_port(serve: Any) -> None:
    """After stop() the port can be listened on again at once."""
    server = serve(lambda: ("text/plain", b""), _healthy)
    port = server.port
    assert _get(port, "/healthz")[0] == "HTTP/1.1 200 OK"
    server.stop()
    HealthServer("127.0.0.1", port, lambda: ("text/plain", b""), _healthy).stop()


def test_a_busy_port_is_a_config_error() -> None:
    """Binding a port already in use names the setting in one line."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            HealthServer("127.0.0.1", port, lambda: ("text/plain", b""), _healthy)
