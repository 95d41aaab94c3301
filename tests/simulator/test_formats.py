"""``--format``: each foreign format publishes its project's messages with the simulator's values."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from iotpipe.mqtt import Message, Will
from iotpipe.settings import MqttSettings
from iotpipe.testing import Capture
from simulator.faults import Fault
from simulator.formats import FORMATS, format_faults, format_names
from simulator.link import MemoryLink, MqttLink
from simulator.run import Simulation, Summary
from simulator.settings import SimulateSettings
from tests.conftest import BrokerInfo
from tests.simulator.test_fleet import DIGEST_SETTINGS, SIMULATOR_DIGESTS, digest_of, published_by

START = datetime(2026, 11, 26, 9, 15, 2, tzinfo=UTC)
START_MS = round(START.timestamp() * 1000)
FOREIGN = ("tasmota", "esphome", "zigbee2mqtt", "shelly", "line", "sparkplug")

#: A reading: sensor name -> value in the envelope's units (Pa, booleans as bool).
Sample = dict[str, float | bool]


class _FakeClock:
    """Monotonic time that only moves when the simulation sleeps, so pacing is instant."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run(**values: Any) -> tuple[Summary, list[Message], list[Will | None]]:
    """Run a seeded simulation on MemoryLinks: its summary, every message, every link's will."""
    settings: dict[str, Any] = {"seed": 5, "devices": 2, "count": 20, "start": START, "rate": 2}
    settings.update(values)
    clock = _FakeClock()
    links: list[MemoryLink] = []

    def factory(index: int, will: Will | None) -> MemoryLink:
        del index
        links.append(MemoryLink(will))
        return links[-1]

    sim = Simulation(
        SimulateSettings(**settings), factory, clock=clock, wall=lambda: 1.8e9, sleep=clock.sleep
    )
    summary = sim.run()
    return summary, [m for link in links for m in link.messages], [link.will for link in links]


def telemetry(messages: list[Message]) -> list[Message]:
    """The messages that are not retained availability."""
    return [m for m in messages if not m.retain]


# -- parsers, written from the formats' documentation ----------------------------------------


def parse_line(payload: bytes) -> tuple[str, dict[str, str], dict[str, float | bool], int]:
    """One line of InfluxDB line protocol (no escaped characters): measurement, tags, fields, ts.

    Raises:
        ValueError: not a line of line protocol.
    """
    text = payload.decode()
    series, fields_text, ts = text.split(" ")
    measurement, *tag_pairs = series.split(",")
    tags = dict(pair.split("=", 1) for pair in tag_pairs)
    fields: dict[str, float | bool] = {}
    for pair in fields_text.split(","):
        key, value = pair.split("=", 1)
        fields[key] = value == "true" if value in ("true", "false") else float(value)
    if not measurement or not fields or not re.fullmatch(r"\d+", ts):
        raise ValueError(text)
    return measurement, tags, fields, int(ts)


def tasmota_sample(doc: dict[str, Any]) -> Sample:
    """What a Tasmota SENSOR message reads, in envelope units."""
    return {
        "temperature": doc["AM2301"]["Temperature"],
        "humidity": doc["AM2301"]["Humidity"],
        "pressure": doc["BMP280"]["Pressure"] * 100,
        "power": doc["ENERGY"]["Power"],
        "door": doc["Switch1"] == "ON",
        "motion": doc["Switch2"] == "ON",
    }


def zigbee_sample(doc: dict[str, Any]) -> Sample:
    """What a Zigbee2MQTT state message reads (contact true = door closed)."""
    return {
        "temperature": doc["temperature"],
        "humidity": doc["humidity"],
        "pressure": doc["pressure"] * 100,
        "power": doc["power"],
        "battery": doc["battery"],
        "door": not doc["contact"],
        "motion": doc["occupancy"],
    }


def shelly_sample(doc: dict[str, Any]) -> Sample:
    """What a Shelly NotifyStatus reads."""
    p = doc["params"]
    return {
        "temperature": p["temperature:0"]["tC"],
        "humidity": p["humidity:0"]["rh"],
        "power": p["switch:0"]["apower"],
        "battery": p["devicepower:0"]["battery"]["percent"],
        "door": p["input:0"]["state"],
        "motion": p["input:1"]["state"],
    }


def envelope_samples(messages: list[Message]) -> dict[str, list[tuple[int, Sample]]]:
    """Per device: (ts in ms, readings) of every envelope, in order."""
    out: dict[str, list[tuple[int, Sample]]] = defaultdict(list)
    for m in telemetry(messages):
        env = json.loads(m.payload)
        ts = round(datetime.fromisoformat(env["ts"]).timestamp() * 1000)
        out[env["device"]].append((ts, {r["sensor"]: r["value"] for r in env["readings"]}))
    return out


def assert_same(got: Sample, want: Sample) -> None:
    """``got`` carries ``want``'s values (pressure within hPa rounding of the conversion)."""
    for sensor, value in got.items():
        assert value == pytest.approx(want[sensor], abs=1e-6), sensor


@pytest.fixture(scope="module")
def envelopes() -> dict[str, list[tuple[int, Sample]]]:
    """The readings an envelope run with the tests' seed publishes."""
    return envelope_samples(run()[1])


# -- the formats -----------------------------------------------------------------------------


@pytest.mark.usefixtures("pinned_agent")
def test_envelope_is_the_default_and_byte_identical() -> None:
    """--format envelope publishes exactly the pinned bytes of the simulator before formats."""
    for name in ("seed11-faults", "seed3-batch-epoch-tags"):
        settings = {**DIGEST_SETTINGS[name], "format": "envelope"}
        assert digest_of(published_by(settings)) == SIMULATOR_DIGESTS[name]
    assert SimulateSettings().format == "envelope"


def test_registry_names_every_format() -> None:
    """--format accepts envelope and the six foreign formats, each registered by its name."""
    assert format_names() == ("envelope", *FOREIGN)
    for name in FOREIGN:
        assert FORMATS[name](0).name == name
    assert format_faults("envelope") == frozenset(Fault)


def test_tasmota_sensor_messages_carry_the_values(envelopes: Any) -> None:
    """tele/<device>/SENSOR: Time is the sample's UTC wall time, sensors the envelope's values."""
    summary, messages, wills = run(format="tasmota")
    assert summary.ok
    assert summary.published == 20
    assert summary.status == 4
    got: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for m in telemetry(messages):
        device = m.topic.split("/")[1]
        assert m.topic == f"tele/{device}/SENSOR"
        got[device].append(json.loads(m.payload))
    assert sorted(got) == sorted(envelopes)
    for device, docs in got.items():
        totals = [doc["ENERGY"]["Total"] for doc in docs]
        assert totals == sorted(totals)  # an energy counter never runs back
        for doc, (ts, want) in zip(docs, envelopes[device], strict=True):
            assert doc["Time"] == datetime.fromtimestamp(ts // 1000, UTC).strftime(
                "%Y-%m-%dT%H:%M:%S"
            )
            assert doc["TempUnit"] == "C"
            assert doc["PressureUnit"] == "hPa"
            assert doc["ENERGY"]["Current"] == pytest.approx(
                doc["ENERGY"]["Power"] / doc["ENERGY"]["Voltage"], abs=0.01
            )
            assert_same(tasmota_sample(doc), want)
    lwt = [(m.topic, m.payload) for m in messages if m.retain]
    assert lwt.count(("tele/dev-0001/LWT", b"Online")) == 1
    assert lwt.count(("tele/dev-0001/LWT", b"Offline")) == 1
    assert Will("tele/dev-0002/LWT", b"Offline", 1, True) in wills


def test_esphome_publishes_one_plain_state_per_sensor(envelopes: Any) -> None:
    """<node>/sensor/<name>/state and binary_sensor ON/OFF, seven publishes per sample."""
    summary, messages, wills = run(format="esphome")
    assert summary.ok
    assert summary.messages == 20
    assert summary.published == 140
    states: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    for m in telemetry(messages):
        node, component, name, leaf = m.topic.split("/")
        assert leaf == "state"
        assert component == ("binary_sensor" if name in ("door", "motion") else "sensor")
        states[node].append((name, m.payload))
    for node, published in states.items():
        samples = [published[i : i + 7] for i in range(0, len(published), 7)]
        for sample, (_ts, want) in zip(samples, envelopes[node], strict=True):
            got: Sample = {}
            for name, payload in sample:
                if name in ("door", "motion"):
                    assert payload in (b"ON", b"OFF")
                    got[name] = payload == b"ON"
                else:
                    got[name] = float(payload) * (100 if name == "pressure" else 1)
            assert list(got) == list(want)
            assert_same(got, want)
    status = [(m.topic, m.payload) for m in messages if m.retain]
    assert status == [
        ("dev-0001/status", b"online"),
        ("dev-0001/status", b"offline"),
        ("dev-0002/status", b"online"),
        ("dev-0002/status", b"offline"),
    ]
    assert Will("dev-0001/status", b"offline", 1, True) in wills


def test_zigbee2mqtt_state_has_last_seen_and_link_quality(envelopes: Any) -> None:
    """zigbee2mqtt/<name>: keys sorted, last_seen the sample time, contact the closed door."""
    summary, messages, wills = run(format="zigbee2mqtt")
    assert summary.ok
    assert summary.published == 20
    for m in telemetry(messages):
        device = m.topic.removeprefix("zigbee2mqtt/")
        doc = json.loads(m.payload)
        assert list(doc) == sorted(doc)
        assert 0 <= doc["linkquality"] <= 255
        assert isinstance(doc["linkquality"], int)
        ts = round(datetime.fromisoformat(doc["last_seen"]).timestamp() * 1000)
        want = dict(envelopes[device])[ts]
        assert doc["last_seen"].endswith("Z")
        assert_same(zigbee_sample(doc), want)
    availability = {m.topic: json.loads(m.payload) for m in messages if m.retain}
    assert availability == {
        "zigbee2mqtt/dev-0001/availability": {"state": "offline"},
        "zigbee2mqtt/dev-0002/availability": {"state": "offline"},
    }
    assert wills == [None, None]  # availability is Zigbee2MQTT's, not a device's will


def test_shelly_notify_status_carries_components(envelopes: Any) -> None:
    """<id>/events/rpc NotifyStatus: src/dst, ts in epoch seconds, one member per component."""
    summary, messages, _wills = run(format="shelly")
    assert summary.ok
    assert summary.published == 20
    for m in telemetry(messages):
        device = m.topic.removesuffix("/events/rpc")
        doc = json.loads(m.payload)
        assert doc["src"] == device
        assert doc["dst"] == f"{device}/events"
        assert doc["method"] == "NotifyStatus"
        params = doc["params"]
        want = dict(envelopes[device])[round(params["ts"] * 1000)]
        assert "pressure" not in json.dumps(params)  # Gen2 devices have no pressure sensor
        assert params["temperature:0"]["tF"] == pytest.approx(
            params["temperature:0"]["tC"] * 1.8 + 32, abs=0.02
        )
        assert params["switch:0"]["aenergy"]["total"] > 0
        assert_same(shelly_sample(doc), want)
    online = [(m.topic, m.payload) for m in messages if m.retain]
    assert ("dev-0001/online", b"true") in online
    assert ("dev-0001/online", b"false") in online


def test_line_protocol_as_telegraf_publishes_it(envelopes: Any) -> None:
    """telegraf/<host>/sensors: measurement, sorted tags with host and site, ns timestamp."""
    summary, messages, wills = run(format="line", tags={"source": "sim", "room": "k 1"})
    assert summary.ok
    assert summary.published == 20
    assert summary.status == 0
    assert wills == [None, None]
    for m in messages:
        host = m.topic.split("/")[1]
        assert m.topic == f"telegraf/{host}/sensors"
        assert b"room=k\\ 1," in m.payload  # a space in a tag value is escaped
        payload = m.payload.replace(b"room=k\\ 1,", b"")
        measurement, tags, fields, ts = parse_line(payload)
        assert measurement == "sensors"
        assert tags == {"host": host, "site": "site-01", "source": "sim"}
        assert ts % 1_000_000 == 0
        want = dict(envelopes[host])[ts // 1_000_000]
        assert list(fields) == list(want)
        assert_same(fields, want)


@pytest.mark.parametrize("name", FOREIGN)
def test_a_seed_fixes_every_byte(name: str) -> None:
    """The same seed publishes the same messages; another seed other values."""
    first = run(format=name, count=6)[1]
    assert first == run(format=name, count=6)[1]
    assert telemetry(first) != telemetry(run(format=name, count=6, seed=6)[1])


# -- faults ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tasmota", "zigbee2mqtt", "shelly", "line"])
def test_malformed_payloads_never_parse(name: str) -> None:
    """A malformed message is broken for its format's parser, and counted as rejected."""
    summary, messages, _ = run(format=name, count=60, faults={"malformed": 0.3})
    parse: Callable[[bytes], object] = parse_line if name == "line" else json.loads
    broken = 0
    for m in telemetry(messages):
        try:
            parse(m.payload)
        except ValueError:
            broken += 1
    assert broken == summary.rejected == summary.faults["malformed"] > 0


def test_esphome_faults_hit_whole_samples() -> None:
    """Duplicates repeat every state of a sample; an outage buffers whole samples, said on
    the node's status topic, and resends the last state sent before it."""
    summary, messages, _ = run(
        format="esphome", count=60, faults={"duplicate": 0.1, "offline": 0.05}
    )
    faults = summary.faults
    assert faults["duplicate"] > 0
    assert faults["offline"] > 0
    assert summary.published == 7 * (60 + faults["duplicate"]) + summary.resent
    status = Counter(m.payload for m in messages if m.retain)
    assert status[b"offline"] == status[b"online"] == 2 + faults["offline"]


def test_duplicates_and_skew_in_json_formats() -> None:
    """A duplicate is the same bytes twice; skew moves the written time, not the values."""
    summary, messages, _ = run(format="zigbee2mqtt", count=40, faults={"duplicate": 0.2})
    repeats = Counter(m.payload for m in telemetry(messages))
    assert sum(n - 1 for n in repeats.values()) == summary.faults["duplicate"] > 0
    skewed, skewed_messages, _ = run(format="shelly", count=40, faults={"skew": 0.3})
    straight = [json.loads(m.payload) for m in telemetry(run(format="shelly", count=40)[1])]
    moved = 0
    for got, want in zip(
        (json.loads(m.payload) for m in telemetry(skewed_messages)), straight, strict=True
    ):
        moved += got["params"]["ts"] != want["params"]["ts"]
        assert got["params"]["temperature:0"] == want["params"]["temperature:0"]
    assert moved == skewed.faults["skew"] > 0


# -- settings and the command line -----------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"format": "nope"}, "format"),
        ({"format": "esphome", "receipts": "on"}, "receipts"),
        ({"format": "tasmota", "batch": 2}, "batch"),
        ({"format": "esphome", "faults": {"malformed": 0.1}}, "malformed"),
        ({"format": "esphome", "faults": {"skew": 0.1}}, "skew"),
        ({"format": "shelly", "faults": {"schema": 0.1}}, "schema"),
        ({"format": "line", "faults": {"oversize": 0.1}}, "oversize"),
        ({"format": "tasmota", "faults": {"mismatch": 0.1}}, "mismatch"),
    ],
)
def test_settings_a_format_cannot_take_are_refused(values: dict[str, Any], field: str) -> None:
    """Unknown formats, receipts, batches and faults that need an envelope are refused."""
    with pytest.raises(ValidationError, match=field):
        SimulateSettings(**values)


def test_foreign_formats_turn_receipts_auto_off() -> None:
    """receipts auto with a foreign format is off at once: no capability wait, no subscription."""
    summary, _messages, _ = run(format="tasmota", receipts="auto", capability_wait=30)
    assert summary.receipts is False


def test_device_names_must_be_unique_across_sites() -> None:
    """Foreign topics carry no site, so a name on two sites is refused with the pattern named."""
    from iotpipe.errors import ConfigError
    from simulator.fleet import Fleet

    settings = SimulateSettings(format="tasmota", sites=2, devices=2, device_pattern="d{i}")
    with pytest.raises(ConfigError, match=r"device_pattern.*two sites"):
        Fleet(settings)
    assert len(Fleet(SimulateSettings(sites=2, devices=2, device_pattern="d{i}"))) == 4


def iotpipe(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real command line in a child process."""
    return subprocess.run(
        [sys.executable, "-c", "from iotpipe.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--format", "nope"], "simulate.format='nope': unknown format; one of envelope, tasmota"),
        (["--format", "esphome", "--receipts", "on"], "simulate.receipts='on': receipts are part"),
    ],
)
def test_cli_format_errors_are_one_line(args: list[str], said: str) -> None:
    """A bad --format, or receipts with a foreign format: one line, exit code 2."""
    result = iotpipe("simulate", *args, "--count", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert said in lines[0]


@pytest.mark.mqtt
@pytest.mark.mosquitto
def test_esphome_fleet_through_mosquitto(mosquitto_broker: BrokerInfo, unique: str) -> None:
    """Every ESPHome state and status a node publishes arrives through a real Mosquitto."""
    node = f"e{unique}-1"
    capture = Capture(mosquitto_broker.url, f"{node}/#", qos=1).start()
    try:
        settings = SimulateSettings(
            format="esphome", rate="max", seed=9, devices=1, count=50, device_pattern=node
        )
        mqtt = MqttSettings(url=mosquitto_broker.url)

        def connect(index: int, will: Will | None) -> MqttLink:
            return MqttLink(mqtt, client_id=f"sim-{unique}-{index}", will=will)

        summary = Simulation(settings, connect).run()
        got = capture.wait(summary.published + summary.status, timeout=30)
    finally:
        capture.stop()
    assert summary.ok
    assert summary.published == 350
    assert summary.status == 2
    kinds = Counter(m.topic.removeprefix(f"{node}/") for m in got)
    assert kinds["sensor/temperature/state"] == kinds["binary_sensor/motion/state"] == 50
    assert kinds["status"] == 2
    assert all(float(m.payload) > 0 for m in got if m.topic.endswith("/sensor/pressure/state"))
