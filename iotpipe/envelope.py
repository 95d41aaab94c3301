"""The telemetry envelope and status message of wire contract 1.x, and their codec.

``decode_telemetry``, ``decode_status`` and ``decode`` turn payload bytes into a frozen model or a
``Rejection``; they never raise, whatever the bytes. Checks run in the order the contract's
failure reasons are ranked, and the first failing one names the rejection:

1. size (``too_large``, the payload is not parsed at all),
2. UTF-8 (``bad_encoding``),
3. JSON syntax (``bad_json``; ``NaN``/``Infinity`` literals are not JSON),
4. contract version (``unsupported_version`` for another major, before any schema check),
5. schema (``schema``: types, charsets, lengths, finite numbers, timestamps),
6. topic agreement (``topic_mismatch``).

``encode`` is the inverse: compact UTF-8 JSON, keeping unknown fields and ``ts`` exactly as
given, so ``decode(encode(msg)) == msg``.

Fast path: one ``model_validate_json`` call with every rule enforced in Rust, except one Python
call per timestamp string (the common shape read by slicing) and per unknown field. Finding the
reason and wording the message only happens for rejected payloads.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any, TypeAlias, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetPydanticSchema,
    ValidationError,
)
from pydantic_core import ErrorDetails, PydanticCustomError, from_json
from pydantic_core import core_schema as cs

from iotpipe.topics import Kind, Topic, parse_topic
from iotpipe.wire import (
    ID_PATTERN,
    ID_RULE,
    MAX_INT,
    MAX_PAYLOAD,
    MAX_READINGS,
    MAX_TAGS,
    MAX_TS_MS,
    MAX_UNIT_LENGTH,
    MAX_VALUE_LENGTH,
    MIN_INT,
    NAME_PATTERN,
    NAME_RULE,
    PREFIX,
    SENSOR_PATTERN,
    SENSOR_RULE,
    SUPPORTED_MAJOR,
    VERSION_PATTERN,
    State,
)
from iotpipe.wire import Timestamp as WireTimestamp
from iotpipe.wire import Value as WireValue

# The contract's limits and patterns (MAX_PAYLOAD, SENSOR_PATTERN, ...) are iotpipe.wire's; they
# stay importable from here, where older code looks for them.
__all__ = [
    "Envelope",
    "Reading",
    "Reason",
    "Rejection",
    "Status",
    "Timestamp",
    "Value",
    "decode",
    "decode_status",
    "decode_telemetry",
    "encode",
    "reading_time_ms",
]

# Any well-formed "<major>.<minor>", to tell another major (unsupported) from garbage (schema).
_ANY_VERSION_RE = re.compile(r"(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})")
_RFC3339_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_UTC_OFFSETS = frozenset({"Z", "z", "+00:00", "-00:00"})
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
# For the timestamps the fast path of _rfc3339_to_ms leaves to the full parser (other shapes
# repeat too: batched readings share one, producers resend).
_TS_CACHE_SIZE = 4096


class Reason(StrEnum):
    """Why a payload was rejected; the bridge dead-letters with routing key ``bridge.<reason>``."""

    TOO_LARGE = "too_large"
    """The payload exceeds ``MAX_PAYLOAD`` bytes."""
    BAD_ENCODING = "bad_encoding"
    """The payload is not valid UTF-8."""
    BAD_JSON = "bad_json"
    """The payload is not one JSON text (syntax error, empty, ``NaN``/``Infinity`` literal, a
    number too long to parse, nesting deeper than the parser allows)."""
    UNSUPPORTED_VERSION = "unsupported_version"
    """``v`` is a well-formed version of another major (e.g. ``"2.0"``)."""
    SCHEMA = "schema"
    """Valid JSON that breaks a rule of the contract (including a malformed ``v``, or a top level
    that is not an object)."""
    TOPIC_MISMATCH = "topic_mismatch"
    """``site``/``device`` in the payload differ from the topic it arrived on."""
    BAD_TOPIC = "bad_topic"
    """The topic is not an iotpipe v1 topic of the expected kind."""
    INTERNAL = "internal"
    """The validator itself failed: an iotpipe bug. Reported instead of raised so one message can
    never stop the bridge; please report it with the payload."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """A payload that does not satisfy the contract.

    Attributes:
        reason: the failure class, stable and machine-readable.
        message: one human-readable line naming the field path and the problem, e.g.
            ``readings[3].value: must be a finite number``.
    """

    reason: Reason
    message: str

    def __str__(self) -> str:
        """Return ``reason: message``."""
        return f"{self.reason.value}: {self.message}"


# ---------------------------------------------------------------------------------------------
# Field rules. Pydantic enforces them in Rust on the fast path; when a field fails, the
# ``*_problem`` functions re-examine its input to word the complaint precisely.

_JSON_TYPE_NAMES: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "a boolean"),  # before int: bool is an int subclass
    ((int, float), "a number"),
    (str, "a string"),
    ((list, tuple), "an array"),
    (dict, "an object"),
)


def _json_type(value: object) -> str:
    """Name the JSON type of a parsed value, for error messages."""
    if value is None:
        return "null"
    return next(
        (name for types, name in _JSON_TYPE_NAMES if isinstance(value, types)),
        type(value).__name__,
    )


def _short(value: object, limit: int = 40) -> str:
    """Return a one-line repr of ``value``, cut to about ``limit`` characters."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rfc3339_to_ms(text: str) -> int:
    """Convert an RFC 3339 UTC timestamp to epoch milliseconds (sub-millisecond digits dropped).

    Nearly every producer sends ``YYYY-MM-DDTHH:MM:SS.fffZ`` (or without ``.fff``), each one a
    different string, so a cache of whole strings never hits. That shape is read here by slicing,
    with the minute it falls in cached (it repeats); any other text, valid or not, goes to
    :func:`_parse_rfc3339`, which decides and words the error, so both accept, return and
    reject exactly the same (a test holds them to that).

    Raises:
        ValueError: ``text`` is not an RFC 3339 timestamp, not UTC, or out of range; the
            message is worded for a ``Rejection``.
    """
    size = len(text)
    if size in (20, 24) and text[-1] == "Z" and text[16] == ":" and text.isascii():
        minute = _minute_ms(text[:16])
        seconds = text[17:19]
        # ASCII (checked above) digits compare as strings the way their numbers do.
        if minute is not None and seconds.isdigit() and seconds <= "59":
            if size == 20:
                return minute + int(seconds) * 1000
            millis = text[20:23]
            if text[19] == "." and millis.isdigit():
                return minute + int(seconds) * 1000 + int(millis)
    return _parse_rfc3339(text)


_MINUTE_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2})")
# Bounded: one entry per minute of the devices' clocks that arrives while it is recent.
_MINUTE_CACHE_SIZE = 256


@lru_cache(maxsize=_MINUTE_CACHE_SIZE)
def _minute_ms(prefix: str) -> int | None:
    """``YYYY-MM-DDTHH:MM`` as epoch milliseconds; None unless it is a valid minute >= 1970."""
    match = _MINUTE_RE.fullmatch(prefix)
    if match is None:
        return None
    year, month, day, hour, minute = (int(part) for part in match.groups())
    try:
        ordinal = date(year, month, day).toordinal()
    except ValueError:
        return None
    if hour > 23 or minute > 59 or ordinal < _EPOCH_ORDINAL:
        return None
    return ((ordinal - _EPOCH_ORDINAL) * 1440 + hour * 60 + minute) * 60_000


@lru_cache(maxsize=_TS_CACHE_SIZE)
def _parse_rfc3339(text: str) -> int:
    """The full RFC 3339 parser behind :func:`_rfc3339_to_ms` (every shape, every error).

    Raises:
        ValueError: as :func:`_rfc3339_to_ms`.
    """
    match = _RFC3339_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"must be an RFC 3339 UTC timestamp like 2026-11-26T08:15:02.125Z, got {_short(text)}"
        )
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    if offset not in _UTC_OFFSETS:
        raise ValueError(f"must be UTC (end in Z or +00:00), got offset {offset} in {_short(text)}")
    try:
        ordinal = date(int(year), int(month), int(day)).toordinal()
    except ValueError:
        ordinal = 0
    if ordinal == 0 or int(hour) > 23 or int(minute) > 59 or int(second) > 59:
        raise ValueError(f"is not a valid date and time (no leap seconds): {_short(text)}")
    if ordinal < _EPOCH_ORDINAL:
        raise ValueError(f"must not be before 1970-01-01T00:00:00Z, got {_short(text)}")
    seconds = (ordinal - _EPOCH_ORDINAL) * 86400 + int(hour) * 3600 + int(minute) * 60
    millis = int((fraction or "")[:3].ljust(3, "0"))
    return (seconds + int(second)) * 1000 + millis


def _check_ts_text(text: str) -> str:
    """Validate the string form of ``ts`` and keep it as given."""
    _rfc3339_to_ms(text)
    return text


def _ts_problem(value: object) -> str:
    """Word why ``value`` is not a valid ``ts``."""
    if isinstance(value, str):
        try:
            _rfc3339_to_ms(value)
        except ValueError as err:
            return str(err)
    elif isinstance(value, int) and not isinstance(value, bool):
        return (
            f"epoch milliseconds must be between 0 and {MAX_TS_MS} "
            f"(9999-12-31T23:59:59.999Z), got {_short(value)}"
        )
    elif isinstance(value, float):
        return f"epoch milliseconds must be an integer, got the number {_short(value)}"
    return f"must be an RFC 3339 UTC string or integer epoch milliseconds, got {_json_type(value)}"


def _value_problem(value: object) -> str:
    """Word why ``value`` is not a valid reading value."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "must be a finite number"
    if isinstance(value, str):
        return f"a string value must be at most {MAX_VALUE_LENGTH} characters, got {len(value)}"
    return f"must be a number, boolean or string, got {_json_type(value)}"


_PLAIN_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


def _path(loc: tuple[int | str, ...]) -> str:
    """Render a location as ``readings[3].value``; odd keys are quoted so it stays one line."""
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif _PLAIN_KEY_RE.fullmatch(part):
            parts.append(f".{part}")
        else:
            parts.append(f"[{_short(part)}]")
    return "".join(parts).lstrip(".")


def _find_non_json(value: object, loc: tuple[int | str, ...] = ()) -> str | None:
    """Return the path of the first non-finite or non-JSON value inside ``value``, if any."""
    if isinstance(value, float):
        return None if math.isfinite(value) else _path(loc)
    if isinstance(value, list):
        children: list[tuple[tuple[int | str, ...], object]] = [
            ((*loc, i), item) for i, item in enumerate(value)
        ]
    elif isinstance(value, dict) and all(isinstance(key, str) for key in value):
        children = [((*loc, key), item) for key, item in value.items()]
    else:
        return None if value is None or isinstance(value, bool | int | str) else _path(loc)
    for child_loc, item in children:
        found = _find_non_json(item, child_loc)
        if found is not None:
            return found
    return None


def _is_plain_json(value: object) -> bool:
    """Quickly confirm ``value`` is JSON with finite numbers (False means "look closer")."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        items: Iterable[object] = value
    elif isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            return False
        items = value.values()
    else:
        return value is None or isinstance(value, str | int)
    # Scalars are checked inline: a function call per leaf is what this walk would cost.
    for item in items:
        if not (item is None or isinstance(item, str | int) or _is_plain_json(item)):
            return False
    return True


def _check_extra(value: object) -> object:
    """Validate an unknown field: any JSON value, with finite numbers only.

    Unknown fields are kept and re-encoded, and an infinity would come out as ``null``, so
    ``1e999`` in an unknown field must fail here rather than change on the way out.
    """
    if _is_plain_json(value):
        return value
    where = _find_non_json(value)
    if where is not None:
        raise PydanticCustomError(
            "extra_not_json",
            "an unknown field may hold any JSON value, but its numbers must be finite{where}",
            {"where": f" (at {where})" if where else ""},
        )
    return value


def _rule(schema: cs.CoreSchema) -> GetPydanticSchema:
    """Use ``schema`` as is for a field (the annotation stays the Python type mypy sees)."""
    return GetPydanticSchema(lambda _source, _handler: schema)


# Serialising by runtime type (in Rust) keeps ``encode`` free of Python calls, and handles the
# None default of optional fields when someone dumps a model without ``exclude_unset``.
_BY_TYPE = cs.simple_ser_schema("any")

_TS_SCHEMA = cs.union_schema(
    [
        cs.no_info_after_validator_function(_check_ts_text, cs.str_schema(strict=True)),
        cs.int_schema(strict=True, ge=0, le=MAX_TS_MS),
    ],
    mode="left_to_right",
    custom_error_type="timestamp",
    custom_error_message="must be an RFC 3339 UTC string or integer epoch milliseconds",
    serialization=_BY_TYPE,
)
_VALUE_SCHEMA = cs.union_schema(
    [
        cs.bool_schema(strict=True),
        cs.int_schema(strict=True, ge=MIN_INT, le=MAX_INT),
        # Also takes the integers the int choice refused (beyond 64 bits) and reads them as the
        # nearest float, as JavaScript and most JSON readers do; no sink stores such integers.
        cs.float_schema(strict=True, allow_inf_nan=False),
        cs.str_schema(strict=True, max_length=MAX_VALUE_LENGTH),
    ],
    mode="left_to_right",
    custom_error_type="reading_value",
    custom_error_message="must be a boolean, a finite number or a string of at most 256 characters",
    serialization=_BY_TYPE,
)
# Optional fields are absent or of their type: JSON null is refused, as the contract gives
# each of them a type and no null.
_UNIT_SCHEMA = cs.str_schema(strict=True, max_length=MAX_UNIT_LENGTH, serialization=_BY_TYPE)
_BOOT_SCHEMA = cs.str_schema(strict=True, serialization=_BY_TYPE)
_TAGS_SCHEMA = cs.dict_schema(
    cs.str_schema(strict=True),
    cs.str_schema(strict=True),
    max_length=MAX_TAGS,
    strict=True,
    serialization=_BY_TYPE,
)

Timestamp: TypeAlias = Annotated[WireTimestamp, _rule(_TS_SCHEMA)]
"""An RFC 3339 UTC string or integer epoch milliseconds, kept in the form it was given."""
Value: TypeAlias = Annotated[WireValue, _rule(_VALUE_SCHEMA)]
"""A reading value: boolean, finite number (64-bit integer or float) or string (<= 256 chars)."""
_Extra: TypeAlias = Annotated[Any, AfterValidator(_check_extra)]

_CONFIG = ConfigDict(
    frozen=True,
    # Readers ignore unknown fields (a 1.7 message is valid to a 1.0 reader); keep them so a
    # re-encoded message still carries them.
    extra="allow",
    # No coercion: "5" is not a seq, 1.0 is not an integer, true is not a number.
    strict=True,
    allow_inf_nan=False,
)


class Reading(BaseModel):
    """One measurement.

    Attributes:
        sensor: 1-64 of ``A-Z a-z 0-9 _ - .``, e.g. ``temperature``, ``cpu.load1``.
        value: a boolean, a finite number or a string of at most 256 characters. Booleans stay
            booleans, integers integers and floats floats (no coercion); only an integer beyond
            64 bits is read as the nearest float, as JavaScript would.
        unit: optional SenML/UCUM-style unit (``Cel``, ``%RH``, ``Pa``), at most 16 characters.
        ts: optional reading time overriding the envelope's ``ts``, kept as given.
    """

    model_config = _CONFIG
    __pydantic_extra__: dict[str, _Extra] = Field(init=False)

    sensor: Annotated[str, Field(pattern=SENSOR_PATTERN)]
    value: Value
    unit: Annotated[str | None, _rule(_UNIT_SCHEMA)] = None
    ts: Annotated[WireTimestamp | None, _rule(_TS_SCHEMA)] = None

    def time_ms(self, envelope: Envelope) -> int:
        """Return when this reading was taken, in epoch milliseconds.

        Args:
            envelope: the envelope carrying this reading (its ``ts`` is the default).

        Returns:
            This reading's ``ts`` if it has one, else the envelope's, as epoch milliseconds.
        """
        return _ts_to_ms(self.ts if self.ts is not None else envelope.ts)


class Envelope(BaseModel):
    """A telemetry envelope: one message from one device, carrying 1-1000 readings.

    Attributes:
        v: contract version of this message, ``"1.<minor>"``.
        id: globally unique message id, kept on every retransmission; the dedupe key.
        site: site name, as in the topic.
        device: device name, as in the topic.
        seq: per-device counter, +1 per message, restarting at 0 only with a new ``boot``.
        boot: optional boot id, changes when ``seq`` restarts.
        ts: when the readings were taken, kept as given (see ``timestamp_ms``).
        readings: the measurements, 1-1000 of them.
        tags: optional extra labels, at most 16 string -> string entries.
    """

    model_config = _CONFIG
    __pydantic_extra__: dict[str, _Extra] = Field(init=False)

    v: Annotated[str, Field(pattern=VERSION_PATTERN)]
    id: Annotated[str, Field(pattern=ID_PATTERN)]
    site: Annotated[str, Field(pattern=NAME_PATTERN)]
    device: Annotated[str, Field(pattern=NAME_PATTERN)]
    seq: Annotated[int, Field(ge=0, le=MAX_INT)]
    boot: Annotated[str | None, _rule(_BOOT_SCHEMA)] = None
    ts: Timestamp
    readings: Annotated[list[Reading], Field(min_length=1, max_length=MAX_READINGS)]
    tags: Annotated[dict[str, str] | None, _rule(_TAGS_SCHEMA)] = None

    @property
    def timestamp_ms(self) -> int:
        """The envelope's ``ts`` as epoch milliseconds, whichever form it was sent in."""
        return _ts_to_ms(self.ts)


class Status(BaseModel):
    """A retained status message: a device's birth (``online``) or last will (``offline``).

    Attributes:
        v: contract version of this message, ``"1.<minor>"``.
        site: site name, as in the topic.
        device: device name, as in the topic.
        state: ``online`` or ``offline``.
        ts: when the state was entered, kept as given (see ``timestamp_ms``).
        agent: the publishing software, ``<name>/<version>``.
    """

    model_config = _CONFIG
    __pydantic_extra__: dict[str, _Extra] = Field(init=False)

    v: Annotated[str, Field(pattern=VERSION_PATTERN)]
    site: Annotated[str, Field(pattern=NAME_PATTERN)]
    device: Annotated[str, Field(pattern=NAME_PATTERN)]
    state: State
    ts: Timestamp
    agent: str

    @property
    def timestamp_ms(self) -> int:
        """The status ``ts`` as epoch milliseconds, whichever form it was sent in."""
        return _ts_to_ms(self.ts)


def _ts_to_ms(ts: str | int) -> int:
    return ts if isinstance(ts, int) else _rfc3339_to_ms(ts)


def reading_time_ms(envelope: Envelope, reading: Reading) -> int:
    """Return when ``reading`` was taken, in epoch milliseconds.

    Args:
        envelope: the envelope carrying ``reading``.
        reading: one of ``envelope.readings``.

    Returns:
        The reading's own ``ts`` if it has one, else the envelope's, as epoch milliseconds.
    """
    return reading.time_ms(envelope)


# ---------------------------------------------------------------------------------------------
# Codec.


def decode_telemetry(payload: bytes, topic: str | None = None) -> Envelope | Rejection:
    """Validate a telemetry payload.

    Args:
        payload: the bytes exactly as the device sent them.
        topic: the MQTT topic it arrived on; when given, it must be an iotpipe v1 telemetry
            topic and the payload's ``site``/``device`` must match it.

    Returns:
        The envelope, or a ``Rejection`` saying why not. Never raises.
    """
    expected: Topic | None = None
    if topic is not None:
        expected = parse_topic(topic)
        if expected is None or expected.kind is not Kind.TELEMETRY:
            return _bad_topic(topic, Kind.TELEMETRY)
    return _decode(Envelope, payload, expected)


def decode_status(payload: bytes, topic: str | None = None) -> Status | Rejection:
    """Validate a status payload.

    Args:
        payload: the bytes exactly as the device sent them.
        topic: the MQTT topic it arrived on; when given, it must be an iotpipe v1 status topic
            and the payload's ``site``/``device`` must match it.

    Returns:
        The status message, or a ``Rejection`` saying why not. Never raises.
    """
    expected: Topic | None = None
    if topic is not None:
        expected = parse_topic(topic)
        if expected is None or expected.kind is not Kind.STATUS:
            return _bad_topic(topic, Kind.STATUS)
    return _decode(Status, payload, expected)


def decode(topic: str, payload: bytes) -> Envelope | Status | Rejection:
    """Validate a payload according to the kind of topic it arrived on.

    Args:
        topic: the MQTT topic, ``iotpipe/v1/{site}/{device}/{telemetry|status}``.
        payload: the bytes exactly as the device sent them.

    Returns:
        An ``Envelope`` (telemetry topic), a ``Status`` (status topic), or a ``Rejection``
        (``bad_topic`` when the topic is neither). Never raises.
    """
    parsed = parse_topic(topic)
    if parsed is None:
        return _bad_topic(topic, None)
    if parsed.kind is Kind.TELEMETRY:
        return _decode(Envelope, payload, parsed)
    return _decode(Status, payload, parsed)


def encode(msg: Envelope | Status) -> bytes:
    """Serialise a message to compact UTF-8 JSON.

    Fields that were never set are left out (never written as ``null``); unknown fields and
    ``ts`` values are written exactly as they were given.

    Args:
        msg: the envelope or status message.

    Returns:
        The payload bytes; ``decode`` of them gives back an equal message.
    """
    return msg.__pydantic_serializer__.to_json(msg, exclude_unset=True)


def _bad_topic(topic: str, kind: Kind | None) -> Rejection:
    expected = f"{PREFIX}/{{site}}/{{device}}/{kind.value if kind else '{telemetry|status}'}"
    return Rejection(Reason.BAD_TOPIC, f"topic {_short(topic, 80)} is not {expected}")


_M = TypeVar("_M", Envelope, Status)


def _decode(model: type[_M], payload: bytes, expected: Topic | None) -> _M | Rejection:
    try:
        if len(payload) > MAX_PAYLOAD:
            return Rejection(
                Reason.TOO_LARGE, f"payload is {len(payload)} bytes, the limit is {MAX_PAYLOAD}"
            )
        try:
            # What model_validate_json() calls, without its Python frame around it.
            msg: _M = model.__pydantic_validator__.validate_json(payload)
        except ValidationError as err:
            return _classify(payload, err)
        twice = _duplicate_key(payload)
        if twice is not None:
            return Rejection(
                Reason.SCHEMA, f"{twice}: appears twice (readers differ on which one counts)"
            )
        if expected is not None and (msg.site != expected.site or msg.device != expected.device):
            return Rejection(
                Reason.TOPIC_MISMATCH,
                f"payload site/device {msg.site}/{msg.device} do not match topic {expected.mqtt}",
            )
        return msg
    except Exception as err:  # never let one payload stop the caller
        detail = " ".join(str(err).split())[:200]
        return Rejection(Reason.INTERNAL, f"validator failed: {type(err).__name__}: {detail}")


#: The keys that say whose message it is. JSON readers differ on a key given twice (the last
#: wins here and in JavaScript, the first in others), so a device could show the bridge its own
#: site and device, matching its topic, and a consumer in another language someone else's (or
#: another id, defeating dedupe): a payload with one of them twice is refused.
_IDENTITY_KEYS = ("site", "device", "id")


def _duplicate_key(payload: bytes) -> str | None:
    """The first identity key the top-level object holds twice, else None.

    Parses the payload again only when a quoted identity key occurs twice anywhere in it, or a
    ``\\u`` escape could spell one: the common envelope costs three substring counts (<1 us).
    """
    count = payload.count
    if (
        b"\\u" not in payload
        and count(b'"site"') < 2
        and count(b'"device"') < 2
        and count(b'"id"') < 2
    ):
        return None
    found: list[str | None] = [None]

    def check(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Called for every object, innermost first: the top level's call is the last.
        keys = [key for key, _ in pairs]
        found[0] = next((key for key in _IDENTITY_KEYS if keys.count(key) > 1), None)
        return dict(pairs)

    json.loads(payload, object_pairs_hook=check)
    return found[0]


def _classify(payload: bytes, err: ValidationError) -> Rejection:
    """Name the first failing check for a payload the model refused (the slow, rare path)."""
    errors = err.errors(include_url=False)
    rejection = _check_json(payload, errors[0])
    if rejection is not None:
        return rejection
    message = _describe(errors[0])
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return Rejection(Reason.SCHEMA, message)


def _check_json(payload: bytes, first: ErrorDetails) -> Rejection | None:
    """Check encoding, JSON syntax, top-level type and version, in that order."""
    if first["type"] == "json_invalid":
        return _syntax_rejection(payload, str(first.get("ctx", {}).get("error", first["msg"])))
    # The model's parser accepts NaN/Infinity literals; JSON (RFC 8259) does not.
    try:
        data = from_json(payload, allow_inf_nan=False)
    except ValueError as bad:
        return _syntax_rejection(payload, str(bad))
    if not isinstance(data, dict):
        return Rejection(Reason.SCHEMA, f"message: must be a JSON object, got {_json_type(data)}")
    version = data.get("v")
    match = _ANY_VERSION_RE.fullmatch(version) if isinstance(version, str) else None
    if match is not None and int(match.group(1)) != SUPPORTED_MAJOR:
        return Rejection(
            Reason.UNSUPPORTED_VERSION,
            f"contract {version} is not supported by this reader ({SUPPORTED_MAJOR}.x)",
        )
    return None


def _syntax_rejection(payload: bytes, detail: str) -> Rejection:
    """Reject a payload the JSON parser refused: bad UTF-8, empty, or bad JSON, in that order."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as bad:
        return Rejection(
            Reason.BAD_ENCODING,
            f"payload is not UTF-8: byte 0x{payload[bad.start]:02x} at offset {bad.start}",
        )
    if not payload.strip():
        return Rejection(Reason.BAD_JSON, "payload is empty")
    return Rejection(Reason.BAD_JSON, f"payload is not valid JSON: {detail}")


_PATTERN_RULES = {
    VERSION_PATTERN: 'must be "1.<minor>" (e.g. "1.0")',
    ID_PATTERN: f"must be {ID_RULE}",
    NAME_PATTERN: f"must be {NAME_RULE}",
    SENSOR_PATTERN: f"must be {SENSOR_RULE}",
}

_Problem = Callable[[dict[str, Any], object], str]
_PROBLEMS: dict[str, _Problem] = {
    "missing": lambda ctx, got: "is required",
    "string_pattern_mismatch": lambda ctx, got: (
        f"{_PATTERN_RULES.get(str(ctx.get('pattern')), 'has a character that is not allowed')}"
        f", got {_short(got)}"
    ),
    "string_type": lambda ctx, got: f"must be a string, got {_json_type(got)}",
    "string_too_long": lambda ctx, got: (
        f"must be at most {ctx.get('max_length')} characters, got {_short(got)}"
    ),
    "dict_type": lambda ctx, got: f"must be an object, got {_json_type(got)}",
    "timestamp": lambda ctx, got: _ts_problem(got),
    "reading_value": lambda ctx, got: _value_problem(got),
    "int_type": lambda ctx, got: (
        f"must be an integer, got the number {_short(got)}"
        if isinstance(got, float)
        else f"must be an integer, got {_json_type(got)}"
    ),
    "model_type": lambda ctx, got: f"must be an object, got {_json_type(got)}",
    "model_attributes_type": lambda ctx, got: f"must be an object, got {_json_type(got)}",
    "list_type": lambda ctx, got: f"must be an array, got {_json_type(got)}",
    "too_short": lambda ctx, got: "must not be empty",
    "too_long": lambda ctx, got: (
        f"must have at most {ctx.get('max_length')} "
        f"{'entries' if isinstance(got, dict) else 'items'}"
    ),
    "greater_than_equal": lambda ctx, got: f"must be >= {ctx.get('ge')}, got {_short(got)}",
    "less_than_equal": lambda ctx, got: f"must be <= {ctx.get('le')}, got {_short(got)}",
    "literal_error": lambda ctx, got: f"must be one of {ctx.get('expected')}, got {_short(got)}",
}


def _describe(error: ErrorDetails) -> str:
    """Render one pydantic error as ``path: problem``."""
    path = _path(error["loc"]) or "message"
    render = _PROBLEMS.get(error["type"])
    if render is not None:
        problem = render(error.get("ctx", {}), error.get("input"))
    else:
        # Our own PydanticCustomErrors are already worded "must ..."; pydantic's own start with
        # "Input should", which reads fine lower-cased.
        problem = error["msg"][:1].lower() + error["msg"][1:]
    return f"{path}: {problem}"
