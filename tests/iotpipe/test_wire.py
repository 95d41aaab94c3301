"""The wire module: one copy of the contract's rules, encoders the decoder agrees with."""

from __future__ import annotations

import hashlib

from edge.envelopes import build_envelope
from edge.sensors.base import Sample
from iotpipe.wire import encode_status

#: sha256 of the edge agent's payloads for ``_edge_payloads()``, captured before the encoders
#: moved into ``iotpipe.wire``: a change here means the edge agent's bytes changed.
EDGE_DIGEST = "0fe9f5d23f859c43422fcb14a0566e56464e26fa5fe2723720df132a61d01bf0"


def _edge_payloads() -> list[bytes]:
    samples = [
        Sample("temperature", 21.5, "Cel", 1795680902125),
        Sample("door.open", False, None, 1795680902125),
        Sample("count", 7, "1", 1795680902200),
        Sample("label", 'é "q" \\ \n', None, 1795680902300),
        Sample("big", 1e16, "W", 1795680902300),
        Sample("neg", -0.0, None, 1795680902300),
    ]
    agent = "iotpipe-edge/0.1.0"
    return [
        build_envelope(
            site="home", device="pi-k", boot="b00t", seq=42, samples=samples, tags={"room": "küche"}
        ),
        build_envelope(site="home", device="pi-k", boot="b00t", seq=43, samples=samples[:1]),
        encode_status(site="home", device="pi-k", state="online", ts=1795680902125, agent=agent),
        encode_status(site="home", device="pi-k", state="offline", ts=1795680902126, agent=agent),
    ]


def test_edge_bytes_are_pinned() -> None:
    """The edge agent encodes a fixed batch and its statuses to exactly the bytes it did before."""
    assert hashlib.sha256(b"\0".join(_edge_payloads())).hexdigest() == EDGE_DIGEST
