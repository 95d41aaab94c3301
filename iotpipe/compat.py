"""Every private hook iotpipe takes into paho-mqtt, pika and uvicorn, and what happens without it.

These libraries offer no public way to do what the hooks do, so iotpipe reaches into their
internals, here and nowhere else. Each hook was verified against one release; with another
release installed, a warning says so once, the hook is probed before use, and where it is
missing the fallback runs: slower or less strict, never different in what is delivered.

The hooks (library and verified release: the private name, who uses it, for what; fallback):

- paho-mqtt 2.2.0: ``Client._sock``, replaced by :func:`replace_paho_socket` for
  ``iotpipe.mqtt``'s buffered socket (one ``recv()`` per burst of packets, the PUBACKs of one
  pass in one ``send()``). Fallback: paho's own socket and ``loop()``; slower, same behaviour.
- paho-mqtt 2.2.0: ``Client._create_socket_connection`` (with ``_get_proxy``, ``_host``,
  ``_port``, ``_connect_timeout``, ``_bind_address``, ``_bind_port``), overridden by
  :func:`connect_paho_by_bytes` for ``iotpipe.mqtt``'s clients: an ASCII broker host without a
  proxy is resolved as bytes, so the edge agent never loads the 'idna' codec (with
  ``stringprep`` and ``unicodedata``, ~0.4 MB). Fallback: paho's own connection; the same
  socket, the codec loaded.
- paho-mqtt 2.2.0: ``Client._in_packet`` (read) and ``Client._last_bytes_received`` (set), where
  :func:`paho_can_read_ahead` says so, for ``iotpipe.mqtt``'s own reading of the QoS 0/1
  PUBLISH packets already in its buffered socket (paho's reader builds three objects, takes
  three locks and makes four calls into the socket per packet). Only while paho is between
  packets; paho reads everything else. Fallback: paho reads every packet; slower, the same
  messages.
- pika 1.4.4: ``Connection._output_marshaled_frames``, overridden by ``iotpipe.amqp`` where
  :func:`pika_can_batch` says so, to write the frames of many publishes at once. Fallback: a
  write per frame, as pika does it.
- pika 1.4.4: ``Connection._body_max_length`` (read), where :func:`pika_can_batch` says so, by
  ``iotpipe.amqp``'s publish, which builds a message's three frames itself (pika builds five
  objects per message for them) when the body fits one frame. Fallback: ``basic_publish``.
- pika 1.4.4: ``BlockingConnection._impl.server_properties``, read by
  :func:`pika_server_version` for ``iotpipe.amqp_consumer``'s quorum-queue check. Fallback:
  version unknown, the check is left to the broker.
- pika 1.4.4: ``BlockingConnection._impl.ioloop`` and ``._terminate_stream``, used by
  :func:`pika_answer_within` to put a deadline on ``iotpipe.amqp_consumer``'s blocking calls
  (declaring, confirming a dead letter). Fallback: no deadline; a broker that accepts the
  connection and never answers is waited for (heartbeats still end a dead connection).
- pika 1.4.4: ``BlockingChannel._impl`` (the underlying channel), whose ``confirm_delivery``
  (with ``BlockingChannel._delivery_confirmation`` left False, so publishes do not wait)
  :func:`pika_confirm_async` calls with a callback of its own, so that ``iotpipe.amqp_consumer``
  can publish several receipts and then wait for all their confirms at once
  (``BlockingChannel.confirm_delivery`` makes every publish wait for its own). Fallback: one
  confirmed publish after the other, as before.
- uvicorn 0.29 to before 1: ``Server.capture_signals``, overridden by :func:`uvicorn_server`
  so that SIGTERM and Ctrl-C stop ``iotpipe dashboard`` with exit status 0. Fallback: uvicorn's
  own handling, a graceful stop after which the process dies of the signal.

The version of each library is checked (:func:`check_version`) when the module that hooks it
is imported (``iotpipe.mqtt``, ``iotpipe.amqp``) or, for uvicorn, when the dashboard starts.
This module imports none of the three at its own import: the edge agent, which needs paho only,
must not pay for pika.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import re
import socket
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import uvicorn

    from iotpipe.watchdog import Liveness

__all__ = [
    "VERIFIED",
    "check_version",
    "connect_paho_by_bytes",
    "paho_can_read_ahead",
    "pika_answer_within",
    "pika_can_batch",
    "pika_confirm_async",
    "pika_server_version",
    "replace_paho_socket",
    "uvicorn_server",
]

log = logging.getLogger(__name__)

#: distribution -> (first verified release, first release not verified), as in pyproject.toml.
VERIFIED: dict[str, tuple[str, str]] = {
    "paho-mqtt": ("2.2.0", "2.2.1"),
    "pika": ("1.4.4", "1.4.5"),
    "uvicorn": ("0.29", "1"),
}

#: distribution -> the module whose ``__version__`` names the installed release.
_MODULES = {"paho-mqtt": "paho.mqtt", "pika": "pika", "uvicorn": "uvicorn"}

S = TypeVar("S")


def _release(version: str) -> tuple[int, ...]:
    """``"2.2.0rc1"`` -> ``(2, 2, 0)``: the numeric release, enough to compare with a pin."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+", maxsplit=1)[0])[:3])


@functools.cache
def check_version(distribution: str) -> bool:
    """Whether the installed ``distribution`` is a release its hooks were verified against.

    Logs one warning (per process) when it is not: the hooks are then probed before use and
    their fallbacks run where they are missing.
    """
    module = importlib.import_module(_MODULES[distribution])
    installed = str(getattr(module, "__version__", "unknown"))
    low, high = VERIFIED[distribution]
    verified = installed != "unknown" and _release(low) <= _release(installed) < _release(high)
    if not verified:
        log.warning(
            "%s %s is not the verified release (%s to before %s): iotpipe's private hooks into "
            "it are probed and their fallbacks used where missing (see iotpipe/compat.py)",
            distribution,
            installed,
            low,
            high,
        )
    return verified


# -- paho-mqtt -----------------------------------------------------------------------------------


def replace_paho_socket(client: Any, wrap: Callable[[socket.socket], S]) -> S | None:
    """Put ``wrap(socket)`` under a freshly connected paho client; None (nothing changed) if not.

    paho has no socket factory, so this replaces its private ``_sock`` attribute. In paho-mqtt
    2.2.0 every read and write goes through ``self._sock.recv()`` / ``self._sock.send()`` and
    ``socket()`` returns ``self._sock``; where a release lays this out differently (or the
    socket is not a plain one, e.g. websockets), the socket stays as paho made it.
    """
    check_version("paho-mqtt")
    raw = client.socket()
    if getattr(client, "_sock", None) is not raw or not isinstance(raw, socket.socket):
        return None
    wrapped = wrap(raw)
    client._sock = wrapped
    if client.socket() is not wrapped:  # a layout we have not verified
        client._sock = raw
        return None
    return wrapped


def connect_paho_by_bytes(client: Any) -> bool:
    """Make a paho client connect to an ASCII host without a proxy by its name as bytes.

    ``socket.getaddrinfo()`` encodes a ``str`` host with the 'idna' codec, whose import costs
    ~0.4 MB (``encodings.idna``, ``stringprep``, ``unicodedata``); a ``bytes`` host is taken as
    it is. In paho-mqtt 2.2.0 ``Client._create_socket_connection()`` makes the TCP connection
    (``socket.create_connection((self._host, self._port), ...)``, or through PySocks where
    ``_get_proxy()`` names a proxy); this overrides it on ``client`` alone, making the same call
    with the host as bytes, and leaves any other host or a proxy to paho's own method. TLS is
    wrapped afterwards by paho as before (``server_hostname`` stays the ``str``). Returns False,
    changing nothing, where this release of paho lays it out differently.
    """
    check_version("paho-mqtt")
    own = getattr(client, "_create_socket_connection", None)
    get_proxy = getattr(client, "_get_proxy", None)
    fields = ("_host", "_port", "_connect_timeout", "_bind_address", "_bind_port")
    if not (callable(own) and callable(get_proxy) and all(hasattr(client, f) for f in fields)):
        return False

    def create_socket_connection() -> socket.socket:
        host = client._host
        if not isinstance(host, str) or not host.isascii() or get_proxy():
            return own()  # type: ignore[no-any-return]
        address: Any = (host.encode("ascii"), client._port)  # typeshed wants str; bytes work
        return socket.create_connection(
            address,
            timeout=client._connect_timeout,
            source_address=(client._bind_address, client._bind_port),
        )

    client._create_socket_connection = create_socket_connection
    return True


def paho_can_read_ahead(client: Any) -> bool:
    """Whether paho's reading state is laid out as ``iotpipe.mqtt``'s reader expects.

    In paho-mqtt 2.2.0 ``Client._in_packet`` is a dict whose ``"command"`` is 0 between packets
    (a packet half read keeps its first byte there), and ``Client._last_bytes_received`` is the
    ``time.monotonic()`` of the last read, which the keepalive check compares with. A reader that
    takes whole packets off the socket while ``command`` is 0 leaves paho where it was, provided
    it sets that time as paho's reader would.
    """
    check_version("paho-mqtt")
    state = getattr(client, "_in_packet", None)
    return (
        isinstance(state, dict)
        and state.get("command") == 0
        and isinstance(getattr(client, "_last_bytes_received", None), float)
    )


# -- pika ----------------------------------------------------------------------------------------


def pika_can_batch() -> bool:
    """Whether pika's connections write frames through ``_output_marshaled_frames``.

    In pika 1.4.4 ``Connection._send_message()`` marshals a publish's frames and hands them to
    ``_output_marshaled_frames(frames)``, which counts them and writes each to the transport; a
    subclass that overrides it can join the frames of many publishes into one write.
    """
    check_version("pika")
    import pika.connection  # type: ignore[import-untyped]

    return callable(getattr(pika.connection.Connection, "_output_marshaled_frames", None))


def pika_server_version(connection: Any) -> str:
    """The broker's version a ``BlockingConnection`` was told at the handshake; "" if unknown.

    pika 1.4.4 keeps the server properties on the private ``_impl`` (the underlying connection).
    """
    impl = getattr(connection, "_impl", None)
    properties = getattr(impl, "server_properties", None)
    if not isinstance(properties, dict):
        return ""
    version = properties.get("version", "")
    return version.decode() if isinstance(version, bytes) else str(version)


@contextlib.contextmanager
def pika_answer_within(connection: Any, seconds: float, what: str) -> Iterator[None]:
    """Tear a ``BlockingConnection`` down if the block has not finished within ``seconds``.

    pika's blocking calls wait for the broker's reply without a limit. The timer runs on the
    connection's I/O loop (``_impl.ioloop``), which those calls drive; it breaks the stream the
    way pika's own heartbeat checker does (``_impl._terminate_stream``), so the waiting call
    raises (a TimeoutError). Without those internals the block runs without a deadline.
    """
    impl: Any = getattr(connection, "_impl", None)
    ioloop = getattr(impl, "ioloop", None)
    terminate = getattr(impl, "_terminate_stream", None)
    if ioloop is None or not callable(terminate):
        yield
        return

    def expire() -> None:
        if impl.is_open:
            terminate(TimeoutError(f"no answer within {seconds:g} s ({what})"))

    timer = ioloop.call_later(seconds, expire)
    try:
        yield
    finally:
        ioloop.remove_timeout(timer)


def pika_confirm_async(channel: Any, on_confirm: Callable[[bool, int, bool], object]) -> bool:
    """Put a ``BlockingChannel`` in confirm mode with confirms going to ``on_confirm``.

    ``on_confirm(ack, delivery_tag, multiple)`` is called for every ``basic.ack`` (``ack``
    True) or ``basic.nack`` while the connection's I/O runs (``process_data_events``); the tags
    count the channel's publishes from 1. The channel's ``basic_publish`` then returns without
    waiting for the confirm. In pika 1.4.4 the ``BlockingChannel`` wraps a ``pika.channel.Channel``
    in ``_impl``, whose ``confirm_delivery(ack_nack_callback, callback)`` this calls, waiting
    for ``Confirm.SelectOk`` by running the connection's I/O. Returns False, changing nothing,
    where the release lays it out differently.

    Raises:
        Whatever pika raises for a broken channel or connection while waiting.
    """
    import pika.spec  # type: ignore[import-untyped]

    impl = getattr(channel, "_impl", None)
    select = getattr(impl, "confirm_delivery", None)
    if not callable(select) or getattr(channel, "_delivery_confirmation", True):
        return False
    selected: list[bool] = []

    def on_frame(frame: Any) -> None:
        method = frame.method
        on_confirm(
            isinstance(method, pika.spec.Basic.Ack),
            int(method.delivery_tag),
            bool(getattr(method, "multiple", False)),
        )

    def on_select_ok(_frame: Any) -> None:
        selected.append(True)
        # A timer due now ends process_data_events at once (channel-level frames do not).
        channel.connection.call_later(0, lambda: None)

    select(ack_nack_callback=on_frame, callback=on_select_ok)
    while not selected and channel.is_open:
        channel.connection.process_data_events(time_limit=0.1)
    return bool(selected)


# -- uvicorn -------------------------------------------------------------------------------------


def uvicorn_server(
    on_exit: Callable[[], object], liveness: Liveness | None = None
) -> type[uvicorn.Server]:
    """A ``uvicorn.Server`` subclass for which SIGTERM and Ctrl-C are a normal stop (exit 0).

    ``on_exit()`` runs first when either signal arrives. ``liveness`` (for systemd's watchdog,
    :mod:`iotpipe.watchdog`) is made ready once the server started and turned by uvicorn's main
    loop tick (every 0.1 s). uvicorn's own ``capture_signals``
    re-raises the signal after its graceful shutdown, so the process would die of SIGTERM; the
    override here installs the same handlers and restores the previous ones, without re-raising.
    Where ``capture_signals`` is missing, uvicorn's own handling stays (graceful, but the exit
    status is the signal's).
    """
    import signal

    import uvicorn

    check_version("uvicorn")
    hooked = callable(getattr(uvicorn.Server, "capture_signals", None))
    if not hooked:
        log.warning("uvicorn has no Server.capture_signals: SIGTERM ends the dashboard uncleanly")

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            on_exit()
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if liveness is not None and self.started:
                if not liveness.started.is_set():
                    liveness.ready()
                liveness.turn()
            return await super().on_tick(counter)

    if hooked:

        @contextlib.contextmanager
        def capture_signals(self: Any) -> Iterator[None]:
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        setattr(Server, "capture_signals", capture_signals)  # noqa: B010 - mypy: no method assignment
    return Server
