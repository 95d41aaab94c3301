"""The edge agent's envelopes: its samples, checked and encoded with :mod:`iotpipe.wire`.

The rules and the JSON writing are the core's (``iotpipe.wire``, free of pydantic, so the agent
never loads the validating codec); this module only says how a batch of :class:`Sample` values
becomes one envelope. ``tests/edge`` decodes what it builds with ``iotpipe.envelope`` to prove
the two agree.

Envelope layout: ``ts`` is the time of the batch's first reading (integer epoch milliseconds);
a reading carries its own ``ts`` only when it differs from that. ``id`` is
:func:`iotpipe.wire.message_id` of ``boot`` and ``seq``, minted once and stored with the payload,
so a retransmission keeps it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from edge.sensors.base import Sample
from iotpipe.wire import MAX_READINGS, encode_envelope, message_id, reading_problem

__all__ = ["build_envelope", "sample_problem"]


def sample_problem(sample: Sample, known_names: set[str]) -> str | None:
    """Why ``sample`` cannot go on the wire, or None if it can.

    Args:
        sample: a driver's reading.
        known_names: sensor names already checked (grown here, so each name is matched once).
    """
    return reading_problem(
        sample.sensor, sample.value, sample.unit, sample.ts_ms, known_sensors=known_names
    )


def build_envelope(
    *,
    site: str,
    device: str,
    boot: str,
    seq: int,
    samples: Sequence[Sample],
    tags: Mapping[str, str] | None = None,
) -> bytes:
    """Encode one telemetry envelope (compact UTF-8 JSON).

    Args:
        site: the site name (valid per the contract).
        device: the device name (valid per the contract).
        boot: the counter's boot label.
        seq: this envelope's sequence number.
        samples: 1-1000 samples, each already accepted by :func:`sample_problem`.
        tags: extra labels (at most 16), or None.
    """
    if not 1 <= len(samples) <= MAX_READINGS:
        raise ValueError(f"an envelope carries 1-{MAX_READINGS} readings, got {len(samples)}")
    ts = samples[0].ts_ms
    return encode_envelope(
        id=message_id(boot, seq),
        site=site,
        device=device,
        seq=seq,
        boot=boot,
        ts=ts,
        readings=[(s.sensor, s.value, s.unit, None if s.ts_ms == ts else s.ts_ms) for s in samples],
        tags=tags,
    )
