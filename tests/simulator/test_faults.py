"""Fault injection: each fault produces exactly the kind of bad (or awkward) message it claims."""

from __future__ import annotations

import json
import random

import pytest

from iotpipe import envelope
from iotpipe.envelope import Envelope, Reason, Rejection, decode_telemetry
from simulator import faults
from simulator.faults import Fault, FaultPlan, Outage, Reorderer
from simulator.fleet import Fleet
from simulator.settings import SimulateSettings

T0 = 1_795_651_200_000  # 2026-11-26T00:00:00Z in ms


def _valid(batch: int = 1, seed: int = 1) -> tuple[str, bytes]:
    """A valid envelope from the simulator's own fleet, and its topic."""
    device = Fleet(SimulateSettings(devices=1, batch=batch), seed=seed).devices[0]
    steps = [1000 * (batch - 1 - b) for b in range(batch)] if batch > 1 else []
    payload = device.message(T0, 0, steps)
    assert isinstance(decode_telemetry(payload, device.topic), Envelope)
    return device.topic, payload


def test_payload_limit_matches_the_codec() -> None:
    """The fault module's copy of the payload limit equals the codec's."""
    assert faults.MAX_PAYLOAD == envelope.MAX_PAYLOAD


def test_plan_slices_the_unit_interval_by_rate() -> None:
    """Each fault owns a slice of [0, 1) as wide as its rate, in a fixed order; the rest is none."""
    plan = FaultPlan({Fault.DUPLICATE: 0.1, Fault.MALFORMED: 0.2})
    assert plan.total == pytest.approx(0.3)
    assert plan.choose(0.0) is Fault.DUPLICATE
    assert plan.choose(0.0999) is Fault.DUPLICATE
    assert plan.choose(0.1) is Fault.MALFORMED
    assert plan.choose(0.2999) is Fault.MALFORMED
    assert plan.choose(0.3001) is None
    assert plan.choose(0.999) is None
    assert FaultPlan({}).choose(0.0) is None


def test_plan_frequencies_follow_the_rates() -> None:
    """Over many draws each fault occurs at about its rate."""
    rates = {Fault.DUPLICATE: 0.05, Fault.SCHEMA: 0.1, Fault.OFFLINE: 0.01}
    plan = FaultPlan(rates)
    rng = random.Random(1)
    n = 100_000
    counts = dict.fromkeys(rates, 0)
    for _ in range(n):
        kind = plan.choose(rng.random())
        if kind is not None:
            counts[kind] += 1
    for kind, rate in rates.items():
        assert counts[kind] / n == pytest.approx(rate, rel=0.1)


@pytest.mark.parametrize(
    ("rates", "match"),
    [({Fault.DUPLICATE: 0.6, Fault.REORDER: 0.6}, "sum"), ({Fault.SKEW: 1.5}, "within")],
)
def test_plan_rejects_impossible_rates(rates: dict[Fault, float], match: str) -> None:
    """Rates outside 0..1, or summing past 1, are refused."""
    with pytest.raises(ValueError, match=match):
        FaultPlan(rates)


@pytest.mark.parametrize("seed", range(40))
def test_truncated_payload_is_bad_json(seed: int) -> None:
    """A malformed (truncated) payload fails decoding as bad_json, wherever it is cut."""
    topic, payload = _valid()
    broken = faults.truncate(payload, random.Random(seed))
    assert len(broken) < len(payload)
    result = decode_telemetry(broken, topic)
    assert isinstance(result, Rejection)
    assert result.reason is Reason.BAD_JSON


def test_every_schema_break_is_a_schema_rejection() -> None:
    """Each schema violation keeps valid JSON and is rejected with reason schema."""
    topic, payload = _valid()
    seen: set[str] = set()
    for seed in range(200):
        broken, what = faults.break_schema(payload, random.Random(seed))
        json.loads(broken)  # still JSON
        result = decode_telemetry(broken, topic)
        assert isinstance(result, Rejection), what
        assert result.reason is Reason.SCHEMA, (what, result)
        seen.add(what)
    assert len(seen) == len(faults._SCHEMA_BREAKS)  # every variant was exercised


def test_oversize_payload_is_too_large_and_nothing_else() -> None:
    """An oversized payload is just over 256 KiB, rejected as too_large, otherwise intact."""
    topic, payload = _valid(batch=3)
    big = faults.oversize(payload)
    assert envelope.MAX_PAYLOAD < len(big) <= envelope.MAX_PAYLOAD + 16
    result = decode_telemetry(big, topic)
    assert isinstance(result, Rejection)
    assert result.reason is Reason.TOO_LARGE
    doc = json.loads(big)
    assert set(doc.pop("padding")) == {"x"}
    assert doc == json.loads(payload)
    # The same padding to a smaller size decodes fine: size is the only fault.
    assert isinstance(decode_telemetry(faults.oversize(payload, limit=2000), topic), Envelope)


def test_mismatch_disagrees_with_the_topic_only() -> None:
    """A mismatched payload is rejected as topic_mismatch on its topic, yet valid on its own."""
    topic, payload = _valid()
    wrong = faults.mismatch(payload)
    result = decode_telemetry(wrong, topic)
    assert isinstance(result, Rejection)
    assert result.reason is Reason.TOPIC_MISMATCH
    assert isinstance(decode_telemetry(wrong), Envelope)
    assert json.loads(wrong)["id"] == json.loads(payload)["id"]


def test_skew_is_bounded_and_never_zero() -> None:
    """Clock skew is a non-zero offset of at most skew_seconds, in both directions."""
    rng = random.Random(3)
    offsets = [faults.skew(rng, 2.0) for _ in range(2000)]
    assert all(0 < abs(o) <= 2000 for o in offsets)
    assert min(offsets) < 0 < max(offsets)


def test_reorderer_releases_after_exactly_delay_items() -> None:
    """A held item goes out right after ``delay`` later items, others keep their order."""
    reorder: Reorderer[str] = Reorderer()
    out: list[str] = []
    reorder.hold("a", 2)
    for item in "bcde":
        out.append(item)
        out.extend(reorder.tick())
    assert out == ["b", "c", "a", "d", "e"]
    assert len(reorder) == 0


def test_reorderer_drain_releases_everything_in_due_order() -> None:
    """At the end, everything still held is released, earliest due first."""
    reorder: Reorderer[str] = Reorderer()
    reorder.hold("late", 5)
    reorder.hold("soon", 1)
    reorder.hold("also-late", 5)
    assert reorder.drain() == ["soon", "late", "also-late"]
    assert not reorder


def test_outage_buffers_then_resends_unacknowledged_first() -> None:
    """An outage buffers N messages; release gives the pre-outage message again, then the buffer."""
    outage: Outage[str] = Outage(remaining=3, resend="m0")
    assert not outage.buffer("m1")
    assert not outage.buffer("m2")
    assert outage.buffer("m3")  # the third message ends the outage
    assert list(outage.release()) == ["m0", "m1", "m2", "m3"]
    assert list(outage.release()) == []
