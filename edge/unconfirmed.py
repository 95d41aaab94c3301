"""Envelopes the broker acknowledged but no receipt covered yet (wire contract 1.1, receipts).

Pure bookkeeping for the agent's MQTT thread (the caller passes the time): which envelopes are
held, which of them a receipt covers, which are due to be sent again, and how long receipts
take. Memory only: after a restart the outbox still has every held envelope, and they are
published again with the same ids (the store absorbs duplicates and receipts them).

Resend timeout: ``clamp(4 x p99 receipt latency, minimum, maximum)`` over the last
:data:`LATENCY_SAMPLES` receipted envelopes (``minimum`` until one was receipted), jittered
+-20 % per envelope. An envelope resent without a receipt waits twice as long before its next
resend (up to ``maximum``), so a pipeline that is down costs a trickle, not a storm.
"""

from __future__ import annotations

import collections
import json
import math
import random

from iotpipe.receipts import Receipt, SeqSet, nearest_rank, resend_timeout

__all__ = ["LATENCY_SAMPLES", "Held", "Unconfirmed", "envelope_boot", "receipts_capability"]

#: Receipted envelopes the latency quantiles are computed over.
LATENCY_SAMPLES = 256
#: Boots whose receipted seqs are remembered (an old boot's backlog rarely spans more).
_BOOTS_REMEMBERED = 4
#: Ranges of receipted seqs remembered per boot.
_RANGES_REMEMBERED = 64
_NO_SEQ = 2**63
_JITTER = 0.2


def _field(payload: bytes, name: str) -> object:
    """A top-level field of a JSON object (None if absent or not a JSON object)."""
    try:
        return json.loads(payload).get(name)
    except (ValueError, AttributeError):
        return None


def envelope_boot(payload: bytes) -> str | None:
    """The ``boot`` of an envelope the agent wrote (None if it has none or is not JSON)."""
    boot = _field(payload, "boot")
    return boot if isinstance(boot, str) else None


def receipts_capability(payload: bytes) -> bool | None:
    """``receipts`` of a capability message on ``iotpipe/v1/pipeline``; None if malformed."""
    value = _field(payload, "receipts")
    return value if isinstance(value, bool) else None


class Held:
    """One acknowledged, unreceipted envelope (its outbox row stays in flight)."""

    __slots__ = ("acked_at", "boot", "due", "id", "payload", "resends", "sent_at", "seq", "topic")

    def __init__(
        self,
        *,
        id: int,
        boot: str | None,
        seq: int,
        topic: str,
        payload: bytes,
        acked_at: float,
        sent_at: float,
        due: float,
        resends: int = 0,
    ) -> None:
        self.id = id
        self.boot = boot
        self.seq = seq
        self.topic = topic
        self.payload = payload
        self.acked_at = acked_at
        self.sent_at = sent_at
        self.due = due
        self.resends = resends

    def __repr__(self) -> str:
        return f"Held(boot={self.boot!r}, seq={self.seq}, id={self.id}, resends={self.resends})"


class Unconfirmed:
    """The held envelopes, what receipts said, and the receipt latency.

    Args:
        timeout_min: the shortest resend timeout, seconds.
        timeout_max: the longest resend timeout, seconds.
        rng: jitter source (tests pass a seeded one).
    """

    def __init__(
        self, timeout_min: float, timeout_max: float, rng: random.Random | None = None
    ) -> None:
        self.timeout_min = timeout_min
        self.timeout_max = timeout_max
        self._rng = rng or random.Random()
        # Ordered by last send (a resend moves an entry to the end): resends take turns.
        self._held: dict[tuple[str | None, int], Held] = {}
        self._stored: dict[str | None, SeqSet] = {}
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        # Sorted once per change, not per quantile: the timeout is read for every held envelope.
        self._ordered: list[float] | None = None
        self.received = 0
        self.resent_total = 0

    def __len__(self) -> int:
        return len(self._held)

    # -- receipts ---------------------------------------------------------------------------------

    def covers(self, boot: str | None, seq: int) -> bool:
        """Whether a receipt seen so far said ``(boot, seq)`` is stored."""
        stored = self._stored.get(boot)
        return stored is not None and seq in stored

    def apply(self, receipt: Receipt, now: float) -> list[int]:
        """Take a receipt in; returns the outbox ids of the held envelopes it covers."""
        self.received += 1
        for entry in receipt.stored:
            stored = self._stored.pop(entry.boot, None) or SeqSet()
            self._stored[entry.boot] = stored  # most recently receipted boot last
            if entry.through is not None:
                stored.add_range(0, entry.through)
            for lo, hi in entry.ranges:
                stored.add_range(lo, hi)
        while len(self._stored) > _BOOTS_REMEMBERED:
            del self._stored[next(iter(self._stored))]
        done = [key for key, held in self._held.items() if self.covers(held.boot, held.seq)]
        ids = []
        for key in done:
            held = self._held.pop(key)
            self._latencies.append(max(0.0, now - held.acked_at))
            self._ordered = None
            ids.append(held.id)
        self._forget_below_held()
        return ids

    def _forget_below_held(self) -> None:
        """Keep the receipted sets small: seqs below a boot's lowest held one are not asked
        about again (an envelope is held after its PUBACK, in publish order), and a set keeps
        at most :data:`_RANGES_REMEMBERED` ranges (gaps left by a thinned outbox)."""
        lowest: dict[str | None, int] = {}
        for held in self._held.values():
            if held.seq < lowest.get(held.boot, _NO_SEQ):
                lowest[held.boot] = held.seq
        for boot, stored in self._stored.items():
            floor = lowest.get(boot)
            if floor is not None and floor > 0:
                stored.discard_through(floor - 1)
            ranges = stored.ranges()
            if len(ranges) > _RANGES_REMEMBERED:
                stored.discard_through(ranges[-_RANGES_REMEMBERED - 1][1])

    # -- holding and resending --------------------------------------------------------------------

    def hold(
        self,
        entry_id: int,
        boot: str | None,
        seq: int,
        topic: str,
        payload: bytes,
        *,
        acked_at: float,
        sent_at: float,
    ) -> bool:
        """Hold an acknowledged envelope; False if a receipt already covered it (delete it)."""
        if self.covers(boot, seq):
            self._latencies.append(0.0)
            self._ordered = None
            return False
        self._held[(boot, seq)] = Held(
            id=entry_id,
            boot=boot,
            seq=seq,
            topic=topic,
            payload=payload,
            acked_at=acked_at,
            sent_at=sent_at,
            due=sent_at + self._timeout(0),
        )
        return True

    def due(self, now: float, n: int) -> list[Held]:
        """Up to ``n`` held envelopes whose resend is due, least recently sent first."""
        out: list[Held] = []
        for held in self._held.values():
            if len(out) >= n:
                break
            if held.due <= now:
                out.append(held)
        return out

    def resent(self, held: Held, now: float) -> None:
        """Note that ``held`` was published again at ``now``."""
        held.resends += 1
        key = (held.boot, held.seq)
        if self._held.get(key) is held:
            self._held[key] = self._held.pop(key)
        held.sent_at = now
        held.due = now + self._timeout(held.resends)
        self.resent_total += 1

    def next_due(self) -> float:
        """When the next resend falls due (monotonic seconds; inf when nothing is held)."""
        return min((held.due for held in self._held.values()), default=math.inf)

    def release(self) -> list[int]:
        """Stop holding: returns every held envelope's outbox id (receipts are off now)."""
        ids = [held.id for held in self._held.values()]
        self._held.clear()
        return ids

    def oldest_acked(self) -> float | None:
        """When the oldest held envelope was acknowledged (None when nothing is held)."""
        return min((held.acked_at for held in self._held.values()), default=None)

    # -- latency ----------------------------------------------------------------------------------

    def latency(self, quantile: float) -> float | None:
        """A quantile of PUBACK -> receipt over the recent receipted envelopes (None: none yet)."""
        if not self._latencies:
            return None
        if self._ordered is None:
            self._ordered = sorted(self._latencies)
        return nearest_rank(self._ordered, quantile)

    def timeout(self) -> float:
        """The resend timeout before jitter: clamp(4 x p99, min, max)."""
        return resend_timeout(self.latency(0.99), self.timeout_min, self.timeout_max)

    def _timeout(self, resends: int) -> float:
        base = min(self.timeout_max, self.timeout() * 2.0**resends)
        return base * self._rng.uniform(1 - _JITTER, 1 + _JITTER)
