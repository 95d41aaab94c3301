"""The Sparkplug B codec: topics, payload round trips, hostile bytes, the rebirth request."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotpipe.sparkplug import (
    REBIRTH_METRIC,
    DataType,
    DecodeError,
    MessageType,
    Metric,
    Payload,
    Topic,
    build_topic,
    decode_payload,
    encode_payload,
    parse_topic,
    rebirth_request,
    typed_value,
)
from iotpipe.wire import Value

_INT_RANGES = {
    DataType.INT8: (-(2**7), 2**7 - 1),
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT8: (0, 2**8 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.UINT64: (0, 2**64 - 1),
    DataType.DATETIME: (0, 2**64 - 1),
}


def test_parse_topic_node_device_and_state() -> None:
    """Node, device and STATE topics parse; the device level goes with device types only."""
    assert parse_topic("spBv1.0/plant/NDATA/gw1") == Topic("plant", MessageType.NDATA, "gw1")
    assert parse_topic("spBv1.0/plant/DDATA/gw1/pump") == Topic(
        "plant", MessageType.DDATA, "gw1", "pump"
    )
    assert parse_topic("spBv1.0/STATE/scada") == Topic("", MessageType.STATE, "scada")
    for bad in (
        "spBv1.0/plant/NDATA/gw1/pump",
        "spBv1.0/plant/DDATA/gw1",
        "spBv1.0/plant/XDATA/gw1",
        "spBv1.0/plant//gw1",
        "spAv1.0/plant/NDATA/gw1",
        "spBv1.0/STATE/scada/x",
        "spBv1.0/plant/NDATA",
        "iotpipe/v1/home/pi/telemetry",
    ):
        assert parse_topic(bad) is None, bad


@given(
    st.text(min_size=1).filter(lambda s: not set("+/#") & set(s)),
    st.sampled_from([t for t in MessageType if t is not MessageType.STATE]),
    st.text(min_size=1).filter(lambda s: not set("+/#") & set(s)),
    st.text(min_size=1).filter(lambda s: not set("+/#") & set(s)),
)
def test_topic_round_trip(group: str, kind: MessageType, node: str, device: str) -> None:
    """build_topic then parse_topic gives the same pieces back."""
    device_id = device if kind.value.startswith("D") else None
    topic = build_topic(group, kind, node, device_id)
    assert parse_topic(topic) == Topic(group, kind, node, device_id)


def test_build_topic_refuses_reserved_characters_and_misplaced_devices() -> None:
    """Ids with + / # or empty, and a device on a node type (or none on a device type), raise."""
    with pytest.raises(ValueError, match="edge_node_id"):
        build_topic("g", MessageType.NDATA, "a/b")
    with pytest.raises(ValueError, match="group_id"):
        build_topic("", MessageType.NDATA, "n")
    with pytest.raises(ValueError, match="device_id"):
        build_topic("g", MessageType.NDATA, "n", "d")
    with pytest.raises(ValueError, match="device_id"):
        build_topic("g", MessageType.DDATA, "n")


@st.composite
def metrics(draw: st.DrawFn) -> Metric:
    """A metric of a scalar datatype with a value that fits it (or null)."""
    datatype = draw(st.sampled_from(sorted(DataType(n) for n in range(1, 16))))
    value: Value
    if datatype in _INT_RANGES:
        low, high = _INT_RANGES[datatype]
        value = draw(st.integers(low, high))
    elif datatype is DataType.FLOAT:
        value = float(draw(st.floats(width=32, allow_nan=False, allow_infinity=False)))
    elif datatype is DataType.DOUBLE:
        value = draw(st.floats(allow_nan=False, allow_infinity=False))
    elif datatype is DataType.BOOLEAN:
        value = draw(st.booleans())
    else:
        value = draw(st.text(max_size=20))
    is_null = draw(st.integers(0, 9)) == 0
    return Metric(
        name=draw(st.none() | st.text(max_size=10)),
        alias=draw(st.none() | st.integers(0, 2**64 - 1)),
        timestamp=draw(st.none() | st.integers(0, 2**64 - 1)),
        datatype=datatype,
        value=None if is_null else value,
        is_null=is_null,
        properties=draw(st.dictionaries(st.text(max_size=5), st.integers(-5, 5), max_size=2)),
    )


@settings(max_examples=200)
@given(
    st.none() | st.integers(0, 2**64 - 1),
    st.none() | st.integers(0, 255),
    st.lists(metrics(), max_size=5),
)
def test_payload_round_trip(timestamp: int | None, seq: int | None, items: list[Metric]) -> None:
    """Every scalar datatype's value (signed integers too) decodes to what was encoded."""
    payload = Payload(timestamp, seq, tuple(items))
    assert decode_payload(encode_payload(payload)) == payload


def test_negative_small_integers_are_read_in_both_writers_forms() -> None:
    """An Int8 -1 sent sign-extended to 32 bits or as 8-bit two's complement reads as -1."""
    assert typed_value(0xFFFFFFFF, DataType.INT8) == -1
    assert typed_value(0xFF, DataType.INT8) == -1
    assert typed_value(0xFFFF, DataType.INT16) == -1
    assert typed_value(2**64 - 1, DataType.INT64) == -1
    assert typed_value(2**32, DataType.UINT32) is None
    assert typed_value(math.inf, DataType.DOUBLE) == math.inf
    assert typed_value(1, DataType.DOUBLE) is None
    assert typed_value("x", DataType.BOOLEAN) is None


def test_encode_refuses_a_value_outside_its_datatype() -> None:
    """Encoding 300 as UInt8 raises rather than sending a wrapped number."""
    with pytest.raises(ValueError, match="does not fit"):
        encode_payload(Payload(metrics=(Metric("x", datatype=DataType.UINT8, value=300),)))


def test_unsupported_values_decode_to_none() -> None:
    """A Bytes metric (and anything not scalar) decodes with value None, its datatype kept."""
    # Metric{name="blob", datatype=17, bytes_value=b"\x01"} written by hand: field 16, length 1.
    metric = b"\x0a\x04blob\x20\x11\x82\x01\x01\x01"
    payload = b"\x12" + bytes([len(metric)]) + metric
    decoded = decode_payload(payload)
    assert decoded == Payload(metrics=(Metric("blob", datatype=DataType.BYTES),))


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_decode_never_raises(data: bytes) -> None:
    """Any bytes decode to a Payload or a DecodeError, never an exception."""
    assert isinstance(decode_payload(data), Payload | DecodeError)


def test_hostile_payloads_give_decode_errors() -> None:
    """Truncated varints, wrong wire types and non-UTF-8 names are clean errors."""
    for data in (b"\xff\xff\xff", b"\x12\x05\x0a", b"\x12\x03\x0a\x01\xff", b"\x08"):
        result = decode_payload(data)
        assert isinstance(result, DecodeError), data
        assert result.message.startswith("not a Sparkplug B payload")


def test_rebirth_request() -> None:
    """The rebirth request is an NCMD to the node with Node Control/Rebirth = true."""
    topic, payload = rebirth_request("plant", "gw1", 1_700_000_000_000)
    assert topic == "spBv1.0/plant/NCMD/gw1"
    decoded = decode_payload(payload)
    assert isinstance(decoded, Payload)
    assert decoded.timestamp == 1_700_000_000_000
    assert [(m.name, m.datatype, m.value) for m in decoded.metrics] == [
        (REBIRTH_METRIC, DataType.BOOLEAN, True)
    ]
