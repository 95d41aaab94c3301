"""Receipts in the simulator: kept until receipted, the window, resends, auto and the summary."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from iotpipe.envelope import Envelope, decode
from iotpipe.errors import DeliveryError
from iotpipe.mqtt import Message, MqttClient, Will, topic_matches
from iotpipe.receipts import (
    CAPABILITY_TOPIC,
    BootReceipt,
    Receipt,
    ReceiptBook,
    encode_receipt,
    receipt_topic,
)
from iotpipe.settings import MqttSettings
from simulator.link import MemoryLink, capability_message
from simulator.progress import Snapshot
from simulator.receipts import ReceiptTracker, quantile
from simulator.run import Simulation, Summary, check_acknowledged, summary_lines
from simulator.settings import SimulateSettings
from tests.conftest import MosquittoProcess, free_port

START = datetime(2026, 11, 26, tzinfo=UTC)


def run(
    link_options: dict[str, Any] | None = None, **overrides: Any
) -> tuple[Summary, list[MemoryLink]]:
    """Run a seeded, unpaced simulation on MemoryLinks built with ``link_options``."""
    values: dict[str, Any] = {"rate": "max", "seed": 5, "start": START, "count": 120, "devices": 3}
    values.update(overrides)
    links: list[MemoryLink] = []

    def factory(index: int, will: Will | None) -> MemoryLink:
        del index
        links.append(MemoryLink(will, **(link_options or {})))
        return links[-1]

    return Simulation(SimulateSettings(**values), factory).run(), links


def telemetry(links: list[MemoryLink]) -> list[Message]:
    return [m for link in links for m in link.messages if m.topic.endswith("/telemetry")]


def valid_ids(links: list[MemoryLink]) -> set[str]:
    """Distinct ids of the valid envelopes published."""
    out = set()
    for m in telemetry(links):
        env = decode(m.topic, m.payload)
        if isinstance(env, Envelope):
            out.add(env.id)
    return out


# -- the tracker -------------------------------------------------------------------------------


def receipt(seqs: list[int], boot: str = "b1", through: int | None = None) -> Receipt:
    ranges = tuple((s, s) for s in seqs)
    return Receipt("s", "d", 0, (BootReceipt(boot, ranges, through),))


def test_tracker_keeps_envelopes_until_a_receipt_covers_them() -> None:
    """Only the covered seqs of the right boot are forgotten; duplicates are kept once."""
    t = ReceiptTracker([("s", "d", "b1")], window=8)
    for seq in range(4):
        t.keep(0, seq, "topic", b"p%d" % seq, now=0.0)
    t.keep(0, 1, "topic", b"p1", now=0.5)  # a duplicate: still one envelope
    assert t.unconfirmed == 4
    assert t.room(0) == 4
    assert t.apply(receipt([1, 2], boot="other"), now=1.0) == 0
    assert t.apply(receipt([2], through=0), now=1.0) == 2
    assert t.unconfirmed == 2
    assert t.confirmed == 2
    assert t.latency(0.5) == pytest.approx(1.0)


def test_tracker_resends_the_same_bytes_oldest_first_after_the_jittered_timeout() -> None:
    """Nothing is due before 0.8 x timeout; everything unreceipted is due after 1.2 x timeout."""
    t = ReceiptTracker([("s", "d", "b1")], timeout_min=10.0, timeout_max=20.0)
    for seq in range(3):
        t.keep(0, seq, "topic", b"payload-%d" % seq, now=float(seq) / 100)
    t.apply(receipt([1]), now=1.0)
    assert list(t.due(7.9, limit=10)) == []
    assert list(t.due(13.0, limit=10)) == [(0, "topic", b"payload-0"), (0, "topic", b"payload-2")]
    assert t.resends == 2
    assert list(t.due(13.0, limit=10)) == []  # due again one timeout later, not at once


def test_tracker_limits_resends_and_adapts_the_timeout_to_the_latency() -> None:
    """At most ``limit`` resends per call; the timeout follows 4 x p99 within its bounds."""
    t = ReceiptTracker([("s", "d", "b1")], window=1000, timeout_min=5.0, timeout_max=300.0)
    for seq in range(100):
        t.keep(0, seq, "topic", b"x", now=0.0)
    t.apply(receipt(list(range(64))), now=2.0)
    assert t.timeout == pytest.approx(8.0)
    assert len(list(t.due(100.0, limit=7))) == 7


def test_quantile_by_nearest_rank() -> None:
    """The quantile helper picks ranked values and copes with no values."""
    assert quantile([], 0.5) == 0.0
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([float(i) for i in range(1, 101)], 0.99) == 99.0


# -- MemoryLink ----------------------------------------------------------------------------------


def test_memory_link_delivers_retained_and_injected_messages_to_subscribers() -> None:
    """Subscriptions get the retained capability at once and only matching injected messages."""
    link = MemoryLink(capability=True)
    assert not link.inject("iotpipe/v1/s/d/receipt", b"r")
    link.subscribe([("iotpipe/v1/s/+/receipt", 1), (CAPABILITY_TOPIC, 1)])
    assert [m.topic for m in link.inbox] == [CAPABILITY_TOPIC]
    assert json.loads(link.inbox[0].payload)["receipts"] is True
    assert link.inject("iotpipe/v1/s/d/receipt", b"r")
    assert not link.inject("iotpipe/v1/t/d/receipt", b"r")
    assert topic_matches("a/#", "a/b/c")
    assert not topic_matches("a/+", "a/b/c")
    assert capability_message(False) != capability_message(True)


# -- the run -------------------------------------------------------------------------------------


def test_receipted_run_ends_with_nothing_unconfirmed() -> None:
    """With a store that receipts everything, every valid envelope is confirmed, once."""
    summary, links = run({"auto_receipt": True})
    assert summary.receipts
    assert summary.confirmed == len(valid_ids(links)) == 120
    assert summary.unconfirmed == 0
    assert summary.ok
    assert any(
        "receipts on: confirmed 120, unconfirmed 0" in line for line in summary_lines(summary)
    )


def test_faults_keep_working_and_duplicates_are_not_unconfirmed() -> None:
    """Duplicates, outages, reordering and rejected envelopes: every valid one confirmed, no more."""
    faults = {
        "duplicate": 0.1,
        "offline": 0.05,
        "reorder": 0.1,
        "malformed": 0.05,
        "mismatch": 0.05,
    }
    summary, links = run({"auto_receipt": True}, count=400, faults=faults)
    assert summary.faults["duplicate"] > 0
    assert summary.faults["malformed"] > 0
    assert summary.confirmed == len(valid_ids(links)) < 400
    assert summary.unconfirmed == 0
    assert summary.ok


@pytest.mark.parametrize("capability", [None, False])
def test_auto_without_receipts_publishes_exactly_what_off_publishes(
    capability: bool | None,
) -> None:
    """No capability, or receipts false: auto turns receipts off and the bytes are the same."""
    faults = {"duplicate": 0.1, "offline": 0.05}
    auto, auto_links = run({"capability": capability}, faults=faults)
    off, off_links = run({"capability": capability}, faults=faults, receipts="off")
    assert not auto.receipts
    assert [m.payload for m in telemetry(auto_links)] == [m.payload for m in telemetry(off_links)]
    assert auto.ok
    assert off.ok


def test_receipts_on_without_answers_reports_unconfirmed_and_fails() -> None:
    """Capability on but no store answers: resends the same bytes, then reports and fails."""
    summary, links = run(
        {"capability": True},
        devices=1,
        count=4,
        receipt_timeout_min=0.01,
        receipt_timeout_max=0.02,
        flush_timeout=0.3,
    )
    sent = [m.payload for m in telemetry(links)]
    assert summary.unconfirmed == 4
    assert summary.receipt_resends > 0
    assert len(sent) == 4 + summary.receipt_resends
    assert set(sent[4:]) <= set(sent[:4])
    with pytest.raises(DeliveryError, match="4 of 4 envelopes got no receipt"):
        check_acknowledged(summary, SimulateSettings(), "memory://")


def test_a_full_window_stops_new_envelopes() -> None:
    """Without receipts a device publishes at most ``receipt_window`` envelopes."""

    class Stopper:
        interval = 0.0

        def __init__(self) -> None:
            self.sim: Simulation | None = None
            self.seen: list[Snapshot] = []

        def update(self, snapshot: Snapshot) -> None:
            self.seen.append(snapshot)
            if snapshot.unconfirmed == 2 * 5 and self.sim is not None:
                self.sim.stop()  # stuck on the window: end the run as Ctrl-C does

        def close(self) -> None:
            pass

    links: list[MemoryLink] = []

    def factory(index: int, will: Will | None) -> MemoryLink:
        del index
        links.append(MemoryLink(will, capability=True))
        return links[-1]

    settings = SimulateSettings(
        rate="max",
        seed=1,
        start=START,
        devices=2,
        count=100,
        receipts="auto",
        receipt_window=5,
        flush_timeout=0.05,
        status=False,
    )
    stopper = Stopper()
    sim = Simulation(settings, factory, progress=stopper)
    stopper.sim = sim
    summary = sim.run()
    assert summary.messages == 10
    assert summary.unconfirmed == 10
    assert summary.interrupted
    assert stopper.seen[-1].unconfirmed == 10


def test_receipts_arrive_over_the_run_and_free_the_window() -> None:
    """A window far smaller than the run: receipts keep it moving to the end."""
    summary, _ = run({"auto_receipt": True}, devices=2, count=300, receipt_window=4)
    assert summary.messages == 300
    assert summary.unconfirmed == 0
    assert summary.receipt_latency_p99_s >= summary.receipt_latency_p50_s >= 0.0


def test_receipts_are_taken_from_the_links_subscriptions() -> None:
    """A shared link subscribes one wildcard per site, a per-device link its own topic."""
    _, shared = run({"auto_receipt": True}, sites=2, devices=6, connections=1, count=12)
    assert shared[0].subscriptions == [
        "iotpipe/v1/site-01/+/receipt",
        "iotpipe/v1/site-02/+/receipt",
        CAPABILITY_TOPIC,
    ]
    _, own = run({"auto_receipt": True}, devices=2, count=4)
    assert own[1].subscriptions == [receipt_topic("site-01", "dev-0002")]


# -- a real broker ---------------------------------------------------------------------------------


class Store:
    """A tiny store: subscribes to telemetry and (if ``answer``) receipts what it saw."""

    def __init__(self, url: str, *, answer: bool) -> None:
        self.book = ReceiptBook(interval=0.05)
        self.answer = answer
        self.seen = 0
        self.client = MqttClient(MqttSettings(url=url), client_id="store", on_message=self._on)
        self.client.connect()
        self.client.publish(CAPABILITY_TOPIC, capability_message(True), 1, True)
        self.client.subscribe([("iotpipe/v1/+/+/telemetry", 1)])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _on(self, message: Message) -> None:
        env = decode(message.topic, message.payload)
        if isinstance(env, Envelope):
            self.seen += 1
            self.book.record(env.site, env.device, env.boot, env.seq)

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.client.pump(0.02)
            if self.answer:
                for r in self.book.due(time.monotonic(), 0):
                    self.client.publish(receipt_topic(r.site, r.device), encode_receipt(r), 1, True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.disconnect()


@pytest.mark.mqtt
@pytest.mark.parametrize("answer", [True, False])
def test_iotpipe_simulate_against_mosquitto_with_a_store(tmp_path: Path, answer: bool) -> None:
    """A store that receipts: 0 unconfirmed, exit 0; one that does not: the count and exit 4."""
    port = free_port()
    broker = MosquittoProcess(tmp_path / "mosquitto", port)
    broker.start()
    config = tmp_path / "simulate.toml"
    config.write_text(
        "[simulate]\nflush_timeout = 3.0\nreceipt_timeout_min = 0.5\nreceipt_timeout_max = 1.0\n"
    )
    store = Store(f"mqtt://127.0.0.1:{port}", answer=answer)
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "from iotpipe.cli import main; main()",
                "simulate",
                "--mqtt",
                f"mqtt://127.0.0.1:{port}",
                "-c",
                str(config),
                "--sites",
                "2",
                "--devices",
                "20",
                "--rate",
                "max",
                "-n",
                "500",
                "--json",
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        store.close()
        broker.stop()
    summary = json.loads(result.stdout)
    assert summary["receipts"] is True
    if answer:
        assert result.returncode == 0, result.stderr
        assert summary["unconfirmed"] == 0
        assert summary["confirmed"] == 500
    else:
        assert result.returncode == DeliveryError.exit_code == 4
        assert summary["unconfirmed"] == 500
        assert summary["receipt_resends"] > 0
        assert "500 of 500 envelopes got no receipt" in result.stderr
