"""``/metrics`` (Prometheus text format) and ``/healthz`` (JSON) for long-running services.

Each service builds its metrics in its own :class:`prometheus_client.CollectorRegistry` (so
tests can run several services in one process) and hands a health callback to
:class:`HealthServer`. ``/healthz`` answers 200 when the callback says the service is healthy,
503 otherwise, with the callback's details as JSON either way.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from iotpipe.errors import ConfigError

log = logging.getLogger(__name__)

#: A health check: (healthy, details for the JSON body).
HealthCheck = Callable[[], tuple[bool, Mapping[str, Any]]]


class HealthServer:
    """A small HTTP server on its own thread serving ``/metrics`` and ``/healthz``."""

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, health: HealthCheck
    ) -> None:
        registry_ = registry
        health_ = health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry_))
                elif path == "/healthz":
                    healthy, details = health_()
                    body = json.dumps({"healthy": healthy, **details}, default=str).encode()
                    self._send(200 if healthy else 503, "application/json", body)
                else:
                    self._send(404, "text/plain", b"not found: try /metrics or /healthz\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http %s", format % args)

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as err:
            raise ConfigError(
                "http_port", port, f"cannot listen on {host}:{port} ({err.strerror})"
            ) from None
        self._server.daemon_threads = True
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
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
