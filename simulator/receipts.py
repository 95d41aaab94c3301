"""Receipts in the simulator: every device keeps what it published until the store confirms it.

The same behaviour as the edge agent's (``[edge] receipts``), in the simulator's terms: a device
keeps each valid envelope it published as *unconfirmed* (in memory: its topic and bytes) until a
receipt (:mod:`iotpipe.receipts`) covers its ``(boot, seq)``. An envelope without a receipt
within the timeout — clamp(4 x p99 of the observed receipt latency, ``receipt_timeout_min``,
``receipt_timeout_max``), jittered +-20 % — is resent with the same bytes, oldest first. At most
``receipt_window`` envelopes of a device are unconfirmed; the run loop publishes no new envelope
for a device whose window is full (:meth:`ReceiptTracker.room`).

Envelopes the bridge must reject (the malformed, schema, oversize and mismatch faults) are never
receipted, so they are not kept. A duplicate (the duplicate fault, an offline resend) is the same
envelope: it is kept once, and not again once receipted.

Receipt latency is measured from the (first) publish to the receipt, over the last 256
receipted envelopes.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from iotpipe.receipts import Receipt, SeqSet, nearest_rank, resend_timeout

#: Receipted envelopes the latency quantiles are computed over.
LATENCY_SAMPLES = 256
#: Recompute the resend timeout after this many new latency samples.
_RETUNE_EVERY = 32


@dataclass(slots=True)
class _Kept:
    """One unconfirmed envelope: what to resend and when it was first published."""

    topic: str
    payload: bytes
    sent: float


@dataclass(slots=True)
class _Device:
    site: str
    name: str
    boot: str
    kept: dict[int, _Kept] = field(default_factory=dict)
    confirmed: SeqSet = field(default_factory=SeqSet)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; 0.0 when empty."""
    return nearest_rank(sorted(values), q) if values else 0.0


class ReceiptTracker:
    """The unconfirmed envelopes of a fleet, their receipts and their resends.

    Args:
        devices: ``(site, device, boot)`` of every device, by index.
        window: most unconfirmed envelopes per device.
        timeout_min: shortest resend timeout, seconds.
        timeout_max: longest resend timeout, seconds.
        rng: draws the jitter.

    Attributes:
        receipts: receipt messages applied.
        confirmed: envelopes a receipt covered while they were unconfirmed.
        resends: envelopes published again because no receipt came in time.
        timeout: the current resend timeout (before jitter), seconds.
    """

    def __init__(
        self,
        devices: Sequence[tuple[str, str, str]],
        *,
        window: int = 256,
        timeout_min: float = 5.0,
        timeout_max: float = 300.0,
        rng: random.Random | None = None,
    ) -> None:
        self._devices = [_Device(site, name, boot) for site, name, boot in devices]
        self._index = {(d.site, d.name): i for i, d in enumerate(self._devices)}
        self.window = window
        self.timeout_min = timeout_min
        self.timeout_max = timeout_max
        self.timeout = timeout_min
        self._rng = rng or random.Random()
        # (due, device index, seq) in publish order; entries already receipted are skipped.
        self._due: deque[tuple[float, int, int]] = deque()
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._new_samples = 0
        self.unconfirmed = 0
        self.receipts = 0
        self.confirmed = 0
        self.resends = 0

    def _deadline(self, now: float) -> float:
        return now + self.timeout * self._rng.uniform(0.8, 1.2)

    def keep(self, index: int, seq: int, topic: str, payload: bytes, now: float) -> None:
        """Device ``index`` published envelope ``seq``: keep it until a receipt covers it."""
        dev = self._devices[index]
        kept = dev.kept
        if seq in kept or seq in dev.confirmed:
            return  # a duplicate of an envelope already kept or receipted: one envelope
        kept[seq] = _Kept(topic, payload, now)
        self.unconfirmed += 1
        self._due.append((self._deadline(now), index, seq))

    def room(self, index: int) -> int:
        """How many more envelopes device ``index`` may publish before its window is full."""
        return self.window - len(self._devices[index].kept)

    def apply(self, receipt: Receipt, now: float) -> int:
        """Forget every kept envelope ``receipt`` covers; returns how many."""
        index = self._index.get((receipt.site, receipt.device))
        if index is None:
            return 0
        self.receipts += 1
        dev = self._devices[index]
        kept = dev.kept
        done = 0
        for entry in receipt.stored:
            if entry.boot != dev.boot or not kept:
                continue
            covered = [seq for seq in kept if entry.covers(seq)]
            for seq in covered:
                self._latencies.append(now - kept.pop(seq).sent)
                dev.confirmed.add(seq)
            done += len(covered)
        if done:
            self.unconfirmed -= done
            self.confirmed += done
            self._new_samples += done
            if self._new_samples >= _RETUNE_EVERY:
                self._new_samples = 0
                self.timeout = resend_timeout(
                    self.latency(0.99), self.timeout_min, self.timeout_max
                )
        return done

    def due(self, now: float, limit: int) -> Iterator[tuple[int, str, bytes]]:
        """Up to ``limit`` envelopes to resend now, oldest first, as (device index, topic, payload).

        Each one resent is due again one (jittered) timeout later.
        """
        queue = self._due
        devices = self._devices
        sent = 0
        while queue and sent < limit and queue[0][0] <= now:
            _, index, seq = queue.popleft()
            kept = devices[index].kept.get(seq)
            if kept is None:
                continue  # receipted meanwhile
            queue.append((self._deadline(now), index, seq))
            self.resends += 1
            sent += 1
            yield index, kept.topic, kept.payload
        if queue and len(queue) > 4 * max(self.unconfirmed, 1024):
            # Receipted entries pile up behind a long timeout: drop them in one pass.
            self._due = deque(e for e in queue if e[2] in devices[e[1]].kept)

    def latency(self, q: float) -> float:
        """The ``q`` quantile of the receipt latency (seconds) over the last receipted envelopes."""
        return quantile(self._latencies, q)

    def oldest_age(self, now: float) -> float:
        """Seconds since the oldest unconfirmed envelope was first published (0 if none)."""
        oldest = min(
            (next(iter(d.kept.values())).sent for d in self._devices if d.kept), default=now
        )
        return now - oldest
