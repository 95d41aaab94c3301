"""Properties of the envelope codec over generated messages and arbitrary bytes."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from iotpipe.envelope import (
    Envelope,
    Reason,
    Rejection,
    Status,
    decode,
    decode_status,
    decode_telemetry,
    encode,
    reading_time_ms,
)
from iotpipe.topics import Kind, topic
from iotpipe.wire import MAX_PAYLOAD, MAX_TS_MS
from tests.strategies import (
    envelope_dicts,
    envelopes,
    rfc3339_with_ms,
    status_dicts,
    statuses,
    telemetry_topic_of,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=300, deadline=None)


def strict_json(payload: bytes) -> Any:
    """Parse with the standard library, refusing NaN/Infinity (RFC 8259 JSON only)."""

    def refuse(literal: str) -> None:
        raise ValueError(literal)

    return json.loads(payload.decode("utf-8"), parse_constant=refuse)


# -- round trips --------------------------------------------------------------------------------


@FAST
@given(doc=envelope_dicts())
def test_any_valid_envelope_is_accepted(doc: dict[str, Any]) -> None:
    """Every envelope built by the strategy is accepted on its topic, unknown fields kept."""
    result = decode_telemetry(json.dumps(doc).encode(), telemetry_topic_of(doc))
    assert isinstance(result, Envelope), result
    assert json.loads(encode(result)) == doc


@FAST
@given(env=envelopes())
def test_envelope_round_trips(env: Envelope) -> None:
    """decode(encode(x)) == x for any valid envelope, and encoding is stable."""
    payload = encode(env)
    decoded = decode(topic(env.site, env.device), payload)
    assert decoded == env
    assert isinstance(decoded, Envelope)
    assert encode(decoded) == payload
    assert len(payload) <= MAX_PAYLOAD
    strict_json(payload)


@FAST
@given(status=statuses())
def test_status_round_trips(status: Status) -> None:
    """decode(encode(x)) == x for any valid status message."""
    payload = encode(status)
    assert decode(topic(status.site, status.device, Kind.STATUS), payload) == status


def reference_ms(ts: str | int) -> int:
    """Epoch milliseconds of a valid ts, via datetime (independent of the codec)."""
    if isinstance(ts, int):
        return ts
    text = ts.upper()
    for utc in ("Z", "+00:00", "-00:00"):
        text = text.removesuffix(utc)
    whole, _, fraction = text.partition(".")
    moment = datetime.fromisoformat(whole).replace(tzinfo=UTC)
    millis = int(fraction[:3].ljust(3, "0"))
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1) + millis


@FAST
@given(env=envelopes(max_readings=4))
def test_reading_times_follow_the_override_rule(env: Envelope) -> None:
    """Each reading's time is its own ts if present, else the envelope's, in both ts forms."""
    assert env.timestamp_ms == reference_ms(env.ts)
    for reading in env.readings:
        own = reading.ts if reading.ts is not None else env.ts
        assert reading_time_ms(env, reading) == reading.time_ms(env) == reference_ms(own)


@FAST
@given(pair=rfc3339_with_ms())
def test_rfc3339_strings_convert_to_their_instant(pair: tuple[str, int]) -> None:
    """Any RFC 3339 UTC string converts to the epoch milliseconds it denotes (truncated)."""
    text, expected = pair
    doc = {"v": "1.0", "id": "i", "site": "s", "device": "d", "seq": 0, "ts": text}
    env = Envelope.model_validate({**doc, "readings": [{"sensor": "a", "value": 1}]})
    assert env.ts == text
    assert env.timestamp_ms == expected == reference_ms(text)


# -- one broken rule, one reason ----------------------------------------------------------------

Mutation = Callable[[dict[str, Any], st.DataObject], Reason]


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return apply


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc.pop(key)


# Each entry breaks exactly one schema rule of an otherwise valid envelope.
SCHEMA_BREAKS: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("v malformed", _set(("v",), "1.0.0")),
    ("v not a string", _set(("v",), 1.0)),
    ("id missing", _drop("id")),
    ("id empty", _set(("id",), "")),
    ("id too long", _set(("id",), "i" * 65)),
    ("id bad char", _set(("id",), "a/b")),
    ("site bad char", _set(("site",), "a.b")),
    ("device too long", _set(("device",), "d" * 65)),
    ("seq negative", _set(("seq",), -1)),
    ("seq fraction", _set(("seq",), 0.5)),
    ("seq bool", _set(("seq",), False)),
    ("seq string", _set(("seq",), "1")),
    ("seq too big", _set(("seq",), 2**63)),
    ("boot null", _set(("boot",), None)),
    ("ts missing", _drop("ts")),
    ("ts offset", _set(("ts",), "2026-11-26T08:15:02+01:00")),
    ("ts local", _set(("ts",), "2026-11-26T08:15:02")),
    ("ts negative", _set(("ts",), -1)),
    ("ts too late", _set(("ts",), MAX_TS_MS + 1)),
    ("ts float", _set(("ts",), 1.5)),
    ("ts bool", _set(("ts",), True)),
    ("readings missing", _drop("readings")),
    ("readings empty", _set(("readings",), [])),
    ("readings too many", _set(("readings",), [{"sensor": "s", "value": 1}] * 1001)),
    ("sensor bad char", _set(("readings", 0, "sensor"), "a b")),
    ("sensor missing", lambda doc: doc["readings"][0].pop("sensor")),
    ("value missing", lambda doc: doc["readings"][0].pop("value")),
    ("value null", _set(("readings", 0, "value"), None)),
    ("value object", _set(("readings", 0, "value"), {"raw": 1})),
    ("value long string", _set(("readings", 0, "value"), "v" * 257)),
    ("unit too long", _set(("readings", 0, "unit"), "u" * 17)),
    ("unit number", _set(("readings", 0, "unit"), 1)),
    ("reading ts offset", _set(("readings", 0, "ts"), "2026-11-26T08:15:02-03:00")),
    ("tags too many", _set(("tags",), {str(i): "t" for i in range(17)})),
    ("tags number value", _set(("tags",), {"k": 1})),
]


@FAST
@given(doc=envelope_dicts(max_readings=3), data=st.data())
def test_one_broken_schema_rule_is_a_schema_rejection(
    doc: dict[str, Any], data: st.DataObject
) -> None:
    """Breaking any single schema rule of a valid envelope gives a schema rejection."""
    name, breaks = data.draw(st.sampled_from(SCHEMA_BREAKS), label="rule")
    broken = copy.deepcopy(doc)
    breaks(broken)
    result = decode_telemetry(json.dumps(broken).encode(), telemetry_topic_of(doc))
    assert isinstance(result, Rejection), name
    assert result.reason is Reason.SCHEMA, (name, result)
    assert "\n" not in result.message


@FAST
@given(doc=envelope_dicts(max_readings=3), major=st.integers(0, 99), minor=st.integers(0, 99))
def test_another_major_is_unsupported(doc: dict[str, Any], major: int, minor: int) -> None:
    """A valid envelope relabelled with a non-1 major is unsupported_version."""
    assume(major != 1)
    doc["v"] = f"{major}.{minor}"
    result = decode_telemetry(json.dumps(doc).encode(), telemetry_topic_of(doc))
    assert result == Rejection(
        Reason.UNSUPPORTED_VERSION,
        f"contract {major}.{minor} is not supported by this reader (1.x)",
    )


@FAST
@given(doc=envelope_dicts(max_readings=3), other=st.sampled_from(["site", "device"]))
def test_wrong_topic_is_topic_mismatch(doc: dict[str, Any], other: str) -> None:
    """A valid envelope on another device's or site's topic is topic_mismatch."""
    names = {"site": doc["site"], "device": doc["device"]}
    names[other] = names[other][:63] + ("x" if not names[other].endswith("x") else "y")
    result = decode_telemetry(json.dumps(doc).encode(), topic(names["site"], names["device"]))
    assert isinstance(result, Rejection)
    assert result.reason is Reason.TOPIC_MISMATCH


@FAST
@given(doc=envelope_dicts(max_readings=3), extra=st.integers(1, 1000))
def test_oversize_is_too_large(doc: dict[str, Any], extra: int) -> None:
    """A valid envelope padded past 256 KiB is too_large."""
    doc["padding"] = ""
    base = len(json.dumps(doc).encode())
    doc["padding"] = "p" * (MAX_PAYLOAD - base + extra)
    result = decode_telemetry(json.dumps(doc).encode(), telemetry_topic_of(doc))
    assert isinstance(result, Rejection)
    assert result.reason is Reason.TOO_LARGE


@FAST
@given(doc=envelope_dicts(max_readings=3), data=st.data())
def test_truncation_is_bad_json(doc: dict[str, Any], data: st.DataObject) -> None:
    """Any proper prefix of a valid payload is bad_json (or bad_encoding if it splits a char)."""
    payload = json.dumps(doc, ensure_ascii=False).encode()
    cut = data.draw(st.integers(0, len(payload) - 1), label="cut")
    result = decode_telemetry(payload[:cut])
    assert isinstance(result, Rejection)
    assert result.reason in {Reason.BAD_JSON, Reason.BAD_ENCODING}


@FAST
@given(doc=envelope_dicts(max_readings=3), data=st.data())
def test_a_stray_invalid_byte_is_bad_encoding(doc: dict[str, Any], data: st.DataObject) -> None:
    """Inserting a byte that can never appear in UTF-8 gives bad_encoding."""
    payload = json.dumps(doc).encode()
    at = data.draw(st.integers(0, len(payload)), label="at")
    bad = data.draw(st.sampled_from([b"\xff", b"\xfe", b"\xc0", b"\xf8"]), label="byte")
    result = decode_telemetry(payload[:at] + bad + payload[at:])
    assert isinstance(result, Rejection)
    assert result.reason is Reason.BAD_ENCODING


# -- never raises ---------------------------------------------------------------------------------


def check_total(payload: bytes) -> None:
    """Decode ``payload`` every way: only values come back, and acceptance implies strict JSON."""
    for result in (
        decode_telemetry(payload),
        decode_status(payload),
        decode("iotpipe/v1/s/d/telemetry", payload),
        decode("iotpipe/v1/s/d/status", payload),
    ):
        assert isinstance(result, Envelope | Status | Rejection)
        if isinstance(result, Rejection):
            assert result.reason is not Reason.INTERNAL, result
            assert "\n" not in result.message
        else:
            assert isinstance(strict_json(payload), dict)
            again = decode_telemetry if isinstance(result, Envelope) else decode_status
            assert again(encode(result)) == result


@FUZZ
@given(payload=st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(payload: bytes) -> None:
    """Arbitrary bytes only ever produce a Rejection (never an exception)."""
    check_total(payload)


@FUZZ
@given(text=st.text(max_size=300))
def test_arbitrary_text_never_raises(text: str) -> None:
    """Arbitrary UTF-8 text only ever produces a Rejection."""
    check_total(text.encode())


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=10)
    | st.sampled_from(["1.0", "2.0", "1.x", "iotpipe"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "v",
                    "id",
                    "site",
                    "device",
                    "seq",
                    "boot",
                    "ts",
                    "readings",
                    "tags",
                    "sensor",
                    "value",
                    "unit",
                    "state",
                    "agent",
                    "x",
                ]
            ),
            inner,
            max_size=6,
        )
    ),
    max_leaves=20,
)


@FUZZ
@given(value=JSONISH)
def test_arbitrary_json_never_raises(value: Any) -> None:
    """Arbitrary JSON with contract-like keys (NaN and infinities included) never raises."""
    check_total(json.dumps(value).encode())


@FAST
@given(doc=envelope_dicts(max_readings=3), data=st.data())
def test_mangled_valid_payloads_never_raise(doc: dict[str, Any], data: st.DataObject) -> None:
    """A valid payload with bytes overwritten anywhere still only produces values."""
    payload = bytearray(json.dumps(doc).encode())
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        at = data.draw(st.integers(0, len(payload) - 1), label="at")
        payload[at] = data.draw(st.integers(0, 255), label="byte")
    check_total(bytes(payload))


@FAST
@given(doc=status_dicts())
def test_any_valid_status_is_accepted(doc: dict[str, Any]) -> None:
    """Every status built by the strategy is accepted on its status topic."""
    result = decode(topic(doc["site"], doc["device"], Kind.STATUS), json.dumps(doc).encode())
    assert isinstance(result, Status), result
    assert json.loads(encode(result)) == doc
