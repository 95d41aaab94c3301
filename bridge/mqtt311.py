"""Where amqtt 0.12 departs from MQTT 3.1.1, and the corrections ``iotpipe broker`` applies.

Each correction is a small override of one amqtt method, named after the normative statement it
restores, so it can be dropped again once amqtt fixes the behaviour upstream. ``docs/broker.md``
has the table (deviation, statement, correction, test); the tests live in
``tests/bridge/test_mqtt311.py``, one per statement, with real paho clients.

* **Keep alive** (MQTT-3.1.2-24): amqtt notices a silent client but does nothing about it, so a
  device that lost power or coverage stays "connected" forever and its will is never published.
  :meth:`Mqtt311Handler.handle_read_timeout` ends the connection after 1.5 times the keep-alive.
* **Redelivery** (MQTT-4.4.0-1): amqtt forgets an outgoing QoS 1/2 message when its subscriber
  disconnects before acknowledging it, and after a hard-coded 5 s without PUBACK. Here a message
  stays in ``session.inflight_out`` until it is acknowledged and is resent (``dup=1``, same packet
  id, in order) when a persistent session reconnects.
* **Retained flag on queued messages** (MQTT-3.3.1-9): amqtt delivers messages queued for an
  offline session with ``retain=1``; here they arrive with ``retain=0``.
* **Retained messages on reconnect** (MQTT-3.3.1-6): amqtt sends every connecting client the
  retained messages matching *any* client's filters, at QoS 0; retained messages are sent only
  for a new subscription, as the standard says.
* **Delivery QoS** (MQTT-3.3.5-1): amqtt delivers at the subscription's QoS (a QoS 0 publish
  reaches a QoS 1 subscriber as QoS 1, and is queued for it while it is away) and once per
  matching filter. Here each client gets one copy at min(publish QoS, highest QoS of its matching
  subscriptions).

Waiting for acknowledgements never blocks a client's own packet loop (amqtt awaited every queued
and retained delivery before reading the client's next SUBSCRIBE or PUBLISH). At most
``max_inflight_messages`` QoS 1/2 messages are in flight to one client (amqtt: no limit, so a
subscriber that dropped its connection got every one of thousands back as a duplicate); the rest
wait in the session's queue, bounded by ``max_queued_messages``, and follow as acknowledgements
come in.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, ClassVar

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError, ProtocolHandlerError
from amqtt.events import BrokerEvents, MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.packet import (
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.session import (
    OUTGOING,
    ApplicationMessage,
    IncomingApplicationMessage,
    OutgoingApplicationMessage,
)
from transitions import MachineError

if TYPE_CHECKING:
    from amqtt.adapters import ReaderAdapter, WriterAdapter
    from amqtt.broker import Server
    from amqtt.session import Session

log = logging.getLogger(__name__)

__all__ = ["FORWARD_BACKLOG", "KEEPALIVE_GRACE", "Mqtt311Broker", "Mqtt311Handler"]

#: A client silent for this many times its keep-alive is disconnected (MQTT-3.1.2-24).
KEEPALIVE_GRACE = 1.5

#: Messages a client published and the broker acknowledged but has not forwarded yet, at most.
FORWARD_BACKLOG = 256


def _spawn(coro: Coroutine[Any, Any, Any], tasks: set[asyncio.Task[Any]]) -> None:
    """Run ``coro`` in the background, keeping a reference until it ends (its errors are logged)."""
    task = asyncio.ensure_future(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.warning("broker delivery failed error=%r", error)


class Mqtt311Handler(BrokerProtocolHandler):  # type: ignore[misc]  # amqtt ships no type hints
    """amqtt's broker-side protocol handler with MQTT 3.1.1's keep-alive and redelivery rules."""

    #: Connections ended for a silent client (class-wide: one broker per process in
    #: production; tests read differences).
    keepalive_timeouts = 0

    #: QoS 1/2 messages sent to this client and not acknowledged yet, at most (the broker sets
    #: it from ``max_inflight_messages``); the rest wait in the session's queue, in order.
    window = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flows: set[asyncio.Task[Any]] = set()

    # -- sending: an in-flight window, then the session's queue -------------------------------

    def has_room(self) -> bool:
        """Whether a new QoS 1/2 message may be sent now (the window is open, nothing waits)."""
        session = self.session
        return (
            session is not None
            and len(session.inflight_out) < self.window
            and session.retained_messages.empty()
        )

    def deliver(self, topic: str, data: bytes | bytearray, qos: int, retain: bool) -> None:
        """Send a message now; a QoS 1/2 one is in flight (and kept with the session) at once."""
        session = self.session
        if session is None:
            return
        packet_id = session.next_packet_id if qos else None
        message = OutgoingApplicationMessage(packet_id, topic, qos, data, retain)
        if packet_id is not None:
            session.inflight_out[packet_id] = message
        if qos == QOS_1 and self.writer is not None:
            self._publish_qos1(session, message)
        else:
            _spawn(self._handle_message_flow(message), self._flows)

    def _publish_qos1(self, session: Session, message: OutgoingApplicationMessage) -> None:
        """Write a QoS 1 PUBLISH at once, no task: its PUBACK completes it (:meth:`_acknowledged`).

        The hot path of a subscriber (the bridge): amqtt spent a task, a ``wait_for`` and a
        write lock on every delivery. The in-flight window bounds what is written unacknowledged.
        """
        packet_id = message.packet_id
        if packet_id is None or self.writer is None:
            raise ValueError("QoS 1 delivery without a packet id or a connection")
        packet = message.build_publish_packet(dup=message.publish_packet is not None)
        message.publish_packet = packet
        waiter: asyncio.Future[PubackPacket] = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        waiter.add_done_callback(functools.partial(self._acknowledged, session, message))
        self.writer.write(packet.to_bytes())

    def _acknowledged(
        self,
        session: Session,
        message: OutgoingApplicationMessage,
        waiter: asyncio.Future[PubackPacket],
    ) -> None:
        packet_id = message.packet_id
        if self._puback_waiters.get(packet_id) is waiter:
            del self._puback_waiters[packet_id]
        if waiter.cancelled():
            return  # the connection ended: the message stays in flight for the next one
        message.puback_packet = waiter.result()
        session.inflight_out.pop(packet_id, None)
        self.refill()

    def refill(self) -> None:
        """Send queued messages, oldest first, while the in-flight window has room."""
        session = self.session
        if session is None or session.transitions.state != "connected":
            return
        queue = session.retained_messages
        while len(session.inflight_out) < self.window and not queue.empty():
            queued = queue.get_nowait()
            self.deliver(queued.topic, queued.data, queued.qos or 0, False)

    def _init_session(self, session: Session) -> None:
        super()._init_session(session)
        # Bounded: a PUBLISH is acknowledged once it is in this queue, so the queue is how far
        # acknowledgements may run ahead of forwarding. A fast publisher now waits (its next
        # packet is read when there is room) instead of growing the broker's memory, and a
        # stopping broker has at most this many acknowledged messages left to forward.
        if session.delivered_message_queue.maxsize == 0 and session.delivered_message_queue.empty():
            session.delivered_message_queue = asyncio.Queue(maxsize=FORWARD_BACKLOG)
        # amqtt re-arms a no-op "write timeout" timer after every packet sent; the broker has no
        # use for it. The keep-alive is watched by _watch_keepalive instead.
        self.keepalive_timeout = None

    # -- the packet loop ----------------------------------------------------------------------

    async def _reader_loop(self) -> None:
        """Read packets until the connection ends; handle each in order, in line.

        amqtt started one task per packet and cancelled the unstarted ones when the connection
        ended, so a PUBACK, a QoS 0/1 PUBLISH or a PUBREL arriving together with the
        DISCONNECT (``mosquitto_pub`` does exactly that) was silently ignored: the message was
        resent, or lost after its PUBACK. Only a QoS 2 PUBLISH, which waits for its PUBREL, gets
        a task of its own. The keep-alive is a timer, not a ``wait_for`` around every read.
        """
        session, reader, ready = self.session, self.reader, self._reader_ready
        if session is None or reader is None or ready is None:
            raise ProtocolHandlerError("handler is not attached")
        loop = asyncio.get_running_loop()
        self._last_read = loop.time()
        if session.keep_alive > 0:
            self._keepalive_timer = loop.call_later(session.keep_alive, self._watch_keepalive)
        ready.set()
        try:
            while True:
                header = await MQTTFixedHeader.from_stream(reader)
                if header is None:
                    break  # end of file
                self._last_read = loop.time()
                kind = header.packet_type
                packet = await packet_class(header).from_stream(reader, fixed_header=header)
                await self.plugins_manager.fire_event(
                    MQTTEvents.PACKET_RECEIVED, packet=packet, session=session
                )
                if not await self._handle_packet(kind, packet):
                    break
        except asyncio.CancelledError:
            pass
        except (AMQTTError, MQTTError, NoDataError, OSError) as err:
            log.info("broker connection ended client_id=%s error=%r", session.client_id, err)
        finally:
            if self._keepalive_timer is not None:
                self._keepalive_timer.cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    async def _handle_packet(self, kind: int, packet: Any) -> bool:
        """Act on one packet; False if the connection must end."""
        if kind == PUBACK:
            _resolve(self._puback_waiters, _packet_id(packet), packet)
        elif kind == PUBREC:
            _resolve(self._pubrec_waiters, _packet_id(packet), packet)
        elif kind == PUBCOMP:
            _resolve(self._pubcomp_waiters, _packet_id(packet), packet)
        elif kind == PUBLISH and packet.qos == QOS_2:
            _spawn(self.handle_publish(packet), self._flows)  # waits for its PUBREL
        elif kind in self._IN_LINE:
            await getattr(self, self._IN_LINE[kind])(packet)
        else:
            log.warning(
                "broker unexpected packet type=%d client_id=%s: closing the connection",
                kind,
                self.session.client_id if self.session else None,
            )
            return False
        return True

    _IN_LINE: ClassVar[dict[int, str]] = {
        PUBLISH: "handle_publish",
        SUBSCRIBE: "handle_subscribe",
        UNSUBSCRIBE: "handle_unsubscribe",
        PUBREL: "handle_pubrel",
        PINGREQ: "handle_pingreq",
        DISCONNECT: "handle_disconnect",
        CONNECT: "handle_connect",
    }

    # -- MQTT-3.1.2-24: keep alive -----------------------------------------------------------

    _last_read = 0.0
    _keepalive_timer: asyncio.TimerHandle | None = None

    def _watch_keepalive(self) -> None:
        session = self.session
        if session is None:
            return
        loop = asyncio.get_running_loop()
        silent = loop.time() - self._last_read
        if silent >= session.keep_alive:
            self.handle_read_timeout()
        else:
            self._keepalive_timer = loop.call_later(
                session.keep_alive - silent, self._watch_keepalive
            )

    def handle_read_timeout(self) -> None:
        """Nothing arrived for 1.5x the keep-alive: end the connection as a network failure would.

        The reader then sees end-of-file, and the broker treats the client as gone without a
        DISCONNECT: its will is published.
        """
        session, reader = self.session, self.reader
        if session is None or reader is None:
            return
        Mqtt311Handler.keepalive_timeouts += 1
        log.info(
            "broker keep-alive expired client_id=%s keep_alive=%ss",
            session.client_id,
            session.keep_alive,
        )
        reader.feed_eof()

    # -- MQTT-4.4.0-1: redelivery ------------------------------------------------------------

    async def _retry_deliveries(self) -> None:
        """Resend, in order, every QoS 1/2 message this session has not had acknowledged.

        Called by amqtt when a connection starts. The resends are queued on the connection in
        order; their acknowledgements are awaited in the background (amqtt waited for all of
        them, up to 10 s, before the session could do anything else).
        """
        session = self.session
        if session is None:
            return
        pending = list(session.inflight_out.values())
        if pending:
            log.info(
                "broker redelivering client_id=%s messages=%d", session.client_id, len(pending)
            )
        for message in pending:
            if message.qos == QOS_1 and self.writer is not None:
                self._publish_qos1(session, message)  # written now: before anything queued
            else:
                _spawn(self._handle_message_flow(message), self._flows)
        # Incoming QoS 2 messages waiting for PUBREL: the client resends PUBREL (or the PUBLISH),
        # see handle_pubrel.

    async def _handle_qos0_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        if app_message.direction == OUTGOING or self.session is None:
            await super()._handle_qos0_message_flow(app_message)
            return
        # amqtt discards a QoS 0 message when the forwarding queue is full; wait for room.
        packet = app_message.publish_packet
        if packet is not None and packet.dup_flag:
            log.warning("broker QoS 0 PUBLISH with DUP=1 ignored (MQTT-3.3.1-2)")
            return
        await self.session.delivered_message_queue.put(app_message)

    async def _handle_qos1_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        if app_message.direction != OUTGOING:
            await super()._handle_qos1_message_flow(app_message)
            return
        session = self.session
        packet_id = app_message.packet_id
        if session is None or packet_id is None:
            raise ValueError("QoS 1 delivery without a session or packet id")
        session.inflight_out[packet_id] = app_message
        retry = app_message.publish_packet is not None
        packet = app_message.build_publish_packet(dup=retry)
        app_message.publish_packet = packet
        waiter: asyncio.Future[PubackPacket] = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            await self._send_packet(packet)
            app_message.puback_packet = await waiter
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            return  # the connection ended: the message stays in flight for the next one
        finally:
            if self._puback_waiters.get(packet_id) is waiter:
                del self._puback_waiters[packet_id]
        session.inflight_out.pop(packet_id, None)
        self.refill()

    async def _handle_qos2_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage
    ) -> None:
        if app_message.direction != OUTGOING:
            await super()._handle_qos2_message_flow(app_message)
            return
        session = self.session
        packet_id = app_message.packet_id
        if session is None or packet_id is None:
            raise ValueError("QoS 2 delivery without a session or packet id")
        session.inflight_out[packet_id] = app_message
        try:
            if app_message.pubrec_packet is None:
                packet = app_message.build_publish_packet(
                    dup=app_message.publish_packet is not None
                )
                app_message.publish_packet = packet
                app_message.pubrec_packet = await self._exchange(
                    packet, packet_id, self._pubrec_waiters
                )
            # PUBREC received: from now on only PUBREL is (re)sent, never the PUBLISH again.
            app_message.pubrel_packet = PubrelPacket.build(packet_id)
            app_message.pubcomp_packet = await self._exchange(
                app_message.pubrel_packet, packet_id, self._pubcomp_waiters
            )
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            return  # the connection ended: the message stays in flight for the next one
        session.inflight_out.pop(packet_id, None)
        self.refill()

    async def _exchange(
        self, packet: Any, packet_id: int, waiters: dict[int, asyncio.Future[Any]]
    ) -> Any:
        """Send ``packet`` and wait, without a time limit, for the answer with ``packet_id``."""
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiters[packet_id] = waiter
        try:
            await self._send_packet(packet)
            return await waiter
        finally:
            if waiters.get(packet_id) is waiter:
                del waiters[packet_id]

    async def handle_pubrel(self, pubrel: PubrelPacket) -> None:
        """Complete an incoming QoS 2 message whose PUBREL arrives on a later connection.

        amqtt only knows PUBRELs it waits for on the current connection; a client resending a
        PUBREL after reconnecting never got its PUBCOMP and retried forever.
        """
        packet_id = pubrel.packet_id
        if packet_id in self._pubrel_waiters or self.session is None:
            await super().handle_pubrel(pubrel)
            return
        message = self.session.inflight_in.pop(packet_id, None)
        if message is not None:
            await self.session.delivered_message_queue.put(message)
        await self._send_packet(PubcompPacket.build(packet_id))

    async def stop(self) -> None:
        """Stop the connection; deliveries still waiting for acknowledgements end with it.

        The socket is closed even when the peer is already gone: amqtt's writer close flushes
        first and, when that fails (connection reset), never closes the transport, leaking one
        file descriptor per vanished client until a garbage collection finds it.
        """
        writer = self.writer
        await super().stop()
        for task in list(self._flows):
            task.cancel()
        stream = getattr(
            writer, "_writer", None
        )  # amqtt's StreamWriterAdapter wraps a StreamWriter
        if isinstance(stream, asyncio.StreamWriter) and not stream.is_closing():
            stream.close()


def _end_connection(handler: BrokerProtocolHandler) -> None:
    """End a connection that broke the protocol, as if the network had failed (the will is sent)."""
    if handler.reader is not None:
        handler.reader.feed_eof()


def _packet_id(packet: Any) -> int:
    header = packet.variable_header
    return int(header.packet_id) if header is not None else -1


def _resolve(waiters: dict[int, asyncio.Future[Any]], packet_id: int, packet: Any) -> None:
    """Hand an acknowledgement to the delivery waiting for it (unknown ones are ignored)."""
    waiter = waiters.get(packet_id)
    if waiter is None or waiter.done():
        log.debug("broker acknowledgement for no pending delivery packet_id=%d", packet_id)
        return
    waiter.set_result(packet)


def _being_cancelled() -> bool:
    """Whether the running task itself is being cancelled (not just a future it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Mqtt311Broker(Broker):  # type: ignore[misc]  # amqtt ships no type hints
    """amqtt's Broker with MQTT 3.1.1's rules for retained messages, queued messages and QoS."""

    handler_class: type[BrokerProtocolHandler] = Mqtt311Handler
    #: In-flight window per client (``max_inflight_messages``), given to each connection.
    max_inflight = 100

    async def _handle_client_session(  # noqa: PLR0917  # amqtt's signature
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Server,
        listener_name: str,
    ) -> None:
        """amqtt 0.12's connection lifecycle, without replaying retained messages on connect.

        amqtt sent every connecting client, at QoS 0, each retained message matching any filter
        that any client had subscribed to; MQTT-3.3.1-6 sends retained messages only when a
        subscription is made (a reconnecting persistent session already has them).
        """
        del server
        authenticated = await self._authenticate(
            client_session, self.listeners_config[listener_name]
        )
        if client_session.client_id is None:
            raise ValueError("client id was not set")
        await self._take_over(client_session)
        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)
        await handler.mqtt_connack_authorize(authenticated)
        if not authenticated:
            await writer.close()
            return
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED,
            client_id=client_session.client_id,
            client_session=client_session,
        )
        if isinstance(handler, Mqtt311Handler):
            handler.window = self.max_inflight
        await handler.start()  # resends what is in flight (Mqtt311Handler._retry_deliveries)
        await self._publish_session_retained_messages(client_session)
        await self._client_message_loop(client_session, handler)

    async def _take_over(self, client_session: Session) -> None:
        """Mark the session connected; a second connection with its client id replaces the first."""
        try:
            client_session.transitions.connect()
        except MachineError:
            if not client_session.transitions.is_connected():
                raise
            log.info("broker session take-over client_id=%s", client_session.client_id)
            old = self._sessions[client_session.client_id][1]
            await old.handle_connection_closed()
            await old.stop()

    async def _broadcast_loop(self) -> None:
        """Distribute published messages, one after the other, until the broker stops.

        amqtt wrapped every message in a task and an ``asyncio.wait`` against its shutdown
        future; :meth:`_shutdown_broadcast_loop` cancels this loop instead.
        """
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                try:
                    await self._run_broadcast(None)
                except Exception as err:  # one bad message must not stop the broker
                    log.error("broker broadcast failed error=%r", err)

    async def _shutdown_broadcast_loop(self) -> None:
        task = self._broadcast_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if not self._broadcast_queue.empty():
            log.warning(
                "broker stopped with %d messages not distributed", self._broadcast_queue.qsize()
            )

    async def _client_message_loop(self, session: Session, handler: BrokerProtocolHandler) -> None:
        """Forward what the client publishes, apply its (un)subscriptions, until it goes.

        amqtt's loop, except that everything the client published before it went is forwarded
        before the session ends (amqtt could leave acknowledged messages unforwarded in the
        session's queue), and that messages already waiting are forwarded in one go rather than
        one wait per message.
        """
        disconnect = asyncio.ensure_future(handler.wait_disconnect())
        subscribe = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        try:
            while True:
                done, _ = await asyncio.wait(
                    (disconnect, subscribe, unsubscribe, deliver),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if deliver in done:
                    if not await self._forward(session, handler, deliver.result()):
                        _end_connection(handler)
                    deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
                if subscribe in done:
                    await self._handle_subscription(session, handler, subscribe)
                    subscribe = asyncio.ensure_future(handler.get_next_pending_subscription())
                if unsubscribe in done:
                    await self._handle_unsubscription(session, handler, unsubscribe)
                    unsubscribe = asyncio.ensure_future(handler.get_next_pending_unsubscription())
                if disconnect in done:
                    last = deliver.result() if deliver.done() else None
                    deliver.cancel()
                    await self._forward(session, handler, last)
                    await self._handle_disconnect(session, handler, disconnect)
                    return
        except asyncio.CancelledError:
            pass
        finally:
            for waiter in (disconnect, subscribe, unsubscribe, deliver):
                waiter.cancel()
            await asyncio.gather(
                disconnect, subscribe, unsubscribe, deliver, return_exceptions=True
            )

    async def _handle_disconnect(
        self, session: Session, handler: BrokerProtocolHandler, waiter: asyncio.Future[Any]
    ) -> None:
        """End a connection; the session goes offline only if this was its current connection.

        When a client reconnects before the broker has finished with its previous connection
        (MQTT-3.1.4-2, take-over), amqtt marked the session disconnected once the old one ended,
        under the new one's feet: live messages were then queued and never delivered.
        """
        current = self._sessions.get(session.client_id, (None, None))[1]
        if current is not None and current is not handler:
            await self._stop_handler(handler)
            return
        await super()._handle_disconnect(session, handler, waiter)

    async def _forward(
        self, session: Session, handler: BrokerProtocolHandler, first: ApplicationMessage | None
    ) -> bool:
        """Forward ``first`` and every message already waiting in the session's queue.

        Returns False if a message broke the protocol (the connection must end).
        """
        queue = session.delivered_message_queue
        message = first
        while True:
            if message is not None and not await self._accept(session, message):
                return False
            if queue.empty():
                return True
            message = queue.get_nowait()

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Send what was queued while the session was away: in order, ``retain=0`` (MQTT-3.3.1-9).

        As many as the in-flight window allows at once, the rest as acknowledgements come in.
        Each message sent is in flight with the session at once, so a disconnect before its
        acknowledgement keeps it for the next connection (MQTT-4.4.0-1).
        """
        handler = self._get_handler(session)
        if isinstance(handler, Mqtt311Handler):
            handler.refill()

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Send the retained messages matching a new subscription, at min(retained, granted) QoS."""
        handler = self._get_handler(session)
        if not isinstance(handler, Mqtt311Handler):
            return
        topic_filter, granted = subscription
        for topic, retained in list(self._retained_messages.items()):
            if self._matches(topic, topic_filter):
                qos = min(granted, retained.qos if retained.qos is not None else granted)
                handler.deliver(topic, retained.data, qos, True)

    async def _handle_message_delivery(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        wait_deliver: asyncio.Future[Any],
    ) -> bool:
        """amqtt's entry point for one received PUBLISH (see :meth:`_accept`)."""
        del handler
        return await self._accept(client_session, wait_deliver.result())

    async def _accept(self, client_session: Session, message: ApplicationMessage | None) -> bool:
        """amqtt's checks for an incoming PUBLISH, then a broadcast that knows the publish QoS.

        Returns False if the message broke the protocol (the connection must end).
        """
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_RECEIVED, client_id=client_session.client_id, message=message
        )
        if message is None:
            return True
        topic = message.topic
        if not topic or "#" in topic or "+" in topic or topic.startswith("$"):
            # MQTT-4.7.3-1, MQTT-3.3.2-2, MQTT-4.7.2-1: amqtt's rules, unchanged.
            log.warning(
                "broker invalid topic from client_id=%s topic=%r: closing the connection",
                client_session.client_id,
                topic,
            )
            return False
        if not await self._topic_filtering(client_session, topic=topic, action=Action.PUBLISH):
            return True
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_BROADCAST, client_id=client_session.client_id, message=message
        )
        await self._broadcast_message(client_session, topic, message.data, message.qos)
        if message.publish_packet is not None and message.publish_packet.retain_flag:
            await self.retain_message(client_session, topic, message.data, message.qos)
        return True

    async def _run_broadcast(self, running_tasks: Any) -> None:
        """Deliver one message: one copy per client, at min(publish QoS, best matching QoS)."""
        del running_tasks
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        published = broadcast.get("qos")
        targets: dict[str, tuple[Session, int]] = {}
        for topic_filter, subscriptions in self._subscriptions.items():
            if not self._matches(topic, topic_filter):
                continue
            for session, granted in subscriptions:
                best = targets.get(session.client_id)
                if best is None or granted > best[1]:
                    targets[session.client_id] = (session, granted)
        for session, granted in targets.values():
            qos = granted if published is None else min(published, granted)
            if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                continue
            if session.transitions.state != "connected":
                # MQTT-3.1.2-5: queue QoS 1/2 messages for an absent persistent session.
                if not session.clean_session and qos in (QOS_1, QOS_2) and not session.is_anonymous:
                    await self._retain_broadcast_message(broadcast, qos, session)
                continue
            handler = self._get_handler(session)
            if not isinstance(handler, Mqtt311Handler):
                continue
            if qos == 0 or handler.has_room():
                handler.deliver(topic, broadcast["data"], qos, False)
            else:  # the window is full: wait in the session's queue, in order (and bounded)
                await self._retain_broadcast_message(broadcast, qos, session)
                handler.refill()
