"""Record/replay logic without a broker: pacing, stopping, settings, and the CLI's error lines."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from iotpipe.errors import ConfigError, DeliveryError
from iotpipe.mqtt import Message
from iotpipe.recording import (
    RecordedMessage,
    Recorder,
    RecordingWriter,
    read_recording,
    write_recording,
)
from iotpipe.replay import ReplayStats, check_delivered, parse_speed, replay_messages
from iotpipe.settings import RecordSettings, load
from tests.conftest import free_port
from tests.fixtures_replay import iotpipe_argv


class FakeClock:
    """Monotonic time that only moves when the fake client waits."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeClient:
    """A PacedPublisher that records publish times and acknowledges QoS>0 on flush."""

    def __init__(self, clock: FakeClock, *, ack: bool = True) -> None:
        self.clock = clock
        self.ack = ack
        self.acknowledged = 0
        self.sent: list[tuple[float, str, bytes, int, bool]] = []
        self.waits: list[float] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        self.sent.append((self.clock.now, topic, payload, qos, retain))
        if qos == 0:
            self.acknowledged += 1
        return len(self.sent)

    def pump(self, timeout: float = 0.0) -> None:
        self.waits.append(timeout)
        self.clock.now += timeout

    def flush(self, timeout: float) -> bool:
        if self.ack:
            self.acknowledged = len(self.sent)
        return self.ack


def recording(*offsets: float) -> list[RecordedMessage]:
    """Messages at the given offsets, QoS 1, payload = index."""
    return [RecordedMessage(t, f"t/{i}", bytes([i]), 1, i == 0) for i, t in enumerate(offsets)]


# -- pacing -----------------------------------------------------------------------------------


def test_messages_are_published_at_their_scaled_deadlines() -> None:
    """At speed 2, a message recorded at t is published t/2 after the start, never earlier."""
    clock = FakeClock()
    client = FakeClient(clock)
    stats = replay_messages(client, recording(0.0, 0.5, 0.5, 3.0), speed=2.0, clock=clock)
    starts = [sent[0] - 1000.0 for sent in client.sent]
    assert starts == pytest.approx([0.0, 0.25, 0.25, 1.5])
    assert (stats.published, stats.acknowledged, stats.unacknowledged) == (4, 4, 0)


def test_pacing_is_relative_to_the_first_message() -> None:
    """A recording cut from the middle starts at once instead of waiting for its first offset."""
    clock = FakeClock()
    client = FakeClient(clock)
    replay_messages(client, recording(100.0, 101.0), speed=1.0, clock=clock)
    assert [sent[0] - 1000.0 for sent in client.sent] == pytest.approx([0.0, 1.0])


def test_a_late_publish_does_not_shift_later_deadlines() -> None:
    """Deadlines come from the start, so time lost publishing one message is not carried over."""
    clock = FakeClock()

    class SlowClient(FakeClient):
        def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
            mid = super().publish(topic, payload, qos, retain)
            self.clock.now += 0.3  # a full window: publishing blocks for a while
            return mid

    client = SlowClient(clock)
    replay_messages(client, recording(0.0, 0.1, 0.2, 1.0), speed=1.0, clock=clock)
    assert [sent[0] - 1000.0 for sent in client.sent] == pytest.approx([0.0, 0.3, 0.6, 1.0])


def test_waiting_pumps_the_client_in_short_slices() -> None:
    """While waiting for a deadline the client is pumped, never for more than 0.1 s at a time."""
    clock = FakeClock()
    client = FakeClient(clock)
    replay_messages(client, recording(0.0, 2.0), speed=1.0, clock=clock)
    assert client.waits
    assert max(client.waits) <= 0.1
    assert sum(client.waits) == pytest.approx(2.0)


def test_speed_max_never_waits() -> None:
    """Without pacing nothing waits: every message goes out at the start time."""
    clock = FakeClock()
    client = FakeClient(clock)
    replay_messages(client, recording(0.0, 5.0, 50.0), speed=None, clock=clock)
    assert [sent[0] for sent in client.sent] == [1000.0] * 3
    assert all(wait == 0.0 for wait in client.waits)


def test_qos_retain_topic_prefix_and_bytes_are_passed_through() -> None:
    """Each publish carries the prefixed topic, exact payload, QoS and retain flag."""
    clock = FakeClock()
    client = FakeClient(clock)
    messages = [RecordedMessage(0.0, "a/b", b"\xff", 2, True), RecordedMessage(0.0, "c", b"", 0)]
    replay_messages(client, messages, speed=None, topic_prefix="replay/", clock=clock)
    assert [sent[1:] for sent in client.sent] == [
        ("replay/a/b", b"\xff", 2, True),
        ("replay/c", b"", 0, False),
    ]


def test_stop_request_ends_the_replay_early() -> None:
    """When should_stop turns true while waiting, publishing stops and the stats say so."""
    clock = FakeClock()
    client = FakeClient(clock)
    stats = replay_messages(
        client,
        recording(0.0, 1.0, 60.0),
        speed=1.0,
        clock=clock,
        should_stop=lambda: clock.now > 1010,
    )
    assert (stats.published, stats.interrupted) == (2, True)


def test_missing_acknowledgements_are_a_delivery_error() -> None:
    """A broker that does not acknowledge everything makes check_delivered raise DeliveryError."""
    clock = FakeClock()
    stats = replay_messages(
        FakeClient(clock, ack=False), recording(0.0, 0.0), speed=None, clock=clock
    )
    assert stats.unacknowledged == 2
    with pytest.raises(DeliveryError, match="did not acknowledge 2 of 2"):
        check_delivered(stats, "mqtt://h:1883")
    check_delivered(ReplayStats(published=3, acknowledged=3), "mqtt://h:1883")


@pytest.mark.parametrize(
    ("text", "speed"), [("1", 1.0), ("10", 10.0), ("0.5", 0.5), ("max", None), ("MAX", None)]
)
def test_speed_accepts_factors_and_max(text: str, speed: float | None) -> None:
    """--speed takes a positive factor or 'max'."""
    assert parse_speed(text) == speed


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "fast", ""])
def test_speed_rejects_everything_else(text: str) -> None:
    """Zero, negative, non-finite and non-numeric speeds are refused with the allowed values."""
    with pytest.raises(ValueError, match="number > 0 or 'max'"):
        parse_speed(text)


# -- recording --------------------------------------------------------------------------------


def test_recorder_offsets_count_from_the_first_message(tmp_path: Path) -> None:
    """Offsets are receive times minus the first message's; flags and bytes are kept."""
    times = iter([50.0, 50.25, 52.0])
    with RecordingWriter(tmp_path / "r.jsonl") as writer:
        recorder = Recorder(writer, clock=lambda: next(times))
        recorder.on_message(Message("s", b"on", qos=1, retain=True))
        recorder.on_message(Message("t", b"\x00", qos=0))
        recorder.on_message(Message("t", b"\x01", qos=2))
    _header, back = read_recording(tmp_path / "r.jsonl")
    assert back == [
        RecordedMessage(0.0, "s", b"on", 1, True),
        RecordedMessage(0.25, "t", b"\x00", 0, False),
        RecordedMessage(2.0, "t", b"\x01", 2, False),
    ]


def test_recorder_stops_at_count(tmp_path: Path) -> None:
    """After count messages the recorder is full and ignores further messages."""
    with RecordingWriter(tmp_path / "r.jsonl") as writer:
        recorder = Recorder(writer, count=2)
        for i in range(5):
            recorder.on_message(Message("t", bytes([i])))
        assert recorder.full
    assert len(read_recording(tmp_path / "r.jsonl")[1]) == 2


def test_record_settings_come_from_the_config_file(tmp_path: Path) -> None:
    """The [record] section fills RecordSettings; flags override it."""
    config = tmp_path / "iotpipe.toml"
    config.write_text('[record]\ntopics = ["a/#", "b/+/c"]\nqos = 2\nout = "x.jsonl"\ncount = 5\n')
    settings = load(RecordSettings, "record", config_file=config, overrides={"count": 7})
    assert (settings.topics, settings.qos, settings.out, settings.count) == (
        ("a/#", "b/+/c"),
        2,
        Path("x.jsonl"),
        7,
    )


@pytest.mark.parametrize("bad", ["a/#/b", "a#", "a/b+", ""])
def test_bad_topic_filters_are_config_errors(bad: str) -> None:
    """A malformed MQTT filter is refused at start-up, naming the setting."""
    with pytest.raises(ConfigError, match=r"record\.topics"):
        load(RecordSettings, "record", overrides={"topics": (bad,)}, environ={})


# -- the command line's error lines -----------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``iotpipe ARGS`` in a subprocess."""
    return subprocess.run(
        iotpipe_argv(*args), capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    """The command failed with ``code`` and a single ``iotpipe: error:`` line containing ``text``."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("iotpipe: error: ")
    assert text in lines[0]


def test_replay_of_missing_file_is_one_clear_line(tmp_path: Path) -> None:
    """`iotpipe replay nope.jsonl` prints one error line and exits 2, without a traceback."""
    result = run_cli(
        "replay", "nope.jsonl", "--mqtt", f"mqtt://127.0.0.1:{free_port()}", cwd=tmp_path
    )
    assert_one_line_error(result, 2, "nope.jsonl: no such file")


def test_replay_of_malformed_file_names_the_line(tmp_path: Path) -> None:
    """A malformed recording fails before connecting, naming the file, line and reason."""
    path = tmp_path / "bad.jsonl"
    write_recording(path, [RecordedMessage(0, "t", b"x")])
    with path.open("a") as fh:
        fh.write('{"t": 1, "topic": "t", "qos": 1, "retain": false}\n')
    result = run_cli("replay", str(path), "--mqtt", f"mqtt://127.0.0.1:{free_port()}", cwd=tmp_path)
    assert_one_line_error(result, 2, f'{path}:3: message has no "payload" field')


def test_replay_with_bad_url_is_one_clear_line(tmp_path: Path) -> None:
    """A URL with the wrong scheme is a config error naming mqtt.url."""
    write_recording(tmp_path / "r.jsonl", [])
    result = run_cli("replay", "r.jsonl", "--mqtt", "http://127.0.0.1:1883", cwd=tmp_path)
    assert_one_line_error(result, 2, "invalid setting mqtt.url='http://127.0.0.1:1883'")


def test_replay_to_unreachable_broker_is_a_connect_error(tmp_path: Path) -> None:
    """A closed port ends in one `cannot connect` line and exit code 3."""
    write_recording(tmp_path / "r.jsonl", [RecordedMessage(0, "t", b"x")])
    port = free_port()
    result = run_cli("replay", "r.jsonl", "--mqtt", f"mqtt://127.0.0.1:{port}", cwd=tmp_path)
    assert_one_line_error(result, 3, f"cannot connect to mqtt://127.0.0.1:{port}")


def test_replay_with_bad_speed_is_a_usage_error(tmp_path: Path) -> None:
    """--speed 0 is refused as a usage error (exit 2) naming --speed."""
    write_recording(tmp_path / "r.jsonl", [])
    result = run_cli("replay", "r.jsonl", "--speed", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "--speed" in result.stderr
    assert "Traceback" not in result.stderr


def test_record_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    """Recording onto an existing file fails before connecting and suggests --force."""
    (tmp_path / "r.jsonl").write_text("precious\n")
    result = run_cli(
        "record", "--out", "r.jsonl", "--mqtt", f"mqtt://127.0.0.1:{free_port()}", cwd=tmp_path
    )
    assert_one_line_error(result, 2, "already exists (pass --force to overwrite it)")
    assert (tmp_path / "r.jsonl").read_text() == "precious\n"


def test_record_without_out_is_a_config_error(tmp_path: Path) -> None:
    """Without --out (or [record] out) the command says the setting is required."""
    result = run_cli("record", "--mqtt", f"mqtt://127.0.0.1:{free_port()}", cwd=tmp_path)
    assert_one_line_error(result, 2, "record.out")


def test_record_from_unreachable_broker_leaves_no_file(tmp_path: Path) -> None:
    """A failed connection exits 3 and does not leave an empty recording behind."""
    port = free_port()
    result = run_cli(
        "record", "--out", "r.jsonl", "--mqtt", f"mqtt://127.0.0.1:{port}", cwd=tmp_path
    )
    assert_one_line_error(result, 3, "cannot connect")
    assert not (tmp_path / "r.jsonl").exists()


def test_help_shows_examples() -> None:
    """Both commands' --help include worked examples."""
    for command in ("record", "replay"):
        result = subprocess.run(
            iotpipe_argv(command, "--help"), capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        assert "Examples" in result.stdout
        assert f"iotpipe {command} " in result.stdout
