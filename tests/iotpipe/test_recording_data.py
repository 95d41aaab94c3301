"""The shipped simulator recording has the properties tests/data/README.md promises.

End-to-end tests rely on these numbers (e.g. "the store holds 1232 readings"); if the file is
regenerated with other settings, update the README and these constants together.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from iotpipe.envelope import Envelope, Rejection, Status, decode, reading_time_ms
from iotpipe.recording import FORMAT, read_recording

MESSAGES = 233
TELEMETRY = 209
STATUS = 24
REJECTED = {"bad_json": 7, "schema": 9, "too_large": 1, "topic_mismatch": 7}
VALID_TELEMETRY = 185
DISTINCT_IDS = 176
DISTINCT_READINGS = 1232


def decoded(path: Path) -> list[Envelope | Status | Rejection]:
    """Every message of the recording, decoded against the wire contract."""
    _header, messages = read_recording(path, allow_truncated=False)
    return [decode(m.topic, m.payload) for m in messages]


def test_shipped_recording_is_a_complete_v1_file(shipped_recording: Path) -> None:
    """The file has a 1.x header for iotpipe/#, the documented message count, and no cut line."""
    first = shipped_recording.read_text(encoding="utf-8").splitlines()[0]
    assert FORMAT in first
    header, messages = read_recording(shipped_recording, allow_truncated=False)
    assert header.version.startswith("1.")
    assert header.filters == ("iotpipe/#",)
    assert len(messages) == MESSAGES
    kinds = Counter(m.topic.rsplit("/", 1)[-1] for m in messages)
    assert kinds == {"telemetry": TELEMETRY, "status": STATUS}
    assert messages[-1].offset > 1.0  # real pacing, not a burst


def test_shipped_recording_contains_every_rejected_fault(shipped_recording: Path) -> None:
    """Truncated, schema-breaking, oversized and mismatched payloads are rejected by decode."""
    reasons = Counter(
        r.reason.value for r in decoded(shipped_recording) if isinstance(r, Rejection)
    )
    assert reasons == REJECTED


def test_shipped_recording_contains_duplicates_and_reordering(shipped_recording: Path) -> None:
    """Valid telemetry repeats some ids and has some devices' seq out of order."""
    envelopes = [r for r in decoded(shipped_recording) if isinstance(r, Envelope)]
    assert len(envelopes) == VALID_TELEMETRY
    assert len({e.id for e in envelopes}) == DISTINCT_IDS
    seqs: dict[tuple[str, str, str | None], list[int]] = defaultdict(list)
    for e in envelopes:
        seqs[e.site, e.device, e.boot].append(e.seq)
    assert any(s != sorted(s) for s in seqs.values())


def test_shipped_recording_has_a_known_number_of_distinct_readings(shipped_recording: Path) -> None:
    """Deduplicated by (site, device, sensor, time), the valid readings number DISTINCT_READINGS."""
    keys = {
        (e.site, e.device, reading.sensor, reading_time_ms(e, reading))
        for e in decoded(shipped_recording)
        if isinstance(e, Envelope)
        for reading in e.readings
    }
    assert len(keys) == DISTINCT_READINGS


def test_shipped_recording_has_births_and_wills(shipped_recording: Path) -> None:
    """Every device's online birth and offline status are in the recording."""
    states = Counter(r.state for r in decoded(shipped_recording) if isinstance(r, Status))
    assert states == {"online": 12, "offline": 12}
