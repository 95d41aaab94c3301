"""MQTT transport: the only module that talks to paho-mqtt.

:class:`MqttClient` wraps one paho client driven from the caller's own thread (``pump()``): on
this machine an inline network loop publishes ~50% faster than paho's background thread, and it
keeps every callback on one thread. Publishing is windowed: at most ``max_inflight`` QoS>0
messages are unacknowledged at any time, so paho's 16-bit message-id space (65,535) is never
exhausted, and every ``publish()`` result is checked: nothing is dropped silently.

Under paho sits a buffered socket (one ``recv()`` for every packet the kernel holds; the PUBACKs
of one pass of the bridge's loop sent in one ``send()``). It replaces a private attribute of
paho (see :mod:`iotpipe.compat`), verified against paho-mqtt 2.2.0 only (pinned exactly); where
it cannot be installed the client falls back to paho's own loop. With it in place, two paths
skip paho's per-packet machinery, each leaving paho's state as paho's own path would:

- reading: QoS 0/1 PUBLISH packets found whole in the buffer while paho is between packets are
  parsed here (:func:`_parse_publish`, held to paho's results by a test over arbitrary byte
  streams); paho reads every other packet, and everything where the hook is missing;
- acknowledging: a QoS 1 PUBACK (4 bytes, as paho writes them) goes to the socket directly
  whenever paho has nothing of its own waiting to be written, so the order of packets is kept.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from iotpipe import compat
from iotpipe.connection import MqttSettings, certificate_problem, tls_context
from iotpipe.errors import CertificateError, ConnectError, DeliveryError
from iotpipe.pacing import Backoff

log = logging.getLogger(__name__)

compat.check_version("paho-mqtt")  # one warning now if the hooks meet an unverified release

#: paho refuses publishes past this many unacknowledged QoS>0 messages.
PAHO_MAX_UNACKED = 65_535

#: paho results for which a QoS>0 message is in paho's queue and will be (re)sent.
_QUEUED_OK = (
    MQTTErrorCode.MQTT_ERR_SUCCESS,
    MQTTErrorCode.MQTT_ERR_NO_CONN,
    MQTTErrorCode.MQTT_ERR_CONN_LOST,
)


class Message(NamedTuple):
    """One MQTT message as received (or to be sent)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    dup: bool = False
    mid: int = 0


class Will(NamedTuple):
    """A last-will message the broker publishes if we vanish."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


MessageHandler = Callable[[Message], object]


class Subscriber(Protocol):
    """What a service that receives with manual acknowledgements needs of :class:`MqttClient`.

    The bridge's seam to its MQTT broker; :class:`iotpipe.testing.MemorySubscriber` is the
    in-memory one. Messages reach the ``on_message`` handler the client was built with, from
    inside :meth:`pump`, on the caller's thread.
    """

    @property
    def connected(self) -> bool:
        """Whether the broker accepted our CONNECT and the link is up."""
        ...

    def connect(self, timeout: float = ...) -> None:
        """Connect and wait for the broker to accept us (raises ConnectError)."""

    def subscribe(self, filters: Iterable[tuple[str, int]], timeout: float = ...) -> list[int]:
        """Subscribe and wait for the SUBACK; the granted QoS per filter (raises ConnectError)."""
        ...

    def pump(self, timeout: float = ...) -> None:
        """Run the network loop once, delivering messages (raises ConnectError when lost)."""

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a received message (PUBACK)."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Publish one message (the bridge's ingest formats send commands, e.g. a rebirth)."""
        ...

    def reconnect(self, deadline: float) -> None:
        """Re-establish a lost connection before ``deadline`` (monotonic), or raise ConnectError."""

    def disconnect(self) -> None:
        """Disconnect cleanly."""


#: Builds the subscriber that hands each message to the given handler.
SubscriberFactory = Callable[[MessageHandler], Subscriber]

_READ_SIZE = 65536
#: A PUBACK: fixed header (type 4, no flags), remaining length 2, packet id.
_PUBACK = struct.Struct("!BBH")
_PUBACK_HEADER = 0x40


class _BufferedSocket:
    """The socket paho reads and writes, with a read buffer and corked writes.

    paho reads every packet in three or four ``recv()`` calls (command byte, length bytes, rest)
    and writes every packet, a 4-byte PUBACK too, with its own ``send()``: a system call each.
    Here one ``recv()`` fetches whatever the kernel holds and serves paho's small reads from
    memory; ``pending()`` (which paho already asks TLS sockets) tells how much is buffered. While
    corked, writes are collected and go out in one ``send()`` on :meth:`flush`.

    Errors of the real socket (``BlockingIOError``, TLS want-read/want-write, ``b""`` at EOF)
    reach paho unchanged, so paho's own handling of them still applies.
    """

    __slots__ = ("_in", "_inner_pending", "_out", "_pos", "_sock", "corked")

    def __init__(self, sock: socket.socket | ssl.SSLSocket) -> None:
        self._sock = sock
        # TLS sockets may hold decrypted bytes that select() cannot see; plain ones have none.
        self._inner_pending: Callable[[], int] | None = getattr(sock, "pending", None)
        self._in = b""
        self._pos = 0
        self._out = bytearray()
        self.corked = False

    def recv(self, bufsize: int) -> bytes:
        """At most ``bufsize`` bytes: from the buffer, else from one ``recv()`` of the socket."""
        if self._pos >= len(self._in):
            data = self._sock.recv(_READ_SIZE)
            if len(data) <= bufsize:
                return data  # all of it (b"" at EOF): nothing to keep
            self._in = data
            self._pos = 0
        start = self._pos
        self._pos = min(start + bufsize, len(self._in))
        return self._in[start : self._pos]

    def unread(self) -> tuple[bytes, int]:
        """The buffered bytes and the position of the first one not yet read."""
        return self._in, self._pos

    def skip_to(self, pos: int) -> None:
        """Mark the buffered bytes before ``pos`` as read (they were parsed elsewhere)."""
        self._pos = pos

    def pending(self) -> int:
        """Bytes readable without waiting: buffered here plus, for TLS, inside the SSL object."""
        inner = self._inner_pending() if self._inner_pending is not None else 0
        return len(self._in) - self._pos + inner

    def queue(self, data: bytes) -> None:
        """Append ``data`` to what goes out at the next :meth:`flush` (corking the socket)."""
        self.corked = True
        self._out += data

    def send(self, data: bytes | bytearray) -> int:
        """Send ``data``, or queue all of it while corked or while earlier bytes still wait."""
        if self.corked or self._out:
            self._out += data  # after what is still waiting, so the order is kept
            return len(data)
        return self._sock.send(data)

    @property
    def unsent(self) -> int:
        """Bytes queued and not yet handed to the kernel."""
        return len(self._out)

    def flush(self) -> None:
        """Uncork; send what was collected, as far as the socket takes it (the rest stays)."""
        self.corked = False
        out = self._out
        while out:
            try:
                sent = self._sock.send(out)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as err:
                # The connection is gone; paho notices on its next read and reports it. What
                # was queued is PUBACKs at most: the broker redelivers those messages.
                log.debug("mqtt send failed, dropping %d queued bytes: %s", len(out), err)
                out.clear()
                return
            del out[:sent]

    def close(self) -> None:
        """Send what is still queued (paho closes right after queueing DISCONNECT), then close."""
        if self._out:
            self.flush()
        if self._out:
            try:
                self._sock.settimeout(1.0)
                self._sock.sendall(self._out)
            except OSError as err:
                log.debug("mqtt close dropped %d queued bytes: %s", len(self._out), err)
            self._out.clear()
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def _install_buffer(client: paho.Client) -> _BufferedSocket | None:
    """Put a :class:`_BufferedSocket` under paho's freshly connected socket; None if we cannot.

    paho has no socket factory: this goes through paho's private ``_sock``
    (:func:`iotpipe.compat.replace_paho_socket`, verified against paho-mqtt 2.2.0). Fallback: the
    socket stays as paho made it and :meth:`MqttClient._loop` uses plain ``client.loop()``;
    slower, same behaviour.
    """
    raw = client.socket()
    if raw is None or isinstance(raw, _BufferedSocket):
        return raw
    return compat.replace_paho_socket(client, _BufferedSocket)


class MqttClient:
    """A paho client with a publish window, delivery accounting and blocking helpers.

    Not thread-safe: call every method from one thread, and call :meth:`pump` (or a method that
    waits, such as :meth:`flush`) often enough to keep the connection alive.

    Attributes:
        ack_timeout: how long a full window may go without any acknowledgement before
            :meth:`publish` gives up.
        published: QoS>0 messages handed to the broker (and all QoS 0 ones).
        acknowledged: QoS>0 messages the broker acknowledged (PUBACK / PUBCOMP).
        reconnects: how many times the connection was re-established.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str | None = None,
        clean_session: bool = True,
        will: Will | None = None,
        max_inflight: int = 1000,
        on_message: MessageHandler | None = None,
        manual_ack: bool = False,
        ack_timeout: float = 60.0,
    ) -> None:
        if not 1 <= max_inflight < PAHO_MAX_UNACKED:
            raise ValueError(f"max_inflight must be 1..{PAHO_MAX_UNACKED - 1}")
        self.settings = settings
        self.url = settings.broker
        self.client_id = client_id if client_id is not None else settings.client_id
        self.max_inflight = max_inflight
        self.ack_timeout = ack_timeout
        self.published = 0
        self.acknowledged = 0
        self.reconnects = 0
        self._inflight: set[int] = set()
        self._on_message = on_message
        self._manual_ack = manual_ack
        self._read_ahead = False
        self._connack: ReasonCode | None = None
        self._connected = False
        self._session_present = False
        self._closing = False
        self._subscriptions: list[tuple[str, int]] = []
        self._pending_subacks: dict[int, list[ReasonCode] | None] = {}

        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
            manual_ack=manual_ack,
        )
        # Our own window bounds what is in flight; paho must neither hold back nor refuse.
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)
        if self.url.username is not None:
            password = self.url.password.get_secret_value() if self.url.password else None
            client.username_pw_set(self.url.username, password)
        if self.url.tls:
            client.tls_set_context(tls_context(settings.tls, "mqtt.tls"))
            client.tls_insecure_set(settings.tls.insecure)
        if will is not None:
            client.will_set(will.topic, will.payload, will.qos, will.retain)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_publish = self._handle_publish
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        # An ASCII host resolved as bytes: the 'idna' codec stays unloaded (iotpipe.compat).
        if not compat.connect_paho_by_bytes(client):
            log.debug("mqtt host resolved by paho's own connection url=%s", self.url)
        self._client = client

    # -- callbacks (run inside pump()) --------------------------------------------------------

    def _handle_connect(
        self,
        _client: paho.Client,
        _userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        _properties: object,
    ) -> None:
        self._connack = reason
        self._connected = not reason.is_failure
        self._session_present = bool(flags.session_present)

    def _handle_disconnect(
        self,
        _client: paho.Client,
        _userdata: object,
        _flags: object,
        reason: ReasonCode,
        _properties: object,
    ) -> None:
        if self._connected and not self._closing:
            log.warning("mqtt disconnected url=%s reason=%s", self.url, reason)
        self._connected = False

    def _handle_publish(
        self, _client: paho.Client, _userdata: object, mid: int, _reason: ReasonCode, _props: object
    ) -> None:
        if mid in self._inflight:
            self._inflight.discard(mid)
            self.acknowledged += 1

    def _handle_message(
        self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage
    ) -> None:
        if self._on_message is not None:
            self._on_message(
                Message(
                    msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), bool(msg.dup), msg.mid
                )
            )

    def _handle_subscribe(
        self,
        _client: paho.Client,
        _userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        _properties: object,
    ) -> None:
        if mid in self._pending_subacks:
            self._pending_subacks[mid] = reasons

    # -- connection ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the broker accepted our CONNECT and the link is up."""
        return self._connected

    @property
    def session_present(self) -> bool:
        """Whether the broker kept our persistent session from a previous connection."""
        return self._session_present

    @property
    def unacknowledged(self) -> int:
        """QoS>0 messages published and not yet acknowledged."""
        return len(self._inflight)

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and wait for the broker's CONNACK.

        Raises:
            ConnectError: the broker is unreachable, refused us, or did not answer in time.
            CertificateError: the broker's TLS certificate failed verification.
        """
        self._connack = None
        try:
            self._client.connect(self.url.host, self.url.port, self.settings.keepalive)
        except (OSError, ssl.SSLError) as err:
            problem = certificate_problem(err)
            if problem is not None:
                raise CertificateError("mqtt", self.url.redacted(), problem) from None
            raise ConnectError(self.url.redacted(), _os_reason(err)) from None
        if _install_buffer(self._client) is None:
            log.debug("mqtt buffered socket not installed; using paho's own loop url=%s", self.url)
        self._read_ahead = compat.paho_can_read_ahead(self._client)
        deadline = time.monotonic() + timeout
        while self._connack is None:
            if time.monotonic() > deadline:
                raise ConnectError(self.url.redacted(), f"no CONNACK within {timeout:g} s")
            rc = self._loop(timeout=0.05)
            if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                if self._connack is not None:
                    break
                raise ConnectError(self.url.redacted(), _paho_reason(rc))
        if self._connack.is_failure:
            raise ConnectError(self.url.redacted(), f"broker refused: {self._connack}")
        log.debug("mqtt connected url=%s session_present=%s", self.url, self._session_present)

    def reconnect(
        self, deadline: float, *, base_delay: float = 0.2, max_delay: float = 5.0
    ) -> None:
        """Re-establish a lost connection with jittered exponential backoff.

        Unacknowledged QoS>0 messages are retransmitted by paho once the link is back.

        Raises:
            ConnectError: still disconnected at ``deadline`` (a ``time.monotonic()`` value).
        """
        backoff = Backoff(base_delay, max_delay)
        last = "not attempted"
        while time.monotonic() < deadline:
            try:
                self.connect(timeout=max(0.5, min(10.0, deadline - time.monotonic())))
            except ConnectError as err:
                last = err.reason
            else:
                self.reconnects += 1
                if self._subscriptions:
                    self._resubscribe()
                return
            time.sleep(min(backoff.next_delay(), max(0.0, deadline - time.monotonic())))
        raise ConnectError(
            self.url.redacted(), f"lost the connection and could not reconnect: {last}"
        )

    def disconnect(self) -> None:
        """Disconnect cleanly (the broker then does not publish our will)."""
        self._closing = True
        if self._connected:
            self._client.disconnect()
            self._loop(timeout=0.1)
        self._connected = False

    # -- I/O ----------------------------------------------------------------------------------

    def pump(self, timeout: float = 0.0) -> None:
        """Run the network loop once: send, receive, fire callbacks.

        Raises:
            ConnectError: the connection is lost (call :meth:`reconnect` to recover).
        """
        rc = self._loop(timeout)
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN) or (
            not self._connected and not self._closing
        ):
            self._connected = False
            raise ConnectError(self.url.redacted(), f"connection lost ({_paho_reason(rc)})")

    def _loop(self, timeout: float) -> MQTTErrorCode:
        """paho's ``loop()`` rebuilt from its external-loop API (``loop_read``, ``loop_write``,
        ``loop_misc``): no wake-up socket pair (``loop()`` creates one and writes a byte to it
        for every packet queued), and every packet already buffered is read, not just one.

        Without our buffered socket under paho (see :func:`_install_buffer`) this is paho's
        own ``loop()``."""
        client = self._client
        sock = client.socket()
        if not isinstance(sock, _BufferedSocket):
            if sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN  # what loop() says, without a socket pair
            return client.loop(timeout)
        sock.flush()
        if sock.pending():
            readable = True
        else:
            want = client.want_write() or sock.unsent > 0
            ready = select.select([sock], [sock] if want else [], [], timeout)
            readable = bool(ready[0])
            if ready[1]:
                sock.flush()
        if readable:
            rc = self._read(client, sock)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None:
                return rc
        if client.want_write():
            rc = client.loop_write()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
        return client.loop_misc()

    def _read(self, client: paho.Client, sock: _BufferedSocket) -> MQTTErrorCode:
        """Read every packet the socket holds (paho's ``loop_read()`` fetches them).

        While paho is between packets, the QoS 0 and (with manual acks) QoS 1 PUBLISH packets
        found whole in the buffer are read here (:func:`_parse_publish`); paho reads the rest,
        and the first packet of each burst, which fills the buffer.
        """
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        if not (self._read_ahead and sock.pending()):
            rc = client.loop_read()
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and sock.pending():
            if not (
                self._read_ahead
                and client._in_packet["command"] == 0  # paho is between packets (compat)
                and cast(object, client.socket()) is sock  # not closed by paho meanwhile
                and self._read_publishes(client, sock)
            ):
                rc = client.loop_read()
        return rc

    def _read_publishes(self, client: paho.Client, sock: _BufferedSocket) -> bool:
        """Deliver the PUBLISH packets at the head of the buffer; False if there is none."""
        data, pos = sock.unread()
        end = len(data)
        manual_ack = self._manual_ack
        on_message = self._on_message
        taken = False
        while pos < end:
            parsed = _parse_publish(data, pos, end, manual_ack)
            if parsed is None:
                break
            pos, message = parsed
            sock.skip_to(pos)  # first: a handler that raises leaves the next packet to read
            if not taken:
                taken = True
                # What paho's reader sets; its keepalive check compares with it (compat).
                client._last_bytes_received = time.monotonic()
            if on_message is not None:
                on_message(message)
        return taken

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Publish one message, first waiting (pumping) while the in-flight window is full.

        A QoS>0 message that paho accepted stays in paho's queue until the broker acknowledges
        it, across a lost connection and a :meth:`reconnect` (paho retransmits it), so it is
        counted and tracked even when the link broke during the write.

        Returns:
            The paho message id.

        Raises:
            DeliveryError: paho refused the message, a QoS 0 message could not be sent, or the
                broker acknowledged nothing for ``ack_timeout`` seconds while the window was full.
            ConnectError: the connection was lost while waiting for window space (the message
                was not handed over; publish it again after :meth:`reconnect`).
        """
        if qos > 0 and len(self._inflight) >= self.max_inflight:
            self._wait_for_window()
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        kept = _QUEUED_OK if qos > 0 else (MQTTErrorCode.MQTT_ERR_SUCCESS,)
        if info.rc not in kept:
            raise DeliveryError(
                f"publish to {topic!r} refused by the MQTT client: {_paho_reason(info.rc)}"
            )
        self.published += 1
        if qos > 0:
            # The ack can only arrive in a later pump(), so there is no race with _handle_publish.
            self._inflight.add(info.mid)
        else:
            self.acknowledged += 1
        return info.mid

    def _wait_for_window(self) -> None:
        deadline = time.monotonic() + self.ack_timeout
        acknowledged = self.acknowledged
        while len(self._inflight) >= self.max_inflight:
            self.pump(timeout=0.01)
            if self.acknowledged != acknowledged:
                acknowledged = self.acknowledged
                deadline = time.monotonic() + self.ack_timeout
            elif time.monotonic() > deadline:
                raise DeliveryError(
                    f"{self.url.redacted()} acknowledged nothing for {self.ack_timeout:g} s; "
                    f"{len(self._inflight)} messages are unacknowledged"
                )

    def flush(self, timeout: float) -> bool:
        """Pump until every QoS>0 message is acknowledged; False if time ran out first."""
        deadline = time.monotonic() + timeout
        while self._inflight:
            if time.monotonic() > deadline:
                return False
            self.pump(timeout=0.05)
        return True

    def subscribe(self, filters: Iterable[tuple[str, int]], timeout: float = 10.0) -> list[int]:
        """Subscribe and wait for the SUBACK; returns the granted QoS per filter.

        Raises:
            ConnectError: the broker refused a filter (e.g. an ACL) or did not answer in time.
        """
        wanted = list(filters)
        rc, mid = self._client.subscribe(wanted)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectError(self.url.redacted(), f"subscribe failed: {_paho_reason(rc)}")
        self._pending_subacks[mid] = None
        deadline = time.monotonic() + timeout
        while self._pending_subacks[mid] is None:
            if time.monotonic() > deadline:
                raise ConnectError(self.url.redacted(), f"no SUBACK within {timeout:g} s")
            self.pump(timeout=0.05)
        reasons = self._pending_subacks.pop(mid) or []
        refused = [f for (f, _), r in zip(wanted, reasons, strict=False) if r.is_failure]
        if refused:
            raise ConnectError(
                self.url.redacted(), f"subscription refused for {', '.join(refused)}"
            )
        for entry in wanted:
            if entry not in self._subscriptions:
                self._subscriptions.append(entry)
        return [r.value for r in reasons]

    def _resubscribe(self) -> None:
        if not self._session_present:
            log.info("mqtt session not kept by the broker; resubscribing url=%s", self.url)
            self.subscribe(self._subscriptions)

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a received message (only with ``manual_ack=True``).

        The PUBACK goes out with the next :meth:`pump` (with every other one queued till then),
        or when the connection is closed; without the buffered socket, at once.
        """
        client = self._client
        sock = client.socket()
        if isinstance(sock, _BufferedSocket):
            if qos == 1 and self._manual_ack and not client.want_write():
                # paho keeps no state for a QoS 1 message it delivered with manual acks: its
                # ack() only writes this packet, through a queue and a write loop per message.
                sock.queue(_PUBACK.pack(_PUBACK_HEADER, 2, mid))
                return
            sock.corked = True
        client.ack(mid, qos)


def _parse_publish(data: bytes, pos: int, end: int, manual_ack: bool) -> tuple[int, Message] | None:
    """The MQTT 3.1.1 PUBLISH packet whole in ``data[pos:end]``, as paho would deliver it.

    Returns where the next packet starts and the message; None (leave it to paho) for any other
    packet, one not whole yet, QoS 2 (paho keeps its state), QoS 1 that paho acknowledges itself
    (no manual acks), and anything paho would refuse or deliver differently: a remaining length
    over 4 bytes, an empty topic, a topic that is not UTF-8, a packet too short for its fields.
    """
    command = data[pos]
    qos = (command >> 1) & 3
    if command >> 4 != 3 or qos > (1 if manual_ack else 0):
        return None
    start = pos + 1
    length = shift = 0
    while True:
        if start >= end or shift > 21:
            return None
        byte = data[start]
        start += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
    stop = start + length
    if stop > end or length < 2:
        return None
    topic_end = start + 2 + (data[start] << 8 | data[start + 1])
    body = topic_end + 2 if qos else topic_end
    if topic_end == start + 2 or body > stop:
        return None
    try:
        topic = data[start + 2 : topic_end].decode()
    except UnicodeDecodeError:
        return None
    mid = data[topic_end] << 8 | data[topic_end + 1] if qos else 0
    return stop, Message(topic, data[body:stop], qos, bool(command & 1), bool(command & 8), mid)


def _paho_reason(rc: MQTTErrorCode | int) -> str:
    return str(paho.error_string(rc))


def _os_reason(err: BaseException) -> str:
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (is the broker running?)"
    if isinstance(err, TimeoutError):
        return "timed out"
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return str(text)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches the MQTT subscription ``topic_filter`` (``+``, ``#``), by paho's rules."""
    return bool(paho.topic_matches_sub(topic_filter, topic))


def pump_until(client: MqttClient, condition: Callable[[], bool], timeout: float) -> bool:
    """Pump ``client`` until ``condition()`` holds; False if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        client.pump(timeout=0.05)
    return True
