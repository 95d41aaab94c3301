"""The fleet: names, deterministic ids and values, and payloads that follow WIRE 1.0 exactly."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from iotpipe.envelope import Envelope, Status, decode_status, decode_telemetry, reading_time_ms
from iotpipe.errors import ConfigError
from iotpipe.mqtt import Message, Will
from iotpipe.recording import read_recording
from iotpipe.settings import MqttSettings, load
from iotpipe.signals import SENSORS
from simulator.fleet import Fleet, Stamper, fleet_names
from simulator.link import MemoryLink
from simulator.run import Simulation
from simulator.settings import SimulateSettings

T0 = 1_795_651_200_000  # 2026-11-26T00:00:00Z in ms
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "simulate.toml"


def _envelope(payload: bytes, topic: str | None = None) -> Envelope:
    result = decode_telemetry(payload, topic)
    assert isinstance(result, Envelope), result
    return result


def test_names_follow_the_patterns() -> None:
    """--sites 3 --devices 2 gives site-01..03, devices numbered across the fleet."""
    names = fleet_names(SimulateSettings(sites=3, devices=2))
    assert names == [
        ("site-01", "dev-0001"),
        ("site-01", "dev-0002"),
        ("site-02", "dev-0003"),
        ("site-02", "dev-0004"),
        ("site-03", "dev-0005"),
        ("site-03", "dev-0006"),
    ]
    per_site = fleet_names(SimulateSettings(sites=2, devices=2, device_pattern="{site}-s{i}"))
    assert per_site[2] == ("site-02", "site-02-s1")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"site_pattern": "site", "sites": 2}, "simulate.site_pattern"),
        ({"device_pattern": "dev-{i}", "sites": 1, "devices": 3, "site_pattern": "s"}, None),
        ({"device_pattern": "dev"}, "simulate.device_pattern"),
        ({"device_pattern": "dev/{n}"}, "simulate.device_pattern"),
        ({"device_pattern": "dev-{x}"}, "simulate.device_pattern"),
    ],
)
def test_bad_patterns_are_config_errors(overrides: dict[str, Any], field: str | None) -> None:
    """Patterns that give invalid or repeated names fail at start-up, naming the setting."""
    settings = SimulateSettings(**overrides)
    if field is None:
        assert len(fleet_names(settings)) == 3
        return
    with pytest.raises(ConfigError) as caught:
        fleet_names(settings)
    assert caught.value.field == field


def test_envelope_is_wire_1_0() -> None:
    """A rendered envelope decodes as valid on its topic, with every field as WIRE.md says."""
    device = Fleet(SimulateSettings(devices=1, tags={"room": "lab"}), seed=5).devices[0]
    payload = device.message(T0 + 125)
    env = _envelope(payload, device.topic)
    assert device.topic == "iotpipe/v1/site-01/dev-0001/telemetry"
    assert env.v == "1.0"
    assert env.id == f"{device.boot}-0" == device.message_id(0)
    assert re.fullmatch(r"[0-9a-f]{16}", device.boot)
    assert (env.site, env.device, env.seq, env.boot) == ("site-01", "dev-0001", 0, device.boot)
    assert env.ts == "2026-11-26T00:00:00.125Z"
    assert env.tags == {"room": "lab"}
    units = {r.sensor: r.unit for r in env.readings}
    assert units == {
        "temperature": "Cel",
        "humidity": "%RH",
        "pressure": "Pa",
        "power": "W",
        "battery": "%",
        "door": "1",
        "motion": "1",
    }
    kinds = {r.sensor: type(r.value) for r in env.readings}
    assert kinds["door"] is bool
    assert kinds["motion"] is bool
    # Numbers always carry a decimal point, so a store never sees an int/float type flip.
    assert all(
        kinds[s] is float for s in ("temperature", "humidity", "pressure", "power", "battery")
    )
    assert json.loads(payload) == json.loads(json.dumps(json.loads(payload)))  # plain JSON


def test_seq_counts_up_and_ids_are_unique() -> None:
    """Each message takes the next seq; ids are boot-seq, distinct across devices."""
    fleet = Fleet(SimulateSettings(devices=3), seed=9)
    ids = set()
    for i in range(5):
        for device in fleet.devices:
            env = _envelope(device.message(T0 + 1000 * i))
            assert env.seq == i
            ids.add(env.id)
    assert len(ids) == 15
    assert len({d.boot for d in fleet.devices}) == 3


def test_batch_readings_carry_their_own_ts() -> None:
    """With batch 3 at 2 Hz, each sensor has 3 readings 500 ms apart; ts is the first one."""
    device = Fleet(SimulateSettings(devices=1, batch=3, rate=2), seed=1).devices[0]
    env = _envelope(device.message(T0, 0, [1000, 500, 0]))
    assert len(env.readings) == 3 * len(SENSORS)
    times = sorted({reading_time_ms(env, r) for r in env.readings})
    assert times == [T0 - 1000, T0 - 500, T0]
    assert env.timestamp_ms == T0 - 1000
    for sensor in SENSORS:
        assert sum(r.sensor == sensor for r in env.readings) == 3


def test_epoch_ms_and_skew() -> None:
    """ts_format epoch_ms writes integers; a skew moves ts but not the readings' values."""
    settings = SimulateSettings(devices=1, ts_format="epoch_ms")
    straight = Fleet(settings, seed=2).devices[0]
    skewed = Fleet(settings, seed=2).devices[0]
    a = _envelope(straight.message(T0))
    b = _envelope(skewed.message(T0, skew_ms=-60_000))
    assert a.ts == T0
    assert b.ts == T0 - 60_000
    assert [r.value for r in a.readings] == [r.value for r in b.readings]


def test_same_seed_same_messages_other_seed_differs() -> None:
    """The seed decides boots, ids and values; a device's stream ignores the fleet's size."""

    def stream(seed: int, devices: int) -> list[bytes]:
        device = Fleet(SimulateSettings(devices=devices), seed=seed).devices[0]
        return [device.message(T0 + 1000 * i) for i in range(50)]

    assert stream(7, 2) == stream(7, 2)
    assert stream(7, 2) == stream(7, 20)
    assert stream(7, 2) != stream(8, 2)


def test_unseeded_fleets_differ() -> None:
    """Without a seed each run picks a fresh one (and reports it)."""
    a, b = Fleet(SimulateSettings(devices=1)), Fleet(SimulateSettings(devices=1))
    assert a.seed != b.seed
    assert a.devices[0].boot != b.devices[0].boot


def test_status_messages_are_wire_status() -> None:
    """Birth and will payloads are valid WIRE status messages for the device's status topic."""
    device = Fleet(SimulateSettings(devices=1), seed=1).devices[0]
    for state in ("online", "offline"):
        status = decode_status(device.status(state, T0), device.status_topic)
        assert isinstance(status, Status), status
        assert status.state == state
        assert status.agent.startswith("iotpipe-simulator/")
        assert status.timestamp_ms == T0


def test_stamper_formats_milliseconds_across_seconds() -> None:
    """The cached RFC 3339 formatter is right on both sides of a second boundary."""
    stamp = Stamper()
    assert stamp(T0 + 999) == b'"2026-11-26T00:00:00.999Z"'
    assert stamp(T0 + 1000) == b'"2026-11-26T00:00:01.000Z"'
    assert stamp(T0 + 7) == b'"2026-11-26T00:00:00.007Z"'
    assert Stamper("epoch_ms")(T0) == str(T0).encode()


def test_shipped_config_loads_with_the_defaults() -> None:
    """configs/simulate.toml parses, and (all commented out) gives exactly the defaults."""
    assert load(SimulateSettings, "simulate", config_file=CONFIG) == SimulateSettings()
    assert load(MqttSettings, "mqtt", config_file=CONFIG) == MqttSettings()


def test_shipped_config_documents_every_option() -> None:
    """Every option of every [simulate] table appears in configs/simulate.toml with its default."""
    lines = CONFIG.read_text().splitlines()
    uncommented = "\n".join(line[2:] if re.match(r"# [a-z_]+ = ", line) else line for line in lines)
    documented = tomllib.loads(uncommented)
    simulate = documented["simulate"]
    # Uncommenting every example gives a valid config whose defaults match the models'.
    settings = SimulateSettings.model_validate(simulate)
    defaults = SimulateSettings()
    assert settings.profiles == defaults.profiles
    assert settings.faults == defaults.faults
    names = set(SimulateSettings.model_fields) - {"profiles", "faults"}
    assert names <= set(simulate)
    for field in simulate:
        if field not in ("profiles", "faults", "count", "duration", "seed", "start", "connections"):
            assert getattr(settings, field) == getattr(defaults, field), field


def test_config_errors_name_the_field() -> None:
    """Bad values are ConfigErrors naming the dotted setting."""
    with pytest.raises(ConfigError, match=r"simulate\.rate"):
        load(SimulateSettings, "simulate", overrides={"rate": "500"})
    with pytest.raises(ConfigError, match=r"simulate\.faults\.schema"):
        load(SimulateSettings, "simulate", overrides={"faults": {"schema": "2"}})
    with pytest.raises(ConfigError, match="at most 1"):
        load(SimulateSettings, "simulate", overrides={"faults": {"duplicate": 0.6, "skew": 0.6}})
    with pytest.raises(ConfigError, match="10000"):
        load(SimulateSettings, "simulate", overrides={"sites": 101, "devices": 100})
    with pytest.raises(ConfigError, match=r"simulate\.faults\.typo"):
        load(SimulateSettings, "simulate", overrides={"faults": {"typo": 1}})


def test_environment_overrides_reach_nested_tables() -> None:
    """IOTPIPE_SIMULATE__FAULTS__SCHEMA and friends set nested options from strings."""
    settings = load(
        SimulateSettings,
        "simulate",
        environ={
            "IOTPIPE_SIMULATE__RATE": "max",
            "IOTPIPE_SIMULATE__FAULTS__SCHEMA": "0.25",
            "IOTPIPE_SIMULATE__PROFILES__TEMPERATURE__MEAN": "5",
        },
    )
    assert settings.unpaced
    assert settings.faults.schema_ == 0.25
    assert settings.profiles.temperature.mean == 5.0


# -- the wire did not move ---------------------------------------------------------------------

#: The settings ``tests/data/make_recording.py`` passes to ``iotpipe simulate``.
RECORDING_SETTINGS: dict[str, Any] = {
    "seed": 7,
    "sites": 2,
    "devices": 3,
    "start": datetime(2026, 11, 1, tzinfo=UTC),
    "rate": 5,
    "count": 200,
    "faults": {
        "duplicate": 0.04,
        "reorder": 0.04,
        "malformed": 0.04,
        "schema": 0.04,
        "oversize": 0.01,
        "mismatch": 0.03,
        "skew": 0.03,
        "offline": 0.02,
    },
}

#: sha256 of every (topic, payload) the simulator publishes for the settings, captured before the
#: encoders moved into ``iotpipe.wire``: a change here means the simulator's bytes changed.
SIMULATOR_DIGESTS = {
    "recording-seed7": "a73ab90eddacbce7d40a067c5e16d128804a3ed0db3500956223b781ed467063",
    "seed11-faults": "49f1a174ad3f6084bf9e694c1336a30c4c849c10e59496fc3525f48ae69efa65",
    "seed3-batch-epoch-tags": "ea312b50d68b0586dfd0bbd255e54f4c5d17b819bf6526c962b8437a4fa470f9",
}
DIGEST_SETTINGS: dict[str, dict[str, Any]] = {
    "recording-seed7": RECORDING_SETTINGS,
    "seed11-faults": {
        "seed": 11,
        "devices": 3,
        "start": datetime(2026, 11, 26, tzinfo=UTC),
        "rate": "max",
        "count": 200,
        "faults": {"duplicate": 0.1, "malformed": 0.1, "reorder": 0.1, "offline": 0.05},
    },
    "seed3-batch-epoch-tags": {
        "seed": 3,
        "devices": 2,
        "start": datetime(2026, 11, 26, tzinfo=UTC),
        "rate": "max",
        "count": 120,
        "batch": 4,
        "ts_format": "epoch_ms",
        "tags": {"room": "k\u00fcche", "pct": "50%"},
    },
}


class _FakeClock:
    """Monotonic time that only moves when the simulation sleeps, so pacing is instant."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def published_by(settings: dict[str, Any]) -> list[Message]:
    """Every message a simulation with ``settings`` publishes, on in-memory links."""
    clock = _FakeClock()
    links: list[MemoryLink] = []

    def factory(index: int, will: Will | None) -> MemoryLink:
        del index
        links.append(MemoryLink(will))
        return links[-1]

    simulation = Simulation(
        SimulateSettings(**settings),
        factory,
        clock=clock,
        wall=lambda: 1.8e9,
        sleep=clock.sleep,
    )
    simulation.run()
    return [m for link in links for m in link.messages]


def digest_of(messages: list[Message]) -> str:
    h = hashlib.sha256()
    for m in messages:
        h.update(m.topic.encode() + b"\0" + m.payload + b"\0")
    return h.hexdigest()


@pytest.mark.usefixtures("pinned_agent")
@pytest.mark.parametrize("name", sorted(SIMULATOR_DIGESTS))
def test_simulator_bytes_for_a_seed_are_pinned(name: str) -> None:
    """A seeded simulation publishes exactly the bytes it published before the wire module."""
    assert digest_of(published_by(DIGEST_SETTINGS[name])) == SIMULATOR_DIGESTS[name]


@pytest.mark.usefixtures("pinned_agent")
def test_shipped_recording_is_what_the_simulator_publishes(shipped_recording: Path) -> None:
    """The recording's telemetry is byte for byte what its settings make, statuses but for end times.

    Only the final ``offline`` statuses' ``ts`` depends on how the recorded run was paced.
    """
    _header, recorded = read_recording(shipped_recording, allow_truncated=False)
    produced = published_by(RECORDING_SETTINGS)

    def telemetry(messages: list[Message]) -> Counter[tuple[str, bytes]]:
        return Counter((m.topic, m.payload) for m in messages if m.topic.endswith("/telemetry"))

    def statuses(messages: list[Message]) -> Counter[tuple[str, str]]:
        out: Counter[tuple[str, str]] = Counter()
        for m in messages:
            if m.topic.endswith("/status"):
                doc = json.loads(m.payload)
                out[
                    (m.topic, f"{doc.pop('state')}:{doc.pop('ts')[:19]}:{sorted(doc.items())}")
                ] += 1
        return out

    assert len(produced) == len(recorded)
    assert telemetry(produced) == telemetry(recorded)
    assert statuses(produced) == statuses(recorded)
