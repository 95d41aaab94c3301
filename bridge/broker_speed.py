"""Per-packet costs of amqtt 0.12 that the embedded broker trims, without changing what it does.

Measured with ``bench/bench_broker.py`` (QoS 1, one publisher, one subscriber; its ``--profile``
shows where the time goes); each change is kept because it raised the throughput there:

* **Fewer, larger sends.** amqtt writes every packet with its own ``transport.write``, i.e. one
  ``send()`` system call per PUBACK and per PUBLISH, each waking the client up; on this kind of
  machine those calls were the largest single cost of the broker. A :class:`CoalescingWriter`
  gathers what a connection's packets write, and a :class:`Flusher` (one per event loop) hands
  every connection's bytes to its transport in one ``write`` once the loop has nothing else
  ready to run, and at the latest :data:`MAX_DELAY` seconds after the first gathered write. Same
  bytes, same order per connection, sooner on an idle broker than a busy one; a busy broker
  sends several packets per system call. Back-pressure is kept: ``drain()`` hands the bytes
  over at once beyond :data:`FLUSH_BYTES` and waits on the transport as amqtt's adapter does.
* **Topic checks without a task per plugin.** amqtt asks topic plugins through
  ``PluginManager.map_plugin_topic``, which wraps each call in a task and gathers them, for every
  PUBLISH and again for every delivery, even with no topic plugin at all.
  :class:`TrimmedBroker` answers "allowed" at once when no topic plugin is loaded and otherwise
  awaits each plugin directly (all of them, as amqtt does, so each still sees every check).

:class:`TrimmedBroker` is the base of ``bridge.broker._HardenedBroker``. Both overrides are
amqtt 0.12 internals (``Broker.stream_connected``, ``Broker._topic_filtering``); drop them once
amqtt does the same upstream.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.plugins.base import BaseTopicPlugin

if TYPE_CHECKING:
    from amqtt.contexts import Action
    from amqtt.session import Session

__all__ = ["FLUSH_BYTES", "MAX_DELAY", "CoalescingWriter", "Flusher", "TrimmedBroker"]

#: Bytes a connection may gather before ``drain()`` hands them to the transport at once (the
#: size of asyncio's default write-buffer high-water mark).
FLUSH_BYTES = 64 * 1024
#: Seconds gathered bytes may wait for the event loop to run out of other work.
MAX_DELAY = 0.002


class Flusher:
    """Hands the bytes of every waiting :class:`CoalescingWriter` of one event loop to their
    transports, once the loop has no other callback ready (or :data:`MAX_DELAY` has passed).

    "Nothing else ready" is read from the loop's ready queue (``BaseEventLoop._ready``, present
    in every CPython asyncio loop); a loop without one gets one flush per loop iteration.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready: Any = getattr(loop, "_ready", None)
        self._waiting: list[CoalescingWriter] = []
        self._deadline = 0.0

    def schedule(self, writer: CoalescingWriter) -> None:
        """Flush ``writer`` at the next quiet moment (called at its first gathered write)."""
        if not self._waiting:
            self._deadline = self._loop.time() + MAX_DELAY
            self._loop.call_soon(self._run)
        self._waiting.append(writer)

    def _run(self) -> None:
        # Anything still in the ready queue runs before the loop next polls its sockets, and
        # may write more: wait for it, one iteration at a time, up to the deadline.
        if self._ready and self._loop.time() < self._deadline:
            self._loop.call_soon(self._run)
            return
        waiting, self._waiting = self._waiting, []
        for writer in waiting:
            writer.flush()


class CoalescingWriter(StreamWriterAdapter):  # type: ignore[misc]  # amqtt ships no type hints
    """amqtt's stream writer adapter, but writes are gathered and leave together (see
    :class:`Flusher`)."""

    def __init__(self, writer: asyncio.StreamWriter, flusher: Flusher) -> None:
        super().__init__(writer)
        self._stream = writer
        self._flusher = flusher
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def write(self, data: bytes) -> None:
        """Gather ``data``; the first write since the last flush asks the flusher for one."""
        if self.is_closed:
            return
        if not self._pending:
            self._flusher.schedule(self)
        self._pending.append(data)
        self._pending_bytes += len(data)

    def flush(self) -> None:
        """Hand everything gathered so far to the transport, in order, in one write."""
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        self._stream.write(data)

    async def drain(self) -> None:
        """Wait as amqtt's adapter does (raising if the connection is lost); past
        :data:`FLUSH_BYTES` gathered, flush first so the transport's flow control sees them."""
        if self.is_closed:
            return
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()
        await self._stream.drain()

    async def close(self) -> None:
        """Flush, then close as amqtt's adapter does."""
        if not self.is_closed:
            self.flush()
        await super().close()


class TrimmedBroker(Broker):  # type: ignore[misc]  # amqtt ships no type hints
    """amqtt's Broker with coalesced socket writes and direct topic-plugin calls (see above)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # amqtt loads every plugin in Broker.__init__ and never adds one later.
        self._iotpipe_topic_plugins = [
            plugin for plugin in self.plugins_manager.plugins if isinstance(plugin, BaseTopicPlugin)
        ]
        self._iotpipe_flusher: Flusher | None = None

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        """A TCP connection: as amqtt, with a :class:`CoalescingWriter`."""
        if self._iotpipe_flusher is None:
            self._iotpipe_flusher = Flusher(asyncio.get_running_loop())
        await self._client_connected(
            listener_name,
            StreamReaderAdapter(reader),
            CoalescingWriter(writer, self._iotpipe_flusher),
        )

    async def _topic_filtering(
        self, session: Session, topic: str, action: Action | None = None
    ) -> bool:
        allowed = True
        for plugin in self._iotpipe_topic_plugins:
            if not await plugin.topic_filtering(session=session, topic=topic, action=action):
                allowed = False
        return allowed
