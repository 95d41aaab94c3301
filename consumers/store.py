"""What a consumer hands to a store, and what every store promises.

The consumer decodes AMQP deliveries with the core codec and turns each valid one into a
:class:`Message` (telemetry) or a :class:`DeviceStatus` (status). A store writes a batch of them
with one call to :meth:`Store.write`; when that call returns, the batch is durable and the
consumer acknowledges it to RabbitMQ. When it raises :class:`StoreUnavailable`, nothing of the
batch may be assumed stored and the consumer retries the same batch later (no ack, no nack).

Every store deduplicates by message ``id``: writing a message whose id it has already stored
(within the retention window) stores nothing and counts a duplicate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from iotpipe.envelope import Envelope, Status

#: A reading's value: the contract's number, boolean or string.
Value = float | int | bool | str


@dataclass(frozen=True, slots=True)
class Reading:
    """One measurement, with its time resolved (the reading's own ``ts`` or the envelope's)."""

    sensor: str
    ts_ms: int
    value: Value
    unit: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """One telemetry message, ready to store."""

    id: str
    site: str
    device: str
    seq: int
    boot: str
    readings: tuple[Reading, ...]
    tags: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_envelope(cls, envelope: Envelope) -> Message:
        """Build from a decoded envelope (a missing ``boot`` becomes ``""``)."""
        return cls(
            id=envelope.id,
            site=envelope.site,
            device=envelope.device,
            seq=envelope.seq,
            boot=envelope.boot or "",
            readings=tuple(
                Reading(r.sensor, r.time_ms(envelope), r.value, r.unit) for r in envelope.readings
            ),
            tags=envelope.tags or {},
        )


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """A device's birth (``online``) or last will (``offline``)."""

    site: str
    device: str
    state: str
    ts_ms: int
    agent: str

    @classmethod
    def from_status(cls, status: Status) -> DeviceStatus:
        """Build from a decoded status message."""
        return cls(status.site, status.device, status.state, status.timestamp_ms, status.agent)


@dataclass(slots=True)
class WriteResult:
    """What one :meth:`Store.write` did.

    Attributes:
        messages: messages stored (new ids).
        readings: readings stored.
        duplicates: messages skipped because their id was already stored.
        out_of_order: stored messages whose ``seq`` is below one already seen for the same device
            and boot.
        type_changes: readings whose value type (number, boolean, string) differs from the type
            first seen for that sensor; stored anyway, in the field of their own type.
        rejected: index in the batch -> reason, for messages the store refused permanently (the
            rest of the batch is stored). The consumer retries them up to the delivery limit,
            then dead-letters them.
    """

    messages: int = 0
    readings: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    type_changes: int = 0
    rejected: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Confirmation:
    """How long a device's readings took to be stored and confirmed, as its latest summary.

    The latency of one envelope runs from its newest reading time to the moment RabbitMQ
    confirmed the receipt that covers it; it mixes the device's clock with the consumer's, so
    a device clock running ahead is counted as 0.

    Attributes:
        site: the device's site.
        device: the device.
        last_ms: latency of the envelopes of the latest confirmed receipt (the newest reading).
        p50_ms: median latency over the last ``envelopes`` envelopes.
        p99_ms: 99th percentile over the same envelopes.
        envelopes: how many envelopes ``p50_ms`` and ``p99_ms`` cover (a bounded window).
        confirmed_ms: when the latest receipt was confirmed, Unix epoch milliseconds.
    """

    site: str
    device: str
    last_ms: int
    p50_ms: int
    p99_ms: int
    envelopes: int
    confirmed_ms: int


class StoreUnavailable(Exception):  # noqa: N818 - a state, like TimeoutError's siblings
    """The store cannot take writes right now (server down, disk full, locked): retry later."""


class Store(Protocol):
    """A time-series store with exactly-once effect per message id."""

    def write(self, messages: Sequence[Message], statuses: Sequence[DeviceStatus]) -> WriteResult:
        """Store a batch durably; raise :class:`StoreUnavailable` if that is not possible now."""
        ...

    def prune(self, now_ms: int) -> int:
        """Forget message ids older than the retention window; return how many were dropped."""
        ...

    def check(self) -> None:
        """Raise :class:`StoreUnavailable` when the store cannot be reached (for ``/healthz``)."""
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...


@runtime_checkable
class ConfirmationStore(Protocol):
    """A store that also keeps the devices' confirmation latency (optional for a store).

    The consumer calls :meth:`record_confirmations` in a small transaction of its own, at most
    about once a second, with the devices whose summary changed; a store without this method
    simply does not keep them.
    """

    def record_confirmations(self, confirmations: Sequence[Confirmation]) -> None:
        """Replace the summaries of these devices; raise :class:`StoreUnavailable` if not now."""
        ...
