"""Hypothesis strategies for wire-contract 1.x messages, shared by every test that needs them.

The ``*_dicts`` strategies build JSON-ready dicts that satisfy every rule of the contract (so
``json.dumps`` of one is a valid payload); ``envelopes``/``statuses`` turn them into models.
Each dict may carry unknown fields, as a newer 1.x producer would send.
"""

from __future__ import annotations

import json
import string
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from iotpipe.envelope import (
    MAX_READINGS,
    MAX_TAGS,
    MAX_TS_MS,
    MAX_UNIT_LENGTH,
    MAX_VALUE_LENGTH,
    Envelope,
    Status,
)
from iotpipe.topics import Kind, topic

NAME_ALPHABET = string.ascii_letters + string.digits + "_-"
ID_ALPHABET = NAME_ALPHABET + ":."
SENSOR_ALPHABET = NAME_ALPHABET + "."
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

ENVELOPE_FIELDS = frozenset({"v", "id", "site", "device", "seq", "boot", "ts", "readings", "tags"})
READING_FIELDS = frozenset({"sensor", "value", "unit", "ts"})
STATUS_FIELDS = frozenset({"v", "site", "device", "state", "ts", "agent"})


def names() -> st.SearchStrategy[str]:
    """Valid site/device names: 1-64 of ``A-Z a-z 0-9 _ -``."""
    return st.text(NAME_ALPHABET, min_size=1, max_size=64)


def message_ids() -> st.SearchStrategy[str]:
    """Valid message ids: 1-64 of ``A-Z a-z 0-9 _ - : .``."""
    return st.text(ID_ALPHABET, min_size=1, max_size=64)


def sensor_names() -> st.SearchStrategy[str]:
    """Valid sensor names: 1-64 of ``A-Z a-z 0-9 _ - .``."""
    return st.text(SENSOR_ALPHABET, min_size=1, max_size=64)


def versions() -> st.SearchStrategy[str]:
    """Versions a 1.x reader accepts, weighted towards the common ones."""
    return st.one_of(
        st.sampled_from(["1.0", "1.1", "1.7"]),
        st.integers(0, 999_999_999).map(lambda minor: f"1.{minor}"),
    )


def epoch_ms() -> st.SearchStrategy[int]:
    """Valid integer epoch milliseconds (1970 up to the end of year 9999)."""
    return st.integers(0, MAX_TS_MS)


@st.composite
def rfc3339_with_ms(draw: st.DrawFn) -> tuple[str, int]:
    """A valid RFC 3339 UTC timestamp string and the epoch milliseconds it denotes.

    Varies what RFC 3339 lets vary: ``T``/``t``, ``Z``/``z``/``+00:00``/``-00:00``, and 0-9
    fraction digits (digits past the millisecond are truncated, never rounded).
    """
    ms = draw(epoch_ms())
    moment = EPOCH + timedelta(milliseconds=ms)
    digits = draw(st.integers(0, 9))
    if digits < 3:
        # Fewer than 3 digits can only say whole tenths/hundredths: round the instant down.
        ms -= ms % (10 ** (3 - digits))
        moment = EPOCH + timedelta(milliseconds=ms)
    fraction = f"{moment.microsecond // 1000:03d}" + draw(
        st.text(string.digits, min_size=6, max_size=6)
    )
    sep = draw(st.sampled_from("Tt"))
    suffix = draw(st.sampled_from(["Z", "z", "+00:00", "-00:00"]))
    text = moment.strftime(f"%Y-%m-%d{sep}%H:%M:%S")
    if digits:
        text += "." + fraction[:digits]
    return text + suffix, ms


def timestamps() -> st.SearchStrategy[str | int]:
    """Valid ``ts`` values in either form."""
    return st.one_of(rfc3339_with_ms().map(lambda pair: pair[0]), epoch_ms())


def values() -> st.SearchStrategy[bool | int | float | str]:
    """Valid reading values: booleans, 64-bit integers, finite floats, strings <= 256 chars."""
    return st.one_of(
        st.booleans(),
        st.integers(INT64_MIN, INT64_MAX),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=MAX_VALUE_LENGTH),
    )


def json_values() -> st.SearchStrategy[Any]:
    """Any JSON value with finite numbers: what an unknown field may hold."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=8,
    )


def unknown_fields(known: frozenset[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Fields a later 1.x minor might add: names not in ``known``, any JSON values."""
    keys = st.text(min_size=1, max_size=12).filter(lambda key: key not in known)
    return st.dictionaries(keys, json_values(), max_size=2)


@st.composite
def reading_dicts(draw: st.DrawFn, *, with_unknown: bool = True) -> dict[str, Any]:
    """A valid reading as a JSON-ready dict."""
    reading: dict[str, Any] = {"sensor": draw(sensor_names()), "value": draw(values())}
    if draw(st.booleans()):
        reading["unit"] = draw(st.text(max_size=MAX_UNIT_LENGTH))
    if draw(st.booleans()):
        reading["ts"] = draw(timestamps())
    if with_unknown and draw(st.integers(0, 7)) == 0:
        reading.update(draw(unknown_fields(READING_FIELDS)))
    return reading


@st.composite
def envelope_dicts(
    draw: st.DrawFn, *, max_readings: int = 5, with_unknown: bool = True
) -> dict[str, Any]:
    """A valid telemetry envelope as a JSON-ready dict.

    Args:
        draw: supplied by hypothesis.
        max_readings: upper bound on the number of readings (at most 1000).
        with_unknown: whether unknown fields may appear (as from a newer 1.x producer).
    """
    envelope: dict[str, Any] = {
        "v": draw(versions()),
        "id": draw(message_ids()),
        "site": draw(names()),
        "device": draw(names()),
        "seq": draw(st.integers(0, INT64_MAX)),
        "ts": draw(timestamps()),
        "readings": draw(
            st.lists(
                reading_dicts(with_unknown=with_unknown),
                min_size=1,
                max_size=min(max_readings, MAX_READINGS),
            )
        ),
    }
    if draw(st.booleans()):
        envelope["boot"] = draw(st.text(max_size=20))
    if draw(st.booleans()):
        envelope["tags"] = draw(
            st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=MAX_TAGS)
        )
    if with_unknown and draw(st.integers(0, 3)) == 0:
        envelope.update(draw(unknown_fields(ENVELOPE_FIELDS)))
    return envelope


@st.composite
def status_dicts(draw: st.DrawFn, *, with_unknown: bool = True) -> dict[str, Any]:
    """A valid status message as a JSON-ready dict."""
    status: dict[str, Any] = {
        "v": draw(versions()),
        "site": draw(names()),
        "device": draw(names()),
        "state": draw(st.sampled_from(["online", "offline"])),
        "ts": draw(timestamps()),
        "agent": draw(st.text(max_size=30)),
    }
    if with_unknown and draw(st.integers(0, 3)) == 0:
        status.update(draw(unknown_fields(STATUS_FIELDS)))
    return status


def envelopes(**kwargs: Any) -> st.SearchStrategy[Envelope]:
    """Valid ``Envelope`` models (see ``envelope_dicts`` for the arguments)."""
    return envelope_dicts(**kwargs).map(Envelope.model_validate)


def statuses(**kwargs: Any) -> st.SearchStrategy[Status]:
    """Valid ``Status`` models (see ``status_dicts`` for the arguments)."""
    return status_dicts(**kwargs).map(Status.model_validate)


def telemetry_topic_of(message: dict[str, Any]) -> str:
    """The telemetry topic an envelope dict belongs on."""
    return topic(message["site"], message["device"], Kind.TELEMETRY)


def status_topic_of(message: dict[str, Any]) -> str:
    """The status topic a status dict belongs on."""
    return topic(message["site"], message["device"], Kind.STATUS)


# -- hostile input ---------------------------------------------------------------------------

#: Characters that look like ASCII names or hide in them: Cyrillic a/e/o, zero-width joiner and
#: space, right-to-left and left-to-right marks, a BOM, a fullwidth letter.
LOOKALIKES = "\u0430\u0435\u043e\u200d\u200b\u200f\u200e\ufeff\uff41"
_VALID_BODY = {
    "v": "1.0",
    "id": "s1-d1-1",
    "site": "s1",
    "device": "d1",
    "seq": 1,
    "ts": "2026-11-26T08:15:02.125Z",
    "readings": [{"sensor": "temperature", "value": 21.5}],
}


def _with_field(key: str, raw: bytes) -> bytes:
    """A valid envelope's JSON with ``key`` set to the raw JSON text ``raw`` (any bytes)."""
    body = {k: v for k, v in _VALID_BODY.items() if k != key}
    head = json.dumps(body, separators=(",", ":")).encode()[:-1]
    return head + b',"' + key.encode() + b'":' + raw + b"}"


def nasty_payloads() -> dict[str, bytes]:
    """Named payloads that attack a parser: depth, size, number range, encoding, duplicates."""
    return {
        "deep_arrays": b"[" * 10_000 + b"]" * 10_000,
        "deep_objects": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        "deep_extra_field": _with_field("x", b"[" * 10_000 + b"]" * 10_000),
        "deep_objects_64": b'{"a":' * 65 + b"1" + b"}" * 65,
        "max_size": b'{"x":"' + b"a" * (256 * 1024 - 8) + b'"}',
        "over_size": b"[" + b"1," * (128 * 1024) + b"1]",
        "huge_int_value": _with_field(
            "readings", b'[{"sensor":"t","value":1' + b"0" * 4000 + b"}]"
        ),
        "huge_int_seq": _with_field("seq", b"1" + b"0" * 4000),
        "huge_int_extra": _with_field("x", b"1" + b"0" * 5000),
        "huge_float": _with_field("readings", b'[{"sensor":"t","value":1e99999}]'),
        "nan": _with_field("readings", b'[{"sensor":"t","value":NaN}]'),
        "infinity": _with_field("ts", b"-Infinity"),
        "duplicate_site": b'{"site":"elsewhere",' + _with_field("seq", b"1")[1:],
        "duplicate_id_escaped": b'{"\\u0069d":"other",' + _with_field("seq", b"1")[1:],
        "invalid_utf8": _with_field("x", b'"\xff\xfe\xc0\x80"'),
        "lone_surrogate": _with_field("x", b'"\\ud800"'),
        "cyrillic_site": _with_field("site", '"s\u0430"'.encode()),
        "zero_width_device": _with_field("device", '"d\u200d1"'.encode()),
        "rtl_mark_sensor": _with_field("readings", '[{"sensor":"\u200ft","value":1}]'.encode()),
        "line_protocol": b"m,host=d1 f=1" + b"0" * 5000 + b"i 1",
        "quoted_line": b'm,host=d1 f="' + b"a" * (200 * 1024) + b'" 1',
        "plain_huge_int": b"1" + b"0" * 4000,
        "empty": b"",
    }


def hostile_payloads() -> st.SearchStrategy[bytes]:
    """Bytes a broken or hostile device might send: random, near-JSON, or one of the nasty ones."""
    near_json = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(LOOKALIKES + 'ab\\"'),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
        ),
        max_leaves=20,
    ).map(lambda value: json.dumps(value).encode())
    return st.one_of(
        st.binary(max_size=512),
        near_json,
        st.sampled_from(sorted(nasty_payloads().values())),
    )


def hostile_topics() -> st.SearchStrategy[str]:
    """Topics of the contract with look-alike or random names, and topics outside it."""
    name = st.text(NAME_ALPHABET + LOOKALIKES, min_size=1, max_size=8)
    return st.one_of(
        st.builds(lambda s, d: f"iotpipe/v1/{s}/{d}/telemetry", name, name),
        st.builds(lambda s, d: f"iotpipe/v1/{s}/{d}/status", name, name),
        st.text(max_size=40),
    )
