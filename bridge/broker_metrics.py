"""What the embedded broker counts, and its ``/metrics`` and ``/healthz``.

Two things live here, both small:

* :class:`DropCounter`: every message the broker discards after accepting it is counted by
  reason (:data:`DROP_REASONS`) and logged, once per burst, so a bounded queue never loses data
  silently.
* :class:`BrokerEndpoint`: ``/metrics`` (Prometheus text, ``iotpipe_broker_*``) and ``/healthz``
  (JSON) of a running :class:`~bridge.broker.EmbeddedBroker`, served by
  :class:`iotpipe.health.HealthServer` from its own thread.

The metrics are not counted as messages flow: amqtt's plugin events cost a task per event on the
broker's hot path. They are read from amqtt's state when ``/metrics`` is scraped (sessions, their
queues and in-flight messages, retained messages, open connections) plus a few plain integers the
broker already keeps. amqtt's state belongs to the broker's event loop, so each scrape hands
:meth:`~bridge.broker.EmbeddedBroker.stats` to that loop and waits for the answer
(``asyncio.run_coroutine_threadsafe``); a loop that does not answer in time makes ``/healthz``
say unhealthy and ``/metrics`` fail with HTTP 500.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from iotpipe.health import HealthServer
from iotpipe.metrics import CONTENT_TYPE, Family, counter, gauge, render

if TYPE_CHECKING:
    from bridge.broker import BrokerStats, EmbeddedBroker

__all__ = ["DROP_REASONS", "BrokerEndpoint", "DropCounter", "families"]

log = logging.getLogger("bridge.broker")

#: Why the broker discarded a message it had accepted (label ``reason`` of
#: ``iotpipe_broker_dropped_messages_total``):
#:
#: * ``queue_full``: a disconnected persistent session's queue was at ``max_queued_messages``;
#:   the oldest message made room for the newest.
#: * ``session_expired``: a persistent session was forgotten after ``session_expiry`` seconds
#:   away, with the messages queued for it and those sent to it but never acknowledged.
#: * ``session_replaced``: a client connected with ``clean_session=1`` under the client id of a
#:   persistent session, which discards that session with its queue and in-flight messages.
DROP_REASONS: Final = ("queue_full", "session_expired", "session_replaced")

#: Past the first drop of a burst, one WARNING per this many drops of a reason.
LOG_EVERY: Final = 1000


class DropCounter:
    """Messages discarded by the broker, counted by reason and logged once per burst.

    A burst is what one event throws away: a session that expires or is replaced (one line for
    all its messages), or a queue that overflows while its client stays away (one line when the
    overflow starts, then one per :data:`LOG_EVERY` drops, DEBUG in between), so a subscriber that
    never returns costs a log line per thousand lost messages, not one each.

    Attributes:
        counts: drops so far per reason (every reason of :data:`DROP_REASONS`, zeros included).
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)

    def add(
        self, reason: str, count: int, client_id: str | None, *, burst: bool, **context: int
    ) -> None:
        """Count ``count`` messages dropped for ``client_id``, and log them if it is time to.

        Args:
            reason: one of :data:`DROP_REASONS`.
            count: messages dropped now (nothing happens for 0).
            client_id: whose messages they were.
            burst: this is the start of a burst (log it at WARNING).
            context: numbers for the log line (``limit=``, ``queued=``, ...).
        """
        if count <= 0:
            return
        before = self.counts[reason]
        total = before + count
        self.counts[reason] = total
        crossed = before // LOG_EVERY != total // LOG_EVERY
        extra = "".join(f" {key}={value}" for key, value in context.items())
        log.log(
            logging.WARNING if burst or crossed else logging.DEBUG,
            "broker messages dropped reason=%s client_id=%s dropped=%d dropped_total=%d%s",
            reason,
            client_id,
            count,
            total,
            extra,
        )


def families(stats: BrokerStats, max_queued_messages: int) -> list[Family]:
    """The broker's metric families (``iotpipe_broker_*``) from one :class:`BrokerStats`."""
    sessions = Family(
        "iotpipe_broker_sessions",
        "gauge",
        "sessions kept: connected, or persistent and waiting for their client",
        ("state",),
    )
    sessions.add(stats.connected_sessions, "connected")
    sessions.add(stats.disconnected_sessions, "disconnected")
    dropped = Family(
        "iotpipe_broker_dropped_messages",
        "counter",
        "accepted messages the broker discarded (queue_full, session_expired, session_replaced)",
        ("reason",),
    )
    for reason in DROP_REASONS:
        dropped.add(stats.dropped.get(reason, 0), reason)
    return [
        gauge("iotpipe_broker_connections", "open client connections", stats.connections),
        sessions,
        gauge(
            "iotpipe_broker_queued_messages",
            "messages queued for disconnected persistent sessions",
            stats.queued,
        ),
        gauge(
            "iotpipe_broker_inflight_messages",
            "QoS 1/2 messages sent to clients and not yet acknowledged",
            stats.inflight,
        ),
        gauge(
            "iotpipe_broker_max_queued_messages",
            "bound on the queue of one disconnected session (0 = none)",
            max_queued_messages,
        ),
        gauge("iotpipe_broker_retained_messages", "retained messages", stats.retained),
        counter(
            "iotpipe_broker_received_messages",
            "PUBLISH packets received from clients",
            stats.received,
        ),
        dropped,
        counter(
            "iotpipe_broker_refused_connections",
            "CONNECTs refused (credentials, will topic)",
            stats.refused_connections,
        ),
        counter(
            "iotpipe_broker_denied_publishes",
            "publishes the ACL denied (acknowledged, not forwarded)",
            stats.denied_publishes,
        ),
        counter(
            "iotpipe_broker_denied_subscribes",
            "subscriptions the ACL denied (SUBACK 0x80)",
            stats.denied_subscribes,
        ),
    ]


class BrokerEndpoint:
    """``/metrics`` and ``/healthz`` of an :class:`EmbeddedBroker` running on ``loop``.

    The listening socket is bound at construction, so a busy ``http_port`` is an error before the
    broker starts. ``/healthz`` answers 200 while the broker runs and its loop answers within
    ``timeout`` seconds.

    Args:
        broker: the broker (its ``settings`` say where to listen).
        loop: the event loop the broker runs on.
        timeout: seconds to wait for the loop to hand over the counters.

    Raises:
        ConfigError: ``http_host:http_port`` cannot be bound.
    """

    def __init__(
        self, broker: EmbeddedBroker, loop: asyncio.AbstractEventLoop, *, timeout: float = 1.5
    ) -> None:
        self._broker = broker
        self._loop = loop
        self._timeout = timeout
        settings = broker.settings
        self._server = HealthServer(
            settings.http_host, settings.http_port, self.exposition, self.health
        )

    @property
    def port(self) -> int:
        """The port actually bound (``http_port = 0`` picks a free one)."""
        return self._server.port

    @property
    def url(self) -> str:
        """The base URL of ``/metrics`` and ``/healthz``."""
        return f"http://{self._broker.settings.http_host}:{self.port}"

    def start(self) -> BrokerEndpoint:
        """Serve in the background."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.stop()

    def read(self) -> BrokerStats | None:
        """The broker's counters, read on its loop; None if it is not running or did not answer."""
        if not self._broker.running or self._loop.is_closed():
            return None

        async def _read() -> BrokerStats:
            return self._broker.stats

        try:
            future = asyncio.run_coroutine_threadsafe(_read(), self._loop)
        except RuntimeError:  # the loop closed meanwhile
            return None
        try:
            return future.result(self._timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            log.warning("broker loop did not answer /metrics within %.1f s", self._timeout)
            return None
        except concurrent.futures.CancelledError:  # the loop stopped with the read pending
            return None

    def exposition(self) -> tuple[str, bytes]:
        """The ``/metrics`` answer (content type, body).

        Raises:
            RuntimeError: the broker is not running or its loop did not answer (HTTP 500).
        """
        stats = self.read()
        if stats is None:
            raise RuntimeError("the broker's counters could not be read")
        return CONTENT_TYPE, render(families(stats, self._broker.settings.max_queued_messages))

    def health(self) -> tuple[bool, Mapping[str, Any]]:
        """The ``/healthz`` answer: healthy while the broker serves and its loop answers."""
        stats = self.read()
        if stats is None:
            state = "running, not answering" if self._broker.running else "stopped"
            return False, {"mqtt": state}
        return True, {"mqtt": self._broker.settings.url}
