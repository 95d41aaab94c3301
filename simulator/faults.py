"""Fault injection: the ways real devices misbehave, as pure functions over payloads.

At most one fault hits a message. :class:`FaultPlan` turns the configured rates into
cumulative thresholds so the hot path costs one ``random()`` call and one comparison; the rare
faulty message then goes through the functions below. Each says what it produces and the
tests hold it to that:

    duplicate   the same payload published twice (same ``id``)          valid, deduped downstream
    reorder     held back and published after up to N later messages    valid, seq out of order
    malformed   a truncated payload                                      bad_json
    schema      valid JSON that breaks a contract rule                   schema
    oversize    padded past the 256 KiB payload limit                    too_large
    mismatch    payload ``device`` differs from the topic's              topic_mismatch
    skew        ``ts`` shifted by up to +-skew_seconds                   valid, wrong clock
    offline     the device goes offline for N messages: they are buffered, then sent on
                reconnect after the last message sent before the outage (same ids again)
"""

from __future__ import annotations

import bisect
import json
import random
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, TypeVar

from iotpipe.wire import MAX_PAYLOAD

T = TypeVar("T")


class Fault(StrEnum):
    """The kinds of fault the simulator injects."""

    DUPLICATE = "duplicate"
    REORDER = "reorder"
    MALFORMED = "malformed"
    SCHEMA = "schema"
    OVERSIZE = "oversize"
    MISMATCH = "mismatch"
    SKEW = "skew"
    OFFLINE = "offline"


#: Faults whose message the bridge must reject (it never reaches a store).
REJECTED = frozenset({Fault.MALFORMED, Fault.SCHEMA, Fault.OVERSIZE, Fault.MISMATCH})


@dataclass(frozen=True)
class FaultPlan:
    """Which fault, if any, hits a message, given one uniform draw in [0, 1).

    Faults are mutually exclusive: the interval [0, 1) is cut into one slice per fault, as wide
    as its rate, and the rest means "no fault". The rates must therefore sum to at most 1.
    """

    rates: Mapping[Fault, float]
    _edges: tuple[float, ...] = field(init=False, repr=False)
    _kinds: tuple[Fault, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        edges: list[float] = []
        kinds: list[Fault] = []
        total = 0.0
        for kind in Fault:  # a fixed order keeps a seed's faults the same across versions
            rate = self.rates.get(kind, 0.0)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rate {kind.value}={rate} must be within 0..1")
            if rate > 0:
                total += rate
                edges.append(total)
                kinds.append(kind)
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates sum to {total:g}; at most 1 (one fault per message)")
        object.__setattr__(self, "_edges", tuple(edges))
        object.__setattr__(self, "_kinds", tuple(kinds))

    @property
    def total(self) -> float:
        """The probability that a message gets some fault."""
        return self._edges[-1] if self._edges else 0.0

    def choose(self, u: float) -> Fault | None:
        """The fault for the draw ``u`` in [0, 1), or None."""
        i = bisect.bisect_right(self._edges, u)
        return self._kinds[i] if i < len(self._kinds) else None


# -- payload mutations (pure) --------------------------------------------------------------------


def truncate(payload: bytes, rng: random.Random) -> bytes:
    """Cut ``payload`` short (as a lost TCP segment or a full buffer would): never valid JSON.

    A proper prefix of a JSON object always lacks its closing brace, so it cannot parse.
    """
    if len(payload) <= 1:
        return b"{"
    return payload[: rng.randrange(1, len(payload))]


#: Schema violations, each a function of the parsed envelope: all keep valid JSON.
_SCHEMA_BREAKS: tuple[tuple[str, Any], ...] = (
    ("missing id", lambda d: d.pop("id", None)),
    ("missing ts", lambda d: d.pop("ts", None)),
    ("negative seq", lambda d: d.__setitem__("seq", -1 - int(d.get("seq", 0)))),
    ("seq as string", lambda d: d.__setitem__("seq", str(d.get("seq", 0)))),
    ("empty readings", lambda d: d.__setitem__("readings", [])),
    ("object value", lambda d: d["readings"][0].__setitem__("value", {"raw": 1})),
    ("bad sensor name", lambda d: d["readings"][0].__setitem__("sensor", "temp erature/1")),
    ("bad ts", lambda d: d.__setitem__("ts", "yesterday")),
)


def break_schema(payload: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Break one contract rule in a valid envelope, keeping it valid JSON.

    Returns:
        The new payload and which rule it breaks (e.g. ``"missing id"``).
    """
    doc = json.loads(payload)
    what, mutate = _SCHEMA_BREAKS[rng.randrange(len(_SCHEMA_BREAKS))]
    mutate(doc)
    return json.dumps(doc, separators=(",", ":")).encode(), what


def oversize(payload: bytes, limit: int = MAX_PAYLOAD) -> bytes:
    """Pad a valid envelope with an unknown field until it is just over ``limit`` bytes.

    Readers ignore unknown fields, so the size is the only thing wrong with the result.
    """
    doc = json.loads(payload)
    doc["padding"] = ""
    base = len(json.dumps(doc, separators=(",", ":")).encode())
    doc["padding"] = "x" * max(1, limit + 1 - base)
    return json.dumps(doc, separators=(",", ":")).encode()


def mismatch(payload: bytes) -> bytes:
    """Rename the payload's device (a misconfigured device name) so it disagrees with its topic."""
    doc = json.loads(payload)
    device = str(doc.get("device", "device"))
    doc["device"] = (device[:60] + "-bad") if not device.endswith("-bad") else device[:-4]
    return json.dumps(doc, separators=(",", ":")).encode()


def skew(rng: random.Random, max_seconds: float) -> int:
    """A clock error in milliseconds, uniform in +-``max_seconds`` and never zero."""
    limit = max(1, int(max_seconds * 1000))
    offset = rng.randint(1, limit)
    return offset if rng.random() < 0.5 else -offset


# -- stateful helpers, deterministic given their inputs ----------------------------------------


class Reorderer(Generic[T]):
    """Holds items back and releases each after a given number of later items.

    Feed every outgoing item's position with :meth:`tick`; it returns the held items now due.
    ``hold(item, delay)`` releases ``item`` once ``delay`` more items have gone out, so it
    overtakes nothing and is overtaken by exactly ``delay`` items (fewer at the very end, when
    :meth:`drain` releases everything still held, in order).
    """

    def __init__(self) -> None:
        self._held: list[tuple[int, int, T]] = []
        self._position = 0
        self._order = 0

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, item: T, delay: int) -> None:
        """Hold ``item`` until ``delay`` (>= 1) further items have been ticked."""
        self._order += 1
        bisect.insort(self._held, (self._position + max(1, delay), self._order, item))

    def tick(self) -> list[T]:
        """Count one outgoing item; return the held items due after it, oldest first."""
        self._position += 1
        held = self._held
        if not held or held[0][0] > self._position:
            return []
        due = 0
        while due < len(held) and held[due][0] <= self._position:
            due += 1
        out = [item for _, _, item in held[:due]]
        del held[:due]
        return out

    def drain(self) -> list[T]:
        """Release every held item, in release order."""
        out = [item for _, _, item in self._held]
        self._held.clear()
        return out


@dataclass
class Outage(Generic[T]):
    """One device's offline period: the messages it buffers until it is back.

    Attributes:
        remaining: messages still to be generated while offline.
        resend: the last message sent before the link dropped, unacknowledged as far as the
            device knows, so it goes out again (same id) first when the device is back.
        buffered: messages generated while offline, in order.
    """

    remaining: int
    resend: T | None = None
    buffered: deque[T] = field(default_factory=deque)

    def buffer(self, item: T) -> bool:
        """Keep ``item`` for later; True when this was the outage's last message."""
        self.buffered.append(item)
        self.remaining -= 1
        return self.remaining <= 0

    def release(self) -> Iterator[T]:
        """What the device sends on reconnect: the unacknowledged message, then the buffer."""
        if self.resend is not None:
            yield self.resend
            self.resend = None
        while self.buffered:
            yield self.buffered.popleft()
