"""Regenerate tests/data/mixed-fleet.jsonl: a mixed fleet, every format, recorded deterministically.

Run from the repository root with the project's interpreter::

    .venv/bin/python tests/data/make_mixed_recording.py

Unlike ``make_recording.py`` no broker is involved: each format's fleet runs in-process on
in-memory links (``simulator.link.MemoryLink``) with a simulated clock, every publish is stamped
with that clock, and the seven runs are merged in time order into one recording. The file is
therefore a pure function of the settings below: regenerating it gives the same bytes, and
``tests/iotpipe/test_mixed_recording_data.py`` checks that the shipped file is exactly what this
script makes. What each message looks like to a live subscriber is what it records: retained
availability messages delivered live carry ``"retain": false``, as in a real recording.

It prints the properties documented in tests/data/README.md.
"""

from __future__ import annotations

import collections
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from iotpipe.mqtt import Will
from iotpipe.recording import Header, RecordedMessage, read_recording, write_recording
from simulator.link import MemoryLink
from simulator.run import Simulation, Summary
from simulator.settings import SimulateSettings

HERE = Path(__file__).resolve().parent
TARGET = HERE / "mixed-fleet.jsonl"

SEED = 4  # the first seed that gives every fleet at least one of each of its faults
START = datetime(2026, 11, 1, tzinfo=UTC)

#: Settings shared by every format's fleet (each its own seed, SEED + its place in FLEETS): one site, three devices, one sample a second each
#: (simulated; paced at 4x), twenty samples per device, no receipts (the envelope fleet's
#: receipts would wait for a pipeline).
COMMON: dict[str, Any] = {
    "seed": SEED,
    "start": START,
    "devices": 3,
    "rate": 1,
    "speed": 4,
    "count": 60,
    "receipts": "off",
}

#: Each format's fleet: device names, sensors (what such a device has) and faults.
FLEETS: dict[str, dict[str, Any]] = {
    "envelope": {
        "device_pattern": "env-{n}",
        "faults": {"duplicate": 0.05, "offline": 0.04},
    },
    "tasmota": {
        "device_pattern": "tasmota-{n}",
        "sensors": ["temperature", "humidity", "pressure", "power", "door"],
        "faults": {"duplicate": 0.05, "malformed": 0.06, "offline": 0.04},
    },
    "esphome": {
        "device_pattern": "esp-{n}",
        "sensors": ["temperature", "humidity", "motion"],
        "faults": {"duplicate": 0.05, "offline": 0.04},
    },
    "zigbee2mqtt": {
        "device_pattern": "z2m-{n}",
        "sensors": ["temperature", "humidity", "pressure", "battery", "door"],
        "faults": {"duplicate": 0.05, "malformed": 0.06, "offline": 0.04},
    },
    "shelly": {
        "device_pattern": "shelly-{n}",
        "sensors": ["power", "temperature"],
        "faults": {"duplicate": 0.05, "malformed": 0.06, "offline": 0.04},
    },
    "line": {
        "device_pattern": "telegraf-{n}",
        "sensors": ["temperature", "humidity", "pressure", "power", "door"],
        "faults": {"duplicate": 0.05, "malformed": 0.06},
    },
    "sparkplug": {
        "device_pattern": "spb-{n}",
        "sensors": ["temperature", "humidity", "pressure", "power", "door"],
        "faults": {"duplicate": 0.1, "malformed": 0.06, "offline": 0.04},
    },
}

#: The subscriptions that record all of it (the header's ``filters``).
FILTERS = (
    "iotpipe/#",
    "tele/#",
    "+/sensor/+/state",
    "+/binary_sensor/+/state",
    "+/status",
    "zigbee2mqtt/#",
    "+/events/rpc",
    "+/online",
    "telegraf/#",
    "spBv1.0/#",
)


class _Clock:
    """Simulated monotonic time: moves only when the run waits (sleeps or pumps)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _TimedLink(MemoryLink):
    """A MemoryLink that stamps every publish with the simulated clock."""

    def __init__(self, clock: _Clock, will: Will | None) -> None:
        super().__init__(will)
        self.clock = clock
        self.times: list[float] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        self.times.append(self.clock())
        return super().publish(topic, payload, qos, retain)

    def pump(self, timeout: float = 0.0) -> None:
        self.clock.now += timeout  # waiting for the network takes (simulated) time
        super().pump(timeout)


def run_fleet(name: str) -> tuple[Summary, list[tuple[float, RecordedMessage]]]:
    """One format's fleet: its summary and its messages with their publish times."""
    clock = _Clock()
    links: list[_TimedLink] = []

    def factory(index: int, will: Will | None) -> _TimedLink:
        del index
        links.append(_TimedLink(clock, will))
        return links[-1]

    # Each fleet its own seed: the fault draws follow the seed, not the format.
    seed = SEED + list(FLEETS).index(name)
    settings = SimulateSettings(**{**COMMON, "seed": seed}, **FLEETS[name], format=name)
    summary = Simulation(
        settings, factory, clock=clock, wall=START.timestamp, sleep=clock.sleep
    ).run()
    timed = [
        (t, RecordedMessage(0.0, m.topic, m.payload, m.qos, False))
        for link in links
        for t, m in zip(link.times, link.messages, strict=True)
    ]
    return summary, timed


def build() -> tuple[Header, list[RecordedMessage], dict[str, Summary]]:
    """The recording: header, messages in time order, and each fleet's simulator summary."""
    merged: list[tuple[float, int, int, RecordedMessage]] = []
    summaries: dict[str, Summary] = {}
    for order, name in enumerate(FLEETS):
        summaries[name], timed = run_fleet(name)
        merged.extend((t, order, i, message) for i, (t, message) in enumerate(timed))
    merged.sort(key=lambda entry: entry[:3])
    first = merged[0][0]
    messages = [
        RecordedMessage(round(t - first, 6), m.topic, m.payload, m.qos, m.retain)
        for t, _order, _i, m in merged
    ]
    header = Header(
        created=START,
        source="simulator, in-process (tests/data/make_mixed_recording.py)",
        filters=FILTERS,
        extra={"seed": SEED, "formats": list(FLEETS)},
    )
    return header, messages, summaries


def format_of(topic: str) -> str:
    """Which fleet published on ``topic`` (by the device names of :data:`FLEETS`)."""
    if topic.startswith("iotpipe/"):
        return "envelope"
    if topic.startswith("tele/"):
        return "tasmota"
    if topic.startswith("zigbee2mqtt/"):
        return "zigbee2mqtt"
    if topic.startswith("telegraf/"):
        return "line"
    if topic.startswith("spBv1.0/"):
        return "sparkplug"
    if topic.startswith("shelly-"):
        return "shelly"
    if topic.startswith("esp-"):
        return "esphome"
    raise ValueError(f"no fleet publishes on {topic}")


_AVAILABILITY = ("/status", "/LWT", "/availability", "/online")


def is_availability(topic: str) -> bool:
    """Whether ``topic`` says a device is there or gone (Sparkplug: its births and deaths)."""
    return topic.endswith(_AVAILABILITY) or "/NBIRTH/" in topic or "/NDEATH/" in topic


def describe(messages: list[RecordedMessage], summaries: dict[str, Summary]) -> dict[str, Any]:
    """The properties tests/data/README.md documents, per format."""
    per: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for m in messages:
        kind = "availability" if is_availability(m.topic) else "telemetry"
        per[format_of(m.topic)][kind] += 1
    return {
        "messages": len(messages),
        "span_s": messages[-1].offset,
        "formats": {
            name: {
                **per[name],
                "samples": summaries[name].messages,
                "malformed": summaries[name].faults.get("malformed", 0),
                "duplicates": summaries[name].faults.get("duplicate", 0),
                "outages": summaries[name].faults.get("offline", 0),
                "resent": summaries[name].resent,
            }
            for name in FLEETS
        },
    }


def main() -> None:
    header, messages, summaries = build()
    write_recording(TARGET, messages, header, overwrite=True)
    _header, back = read_recording(TARGET, allow_truncated=False)
    if back != messages:
        sys.exit("make_mixed_recording: the file does not read back as written")
    print(json.dumps(describe(messages, summaries), indent=2))


if __name__ == "__main__":
    main()
