"""Wire contract 1.x as code: its constants, names, topics, and the encoders producers use.

``docs/wire.md`` describes the contract; this module is its code of record. Every rule lives
here once: the version, the size and count limits, the character rules for names, ids and
sensors, the topic layout, the message id, and the JSON layout of envelopes and statuses.
:mod:`iotpipe.envelope` (the validating decoder) and :mod:`iotpipe.topics` (the topic parser
and AMQP router) import their rules from here; the edge agent and the simulator encode with it.

It imports only the standard library (never pydantic, ``iotpipe.settings`` or
``iotpipe.envelope``), so the edge agent can encode without loading the validating codec.

Encoders (each writes compact UTF-8 JSON in the contract's field order, leaves out optional
fields that are None, and raises ``ValueError`` rather than write a non-finite number):

- :func:`encode_envelope`: a telemetry envelope from plain values, for producers whose readings
  change from message to message (the edge agent).
- :func:`envelope_template`: a ``%``-format template of one device's envelope, built once, for
  producers that send the same sensors every time (the simulator): one ``%`` call per message.
- :func:`encode_status`: a retained status message (``online`` birth, ``offline`` will).

They trust their caller for the rules they do not check (names, lengths, counts):
:func:`reading_problem` checks one reading, and ``iotpipe.envelope.decode`` checks everything.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Literal, TypeAlias

__all__ = [
    "CONTRACT",
    "ID_PATTERN",
    "ID_RULE",
    "MAX_INT",
    "MAX_PAYLOAD",
    "MAX_READINGS",
    "MAX_TAGS",
    "MAX_TS_MS",
    "MAX_UNIT_LENGTH",
    "MAX_VALUE_LENGTH",
    "MIN_INT",
    "NAME_PATTERN",
    "NAME_RULE",
    "PREFIX",
    "SENSOR_PATTERN",
    "SENSOR_RULE",
    "SUPPORTED_MAJOR",
    "VERSION",
    "VERSION_PATTERN",
    "Kind",
    "ReadingTuple",
    "State",
    "Timestamp",
    "Value",
    "check_name",
    "encode_envelope",
    "encode_status",
    "envelope_template",
    "is_valid_name",
    "is_valid_sensor",
    "message_id",
    "reading_problem",
    "topic",
]

# -- contract constants -------------------------------------------------------------------------

VERSION = "1.0"
"""The contract version iotpipe's producers write in ``v`` of envelopes and statuses (unchanged in
1.1, which only added receipts, and in 1.2, which only added the packed uplink)."""
CONTRACT = "1.2"
"""The newest contract version iotpipe implements (``docs/wire.md``)."""
SUPPORTED_MAJOR = 1
"""The contract major version iotpipe's readers accept (any ``1.<minor>``)."""
VERSION_PATTERN = r"^1\.(0|[1-9][0-9]{0,8})$"
"""Versions a reader accepts: ``1.<minor>``, minor a decimal integer without leading zeros."""

MAX_PAYLOAD = 256 * 1024
"""Largest payload, in bytes (256 KiB)."""
MAX_READINGS = 1000
"""Most readings one envelope may carry."""
MAX_TAGS = 16
"""Most entries ``tags`` may have."""
MAX_VALUE_LENGTH = 256
"""Longest string reading value, in characters (Unicode code points)."""
MAX_UNIT_LENGTH = 16
"""Longest unit, in characters."""
MAX_TS_MS = 253_402_300_799_999
"""Latest timestamp: 9999-12-31T23:59:59.999Z, the last instant RFC 3339 can write."""
MIN_INT = -(2**63)
"""Smallest integer reading value kept exactly (64-bit)."""
MAX_INT = 2**63 - 1
"""Largest integer reading value kept exactly (64-bit)."""

# The patterns are anchored and free of look-arounds so pydantic can run them with its Rust
# engine, where ``$`` is the end of the text; Python code uses them with ``re.fullmatch`` so a
# trailing newline never slips through.
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""Site and device names, matched as a whole."""
NAME_RULE = "1-64 characters of A-Z a-z 0-9 _ -"
"""``NAME_PATTERN`` in words, for error messages."""
ID_PATTERN = r"^[A-Za-z0-9_:.-]{1,64}$"
"""Message ids, matched as a whole."""
ID_RULE = "1-64 characters of A-Z a-z 0-9 _ - : ."
"""``ID_PATTERN`` in words."""
SENSOR_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
"""Sensor names, matched as a whole."""
SENSOR_RULE = "1-64 characters of A-Z a-z 0-9 _ - ."
"""``SENSOR_PATTERN`` in words."""

PREFIX = "iotpipe/v1"
"""The first two levels of every contract-1.x MQTT topic."""

State: TypeAlias = Literal["online", "offline"]
"""A status message's ``state``."""
Timestamp: TypeAlias = str | int
"""``ts``: an RFC 3339 UTC string or integer epoch milliseconds."""
Value: TypeAlias = bool | int | float | str
"""A reading value: a boolean, a finite number or a string."""
ReadingTuple: TypeAlias = tuple[str, Value, str | None, Timestamp | None]
"""One reading for :func:`encode_envelope`: ``(sensor, value, unit, ts)``, None for absent."""

_NAME_RE = re.compile(NAME_PATTERN)
_SENSOR_RE = re.compile(SENSOR_PATTERN)


class Kind(StrEnum):
    """What a topic carries: its last level."""

    TELEMETRY = "telemetry"
    """Telemetry envelopes (QoS 1, not retained)."""
    STATUS = "status"
    """Retained status messages (birth ``online``, last will ``offline``)."""


# -- names and topics ---------------------------------------------------------------------------


def is_valid_name(name: str) -> bool:
    """Tell whether ``name`` is a valid site or device name (``NAME_RULE``)."""
    return _NAME_RE.fullmatch(name) is not None


def is_valid_sensor(name: str) -> bool:
    """Tell whether ``name`` is a valid sensor name (``SENSOR_RULE``)."""
    return _SENSOR_RE.fullmatch(name) is not None


def check_name(field: str, value: str) -> None:
    """Raise unless ``value`` is a valid site or device name.

    Args:
        field: what the name is (``site``, ``device``), for the message.
        value: the candidate name.

    Raises:
        ValueError: ``value`` is not a string of ``NAME_RULE``.
    """
    if not isinstance(value, str) or not is_valid_name(value):
        raise ValueError(f"invalid {field} {value!r}: must be {NAME_RULE}")


def topic(site: str, device: str, kind: Kind = Kind.TELEMETRY) -> str:
    """Build the MQTT topic a device publishes on.

    Args:
        site: the site name.
        device: the device name.
        kind: telemetry (default) or status.

    Returns:
        ``iotpipe/v1/{site}/{device}/{kind}``.

    Raises:
        ValueError: when ``site`` or ``device`` is not a valid name or ``kind`` is unknown.
    """
    check_name("site", site)
    check_name("device", device)
    return f"{PREFIX}/{site}/{device}/{Kind(kind).value}"


def message_id(boot: str, seq: int) -> str:
    """The id iotpipe's producers give message ``seq`` of a counter started at ``boot``.

    ``{boot}-{seq}``: unique as long as ``boot`` is, and the same on every retransmission.
    """
    return f"{boot}-{seq}"


def reading_problem(
    sensor: object,
    value: object,
    unit: object,
    ts_ms: object,
    *,
    known_sensors: set[str] | None = None,
) -> str | None:
    """Say why a reading cannot go on the wire, or None if it can.

    A producer calls it per reading so that one bad reading is dropped on its own, instead of
    the bridge dead-lettering the whole envelope that carries it.

    Args:
        sensor: the sensor name.
        value: the value.
        unit: the unit, or None for none.
        ts_ms: the reading time, epoch milliseconds.
        known_sensors: sensor names already accepted, or None; a newly accepted name is added,
            so a producer that passes the same set each time matches each name once.

    Returns:
        One line naming the field and the problem, or None.
    """
    if known_sensors is None or sensor not in known_sensors:
        if not isinstance(sensor, str) or not is_valid_sensor(sensor):
            return f"sensor name {sensor!r} must be {SENSOR_RULE}"
        if known_sensors is not None:
            known_sensors.add(sensor)
    problem = _value_problem(value)
    if problem is not None:
        return problem
    if unit is not None and (not isinstance(unit, str) or len(unit) > MAX_UNIT_LENGTH):
        return f"unit {unit!r} must be a string of at most {MAX_UNIT_LENGTH} characters"
    if isinstance(ts_ms, bool) or not isinstance(ts_ms, int) or not 0 <= ts_ms <= MAX_TS_MS:
        return f"reading time {ts_ms!r} is not epoch milliseconds"
    return None


def _value_problem(value: object) -> str | None:
    if isinstance(value, float):
        return None if math.isfinite(value) else f"value {value!r} is not a finite number"
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if MIN_INT <= value <= MAX_INT else "integer value does not fit in 64 bits"
    if isinstance(value, str):
        if len(value) > MAX_VALUE_LENGTH:
            return f"string value is {len(value)} characters, the limit is {MAX_VALUE_LENGTH}"
        return None
    return f"value of type {type(value).__name__} is not a number, boolean or string"


# -- encoders -----------------------------------------------------------------------------------

# The string escapers json.JSONEncoder itself calls (C when available; undocumented but public
# names of json.encoder since Python 2.6): exactly its output, without a method call per string.
# UTF-8 by default; the ASCII one only for templates whose caller asks for \u escapes.
_STRING: Callable[[str], str] = json.encoder.encode_basestring
_STRING_ASCII: Callable[[str], str] = json.encoder.encode_basestring_ascii
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
# Bound once: encode_envelope's loop calls them per reading.
_isfinite = math.isfinite
_float_repr = float.__repr__
_int_repr = int.__repr__


def _value(value: Value) -> str:
    """The JSON text of a reading value, exactly as ``json`` writes it."""
    if type(value) is float:
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number: not JSON")
        return float.__repr__(value)
    if type(value) is str:
        return _STRING(value)
    if type(value) is int:
        return int.__repr__(value)
    # bool, and subclasses of int/float/str: let json decide, as it always did.
    return _COMPACT(value)


def _object(items: Mapping[str, str], string: Callable[[str], str]) -> str:
    """The compact JSON text of a string -> string object, as ``json`` writes it."""
    return "{" + ",".join([f"{string(k)}:{string(v)}" for k, v in items.items()]) + "}"


def _ts(ts: Timestamp) -> str:
    return _STRING(ts) if isinstance(ts, str) else int.__repr__(ts)


def encode_envelope(
    *,
    id: str,
    site: str,
    device: str,
    seq: int,
    ts: Timestamp,
    readings: Iterable[ReadingTuple],
    boot: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> bytes:
    """Encode a telemetry envelope as compact UTF-8 JSON, in the contract's field order.

    Args:
        id: the message id (see :func:`message_id`).
        site: the site name.
        device: the device name.
        seq: the message's sequence number.
        ts: the envelope's time, an RFC 3339 UTC string or epoch milliseconds, written as given.
        readings: ``(sensor, value, unit, ts)`` per reading; a None unit or ts is left out.
        boot: the counter's boot label, or None to leave it out.
        tags: extra labels, or None (or empty) to leave them out.

    Returns:
        The payload, ``{"v","id","site","device","seq","boot","ts","readings","tags"}``.

    Raises:
        ValueError: a value is a non-finite float.
    """
    string = _STRING
    items = []
    for sensor, value, unit, reading_ts in readings:
        # The common types inline: a function call per reading is most of this loop's cost.
        if type(value) is float and _isfinite(value):
            text = _float_repr(value)
        elif type(value) is int:
            text = _int_repr(value)
        elif value is True:  # json's own spelling, without an encoder call per boolean
            text = "true"
        elif value is False:
            text = "false"
        else:
            text = _value(value)
        if unit is None:
            item = f'{{"sensor":{string(sensor)},"value":{text}'
        else:
            item = f'{{"sensor":{string(sensor)},"value":{text},"unit":{string(unit)}'
        items.append(item + "}" if reading_ts is None else f'{item},"ts":{_ts(reading_ts)}}}')
    boot_text = "" if boot is None else f',"boot":{string(boot)}'
    tags_text = f',"tags":{_object(tags, string)}' if tags else ""
    return (
        f'{{"v":"{VERSION}","id":{string(id)},"site":{string(site)},'
        f'"device":{string(device)},"seq":{_int_repr(seq)}{boot_text},"ts":{_ts(ts)},'
        f'"readings":[{",".join(items)}]{tags_text}}}'
    ).encode()


def envelope_template(
    *,
    site: str,
    device: str,
    boot: str,
    readings: Sequence[tuple[str, str, str | None]],
    reading_ts: bool,
    tags: Mapping[str, str] | None = None,
    ensure_ascii: bool = False,
) -> bytes:
    """Build a ``%``-format template of one device's envelopes (id ``message_id(boot, seq)``).

    Fill it with ``template % (seq, seq, ts, *per_reading)``, where ``ts`` is the JSON text of
    the envelope's ``ts`` as bytes (quotes included for a string) and ``per_reading`` is each
    reading's value, followed by its ``ts`` JSON text when ``reading_ts`` is true.

    Args:
        site: the site name.
        device: the device name.
        boot: the counter's boot label.
        readings: ``(sensor, value_format, unit)`` per reading, in order; ``value_format`` is
            the ``%`` conversion that writes the value as JSON (``%.2f``, ``%d``, ``%s``).
        reading_ts: whether every reading carries its own ``ts``.
        tags: extra labels, or None (or empty) to leave them out.
        ensure_ascii: write non-ASCII characters of names, units and tags as ``\\u`` escapes.

    Returns:
        The template, as bytes.
    """
    string = _STRING_ASCII if ensure_ascii else _STRING

    def text(value: str) -> str:
        return string(value).replace("%", "%%")

    own_ts = ',"ts":%s' if reading_ts else ""
    items = []
    for sensor, value_format, unit in readings:
        unit_text = "" if unit is None else f',"unit":{text(unit)}'
        items.append(f'{{"sensor":{text(sensor)},"value":{value_format}{unit_text}{own_ts}}}')
    tags_text = f',"tags":{_object(tags, string).replace("%", "%%")}' if tags else ""
    id_text = text(message_id(boot, 0))[: -len('0"')] + '%d"'
    return (
        f'{{"v":"{VERSION}","id":{id_text},"site":{text(site)},"device":{text(device)},'
        f'"seq":%d,"boot":{text(boot)},"ts":%s,"readings":[{",".join(items)}]{tags_text}}}'
    ).encode()


def encode_status(*, site: str, device: str, state: State, ts: Timestamp, agent: str) -> bytes:
    """Encode a retained status message as compact UTF-8 JSON.

    Args:
        site: the site name.
        device: the device name.
        state: ``online`` (the birth) or ``offline`` (the last will, or a clean shutdown).
        ts: when, an RFC 3339 UTC string or epoch milliseconds, written as given.
        agent: ``"<name>/<version>"`` of the publishing software.

    Returns:
        The payload, ``{"v","site","device","state","ts","agent"}``.
    """
    return (
        f'{{"v":"{VERSION}","site":{_STRING(site)},"device":{_STRING(device)},'
        f'"state":{_STRING(state)},"ts":{_ts(ts)},"agent":{_STRING(agent)}}}'
    ).encode()
