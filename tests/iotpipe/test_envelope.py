"""The envelope codec: every rule of WIRE.md 1.0, accepted and rejected with the right reason."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from iotpipe import envelope as envelope_module
from iotpipe.envelope import (
    Envelope,
    Reading,
    Reason,
    Rejection,
    Status,
    decode,
    decode_status,
    decode_telemetry,
    encode,
    reading_time_ms,
)
from iotpipe.receipts import Receipt, decode_receipt
from iotpipe.topics import Kind, topic
from iotpipe.wire import MAX_PAYLOAD, MAX_READINGS, MAX_TS_MS

TOPIC = "iotpipe/v1/home/pi-kitchen/telemetry"
STATUS_TOPIC = "iotpipe/v1/home/pi-kitchen/status"


def envelope_doc(**changes: Any) -> dict[str, Any]:
    """A valid envelope (the WIRE.md example) with ``changes`` applied on top."""
    doc: dict[str, Any] = {
        "v": "1.0",
        "id": "home:pi-kitchen:000042",
        "site": "home",
        "device": "pi-kitchen",
        "seq": 42,
        "boot": "b7f3",
        "ts": "2026-11-26T08:15:02.125Z",
        "readings": [
            {"sensor": "temperature", "value": 21.5, "unit": "Cel"},
            {"sensor": "humidity", "value": 48, "unit": "%RH"},
            {"sensor": "door.open", "value": False},
        ],
        "tags": {"room": "kitchen"},
    }
    doc.update(changes)
    return doc


def status_doc(**changes: Any) -> dict[str, Any]:
    """A valid status message with ``changes`` applied on top."""
    doc: dict[str, Any] = {
        "v": "1.0",
        "site": "home",
        "device": "pi-kitchen",
        "state": "online",
        "ts": 1764144902125,
        "agent": "iotpipe-edge/0.1.0",
    }
    doc.update(changes)
    return doc


def with_reading(**changes: Any) -> dict[str, Any]:
    """A valid envelope whose only reading is ``{"sensor": "s", "value": 1}`` plus ``changes``."""
    return envelope_doc(readings=[{"sensor": "s", "value": 1, **changes}])


def dumps(doc: Any) -> bytes:
    """Serialise with the standard library, as a third-party producer would."""
    return json.dumps(doc).encode()


def accepted(payload: bytes, topic: str | None = TOPIC) -> Envelope:
    """Decode a payload that must be accepted."""
    result = decode_telemetry(payload, topic)
    assert isinstance(result, Envelope), result
    return result


def rejected(payload: bytes, topic: str | None = TOPIC) -> Rejection:
    """Decode a payload that must be rejected."""
    result = decode_telemetry(payload, topic)
    assert isinstance(result, Rejection), result
    return result


def ms(text: str) -> int:
    """Epoch milliseconds of a UTC RFC 3339 string, via datetime (independent of the codec)."""
    text = text.upper().replace("Z", "+00:00").replace("-00:00", "+00:00")
    head = text.removesuffix("+00:00")
    if "." in head:
        whole, fraction = head.split(".")
        head = f"{whole}.{fraction[:3].ljust(3, '0')}"
    moment = datetime.fromisoformat(head + "+00:00")
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


# -- the happy path -----------------------------------------------------------------------------


def test_wire_example_is_accepted() -> None:
    """The example envelope decodes into its fields, with value types kept as sent."""
    env = accepted(dumps(envelope_doc()))
    assert (env.v, env.id, env.site, env.device, env.seq, env.boot) == (
        "1.0",
        "home:pi-kitchen:000042",
        "home",
        "pi-kitchen",
        42,
        "b7f3",
    )
    assert env.ts == "2026-11-26T08:15:02.125Z"
    assert env.timestamp_ms == ms("2026-11-26T08:15:02.125Z")
    assert [r.sensor for r in env.readings] == ["temperature", "humidity", "door.open"]
    assert [type(r.value) for r in env.readings] == [float, int, bool]
    assert env.readings[0].unit == "Cel"
    assert env.readings[2].unit is None
    assert env.tags == {"room": "kitchen"}


def test_optional_fields_may_be_absent() -> None:
    """boot, tags, unit and per-reading ts may be left out."""
    doc = envelope_doc(readings=[{"sensor": "s", "value": 1}])
    del doc["boot"], doc["tags"]
    env = accepted(dumps(doc))
    assert env.boot is None
    assert env.tags is None
    assert env.readings[0].unit is None
    assert env.readings[0].ts is None


def test_status_message_is_accepted() -> None:
    """A status message decodes on a status topic, online and offline alike."""
    for state in ("online", "offline"):
        status = decode_status(dumps(status_doc(state=state)), STATUS_TOPIC)
        assert isinstance(status, Status), status
        assert status.state == state
        assert status.agent == "iotpipe-edge/0.1.0"
        assert status.timestamp_ms == 1764144902125


def test_decode_dispatches_on_topic_kind() -> None:
    """decode() returns an Envelope on a telemetry topic and a Status on a status topic."""
    assert isinstance(decode(TOPIC, dumps(envelope_doc())), Envelope)
    assert isinstance(decode(STATUS_TOPIC, dumps(status_doc())), Status)
    assert decode(TOPIC, dumps(status_doc())) == Rejection(
        Reason.SCHEMA, "id: is required (and 2 more problems)"
    )


def test_unknown_fields_of_a_later_minor_are_kept() -> None:
    """A 1.7 message with unknown fields validates and re-encodes with those fields intact."""
    doc = envelope_doc(v="1.7", battery={"level": 0.93, "charging": None, "cells": [3.7, 3.69]})
    doc["readings"][0]["quality"] = "good"
    doc["readings"][1]["calibrated_at"] = 1764144902125
    env = accepted(dumps(doc))
    assert env.v == "1.7"
    assert env.model_extra == {"battery": doc["battery"]}
    assert env.readings[0].model_extra == {"quality": "good"}
    assert json.loads(encode(env)) == doc
    assert decode_telemetry(encode(env), TOPIC) == env


def test_unknown_fields_of_a_status_are_kept() -> None:
    """A status message with unknown fields validates and re-encodes with them."""
    doc = status_doc(v="1.3", ip="10.0.0.7")
    status = decode_status(dumps(doc))
    assert isinstance(status, Status)
    assert json.loads(encode(status)) == doc


# -- versions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.7", "1.10", "1.999999999"])
def test_every_1x_version_is_accepted(version: str) -> None:
    """Every 1.<minor> version is accepted by this 1.x reader."""
    assert accepted(dumps(envelope_doc(v=version))).v == version


@pytest.mark.parametrize("version", ["2.0", "2.1", "0.9", "3.0", "10.0"])
def test_other_majors_are_unsupported(version: str) -> None:
    """A well-formed version of another major is rejected as unsupported_version."""
    assert rejected(dumps(envelope_doc(v=version))) == Rejection(
        Reason.UNSUPPORTED_VERSION,
        f"contract {version} is not supported by this reader (1.x)",
    )


def test_version_is_checked_before_the_schema() -> None:
    """A 2.0 message with a different schema is unsupported_version, not schema."""
    payload = dumps({"v": "2.0", "msg_id": 7, "points": {"t": [1, 2]}})
    assert rejected(payload).reason is Reason.UNSUPPORTED_VERSION
    status = decode_status(dumps({"v": "2.0", "alive": True}))
    assert isinstance(status, Rejection)
    assert status.reason is Reason.UNSUPPORTED_VERSION


@pytest.mark.parametrize(
    "version", ["1", "1.", "1.0.0", "v1.0", "1.x", "1.01", "01.0", " 1.0", "1.0\n", "", "1.-1"]
)
def test_malformed_versions_are_schema_errors(version: str) -> None:
    """A v that is not "<major>.<minor>" is a schema error naming v."""
    rejection = rejected(dumps(envelope_doc(v=version)))
    assert rejection.reason is Reason.SCHEMA
    assert rejection.message.startswith('v: must be "1.<minor>"')


@pytest.mark.parametrize("version", [1.0, 1, None, ["1.0"]])
def test_non_string_versions_are_schema_errors(version: object) -> None:
    """A v that is not a JSON string is a schema error."""
    rejection = rejected(dumps(envelope_doc(v=version)))
    assert rejection.reason is Reason.SCHEMA
    assert rejection.message.startswith("v: must be a string")


def test_missing_version_is_a_schema_error() -> None:
    """A message without v is a schema error naming v."""
    doc = envelope_doc()
    del doc["v"]
    assert rejected(dumps(doc)) == Rejection(Reason.SCHEMA, "v: is required")


# -- size, encoding, JSON -------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid envelope padded (with an unknown field) to exactly ``size`` bytes."""
    base = dumps(envelope_doc(pad=""))
    payload = dumps(envelope_doc(pad="x" * (size - len(base))))
    assert len(payload) == size
    return payload


def test_payload_at_the_limit_is_accepted() -> None:
    """A payload of exactly 256 KiB is accepted."""
    assert MAX_PAYLOAD == 256 * 1024
    accepted(padded(MAX_PAYLOAD))


def test_payload_over_the_limit_is_too_large() -> None:
    """A payload one byte over 256 KiB is rejected as too_large."""
    assert rejected(padded(MAX_PAYLOAD + 1)) == Rejection(
        Reason.TOO_LARGE, "payload is 262145 bytes, the limit is 262144"
    )


def test_size_is_checked_before_anything_else() -> None:
    """An oversize payload is too_large even when it is not UTF-8 or JSON at all."""
    assert rejected(b"\xff" * (MAX_PAYLOAD + 1)).reason is Reason.TOO_LARGE


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff",
        b'{"v": "1.0", "id": "\xff"}',
        b'{"v": "1.0", "id": "\xc0\xaf"}',  # overlong encoding of "/"
        b'{"v": "1.0", "id": "\xed\xa0\x80"}',  # an encoded surrogate
        b'{"v": "1.0", "id": "\xe2\x82"}',  # truncated sequence
        "\u00e9".encode("latin-1") + dumps(envelope_doc()),
        dumps(envelope_doc()).replace(b'"home"', b'"h\xe9me"'),
    ],
)
def test_invalid_utf8_is_bad_encoding(payload: bytes) -> None:
    """Bytes that are not UTF-8 are rejected as bad_encoding, wherever they are."""
    rejection = rejected(payload)
    assert rejection.reason is Reason.BAD_ENCODING
    assert rejection.message.startswith("payload is not UTF-8: byte 0x")


def test_encoding_is_checked_before_version() -> None:
    """A 2.0 message with a bad byte is bad_encoding: encoding comes first."""
    assert rejected(b'{"v": "2.0", "x": "\xff"}').reason is Reason.BAD_ENCODING


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"   \n",
        b"{",
        b'{"v": "1.0",',
        b"{'v': '1.0'}",
        b'{"v": "1.0"} trailing',
        b'{"v": "1.0"}{"v": "1.0"}',
        b"\xef\xbb\xbf" + dumps(envelope_doc()),  # a byte-order mark is not JSON
        b"[" * 5000 + b"]" * 5000,
        b'{"a":' * 1000 + b"1" + b"}" * 1000,
        b'{"v": "1.0", "x": "\\ud800"}',  # lone surrogate escape: no UTF-8 string can hold it
        b'{"v": "1.0", "x": "\\x41"}',
        b'{"v": "1.0", "x": "tab\there"}',  # raw control character inside a string
        b'{"v": "1.0", "x": ' + b"9" * 5000 + b"}",
        b"nul",
        b"NaN",
    ],
)
def test_invalid_json_is_bad_json(payload: bytes) -> None:
    """Anything that is not one JSON text is rejected as bad_json, not as an exception."""
    rejection = rejected(payload)
    assert rejection.reason is Reason.BAD_JSON
    assert rejection.message.startswith(("payload is not valid JSON", "payload is empty"))


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
@pytest.mark.parametrize("where", ["value", "extra", "nested extra"])
def test_nan_and_infinity_literals_are_bad_json(literal: bytes, where: str) -> None:
    """NaN/Infinity are not JSON, so they are bad_json wherever they appear."""
    marker = b'"__here__"'
    if where == "value":
        doc = with_reading(value="__here__")
    elif where == "extra":
        doc = envelope_doc(extra="__here__")
    else:
        doc = envelope_doc(extra={"deep": [1, "__here__"]})
    payload = dumps(doc).replace(marker, literal)
    assert rejected(payload).reason is Reason.BAD_JSON


def test_json_is_checked_before_version() -> None:
    """A 2.0 message that is not valid JSON is bad_json: syntax comes first."""
    assert rejected(b'{"v": "2.0", "x": NaN}').reason is Reason.BAD_JSON
    assert rejected(b'{"v": "2.0", ').reason is Reason.BAD_JSON


@pytest.mark.parametrize(
    ("payload", "kind"),
    [(b"[]", "an array"), (b"1", "a number"), (b'"x"', "a string"), (b"null", "null")],
)
def test_a_non_object_top_level_is_a_schema_error(payload: bytes, kind: str) -> None:
    """Valid JSON that is not an object is a schema error, not bad_json."""
    assert rejected(payload) == Rejection(
        Reason.SCHEMA, f"message: must be a JSON object, got {kind}"
    )


def test_duplicate_keys_keep_the_last() -> None:
    """With a duplicated key the last occurrence wins, as in most JSON readers."""
    payload = dumps(envelope_doc()).replace(b'"seq": 42', b'"seq": 1, "seq": 42')
    assert accepted(payload).seq == 42


# -- topics -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"), [("site", "office"), ("device", "pi-garage"), ("device", "PI-KITCHEN")]
)
def test_topic_mismatch(field: str, value: str) -> None:
    """A payload whose site or device differs from its topic is rejected as topic_mismatch."""
    rejection = rejected(dumps(envelope_doc(**{field: value})))
    assert rejection.reason is Reason.TOPIC_MISMATCH
    assert "iotpipe/v1/home/pi-kitchen/telemetry" in rejection.message


def test_status_topic_mismatch() -> None:
    """A status payload is checked against its topic too."""
    result = decode(STATUS_TOPIC, dumps(status_doc(device="other")))
    assert isinstance(result, Rejection)
    assert result.reason is Reason.TOPIC_MISMATCH


def test_no_topic_means_no_topic_check() -> None:
    """Without a topic, site and device are only checked against their charset."""
    assert accepted(dumps(envelope_doc(site="office")), topic=None).site == "office"


def test_schema_is_checked_before_topic() -> None:
    """A payload with a schema error and a mismatched site is a schema error."""
    assert rejected(dumps(envelope_doc(site="office", seq=-1))).reason is Reason.SCHEMA


@pytest.mark.parametrize(
    "topic", ["iotpipe/v1/home/pi/events", "iotpipe/v2/home/pi/telemetry", "home/pi", ""]
)
def test_bad_topics(topic: str) -> None:
    """decode() rejects a topic outside iotpipe v1 as bad_topic without reading the payload."""
    result = decode(topic, b"\xff")
    assert isinstance(result, Rejection)
    assert result.reason is Reason.BAD_TOPIC


def test_kind_specific_decoders_check_the_topic_kind() -> None:
    """decode_telemetry refuses a status topic and decode_status a telemetry topic."""
    assert rejected(dumps(envelope_doc()), STATUS_TOPIC) == Rejection(
        Reason.BAD_TOPIC,
        "topic 'iotpipe/v1/home/pi-kitchen/status' is not iotpipe/v1/{site}/{device}/telemetry",
    )
    result = decode_status(dumps(status_doc()), TOPIC)
    assert isinstance(result, Rejection)
    assert result.reason is Reason.BAD_TOPIC


# -- field rules --------------------------------------------------------------------------------

ID_OK = ["a", "x" * 64, "home:pi-kitchen:42", "0.1_2-3:4", "550e8400-e29b-41d4-a716-446655440000"]
ID_BAD = ["", "x" * 65, "a b", "a/b", "a+b", "a#b", "caf\u00e9", "a\n", "a,b"]
NAME_OK = ["a", "x" * 64, "pi-kitchen_2", "HOME"]
NAME_BAD = ["", "x" * 65, "a.b", "a:b", "a/b", "a b", "+", "#", "caf\u00e9"]
SENSOR_OK = ["a", "x" * 64, "cpu.load1", "temp_1-a"]
SENSOR_BAD = ["", "x" * 65, "a:b", "a/b", "a b", "temp\u00b0"]


@pytest.mark.parametrize("value", ID_OK)
def test_valid_ids(value: str) -> None:
    """Ids of 1-64 characters of A-Z a-z 0-9 _ - : . are accepted."""
    assert accepted(dumps(envelope_doc(id=value))).id == value


@pytest.mark.parametrize("value", ID_BAD)
def test_invalid_ids(value: str) -> None:
    """Other ids are schema errors that name the field and its rule."""
    rejection = rejected(dumps(envelope_doc(id=value)))
    assert rejection.reason is Reason.SCHEMA
    assert rejection.message.startswith("id: must be 1-64 characters of A-Z a-z 0-9 _ - : .")


@pytest.mark.parametrize("field", ["site", "device"])
@pytest.mark.parametrize("value", NAME_OK)
def test_valid_site_and_device(field: str, value: str) -> None:
    """Sites and devices of 1-64 characters of A-Z a-z 0-9 _ - are accepted."""
    assert getattr(accepted(dumps(envelope_doc(**{field: value})), None), field) == value


@pytest.mark.parametrize("field", ["site", "device"])
@pytest.mark.parametrize("value", [*NAME_BAD, 7, None])
def test_invalid_site_and_device(field: str, value: object) -> None:
    """Other sites and devices are schema errors naming the field."""
    rejection = rejected(dumps(envelope_doc(**{field: value})), None)
    assert rejection.reason is Reason.SCHEMA
    assert rejection.message.startswith(f"{field}: must be")


@pytest.mark.parametrize("value", [0, 1, 2**63 - 1])
def test_valid_seq(value: int) -> None:
    """seq is any integer from 0 to the largest signed 64-bit integer."""
    assert accepted(dumps(envelope_doc(seq=value))).seq == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "seq: must be >= 0, got -1"),
        (1.5, "seq: must be an integer, got the number 1.5"),
        (1.0, "seq: must be an integer, got the number 1.0"),
        (True, "seq: must be an integer, got a boolean"),
        ("5", "seq: must be an integer, got a string"),
        (None, "seq: must be an integer, got null"),
        (2**63, "seq: must be <= 9223372036854775807, got 9223372036854775808"),
    ],
)
def test_invalid_seq(value: object, message: str) -> None:
    """Negative, fractional, boolean, string and out-of-range seqs are schema errors."""
    assert rejected(dumps(envelope_doc(seq=value))) == Rejection(Reason.SCHEMA, message)


def test_seq_float_literal_with_exponent_is_refused() -> None:
    """A JSON number written with an exponent or fraction is not an integer seq."""
    payload = dumps(envelope_doc()).replace(b'"seq": 42', b'"seq": 4.2e1')
    assert rejected(payload).reason is Reason.SCHEMA


@pytest.mark.parametrize("value", ["", "b7f3", "2026-11-26T08:00:00Z", "\u00e9" * 300])
def test_valid_boot(value: str) -> None:
    """boot is any string."""
    assert accepted(dumps(envelope_doc(boot=value))).boot == value


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("boot", None, "boot: must be a string, got null"),
        ("boot", 3, "boot: must be a string, got a number"),
        ("tags", None, "tags: must be an object, got null"),
        ("tags", ["a"], "tags: must be an object, got an array"),
        ("tags", {"room": 1}, "tags.room: must be a string, got a number"),
        ("tags", {"room": None}, "tags.room: must be a string, got null"),
        ("tags", {"a": {"b": "c"}}, "tags.a: must be a string, got an object"),
        ("readings", None, "readings: must be an array, got null"),
        ("readings", {"sensor": "s"}, "readings: must be an array, got an object"),
        ("readings", [], "readings: must not be empty"),
        ("readings", [1], "readings[0]: must be an object, got a number"),
    ],
)
def test_invalid_optional_and_container_fields(field: str, value: object, message: str) -> None:
    """Optional fields are absent or of their type (never null) and containers are checked."""
    assert rejected(dumps(envelope_doc(**{field: value}))) == Rejection(Reason.SCHEMA, message)


@pytest.mark.parametrize("count", [0, 1, 16])
def test_tags_up_to_16_entries(count: int) -> None:
    """tags may hold 0 to 16 string -> string entries."""
    tags = {f"k{i}": f"v{i}" for i in range(count)}
    assert accepted(dumps(envelope_doc(tags=tags))).tags == tags


def test_tags_over_16_entries() -> None:
    """tags with 17 entries are a schema error."""
    tags = {f"k{i}": "v" for i in range(17)}
    assert rejected(dumps(envelope_doc(tags=tags))) == Rejection(
        Reason.SCHEMA, "tags: must have at most 16 entries"
    )


@pytest.mark.parametrize("count", [1, MAX_READINGS])
def test_readings_from_1_to_1000(count: int) -> None:
    """An envelope carries 1 to 1000 readings."""
    doc = envelope_doc(readings=[{"sensor": f"s{i}", "value": i} for i in range(count)])
    assert len(accepted(dumps(doc)).readings) == count


def test_readings_over_1000() -> None:
    """1001 readings are a schema error."""
    doc = envelope_doc(readings=[{"sensor": "s", "value": 1}] * (MAX_READINGS + 1))
    assert rejected(dumps(doc)) == Rejection(
        Reason.SCHEMA, "readings: must have at most 1000 items"
    )


@pytest.mark.parametrize("field", ["v", "id", "site", "device", "seq", "ts", "readings"])
def test_required_envelope_fields(field: str) -> None:
    """Each required envelope field missing is a schema error naming it."""
    doc = envelope_doc()
    del doc[field]
    assert rejected(dumps(doc)) == Rejection(Reason.SCHEMA, f"{field}: is required")


@pytest.mark.parametrize("field", ["sensor", "value"])
def test_required_reading_fields(field: str) -> None:
    """Each required reading field missing is a schema error naming its path."""
    doc = with_reading()
    del doc["readings"][0][field]
    assert rejected(dumps(doc)) == Rejection(Reason.SCHEMA, f"readings[0].{field}: is required")


@pytest.mark.parametrize("value", SENSOR_OK)
def test_valid_sensors(value: str) -> None:
    """Sensors of 1-64 characters of A-Z a-z 0-9 _ - . are accepted."""
    assert accepted(dumps(envelope_doc(readings=[{"sensor": value, "value": 1}]))).readings


@pytest.mark.parametrize("value", SENSOR_BAD)
def test_invalid_sensors(value: str) -> None:
    """Other sensors are schema errors naming the reading."""
    rejection = rejected(dumps(envelope_doc(readings=[{"sensor": value, "value": 1}])))
    assert rejection.reason is Reason.SCHEMA
    assert rejection.message.startswith(
        "readings[0].sensor: must be 1-64 characters of A-Z a-z 0-9 _ - ."
    )


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (True, bool),
        (False, bool),
        (0, int),
        (1, int),
        (-(2**63), int),
        (2**63 - 1, int),
        (1.0, float),
        (-0.0, float),
        (21.5, float),
        (1e308, float),
        (5e-324, float),
        ("", str),
        ("on", str),
        ("x" * 256, str),
        ("\u00e9" * 256, str),
    ],
)
def test_valid_values_keep_their_type(value: object, kind: type) -> None:
    """Booleans stay booleans, integers integers, floats floats, strings strings."""
    reading = accepted(dumps(with_reading(value=value))).readings[0]
    assert type(reading.value) is kind
    assert reading.value == value


def test_integers_beyond_64_bits_are_read_as_floats() -> None:
    """An integer literal too large for 64 bits is read as the nearest float, like JavaScript."""
    reading = accepted(dumps(with_reading(value=2**64))).readings[0]
    assert reading.value == float(2**64)
    assert type(reading.value) is float


@pytest.mark.parametrize(
    ("literal", "message"),
    [
        (b"1e999", "readings[0].value: must be a finite number"),
        (b"-1e999", "readings[0].value: must be a finite number"),
        (b"1" + b"0" * 400, "readings[0].value: must be a finite number"),
        (b"null", "readings[0].value: must be a number, boolean or string, got null"),
        (b"{}", "readings[0].value: must be a number, boolean or string, got an object"),
        (b"[1]", "readings[0].value: must be a number, boolean or string, got an array"),
        (
            b'"' + b"x" * 257 + b'"',
            "readings[0].value: a string value must be at most 256 characters, got 257",
        ),
    ],
)
def test_invalid_values(literal: bytes, message: str) -> None:
    """Non-finite numbers, null, objects, arrays and long strings are schema errors."""
    payload = dumps(with_reading(value="__here__")).replace(b'"__here__"', literal)
    assert rejected(payload) == Rejection(Reason.SCHEMA, message)


def test_error_path_names_the_failing_reading() -> None:
    """The rejection message names the index of the reading that broke the rule."""
    readings = [{"sensor": f"s{i}", "value": i} for i in range(5)]
    payload = dumps(envelope_doc(readings=readings)).replace(b'"value": 3', b'"value": 1e999')
    assert rejected(payload) == Rejection(
        Reason.SCHEMA, "readings[3].value: must be a finite number"
    )


def test_several_problems_are_counted() -> None:
    """With several problems the message names the first and counts the others."""
    assert rejected(dumps(envelope_doc(id="", seq=-1, ts=True))) == Rejection(
        Reason.SCHEMA,
        "id: must be 1-64 characters of A-Z a-z 0-9 _ - : ., got '' (and 2 more problems)",
    )


@pytest.mark.parametrize("unit", ["", "Cel", "%RH", "1", "x" * 16, "\u00b0C"])
def test_valid_units(unit: str) -> None:
    """A unit is any string of at most 16 characters."""
    assert accepted(dumps(with_reading(unit=unit))).readings[0].unit == unit


@pytest.mark.parametrize(
    ("unit", "message"),
    [
        ("x" * 17, "readings[0].unit: must be at most 16 characters, got 'xxxxxxxxxxxxxxxxx'"),
        (None, "readings[0].unit: must be a string, got null"),
        (1, "readings[0].unit: must be a string, got a number"),
    ],
)
def test_invalid_units(unit: object, message: str) -> None:
    """Long, null and non-string units are schema errors."""
    assert rejected(dumps(with_reading(unit=unit))) == Rejection(Reason.SCHEMA, message)


def test_non_finite_number_in_unknown_field_is_refused() -> None:
    """An unknown field may hold any JSON, but a number overflowing to infinity is refused."""
    payload = dumps(envelope_doc(extra={"a": [0, "__here__"]})).replace(b'"__here__"', b"1e999")
    assert rejected(payload) == Rejection(
        Reason.SCHEMA,
        "extra: an unknown field may hold any JSON value, but its numbers must be finite (at a[1])",
    )


# -- timestamps ---------------------------------------------------------------------------------

TS_OK = [
    ("2026-11-26T08:15:02.125Z", 1795680902125),
    ("2026-11-26T08:15:02Z", 1795680902000),
    ("2026-11-26t08:15:02z", 1795680902000),
    ("2026-11-26T08:15:02.125+00:00", 1795680902125),
    ("2026-11-26T08:15:02.125-00:00", 1795680902125),
    ("2026-11-26T08:15:02.1Z", 1795680902100),
    ("2026-11-26T08:15:02.12Z", 1795680902120),
    ("2026-11-26T08:15:02.123999999Z", 1795680902123),
    ("1970-01-01T00:00:00Z", 0),
    ("2028-02-29T23:59:59.999Z", 1835481599999),
    ("9999-12-31T23:59:59.999Z", MAX_TS_MS),
]


@pytest.mark.parametrize(("text", "expected"), TS_OK)
def test_valid_rfc3339_timestamps(text: str, expected: int) -> None:
    """RFC 3339 UTC strings are accepted, kept verbatim, and converted to truncated epoch ms."""
    env = accepted(dumps(envelope_doc(ts=text)))
    assert env.ts == text
    assert env.timestamp_ms == expected == ms(text)


@pytest.mark.parametrize("value", [0, 1, 1764144902125, MAX_TS_MS])
def test_valid_epoch_ms(value: int) -> None:
    """Integer epoch milliseconds from 0 to the end of year 9999 are accepted as given."""
    env = accepted(dumps(envelope_doc(ts=value)))
    assert env.ts == value
    assert type(env.ts) is int
    assert env.timestamp_ms == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "2026-11-26T10:15:02+02:00",
            "ts: must be UTC (end in Z or +00:00), got offset +02:00 in '2026-11-26T10:15:02+02:00'",
        ),
        (
            "2026-11-26T03:15:02-05:00",
            "ts: must be UTC (end in Z or +00:00), got offset -05:00 in '2026-11-26T03:15:02-05:00'",
        ),
        (
            "2026-11-26T08:15:02",
            "ts: must be an RFC 3339 UTC timestamp like 2026-11-26T08:15:02.125Z, "
            "got '2026-11-26T08:15:02'",
        ),
        (
            "2026-02-29T08:15:02Z",
            "ts: is not a valid date and time (no leap seconds): '2026-02-29T08:15:02Z'",
        ),
        (
            "1969-12-31T23:59:59Z",
            "ts: must not be before 1970-01-01T00:00:00Z, got '1969-12-31T23:59:59Z'",
        ),
        (True, "ts: must be an RFC 3339 UTC string or integer epoch milliseconds, got a boolean"),
        (None, "ts: must be an RFC 3339 UTC string or integer epoch milliseconds, got null"),
        ({}, "ts: must be an RFC 3339 UTC string or integer epoch milliseconds, got an object"),
        (1.5, "ts: epoch milliseconds must be an integer, got the number 1.5"),
        (
            1764144902125.0,
            "ts: epoch milliseconds must be an integer, got the number 1764144902125.0",
        ),
        (
            -1,
            "ts: epoch milliseconds must be between 0 and 253402300799999 "
            "(9999-12-31T23:59:59.999Z), got -1",
        ),
        (
            MAX_TS_MS + 1,
            "ts: epoch milliseconds must be between 0 and 253402300799999 "
            "(9999-12-31T23:59:59.999Z), got 253402300800000",
        ),
    ],
)
def test_invalid_timestamps(value: object, message: str) -> None:
    """Non-UTC offsets, local times, impossible dates, pre-1970, non-integers are refused."""
    assert rejected(dumps(envelope_doc(ts=value))) == Rejection(Reason.SCHEMA, message)


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-26",
        "2026-11-26 08:15:02Z",
        "2026-11-26T08:15Z",
        "2026-11-26T08:15:02.Z",
        "20261126T081502Z",
        "2026-W48-4T08:15:02Z",
        "2026-11-26T08:15:02ZZ",
        "2026-11-26T08:15:02+0000",
        "2026-11-26T08:15:02 Z",
        "2026-13-01T00:00:00Z",
        "2026-00-10T00:00:00Z",
        "2026-11-31T00:00:00Z",
        "2026-11-26T24:00:00Z",
        "2026-11-26T23:60:00Z",
        "2026-11-26T23:59:60Z",
        "0000-01-01T00:00:00Z",
        "\u0662026-11-26T08:15:02Z",
        "2026-11-26T08:15:02Z\n",
        "1764144902125",
        "",
    ],
)
def test_malformed_timestamp_strings(text: str) -> None:
    """Strings that are not RFC 3339 date-times (or denote no real instant) are schema errors."""
    rejection = rejected(dumps(envelope_doc(ts=text)))
    assert rejection.reason is Reason.SCHEMA
    assert rejection.message.startswith("ts: ")


def test_float_literal_epoch_ms_is_refused() -> None:
    """Epoch milliseconds written as 1.764e12 are a float, not an integer."""
    payload = dumps(envelope_doc(ts=0)).replace(b'"ts": 0', b'"ts": 1.764e12')
    assert rejected(payload).reason is Reason.SCHEMA


def test_per_reading_ts_overrides_envelope_ts() -> None:
    """A reading's own ts (either form) is its time; others take the envelope's."""
    doc = envelope_doc(
        ts="2026-11-26T08:15:02.125Z",
        readings=[
            {"sensor": "a", "value": 1},
            {"sensor": "a", "value": 2, "ts": "2026-11-26T08:15:01.125Z"},
            {"sensor": "a", "value": 3, "ts": 1795680900125},
        ],
    )
    env = accepted(dumps(doc))
    times = [reading_time_ms(env, r) for r in env.readings]
    assert times == [1795680902125, 1795680901125, 1795680900125]
    assert [r.time_ms(env) for r in env.readings] == times
    assert env.readings[1].ts == "2026-11-26T08:15:01.125Z"
    assert env.readings[2].ts == 1795680900125


def test_epoch_ms_envelope_with_string_reading_ts() -> None:
    """An epoch-ms envelope ts and an RFC 3339 reading ts mix freely."""
    doc = envelope_doc(
        ts=1795680902125, readings=[{"sensor": "a", "value": 1, "ts": "1970-01-01T00:00:00.001Z"}]
    )
    env = accepted(dumps(doc))
    assert env.timestamp_ms == 1795680902125
    assert reading_time_ms(env, env.readings[0]) == 1


def test_invalid_reading_ts_names_the_reading() -> None:
    """A bad per-reading ts is a schema error naming that reading."""
    rejection = rejected(dumps(with_reading(ts="2026-11-26T08:15:02+01:00")))
    assert rejection.reason is Reason.SCHEMA
    assert rejection.message.startswith("readings[0].ts: must be UTC")


def test_status_rules() -> None:
    """Status messages need every field, a known state and a valid ts."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"state": "on"}, "state: must be one of 'online' or 'offline', got 'on'"),
        ({"state": None}, "state: must be one of 'online' or 'offline', got null"),
        ({"agent": 1}, "agent: must be a string, got a number"),
        (
            {"ts": -5},
            "ts: epoch milliseconds must be between 0 and 253402300799999 "
            "(9999-12-31T23:59:59.999Z), got -5",
        ),
        ({"v": "2.0"}, "contract 2.0 is not supported by this reader (1.x)"),
    ]
    for changes, message in cases:
        result = decode_status(dumps(status_doc(**changes)), STATUS_TOPIC)
        assert isinstance(result, Rejection)
        assert result.message == message
    for field in ("v", "site", "device", "state", "ts", "agent"):
        doc = status_doc()
        del doc[field]
        assert decode_status(dumps(doc)) == Rejection(Reason.SCHEMA, f"{field}: is required")


# -- encode -------------------------------------------------------------------------------------


def test_encode_is_compact_json_without_unset_fields() -> None:
    """encode writes compact UTF-8 JSON in field order and leaves out fields never set."""
    env = Envelope(
        v="1.0",
        id="m-1",
        site="home",
        device="pi",
        seq=0,
        ts=1764144902125,
        readings=[Reading(sensor="t", value=True), Reading(sensor="c", value="caf\u00e9")],
    )
    assert encode(env) == (
        b'{"v":"1.0","id":"m-1","site":"home","device":"pi","seq":0,"ts":1764144902125,'
        b'"readings":[{"sensor":"t","value":true},{"sensor":"c","value":"caf\xc3\xa9"}]}'
    )
    assert decode_telemetry(encode(env)) == env


def test_encode_keeps_ts_forms_as_given() -> None:
    """encode writes each ts in the form it was given, including lowercase and -00:00."""
    doc = envelope_doc(
        ts="2026-11-26t08:15:02.1250000z",
        readings=[{"sensor": "a", "value": 1, "ts": "2026-11-26T08:15:02-00:00"}],
    )
    env = accepted(dumps(doc))
    assert json.loads(encode(env)) == doc


def test_encode_round_trips_the_example_byte_for_byte() -> None:
    """For a compact payload in field order, encode(decode(payload)) is the same bytes."""
    payload = json.dumps(envelope_doc(), separators=(",", ":"), ensure_ascii=False).encode()
    assert encode(accepted(payload)) == payload


def test_encode_status() -> None:
    """encode writes a status message that decodes back equal."""
    status = Status(v="1.0", site="home", device="pi", state="offline", ts=0, agent="edge/1")
    assert encode(status) == (
        b'{"v":"1.0","site":"home","device":"pi","state":"offline","ts":0,"agent":"edge/1"}'
    )
    assert decode_status(encode(status)) == status


# -- the Python-side models ---------------------------------------------------------------------


def test_models_are_frozen() -> None:
    """Decoded messages cannot be modified."""
    env = accepted(dumps(envelope_doc()))
    with pytest.raises(ValidationError):
        env.seq = 1
    with pytest.raises(ValidationError):
        env.readings[0].value = 2


def test_python_construction_applies_the_same_rules() -> None:
    """Building a model in Python enforces the contract too, null included."""
    with pytest.raises(ValidationError):
        Reading(sensor="a", value=1, unit=None)
    with pytest.raises(ValidationError):
        Reading(sensor="a b", value=1)
    with pytest.raises(ValidationError):
        Reading(sensor="a", value=float("nan"))
    with pytest.raises(ValidationError):
        Envelope.model_validate(envelope_doc(ts="2026-11-26T08:15:02+01:00"))
    with pytest.raises(ValidationError):
        Envelope.model_validate(envelope_doc(extra=float("inf")))


def test_python_construction_keeps_bools_and_ints() -> None:
    """Reading(value=True) stays a bool and value=1 stays an int."""
    assert type(Reading(sensor="a", value=True).value) is bool
    assert type(Reading(sensor="a", value=1).value) is int


def test_validator_failure_becomes_an_internal_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the validator itself fail, decode reports an internal rejection instead of raising."""

    class Exploding:
        def validate_json(self, _payload: bytes) -> Envelope:
            raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(Envelope, "__pydantic_validator__", Exploding())
    assert decode_telemetry(dumps(envelope_doc())) == Rejection(
        Reason.INTERNAL, "validator failed: RuntimeError: boom second line"
    )


def test_rejection_is_a_printable_value() -> None:
    """A Rejection prints as 'reason: message' and compares by value."""
    rejection = Rejection(Reason.SCHEMA, "seq: must be >= 0, got -1")
    assert str(rejection) == "schema: seq: must be >= 0, got -1"
    assert rejection == Rejection(Reason.SCHEMA, "seq: must be >= 0, got -1")


def test_reason_codes_are_stable() -> None:
    """The reason codes are the strings the dead-letter routing keys are built from."""
    assert {reason.value for reason in Reason} == {
        "bad_json",
        "schema",
        "topic_mismatch",
        "too_large",
        "unsupported_version",
        "bad_topic",
        "bad_encoding",
        "internal",
    }


@pytest.mark.parametrize(
    "build",
    [
        lambda: dumps(envelope_doc(id="a\nb")),
        lambda: dumps(envelope_doc(extra={"x\ny": 1e999})).replace(b"Infinity", b"1e999"),
        lambda: b'{"v": "1.0", "id": "\xff\n"}',
        lambda: b'{\n"v": \n',
    ],
)
def test_rejection_messages_are_one_line(build: Callable[[], bytes]) -> None:
    """Rejection messages never contain a line break, whatever the payload holds."""
    assert "\n" not in rejected(build()).message


def test_module_exports_are_importable() -> None:
    """Everything in __all__ exists."""
    for name in envelope_module.__all__:
        assert hasattr(envelope_module, name)


def test_documented_examples_are_valid() -> None:
    """Every JSON example in docs/wire.md is a valid message of its kind (receipts included)."""
    doc = (Path(__file__).parents[2] / "docs" / "wire.md").read_text()
    examples = re.findall(r"```json\n(.*?)```", doc, flags=re.DOTALL)
    assert len(examples) >= 3
    for example in examples:
        payload = example.encode()
        fields = json.loads(payload)
        if "stored" in fields:  # a receipt (1.1)
            assert isinstance(decode_receipt(payload), Receipt), example
            continue
        kind = Kind.STATUS if "state" in fields else Kind.TELEMETRY
        result = decode(topic(fields["site"], fields["device"], kind), payload)
        assert isinstance(result, Envelope | Status), (example, result)
