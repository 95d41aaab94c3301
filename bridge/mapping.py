"""What an ingest format makes of a foreign MQTT message: readings of one device, or an error.

The shared vocabulary of the bridge's ingest rules (:mod:`bridge.ingest`) and the formats they
apply (JSON, plain values, line protocol, Sparkplug B, ...). A format turns one message into
zero or more :class:`Mapped` (each becomes one wire-contract envelope, published like any other)
or one :class:`MappingError` (the message is dead-lettered as ``bridge.mapping_<what>``, body
unchanged, with the rule's name). Formats never raise for bad input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple, Protocol

from iotpipe.wire import Value

__all__ = ["FormatOutcome", "Mapped", "MappingError", "Reading", "StatefulFormat"]

#: The tags of a Mapped that has none (a named tuple's default is shared: it must be immutable).
_NO_TAGS: Mapping[str, str] = MappingProxyType({})


class Reading(NamedTuple):
    """One measurement taken from a foreign payload.

    A named tuple (immutable, and several times cheaper to build than a dataclass: a mapped
    message makes one per value), in the order ``encode_envelope`` takes a reading in.

    Attributes:
        sensor: the contract's sensor name (1-64 of ``A-Z a-z 0-9 _ - .``).
        value: a finite number, a boolean or a string of at most 256 characters.
        unit: the UCUM/SenML unit code, if known.
        ts_ms: this reading's own time (epoch ms), when it differs from the envelope's.
    """

    sensor: str
    value: Value
    unit: str | None = None
    ts_ms: int | None = None


class Mapped(NamedTuple):
    """The readings of one device from one foreign message: one envelope's worth.

    A named tuple, like :class:`Reading` (one is built per mapped message).

    Attributes:
        site: the contract's site name.
        device: the contract's device name.
        ts_ms: the envelope's time (the payload's, else the receive time), epoch ms.
        readings: 1-1000 readings.
        id: the envelope id: deterministic (a hash of the message and its time or counter)
            wherever the payload allows, so a redelivery is stored once.
        seq: the device's counter for this envelope (the store's completeness uses it).
        boot: the label of the counter's run, if any.
        tags: static and derived labels.
    """

    site: str
    device: str
    ts_ms: int
    readings: tuple[Reading, ...]
    id: str
    seq: int
    boot: str | None = None
    tags: Mapping[str, str] = _NO_TAGS


@dataclass(frozen=True, slots=True)
class MappingError:
    """Why a message does not fit its rule.

    Attributes:
        what: the reason's suffix: the message goes to ``iotpipe.dead`` as
            ``bridge.mapping_<what>`` (lower case, ``a-z0-9_``; e.g. ``json``, ``no_values``,
            ``time``, ``name``, ``no_birth``).
        message: one line for ``x-iotpipe-error``.
    """

    what: str
    message: str


@dataclass(frozen=True, slots=True)
class FormatOutcome:
    """What a stateful format (e.g. Sparkplug B) made of one message.

    Attributes:
        mapped: the envelopes' worth of readings (may be empty: a birth certificate that only
            sets up aliases, a death).
        error: set when the message does not fit: it is dead-lettered (``mapped`` is then empty).
        commands: MQTT messages ``(topic, payload)`` the bridge publishes for the format, QoS 0,
            not retained (e.g. a Sparkplug rebirth request).
    """

    mapped: tuple[Mapped, ...] = ()
    error: MappingError | None = None
    commands: tuple[tuple[str, bytes], ...] = ()


class StatefulFormat(Protocol):
    """A format that keeps state between messages (aliases, sequence numbers, births).

    One instance per ingest rule, called on the bridge's thread only, in arrival order.
    """

    def handle(self, topic: str, payload: bytes, received_ms: int) -> FormatOutcome:
        """Map one message received at ``received_ms`` (epoch ms); never raises for bad input."""
        ...
