"""The wire module: one copy of the contract's rules, encoders the decoder agrees with."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import agent as edge_agent
from edge.envelopes import build_envelope
from edge.sensors.base import Sample
from iotpipe import envelope as envelope_module
from iotpipe import topics, wire
from iotpipe.envelope import (
    Envelope,
    Reason,
    Rejection,
    Status,
    decode,
    decode_telemetry,
    encode,
)
from iotpipe.wire import (
    MAX_INT,
    MAX_TAGS,
    MAX_UNIT_LENGTH,
    MAX_VALUE_LENGTH,
    MIN_INT,
    VERSION,
    Kind,
    encode_envelope,
    encode_status,
    envelope_template,
    message_id,
    reading_problem,
    topic,
)
from simulator import faults
from tests.strategies import (
    ID_ALPHABET,
    envelope_dicts,
    epoch_ms,
    names,
    sensor_names,
    status_dicts,
    timestamps,
    values,
)

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


# -- encoder and decoder agree ------------------------------------------------------------------

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ENVELOPE_ORDER = ("v", "id", "site", "device", "seq", "boot", "ts", "readings", "tags")


def _as_wire(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` as the wire encoder writes it: version ``VERSION``, fields in contract order."""
    doc = {**doc, "v": VERSION}
    if not doc.get("tags"):
        doc.pop("tags", None)
    return {key: doc[key] for key in ENVELOPE_ORDER if key in doc}


def _encode(doc: dict[str, Any]) -> bytes:
    return encode_envelope(
        id=doc["id"],
        site=doc["site"],
        device=doc["device"],
        seq=doc["seq"],
        ts=doc["ts"],
        readings=[(r["sensor"], r["value"], r.get("unit"), r.get("ts")) for r in doc["readings"]],
        boot=doc.get("boot"),
        tags=doc.get("tags"),
    )


@FAST
@given(doc=envelope_dicts(with_unknown=False))
def test_encoded_envelopes_decode_to_the_same_content(doc: dict[str, Any]) -> None:
    """Whatever encode_envelope writes decodes on its topic to exactly the fields it was given."""
    payload = _encode(doc)
    result = decode(topic(doc["site"], doc["device"]), payload)
    assert isinstance(result, Envelope), result
    assert result == Envelope.model_validate(_as_wire(doc))
    assert json.loads(encode(result)) == _as_wire(doc)


@FAST
@given(doc=envelope_dicts(with_unknown=False))
def test_encoded_envelopes_are_the_bytes_json_writes(doc: dict[str, Any]) -> None:
    """encode_envelope writes byte for byte what compact, UTF-8 ``json.dumps`` writes."""
    expected = json.dumps(_as_wire(doc), separators=(",", ":"), ensure_ascii=False)
    assert _encode(doc) == expected.encode()


@FAST
@given(doc=status_dicts(with_unknown=False))
def test_encoded_statuses_decode_to_the_same_content(doc: dict[str, Any]) -> None:
    """Whatever encode_status writes decodes on its topic to exactly the fields it was given."""
    payload = encode_status(
        site=doc["site"], device=doc["device"], state=doc["state"], ts=doc["ts"], agent=doc["agent"]
    )
    result = decode(topic(doc["site"], doc["device"], Kind.STATUS), payload)
    assert isinstance(result, Status), result
    assert result == Status.model_validate({**doc, "v": VERSION})
    wire_order = {key: ({**doc, "v": VERSION})[key] for key in STATUS_ORDER}
    assert payload == json.dumps(wire_order, separators=(",", ":"), ensure_ascii=False).encode()


STATUS_ORDER = ("v", "site", "device", "state", "ts", "agent")

#: Template conversions and how each renders a drawn value: (format, value as JSON, decoded).
_SLOTS: dict[str, Callable[[Any], tuple[object, Any]]] = {
    "%d": lambda n: (n, n),
    "%.3f": lambda x: (x, round(x, 3)),
    "%s": lambda b: (b"true" if b else b"false", b),
}


@st.composite
def template_cases(draw: st.DrawFn) -> tuple[dict[str, Any], list[tuple[str, str, str | None]]]:
    """Names, tags and reading slots for one device's envelope template."""
    slots = draw(
        st.lists(
            st.tuples(
                sensor_names(),
                st.sampled_from(sorted(_SLOTS)),
                st.none() | st.text(max_size=MAX_UNIT_LENGTH),
            ),
            min_size=1,
            max_size=4,
        )
    )
    fields = {
        "site": draw(names()),
        "device": draw(names()),
        # The id is {boot}-{seq}: a boot of id characters keeps it valid.
        "boot": draw(st.text(ID_ALPHABET, min_size=1, max_size=20)),
        "tags": draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=MAX_TAGS)),
        "ensure_ascii": draw(st.booleans()),
    }
    return fields, slots


@FAST
@given(
    case=template_cases(),
    reading_ts=st.booleans(),
    seq=st.integers(0, 2**63 - 1),
    ts=timestamps(),
    data=st.data(),
)
def test_filled_templates_decode_to_the_values_filled_in(
    case: tuple[dict[str, Any], list[tuple[str, str, str | None]]],
    reading_ts: bool,
    seq: int,
    ts: str | int,
    data: st.DataObject,
) -> None:
    """A filled envelope template decodes with its names, id, seq, ts, tags and values."""
    fields, slots = case
    template = envelope_template(readings=slots, reading_ts=reading_ts, **fields)
    ts_text = json.dumps(ts).encode()
    draws = {
        "%d": st.integers(-(2**63), 2**63 - 1),
        "%.3f": st.floats(-1e9, 1e9),
        "%s": st.booleans(),
    }
    args: list[object] = [seq, seq, ts_text]
    expected = []
    for _sensor, fmt, _unit in slots:
        arg, value = _SLOTS[fmt](data.draw(draws[fmt]))
        args.append(arg)
        if reading_ts:
            args.append(ts_text)
        expected.append(value)
    result = decode(topic(fields["site"], fields["device"]), template % tuple(args))
    assert isinstance(result, Envelope), result
    assert (result.v, result.id, result.seq, result.boot, result.ts) == (
        VERSION,
        message_id(fields["boot"], seq),
        seq,
        fields["boot"],
        ts,
    )
    assert (result.tags or {}) == fields["tags"]
    assert [(r.sensor, r.value, r.unit) for r in result.readings] == [
        (sensor, value, unit) for (sensor, _fmt, unit), value in zip(slots, expected, strict=True)
    ]
    assert all(r.ts == (ts if reading_ts else None) for r in result.readings)


def _readings_maybe_invalid() -> st.SearchStrategy[tuple[Any, Any, Any, Any]]:
    return st.tuples(
        st.one_of(sensor_names(), st.text(max_size=70)),
        st.one_of(
            values(),
            st.sampled_from([math.nan, math.inf, -math.inf, None, [1]]),
            st.integers(),
            st.text(min_size=MAX_VALUE_LENGTH - 1, max_size=MAX_VALUE_LENGTH + 2),
        ),
        st.one_of(st.none(), st.text(max_size=MAX_UNIT_LENGTH + 2), st.integers(0, 1)),
        st.one_of(epoch_ms(), st.integers(), st.booleans()),
    )


@FAST
@given(reading=_readings_maybe_invalid())
def test_reading_problem_agrees_with_the_decoder(reading: tuple[Any, Any, Any, Any]) -> None:
    """A reading reading_problem lets through decodes unchanged; one the decoder refuses it names.

    The one reading it refuses that the decoder takes is an integer beyond 64 bits, which the
    decoder would read as a float: the producer's value would not survive the trip.
    """
    sensor, value, unit, ts_ms = reading
    problem = reading_problem(sensor, value, unit, ts_ms)
    doc = {"v": VERSION, "id": "i", "site": "s", "device": "d", "seq": 0, "ts": 0}
    item = {"sensor": sensor, "value": value, "ts": ts_ms}
    if unit is not None:
        item["unit"] = unit
    try:
        payload = json.dumps({**doc, "readings": [item]}, allow_nan=False).encode()
    except ValueError:  # NaN/Infinity: not JSON at all, and never written by the encoders
        assert problem is not None
        return
    result = decode_telemetry(payload, "iotpipe/v1/s/d/telemetry")
    if problem is None:
        assert isinstance(result, Envelope), result
        assert (result.readings[0].sensor, result.readings[0].value) == (sensor, value)
        assert type(result.readings[0].value) is type(value)
    elif isinstance(result, Envelope):
        assert isinstance(value, int)
        assert not MIN_INT <= value <= MAX_INT
    else:
        assert isinstance(result, Rejection)
        assert result.reason is Reason.SCHEMA


def test_encoders_refuse_non_finite_numbers() -> None:
    """A NaN or infinity makes encode_envelope raise rather than write something that is not JSON."""
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="finite"):
            encode_envelope(
                id="i", site="s", device="d", seq=0, ts=0, readings=[("t", bad, None, None)]
            )


# -- one copy of each rule ----------------------------------------------------------------------


def test_the_codec_and_the_components_use_the_wire_constants() -> None:
    """The decoder, the topic module, the edge agent and the simulator hold wire's own objects."""
    shared = [name for name in wire.__all__ if name.isupper() and hasattr(envelope_module, name)]
    assert {"MAX_PAYLOAD", "MAX_READINGS", "SENSOR_PATTERN", "VERSION_PATTERN"} <= set(shared)
    for name in shared:
        assert getattr(envelope_module, name) is getattr(wire, name), name
    assert topics.Kind is wire.Kind
    assert topics.topic is wire.topic
    assert topics.is_valid_name is wire.is_valid_name
    assert topics.NAME_PATTERN is wire.NAME_PATTERN
    assert topics.TELEMETRY_FILTER.startswith(wire.PREFIX + "/")
    assert edge_agent.MAX_PAYLOAD is wire.MAX_PAYLOAD
    assert faults.MAX_PAYLOAD is wire.MAX_PAYLOAD


def _padded(size: int) -> bytes:
    head = encode_envelope(
        id="i", site="s", device="d", seq=0, ts=0, readings=[("t", 1, None, None)]
    )
    return head[:-1] + b',"pad":"' + b"p" * (size - len(head) - 9) + b'"}'


LIMITS: dict[str, tuple[Callable[[int], bytes], int]] = {
    "MAX_PAYLOAD": (_padded, wire.MAX_PAYLOAD),
    "MAX_READINGS": (
        lambda n: encode_envelope(
            id="i", site="s", device="d", seq=0, ts=0, readings=[("t", 1, None, None)] * n
        ),
        wire.MAX_READINGS,
    ),
    "MAX_TAGS": (
        lambda n: encode_envelope(
            id="i",
            site="s",
            device="d",
            seq=0,
            ts=0,
            readings=[("t", 1, None, None)],
            tags={f"k{i}": "v" for i in range(n)},
        ),
        wire.MAX_TAGS,
    ),
    "MAX_VALUE_LENGTH": (
        lambda n: encode_envelope(
            id="i", site="s", device="d", seq=0, ts=0, readings=[("t", "x" * n, None, None)]
        ),
        wire.MAX_VALUE_LENGTH,
    ),
    "MAX_UNIT_LENGTH": (
        lambda n: encode_envelope(
            id="i", site="s", device="d", seq=0, ts=0, readings=[("t", 1, "u" * n, None)]
        ),
        wire.MAX_UNIT_LENGTH,
    ),
    "MAX_TS_MS": (
        lambda n: encode_envelope(
            id="i", site="s", device="d", seq=0, ts=n, readings=[("t", 1, None, None)]
        ),
        wire.MAX_TS_MS,
    ),
    "MAX_INT (seq)": (
        lambda n: encode_envelope(
            id="i", site="s", device="d", seq=n, ts=0, readings=[("t", 1, None, None)]
        ),
        wire.MAX_INT,
    ),
}


@pytest.mark.parametrize("limit", sorted(LIMITS))
def test_the_decoder_enforces_the_wire_limits(limit: str) -> None:
    """The decoder accepts a payload exactly at each wire limit and rejects one just past it."""
    build, value = LIMITS[limit]
    assert isinstance(decode("iotpipe/v1/s/d/telemetry", build(value)), Envelope)
    rejected = decode("iotpipe/v1/s/d/telemetry", build(value + 1))
    assert isinstance(rejected, Rejection)
    assert rejected.reason in (Reason.SCHEMA, Reason.TOO_LARGE)


def test_wire_loads_neither_pydantic_nor_the_codec() -> None:
    """Importing iotpipe.wire, or the edge agent that encodes with it, loads no pydantic."""
    code = (
        "import sys, iotpipe.wire, edge.agent; "
        "print(','.join(m for m in ('pydantic', 'iotpipe.settings', 'iotpipe.envelope') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == ""
