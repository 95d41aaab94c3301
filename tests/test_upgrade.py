"""Files written by iotpipe 0.1.0 open, migrate and keep working under this version.

The files in tests/data/v0.1.0/ were written by the old code itself (tests/data/make_v0_1_0.py
run against the commits named in tests/data/v0.1.0/README.md); each test opens a copy with the
current code and checks what the old code put there is still there and usable.
"""

from __future__ import annotations

import shutil
import sqlite3
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bridge.broker import BrokerThread, PasswordFile
from bridge.broker_store import BrokerStore
from bridge.service import Routed
from bridge.settings import BridgeSettings, BrokerSettings
from bridge.spool import Spool
from consumers.query import iter_readings, store_stats
from consumers.settings import ConsumeSettings, InfluxSettings
from consumers.sqlite_store import SQLiteStore
from consumers.state import SCHEMA_VERSION
from consumers.store import Message
from edge.config import EdgeSettings
from edge.outbox import Outbox
from iotpipe.envelope import Envelope, decode_telemetry
from iotpipe.mqtt import Message as MqttMessage
from iotpipe.mqtt import pump_until
from iotpipe.recording import read_recording
from iotpipe.settings import AmqpSettings, MqttSettings, load
from simulator.settings import SimulateSettings
from tests.bridge.conftest import client
from tests.bridge.test_bridge import _running_bridge, bind_site_queue
from tests.conftest import BrokerInfo, free_port, wait_for
from tests.rabbitmq import blocking_channel

OLD = Path(__file__).parent / "data" / "v0.1.0"
#: The kernel boot the fixture's outbox counter was made for (tests/data/make_v0_1_0.py).
KERNEL_BOOT = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
SITE = "site-01"


def _copy(name: str, tmp_path: Path) -> Path:
    """A writable copy of one old file (the committed fixture is never changed)."""
    return Path(shutil.copy(OLD / name, tmp_path / name))


def _old_messages() -> list[Message]:
    """The telemetry the old code stored, taken from the old recording of the same fleet."""
    _header, recorded = read_recording(OLD / "recording.jsonl")
    messages = []
    for item in recorded:
        if item.topic.endswith("/telemetry"):
            envelope = decode_telemetry(item.payload, item.topic)
            assert isinstance(envelope, Envelope), envelope
            messages.append(Message.from_envelope(envelope))
    return messages


def test_a_recording_of_0_1_0_replays_byte_for_byte() -> None:
    header, messages = read_recording(OLD / "recording.jsonl")
    assert header.version == "1.0"
    assert header.filters == ("iotpipe/#",)
    assert len(messages) == 7
    assert messages[-1].payload == b"\x00\xff\n"
    assert messages[-1].retain
    assert all(isinstance(decode_telemetry(m.payload, m.topic), Envelope) for m in messages[:6])


def test_the_sqlite_store_of_0_1_0_migrates_with_its_readings_ids_and_completeness(
    tmp_path: Path,
) -> None:
    path = _copy("store.db", tmp_path)
    before = store_stats(path)
    store = SQLiteStore(path)
    try:
        with sqlite3.connect(path) as conn:
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
            assert int(version.fetchone()[0]) == SCHEMA_VERSION
            # The rollups the dashboard reads were filled from the old readings.
            assert conn.execute("SELECT sum(n) FROM rollup_1m").fetchone()[0] == 12
        # Every id the old consumer stored is still seen: the same messages are duplicates.
        again = store.write(_old_messages(), [])
    finally:
        store.close()
    assert (again.messages, again.readings, again.duplicates) == (0, 0, 6)
    after = store_stats(path)
    assert (before.readings, before.messages, before.seen_ids) == (12, 6, 6)
    assert (after.readings, after.messages, after.seen_ids) == (12, 6, 6)
    assert after.duplicates == before.duplicates + 6
    assert before.duplicates == 1  # the one the old consumer absorbed
    devices = {d.device: d for d in after.devices}
    assert devices["dev-0001"].state == "online"
    assert [d.completeness for d in after.devices] == [1.0, 1.0]
    rows = list(iter_readings(path, device="dev-0002", sensor="temperature"))
    assert len(rows) == 3
    assert [r.id.rsplit("-", 1)[1] for r in rows] == ["0", "1", "2"]
    assert rows[0].ts == "2026-11-26T08:00:00.000Z"
    assert rows[0].unit == "Cel"


def test_the_bridge_spool_of_0_1_0_drains_with_its_properties(tmp_path: Path) -> None:
    spool = Spool(_copy("spool.db", tmp_path))
    try:
        entries = spool.peek_oldest(10)
        assert [e.exchange for e in entries] == ["iotpipe.telemetry"] * 4 + ["iotpipe.dead"]
        assert entries[0].routing_key == f"iotpipe.v1.{SITE}.dev-0001.telemetry"
        assert entries[-1].routing_key == "bridge.bad_json"
        assert entries[-1].body == b"{not json"
        # What the drain publishes: the old properties rebuilt as AMQP properties.
        first = Routed.from_spool(*entries[0][1:5])
        envelope = decode_telemetry(first.body)
        assert isinstance(envelope, Envelope)
        assert first.properties.message_id == envelope.id
        assert first.properties.delivery_mode == 2
        assert dict(first.properties.headers or {})["x-iotpipe-site"] == SITE
        dead = Routed.from_spool(*entries[-1][1:5])
        assert "x-iotpipe-error" in dict(dead.properties.headers or {})
        assert spool.delete(e.id for e in entries) == 5
        assert spool.depth == 0
    finally:
        spool.close()


@pytest.mark.rabbitmq
@pytest.mark.mosquitto
def test_a_bridge_forwards_what_0_1_0_spooled(
    tmp_path: Path, mosquitto_broker: BrokerInfo, isolated_rabbitmq_url: str, unique: str
) -> None:
    """A 0.2.0 bridge started on the old spool publishes it all, dead letter included."""
    shutil.copy(OLD / "spool.db", tmp_path / "spool.db")
    queue = bind_site_queue(isolated_rabbitmq_url, f"test.{unique}.old", SITE)
    try:
        with _running_bridge(mosquitto_broker, isolated_rabbitmq_url, tmp_path, unique) as running:
            arrived = running.drain(queue, 4)
            dead = running.drain(running.dead_queue, 1)
            wait_for(lambda: running.bridge.spool.depth == 0, 20, "an empty spool")
    finally:
        with blocking_channel(isolated_rabbitmq_url) as channel:
            channel.queue_delete(queue)
    ids = [props.message_id for props, _ in arrived]
    assert len(set(ids)) == 4
    for props, body in arrived:
        envelope = decode_telemetry(body)
        assert isinstance(envelope, Envelope)
        assert props.message_id == envelope.id
    assert dead[0][1] == b"{not json"


def test_the_edge_outbox_of_0_1_0_keeps_its_envelopes_and_counter(tmp_path: Path) -> None:
    outbox = Outbox(_copy("outbox.db", tmp_path))
    try:
        counter = outbox.counter(KERNEL_BOOT)
        entries = outbox.peek_oldest(10)
        assert [e.seq for e in entries] == [0, 1, 2]
        envelopes = [decode_telemetry(e.payload, e.topic) for e in entries]
        assert all(isinstance(e, Envelope) and e.boot == counter.boot for e in envelopes)
        # The sequence continues where the old agent stopped: no id is ever made twice.
        assert counter.next_seq == 3
        assert outbox.delete(e.id for e in entries) == 3
        assert outbox.depth == 0
    finally:
        outbox.close()


def test_the_broker_state_of_0_1_0_loads(tmp_path: Path) -> None:
    store = BrokerStore(_copy("broker-state.db", tmp_path))
    try:
        state = store.load()
    finally:
        store.close()
    (session,) = state.sessions
    assert session.client_id == "bridge-1"
    assert [s.topic_filter for s in session.subscriptions] == ["iotpipe/v1/+/+/telemetry"]
    assert (state.inflight, state.queued, len(state.retained)) == (1, 2, 1)


@pytest.mark.mqtt
def test_the_broker_restores_a_0_1_0_session_and_delivers_its_queue(tmp_path: Path) -> None:
    """The embedded broker started on the old state file resends in-flight, then queued, messages."""
    broker = BrokerThread(
        BrokerSettings(port=free_port(), state_file=_copy("broker-state.db", tmp_path))
    ).start()
    try:
        got: list[MqttMessage] = []
        back = client(broker, client_id="bridge-1", clean_session=False, on_message=got.append)
        back.connect()
        try:
            assert back.session_present
            assert pump_until(back, lambda: len(got) >= 3, timeout=10), f"got {len(got)}"
        finally:
            back.disconnect()
    finally:
        broker.stop()
    assert [m.payload for m in got] == [b'{"seq":1}', b'{"seq":2}', b"\x00\x01"]


def test_a_0_1_0_password_file_still_logs_devices_in(tmp_path: Path) -> None:
    passwords = PasswordFile(_copy("broker-passwords", tmp_path))
    assert passwords.verify(f"{SITE}/dev-0001", "old-password-1")
    assert not passwords.verify(f"{SITE}/dev-0001", "wrong")


#: The model of each section of the 0.1.0 sample configs.
SECTIONS: dict[str, type[Any]] = {
    "mqtt": MqttSettings,
    "amqp": AmqpSettings,
    "bridge": BridgeSettings,
    "broker": BrokerSettings,
    "consume": ConsumeSettings,
    "influxdb": InfluxSettings,
    "simulate": SimulateSettings,
    "edge": EdgeSettings,
}


@pytest.mark.parametrize("name", sorted(p.name for p in (OLD / "configs").glob("*.toml")))
def test_a_0_1_0_sample_config_loads_unchanged(name: str) -> None:
    """configs/*.toml as 0.1.0 shipped them: every section still loads (no setting removed)."""
    path = OLD / "configs" / name
    sections = tomllib.loads(path.read_text(encoding="utf-8"))
    assert sections
    for section in sections:
        assert load(SECTIONS[section], section, config_file=path, environ={}) is not None
