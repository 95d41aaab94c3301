"""Pacing: a token bucket that bounds a rate, and a jittered exponential backoff for retries.

Both are pure: the bucket reads an injected clock and never sleeps; the backoff draws its
jitter from an injected random source and only returns delays. The caller waits, in whatever
way suits its thread (an event, an I/O loop timer, ``time.sleep``).

Users: the edge agent paces its outbox drain and the bridge its spool drain with
:class:`TokenBucket`; the MQTT and AMQP transports, the AMQP consumer, the edge agent and the
consumer service space their reconnects and store retries with :class:`Backoff`.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable

from iotpipe.errors import ConfigError

__all__ = ["Backoff", "TokenBucket"]


class TokenBucket:
    """At most ``rate`` per second on average, in bursts of at most ``burst``.

    The bucket holds up to ``burst`` tokens (default: one second's worth, at least 1), refills
    at ``rate`` per second and starts full. ``rate=math.inf`` never limits. Typical use::

        allowed = bucket.take(1000)
        if allowed:
            entries = queue.peek_oldest(allowed)
            bucket.give_back(allowed - len(entries))
        else:
            wait(bucket.wait_time())

    Args:
        rate: tokens per second, > 0 (``math.inf``: unbounded).
        burst: the most tokens held at once; at least 1.
        clock: monotonic seconds.
        setting: the setting ``rate`` comes from, named in the error if it is not > 0.

    Raises:
        ConfigError: ``rate`` is not > 0.
        ValueError: ``burst`` is below 1.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        setting: str = "rate",
    ) -> None:
        if not rate > 0:
            raise ConfigError(setting, rate, "per second, > 0")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate)
        if not self.burst >= 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        if math.isinf(self.rate):
            self._tokens = self.burst
        else:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)

    @property
    def available(self) -> int:
        """Whole tokens available now."""
        self._refill()
        return sys.maxsize if math.isinf(self._tokens) else int(self._tokens)

    def take(self, n: int) -> int:
        """Take up to ``n`` whole tokens; return how many were taken (0 if none are available)."""
        if n <= 0:
            return 0
        self._refill()
        if math.isinf(self._tokens):
            return n
        taken = min(n, int(self._tokens))
        self._tokens -= taken
        return taken

    def give_back(self, n: int) -> None:
        """Return unused tokens (e.g. fewer entries were found than were allowed)."""
        if n > 0:
            self._tokens = min(self.burst, self._tokens + n)

    def wait_time(self, n: int = 1) -> float:
        """Seconds until ``n`` tokens (at most ``burst``) will be available; 0.0 if now."""
        self._refill()
        want = min(float(n), self.burst)
        if self._tokens >= want or math.isinf(self.rate):
            return 0.0
        return (want - self._tokens) / self.rate


class Backoff:
    """Jittered exponential backoff: ``first``, doubling per attempt up to ``maximum``.

    Attempt ``k`` (from 0 since the last :meth:`reset`) waits ``d = min(maximum, first * 2**k)``
    times a factor drawn uniformly from ``jitter``: the default ``(0.5, 1.5)`` is +-50 %;
    ``(0.5, 1.0)`` never waits longer than ``maximum`` ("full jitter" in the upper half).

    Args:
        first: the delay of the first attempt (before jitter), seconds, > 0.
        maximum: the longest delay (before jitter), seconds, > 0.
        jitter: the (low, high) factors the delay is multiplied by, 0 <= low <= high.
        rng: where the jitter comes from (tests pass a seeded or scripted one).

    Raises:
        ValueError: a delay is not > 0 or the jitter range is inverted or negative.
    """

    def __init__(
        self,
        first: float,
        maximum: float,
        *,
        jitter: tuple[float, float] = (0.5, 1.5),
        rng: random.Random | None = None,
    ) -> None:
        if not (first > 0 and maximum > 0):
            raise ValueError(f"backoff delays must be > 0, not first={first} maximum={maximum}")
        low, high = jitter
        if not 0 <= low <= high:
            raise ValueError(f"jitter must be (low, high) with 0 <= low <= high, not {jitter}")
        self.first = first
        self.maximum = maximum
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self._delay = first
        self.attempts = 0

    def next_delay(self) -> float:
        """The jittered delay before the next attempt; the one after it doubles (up to max)."""
        low, high = self.jitter
        delay = self._rng.uniform(self._delay * low, self._delay * high)
        self._delay = min(self._delay * 2, self.maximum)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """Start again from ``first`` (after a success)."""
        self._delay = self.first
        self.attempts = 0
