"""The embedded broker's state on disk: persistent sessions and retained messages in one SQLite file.

``iotpipe broker --state-file FILE`` (or ``broker.state_file``) keeps, across a restart of the
broker: each persistent (``clean_session=0``) session with its subscriptions, the QoS 1/2
messages it has been sent but not acknowledged (*in flight*, with their packet ids) and those
queued for it while it was away; and the broker's retained messages. This module knows nothing
about amqtt: a :class:`BrokerState` is plain data, which ``bridge.broker`` takes from amqtt on the
broker's event loop and gives back to it at the next start. Saving a state replaces the previous
one in a single transaction, so the file always holds one complete save, never half of one.

The file is opened like every iotpipe SQLite file (:func:`iotpipe.durable_queue.open_sqlite`):
WAL, ``synchronous=FULL`` (a save that returned survives power loss), ``locking_mode=EXCLUSIVE``
(one broker per file: a second one gets "in use by another process"), ``application_id``
"iotb" and ``user_version`` 1; a file from a newer iotpipe is refused with one line saying what
to do. It is created with mode 0600, as it holds message payloads.

Tables (schema 1): ``sessions(client_id, disconnected_at)``, ``subscriptions(client_id,
topic_filter, qos)``, ``messages(client_id, inflight, packet_id, topic, payload, qos, retain,
released)`` in delivery order (each session's in-flight messages, then its queue), ``retained(
topic, payload, qos)`` and ``saves(saved_at)`` (one row). Payloads are BLOBs, stored as given.

Errors::

    IotpipeError (iotpipe.errors)
    └── QueueError (iotpipe.durable_queue)
        └── BrokerStoreError   the state file cannot be opened, read or written
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from iotpipe.closing import Closing
from iotpipe.durable_queue import (
    FileKind,
    QueueError,
    open_sqlite,
    operation_error,
    write_transaction,
)

log = logging.getLogger(__name__)

__all__ = [
    "APPLICATION_ID",
    "KIND",
    "SCHEMA_VERSION",
    "BrokerState",
    "BrokerStore",
    "BrokerStoreError",
    "InflightMessage",
    "StoredMessage",
    "StoredSession",
    "Subscription",
]

#: ``PRAGMA application_id`` of a broker state file ("iotb").
APPLICATION_ID = 0x696F7462
SCHEMA_VERSION = 1

_SCHEMA = (
    """CREATE TABLE sessions (
        client_id TEXT PRIMARY KEY,
        disconnected_at INTEGER NOT NULL  -- unix seconds; the save's time if it was connected
    )""",
    """CREATE TABLE subscriptions (
        id INTEGER PRIMARY KEY,
        client_id TEXT NOT NULL,
        topic_filter TEXT NOT NULL,
        qos INTEGER NOT NULL
    )""",
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY,           -- delivery order
        client_id TEXT NOT NULL,
        inflight INTEGER NOT NULL,        -- 1: sent, not acknowledged; 0: queued
        packet_id INTEGER,                -- in flight only
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        released INTEGER NOT NULL         -- QoS 2 in flight: PUBREC received, PUBREL pending
    )""",
    """CREATE TABLE retained (
        topic TEXT PRIMARY KEY,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL
    )""",
    "CREATE TABLE saves (saved_at REAL NOT NULL)",
)


class BrokerStoreError(QueueError):
    """The broker's state file cannot be opened, read or written (one line, says what to do)."""

    noun = "broker state"


#: What kind of SQLite file a state file is (for :func:`iotpipe.durable_queue.open_sqlite`).
KIND = FileKind(
    noun="broker state",
    owner="broker",
    schema=_SCHEMA,
    application_id=APPLICATION_ID,
    schema_version=SCHEMA_VERSION,
    error=BrokerStoreError,
    newer_advice=(
        "upgrade iotpipe, or move the file aside to start the broker without its saved state"
    ),
)


# -- the state, as plain data ----------------------------------------------------------------


# Messages are not frozen: a frozen dataclass takes 3x as long to build (0.84 vs 0.28 us here),
# and the copy of 10,000 queued messages is made on the broker's event loop. Treat them as frozen.


@dataclass(slots=True)
class StoredMessage:
    """A message queued for a session, or a retained message.

    Attributes:
        topic: the topic name.
        payload: the payload, any bytes.
        qos: the QoS it is delivered with (queued) or was published with (retained).
    """

    topic: str
    payload: bytes
    qos: int


@dataclass(slots=True)
class InflightMessage:
    """A QoS 1/2 message sent to a session and not acknowledged yet; resent with ``dup=1``.

    Attributes:
        packet_id: the packet id it was sent with (kept: MQTT-4.4.0-1).
        topic: the topic name.
        payload: the payload, any bytes.
        qos: 1 or 2.
        retain: the retain flag it was sent with.
        released: QoS 2 only: the client sent PUBREC, so PUBREL (not PUBLISH) is resent.
    """

    packet_id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    released: bool = False


class Subscription(NamedTuple):
    """One subscription of a session."""

    topic_filter: str
    qos: int


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A persistent (``clean_session=0``) session.

    Attributes:
        client_id: the client id.
        disconnected_at: unix seconds since when it counts as disconnected (for
            ``session_expiry``); for a session that was connected, the time of the save.
        subscriptions: its subscriptions, in the order they were made.
        inflight: messages sent and not acknowledged, oldest first.
        queued: messages waiting for it, oldest first (delivered after ``inflight``).
    """

    client_id: str
    disconnected_at: int
    subscriptions: tuple[Subscription, ...] = ()
    inflight: tuple[InflightMessage, ...] = ()
    queued: tuple[StoredMessage, ...] = ()


@dataclass(frozen=True, slots=True)
class BrokerState:
    """Everything the broker keeps across a restart.

    Attributes:
        sessions: the persistent sessions.
        retained: the retained messages, one per topic.
        taken_at: unix time the state was taken (saved); None for an empty, never-saved file.
    """

    sessions: tuple[StoredSession, ...] = ()
    retained: tuple[StoredMessage, ...] = ()
    taken_at: float | None = None

    @property
    def queued(self) -> int:
        """Messages queued over all sessions."""
        return sum(len(session.queued) for session in self.sessions)

    @property
    def inflight(self) -> int:
        """Messages in flight over all sessions."""
        return sum(len(session.inflight) for session in self.sessions)


# -- the file ---------------------------------------------------------------------------------


class BrokerStore(Closing):
    """One broker state file, open for the broker's lifetime. Thread-safe.

    Args:
        path: the file; created (mode 0600, with its directory) if missing.
        lock_timeout: seconds to wait for another process to let go of the file.

    Raises:
        BrokerStoreError: the file cannot be created or opened, is corrupt, is not a broker
            state file, was written by a newer iotpipe, or another broker has it open.
    """

    def __init__(self, path: Path | str, *, lock_timeout: float = 1.0) -> None:
        self.path = Path(path)
        #: Saves committed since the file was opened.
        self.saves = 0
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = open_sqlite(
            self.path, KIND, durability="fsync", lock_timeout=lock_timeout, mode=0o600
        )

    def load(self) -> BrokerState:
        """Read the last save (an empty state for a new file).

        Raises:
            BrokerStoreError: the file cannot be read.
        """
        with self._lock:
            conn = self._connection()
            try:
                return _read(conn)
            except sqlite3.Error as err:
                raise operation_error(self.path, KIND, "reading the saved state", err) from err

    def save(self, state: BrokerState) -> None:
        """Replace the saved state with ``state``, in one transaction (fsynced when it returns).

        Raises:
            BrokerStoreError: the file cannot be written (nothing of ``state`` is then in it;
                the previous save is intact).
        """
        taken_at = state.taken_at if state.taken_at is not None else time.time()
        with self._lock:
            conn = self._connection()

            def work(conn: sqlite3.Connection) -> None:
                for table in ("sessions", "subscriptions", "messages", "retained", "saves"):
                    conn.execute(f"DELETE FROM {table}")  # noqa: S608 - our table names
                conn.executemany(
                    "INSERT INTO sessions (client_id, disconnected_at) VALUES (?, ?)",
                    [(s.client_id, s.disconnected_at) for s in state.sessions],
                )
                conn.executemany(
                    "INSERT INTO subscriptions (client_id, topic_filter, qos) VALUES (?, ?, ?)",
                    [
                        (s.client_id, sub.topic_filter, sub.qos)
                        for s in state.sessions
                        for sub in s.subscriptions
                    ],
                )
                conn.executemany(
                    "INSERT INTO messages (client_id, inflight, packet_id, topic, payload, qos,"
                    " retain, released) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    _message_rows(state),
                )
                conn.executemany(
                    "INSERT INTO retained (topic, payload, qos) VALUES (?, ?, ?)",
                    [(m.topic, m.payload, m.qos) for m in state.retained],
                )
                conn.execute("INSERT INTO saves (saved_at) VALUES (?)", (taken_at,))

            try:
                write_transaction(conn, work, label=f"broker state path={self.path}", logger=log)
            except sqlite3.Error as err:
                raise operation_error(self.path, KIND, "saving the state", err) from err
            self.saves += 1

    def close(self) -> None:
        """Close the file (checkpoints and removes the WAL). Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BrokerStoreError(self.path, "is closed")
        return self._conn


def _message_rows(
    state: BrokerState,
) -> Iterator[tuple[str, int, int | None, str, bytes, int, int, int]]:
    """The ``messages`` rows of ``state``: per session, in flight first, then queued."""
    for session in state.sessions:
        client_id = session.client_id
        for sent in session.inflight:
            yield (
                client_id,
                1,
                sent.packet_id,
                sent.topic,
                sent.payload,
                sent.qos,
                int(sent.retain),
                int(sent.released),
            )
        for queued in session.queued:
            yield (client_id, 0, None, queued.topic, queued.payload, queued.qos, 0, 0)


def _read(conn: sqlite3.Connection) -> BrokerState:
    """The state in the file, in one read transaction (the file is ours alone: no writer races)."""
    row = conn.execute("SELECT max(saved_at) FROM saves").fetchone()
    taken_at = None if row is None or row[0] is None else float(row[0])
    subscriptions: dict[str, list[Subscription]] = {}
    for client_id, topic_filter, qos in conn.execute(
        "SELECT client_id, topic_filter, qos FROM subscriptions ORDER BY id"
    ):
        subscriptions.setdefault(client_id, []).append(Subscription(topic_filter, int(qos)))
    inflight: dict[str, list[InflightMessage]] = {}
    queued: dict[str, list[StoredMessage]] = {}
    for client_id, is_inflight, packet_id, topic, payload, qos, retain, released in conn.execute(
        "SELECT client_id, inflight, packet_id, topic, payload, qos, retain, released"
        " FROM messages ORDER BY id"
    ):
        if is_inflight:
            inflight.setdefault(client_id, []).append(
                InflightMessage(
                    int(packet_id), topic, bytes(payload), int(qos), bool(retain), bool(released)
                )
            )
        else:
            queued.setdefault(client_id, []).append(StoredMessage(topic, bytes(payload), int(qos)))
    sessions = tuple(
        StoredSession(
            client_id=client_id,
            disconnected_at=int(disconnected_at),
            subscriptions=tuple(subscriptions.get(client_id, ())),
            inflight=tuple(inflight.get(client_id, ())),
            queued=tuple(queued.get(client_id, ())),
        )
        for client_id, disconnected_at in conn.execute(
            "SELECT client_id, disconnected_at FROM sessions ORDER BY rowid"
        )
    )
    retained = tuple(
        StoredMessage(topic, bytes(payload), int(qos))
        for topic, payload, qos in conn.execute(
            "SELECT topic, payload, qos FROM retained ORDER BY rowid"
        )
    )
    return BrokerState(sessions=sessions, retained=retained, taken_at=taken_at)
