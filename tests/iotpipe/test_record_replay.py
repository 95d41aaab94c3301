"""Record and replay against real brokers: byte-exact, flags kept, ordered, paced, stoppable."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from iotpipe.mqtt import Message, MqttClient
from iotpipe.recording import RecordedMessage, read_recording
from iotpipe.replay import replay_messages
from iotpipe.settings import MqttSettings
from iotpipe.testing import Capture, ReplayTimeoutError, replay_and_wait
from tests.conftest import BrokerInfo, running_broker, wait_for
from tests.fixtures_replay import CaptureFactory, Replayer, iotpipe_argv

pytestmark = pytest.mark.mqtt


@pytest.fixture
def second_broker(mqtt_broker: BrokerInfo, tmp_path: Path) -> Iterator[BrokerInfo]:
    """A fresh broker of the same kind as ``mqtt_broker``, to replay into."""
    with running_broker(mqtt_broker.name, tmp_path / "second-broker") as info:
        yield info


class Command:
    """An ``iotpipe`` subprocess whose stderr lines are collected as they come."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            iotpipe_argv(*args),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, name="stderr-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_for_stderr(self, text: str, timeout: float = 30.0) -> None:
        """Wait until a stderr line contains ``text`` (fails if the process exits first)."""

        def appeared() -> bool:
            if any(text in line for line in self.stderr):
                return True
            assert self.proc.poll() is None, f"exited early: {''.join(self.stderr)}"
            return False

        wait_for(appeared, timeout, f"{text!r} on stderr")

    def finish(self, timeout: float = 30.0) -> tuple[int, str, str]:
        """Wait for exit; returns (exit code, stdout, stderr)."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self._reader.join(timeout=5)
        return self.proc.returncode, out, "".join(self.stderr)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def by_stream(messages: Sequence[Message | RecordedMessage]) -> dict[tuple[str, int], list[bytes]]:
    """Payloads per (topic, QoS), in order: MQTT orders delivery per topic and QoS level."""
    streams: dict[tuple[str, int], list[bytes]] = defaultdict(list)
    for message in messages:
        streams[message.topic, message.qos].append(message.payload)
    return dict(streams)


def delivered_qos(broker: BrokerInfo, published: int, subscribed: int) -> int:
    """The QoS a subscriber receives: the lower of both (MQTT-3.3.5-1), on every broker.

    (Plain amqtt 0.12 delivered at the subscription's QoS; ``iotpipe broker`` corrects that.)
    """
    del broker
    return min(published, subscribed)


def publish_all(url: str, messages: Sequence[tuple[str, bytes, int, bool]]) -> None:
    """Publish messages in order and wait for every acknowledgement."""
    client = MqttClient(MqttSettings(url=url))
    client.connect()
    for topic, payload, qos, retain in messages:
        client.publish(topic, payload, qos, retain)
    assert client.flush(timeout=20)
    client.disconnect()


def test_record_then_replay_is_byte_exact_with_flags(
    mqtt_broker: BrokerInfo,
    second_broker: BrokerInfo,
    capture: CaptureFactory,
    tmp_path: Path,
    unique: str,
) -> None:
    """A recording of live and retained traffic replays into a fresh broker unchanged."""
    status = (f"rec/{unique}/status", b'{"state": "online"}', 1, True)
    live = [
        (f"rec/{unique}/data", b'{"seq": 0}', 1, False),
        (f"rec/{unique}/data", b"\xff\x00\xfe binary", 1, False),
        (f"rec/{unique}/data", b"", 1, False),
        (f"rec/{unique}/data", "\u2028 é \x00".encode(), 1, False),
        (f"rec/{unique}/fast", b"qos0", 0, False),
        (f"rec/{unique}/sure", b"qos2", 2, False),
        (f"rec/{unique}/data", b'{"seq": 4}', 1, False),
    ]
    publish_all(mqtt_broker.url, [status])  # retained before the recorder subscribes
    out = tmp_path / "traffic.jsonl"
    recorder = Command(
        "record", "--mqtt", mqtt_broker.url, "--topic", f"rec/{unique}/#", "--qos", "2",
        "--out", str(out), "--count", str(1 + len(live)), cwd=tmp_path,
    )  # fmt: skip
    try:
        recorder.wait_for_stderr("Ctrl-C to stop")
        publish_all(mqtt_broker.url, live)
        code, stdout, stderr = recorder.finish()
    finally:
        recorder.kill()
    assert code == 0, stderr
    assert f"recorded {1 + len(live)} messages" in stdout

    header, recorded = read_recording(out, allow_truncated=False)
    assert header.source == mqtt_broker.url
    assert header.filters == (f"rec/{unique}/#",)
    assert (recorded[0].topic, recorded[0].payload, recorded[0].retain) == (
        status[0],
        status[1],
        True,
    )
    assert not any(m.retain for m in recorded[1:])
    expected = [Message(t, p, delivered_qos(mqtt_broker, q, 2)) for t, p, q, _ in live]
    assert by_stream(recorded[1:]) == by_stream(expected)
    assert [m.offset for m in recorded] == sorted(m.offset for m in recorded)

    downstream = capture(second_broker.url, f"rec/{unique}/#", qos=2)
    replay = Command(
        "replay", str(out), "--mqtt", second_broker.url, "--speed", "max", cwd=tmp_path
    )
    code, stdout, stderr = replay.finish()
    assert code == 0, stderr
    assert f"replayed {len(recorded)} of {len(recorded)} messages" in stdout
    got = downstream.wait(len(recorded))
    replayed = [
        Message(m.topic, m.payload, delivered_qos(second_broker, m.qos, 2)) for m in recorded
    ]
    assert by_stream(got) == by_stream(replayed)
    assert sorted((m.topic, m.payload, m.qos) for m in got) == sorted(
        (m.topic, m.payload, m.qos) for m in replayed
    )

    # Published with the retain flag again: a new subscriber gets it as a retained message.
    late = capture(second_broker.url, status[0], qos=1)
    retained = late.wait(1)[0]
    assert (retained.payload, retained.retain) == (status[1], True)


def test_replay_keeps_order_and_speed_scales_timing(
    mqtt_broker: BrokerInfo, capture: CaptureFactory, unique: str
) -> None:
    """At speed 10 a 2 s recording takes at least 0.2 s, and messages arrive in recorded order."""
    topic = f"pace/{unique}"
    messages = [RecordedMessage(i * 0.25, topic, f"{i}".encode()) for i in range(9)]
    downstream = capture(mqtt_broker.url, topic, qos=1)
    client = MqttClient(MqttSettings(url=mqtt_broker.url))
    client.connect()
    stats = replay_messages(client, messages, speed=10.0)
    client.disconnect()
    assert (stats.published, stats.acknowledged) == (9, 9)
    assert 0.2 <= stats.elapsed < 10.0  # deadlines are never early; the upper bound is sanity only
    assert [m.payload for m in downstream.wait(9)] == [f"{i}".encode() for i in range(9)]


def test_speed_max_does_not_wait_for_recorded_gaps(
    mqtt_broker: BrokerInfo, capture: CaptureFactory, unique: str
) -> None:
    """A recording spanning 60 s replays at speed max in far less time, still in order."""
    topic = f"max/{unique}"
    messages = [RecordedMessage(i * 10.0, topic, f"{i}".encode()) for i in range(7)]
    downstream = capture(mqtt_broker.url, topic, qos=1)
    result = replay_and_wait(
        messages, mqtt_broker.url, seen=downstream.count, speed=None, timeout=20
    )
    assert result.seen == 7
    assert result.elapsed < 20.0
    assert [m.payload for m in downstream.wait(7)] == [f"{i}".encode() for i in range(7)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_record_stops_cleanly_on_signal(
    mqtt_broker: BrokerInfo, tmp_path: Path, unique: str, sig: signal.Signals
) -> None:
    """SIGINT or SIGTERM ends a recording with exit 0, a summary and a complete file."""
    out = tmp_path / "r.jsonl"
    recorder = Command(
        "record",
        "--mqtt",
        mqtt_broker.url,
        "--topic",
        f"sig/{unique}/#",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    try:
        recorder.wait_for_stderr("Ctrl-C to stop")
        publish_all(mqtt_broker.url, [(f"sig/{unique}/x", bytes([i]), 1, False) for i in range(3)])
        wait_for(lambda: len(read_recording(out)[1]) == 3, 20, "3 recorded messages")
        recorder.proc.send_signal(sig)
        code, stdout, stderr = recorder.finish()
    finally:
        recorder.kill()
    assert code == 0, stderr
    assert "recorded 3 messages" in stdout
    assert f"stopped by {sig.name}" in stdout
    assert "Traceback" not in stderr
    assert out.read_bytes().endswith(b"\n")
    assert [m.payload for m in read_recording(out, allow_truncated=False)[1]] == [
        b"\x00",
        b"\x01",
        b"\x02",
    ]


def test_record_stops_after_duration(mqtt_broker: BrokerInfo, tmp_path: Path, unique: str) -> None:
    """--duration ends a quiet recording by itself with a valid, empty file."""
    out = tmp_path / "r.jsonl"
    code, stdout, stderr = Command(
        "record", "--mqtt", mqtt_broker.url, "--topic", f"dur/{unique}", "--out", str(out),
        "--duration", "0.3", cwd=tmp_path,
    ).finish()  # fmt: skip
    assert code == 0, stderr
    assert "recorded 0 messages" in stdout
    assert read_recording(out, allow_truncated=False)[1] == []


def test_record_reads_its_config_section(
    mqtt_broker: BrokerInfo, tmp_path: Path, unique: str
) -> None:
    """[record] and [mqtt] in a TOML file configure the command; no flags needed."""
    config = tmp_path / "iotpipe.toml"
    config.write_text(
        f'[mqtt]\nurl = "{mqtt_broker.url}"\n\n'
        f'[record]\ntopics = ["cfg/{unique}/a", "cfg/{unique}/b"]\nout = "cfg.jsonl"\ncount = 2\n'
    )
    publish_all(mqtt_broker.url, [(f"cfg/{unique}/b", b"kept", 1, True)])
    recorder = Command("record", "--config", str(config), cwd=tmp_path)
    try:
        recorder.wait_for_stderr("Ctrl-C to stop")
        publish_all(mqtt_broker.url, [(f"cfg/{unique}/a", b"live", 1, False)])
        code, _stdout, stderr = recorder.finish()
    finally:
        recorder.kill()
    assert code == 0, stderr
    header, recorded = read_recording(tmp_path / "cfg.jsonl")
    assert header.filters == (f"cfg/{unique}/a", f"cfg/{unique}/b")
    assert [(m.payload, m.retain) for m in recorded] == [(b"kept", True), (b"live", False)]


def test_replayer_fixture_waits_for_downstream(
    mqtt_broker: BrokerInfo, replayer: Replayer, capture: CaptureFactory, unique: str
) -> None:
    """The replayer publishes a recording and returns once the downstream count is reached."""
    downstream = capture(mqtt_broker.url, f"fx/{unique}/#")
    messages = [
        RecordedMessage(i * 0.01, f"fx/{unique}/{i % 3}", bytes([i]), i % 3) for i in range(30)
    ]
    result = replayer(messages, mqtt_broker.url, seen=downstream.count, expected=30, timeout=20)
    assert (result.published, result.seen, result.expected) == (30, 30, 30)
    assert replayer.results == [result]


def test_replay_and_wait_fails_clearly_when_downstream_falls_short(
    mqtt_broker: BrokerInfo, unique: str
) -> None:
    """If seen() never reaches expected, ReplayTimeoutError (an AssertionError) gives the counts."""
    messages = [RecordedMessage(0.0, f"short/{unique}", b"x")]
    with pytest.raises(ReplayTimeoutError, match="only 0 of 5 replayed messages were seen") as info:
        replay_and_wait(messages, mqtt_broker.url, seen=lambda: 0, expected=5, timeout=0.5)
    assert isinstance(info.value, AssertionError)
    assert (info.value.expected, info.value.got) == (5, 0)


def test_capture_reports_a_shortfall(mqtt_broker: BrokerInfo, unique: str) -> None:
    """Capture.wait raises ReplayTimeoutError naming the filter when too few messages arrive."""
    with (
        Capture(mqtt_broker.url, f"none/{unique}") as empty,
        pytest.raises(ReplayTimeoutError, match=f"only 0 of 1 messages arrived on none/{unique}"),
    ):
        empty.wait(1, timeout=0.2)


def test_shipped_recording_replays_completely(
    mqtt_broker: BrokerInfo, replayer: Replayer, capture: CaptureFactory, shipped_recording: Path
) -> None:
    """Every message of the shipped simulator recording reaches a subscriber of a fresh broker."""
    _header, recorded = read_recording(shipped_recording, allow_truncated=False)
    downstream = capture(mqtt_broker.url, "iotpipe/#", qos=1)  # the QoS it was recorded with
    result = replayer(shipped_recording, mqtt_broker.url, seen=downstream.count, timeout=60)
    assert result.seen == len(recorded)
    assert by_stream(downstream.wait(len(recorded))) == by_stream(recorded)
