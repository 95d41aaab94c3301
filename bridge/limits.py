"""Per-device limits at the gateway: a rate and a quota per device, and what happens over them.

One device stuck in a loop must not compete with the whole fleet for the bridge, RabbitMQ and
the store. The ``[bridge.limits]`` table gives each device

- a **rate**: envelopes per second, in bursts of at most ``burst`` (a token bucket), and
- a **quota**: readings per UTC hour and per UTC day,

with defaults for everyone, overrides per site and per device (field by field), and a
**policy** for what is over a limit:

- ``dead_letter``: the envelope goes to ``iotpipe.dead`` with routing key
  ``bridge.rate_limited`` or ``bridge.quota_exceeded`` (body unchanged, the limit named in
  ``x-iotpipe-error``) and spends nothing of the device's allowance;
- ``hold``: the envelope is forwarded (nothing is lost), but the device goes into debt and the
  receipt relay holds its receipts until the debt is repaid (:meth:`Limiter.held_until`). A
  device speaking receipts keeps at most its receipt window unreceipted, so it slows down to
  about its rate at the source. What it resends while held is not charged again. Devices
  without receipts are not slowed by ``hold``.

Threads: :meth:`Limiter.admit` runs on the bridge thread only; the receipt relay's thread reads
:meth:`Limiter.held_until`, and the metrics scrape reads the number of held devices. Those
two share only the hold deadlines, behind one lock. The state is per bridge process: bridges
sharing a subscription each limit their own share of a device's traffic.

With no limit configured anywhere the bridge builds no limiter at all (:attr:`LimitSettings.enabled`),
so its hot path pays one ``is None`` test.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import Field, field_validator

from iotpipe.settings import Section
from iotpipe.wire import NAME_RULE, is_valid_name

__all__ = [
    "MAX_HOLD",
    "QUOTA_EXCEEDED",
    "RATE_LIMITED",
    "Limit",
    "LimitOverride",
    "LimitSettings",
    "Limiter",
    "Refusal",
]

log = logging.getLogger(__name__)

Policy = Literal["hold", "dead_letter"]

#: Dead-letter reason (routing key ``bridge.rate_limited``): over the device's rate.
RATE_LIMITED = "rate_limited"
#: Dead-letter reason (routing key ``bridge.quota_exceeded``): over its hourly or daily quota.
QUOTA_EXCEEDED = "quota_exceeded"

MAX_HOLD = 300.0
"""Longest hold a device's rate debt can earn, seconds (as long as an edge agent's longest
resend timeout): however far over its rate a device went, it hears from the store again within
this. (A quota hold lasts until its hour or day ends.)"""

_SWEEP_EVERY = 30.0
"""Seconds between sweeps that forget idle devices."""


class LimitOverride(Section):
    """A ``[bridge.limits.sites.<site>]`` or ``[bridge.limits.devices."<site>/<device>"]`` table:
    each field left out is inherited (device <- site <- defaults)."""

    policy: Policy | None = Field(None, description="hold or dead_letter")
    rate: float | None = Field(None, ge=0, allow_inf_nan=False, description="envelopes/s; 0 = none")
    burst: float | None = Field(None, ge=1, allow_inf_nan=False, description="envelopes at once")
    quota_hour: int | None = Field(None, ge=0, description="readings per UTC hour; 0 = none")
    quota_day: int | None = Field(None, ge=0, description="readings per UTC day; 0 = none")


class LimitSettings(Section):
    """The ``[bridge.limits]`` table: the defaults of every device, and the overrides."""

    policy: Policy = Field("hold", description="over a limit: hold its receipts, or dead_letter")
    rate: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="envelopes per second per device; 0 = none"
    )
    burst: float | None = Field(
        None, ge=1, allow_inf_nan=False, description="bucket size, envelopes; default max(1, rate)"
    )
    quota_hour: int = Field(0, ge=0, description="readings per device per UTC hour; 0 = none")
    quota_day: int = Field(0, ge=0, description="readings per device per UTC day; 0 = none")
    sites: dict[str, LimitOverride] = Field(default_factory=dict, description="per site")
    devices: dict[str, LimitOverride] = Field(
        default_factory=dict, description='per device, keyed "<site>/<device>"'
    )

    @field_validator("sites")
    @classmethod
    def _site_names(cls, value: dict[str, LimitOverride]) -> dict[str, LimitOverride]:
        for site in value:
            if not is_valid_name(site):
                raise ValueError(f"site {site!r} is not a site name ({NAME_RULE})")
        return value

    @field_validator("devices")
    @classmethod
    def _device_keys(cls, value: dict[str, LimitOverride]) -> dict[str, LimitOverride]:
        for key in value:
            site, slash, device = key.partition("/")
            if not (slash and is_valid_name(site) and is_valid_name(device)):
                raise ValueError(f"device key {key!r} must be '<site>/<device>' ({NAME_RULE})")
        return value

    @property
    def enabled(self) -> bool:
        """Whether any device has any limit (else the bridge builds no limiter)."""
        tables: list[LimitOverride | LimitSettings] = [
            self,
            *self.sites.values(),
            *self.devices.values(),
        ]
        return any(
            (table.rate or 0) > 0 or (table.quota_hour or 0) > 0 or (table.quota_day or 0) > 0
            for table in tables
        )

    def resolve(self, site: str, device: str) -> Limit:
        """The limits of one device, field by field: its own table, else its site's, else the
        defaults (``burst`` left unset everywhere: ``max(1, rate)``)."""
        tables = [
            table
            for table in (self.devices.get(f"{site}/{device}"), self.sites.get(site))
            if table is not None
        ]
        rate = _first([t.rate for t in tables], self.rate)
        burst = _first([t.burst for t in tables], self.burst)
        return Limit(
            policy=_first([t.policy for t in tables], self.policy),
            rate=rate,
            burst=max(1.0, rate) if burst is None else burst,
            quota_hour=_first([t.quota_hour for t in tables], self.quota_hour),
            quota_day=_first([t.quota_day for t in tables], self.quota_day),
        )


_T = TypeVar("_T")


def _first(values: list[_T | None], default: _T) -> _T:
    """The first value that is set, else ``default``."""
    return next((value for value in values if value is not None), default)


@dataclass(frozen=True, slots=True)
class Limit:
    """The resolved limits of one device (0 = no such limit)."""

    policy: Policy
    rate: float
    burst: float
    quota_hour: int
    quota_day: int

    @property
    def none(self) -> bool:
        """Whether this device has no limit at all."""
        return self.rate <= 0 and self.quota_hour <= 0 and self.quota_day <= 0

    def describe_rate(self) -> str:
        """``rate limit 5/s (burst 10)``."""
        return f"rate limit {self.rate:g}/s (burst {self.burst:g})"


@dataclass(frozen=True, slots=True)
class Refusal:
    """An envelope over a limit under policy ``dead_letter``: where it goes and why."""

    reason: str
    """:data:`RATE_LIMITED` or :data:`QUOTA_EXCEEDED` (routing key ``bridge.<reason>``)."""
    error: str
    """The ``x-iotpipe-error`` header: the device and the limit, one line."""


class _Device:
    """What the limiter knows of one device."""

    __slots__ = (
        "day",
        "day_count",
        "hour",
        "hour_count",
        "limit",
        "over",
        "seqs",
        "stamp",
        "tokens",
    )

    def __init__(self, limit: Limit, now: float) -> None:
        self.limit = limit
        self.tokens = limit.burst  # may go negative under policy hold: the debt
        self.stamp = now
        self.hour = -1
        self.hour_count = 0
        self.day = -1
        self.day_count = 0
        self.over: str | None = None  # the limit it is over now, for one log line each way
        self.seqs: dict[str | None, int] = {}  # highest seq seen per recent boot (policy hold)


class LimitMetrics:
    """The limiter's metrics, registered on the bridge's registry."""

    def __init__(self, registry: CollectorRegistry, held: Callable[[], float]) -> None:
        self.limited = Counter(
            "iotpipe_bridge_limited",
            "telemetry envelopes over a device's rate or quota",
            ["reason", "policy"],
            registry=registry,
        )
        self.held = Gauge(
            "iotpipe_bridge_limited_devices_held",
            "devices whose receipts are being held (policy hold) now",
            registry=registry,
        )
        self.held.set_function(held)


class Limiter:
    """Admits telemetry envelopes per device within its limits; see the module docstring.

    Args:
        settings: the ``[bridge.limits]`` table.
        registry: where :class:`LimitMetrics` are registered.
        clock: monotonic seconds (rates and holds).
        wall: Unix seconds (the UTC hour and day of a quota).
    """

    def __init__(
        self,
        settings: LimitSettings,
        registry: CollectorRegistry,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._wall = wall
        self._devices: dict[tuple[str, str], _Device] = {}
        self._holds: dict[tuple[str, str], float] = {}  # shared with the relay: under _lock
        self._lock = threading.Lock()
        self._next_sweep = clock() + _SWEEP_EVERY
        self.metrics = LimitMetrics(registry, lambda: float(self.held_count()))
        self._limited = {
            (reason, policy): self.metrics.limited.labels(reason, policy)
            for reason in ("rate", "quota")
            for policy in ("hold", "dead_letter")
        }

    def __len__(self) -> int:
        """Devices the limiter keeps state for."""
        return len(self._devices)

    # -- the bridge thread -------------------------------------------------------------------

    def admit(
        self, site: str, device: str, readings: int, boot: str | None = None, seq: int = -1
    ) -> Refusal | None:
        """Account one telemetry envelope of ``readings`` readings; None: forward it.

        Under policy ``hold`` the answer is always None (the envelope goes on and the device's
        receipts are held instead), and an envelope the device resends (``seq`` not above the
        highest seen of its ``boot``) spends nothing: it is not new data, and charging it would
        lengthen the very hold that made the device resend. Under ``dead_letter`` an envelope
        over a limit is refused and costs the device nothing.
        """
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        key = (site, device)
        state = self._devices.get(key)
        if state is None:
            state = self._devices[key] = _Device(self.settings.resolve(site, device), now)
        limit = state.limit
        if limit.none or (limit.policy == "hold" and _resent(state, boot, seq)):
            return None
        hold = 0.0  # seconds this envelope holds the device's receipts for
        over: str | None = None  # the limit it is over, under policy hold
        if limit.rate > 0 and not self._take(state, now):
            if limit.policy == "dead_letter":
                return self._over(state, site, device, "rate", limit.describe_rate())
            hold, over = self._borrow(state), limit.describe_rate()
            self._limited["rate", "hold"].inc()
        if limit.quota_hour > 0 or limit.quota_day > 0:
            quota = self._quota(state, readings)
            if quota is not None:
                name, until = quota
                if limit.policy == "dead_letter":
                    if limit.rate > 0:
                        state.tokens += 1  # the envelope is not taken: neither is its token
                    return self._over(state, site, device, "quota", name)
                self._limited["quota", "hold"].inc()
                hold, over = max(hold, until), over or name
            state.hour_count += readings
            state.day_count += readings
        self._hold(state, key, over, now + hold)
        return None

    @staticmethod
    def _take(state: _Device, now: float) -> bool:
        """Refill the bucket and take a token; False (nothing taken) if none is there."""
        limit = state.limit
        state.tokens = min(limit.burst, state.tokens + (now - state.stamp) * limit.rate)
        state.stamp = now
        if state.tokens < 1:
            return False
        state.tokens -= 1
        return True

    @staticmethod
    def _borrow(state: _Device) -> float:
        """Take a token on credit (policy hold); the seconds until the debt is repaid."""
        rate = state.limit.rate
        state.tokens = max(state.tokens - 1, -rate * MAX_HOLD)
        return -state.tokens / rate

    def _hold(self, state: _Device, key: tuple[str, str], over: str | None, until: float) -> None:
        """Hold the device's receipts until ``until`` if it is ``over`` a limit; log changes."""
        site, device = key
        if over is None:
            if state.over is not None:
                state.over = None
                log.info("device %s/%s back within its limits", site, device)
            return
        if state.over is None:
            state.over = over
            log.warning("device %s/%s over its %s: holding its receipts", site, device, over)
        with self._lock:
            self._holds[key] = until

    def _quota(self, state: _Device, readings: int) -> tuple[str, float] | None:
        """The quota this envelope would break and seconds until its window ends, or None.

        Starts a new hour or day window when the clock entered one.
        """
        wall = self._wall()
        hour, day = int(wall // 3600), int(wall // 86400)
        if hour != state.hour:
            state.hour, state.hour_count = hour, 0
        if day != state.day:
            state.day, state.day_count = day, 0
        limit = state.limit
        if limit.quota_hour > 0 and state.hour_count + readings > limit.quota_hour:
            return f"hourly quota {limit.quota_hour} readings", (hour + 1) * 3600 - wall
        if limit.quota_day > 0 and state.day_count + readings > limit.quota_day:
            return f"daily quota {limit.quota_day} readings", (day + 1) * 86400 - wall
        return None

    def _over(self, state: _Device, site: str, device: str, kind: str, what: str) -> Refusal:
        self._limited[kind, "dead_letter"].inc()
        if state.over != what:
            state.over = what
            log.warning("device %s/%s over its %s: dead-lettering the excess", site, device, what)
        reason = RATE_LIMITED if kind == "rate" else QUOTA_EXCEEDED
        return Refusal(reason, f"device {site}/{device} over its {what}")

    def _sweep(self, now: float) -> None:
        """Forget devices that are as if new: bucket full, quota windows over, not held.

        Keeps the limiter's memory as small as the recently active fleet.
        """
        self._next_sweep = now + _SWEEP_EVERY
        wall = self._wall()
        hour, day = int(wall // 3600), int(wall // 86400)
        with self._lock:
            for key in [k for k, until in self._holds.items() if until <= now]:
                del self._holds[key]
            held = set(self._holds)
        idle = []
        for key, state in self._devices.items():
            limit = state.limit
            if key in held:
                continue
            if limit.rate > 0 and state.tokens + (now - state.stamp) * limit.rate < limit.burst:
                continue
            if (limit.quota_hour > 0 and state.hour == hour) or (
                limit.quota_day > 0 and state.day == day
            ):
                continue
            idle.append(key)
        for key in idle:
            del self._devices[key]

    # -- any thread ----------------------------------------------------------------------------

    def held_until(self, site: str, device: str) -> float:
        """Until when (monotonic seconds) the device's receipts are held; 0.0 when they are not."""
        with self._lock:
            until = self._holds.get((site, device), 0.0)
        return until if until > self._clock() else 0.0

    def held_count(self) -> int:
        """Devices held now."""
        now = self._clock()
        with self._lock:
            return sum(1 for until in self._holds.values() if until > now)

    @property
    def clock(self) -> Callable[[], float]:
        """The monotonic clock holds are measured on."""
        return self._clock


_BOOTS_KEPT = 4
"""Boots per device whose highest seq the limiter remembers (an agent that restarted may
still resend envelopes of the boots before)."""


def _resent(state: _Device, boot: str | None, seq: int) -> bool:
    """Whether ``(boot, seq)`` was seen before, i.e. is not above its boot's highest seq; else
    remember it."""
    if seq < 0:
        return False
    seqs = state.seqs
    highest = seqs.get(boot)
    if highest is not None and seq <= highest:
        return True
    if highest is None and len(seqs) >= _BOOTS_KEPT:
        del seqs[next(iter(seqs))]
    seqs[boot] = seq
    return False
