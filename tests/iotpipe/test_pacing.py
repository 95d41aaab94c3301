"""The token bucket (injected clock) and the jittered exponential backoff (injected random)."""

from __future__ import annotations

import math
import random

import pytest

from iotpipe.errors import ConfigError
from iotpipe.pacing import Backoff, TokenBucket


class Clock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Highest(random.Random):
    """A random source that always draws the top of the range."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Lowest(random.Random):
    """A random source that always draws the bottom of the range."""

    def uniform(self, a: float, b: float) -> float:
        return a


# -- token bucket -------------------------------------------------------------------------------


def test_bucket_starts_full_and_refills_at_its_rate() -> None:
    """The bucket hands out its burst at once, then rate tokens per second, never more than burst."""
    clock = Clock()
    bucket = TokenBucket(100, clock=clock)
    assert bucket.take(1000) == 100
    assert bucket.take(1) == 0
    assert bucket.wait_time(10) == pytest.approx(0.1)
    clock.now += 0.25
    assert bucket.take(1000) == 25
    clock.now += 60
    assert bucket.available == 100
    bucket.take(30)
    bucket.give_back(10)
    assert bucket.available == 80
    assert bucket.wait_time(80) == 0.0


def test_bucket_bounds_the_rate_after_a_one_second_burst() -> None:
    """A burst of one second's tokens, then the rate (the edge agent's drain)."""
    clock = Clock()
    bucket = TokenBucket(10.0, clock=clock)
    assert bucket.take(100) == 10
    assert bucket.take(1) == 0
    assert bucket.wait_time() == pytest.approx(0.1)
    clock.now = 0.5
    assert bucket.take(100) == 5


def test_bucket_with_a_small_burst_spreads_sends_evenly() -> None:
    """burst=1 allows one token per 1/rate seconds."""
    clock = Clock()
    bucket = TokenBucket(10, burst=1, clock=clock)
    assert bucket.take(5) == 1
    assert bucket.wait_time() == pytest.approx(0.1)
    clock.now += 0.1
    assert bucket.take(5) == 1


def test_bucket_ignores_a_clock_that_goes_backwards_and_nonpositive_requests() -> None:
    """Time running backwards adds no tokens; take(0) and give_back(-1) change nothing."""
    clock = Clock(100.0)
    bucket = TokenBucket(10, clock=clock)
    bucket.take(10)
    clock.now = 50.0
    assert bucket.available == 0
    assert bucket.take(0) == 0
    bucket.give_back(-1)
    assert bucket.available == 0


def test_bucket_can_be_unbounded() -> None:
    """rate=inf never limits."""
    bucket = TokenBucket(math.inf, clock=Clock())
    assert bucket.take(10**6) == 10**6
    assert bucket.wait_time(10**6) == 0.0


@pytest.mark.parametrize("bad", [0, -1.0, math.nan])
def test_bucket_refuses_a_rate_naming_the_setting(bad: float) -> None:
    """A rate that is not > 0 raises ConfigError naming the setting it came from."""
    with pytest.raises(ConfigError) as refused:
        TokenBucket(bad, setting="bridge.drain_rate")
    assert refused.value.field == "bridge.drain_rate"
    assert "bridge.drain_rate" in str(refused.value)


def test_bucket_refuses_a_burst_below_one() -> None:
    """A burst below one token could never hand out anything."""
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(10, burst=0.5)


# -- backoff ------------------------------------------------------------------------------------


def test_backoff_doubles_from_first_up_to_maximum() -> None:
    """Without jitter the delays are first, 2*first, 4*first, ... capped at maximum."""
    backoff = Backoff(0.5, 5.0, jitter=(1.0, 1.0))
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.attempts == 6


def test_backoff_jitter_spans_the_given_factors() -> None:
    """The default jitter is +-50 % of the delay: the random source picks within it."""
    low, high = Backoff(1.0, 60.0, rng=Lowest()), Backoff(1.0, 60.0, rng=Highest())
    assert [low.next_delay() for _ in range(3)] == [0.5, 1.0, 2.0]
    assert [high.next_delay() for _ in range(3)] == [1.5, 3.0, 6.0]


def test_backoff_with_upper_half_jitter_never_exceeds_maximum() -> None:
    """jitter=(0.5, 1.0) keeps every delay within [maximum/2, maximum] once capped."""
    backoff = Backoff(0.5, 30.0, jitter=(0.5, 1.0), rng=Highest())
    delays = [backoff.next_delay() for _ in range(20)]
    assert max(delays) == 30.0
    assert delays[:3] == [0.5, 1.0, 2.0]


def test_backoff_reset_starts_again_from_first() -> None:
    """After a success the next failure waits the first delay again."""
    backoff = Backoff(0.2, 5.0, rng=Highest())
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next_delay() == pytest.approx(0.3)


def test_backoff_with_a_seeded_source_is_reproducible() -> None:
    """The same seed gives the same delays: tests can pin the jitter."""
    one = Backoff(0.5, 30.0, rng=random.Random(7))
    two = Backoff(0.5, 30.0, rng=random.Random(7))
    assert [one.next_delay() for _ in range(8)] == [two.next_delay() for _ in range(8)]


@pytest.mark.parametrize(
    ("first", "maximum", "jitter"),
    [(0.0, 1.0, (0.5, 1.5)), (1.0, -1.0, (0.5, 1.5)), (1.0, 2.0, (1.5, 0.5)), (1.0, 2.0, (-1, 1))],
)
def test_backoff_refuses_nonsense(
    first: float, maximum: float, jitter: tuple[float, float]
) -> None:
    """Delays must be positive and the jitter range ordered and non-negative."""
    with pytest.raises(ValueError, match=r"backoff|jitter"):
        Backoff(first, maximum, jitter=jitter)
