"""Ingest rules without brokers: each format and preset from payloads as their projects
document them, identity, config errors, the bridge's ack of multi-envelope messages, and
``iotpipe ingest try``."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bridge.formats import parse_lines
from bridge.ingest import Ingest, IngestRule
from bridge.mapping import FormatOutcome, Mapped, MappingError, Reading
from bridge.service import Bridge, routed_mapped
from bridge.settings import BridgeSettings
from bridge.spool import Spool
from iotpipe.envelope import Envelope, decode
from iotpipe.errors import ConfigError
from iotpipe.mqtt import Message
from iotpipe.settings import load
from iotpipe.testing import MemoryPublisher, MemorySubscriber
from iotpipe.wire import topic as wire_topic
from tests.conftest import wait_for

DATA = Path(__file__).resolve().parents[1] / "data" / "ingest"
NOW_MS = 1_704_200_000_000

# Payloads written from each project's published documentation of its MQTT messages.
TASMOTA = (
    b'{"Time":"2024-01-01T12:00:00","ENERGY":{"TotalStartTime":"2023-11-01T10:00:00",'
    b'"Total":1.234,"Yesterday":0.5,"Today":0.1,"Power":12,"ApparentPower":20,'
    b'"ReactivePower":16,"Factor":0.6,"Voltage":230,"Current":0.087},'
    b'"AM2301":{"Temperature":21.3,"Humidity":45.1,"DewPoint":8.9},"TempUnit":"C"}'
)
ZIGBEE = (
    b'{"battery":97,"humidity":48.2,"linkquality":120,"temperature":21.5,"voltage":3000,'
    b'"last_seen":"2024-01-01T12:00:00+00:00"}'
)
SHELLY = (
    b'{"src":"shellyplus1pm-a8032ab12345","dst":"shellyplus1pm-a8032ab12345/events",'
    b'"method":"NotifyStatus","params":{"ts":1704110400.12,"switch:0":{"id":0,"apower":12.5,'
    b'"voltage":230.1,"current":0.06,"aenergy":{"total":1234.5,"by_minute":[1.1,2.2,3.3],'
    b'"minute_ts":1704110400},"temperature":{"tC":40.1,"tF":104.2}}}}'
)
LINES = (
    b"weather,host=pi-1,room=kitchen temperature=21.5,humidity=45i,ok=true,"
    b'label="a \\"b\\"" 1700000000000000000\n'
    b"# a comment\n"
    b"weather,host=pi-2 temperature=19 1700000000000000000\n"
    b"cpu,host=pi-1,cpu=cpu-total usage_idle=97.5 1700000000000000000\n"
)


def rule(**fields: Any) -> IngestRule:
    fields.setdefault("name", "r")
    return IngestRule.model_validate(fields)


def one(ingest: Ingest, topic: str, payload: bytes, *, dup: bool = False) -> tuple[Mapped, ...]:
    result = ingest.map(topic, payload, NOW_MS, dup=dup)
    assert result is not None, f"no rule for {topic}"
    assert result[1].error is None, result[1].error
    return result[1].mapped


def values(mapped: Mapped) -> dict[str, tuple[Any, str | None]]:
    return {r.sensor: (r.value, r.unit) for r in mapped.readings}


def as_envelope(mapped: Mapped, topic: str = "x") -> Envelope:
    """The envelope the bridge publishes, decoded by the contract's validating decoder."""
    routed = routed_mapped(Message(topic, b""), "r", mapped, NOW_MS / 1000)
    decoded = decode(wire_topic(mapped.site, mapped.device), routed.body)
    assert isinstance(decoded, Envelope), decoded
    return decoded


def test_tasmota_preset_reads_nested_sensors_units_and_local_time() -> None:
    ingest = Ingest([rule(preset="tasmota", site="home", timezone="Europe/Berlin")])
    (mapped,) = one(ingest, "tele/plug-1/SENSOR", TASMOTA)
    assert (mapped.site, mapped.device) == ("home", "plug-1")
    assert mapped.ts_ms == 1_704_106_800_000  # 12:00 in Berlin (winter) = 11:00 UTC
    got = values(mapped)
    assert got["ENERGY.Power"] == (12, "W")
    assert got["ENERGY.Total"] == (1.234, "kW.h")
    assert got["AM2301.Temperature"] == (21.3, "Cel")
    assert got["AM2301.Humidity"] == (45.1, "%RH")
    assert got["ENERGY.Factor"] == (0.6, None)
    assert "TempUnit" not in got
    assert "ENERGY.TotalStartTime" not in got
    assert "Time" not in got
    assert as_envelope(mapped).id == mapped.id


def test_time_bearing_ids_are_deterministic_across_runs_and_distinct_per_time() -> None:
    first = Ingest([rule(preset="tasmota", site="home")], run="a")
    second = Ingest([rule(preset="tasmota", site="home")], run="b")
    later = TASMOTA.replace(b"12:00:00", b"12:05:00", 1)
    (m1,), (m2,) = one(first, "tele/p/SENSOR", TASMOTA), one(second, "tele/p/SENSOR", TASMOTA)
    (m3,) = one(first, "tele/p/SENSOR", later)
    (m4,) = one(first, "tele/q/SENSOR", TASMOTA)
    assert m1.id == m2.id
    assert len({m1.id, m3.id, m4.id}) == 3
    assert (m1.seq, m3.seq, m4.seq) == (0, 1, 0)  # a per-run counter per device
    assert m1.boot == "a"
    assert m2.boot == "b"


def test_the_same_time_bearing_bytes_again_get_the_same_id_and_seq() -> None:
    """A device's resend (same bytes, no DUP flag: the broker forwards it as a new message) is
    the envelope made the first time, so the store counts a duplicate, not a gap in seq."""
    ingest = Ingest([rule(preset="tasmota", site="home")], run="a")
    later = TASMOTA.replace(b"12:00:00", b"12:05:00", 1)
    (first,) = one(ingest, "tele/p/SENSOR", TASMOTA)
    (resend,) = one(ingest, "tele/p/SENSOR", TASMOTA)
    (after,) = one(ingest, "tele/p/SENSOR", later)
    assert resend == first
    assert (first.seq, after.seq) == (0, 1)  # no seq used up by the resend: no gap


def test_esphome_plain_values_and_identity_without_time() -> None:
    ingest = Ingest([rule(preset="esphome", site="home")], run="run1")
    (temp,) = one(ingest, "livingroom/sensor/temperature/state", b"21.5")
    (motion,) = one(ingest, "livingroom/binary_sensor/motion/state", b"ON")
    (text,) = one(ingest, "livingroom/text_sensor/wifi_ssid/state", b"home-net")
    assert values(temp) == {"temperature": (21.5, None)}
    assert values(motion) == {"motion": (True, None)}
    assert values(text) == {"wifi_ssid": ("home-net", None)}
    assert temp.ts_ms == NOW_MS  # no time in the payload: the receive time
    (again,) = one(ingest, "livingroom/sensor/temperature/state", b"21.5")
    assert again.id != temp.id  # a new reading with the same value is a new message
    (redelivered,) = one(ingest, "livingroom/sensor/temperature/state", b"21.5", dup=True)
    assert redelivered == again  # the DUP flag finds the last mapping of these bytes
    nan = ingest.map("livingroom/sensor/temperature/state", b"nan", NOW_MS)
    assert nan is not None
    assert nan[1].error == MappingError("value", "value 'nan' is not a finite number")


def test_zigbee2mqtt_preset_with_and_without_last_seen() -> None:
    ingest = Ingest([rule(preset="zigbee2mqtt", site="flat")])
    (mapped,) = one(ingest, "zigbee2mqtt/kitchen sensor", ZIGBEE)
    assert mapped.device == "kitchen_sensor"  # invalid name characters become _
    assert mapped.ts_ms == 1_704_110_400_000
    assert values(mapped) == {
        "battery": (97, "%"),
        "humidity": (48.2, "%RH"),
        "linkquality": (120, None),
        "temperature": (21.5, "Cel"),
        "voltage": (3000, "mV"),
    }
    bare = json.dumps({"temperature": 20.0}).encode()
    (plain,) = one(ingest, "zigbee2mqtt/kitchen", bare)
    assert plain.ts_ms == NOW_MS
    (epoch,) = one(
        ingest, "zigbee2mqtt/k", json.dumps({"temperature": 1, "last_seen": 1704110400000}).encode()
    )
    assert epoch.ts_ms == 1_704_110_400_000


def test_shelly_preset_reads_notify_status_params() -> None:
    ingest = Ingest([rule(preset="shelly", site="home")])
    (mapped,) = one(ingest, "shellyplus1pm-a8032ab12345/events/rpc", SHELLY)
    assert mapped.device == "shellyplus1pm-a8032ab12345"
    assert mapped.ts_ms == 1_704_110_400_120
    assert values(mapped) == {
        "switch_0.apower": (12.5, "W"),
        "switch_0.voltage": (230.1, "V"),
        "switch_0.current": (0.06, "A"),
        "switch_0.aenergy.total": (1234.5, "W.h"),
        "switch_0.temperature.tC": (40.1, "Cel"),
    }
    as_envelope(mapped)
    event = (
        b'{"src":"x","method":"NotifyEvent","params":{"ts":1.5,"events":[{"event":"btn_down"}]}}'
    )
    refused = ingest.map("x/events/rpc", event, NOW_MS)
    assert refused is not None
    assert refused[1].error is not None
    assert refused[1].error.what == "no_values"


def test_line_protocol_groups_per_device_and_time_with_escapes() -> None:
    parsed = parse_lines(b'm\\,x,t\\ k=v\\=1 f\\ 1="q\\\\ \\"z\\"",b=F 5')
    assert parsed[0].measurement == "m,x"
    assert parsed[0].tags == {"t k": "v=1"}
    assert parsed[0].fields == {"f 1": 'q\\ "z"', "b": False}
    assert parsed[0].timestamp == 5
    ingest = Ingest([rule(filter="telegraf/{site}", format="line", units={"temperature": "Cel"})])
    mapped = one(ingest, "telegraf/lab", LINES)
    by_device = {m.device: m for m in mapped}
    assert set(by_device) == {"pi-1", "pi-2"}
    pi1 = by_device["pi-1"]
    assert pi1.site == "lab"
    assert pi1.ts_ms == 1_700_000_000_000
    assert values(pi1) == {
        "weather.temperature": (21.5, "Cel"),
        "weather.humidity": (45, None),
        "weather.ok": (True, None),
        "weather.label": ('a "b"', None),
        "cpu.usage_idle": (97.5, None),
    }
    assert dict(pi1.tags) == {"room": "kitchen", "cpu": "cpu-total"}
    assert len({m.id for m in mapped}) == 2
    assert [m.id for m in one(Ingest(ingest_rules(ingest)), "telegraf/lab", LINES)] == [
        m.id for m in mapped
    ]
    bad = ingest.map("telegraf/lab", b"weather,host=a temperature=abc 1", NOW_MS)
    assert bad is not None
    assert bad[1].error is not None
    assert bad[1].error.what == "line"


def ingest_rules(ingest: Ingest) -> list[IngestRule]:
    return [r.settings for r in ingest.rules]


def test_json_values_map_time_formats_and_counter() -> None:
    ingest = Ingest(
        [
            rule(
                filter="plant/{site}/{device}",
                site="{site}",
                device="{device}",
                format="json",
                values={"m.t": "temp", "state": "state"},
                time_field="at",
                time_format="epoch_ms",
                counter_field="n",
            )
        ]
    )
    (mapped,) = one(ingest, "plant/s1/d1", b'{"m":{"t":5,"x":9},"state":"run","at":1000,"n":7}')
    assert values(mapped) == {"temp": (5, None), "state": ("run", None)}
    assert (mapped.ts_ms, mapped.seq, mapped.boot) == (1000, 7, None)
    bad_time = ingest.map("plant/s1/d1", b'{"m":{"t":5},"at":"soon"}', NOW_MS)
    assert bad_time is not None
    assert bad_time[1].error is not None
    assert bad_time[1].error.what == "time"
    not_json = ingest.map("plant/s1/d1", b"{nope", NOW_MS)
    assert not_json is not None
    assert not_json[1].error is not None
    assert not_json[1].error.what == "json"
    assert ingest.map("other/s1/d1", b"{}", NOW_MS) is None


def test_first_matching_rule_wins_and_captures_subscribe_as_plus() -> None:
    ingest = Ingest(
        [
            rule(
                name="a",
                filter="x/{device}/t",
                site="s",
                device="{device}",
                format="plain",
                sensor="t",
            ),
            rule(name="b", filter="x/#", site="s", device="all", format="plain", sensor="v"),
        ]
    )
    assert ingest.subscriptions == ["x/+/t", "x/#"]
    first = ingest.map("x/d/t", b"1", NOW_MS)
    second = ingest.map("x/d/u", b"1", NOW_MS)
    assert first is not None
    assert first[0] == "a"
    assert second is not None
    assert second[0] == "b"


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            'name = "bad"\nfilter = "a/{dev}ice"\nformat = "json"\nsite = "s"\ndevice = "d"',
            "a capture must be a whole level",
        ),
        ('name = "bad"\nfilter = "a/#/b"\nformat = "json"\nsite = "s"\ndevice = "d"', "'#'"),
        ('name = "bad"\nfilter = "a/b"\nformat = "xml"\nsite = "s"\ndevice = "d"', "format"),
        ('name = "bad"\npreset = "sonoff"\nsite = "s"', "preset"),
        (
            'name = "bad"\nfilter = "a/{device}"\nformat = "json"\nsite = "{site}"\ndevice = "{device}"',
            "{site} is not a capture",
        ),
        (
            'name = "bad"\npreset = "tasmota"\nsite = "s"\nunits = {Power = "watts-per-something"}',
            "at most 16 characters",
        ),
        ('name = "bad"\npreset = "tasmota"', "required"),
        ('name = "bad"\npreset = "tasmota"\nsite = "s"\nunits = "W"', "valid dictionary"),
        ('name = "bad"\npreset = "tasmota"\nsite = "s"\ntimezone = "Mars/Olympus"', "IANA"),
        ('name = "bad"\npreset = "tasmota"\nsite = "s"\nsurprise = 1', "unknown setting"),
    ],
)
def test_a_rule_that_cannot_work_is_one_line_naming_it(
    tmp_path: Path, table: str, expected: str
) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(f"[[bridge.ingest]]\n{table}\n")
    with pytest.raises(ConfigError) as caught:
        load(BridgeSettings, "bridge", config_file=path, environ={})
    text = str(caught.value)
    assert "\n" not in text
    assert expected in text
    assert "bridge.ingest.0" in text
    assert "rule 'bad': " in text


def test_duplicate_rule_names_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(
        '[[bridge.ingest]]\nname = "a"\npreset = "esphome"\nsite = "s"\n'
        '[[bridge.ingest]]\nname = "a"\npreset = "shelly"\nsite = "s"\n'
    )
    with pytest.raises(
        ConfigError, match=r"bridge\.ingest\.1\.name='a': rule names must be unique"
    ):
        load(BridgeSettings, "bridge", config_file=path, environ={})


# -- the bridge with in-memory clients ----------------------------------------------------------


class FakeStateful:
    """A stand-in for a stateful format: asks for a birth once, then maps one reading."""

    def __init__(self) -> None:
        self.seen = 0

    def handle(self, topic: str, payload: bytes, received_ms: int) -> FormatOutcome:
        self.seen += 1
        if self.seen == 1:
            return FormatOutcome(commands=(("spBv1.0/g/NCMD/n", b"rebirth"),))
        return FormatOutcome(
            (Mapped("s", "n", received_ms, (Reading("m", 1.0),), f"fake-{self.seen}", self.seen),)
        )


BridgeParts = tuple[Bridge, MemorySubscriber, MemoryPublisher]


@contextlib.contextmanager
def running(tmp_path: Path, **fields: Any) -> Iterator[BridgeParts]:
    """A bridge on its own thread between in-memory clients, with a line-protocol, a plain
    and a (fake) stateful rule."""
    rules = (
        rule(name="tg", filter="telegraf/{site}", format="line"),
        rule(name="sp", filter="spBv1.0/#", format="sparkplug"),
        rule(name="esp", preset="esphome", site="home"),
    )
    publisher = MemoryPublisher()
    settings = BridgeSettings(
        spool_path=tmp_path / "spool.db", spool_durability="process", ingest=rules, **fields
    )
    bridge = Bridge(
        settings,
        subscriber=MemorySubscriber().bind,
        publisher=publisher.bind,
        spool=Spool(settings.spool_path, durability="process"),
        serve_http=False,
        stateful=lambda _rule: FakeStateful(),
    )
    thread = threading.Thread(target=bridge.run, name="test-bridge", daemon=True)
    thread.start()
    subscriber = bridge.mqtt
    assert isinstance(subscriber, MemorySubscriber)
    wait_for(lambda: subscriber.subscriptions, 5, "the bridge subscribed")
    try:
        yield bridge, subscriber, publisher
    finally:
        publisher.confirm()  # nothing left unconfirmed: the bridge stops without waiting
        bridge.stop()
        thread.join(10)
        assert not thread.is_alive(), "bridge did not stop"


@pytest.fixture
def memory_bridge(tmp_path: Path) -> Iterator[BridgeParts]:
    with running(tmp_path) as parts:
        yield parts


def forwarded(bridge: Bridge) -> float:
    return bridge.metrics.forwarded._value.get()


def test_bridge_acks_a_multi_envelope_message_after_every_confirm(
    memory_bridge: tuple[Bridge, MemorySubscriber, MemoryPublisher],
) -> None:
    bridge, mqtt, amqp = memory_bridge
    assert {"telegraf/+", "spBv1.0/#", "iotpipe/v1/+/+/telemetry"} <= {
        f for f, _ in mqtt.subscriptions
    }
    mid = mqtt.deliver("telegraf/lab", LINES)
    published = amqp.wait_published(2)
    assert {p.routing_key for p in published} == {
        "iotpipe.v1.lab.pi-1.telemetry",
        "iotpipe.v1.lab.pi-2.telemetry",
    }
    amqp.confirm(1)
    wait_for(lambda: forwarded(bridge) == 1, 5, "the first confirm applied")
    assert mid not in mqtt.acked  # one of its two envelopes is still unconfirmed
    amqp.confirm()
    wait_for(lambda: mqtt.acked == [mid], 5, "the message acked after both confirms")
    # A stateful format's commands go out on MQTT, QoS 0; a message with no envelope is acked.
    birth = mqtt.deliver("spBv1.0/g/NDATA/n", b"\x00")
    wait_for(lambda: mqtt.acked == [mid, birth], 5, "a message without envelopes acked")
    assert [(m.topic, m.payload, m.qos) for m in mqtt.published] == [
        ("spBv1.0/g/NCMD/n", b"rebirth", 0)
    ]
    data = mqtt.deliver("spBv1.0/g/NDATA/n", b"\x01")
    (sparkplug,) = amqp.wait_published(3)[2:]
    assert sparkplug.routing_key == "iotpipe.v1.s.n.telemetry"
    # A foreign message no rule matches is dead-lettered as before.
    mqtt.deliver("somewhere/else", b"x")
    (dead,) = amqp.wait_published(4)[3:]
    assert dead.exchange == "iotpipe.dead"
    assert dead.routing_key == "bridge.bad_topic"
    amqp.confirm()
    wait_for(lambda: data in mqtt.acked, 5, "mapped message acked")


def test_a_redelivery_without_time_keeps_its_id_within_the_run(
    memory_bridge: BridgeParts,
) -> None:
    """ESPHome has no time in its payload: the DUP flag of the redelivery finds the id."""
    _bridge, mqtt, amqp = memory_bridge
    topic = "node1/sensor/temperature/state"
    mqtt.deliver(topic, b"21.5")
    (first,) = amqp.wait_published(1)
    mqtt.drop()  # unacknowledged: the broker sends it again, marked DUP
    wait_for(lambda: mqtt.reconnects == 1, 5, "the bridge reconnected")
    again = amqp.wait_published(2)[1]
    assert again.body == first.body
    mqtt.deliver(topic, b"21.5")  # the same value again, not a redelivery: a new message
    third = amqp.wait_published(3)[2]
    assert json.loads(third.body)["id"] != json.loads(first.body)["id"]
    assert json.loads(third.body)["seq"] == json.loads(first.body)["seq"] + 1


def test_per_device_limits_apply_to_mapped_envelopes(tmp_path: Path) -> None:
    limits = {"policy": "dead_letter", "rate": 1.0, "burst": 1.0}
    with running(tmp_path, limits=limits) as (_bridge, mqtt, amqp):
        for value in (b"1", b"2"):
            mqtt.deliver("node1/sensor/t/state", value)
        first, second = amqp.wait_published(2)
    assert first.routing_key == "iotpipe.v1.home.node1.telemetry"
    assert second.exchange == "iotpipe.dead"
    assert second.routing_key == "bridge.rate_limited"


def test_a_retained_copy_without_time_is_counted_not_forwarded(
    memory_bridge: BridgeParts,
) -> None:
    """ESPHome retains its states: the copy the broker sends at subscribe time is stale."""
    bridge, mqtt, amqp = memory_bridge
    stale = mqtt.deliver("node1/sensor/temperature/state", b"21.5", retain=True)
    wait_for(lambda: mqtt.acked == [stale], 5, "the retained copy acked")
    assert amqp.messages == []
    assert bridge.metrics.received.labels("retained_copy")._value.get() == 1
    ingest = Ingest([rule(preset="tasmota", site="home")])
    timed = ingest.map("tele/p/SENSOR", TASMOTA, NOW_MS, retain=True)
    assert timed is not None
    assert len(timed[1].mapped) == 1  # with a time the id recognises it: forwarded


# -- iotpipe ingest try -------------------------------------------------------------------------


def test_try_prints_envelopes_and_rejections(tmp_path: Path) -> None:
    from iotpipe.cli import app

    config = tmp_path / "bridge.toml"
    config.write_text('[[bridge.ingest]]\nname = "plugs"\npreset = "tasmota"\nsite = "home"\n')
    payload = tmp_path / "sensor.json"
    payload.write_bytes(TASMOTA)
    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "ingest",
            "try",
            "-c",
            str(config),
            "--topic",
            "tele/p1/SENSOR",
            "--payload-file",
            str(payload),
        ],
    )
    assert ok.exit_code == 0, ok.output
    lines = ok.output.strip().splitlines()
    assert json.loads(lines[0])["device"] == "p1"
    assert lines[-1] == "1 message: 1 envelope, 0 rejected"
    bad = runner.invoke(
        app, ["ingest", "try", "-c", str(config), "--topic", "tele/p1/SENSOR", "--payload", "{oops"]
    )
    assert bad.exit_code == 1
    assert bad.output.startswith("rejected bridge.mapping_json: payload is not JSON")
    assert "(rule plugs)" in bad.output
    usage = runner.invoke(app, ["ingest", "try", "-c", str(config), "--topic", "t"])
    assert usage.exit_code == 2


def test_sample_config_rules_load_and_map(tmp_path: Path) -> None:
    """configs/bridge.toml's [[bridge.ingest]] samples, uncommented, load and map their payloads."""
    sample = Path(__file__).resolve().parents[2] / "configs" / "bridge.toml"
    block = sample.read_text().split("\n## Ingest rules")[1]
    lines = [line.removeprefix("# ") for line in block.splitlines() if line.startswith("# ")]
    config = tmp_path / "bridge.toml"
    config.write_text("\n".join(lines) + "\n")
    settings = load(BridgeSettings, "bridge", config_file=config, environ={})
    names = [r.name for r in settings.ingest]
    assert names == ["plugs", "esphome", "zigbee", "relays", "telegraf", "boilers", "factory"]
    ingest = Ingest(settings.ingest, stateful=lambda _rule: FakeStateful())
    cases = {
        "tele/p1/SENSOR": (TASMOTA, "plugs"),
        "esp1/sensor/t/state": (b"1", "esphome"),
        "zigbee2mqtt/k": (ZIGBEE, "zigbee"),
        "shelly1/events/rpc": (SHELLY, "relays"),
        "telegraf/lab/x": (LINES, "telegraf"),
        "plant/s/b1/data": (b'{"temp":{"flow":60,"return":40},"ts":5,"n":1}', "boilers"),
    }
    for topic, (payload, name) in cases.items():
        result = ingest.map(topic, payload, NOW_MS)
        assert result is not None
        assert result[0] == name
        assert result[1].error is None, (topic, result[1].error)
        for mapped in result[1].mapped:
            as_envelope(mapped)
    (boiler,) = ingest.map("plant/s/b1/data", cases["plant/s/b1/data"][0], NOW_MS)[1].mapped  # type: ignore[index]
    assert values(boiler) == {"flow_temperature": (60, "Cel"), "return_temperature": (40, "Cel")}
    assert boiler.device == "boiler-b1"


def test_try_a_recording_of_a_mixed_fleet(tmp_path: Path) -> None:
    from iotpipe.cli import app
    from iotpipe.recording import RecordedMessage, write_recording

    config = tmp_path / "bridge.toml"
    config.write_text(
        '[[bridge.ingest]]\nname = "plugs"\npreset = "tasmota"\nsite = "home"\n'
        '[[bridge.ingest]]\nname = "tg"\nfilter = "telegraf/{site}"\nformat = "line"\n'
    )
    recording = tmp_path / "fleet.jsonl"
    write_recording(
        recording,
        [
            RecordedMessage(0.0, "tele/p1/SENSOR", TASMOTA),
            RecordedMessage(0.1, "telegraf/lab", LINES),
            RecordedMessage(0.2, "unknown/topic", b"1"),
        ],
    )
    result = CliRunner().invoke(app, ["ingest", "try", "-c", str(config), "-r", str(recording)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert [json.loads(line)["device"] for line in lines[:3]] == ["p1", "pi-1", "pi-2"]
    assert lines[3].startswith("rejected bridge.bad_topic:")
    assert lines[3].endswith("(no rule matches)")
    assert lines[4] == "3 messages: 3 envelopes, 1 rejected"


def test_envelope_rule_keeps_the_envelopes_identity_and_refuses_a_broken_one() -> None:
    from tests.bridge.test_bridge import envelope

    ingest = Ingest([rule(filter="legacy/#", format="envelope", units={"t": "Cel"})])
    body = envelope("home", "pi-1", 7, readings=[{"sensor": "t", "value": 1.5}])
    (mapped,) = one(ingest, "legacy/pi-1", body)
    sent = json.loads(body)
    assert (mapped.id, mapped.seq, mapped.site, mapped.device) == (
        sent["id"],
        7,
        "home",
        "pi-1",
    )
    assert values(mapped) == {"t": (1.5, "Cel")}
    refused = ingest.map("legacy/pi-1", envelope("home", "pi-1", 8, readings=[]), NOW_MS)
    assert refused is not None
    assert refused[1].error is not None
    assert refused[1].error.what == "envelope"


def test_a_stateful_formats_bug_is_a_dead_letter_not_a_crash() -> None:
    class Broken:
        def handle(self, topic: str, payload: bytes, received_ms: int) -> FormatOutcome:
            if payload == b"raise":
                raise RuntimeError("boom")
            bad = Mapped("a site", "d", received_ms, (Reading("t", 1),), "x", 0)
            return FormatOutcome((bad,))

    ingest = Ingest([rule(filter="sp/#", format="sparkplug")], stateful=lambda _r: Broken())
    crashed = ingest.map("sp/x", b"raise", NOW_MS)
    invalid = ingest.map("sp/x", b"ok", NOW_MS)
    assert crashed is not None
    assert crashed[1].error == MappingError("internal", "mapping failed: RuntimeError: boom")
    assert invalid is not None
    assert invalid[1].error is not None
    assert invalid[1].error.what == "name"


def test_mapped_envelope_properties_are_the_telemetry_ones_plus_the_rule() -> None:
    from dataclasses import replace

    from iotpipe.amqp import telemetry_properties

    mapped = Mapped("home", "plug-1", NOW_MS, (Reading("t", 1.5, "Cel"),), "abc123", 4, "r1")
    for received_at in (1_700_000_000.7, 1_800_000_000.0):
        routed = routed_mapped(Message("tele/plug-1/SENSOR", b"{}"), "plugs", mapped, received_at)
        expected = telemetry_properties(
            message_id="abc123",
            version="1.0",
            site="home",
            device="plug-1",
            topic="tele/plug-1/SENSOR",
            kind="telemetry",
            received_at=received_at,
        )
        headers = {**(expected.headers or {}), "x-iotpipe-rule": "plugs"}
        assert routed.properties == replace(expected, headers=headers)
        assert routed.routing_key == "iotpipe.v1.home.plug-1.telemetry"
