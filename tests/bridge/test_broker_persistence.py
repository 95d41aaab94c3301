"""The embedded broker's state across restarts: the state file, clean restarts, crashes, limits."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.broker import BrokerThread, describe
from bridge.broker_store import (
    BrokerState,
    BrokerStore,
    BrokerStoreError,
    InflightMessage,
    StoredMessage,
    StoredSession,
    Subscription,
)
from bridge.settings import BrokerSettings
from iotpipe.mqtt import Message, MqttClient, pump_until
from tests.bridge.conftest import client
from tests.conftest import IOTPIPE, free_port, wait_for, wait_port

#: Not UTF-8: a payload that must come back byte for byte.
BINARY = b"\xff\xfe\x00\x80binary\xc3"


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    """Where the test's broker keeps its state."""
    return tmp_path / "state" / "broker-state.db"


@pytest.fixture
def brokers() -> Iterator[list[BrokerThread]]:
    """Brokers a test starts (``brokers.append``); every one still running is stopped after."""
    started: list[BrokerThread] = []
    yield started
    for broker in reversed(started):
        broker.stop()


def _start(started: list[BrokerThread], **fields: Any) -> BrokerThread:
    broker = BrokerThread(BrokerSettings(**fields)).start()
    started.append(broker)
    return broker


def _restart(started: list[BrokerThread], broker: BrokerThread) -> BrokerThread:
    """Stop ``broker`` cleanly and start a new one with the same settings (file and port)."""
    broker.stop()
    return _start(started, **broker.settings.model_dump())


def _queued(broker: BrokerThread, client_id: str) -> int:
    count: int = broker.call(lambda embedded: embedded.queued_messages(client_id))
    return count


def _subscribe_and_leave(broker: BrokerThread | int, client_id: str, topic: str) -> None:
    """A persistent subscriber subscribes at QoS 1 and disconnects."""
    sub = client(broker, client_id=client_id, clean_session=False)
    sub.connect()
    sub.subscribe([(topic, 1)])
    sub.disconnect()


def _publish(broker: BrokerThread | int, topic: str, payloads: list[bytes], **kwargs: Any) -> None:
    pub = client(broker, client_id=f"pub-{os.urandom(4).hex()}")
    pub.connect()
    for payload in payloads:
        pub.publish(topic, payload, **kwargs)
    assert pub.flush(timeout=10)
    pub.disconnect()


def _receive(broker: BrokerThread | int, client_id: str, count: int) -> tuple[bool, list[Message]]:
    """Reconnect ``client_id`` persistently; return session_present and its first ``count`` messages."""
    got: list[Message] = []
    back = client(broker, client_id=client_id, clean_session=False, on_message=got.append)
    back.connect()
    try:
        present = back.session_present
        assert pump_until(back, lambda: len(got) >= count, timeout=10), f"got {len(got)}"
    finally:
        back.disconnect()
    return present, got


def _retained(broker: BrokerThread, base: str) -> dict[str, bytes]:
    """The retained messages under ``base/`` as a new subscriber gets them (all flagged retain)."""
    got: list[Message] = []
    sub = client(broker, client_id=f"sub-{os.urandom(4).hex()}", on_message=got.append)
    sub.connect()
    sub.subscribe([(f"{base}/#", 1)])
    # A live sentinel: every retained message is sent before it.
    _publish(broker, f"{base}/sentinel", [b"end"], qos=1)
    assert pump_until(sub, lambda: any(m.topic == f"{base}/sentinel" for m in got), timeout=10)
    sub.disconnect()
    retained = [m for m in got if m.topic != f"{base}/sentinel"]
    assert all(m.retain for m in retained)
    return {m.topic: m.payload for m in retained}


# -- the file ---------------------------------------------------------------------------------


def test_a_state_round_trips_byte_for_byte(state_file: Path) -> None:
    """Sessions, their subscriptions, in-flight and queued messages and retained ones come back as saved."""
    state = BrokerState(
        sessions=(
            StoredSession(
                client_id="bridge",
                disconnected_at=1_700_000_000,
                subscriptions=(Subscription("iotpipe/#", 1), Subscription("x/+/y", 2)),
                inflight=(
                    InflightMessage(7, "a/b", BINARY, 1),
                    InflightMessage(9, "a/c", b"", 2, retain=True, released=True),
                ),
                queued=tuple(StoredMessage("a/b", bytes([i]) * 3, 1) for i in range(256)),
            ),
            StoredSession(client_id="idle", disconnected_at=1_700_000_100),
        ),
        retained=(StoredMessage("r/1", BINARY, 1), StoredMessage("r/ü", b"x", 0)),
        taken_at=1_700_000_200.5,
    )
    with BrokerStore(state_file) as store:
        assert store.load() == BrokerState()
        store.save(state)
        store.save(state)  # a save replaces the previous one
    with BrokerStore(state_file) as store:
        assert store.load() == state
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600


def test_one_broker_per_state_file(state_file: Path) -> None:
    """A second opener of a state file in use gets one line saying so, not a corrupted file."""
    with (
        BrokerStore(state_file),
        pytest.raises(BrokerStoreError, match=r"in use by another process \(only one broker"),
    ):
        BrokerStore(state_file, lock_timeout=0.1)


def test_another_sqlite_file_is_not_taken_for_a_state_file(tmp_path: Path) -> None:
    """An SQLite file of another application is refused, and left as it was."""
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as raw:
        raw.execute("CREATE TABLE t (x)")
    with pytest.raises(BrokerStoreError, match="not an iotpipe broker state; choose another path"):
        BrokerStore(other)


def _newer(state_file: Path) -> None:
    """Make ``state_file`` a state file as a future iotpipe (schema 2) would leave it."""
    BrokerStore(state_file).close()
    raw = sqlite3.connect(state_file)
    raw.execute("PRAGMA user_version=2")
    raw.close()


def test_a_state_file_from_a_newer_iotpipe_is_refused(
    state_file: Path, brokers: list[BrokerThread]
) -> None:
    """The broker refuses to start on a newer schema, saying what to do, and leaves the file alone."""
    _newer(state_file)
    before = state_file.read_bytes()
    with pytest.raises(BrokerStoreError) as refused:
        _start(brokers, port=free_port(), state_file=state_file)
    assert str(refused.value) == (
        f"broker state {state_file}: was written by a newer iotpipe (broker state schema 2,"
        " this one reads 1); upgrade iotpipe, or move the file aside to start the broker"
        " without its saved state"
    )
    assert state_file.read_bytes() == before


def _env(**extra: str) -> dict[str, str]:
    """The environment without IOTPIPE_* settings, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("IOTPIPE_")}
    return env | extra


def test_newer_state_file_is_one_error_line_and_exit_2(state_file: Path) -> None:
    """`iotpipe broker --state-file` on a newer file: one `iotpipe: error:` line, exit code 2."""
    _newer(state_file)
    result = subprocess.run(
        [*IOTPIPE, "broker", "--port", str(free_port()), "--state-file", str(state_file)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"iotpipe: error: broker state {state_file}: was written by a newer iotpipe (broker state"
        " schema 2, this one reads 1); upgrade iotpipe, or move the file aside to start the"
        " broker without its saved state"
    ]


def test_startup_line_says_where_the_state_is_kept(state_file: Path) -> None:
    """The start-up line names the state file and its autosave, or says the state is in memory."""
    kept = describe(BrokerSettings(state_file=state_file, autosave_interval=2.5))
    assert kept.endswith(f"state in {state_file} (saved every 2.5 s and at stop)")
    assert describe(BrokerSettings()).endswith("state in memory (lost at restart)")


# -- through real clients ---------------------------------------------------------------------


@pytest.mark.mqtt
def test_persistent_session_and_its_queue_survive_a_clean_restart(
    state_file: Path, brokers: list[BrokerThread], unique: str
) -> None:
    """50 QoS 1 messages queued for an absent subscriber all reach it, in order, after a broker restart."""
    count = 50
    topic = f"iotpipe/v1/site-{unique}/dev/telemetry"
    sub_id = f"persistent-{unique}"
    broker = _start(brokers, port=free_port(), state_file=state_file)
    _subscribe_and_leave(broker, sub_id, topic)
    # Stopped right after the last PUBACK: whatever the broker acknowledged is in the save.
    _publish(broker, topic, [str(i).encode() for i in range(count)], qos=1)

    broker = _restart(brokers, broker)
    assert _queued(broker, sub_id) == count
    # The subscription came back too: what is published now is queued behind the rest.
    _publish(broker, topic, [str(count).encode()], qos=1)
    present, got = _receive(broker, sub_id, count + 1)
    assert present
    assert [int(m.payload) for m in got] == list(range(count + 1))
    assert {m.qos for m in got} == {1}


@pytest.mark.mqtt
def test_retained_messages_survive_a_restart_and_a_deleted_one_stays_deleted(
    state_file: Path, brokers: list[BrokerThread], unique: str
) -> None:
    """Retained messages (a non-UTF-8 one too) come back after a restart; one cleared by a zero-byte publish does not."""
    base = f"r/{unique}"
    broker = _start(brokers, port=free_port(), state_file=state_file)
    _publish(broker, f"{base}/binary", [BINARY], qos=1, retain=True)
    _publish(broker, f"{base}/text", [b"21.5"], qos=0, retain=True)
    _publish(broker, f"{base}/gone", [b"soon cleared"], qos=1, retain=True)
    _publish(broker, f"{base}/gone", [b""], qos=1, retain=True)
    wait_for(lambda: broker.stats.retained == 2, what="two retained messages")

    broker = _restart(brokers, broker)
    assert _retained(broker, base) == {f"{base}/binary": BINARY, f"{base}/text": b"21.5"}


@pytest.mark.mqtt
def test_a_crash_keeps_what_the_last_autosave_had(
    state_file: Path, tmp_path: Path, brokers: list[BrokerThread], unique: str
) -> None:
    """After SIGKILL, the broker restarts with the sessions, queue and retained messages of its last autosave."""
    port = free_port()
    topic = f"t/{unique}"
    sub_id = f"persistent-{unique}"
    log = tmp_path / "broker.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [
                *IOTPIPE,
                "--log-level",
                "debug",
                "broker",
                "--port",
                str(port),
                "--state-file",
                str(state_file),
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=_env(IOTPIPE_BROKER__AUTOSAVE_INTERVAL="0.2"),
        )
    try:
        wait_port(port, timeout=30)
        _subscribe_and_leave(port, sub_id, topic)
        _publish(port, topic, [str(i).encode() for i in range(20)], qos=1)
        _publish(port, f"{topic}/retained", [BINARY], qos=1, retain=True)
        saved = "reason=autosave sessions=1 queued=20 inflight=0 retained=1"
        wait_for(lambda: saved in log.read_text(), timeout=20, what="an autosave with everything")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert "reason=stop" not in log.read_text(), "SIGKILL: no clean stop"

    broker = _start(brokers, port=port, state_file=state_file)
    present, got = _receive(broker, sub_id, 20)
    assert present
    assert [int(m.payload) for m in got] == list(range(20))
    assert _retained(broker, topic) == {f"{topic}/retained": BINARY}


@pytest.mark.mqtt
def test_without_a_state_file_nothing_is_written_and_nothing_survives(
    tmp_path: Path, brokers: list[BrokerThread], unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default keeps state in memory: no file appears, and a restart forgets the session."""
    monkeypatch.chdir(tmp_path)
    topic = f"t/{unique}"
    sub_id = f"persistent-{unique}"
    broker = _start(brokers, port=free_port())
    _subscribe_and_leave(broker, sub_id, topic)
    _publish(broker, topic, [b"1", b"2"], qos=1)
    _publish(broker, f"{topic}/r", [b"kept?"], qos=1, retain=True)
    wait_for(lambda: _queued(broker, sub_id) == 2, what="two queued messages")

    broker = _restart(brokers, broker)
    back = client(broker, client_id=sub_id, clean_session=False)
    back.connect()
    assert not back.session_present
    back.disconnect()
    assert broker.stats.retained == 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.mqtt
def test_autosave_writes_only_when_something_changed(
    state_file: Path, brokers: list[BrokerThread], unique: str
) -> None:
    """An idle broker does not rewrite its state file; a change is saved at the next tick."""
    broker = _start(brokers, port=free_port(), state_file=state_file, autosave_interval=0.02)

    def counters() -> tuple[int, int]:
        result: tuple[int, int] = broker.call(lambda b: (b.state_checks, b.state_saves))
        return result

    wait_for(lambda: counters()[0] >= 5, what="five autosave ticks")
    assert counters()[1] == 0, "nothing changed yet"
    _subscribe_and_leave(broker, f"persistent-{unique}", f"t/{unique}")
    wait_for(lambda: counters()[1] >= 1, what="a save after the subscription")
    checks, saves = counters()
    wait_for(lambda: counters()[0] >= checks + 5, what="five more ticks")
    assert counters()[1] == saves, "idle again: no more saves"


@pytest.mark.mqtt
def test_restored_queues_obey_max_queued_messages(
    state_file: Path, brokers: list[BrokerThread], unique: str
) -> None:
    """A queue saved under a larger limit is cut to the new one at start, oldest first, and counted."""
    topic = f"t/{unique}"
    sub_id = f"persistent-{unique}"
    broker = _start(brokers, port=free_port(), state_file=state_file, max_queued_messages=100)
    _subscribe_and_leave(broker, sub_id, topic)
    _publish(broker, topic, [str(i).encode() for i in range(30)], qos=1)
    broker.stop()

    broker = _start(
        brokers, port=broker.settings.port, state_file=state_file, max_queued_messages=10
    )
    assert _queued(broker, sub_id) == 10
    assert broker.stats.dropped["queue_full"] == 20
    _, got = _receive(broker, sub_id, 10)
    assert [int(m.payload) for m in got] == list(range(20, 30))


@pytest.mark.mqtt
def test_restored_sessions_obey_session_expiry(
    state_file: Path, brokers: list[BrokerThread], unique: str
) -> None:
    """A saved session disconnected longer than session_expiry is not restored; a recent one is."""
    now = int(time.time())
    topic = f"t/{unique}"
    old, recent = f"old-{unique}", f"recent-{unique}"
    queued = (StoredMessage(topic, b"waiting", 1),)
    with BrokerStore(state_file) as store:
        store.save(
            BrokerState(
                sessions=(
                    StoredSession(old, now - 3600, (Subscription(topic, 1),), queued=queued),
                    StoredSession(recent, now - 10, (Subscription(topic, 1),), queued=queued),
                )
            )
        )
    broker = _start(brokers, port=free_port(), state_file=state_file, session_expiry=600)
    assert _queued(broker, old) == 0
    present, got = _receive(broker, recent, 1)
    assert present
    assert [m.payload for m in got] == [b"waiting"]
    gone = client(broker, client_id=old, clean_session=False)
    gone.connect()
    assert not gone.session_present
    gone.disconnect()


@pytest.mark.mqtt
def test_restored_inflight_messages_are_resent_first_with_dup_then_the_queue(
    state_file: Path, brokers: list[BrokerThread], unique: str
) -> None:
    """A saved session's unacknowledged messages go out again first, dup=1 with their packet ids, then its queue."""
    topic = f"t/{unique}"
    sub_id = f"persistent-{unique}"
    with BrokerStore(state_file) as store:
        store.save(
            BrokerState(
                sessions=(
                    StoredSession(
                        sub_id,
                        int(time.time()),
                        (Subscription(topic, 1),),
                        inflight=(
                            InflightMessage(7, topic, b"sent-7", 1),
                            InflightMessage(8, topic, BINARY, 1),
                        ),
                        queued=(
                            StoredMessage(topic, b"queued-1", 1),
                            StoredMessage(topic, b"queued-2", 1),
                        ),
                    ),
                )
            )
        )
    broker = _start(brokers, port=free_port(), state_file=state_file)
    present, got = _receive(broker, sub_id, 4)
    assert present
    assert [(m.payload, m.dup) for m in got] == [
        (b"sent-7", True),
        (BINARY, True),
        (b"queued-1", False),
        (b"queued-2", False),
    ]
    assert [m.mid for m in got[:2]] == [7, 8]
    assert {m.mid for m in got[2:]}.isdisjoint({7, 8})


@pytest.mark.mqtt
def test_unacknowledged_messages_come_back_with_dup_after_a_restart(
    state_file: Path, brokers: list[BrokerThread], unique: str
) -> None:
    """QoS 1 messages sent to a persistent subscriber that never acknowledged them are resent, dup=1 and same packet ids, after a restart.

    Needs the broker to keep in-flight messages across a disconnect (bridge/mqtt311.py, the
    MQTT-4.4.0-1 change in the broker core); with amqtt's own handler they are gone before the
    save.
    """
    topic = f"t/{unique}"
    sub_id = f"manual-{unique}"
    broker = _start(brokers, port=free_port(), state_file=state_file)
    got: list[Message] = []
    sub: MqttClient = client(
        broker, client_id=sub_id, clean_session=False, on_message=got.append, manual_ack=True
    )
    sub.connect()
    sub.subscribe([(topic, 1)])
    _publish(broker, topic, [b"0", b"1", b"2"], qos=1)
    assert pump_until(sub, lambda: len(got) >= 3, timeout=10)
    sent = [(m.payload, m.mid) for m in got]
    sub.disconnect()  # none of the three was acknowledged

    broker = _restart(brokers, broker)
    present, again = _receive(broker, sub_id, 3)
    assert present
    assert [(m.payload, m.mid) for m in again] == sent
    assert all(m.dup for m in again)
