"""RedisSeen against the machine's shared Redis, each test under a key prefix of its own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import cast

import pytest

from consumers.seen import Claim, RedisSeen
from consumers.store import StoreUnavailable
from tests.conftest import free_port, wait_for
from tests.victoria import redis_keys

DAY_MS = 86_400_000


@pytest.fixture
def prefix(redis_url: str, unique: str) -> Iterator[str]:
    """A key prefix for this test; its keys are deleted afterwards."""
    prefix = f"iotpipe-test:{unique}:seen:"
    with redis_keys(redis_url, prefix):
        yield prefix


@pytest.fixture
def seen(redis_url: str, prefix: str) -> Iterator[RedisSeen]:
    """A RedisSeen on the shared Redis under this test's prefix."""
    store = RedisSeen(redis_url, prefix=prefix, retention_ms=DAY_MS)
    yield store
    store.close()


def test_new_ids_are_unseen_until_recorded(seen: RedisSeen) -> None:
    """Ids are unseen until recorded; answers keep the order of the question."""
    assert seen.unseen(["a", "b", "c"]) == [True, True, True]
    seen.record(["b"])
    assert seen.unseen(["a", "b", "c"]) == [True, False, True]
    seen.record(["a", "c"])
    assert seen.unseen(["c", "x", "a"]) == [False, True, False]


def test_empty_batches_do_nothing(seen: RedisSeen) -> None:
    """Empty batches answer an empty list and record nothing."""
    assert seen.unseen([]) == []
    seen.record([])


def test_keys_expire_after_retention_counted_from_first_record(
    redis_url: str, prefix: str, seen: RedisSeen
) -> None:
    """A key expires retention_ms after it was first recorded; recording again keeps its expiry."""
    seen.record(["m1"])
    with redis_keys(redis_url, prefix) as client:
        first = cast(int, client.pttl(f"{prefix}m1"))
        assert 0 < first <= DAY_MS
        longer = RedisSeen(redis_url, prefix=prefix, retention_ms=10 * DAY_MS)
        try:
            longer.record(["m1"])
        finally:
            longer.close()
        assert cast(int, client.pttl(f"{prefix}m1")) <= first


def test_forgets_after_retention(redis_url: str, prefix: str) -> None:
    """After the retention window an id is unseen again."""
    short = RedisSeen(redis_url, prefix=prefix, retention_ms=50)
    try:
        short.record(["m1"])
        assert short.unseen(["m1"]) == [False]
        deadline = time.monotonic() + 5
        while short.unseen(["m1"]) != [True]:
            assert time.monotonic() < deadline, "key did not expire"
            time.sleep(0.02)
    finally:
        short.close()


def test_large_batch_is_fast(seen: RedisSeen) -> None:
    """10,000 ids are looked up and recorded in well under a second (one round trip each)."""
    ids = [f"id-{n}" for n in range(10_000)]
    started = time.perf_counter()
    assert all(seen.unseen(ids))
    seen.record(ids)
    assert not any(seen.unseen(ids))
    assert time.perf_counter() - started < 1.0


def test_unreachable_redis_is_store_unavailable() -> None:
    """Every operation raises StoreUnavailable naming the server but not the password."""
    port = free_port()
    seen = RedisSeen(f"redis://:hunter2@127.0.0.1:{port}/0", retention_ms=DAY_MS)
    try:
        for call in (lambda: seen.unseen(["a"]), lambda: seen.record(["a"]), seen.check):
            with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}") as info:
                call()
            assert "hunter2" not in str(info.value)
    finally:
        seen.close()


def test_check_passes_on_a_live_redis(seen: RedisSeen) -> None:
    """check() returns quietly when Redis answers."""
    seen.check()


def test_claims_let_one_consumer_write_an_id_and_the_other_wait(
    redis_url: str, prefix: str, seen: RedisSeen
) -> None:
    """The first claim wins; the other consumer sees BUSY until done, then DONE."""
    other = RedisSeen(redis_url, prefix=prefix, retention_ms=DAY_MS)
    try:
        assert seen.claim(["a", "b"]) == [Claim.MINE, Claim.MINE]
        assert seen.claim(["a"]) == [Claim.MINE], "claiming again is idempotent for the owner"
        assert other.claim(["a", "b", "c"]) == [Claim.BUSY, Claim.BUSY, Claim.MINE]
        seen.done(["a"])
        seen.release(["b"])
        assert other.claim(["a", "b"]) == [Claim.DONE, Claim.MINE]
        assert other.unseen(["a", "b"]) == [False, True], "a claim in progress is not done"
        other.release(["a"])  # only claims still ours are released: a stays done
        assert seen.claim(["a"]) == [Claim.DONE]
    finally:
        other.close()


def test_a_claim_of_a_consumer_that_died_expires(redis_url: str, prefix: str) -> None:
    """A claim left by a dead consumer expires after claim_ms; then another may claim it."""
    dead = RedisSeen(redis_url, prefix=prefix, retention_ms=DAY_MS, claim_ms=50)
    alive = RedisSeen(redis_url, prefix=prefix, retention_ms=DAY_MS)
    try:
        assert dead.claim(["x"]) == [Claim.MINE]
        assert alive.claim(["x"]) == [Claim.BUSY]
        assert wait_for(lambda: alive.claim(["x"]) == [Claim.MINE], 5)
    finally:
        dead.close()
        alive.close()
