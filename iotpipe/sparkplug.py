"""Sparkplug B (Eclipse Sparkplug 3.0) topics and payloads: parse, build, encode, decode.

The bridge maps Sparkplug traffic to envelopes with it (:mod:`bridge.sparkplug`); the simulator
and the tests produce Sparkplug traffic with it. Only the parts iotpipe uses are here:

- topics ``spBv1.0/<group_id>/<message_type>/<edge_node_id>[/<device_id>]`` and the host's
  ``spBv1.0/STATE/<host_id>``: :func:`parse_topic`, :func:`build_topic`;
- payloads (timestamp, seq, metrics with name, alias, timestamp, datatype, is_null, a scalar
  value and scalar properties): :func:`encode_payload`, :func:`decode_payload`;
- the rebirth request a host sends an edge node it knows nothing about: :func:`rebirth_request`.

The protobuf schema is the one published in the Sparkplug 3.0 specification (chapter 6,
"Google Protocol Buffer Schema"), declared here as descriptors built at import time: no code
generator, no generated module. Only the fields iotpipe reads are declared; the others
(DataSet, Template, MetaData, bytes values, extensions) parse as unknown fields, so such a
metric decodes with ``value`` None and its datatype says why.

Decoding never raises for bad input: :func:`decode_payload` returns a :class:`Payload` or a
:class:`DecodeError` (a value with one line saying why).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from functools import lru_cache
from math import isnan
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from iotpipe.wire import Value

__all__ = [
    "BDSEQ_METRIC",
    "NAMESPACE",
    "REBIRTH_METRIC",
    "SCALAR_TYPES",
    "DataType",
    "DecodeError",
    "MessageType",
    "Metric",
    "Payload",
    "Topic",
    "build_topic",
    "decode_payload",
    "encode_payload",
    "parse_payload_message",
    "parse_topic",
    "rebirth_request",
    "typed_value",
]

NAMESPACE = "spBv1.0"
"""The first topic level of every Sparkplug B message."""
REBIRTH_METRIC = "Node Control/Rebirth"
"""The NCMD metric that asks an edge node to publish its births again (boolean true)."""
BDSEQ_METRIC = "bdSeq"
"""The NBIRTH/NDEATH metric pairing a birth with its death certificate."""


class MessageType(StrEnum):
    """The third topic level (the second for ``STATE``)."""

    NBIRTH = "NBIRTH"
    NDEATH = "NDEATH"
    DBIRTH = "DBIRTH"
    DDEATH = "DDEATH"
    NDATA = "NDATA"
    DDATA = "DDATA"
    NCMD = "NCMD"
    DCMD = "DCMD"
    STATE = "STATE"


_DEVICE_TYPES = frozenset(
    {MessageType.DBIRTH, MessageType.DDEATH, MessageType.DDATA, MessageType.DCMD}
)
_TYPES = {t.value: t for t in MessageType}


class DataType(IntEnum):
    """Sparkplug datatypes (the specification's ``DataType`` enum); iotpipe maps the scalars."""

    UNKNOWN = 0
    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14
    UUID = 15
    DATASET = 16
    BYTES = 17
    FILE = 18
    TEMPLATE = 19
    PROPERTYSET = 20
    PROPERTYSETLIST = 21


SCALAR_TYPES = frozenset(DataType(n) for n in range(1, 16))
"""The datatypes with a number, boolean or string value; the rest are not supported."""

# (bits, signed) of the integer datatypes: how their uint32/uint64 wire value is read.
_INTS: dict[int, tuple[int, bool]] = {
    DataType.INT8: (8, True),
    DataType.INT16: (16, True),
    DataType.INT32: (32, True),
    DataType.INT64: (64, True),
    DataType.UINT8: (8, False),
    DataType.UINT16: (16, False),
    DataType.UINT32: (32, False),
    DataType.UINT64: (64, False),
    DataType.DATETIME: (64, False),
}
_STRINGS = frozenset({DataType.STRING, DataType.TEXT, DataType.UUID})


# -- topics -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed Sparkplug B topic.

    Attributes:
        group_id: the group (empty for ``STATE``).
        message_type: the message type.
        edge_node_id: the edge node (for ``STATE``: the host application's id).
        device_id: the device, for DBIRTH, DDEATH, DDATA and DCMD only.
    """

    group_id: str
    message_type: MessageType
    edge_node_id: str
    device_id: str | None = None


# Topics repeat per edge node: memoising the parse takes it off the per-message cost; the bound
# keeps a flood of distinct (hostile) topics from growing memory.
@lru_cache(maxsize=4096)
def parse_topic(topic: str) -> Topic | None:
    """Parse a Sparkplug B topic, or return None when ``topic`` is not one.

    A device id is required for the device message types and refused for the others; no level
    may be empty.
    """
    levels = topic.split("/")
    if len(levels) < 3 or levels[0] != NAMESPACE or "" in levels:
        return None
    if levels[1] == MessageType.STATE:
        # spBv1.0/STATE/<host_id>: a host application's own birth and death (JSON, not protobuf).
        return Topic("", MessageType.STATE, levels[2]) if len(levels) == 3 else None
    if len(levels) not in (4, 5):
        return None
    message_type = _TYPES.get(levels[2])
    if message_type is None or message_type is MessageType.STATE:
        return None
    if (len(levels) == 5) != (message_type in _DEVICE_TYPES):
        return None
    return Topic(levels[1], message_type, levels[3], levels[4] if len(levels) == 5 else None)


def build_topic(
    group_id: str, message_type: MessageType, edge_node_id: str, device_id: str | None = None
) -> str:
    """Build the topic of a Sparkplug B message.

    Raises:
        ValueError: an id is empty or holds ``+``, ``/`` or ``#`` (reserved by the
            specification), or ``device_id`` is given for a node message type (or missing for
            a device one).
    """
    message_type = MessageType(message_type)
    if message_type is MessageType.STATE:
        _check_id("host_id", edge_node_id)
        return f"{NAMESPACE}/STATE/{edge_node_id}"
    _check_id("group_id", group_id)
    _check_id("edge_node_id", edge_node_id)
    if (device_id is not None) != (message_type in _DEVICE_TYPES):
        raise ValueError(
            f"{message_type} topics {'need' if device_id is None else 'take no'} device_id"
        )
    if device_id is None:
        return f"{NAMESPACE}/{group_id}/{message_type}/{edge_node_id}"
    _check_id("device_id", device_id)
    return f"{NAMESPACE}/{group_id}/{message_type}/{edge_node_id}/{device_id}"


def _check_id(what: str, value: str) -> None:
    if not value or any(c in value for c in "+/#"):
        raise ValueError(f"invalid Sparkplug {what} {value!r}: must be non-empty, without + / #")


# -- the schema ---------------------------------------------------------------------------------

_F = descriptor_pb2.FieldDescriptorProto
_OPTIONAL = _F.LABEL_OPTIONAL
_REPEATED = _F.LABEL_REPEATED


def _message(
    name: str, fields: Sequence[tuple[str, int, int, int, str | None, int | None]]
) -> descriptor_pb2.DescriptorProto:
    """A message descriptor from ``(name, number, label, type, type_name, oneof_index)``."""
    proto = descriptor_pb2.DescriptorProto(name=name)
    for field_name, number, label, kind, type_name, oneof in fields:
        entry = proto.field.add(name=field_name, number=number, label=label, type=kind)
        if type_name is not None:
            entry.type_name = type_name
        if oneof is not None:
            entry.oneof_index = oneof
    return proto


def _schema() -> Any:
    """Build the Sparkplug B ``Payload`` message class (spec 3.0, chapter 6)."""
    file = descriptor_pb2.FileDescriptorProto(
        name="iotpipe/sparkplug_b.proto", package="iotpipe.sparkplug_b", syntax="proto2"
    )
    prefix = ".iotpipe.sparkplug_b.Payload."
    property_value = _message(
        "PropertyValue",
        [
            ("type", 1, _OPTIONAL, _F.TYPE_UINT32, None, None),
            ("is_null", 2, _OPTIONAL, _F.TYPE_BOOL, None, None),
            ("int_value", 3, _OPTIONAL, _F.TYPE_UINT32, None, 0),
            ("long_value", 4, _OPTIONAL, _F.TYPE_UINT64, None, 0),
            ("float_value", 5, _OPTIONAL, _F.TYPE_FLOAT, None, 0),
            ("double_value", 6, _OPTIONAL, _F.TYPE_DOUBLE, None, 0),
            ("boolean_value", 7, _OPTIONAL, _F.TYPE_BOOL, None, 0),
            ("string_value", 8, _OPTIONAL, _F.TYPE_STRING, None, 0),
        ],
    )
    property_value.oneof_decl.add(name="value")
    property_set = _message(
        "PropertySet",
        [
            ("keys", 1, _REPEATED, _F.TYPE_STRING, None, None),
            ("values", 2, _REPEATED, _F.TYPE_MESSAGE, prefix + "PropertyValue", None),
        ],
    )
    metric = _message(
        "Metric",
        [
            ("name", 1, _OPTIONAL, _F.TYPE_STRING, None, None),
            ("alias", 2, _OPTIONAL, _F.TYPE_UINT64, None, None),
            ("timestamp", 3, _OPTIONAL, _F.TYPE_UINT64, None, None),
            ("datatype", 4, _OPTIONAL, _F.TYPE_UINT32, None, None),
            ("is_historical", 5, _OPTIONAL, _F.TYPE_BOOL, None, None),
            ("is_transient", 6, _OPTIONAL, _F.TYPE_BOOL, None, None),
            ("is_null", 7, _OPTIONAL, _F.TYPE_BOOL, None, None),
            ("properties", 9, _OPTIONAL, _F.TYPE_MESSAGE, prefix + "PropertySet", None),
            ("int_value", 10, _OPTIONAL, _F.TYPE_UINT32, None, 0),
            ("long_value", 11, _OPTIONAL, _F.TYPE_UINT64, None, 0),
            ("float_value", 12, _OPTIONAL, _F.TYPE_FLOAT, None, 0),
            ("double_value", 13, _OPTIONAL, _F.TYPE_DOUBLE, None, 0),
            ("boolean_value", 14, _OPTIONAL, _F.TYPE_BOOL, None, 0),
            ("string_value", 15, _OPTIONAL, _F.TYPE_STRING, None, 0),
            ("bytes_value", 16, _OPTIONAL, _F.TYPE_BYTES, None, 0),
        ],
    )
    metric.oneof_decl.add(name="value")
    payload = _message(
        "Payload",
        [
            ("timestamp", 1, _OPTIONAL, _F.TYPE_UINT64, None, None),
            ("metrics", 2, _REPEATED, _F.TYPE_MESSAGE, prefix + "Metric", None),
            ("seq", 3, _OPTIONAL, _F.TYPE_UINT64, None, None),
            ("uuid", 4, _OPTIONAL, _F.TYPE_STRING, None, None),
            ("body", 5, _OPTIONAL, _F.TYPE_BYTES, None, None),
        ],
    )
    payload.nested_type.extend([property_value, property_set, metric])
    file.message_type.append(payload)
    # A pool of our own: the default pool is shared with every other protobuf user in-process.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("iotpipe.sparkplug_b.Payload")
    )


_PAYLOAD: Any = _schema()


# -- payloads -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Metric:
    """One Sparkplug metric.

    Attributes:
        name: the metric's name (births carry it; data messages may carry only ``alias``).
        alias: the number standing for ``name`` after the birth.
        timestamp: when the value was taken, epoch ms.
        datatype: a :class:`DataType` number (births carry it; data messages usually do not).
        value: the value: decoded by ``datatype`` when the metric carries one (signed integers
            sign-corrected), else as carried (see :func:`typed_value`); None when absent, null
            or of a type iotpipe does not read (bytes, DataSet, Template, ...).
        is_null: the metric says its value is null.
        properties: the metric's scalar properties (e.g. ``engUnit``).
    """

    name: str | None = None
    alias: int | None = None
    timestamp: int | None = None
    datatype: int | None = None
    value: Value | None = None
    is_null: bool = False
    properties: Mapping[str, Value] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Payload:
    """A Sparkplug B payload.

    Attributes:
        timestamp: when the message was sent, epoch ms.
        seq: the edge node's message counter (0-255); NDEATH carries none.
        metrics: the metrics.
    """

    timestamp: int | None = None
    seq: int | None = None
    metrics: tuple[Metric, ...] = ()


@dataclass(frozen=True, slots=True)
class DecodeError:
    """Why bytes are not a Sparkplug B payload iotpipe can read."""

    message: str


def typed_value(value: Value | None, datatype: int | None) -> Value | None:  # noqa: PLR0911 - one case per datatype family
    """Read a value as ``datatype`` says: signed integers from their two's complement.

    Sparkplug carries Int8/16/32 in a uint32 and Int64 in a uint64; writers differ on whether
    a negative Int8/16 is sign-extended to 32 bits, so both forms are read. Already-signed
    values pass unchanged. Returns None for a value that does not fit the datatype. Floats may
    be infinite or NaN, as IEEE 754 allows: whether such a value is usable is the caller's call.
    """
    if value is None or datatype is None:
        return value
    width = _INTS.get(datatype)
    if width is not None:
        if type(value) is not int:
            return None
        bits, signed = width
        if not signed:
            return value if 0 <= value < 1 << bits else None
        for carrier in (max(bits, 32), bits):
            if 1 << (carrier - 1) <= value < 1 << carrier:
                value -= 1 << carrier
                break
        return value if -(1 << (bits - 1)) <= value < 1 << (bits - 1) else None
    if datatype in (DataType.FLOAT, DataType.DOUBLE):
        return value if type(value) is float else None
    if datatype == DataType.BOOLEAN:
        return value if type(value) is bool else None
    if datatype in _STRINGS:
        return value if type(value) is str else None
    return None


def _carried(message: Any, names: Sequence[str]) -> Value | None:
    """The value of the oneof ``value`` of a protobuf Metric or PropertyValue, if scalar."""
    which = message.WhichOneof("value")
    if which is None or which not in names:
        return None
    carried: object = getattr(message, which)
    if isinstance(carried, bytes):
        # proto2 strings are not checked as UTF-8 by the parser: protobuf hands back bytes.
        raise _NotUtf8Error(which)
    assert isinstance(carried, bool | int | float | str)
    return carried


class _NotUtf8Error(ValueError):
    """A string field of the payload holds bytes that are not UTF-8."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is not UTF-8")


_FIRST_VALUE_FIELD = 10  # Metric's value oneof: int_value = 10 ... bytes_value = 16
_BYTES_VALUE_FIELD = 16

_METRIC_VALUES = (
    "int_value",
    "long_value",
    "float_value",
    "double_value",
    "boolean_value",
    "string_value",
)


def _properties(message: Any) -> dict[str, Value]:
    properties = message.properties
    result: dict[str, Value] = {}
    for key, prop in zip(properties.keys, properties.values, strict=False):
        if type(key) is bytes:
            raise _NotUtf8Error("property key")
        value = typed_value(
            _carried(prop, _METRIC_VALUES), prop.type if prop.HasField("type") else None
        )
        if value is not None and not prop.is_null:
            result[key] = value
    return result


def _metric(message: Any) -> Metric:
    # One ListFields call instead of a HasField per field: decoding is most of the ingest cost.
    name = alias = timestamp = datatype = None
    carried: object = None
    is_null = False
    properties: dict[str, Value] = {}
    for descriptor, value in message.ListFields():
        number = descriptor.number
        if number >= _FIRST_VALUE_FIELD:
            carried = None if number == _BYTES_VALUE_FIELD else value
        elif number == 1:
            name = value
        elif number == 2:
            alias = value
        elif number == 3:
            timestamp = value
        elif number == 4:
            datatype = value
        elif number == 7:
            is_null = value
        elif number == 9:
            properties = _properties(message)
    if isinstance(name, bytes) or isinstance(carried, bytes):
        # proto2 strings are not checked as UTF-8 by the parser: protobuf hands back bytes.
        raise _NotUtf8Error("metric name" if isinstance(name, bytes) else "string_value")
    if is_null:
        carried = None
    assert carried is None or isinstance(carried, bool | int | float | str)
    if datatype is not None and carried is not None:  # data messages usually carry neither
        carried = typed_value(carried, datatype)
    # Positional: keyword arguments cost measurably at seven per message.
    return Metric(name, alias, timestamp, datatype, carried, is_null, properties)


def parse_payload_message(data: bytes) -> Any:
    """The protobuf message of a payload, not converted (for a caller's own fast path).

    Raises:
        Exception: whatever protobuf raises for bytes that are not a payload.
    """
    return _PAYLOAD.FromString(data)


def decode_payload(data: bytes) -> Payload | DecodeError:
    """Decode a Sparkplug B payload; never raises (bad input gives a :class:`DecodeError`)."""
    try:
        message = _PAYLOAD.FromString(data)
        return Payload(
            timestamp=message.timestamp if message.HasField("timestamp") else None,
            seq=message.seq if message.HasField("seq") else None,
            metrics=tuple(_metric(m) for m in message.metrics),
        )
    except Exception as err:  # hostile bytes may fail anywhere inside protobuf
        return DecodeError(f"not a Sparkplug B payload: {type(err).__name__}: {err}"[:200])


def encode_payload(payload: Payload) -> bytes:
    """Encode a Sparkplug B payload.

    Each metric's value goes in the protobuf field its ``datatype`` calls for (Int8..UInt32 in
    ``int_value`` as 32-bit two's complement, Int64/UInt64/DateTime in ``long_value``, ...);
    a metric without a datatype has its value placed by Python type (int -> ``long_value``).

    Raises:
        ValueError: a value does not fit its datatype, or the datatype is not a scalar one.
    """
    message = _PAYLOAD()
    if payload.timestamp is not None:
        message.timestamp = payload.timestamp
    if payload.seq is not None:
        message.seq = payload.seq
    for metric in payload.metrics:
        _fill_metric(message.metrics.add(), metric)
    data: bytes = message.SerializeToString()
    return data


def _fill_metric(message: Any, metric: Metric) -> None:
    if metric.name is not None:
        message.name = metric.name
    if metric.alias is not None:
        message.alias = metric.alias
    if metric.timestamp is not None:
        message.timestamp = metric.timestamp
    if metric.datatype is not None:
        message.datatype = metric.datatype
    if metric.is_null:
        message.is_null = True
    elif metric.value is not None:
        field_name, wire_value = _wire_value(metric.value, metric.datatype)
        setattr(message, field_name, wire_value)
    if metric.properties:
        properties = message.properties
        for key, value in metric.properties.items():
            properties.keys.append(key)
            datatype = _python_type(value)
            field_name, wire_value = _wire_value(value, datatype)
            properties.values.add(type=datatype, **{field_name: wire_value})


def _python_type(value: Value) -> DataType:
    if type(value) is bool:
        return DataType.BOOLEAN
    if type(value) is int:
        return DataType.UINT64 if value >= 1 << 63 else DataType.INT64
    if type(value) is float:
        return DataType.DOUBLE
    return DataType.STRING


def _wire_value(value: Value, datatype: int | None) -> tuple[str, Value]:
    """The protobuf field and value that carry ``value`` as ``datatype``."""
    if datatype is None:
        datatype = _python_type(value)
    typed = typed_value(value, datatype)
    nan = isinstance(value, float) and isinstance(typed, float) and isnan(value) and isnan(typed)
    if typed is None or (typed != value and not nan):
        raise ValueError(f"value {value!r} does not fit Sparkplug datatype {datatype}")
    width = _INTS.get(datatype)
    if width is not None:
        assert type(value) is int
        carrier = 32 if width[0] <= 32 else 64
        wire = value & ((1 << carrier) - 1)
        return ("int_value" if carrier == 32 else "long_value"), wire
    if datatype == DataType.FLOAT:
        return "float_value", value
    if datatype == DataType.DOUBLE:
        return "double_value", value
    if datatype == DataType.BOOLEAN:
        return "boolean_value", value
    return "string_value", value


def rebirth_request(group_id: str, edge_node_id: str, timestamp: int) -> tuple[str, bytes]:
    """The NCMD that asks an edge node to publish its NBIRTH and DBIRTHs again.

    Returns:
        ``(topic, payload)``: metric ``Node Control/Rebirth`` = true, at ``timestamp`` (epoch ms).
    """
    metric = Metric(REBIRTH_METRIC, timestamp=timestamp, datatype=DataType.BOOLEAN, value=True)
    payload = encode_payload(Payload(timestamp=timestamp, metrics=(metric,)))
    return build_topic(group_id, MessageType.NCMD, edge_node_id), payload
