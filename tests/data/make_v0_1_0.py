"""Write the files of tests/data/v0.1.0/ with the OLD iotpipe code that made each format.

Run it from a checkout of the old commit, with that checkout first on the import path, so the
files are written by the code that wrote them in the field (see tests/data/v0.1.0/README.md for
which commit writes which file)::

    git worktree add --detach /tmp/iotpipe-old COMMIT
    PYTHONPATH=/tmp/iotpipe-old .venv/bin/python tests/data/make_v0_1_0.py KIND OUT_DIR

KIND is one of: recording, passwords (commit d917bfc, the 0.1.0 release), store, spool
(9eff59e), outbox (b06ca4d), broker-state (91891a6). Every value is fixed, so a rerun writes
the same contents (SQLite files may differ in page layout, never in rows).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

#: A fixed instant (2026-11-26T08:00:00Z): the files do not depend on when they are made.
T0_MS = 1_795_680_000_000
SITE = "site-01"


def _fleet_payloads(count: int) -> list[tuple[str, bytes]]:
    """``count`` telemetry envelopes of two simulated devices, made by the old simulator."""
    from simulator.fleet import Fleet
    from simulator.settings import SimulateSettings

    settings = SimulateSettings(sites=1, devices=2, seed=7, sensors=["temperature", "humidity"])
    fleet = Fleet(settings)
    out = []
    for n in range(count):
        device = fleet.devices[n % len(fleet.devices)]
        out.append((device.topic, device.message(T0_MS + 1000 * (n // 2))))
    return out


def recording(out: Path) -> None:
    """A recording (format 1.0) of six envelopes, a status and a retained binary payload."""
    from iotpipe.recording import Header, RecordedMessage, write_recording

    messages = [
        RecordedMessage(offset=0.5 * n, topic=topic, payload=payload)
        for n, (topic, payload) in enumerate(_fleet_payloads(6))
    ]
    messages.append(RecordedMessage(3.0, f"iotpipe/v1/{SITE}/dev-0001/raw", b"\x00\xff\n", 0, True))
    header = Header(source="mqtt://127.0.0.1:1883", filters=("iotpipe/#",))
    write_recording(out / "recording.jsonl", messages, header, overwrite=True)


def passwords(out: Path) -> None:
    """The embedded broker's password file as ``iotpipe broker --add-user`` writes it."""
    from bridge.broker import add_user

    path = out / "broker-passwords"
    path.unlink(missing_ok=True)
    add_user(path, f"{SITE}/dev-0001", "old-password-1")


def store(out: Path) -> None:
    """A SQLite store (schema version 1): 6 envelopes, one duplicate, a status, via the consumer."""
    from consumers.sqlite_store import SQLiteStore
    from consumers.store import DeviceStatus, Message
    from iotpipe.envelope import Envelope, decode_telemetry

    messages = []
    for topic, payload in _fleet_payloads(6):
        envelope = decode_telemetry(payload, topic)
        assert isinstance(envelope, Envelope), envelope
        messages.append(Message.from_envelope(envelope))
    status = DeviceStatus(SITE, "dev-0001", "online", T0_MS, "iotpipe-simulator/0.1.0")
    path = out / "store.db"
    path.unlink(missing_ok=True)
    db = SQLiteStore(path, clock_ms=lambda: T0_MS + 10_000)
    try:
        db.write(messages[:4], [status])
        db.write(messages[3:], [])  # the 4th again: a duplicate the store must have recorded
    finally:
        db.close()


def spool(out: Path) -> None:
    """A bridge spool holding what the bridge routed while RabbitMQ was away (one dead letter)."""
    from bridge.service import route
    from bridge.spool import Spool
    from iotpipe.mqtt import Message

    inbound = [Message(topic, payload) for topic, payload in _fleet_payloads(4)]
    inbound.append(Message(f"iotpipe/v1/{SITE}/dev-0001/telemetry", b"{not json"))
    path = out / "spool.db"
    path.unlink(missing_ok=True)
    spooled = Spool(path)
    try:
        received = T0_MS / 1000
        spooled.append_many(route(m, received).to_spool(received) for m in inbound)
    finally:
        spooled.close()


def outbox(out: Path) -> None:
    """An edge agent's outbox: the counter and three envelopes not yet acknowledged."""
    from edge.envelopes import build_envelope
    from edge.outbox import Outbox, Pending
    from edge.sensors.base import Sample

    path = out / "outbox.db"
    path.unlink(missing_ok=True)
    box = Outbox(path)
    try:
        counter = box.counter("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
        topic = f"iotpipe/v1/{SITE}/pi-01/telemetry"
        items = []
        for n in range(3):
            seq = counter.next_seq + n
            ts = T0_MS + 60_000 * n
            samples = [Sample("temperature", 21.5 + n, "Cel", ts), Sample("door", n == 1, None, ts)]
            payload = build_envelope(
                site=SITE, device="pi-01", boot=counter.boot, seq=seq, samples=samples
            )
            items.append(Pending(topic, payload, seq, len(samples), ts))
        box.append(items)
    finally:
        box.close()


def broker_state(out: Path) -> None:
    """The embedded broker's state file: a persistent session with queued and in-flight messages."""
    from bridge.broker_store import (
        BrokerState,
        BrokerStore,
        InflightMessage,
        StoredMessage,
        StoredSession,
        Subscription,
    )

    topic = f"iotpipe/v1/{SITE}/dev-0001/telemetry"
    session = StoredSession(
        client_id="bridge-1",
        disconnected_at=T0_MS // 1000,
        subscriptions=(Subscription("iotpipe/v1/+/+/telemetry", 1),),
        inflight=(InflightMessage(7, topic, b'{"seq":1}', 1),),
        queued=(StoredMessage(topic, b'{"seq":2}', 1), StoredMessage(topic, b"\x00\x01", 1)),
    )
    retained = (StoredMessage(f"iotpipe/v1/{SITE}/dev-0001/status", b'{"state":"online"}', 1),)
    path = out / "broker-state.db"
    path.unlink(missing_ok=True)
    db = BrokerStore(path)
    try:
        db.save(BrokerState(sessions=(session,), retained=retained))
    finally:
        db.close()


KINDS: dict[str, Any] = {
    "recording": recording,
    "passwords": passwords,
    "store": store,
    "spool": spool,
    "outbox": outbox,
    "broker-state": broker_state,
}


def main(argv: list[str]) -> None:
    """``make_v0_1_0.py KIND OUT_DIR``: write one fixture with the code on the import path."""
    if len(argv) != 2 or argv[0] not in KINDS:
        sys.exit(f"usage: make_v0_1_0.py {{{','.join(KINDS)}}} OUT_DIR")
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    KINDS[argv[0]](out)


if __name__ == "__main__":
    main(sys.argv[1:])
