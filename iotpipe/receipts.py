"""Receipts (wire contract 1.1): the store tells a device which of its envelopes are stored.

A receipt names envelopes by ``(boot, seq)``, the pair every iotpipe device already puts in its
envelopes. It is a *set* statement — "these seqs of this boot are stored" — so it is idempotent
(applying it twice changes nothing), safe under reordering (sets union in any order) and safe
under duplication. A receipt may also carry ``through``: every seq from 0 to ``through`` of that
boot is stored. A device deletes an envelope it holds as soon as any receipt covers it.

Payload, published retained at QoS 1 on ``iotpipe/v1/{site}/{device}/receipt``::

    {"v": "1.1", "site": "home", "device": "pi-kitchen", "ts": 1795680902125,
     "stored": [{"boot": "b7f3", "through": 41, "ranges": [[43, 45], [50, 50]]}]}

This module is pure and imports only the standard library: the edge agent uses it too.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple, TypeVar

from iotpipe.wire import PREFIX

__all__ = [
    "ALL_RECEIPTS",
    "CAPABILITY_TOPIC",
    "EXCHANGE",
    "MAX_BOOTS",
    "MAX_RANGES",
    "BootReceipt",
    "Receipt",
    "ReceiptBook",
    "SeqSet",
    "decode_receipt",
    "encode_receipt",
    "nearest_rank",
    "receipt_routing_key",
    "receipt_topic",
    "resend_timeout",
]

#: AMQP exchange (topic, durable) consumers publish receipts to; routing keys mirror the topic.
EXCHANGE = "iotpipe.receipts"
#: Retained MQTT topic where a bridge that carries receipts says so (agents read it).
CAPABILITY_TOPIC = f"{PREFIX}/pipeline"
#: Binding that matches every device's receipt routing key.
ALL_RECEIPTS = "iotpipe.v1.*.*.receipt"


def receipt_topic(site: str, device: str) -> str:
    """``iotpipe/v1/{site}/{device}/receipt``: where a device's receipts are published."""
    return f"{PREFIX}/{site}/{device}/receipt"


def receipt_routing_key(site: str, device: str) -> str:
    """``iotpipe.v1.{site}.{device}.receipt``: the receipt topic as an AMQP routing key."""
    return f"{PREFIX.replace('/', '.')}.{site}.{device}.receipt"


#: Receipt entries (boots) in one receipt at most.
MAX_BOOTS = 16
#: Ranges in one entry at most; a writer with more sends the newest ones (older ones come back
#: when the device resends what no receipt covered).
MAX_RANGES = 256
_MAX_SEQ = 2**63 - 1


class SeqSet:
    """A set of non-negative integers kept as sorted, disjoint, non-adjacent inclusive ranges.

    Sequence numbers of one device arrive mostly in order, so a set of thousands of seqs is
    usually one or two ranges.
    """

    __slots__ = ("_his", "_los")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._los: list[int] = []
        self._his: list[int] = []
        for lo, hi in ranges:
            self.add_range(lo, hi)

    def add(self, seq: int) -> None:
        """Add one seq."""
        self.add_range(seq, seq)

    def add_range(self, lo: int, hi: int) -> None:
        """Add every seq from ``lo`` to ``hi`` inclusive.

        Raises:
            ValueError: ``lo > hi`` or a bound is negative.
        """
        if lo < 0 or lo > hi:
            raise ValueError(f"bad range [{lo}, {hi}]")
        los, his = self._los, self._his
        # First range that could touch [lo, hi]: the one whose end reaches lo - 1.
        start = bisect.bisect_left(his, lo - 1)
        end = start
        while end < len(los) and los[end] <= hi + 1:
            end += 1
        if start < end:
            lo = min(lo, los[start])
            hi = max(hi, his[end - 1])
        los[start:end] = [lo]
        his[start:end] = [hi]

    def update(self, other: SeqSet) -> None:
        """Add every seq of ``other``."""
        for lo, hi in other.ranges():
            self.add_range(lo, hi)

    def discard_through(self, through: int) -> None:
        """Forget every seq up to ``through`` inclusive."""
        cut = bisect.bisect_right(self._his, through)
        del self._los[:cut], self._his[:cut]
        if self._los and self._los[0] <= through:
            self._los[0] = through + 1

    def ranges(self) -> list[tuple[int, int]]:
        """The ranges, ascending."""
        return list(zip(self._los, self._his, strict=True))

    def __contains__(self, seq: object) -> bool:
        if not isinstance(seq, int):
            return False
        i = bisect.bisect_right(self._los, seq) - 1
        return i >= 0 and seq <= self._his[i]

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in zip(self._los, self._his, strict=True))

    def __bool__(self) -> bool:
        return bool(self._los)

    def __iter__(self) -> Iterator[int]:
        for lo, hi in zip(self._los, self._his, strict=True):
            yield from range(lo, hi + 1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SeqSet) and self.ranges() == other.ranges()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"SeqSet({self.ranges()!r})"


class BootReceipt(NamedTuple):
    """What is stored of one boot of a device.

    Attributes:
        boot: the envelopes' ``boot`` (``None`` for envelopes without one).
        ranges: stored seqs, ascending inclusive ``(first, last)`` pairs.
        through: every seq from 0 to ``through`` is stored (``None``: not stated).
    """

    boot: str | None
    ranges: tuple[tuple[int, int], ...] = ()
    through: int | None = None

    def covers(self, seq: int) -> bool:
        """Whether this entry says ``seq`` is stored."""
        if self.through is not None and seq <= self.through:
            return True
        return any(lo <= seq <= hi for lo, hi in self.ranges)


class Receipt(NamedTuple):
    """One receipt message for one device."""

    site: str
    device: str
    ts: int
    stored: tuple[BootReceipt, ...]
    v: str = "1.1"

    def covers(self, boot: str | None, seq: int) -> bool:
        """Whether this receipt says envelope ``(boot, seq)`` is stored."""
        return any(entry.boot == boot and entry.covers(seq) for entry in self.stored)


def encode_receipt(receipt: Receipt) -> bytes:
    """The receipt as compact UTF-8 JSON (the contract's field order)."""
    stored = []
    for entry in receipt.stored:
        item: dict[str, object] = {}
        if entry.boot is not None:
            item["boot"] = entry.boot
        if entry.through is not None:
            item["through"] = entry.through
        item["ranges"] = [list(pair) for pair in entry.ranges]
        stored.append(item)
    body = {
        "v": receipt.v,
        "site": receipt.site,
        "device": receipt.device,
        "ts": receipt.ts,
        "stored": stored,
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _seq(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_SEQ


def _entry(raw: object, where: str) -> BootReceipt | str:
    if not isinstance(raw, Mapping):
        return f"{where}: must be an object"
    boot = raw.get("boot")
    if boot is not None and not isinstance(boot, str):
        return f"{where}.boot: must be a string"
    through = raw.get("through")
    if through is not None and not _seq(through):
        return f"{where}.through: must be an integer >= 0"
    ranges = raw.get("ranges", [])
    if not isinstance(ranges, list) or len(ranges) > MAX_RANGES:
        return f"{where}.ranges: must be an array of at most {MAX_RANGES} [first, last] pairs"
    seqs = SeqSet()
    for i, pair in enumerate(ranges):
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and _seq(pair[0])
            and _seq(pair[1])
            and pair[0] <= pair[1]
        ):
            return f"{where}.ranges[{i}]: must be [first, last] with 0 <= first <= last"
        seqs.add_range(pair[0], pair[1])
    return BootReceipt(boot=boot, ranges=tuple(seqs.ranges()), through=through)


def _header(raw: object) -> tuple[str, str, str, int, list[object]] | str:
    if not isinstance(raw, dict):
        return "must be a JSON object"
    v, site, device, ts = raw.get("v"), raw.get("site"), raw.get("device"), raw.get("ts")
    if not isinstance(v, str) or not v.startswith("1."):
        return f"v: must be a 1.x version string, got {v!r}"
    if not isinstance(site, str) or not isinstance(device, str):
        return "site, device: must be strings"
    if not isinstance(ts, int) or not _seq(ts):
        return "ts: must be integer epoch milliseconds"
    stored = raw.get("stored")
    if not isinstance(stored, list) or not 1 <= len(stored) <= MAX_BOOTS:
        return f"stored: must be an array of 1-{MAX_BOOTS} entries"
    return v, site, device, ts, stored


def decode_receipt(payload: bytes | str) -> Receipt | str:
    """Parse and check a receipt; never raises.

    Readers are liberal where it costs nothing: ranges may overlap or come in any order (they are
    a set), and unknown fields are ignored.

    Returns:
        The receipt, or a one-line description of what is wrong with it.
    """
    try:
        header = _header(json.loads(payload))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        return f"not valid JSON: {err}"
    if isinstance(header, str):
        return header
    v, site, device, ts, stored = header
    entries = []
    for i, item in enumerate(stored):
        entry = _entry(item, f"stored[{i}]")
        if isinstance(entry, str):
            return entry
        entries.append(entry)
    return Receipt(site=site, device=device, ts=ts, stored=tuple(entries), v=v)


class _Pending:
    __slots__ = ("boots", "last_sent")

    def __init__(self) -> None:
        self.boots: dict[str | None, SeqSet] = {}
        self.last_sent = float("-inf")


class ReceiptBook:
    """Collects what a store committed and hands out receipts, at most one per device per interval.

    A consumer records every envelope of a committed batch (duplicates too: a device that resends
    did not get the first receipt) and asks :meth:`due` for the receipts to publish now. The
    first envelopes of a device are receipted at once; later ones wait until ``interval`` has
    passed since that device's last receipt, so a busy device costs about one receipt a second.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._pending: dict[tuple[str, str], _Pending] = {}

    def record(self, site: str, device: str, boot: str | None, seq: int) -> None:
        """Note that envelope ``(boot, seq)`` of ``site/device`` is stored."""
        self.record_range(site, device, boot, seq, seq)

    def record_range(self, site: str, device: str, boot: str | None, first: int, last: int) -> None:
        """Note that envelopes ``first`` to ``last`` (inclusive) of that boot are stored."""
        pending = self._pending.get((site, device))
        if pending is None:
            pending = self._pending[(site, device)] = _Pending()
        seqs = pending.boots.get(boot)
        if seqs is None:
            seqs = pending.boots[boot] = SeqSet()
        seqs.add_range(first, last)

    def __len__(self) -> int:
        """Devices with something not yet receipted."""
        return sum(1 for pending in self._pending.values() if pending.boots)

    def due(self, now: float, ts_ms: int, *, flush: bool = False) -> list[Receipt]:
        """The receipts to publish now (all pending ones if ``flush``), and forget them."""
        receipts = []
        for (site, device), pending in self._pending.items():
            if not pending.boots or (not flush and now - pending.last_sent < self.interval):
                continue
            entries = []
            for boot, seqs in list(pending.boots.items())[-MAX_BOOTS:]:
                ranges = seqs.ranges()[-MAX_RANGES:]
                entries.append(BootReceipt(boot=boot, ranges=tuple(ranges)))
            receipts.append(Receipt(site=site, device=device, ts=ts_ms, stored=tuple(entries)))
            pending.boots = {}
            pending.last_sent = now
        # Devices idle for long are forgotten, so the book stays as small as the active fleet.
        stale = [key for key, p in self._pending.items() if now - p.last_sent > 60 * self.interval]
        for key in stale:
            if not self._pending[key].boots:
                del self._pending[key]
        return receipts


_N = TypeVar("_N", int, float)


def nearest_rank(ordered: Sequence[_N], q: float) -> _N:
    """The nearest-rank quantile ``q`` (0..1] of an ascending, non-empty sequence."""
    return ordered[max(0, min(len(ordered), math.ceil(q * len(ordered))) - 1)]


def resend_timeout(p99: float | None, minimum: float, maximum: float) -> float:
    """How long a producer waits for a receipt before resending: 4 x the observed p99 receipt
    latency, within ``[minimum, maximum]`` (``minimum`` until a latency was observed).

    Producers add their own jitter, so that resends after an outage do not come in step.
    """
    base = minimum if p99 is None else 4 * p99
    return min(maximum, max(minimum, base))
