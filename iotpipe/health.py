"""``/metrics`` (Prometheus text format) and ``/healthz`` (JSON) for long-running services.

The bridge and the consumer build their metrics in their own
:class:`prometheus_client.CollectorRegistry` (so tests can run several services in one process);
the edge agent renders its own with :mod:`iotpipe.metrics` and hands a function instead, so its
process never loads prometheus_client. Either way :class:`HealthServer` serves them, with a
health callback: ``/healthz`` answers 200 when the callback says the service is healthy, 503
otherwise, with the callback's details as JSON either way. Anything else is 404.

The server is a listening socket and a thread rather than :mod:`http.server` or
:mod:`socketserver`: one request per connection (HTTP/1.1, ``Connection: close``), each answered
on its own daemon thread, which is all a scraper and a health probe need, and it keeps those
modules' imports out of the edge agent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from iotpipe.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["Exposition", "HealthCheck", "HealthServer"]

log = logging.getLogger(__name__)

#: A health check: (healthy, details for the JSON body).
HealthCheck = Callable[[], tuple[bool, Mapping[str, Any]]]

#: The ``/metrics`` answer, made at scrape time: (content type, body).
Exposition = Callable[[], tuple[str, bytes]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

#: Longest request or header line read (as http.server); a longer one is refused.
_MAX_LINE = 65536
_MAX_HEADERS = 100


class HealthServer:
    """A small HTTP server on its own thread serving ``/metrics`` and ``/healthz``.

    Args:
        host: Address to listen on.
        port: Port to listen on (0: a free one, see :attr:`port`).
        metrics: A prometheus_client registry, or an :data:`Exposition` function.
        health: The ``/healthz`` callback.
        idle_timeout: Seconds a client may keep a connection without completing its request.

    Raises:
        ConfigError: the address cannot be bound.
    """

    def __init__(
        self,
        host: str,
        port: int,
        metrics: CollectorRegistry | Exposition,
        health: HealthCheck,
        *,
        idle_timeout: float = 10.0,
    ) -> None:
        self._exposition = metrics if callable(metrics) else _registry_exposition(metrics)
        self._health = health
        self._idle_timeout = idle_timeout
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(5)
        except OSError as err:
            self._sock.close()
            raise ConfigError(
                "http_port", port, f"cannot listen on {host}:{port} ({err.strerror})"
            ) from None
        self._wakeup, self._waker = socket.socketpair()  # stop() writes: the accept loop ends
        self._thread = threading.Thread(target=self._serve, name="iotpipe-http", daemon=True)

    @property
    def port(self) -> int:
        """The port actually bound (useful when 0 asked for a free one)."""
        return int(self._sock.getsockname()[1])

    def start(self) -> HealthServer:
        """Start serving in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread.is_alive():
            self._waker.send(b"\0")
            self._thread.join(timeout=5)
        for sock in (self._sock, self._wakeup, self._waker):
            sock.close()

    def _serve(self) -> None:
        while self._wakeup not in select.select([self._sock, self._wakeup], [], [])[0]:
            try:
                conn, client = self._sock.accept()
            except OSError:  # the client left before we accepted, or no file descriptor left
                log.debug("http accept failed", exc_info=True)
                continue
            threading.Thread(
                target=self._handle, args=(conn, client), name="iotpipe-http-request", daemon=True
            ).start()

    def _handle(self, conn: socket.socket, client: object) -> None:
        """Read one request (line and headers), answer it, close the connection."""
        with conn:
            try:
                conn.settimeout(self._idle_timeout)  # a silent client does not hold a thread
                with conn.makefile("rb") as rfile:
                    request = rfile.readline(_MAX_LINE + 1)
                    for _ in range(_MAX_HEADERS):  # read the headers so closing does not reset
                        line = rfile.readline(_MAX_LINE + 1)
                        if line in (b"\r\n", b"\n", b""):
                            break
                status, content_type, body = self._answer(request)
                head = (
                    f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                    f"Content-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n"
                )
                conn.sendall(head.encode("latin-1") + body)
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_WR)
            except Exception:  # a client that went away mid-answer is not worth a traceback
                log.debug("http client=%s failed", client, exc_info=True)

    def _answer(self, request: bytes) -> tuple[int, str, bytes]:
        words = request.decode("latin-1").split()
        if len(words) != 3 or len(request) > _MAX_LINE:
            return 400, "text/plain", b"bad request\n"
        method, target, _ = words
        if method != "GET":
            return 405, "text/plain", b"only GET\n"
        path = target.split("?", 1)[0]
        try:
            if path == "/metrics":
                content_type, body = self._exposition()
                return 200, content_type, body
            if path == "/healthz":
                healthy, details = self._health()
                body = json.dumps({"healthy": healthy, **details}, default=str).encode()
                return 200 if healthy else 503, "application/json", body
        except Exception:
            log.exception("http path=%s failed", path)
            return 500, "text/plain", b"internal error\n"
        return 404, "text/plain", b"not found: try /metrics or /healthz\n"


def _registry_exposition(registry: CollectorRegistry) -> Exposition:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return lambda: (CONTENT_TYPE_LATEST, generate_latest(registry))
