"""``/metrics`` (Prometheus text format) and ``/healthz`` (JSON) for long-running services.

The bridge and the consumer build their metrics in their own
:class:`prometheus_client.CollectorRegistry` (so tests can run several services in one process);
the edge agent renders its own with :mod:`iotpipe.metrics` and hands a function instead, so its
process never loads prometheus_client. Either way :class:`HealthServer` serves them, with a
health callback: ``/healthz`` answers 200 when the callback says the service is healthy, 503
otherwise, with the callback's details as JSON either way. Anything else is 404.

The server is a few lines over :mod:`socketserver` rather than :mod:`http.server`: one request
per connection (HTTP/1.1, ``Connection: close``), each on its own daemon thread, which is all a
scraper and a health probe need, and it keeps http.server's imports out of the edge agent.
"""

from __future__ import annotations

import json
import logging
import socketserver
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


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-answer is not worth a traceback on stderr."""
        log.debug("http client=%s failed", client_address, exc_info=True)


class HealthServer:
    """A small HTTP server on its own thread serving ``/metrics`` and ``/healthz``.

    Args:
        host: Address to listen on.
        port: Port to listen on (0: a free one, see :attr:`port`).
        metrics: A prometheus_client registry, or an :data:`Exposition` function.
        health: The ``/healthz`` callback.

    Raises:
        ConfigError: the address cannot be bound.
    """

    def __init__(
        self,
        host: str,
        port: int,
        metrics: CollectorRegistry | Exposition,
        health: HealthCheck,
    ) -> None:
        exposition = metrics if callable(metrics) else _registry_exposition(metrics)

        class Handler(socketserver.StreamRequestHandler):
            timeout = 10.0  # a client that sends nothing does not hold a thread for ever

            def handle(self) -> None:
                request = self.rfile.readline(_MAX_LINE + 1)
                for _ in range(_MAX_HEADERS):  # read the headers so closing does not reset
                    line = self.rfile.readline(_MAX_LINE + 1)
                    if line in (b"\r\n", b"\n", b""):
                        break
                status, content_type, body = answer(request)
                head = (
                    f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                    f"Content-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n"
                )
                self.wfile.write(head.encode("latin-1") + body)

        def answer(request: bytes) -> tuple[int, str, bytes]:
            words = request.decode("latin-1").split()
            if len(words) != 3 or len(request) > _MAX_LINE:
                return 400, "text/plain", b"bad request\n"
            method, target, _ = words
            if method != "GET":
                return 405, "text/plain", b"only GET\n"
            path = target.split("?", 1)[0]
            try:
                if path == "/metrics":
                    content_type, body = exposition()
                    return 200, content_type, body
                if path == "/healthz":
                    healthy, details = health()
                    body = json.dumps({"healthy": healthy, **details}, default=str).encode()
                    return 200 if healthy else 503, "application/json", body
            except Exception:
                log.exception("http path=%s failed", path)
                return 500, "text/plain", b"internal error\n"
            return 404, "text/plain", b"not found: try /metrics or /healthz\n"

        try:
            self._server = _Server((host, port), Handler)
        except OSError as err:
            raise ConfigError(
                "http_port", port, f"cannot listen on {host}:{port} ({err.strerror})"
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="iotpipe-http", daemon=True
        )

    @property
    def port(self) -> int:
        """The port actually bound (useful when 0 asked for a free one)."""
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        """Start serving in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()


def _registry_exposition(registry: CollectorRegistry) -> Exposition:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return lambda: (CONTENT_TYPE_LATEST, generate_latest(registry))
