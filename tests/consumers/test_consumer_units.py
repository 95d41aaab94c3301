"""The consumer's own logic with an in-memory RabbitMQ: ack after commit, dedupe, dead letters, outages.

No broker: :class:`~iotpipe.testing.MemorySource` stands in for the queue; the store is a real
SQLite file behind a wrapper that can fail on demand. The same behaviour against RabbitMQ is in
``test_consumer.py``.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from consumers.service import STORE_REJECTED, Consumer
from consumers.settings import ConsumeSettings
from consumers.sqlite_store import SQLiteStore
from consumers.store import Confirmation, DeviceStatus, Message, StoreUnavailable, WriteResult
from iotpipe import receipts
from iotpipe.testing import MemorySource, Published
from tests.bridge.test_bridge import envelope
from tests.conftest import wait_for
from tests.consumers.conftest import assert_receipt_properties

KEY = "iotpipe.v1.s1.d1.telemetry"


class FlakyStore:
    """A SQLite store that fails the next ``failures`` writes and notes what each write saw."""

    def __init__(self, path: Path, source: MemorySource) -> None:
        self.inner = SQLiteStore(path, durability="process")
        self.source = source
        self.failures = 0
        self.refuse: dict[int, str] = {}
        self.acked_at_write: list[list[int]] = []
        self.on_write: Callable[[], object] = lambda: None
        self.confirmation_failures = 0
        self.confirmation_calls: list[list[Confirmation]] = []
        self.closed = False

    def write(self, messages: Sequence[Message], statuses: Sequence[DeviceStatus]) -> WriteResult:
        """Fail while ``failures`` lasts, else write; ``refuse`` marks batch indexes refused."""
        self.acked_at_write.append(list(self.source.acked))
        self.on_write()
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("disk full")
        result = self.inner.write(messages, statuses)
        result.rejected.update(self.refuse)
        return result

    def record_confirmations(self, confirmations: Sequence[Confirmation]) -> None:
        """Fail while ``confirmation_failures`` lasts, else keep the summaries; note each call."""
        self.confirmation_calls.append(list(confirmations))
        if self.confirmation_failures:
            self.confirmation_failures -= 1
            raise StoreUnavailable("disk full")
        self.inner.record_confirmations(confirmations)

    def prune(self, now_ms: int) -> int:
        """Forget old ids."""
        return self.inner.prune(now_ms)

    def check(self) -> None:
        """Reachable."""

    def close(self) -> None:
        """Close the SQLite file."""
        self.closed = True
        self.inner.close()


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    tmp_path: Path, *, delivery_limit: int = 5, clock: FakeClock | None = None, **overrides: Any
) -> tuple[Consumer, MemorySource, FlakyStore]:
    """A consumer on an in-memory source (connected) and a flaky SQLite store."""
    settings = ConsumeSettings(
        store=f"sqlite:///{tmp_path / 'telemetry.db'}",
        http_port=0,
        batch_latency=0.01,
        delivery_limit=delivery_limit,
        **overrides,
    )
    source = MemorySource()
    store = FlakyStore(tmp_path / "telemetry.db", source)
    consumer = Consumer(settings, store, source, rng=random.Random(1), clock=clock or FakeClock())
    source.connect()
    return consumer, source, store


def add(source: MemorySource, *seqs: int) -> None:
    """One valid envelope per ``seq``, as the bridge would publish it."""
    for seq in seqs:
        source.add(KEY, envelope("s1", "d1", seq), message_id=f"s1-d1-{seq}")


def test_a_batch_is_acknowledged_only_after_the_store_committed_it(tmp_path: Path) -> None:
    """Nothing of a batch is acked when the store is called; all of it right after."""
    consumer, source, store = make(tmp_path)
    add(source, 1, 2, 3)
    consumer.process(source.next_batch(10, 0))
    assert store.acked_at_write == [[]]
    assert source.acked == [1, 2, 3]
    assert consumer.totals.messages == 3


def test_redelivered_copies_are_absorbed_by_dedupe_and_acknowledged(tmp_path: Path) -> None:
    """A connection lost before the ack: the copies come back, are stored nothing and acked."""
    consumer, source, store = make(tmp_path)
    add(source, 1, 2)
    store.on_write = source.drop  # the connection drops while the store commits
    consumer.process(source.next_batch(10, 0))
    assert source.acked == []  # stale tags: the ack is skipped
    store.on_write = lambda: None
    again = source.next_batch(10, 0)
    assert [d.redelivered for d in again] == [True, True]
    consumer.process(again)
    assert source.acked == [d.tag for d in again]
    assert (consumer.totals.messages, consumer.totals.duplicates) == (2, 2)


def test_contract_breaks_are_dead_lettered_and_the_rest_of_the_batch_stored(
    tmp_path: Path,
) -> None:
    """A body that breaks the contract goes to consumer.<reason> at once; its neighbours are stored."""
    consumer, source, _store = make(tmp_path)
    add(source, 1)
    source.add(KEY, b"{not json", message_id="broken")
    add(source, 2)
    consumer.process(source.next_batch(10, 0))
    assert [(d.delivery.message_id, d.reason) for d in source.dead_letters] == [
        ("broken", "bad_json")
    ]
    assert sorted(source.acked) == [1, 2, 3]
    assert source.unsettled == []
    assert consumer.totals.messages == 2
    assert consumer.dead_lettered == 1


def test_an_unconfirmed_dead_letter_is_requeued_not_acknowledged(tmp_path: Path) -> None:
    """A dead letter the broker did not confirm leaves its message requeued, never acked away."""
    consumer, source, _store = make(tmp_path)
    source.dead_letters_confirmed = False
    add(source, 1)
    source.add(KEY, b"{not json", message_id="broken")
    add(source, 2)
    consumer.process(source.next_batch(10, 0))
    assert source.requeued == [2]
    assert 2 not in source.acked
    assert sorted(source.acked) == [1, 3]
    assert source.unsettled == []
    assert consumer.dead_lettered == 0


def test_a_store_outage_holds_the_batch_unacknowledged_until_the_store_is_back(
    tmp_path: Path,
) -> None:
    """While the store fails the batch is retried with growing waits; acked once it is written."""
    consumer, source, store = make(tmp_path)
    add(source, 1, 2, 3)
    store.failures = 3
    consumer.process(source.next_batch(10, 0))
    assert store.acked_at_write == [[], [], [], []]
    assert source.acked == [1, 2, 3]
    assert len(source.slept) == 3
    assert source.slept[0] < source.slept[2]  # backoff grows between attempts
    assert consumer.health()[0]
    assert consumer.metrics.registry.get_sample_value("iotpipe_consumer_store_errors_total") == 3


def test_stopping_during_a_store_outage_leaves_the_batch_to_rabbitmq(tmp_path: Path) -> None:
    """Stopped while the store is down, the consumer acks nothing: the queue keeps the batch."""
    consumer, source, store = make(tmp_path)
    add(source, 1, 2)
    store.failures = 1000
    store.on_write = lambda: len(store.acked_at_write) == 2 and consumer.stop()
    consumer.process(source.next_batch(10, 0))
    assert source.acked == []
    assert source.unsettled == [1, 2]
    assert not consumer.health()[0]
    assert consumer.totals.messages == 0


def test_a_message_the_store_refuses_is_requeued_then_dead_lettered_at_the_limit(
    tmp_path: Path,
) -> None:
    """Refused on every delivery, a message is requeued till its last one, then dead-lettered."""
    consumer, source, store = make(tmp_path, delivery_limit=3)
    add(source, 1)
    store.refuse = {0: "value out of range"}
    for _ in range(3):
        consumer.process(source.next_batch(10, 0))
    assert source.requeued == [1, 2]
    assert [(d.reason, d.error, d.delivery.delivery_count) for d in source.dead_letters] == [
        (STORE_REJECTED, "value out of range", 2)
    ]
    assert source.unsettled == []


def test_run_consumes_until_stopped_then_closes_source_and_store(tmp_path: Path) -> None:
    """The run loop takes batches as they come, acks them, and closes everything on stop."""
    consumer, source, store = make(tmp_path)
    thread = threading.Thread(target=consumer.run, name="test-consumer", daemon=True)
    thread.start()
    assert wait_for(consumer.ready.is_set, 5), "consumer did not start"
    add(source, 1, 2)
    source.wait_acked(2)
    add(source, 3)
    assert source.wait_acked(3) == [1, 2, 3]
    consumer.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert store.closed
    assert not source.connected


def stored_in(published: Sequence[Published]) -> dict[str, list[tuple[int, int]]]:
    """Device -> the seq ranges its receipts name, in publish order (one boot per device)."""
    seen: dict[str, list[tuple[int, int]]] = {}
    for message in published:
        receipt = receipts.decode_receipt(message.body)
        assert isinstance(receipt, receipts.Receipt), receipt
        for entry in receipt.stored:
            seen.setdefault(receipt.device, []).extend(entry.ranges)
    return seen


def test_receipts_are_published_only_after_the_store_committed(tmp_path: Path) -> None:
    """No receipt while the store is failing or writing; one for the whole batch after the commit."""
    consumer, source, store = make(tmp_path)
    add(source, 1, 2, 3)
    store.failures = 2
    published_at_write: list[int] = []
    store.on_write = lambda: published_at_write.append(len(source.published))
    consumer.process(source.next_batch(10, 0))
    assert published_at_write == [0, 0, 0]
    assert stored_in(source.published) == {"d1": [(1, 3)]}
    message = source.published[0]
    assert (message.exchange, message.routing_key) == (
        receipts.EXCHANGE,
        "iotpipe.v1.s1.d1.receipt",
    )
    props = message.properties
    assert not isinstance(props, bytes)
    assert_receipt_properties(props, "s1", "d1")
    registry = consumer.metrics.registry
    assert registry.get_sample_value("iotpipe_consumer_receipts_published_total") == 1
    assert registry.get_sample_value("iotpipe_consumer_receipts_pending") == 0


def test_duplicates_are_receipted_again(tmp_path: Path) -> None:
    """A device resending what is already stored gets a receipt for it: it missed the first."""
    clock = FakeClock()
    consumer, source, _store = make(tmp_path, clock=clock)
    add(source, 1, 2)
    consumer.process(source.next_batch(10, 0))
    clock.now += 1.0
    add(source, 1, 2)
    consumer.process(source.next_batch(10, 0))
    assert consumer.totals.duplicates == 2
    assert stored_in(source.published) == {"d1": [(1, 2), (1, 2)]}


def test_dead_lettered_and_refused_messages_are_not_receipted(tmp_path: Path) -> None:
    """Only what the store holds is receipted: not a contract break, not a refused message."""
    consumer, source, store = make(tmp_path, delivery_limit=1)
    add(source, 1)
    source.add(KEY, b"{not json", message_id="broken")
    add(source, 2, 3)
    store.refuse = {1: "value out of range"}  # the second telemetry message: seq 2
    consumer.process(source.next_batch(10, 0))
    assert [d.reason for d in source.dead_letters] == ["bad_json", STORE_REJECTED]
    assert stored_in(source.published) == {"d1": [(1, 1), (3, 3)]}


def test_at_most_one_receipt_per_device_per_interval(tmp_path: Path) -> None:
    """The first batch is receipted at once; what follows within the interval waits for it."""
    clock = FakeClock()
    consumer, source, _store = make(tmp_path, clock=clock, receipt_interval=2.0)
    add(source, 1, 2)
    source.add("iotpipe.v1.s1.d2.telemetry", envelope("s1", "d2", 7), message_id="s1-d2-7")
    consumer.process(source.next_batch(10, 0))
    assert stored_in(source.published) == {"d1": [(1, 2)], "d2": [(7, 7)]}
    add(source, 3)
    consumer.process(source.next_batch(10, 0))
    clock.now += 1.9
    add(source, 4)
    consumer.process(source.next_batch(10, 0))
    consumer.send_receipts()
    assert len(source.published) == 2
    assert consumer.metrics.registry.get_sample_value("iotpipe_consumer_receipts_pending") == 1
    clock.now += 0.1
    consumer.send_receipts()
    assert stored_in(source.published[2:]) == {"d1": [(3, 4)]}


def test_an_unconfirmed_receipt_is_kept_and_sent_again(tmp_path: Path) -> None:
    """A receipt RabbitMQ did not confirm goes back into the book and is retried an interval later."""
    clock = FakeClock()
    consumer, source, _store = make(tmp_path, clock=clock)
    source.publishes_confirmed = False
    add(source, 1, 2)
    consumer.process(source.next_batch(10, 0))
    assert stored_in(source.unconfirmed) == {"d1": [(1, 2)]}
    registry = consumer.metrics.registry
    assert registry.get_sample_value("iotpipe_consumer_receipt_failures_total") == 1
    assert registry.get_sample_value("iotpipe_consumer_receipts_pending") == 1
    source.publishes_confirmed = True
    add(source, 3)
    consumer.process(source.next_batch(10, 0))
    assert source.published == []  # within the interval of the failed attempt
    clock.now += 1.0
    consumer.send_receipts()
    assert stored_in(source.published) == {"d1": [(1, 3)]}
    assert registry.get_sample_value("iotpipe_consumer_receipts_pending") == 0


def test_receipts_of_one_round_are_settled_each_by_its_own_confirm(tmp_path: Path) -> None:
    """Receipts published together: the confirmed ones count, the refused one alone is kept."""
    clock = FakeClock()
    consumer, source, _store = make(tmp_path, clock=clock)
    source.refused_keys = {"iotpipe.v1.s1.d2.receipt"}
    for device, seq in (("d1", 1), ("d2", 5), ("d3", 9)):
        key = f"iotpipe.v1.s1.{device}.telemetry"
        source.add(key, envelope("s1", device, seq), message_id=f"s1-{device}-{seq}")
    consumer.process(source.next_batch(10, 0))
    assert stored_in(source.published) == {"d1": [(1, 1)], "d3": [(9, 9)]}
    assert stored_in(source.unconfirmed) == {"d2": [(5, 5)]}
    registry = consumer.metrics.registry
    assert registry.get_sample_value("iotpipe_consumer_receipts_published_total") == 2
    assert registry.get_sample_value("iotpipe_consumer_receipt_failures_total") == 1
    assert registry.get_sample_value("iotpipe_consumer_receipts_pending") == 1
    source.refused_keys = set()
    clock.now += 1.0
    consumer.send_receipts()
    assert stored_in(source.published[2:]) == {"d2": [(5, 5)]}


def test_receipts_off_sends_none(tmp_path: Path) -> None:
    """A consumer that is not the store of record (receipts = false) publishes nothing."""
    clock = FakeClock()
    consumer, source, _store = make(tmp_path, clock=clock, receipts=False)
    add(source, 1, 2)
    consumer.process(source.next_batch(10, 0))
    clock.now += 5.0
    consumer.send_receipts(flush=True)
    assert source.acked == [1, 2]
    assert source.published == source.unconfirmed == []


def test_run_sends_waiting_receipts_when_idle_and_the_rest_on_stop(tmp_path: Path) -> None:
    """With no new batch, a receipt goes out once its interval passed; stop flushes the rest."""
    clock = FakeClock()
    consumer, source, _store = make(tmp_path, clock=clock)
    thread = threading.Thread(target=consumer.run, name="test-consumer", daemon=True)
    thread.start()
    assert wait_for(consumer.ready.is_set, 5), "consumer did not start"
    add(source, 1)
    source.wait_published(1)
    add(source, 2)
    pending = "iotpipe_consumer_receipts_pending"
    assert wait_for(lambda: consumer.metrics.registry.get_sample_value(pending) == 1, 5)
    assert len(source.published) == 1  # seq 2 waits for its interval
    clock.now += 1.0  # the loop is idle now: only the interval passing sends the receipt
    source.wait_published(2)
    add(source, 3)
    source.wait_acked(3)
    consumer.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert stored_in(source.published) == {"d1": [(1, 1), (2, 2), (3, 3)]}
