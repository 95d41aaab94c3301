"""tests/data/mixed-fleet.jsonl: exactly what its generator makes, with the documented content."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bridge.sparkplug import SparkplugIngest
from iotpipe import sparkplug
from iotpipe.envelope import Envelope, decode
from iotpipe.recording import read_recording, write_recording
from tests.data import make_mixed_recording as mixed
from tests.simulator.test_formats import parse_line

SHIPPED = Path(__file__).parents[1] / "data" / "mixed-fleet.jsonl"

#: The README's table: per format, (telemetry publishes, availability messages, malformed).
EXPECTED = {
    "envelope": (65, 10, 0),
    "tasmota": (63, 8, 3),
    "esphome": (196, 8, 0),
    "zigbee2mqtt": (64, 10, 2),
    "shelly": (63, 8, 3),
    "line": (64, 0, 4),
    "sparkplug": (62, 10, 1),
}


@pytest.mark.usefixtures("pinned_agent")
def test_shipped_file_is_what_the_generator_makes(tmp_path: Path) -> None:
    """Regenerating the recording gives the shipped file byte for byte: it is reproducible."""
    header, messages, _summaries = mixed.build()
    write_recording(tmp_path / "again.jsonl", messages, header)
    assert (tmp_path / "again.jsonl").read_bytes() == SHIPPED.read_bytes()


def test_recording_holds_every_format_as_documented() -> None:
    """Each format's topics, its availability messages and its unparseable payloads, counted."""
    header, messages = read_recording(SHIPPED, allow_truncated=False)
    assert header.extra["formats"] == list(EXPECTED)
    assert len(messages) == sum(t + a for t, a, _m in EXPECTED.values()) == 631
    assert [m.offset for m in messages] == sorted(m.offset for m in messages)
    telemetry: Counter[str] = Counter()
    availability: Counter[str] = Counter()
    broken: Counter[str] = Counter()
    for m in messages:
        name = mixed.format_of(m.topic)
        if mixed.is_availability(m.topic):
            availability[name] += 1
            continue
        telemetry[name] += 1
        try:
            if name == "envelope":
                assert isinstance(decode(m.topic, m.payload), Envelope)
            elif name == "line":
                parse_line(m.payload)
            elif name == "sparkplug":
                if isinstance(sparkplug.decode_payload(m.payload), sparkplug.DecodeError):
                    raise ValueError(m.payload)
            elif name == "esphome":
                assert m.payload in (b"ON", b"OFF") or float(m.payload) >= 0
            else:
                json.loads(m.payload)
        except ValueError:
            broken[name] += 1
    for name, (published, available, malformed) in EXPECTED.items():
        assert telemetry[name] == published, name
        assert availability[name] == available, name
        assert broken[name] == malformed, name


def test_sparkplug_nodes_map_through_the_bridge() -> None:
    """The Sparkplug nodes' messages, in recorded order, map with the bridge's SparkplugIngest:
    only the malformed one is refused, no data lacks its birth, no message is missing."""
    _header, messages = read_recording(SHIPPED, allow_truncated=False)
    ingest = SparkplugIngest("mixed", {}, {})
    errors: Counter[str] = Counter()
    ids: list[str] = []
    for m in messages:
        if mixed.format_of(m.topic) != "sparkplug":
            continue
        outcome = ingest.handle(m.topic, m.payload, 0)
        if outcome.error is not None:
            errors[outcome.error.what] += 1
        if "/NDATA/" in m.topic:
            ids.extend(e.id for e in outcome.mapped)
    assert errors == {"sparkplug": EXPECTED["sparkplug"][2]}
    assert len(ids) == EXPECTED["sparkplug"][0] - EXPECTED["sparkplug"][2]
    assert len(set(ids)) == 60 - EXPECTED["sparkplug"][2]  # duplicates share their id
    assert ingest.gaps == EXPECTED["sparkplug"][2]  # the malformed one, counted missing
