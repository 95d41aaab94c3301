"""Per device, the time from a reading to its envelope being stored and confirmed.

The consumer notes each envelope it records in the receipt book (:meth:`ConfirmLatency.stored`,
with the envelope's newest reading time) and, once RabbitMQ confirmed the receipt of a device,
calls :meth:`ConfirmLatency.confirmed`: every envelope noted for that device since its previous
receipt is covered by this one, because the book hands out everything it holds for a device in
one receipt. The latencies feed the consumer's histogram and a small per-device summary
(:class:`~consumers.store.Confirmation`) that the store keeps for the dashboard.

Pure and single-threaded: time comes in as arguments.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from consumers.store import Confirmation
from iotpipe.receipts import nearest_rank

__all__ = ["ConfirmLatency", "nearest_rank"]

#: Envelopes per device that p50 and p99 are computed over.
WINDOW = 256
#: Reading times kept per device while its receipt is not confirmed: a receipt RabbitMQ keeps
#: refusing must not grow memory without end; beyond it the oldest are forgotten.
PENDING_MAX = 10_000


@dataclass(slots=True)
class _Device:
    pending: deque[int] = field(default_factory=lambda: deque(maxlen=PENDING_MAX))
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=WINDOW))
    last_ms: int = 0
    confirmed_ms: int = 0


class ConfirmLatency:
    """Latencies from reading time to confirmed receipt, per device, and their summaries."""

    def __init__(self) -> None:
        self._devices: dict[tuple[str, str], _Device] = {}
        self._changed: set[tuple[str, str]] = set()

    def stored(self, site: str, device: str, reading_ms: int) -> None:
        """Note an envelope recorded for the next receipt of ``site/device``."""
        key = (site, device)
        state = self._devices.get(key)
        if state is None:
            state = self._devices[key] = _Device()
        state.pending.append(reading_ms)

    def confirmed(self, site: str, device: str, now_ms: int) -> list[float]:
        """The receipt of ``site/device`` is confirmed: the latencies (seconds) it ends."""
        state = self._devices.get((site, device))
        if state is None or not state.pending:
            return []
        # A device clock ahead of ours would give negative times: count those as 0.
        latencies = [max(0, now_ms - reading_ms) for reading_ms in state.pending]
        state.pending.clear()
        state.recent.extend(latencies)
        state.last_ms = latencies[-1]
        state.confirmed_ms = now_ms
        self._changed.add((site, device))
        return [ms / 1000 for ms in latencies]

    def take(self) -> list[Confirmation]:
        """The summaries of the devices confirmed since the last call, in a stable order."""
        out = []
        for site, device in sorted(self._changed):
            state = self._devices[(site, device)]
            ordered = sorted(state.recent)
            out.append(
                Confirmation(
                    site=site,
                    device=device,
                    last_ms=state.last_ms,
                    p50_ms=nearest_rank(ordered, 0.5),
                    p99_ms=nearest_rank(ordered, 0.99),
                    envelopes=len(ordered),
                    confirmed_ms=state.confirmed_ms,
                )
            )
        self._changed.clear()
        return out

    def retry(self, confirmations: list[Confirmation]) -> None:
        """Hand summaries the store could not take back to the next :meth:`take`."""
        self._changed.update((c.site, c.device) for c in confirmations)
