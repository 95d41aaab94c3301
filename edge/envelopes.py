"""Telemetry envelopes and status messages of wire contract 1.0, built without pydantic.

The agent builds a few envelopes a minute on a small computer, so this module writes the JSON
with the standard library and checks each sample against the contract's rules as it is added
(:func:`sample_problem`): one bad sample is dropped and counted, never allowed to make the
bridge dead-letter the whole envelope. ``tests/edge`` decodes what it builds with the core codec
(``iotpipe.envelope``) to prove the two agree.

Envelope layout: ``ts`` is the time of the batch's first reading (integer epoch milliseconds);
a reading carries its own ``ts`` only when it differs from that. ``id`` is ``{boot}-{seq}``,
minted once and stored with the payload, so a retransmission keeps it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence

from edge.sensors.base import Sample

__all__ = [
    "CONTRACT_VERSION",
    "MAX_READINGS",
    "build_envelope",
    "message_id",
    "sample_problem",
    "status_payload",
    "status_topic",
    "telemetry_topic",
]

CONTRACT_VERSION = "1.0"
MAX_READINGS = 1000
_MAX_VALUE_LENGTH = 256
_MAX_UNIT_LENGTH = 16
_SENSOR_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)
_INT64 = 2**63
_MAX_TS_MS = 253_402_300_799_999


def telemetry_topic(site: str, device: str) -> str:
    """``iotpipe/v1/{site}/{device}/telemetry``."""
    return f"iotpipe/v1/{site}/{device}/telemetry"


def status_topic(site: str, device: str) -> str:
    """``iotpipe/v1/{site}/{device}/status``."""
    return f"iotpipe/v1/{site}/{device}/status"


def message_id(boot: str, seq: int) -> str:
    """The envelope id: ``{boot}-{seq}``, unique because ``boot`` is (see ``edge.outbox``)."""
    return f"{boot}-{seq}"


def sample_problem(sample: Sample, known_names: set[str]) -> str | None:
    """Why ``sample`` cannot go on the wire, or None if it can.

    Args:
        sample: a driver's reading.
        known_names: sensor names already checked (grown here, so each name is matched once).
    """
    name = sample.sensor
    if name not in known_names:
        if not isinstance(name, str) or _SENSOR_RE.fullmatch(name) is None:
            return f"sensor name {name!r} must be 1-64 characters of A-Z a-z 0-9 _ - ."
        known_names.add(name)
    problem = _value_problem(sample.value)
    unit = sample.unit
    if (
        problem is None
        and unit is not None
        and (not isinstance(unit, str) or len(unit) > _MAX_UNIT_LENGTH)
    ):
        problem = f"unit {unit!r} must be a string of at most {_MAX_UNIT_LENGTH} characters"
    if problem is None and (
        not isinstance(sample.ts_ms, int) or not 0 <= sample.ts_ms <= _MAX_TS_MS
    ):
        problem = f"reading time {sample.ts_ms!r} is not epoch milliseconds"
    return problem


def _value_problem(value: object) -> str | None:
    if isinstance(value, float):
        return None if math.isfinite(value) else f"value {value!r} is not a finite number"
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if -_INT64 <= value < _INT64 else "integer value does not fit in 64 bits"
    if isinstance(value, str):
        if len(value) > _MAX_VALUE_LENGTH:
            return f"string value is {len(value)} characters, the limit is {_MAX_VALUE_LENGTH}"
        return None
    return f"value of type {type(value).__name__} is not a number, boolean or string"


def build_envelope(
    *,
    site: str,
    device: str,
    boot: str,
    seq: int,
    samples: Sequence[Sample],
    tags: Mapping[str, str] | None = None,
) -> bytes:
    """Encode one telemetry envelope (compact UTF-8 JSON).

    Args:
        site: the site name (valid per the contract).
        device: the device name (valid per the contract).
        boot: the counter's boot label.
        seq: this envelope's sequence number.
        samples: 1-1000 samples, each already accepted by :func:`sample_problem`.
        tags: extra labels (at most 16), or None.
    """
    if not 1 <= len(samples) <= MAX_READINGS:
        raise ValueError(f"an envelope carries 1-{MAX_READINGS} readings, got {len(samples)}")
    ts = samples[0].ts_ms
    readings: list[dict[str, object]] = []
    for sample in samples:
        reading: dict[str, object] = {"sensor": sample.sensor, "value": sample.value}
        if sample.unit is not None:
            reading["unit"] = sample.unit
        if sample.ts_ms != ts:
            reading["ts"] = sample.ts_ms
        readings.append(reading)
    doc: dict[str, object] = {
        "v": CONTRACT_VERSION,
        "id": message_id(boot, seq),
        "site": site,
        "device": device,
        "seq": seq,
        "boot": boot,
        "ts": ts,
        "readings": readings,
    }
    if tags:
        doc["tags"] = dict(tags)
    return _ENCODER.encode(doc).encode()


def status_payload(*, site: str, device: str, state: str, ts_ms: int, agent: str) -> bytes:
    """Encode a retained status message (``online`` birth or ``offline`` will)."""
    return _ENCODER.encode(
        {
            "v": CONTRACT_VERSION,
            "site": site,
            "device": device,
            "state": state,
            "ts": ts_ms,
            "agent": agent,
        }
    ).encode()
