"""systemd's readiness and watchdog for the central services, driven by their main loops.

A service owns a :class:`Liveness`: it calls :meth:`Liveness.ready` once it serves (the bridge
subscribed, the consumer consuming) and :meth:`Liveness.turn` on every turn of its main loop
(a deliberate long wait, such as a reconnect with backoff, goes in :meth:`Liveness.waiting`).
A :class:`Supervisor` thread turns that into ``sd_notify`` messages (:mod:`iotpipe.systemd_notify`):
``READY=1`` once ready, then ``WATCHDOG=1`` every half ``WatchdogSec=``, but only while the loop
turned within the last ``WatchdogSec=``. A loop stuck in a call that never returns stops the pings
and systemd kills and restarts the service; a thread that merely lives on does not hide it.

Outside systemd (no ``$NOTIFY_SOCKET``) the supervisor does nothing and starts no thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from iotpipe.systemd_notify import Notifier

__all__ = ["Liveness", "Supervisor"]

log = logging.getLogger(__name__)

#: How often the supervisor looks for readiness before the service is ready.
_READY_POLL_S = 0.05


class Liveness:
    """What a service's main loop tells its watchdog: ready yet, and when it last turned."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.last_turn = time.monotonic()
        self._waits = 0

    def ready(self) -> None:
        """The service serves from now on."""
        self.turn()
        self.started.set()

    def turn(self) -> None:
        """The main loop went round once more (cheap: call it every turn)."""
        self.last_turn = time.monotonic()

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """A deliberate long wait (a broker's outage, a store's backoff): not a stall."""
        self._waits += 1
        try:
            yield
        finally:
            self._waits -= 1
            self.turn()

    def stalled_for(self) -> float:
        """Seconds since the last turn; 0 during a :meth:`waiting` block."""
        return 0.0 if self._waits else time.monotonic() - self.last_turn


class Supervisor:
    """Sends ``READY=1``, then ``WATCHDOG=1`` while ``liveness`` keeps turning, from a thread.

    Args:
        liveness: the service's.
        name: the service's name, for the thread and the ``STATUS=`` line.
        notifier: where the messages go (default: ``$NOTIFY_SOCKET``).
    """

    def __init__(self, liveness: Liveness, name: str, notifier: Notifier | None = None) -> None:
        self.liveness = liveness
        self.name = name
        self.notifier = notifier if notifier is not None else Notifier()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Supervisor:
        """Start the thread, if systemd listens."""
        if self.notifier.enabled:
            self._thread = threading.Thread(
                target=self._run, name=f"{self.name}-sd-notify", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Send ``STOPPING=1`` (once) and end the thread (safe from a signal handler)."""
        if not self._stop.is_set():
            self._stop.set()
            self.notifier.stopping()

    def join(self, timeout: float = 1.0) -> None:
        """Wait for the thread to end, then close the socket."""
        if self._thread is not None:
            self._thread.join(timeout)
        self.notifier.close()

    def _run(self) -> None:
        while not self.liveness.started.wait(_READY_POLL_S):
            if self._stop.is_set():
                return
        if self._stop.is_set():
            return
        self.notifier.ready(f"{self.name} running")
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        limit = 2 * interval  # WatchdogSec=
        warned = False
        while not self._stop.wait(interval):
            stalled = self.liveness.stalled_for()
            if stalled < limit:
                self.notifier.watchdog()
                warned = False
            elif not warned:
                log.error(
                    "%s main loop stalled for %.1fs: no watchdog ping, systemd will restart it",
                    self.name,
                    stalled,
                )
                warned = True
