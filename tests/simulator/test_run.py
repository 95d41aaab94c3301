"""The run loop over in-memory links: pacing, faults end to end, recovery, and honest counts."""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from iotpipe.envelope import Envelope, Reason, Rejection, Status, decode
from iotpipe.mqtt import Message, Will
from simulator.link import MemoryLink
from simulator.progress import Snapshot
from simulator.run import PER_DEVICE_LIMIT, Simulation, Summary, connection_count
from simulator.settings import SimulateSettings

START = datetime(2026, 11, 26, tzinfo=UTC)


@dataclass
class Run:
    """A finished simulation and everything its links saw."""

    summary: Summary
    links: list[MemoryLink]

    @property
    def messages(self) -> list[Message]:
        return [m for link in self.links for m in link.messages]

    @property
    def telemetry(self) -> list[Message]:
        return [m for m in self.messages if m.topic.endswith("/telemetry")]

    @property
    def statuses(self) -> list[Message]:
        return [m for m in self.messages if m.topic.endswith("/status")]

    def decoded(self) -> list[Envelope | Rejection]:
        out: list[Envelope | Rejection] = []
        for m in self.telemetry:
            result = decode(m.topic, m.payload)
            assert not isinstance(result, Status)
            out.append(result)
        return out


def simulate(link_options: dict[str, Any] | None = None, **overrides: Any) -> Run:
    """Run a simulation on MemoryLinks (unpaced, seeded, fixed start unless overridden)."""
    values: dict[str, Any] = {"rate": "max", "seed": 11, "start": START, "count": 200}
    values.update(overrides)
    settings = SimulateSettings(**values)
    links: list[MemoryLink] = []

    def factory(index: int, will: Will | None) -> MemoryLink:
        del index
        links.append(MemoryLink(will, **(link_options or {})))
        return links[-1]

    return Run(Simulation(settings, factory).run(), links)


def seqs_by_device(envelopes: list[Envelope]) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = defaultdict(list)
    for env in envelopes:
        seqs[env.device].append(env.seq)
    return seqs


def test_clean_run_publishes_valid_envelopes_in_seq_order() -> None:
    """Without faults: every message is valid, each device counts 0,1,2,... and counts agree."""
    run = simulate(sites=2, devices=3, count=120)
    s = run.summary
    envelopes = run.decoded()
    assert all(isinstance(e, Envelope) for e in envelopes)
    valid = [e for e in envelopes if isinstance(e, Envelope)]
    assert len(valid) == s.messages == s.published == s.valid == 120
    assert s.rejected == s.resent == 0
    assert s.faults == {}
    for seqs in seqs_by_device(valid).values():
        assert seqs == list(range(20))
    assert len({e.id for e in valid}) == 120
    assert s.readings == 120 * 7
    assert s.status == 12  # an online and an offline per device
    assert s.acknowledged == 132
    assert s.unacknowledged == 0
    assert s.ok
    assert not s.interrupted


def test_status_births_first_offline_last() -> None:
    """Each device's retained status goes online before its telemetry and offline after it."""
    run = simulate(devices=2, count=10)
    for link in run.links:
        kinds = [m.topic.rsplit("/", 1)[1] for m in link.messages]
        assert kinds[0] == "status"
        assert kinds[-1] == "status"
        first, last = (decode(link.messages[i].topic, link.messages[i].payload) for i in (0, -1))
        assert isinstance(first, Status)
        assert isinstance(last, Status)
        assert (first.state, last.state) == ("online", "offline")
        assert link.messages[0].retain
        assert link.messages[-1].retain


def test_small_fleet_gets_a_last_will_per_device() -> None:
    """Up to PER_DEVICE_LIMIT devices, each has its own connection whose will says offline."""
    run = simulate(devices=PER_DEVICE_LIMIT, count=20)
    assert len(run.links) == PER_DEVICE_LIMIT == run.summary.connections
    wills = [link.will for link in run.links]
    assert all(w is not None for w in wills)
    devices = set()
    for will in wills:
        assert will is not None
        assert will.retain
        assert will.qos == 1
        status = decode(will.topic, will.payload)
        assert isinstance(status, Status)
        assert status.state == "offline"
        devices.add(status.device)
    assert len(devices) == PER_DEVICE_LIMIT


def test_large_fleet_shares_connections_without_wills() -> None:
    """A bigger fleet shares connections (default 1); explicit --connections spreads it evenly."""
    settings = SimulateSettings(devices=PER_DEVICE_LIMIT + 1)
    assert connection_count(settings) == 1
    run = simulate(devices=30, connections=3, count=90, status=False)
    assert len(run.links) == 3
    assert all(link.will is None for link in run.links)
    assert [len(link.messages) for link in run.links] == [30, 30, 30]
    assert run.summary.status == 0


def test_duplicates_keep_their_id() -> None:
    """With duplicate=1 every envelope is published twice, back to back, with the same bytes."""
    run = simulate(devices=2, count=20, faults={"duplicate": 1.0}, status=False)
    telemetry = run.telemetry
    assert run.summary.published == 40
    assert run.summary.faults == {"duplicate": 20}
    for first, second in zip(telemetry[::2], telemetry[1::2], strict=True):
        assert first.payload == second.payload


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("malformed", Reason.BAD_JSON),
        ("schema", Reason.SCHEMA),
        ("oversize", Reason.TOO_LARGE),
        ("mismatch", Reason.TOPIC_MISMATCH),
    ],
)
def test_rejected_faults_are_rejected_for_their_reason(fault: str, reason: Reason) -> None:
    """Every message given a rejecting fault is rejected by the codec, for that fault's reason."""
    run = simulate(devices=2, count=10, faults={fault: 1.0})
    results = run.decoded()
    assert all(isinstance(r, Rejection) and r.reason is reason for r in results), results
    assert run.summary.rejected == run.summary.published == 10
    assert run.summary.valid == 0
    assert run.summary.faults == {fault: 10}


def test_skew_moves_timestamps_only() -> None:
    """Skewed envelopes are valid, with ts off the schedule by at most skew_seconds."""
    run = simulate(devices=1, count=20, faults={"skew": 1.0, "skew_seconds": 5.0})
    start_ms = int(START.timestamp() * 1000)
    for k, env in enumerate(run.decoded()):
        assert isinstance(env, Envelope)
        offset = env.timestamp_ms - (start_ms + 1000 * k)
        assert 0 < abs(offset) <= 5000


def test_reorder_scrambles_seq_within_the_window_and_loses_nothing() -> None:
    """Reordered messages arrive late by at most reorder_window, and every seq arrives once."""
    run = simulate(devices=2, count=400, faults={"reorder": 0.2, "reorder_window": 4})
    valid = [e for e in run.decoded() if isinstance(e, Envelope)]
    assert run.summary.faults["reorder"] > 20
    for seqs in seqs_by_device(valid).values():
        assert sorted(seqs) == list(range(200))
        assert seqs != sorted(seqs)
        for position, seq in enumerate(seqs):
            assert abs(position - seq) <= 4 * 2  # held ones overtaken by <= window each


def test_offline_devices_buffer_then_resend_with_the_same_ids() -> None:
    """An outage holds messages back, marks the device offline, then sends them all, in order."""
    run = simulate(
        devices=3, count=600, faults={"offline": 0.03, "offline_messages": 5}, status=True
    )
    s = run.summary
    outages = s.faults["offline"]
    assert outages > 0
    valid = [e for e in run.decoded() if isinstance(e, Envelope)]
    # Every envelope arrives; the last one sent before each outage arrives twice (resent).
    assert s.published == s.messages + s.resent
    assert 0 < s.resent <= outages
    ids = Counter(e.id for e in valid)
    assert len(ids) == 600
    assert sum(n - 1 for n in ids.values()) == s.resent
    for seqs in seqs_by_device(valid).values():
        deduped = list(dict.fromkeys(seqs))
        assert deduped == sorted(deduped)  # buffered messages keep their order
    states = Counter(
        st.state for m in run.statuses if isinstance(st := decode(m.topic, m.payload), Status)
    )
    assert states["offline"] == outages + 3  # one per outage, one per device at the end
    assert states["online"] == outages + 3


def test_outage_still_open_at_the_end_is_flushed() -> None:
    """Messages buffered by an outage that the run's end cuts short are still sent."""
    run = simulate(devices=1, count=5, faults={"offline": 1.0, "offline_messages": 100})
    assert run.summary.faults == {"offline": 1}
    assert run.summary.published == 5
    assert [e.seq for e in run.decoded() if isinstance(e, Envelope)] == [0, 1, 2, 3, 4]


def test_statuses_of_a_device_are_strictly_newer_each_time() -> None:
    """An outage cut short by the run's end goes online and offline in one millisecond; the
    offline status must still be the newer, so a registry keeping the newest ends offline."""
    run = simulate(devices=1, count=5, faults={"offline": 1.0, "offline_messages": 100})
    statuses = [st for m in run.statuses if isinstance(st := decode(m.topic, m.payload), Status)]
    times = [st.timestamp_ms for st in statuses]
    assert [st.state for st in statuses] == ["online", "offline", "online", "offline"]
    assert times == sorted(set(times)), f"not strictly increasing: {times}"


def test_every_fault_at_once_accounts_for_every_message() -> None:
    """With all faults mixed, published = messages + duplicates + resends, and valid/rejected
    match what the codec says."""
    faults = {
        "duplicate": 0.05,
        "reorder": 0.05,
        "malformed": 0.05,
        "schema": 0.05,
        "oversize": 0.01,
        "mismatch": 0.05,
        "skew": 0.05,
        "offline": 0.02,
    }
    run = simulate(sites=2, devices=3, count=600, faults=faults)
    s = run.summary
    assert set(s.faults) == set(faults)
    assert s.published == s.messages + s.faults["duplicate"] + s.resent
    results = run.decoded()
    rejected = [r for r in results if isinstance(r, Rejection)]
    assert len(results) == s.published
    assert len(rejected) == s.rejected
    assert len(results) - len(rejected) == s.valid
    reasons = Counter(r.reason for r in rejected)
    assert reasons[Reason.BAD_JSON] >= s.faults["malformed"]
    assert reasons[Reason.SCHEMA] >= s.faults["schema"]
    assert reasons[Reason.TOO_LARGE] >= s.faults["oversize"]
    assert reasons[Reason.TOPIC_MISMATCH] >= s.faults["mismatch"]
    assert sum(reasons.values()) == s.rejected


def test_same_seed_and_start_replay_identical_messages() -> None:
    """Two runs with one seed and start publish byte-identical telemetry, faults included."""
    faults = {"duplicate": 0.1, "malformed": 0.1, "reorder": 0.1, "offline": 0.05}
    a = simulate(devices=3, count=150, faults=faults)
    b = simulate(devices=3, count=150, faults=faults)
    c = simulate(devices=3, count=150, faults=faults, seed=12)
    assert [m.payload for m in a.telemetry] == [m.payload for m in b.telemetry]
    assert a.summary.seed == b.summary.seed == 11
    assert [m.payload for m in a.telemetry] != [m.payload for m in c.telemetry]


def test_duration_sets_the_number_of_messages() -> None:
    """--duration S at rate R with N devices and batch K makes ceil(S x R x N / K) envelopes."""
    run = simulate(devices=3, rate=2, batch=2, duration=10, count=None, speed=1e6)
    assert run.summary.messages == 30
    run = simulate(devices=3, rate=2, batch=2, duration=10, count=7, speed=1e6)
    assert run.summary.messages == 7  # whichever limit comes first


def test_batched_readings_follow_the_sample_rate() -> None:
    """With batch 4 at 2 Hz each envelope holds 4 samples 500 ms apart, contiguous across messages."""
    run = simulate(devices=1, rate=2, batch=4, count=3, speed=1e6, sensors=["temperature"])
    times = []
    for env in run.decoded():
        assert isinstance(env, Envelope)
        times += [r.time_ms(env) for r in env.readings]
    assert [b - a for a, b in itertools.pairwise(times)] == [500] * 11


@dataclass
class FakeClock:
    """Monotonic time that only moves when someone waits."""

    now: float = 100.0
    published_at: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class ClockedLink(MemoryLink):
    """A MemoryLink whose pump(timeout) waits on a fake clock and notes publish times."""

    def __init__(self, clock: FakeClock, will: Will | None) -> None:
        super().__init__(will)
        self.clock = clock

    def pump(self, timeout: float = 0.0) -> None:
        self.clock.sleep(timeout)
        super().pump(timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        if topic.endswith("/telemetry"):
            self.clock.published_at.append(self.clock.now)
        return super().publish(topic, payload, qos, retain)


@pytest.mark.parametrize(("connections", "speed"), [(1, 1.0), (4, 1.0), (1, 10.0)])
def test_paced_runs_follow_the_schedule(connections: int, speed: float) -> None:
    """Paced: message k goes out at k x batch / (rate x devices x speed) s, never early."""
    clock = FakeClock()
    settings = SimulateSettings(
        devices=4, rate=5, count=40, seed=1, connections=connections, speed=speed
    )
    sim = Simulation(settings, lambda i, w: ClockedLink(clock, w), clock=clock, sleep=clock.sleep)
    summary = sim.run()
    interval = 1 / (5 * 4 * speed)
    t0 = clock.published_at[0]
    for k, at in enumerate(clock.published_at):
        assert k * interval - 1e-9 <= at - t0 <= k * interval + 0.01
    assert summary.messages == 40
    assert summary.max_behind_s < 0.02


def test_a_dropped_connection_is_recovered_without_losing_messages() -> None:
    """When a link drops mid-run the loop reconnects and every message is still published."""
    links: list[MemoryLink] = []

    def factory(index: int, will: Will | None) -> MemoryLink:
        link = MemoryLink(will)
        link.drop_after(50)
        links.append(link)
        return link

    settings = SimulateSettings(devices=2, count=200, rate="max", seed=1, connections=1)
    summary = Simulation(settings, factory).run()
    assert links[0].drops == 1
    assert summary.reconnects == 1
    assert summary.published == 200
    assert summary.unacknowledged == 0


def test_lost_acknowledgements_are_reported_not_hidden() -> None:
    """If the broker never acknowledges, the summary says how many and is not ok."""
    run = simulate(devices=1, count=30, link_options={"acknowledge": False})
    assert run.summary.unacknowledged == 32  # 30 telemetry + online + offline
    assert not run.summary.ok


def test_stop_drains_and_summarises() -> None:
    """stop() (as on SIGTERM) ends generation early, yet held messages are sent and counted."""
    settings = SimulateSettings(
        devices=2, rate="max", seed=1, faults={"offline": 0.2, "offline_messages": 50}
    )
    links: list[MemoryLink] = []

    class Stopper:
        interval = 0.0

        def __init__(self) -> None:
            self.sim: Simulation | None = None

        def update(self, snapshot: Snapshot) -> None:
            if snapshot.messages >= 500 and self.sim is not None:
                self.sim.stop()

        def close(self) -> None:
            return None

    stopper = Stopper()

    def factory(index: int, will: Will | None) -> MemoryLink:
        del index
        links.append(MemoryLink(will))
        return links[-1]

    sim = Simulation(settings, factory)
    sim.progress = stopper
    stopper.sim = sim
    summary = sim.run()
    assert summary.interrupted
    assert 500 <= summary.messages < 1000
    assert summary.published == summary.messages + summary.resent
    assert summary.ok


def test_summary_is_json_ready() -> None:
    """The summary serialises to JSON with the documented keys."""
    summary = simulate(devices=1, count=3, faults={"duplicate": 0.5}).summary
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["messages"] == 3
    assert {"published", "acknowledged", "unacknowledged", "faults", "seed", "rate"} <= set(data)


def test_paced_and_unpaced_runs_publish_the_same_messages() -> None:
    """At 1 Hz, a paced run and a --rate max run from one seed and start are byte-identical."""
    faults = {"duplicate": 0.1, "malformed": 0.1, "skew": 0.1, "offline": 0.05, "reorder": 0.1}
    clock = FakeClock()
    paced = SimulateSettings(
        devices=3, rate=1, count=120, seed=4, start=START, faults=faults, status=False
    )
    links: list[MemoryLink] = []

    def factory(index: int, will: Will | None) -> MemoryLink:
        del index
        links.append(ClockedLink(clock, will))
        return links[-1]

    Simulation(paced, factory, clock=clock, sleep=clock.sleep).run()
    unpaced = simulate(devices=3, count=120, seed=4, faults=faults, status=False)
    assert [m.payload for link in links for m in link.messages] == [
        m.payload for m in unpaced.telemetry
    ]
