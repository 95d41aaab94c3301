"""Payload parsers of the stateless ingest formats: JSON leaves, plain values, line protocol.

Pure functions from bytes to plain Python values; they know nothing of rules, names or
envelopes (:mod:`bridge.ingest` does). Each raises :class:`FormatError` with the reason's
suffix (``json``, ``value``, ``line``, ...) and one line for ``x-iotpipe-error``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from iotpipe.wire import MAX_VALUE_LENGTH, Value

__all__ = ["FormatError", "Line", "flatten_json", "parse_json", "parse_lines", "plain_value"]


class FormatError(Exception):
    """A payload does not parse: ``what`` is the dead-letter reason's suffix."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(message)
        self.what = what
        self.message = message


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)  # built once, not per message


def parse_json(payload: bytes) -> object:
    """The payload as JSON (NaN and Infinity refused: the contract has no place for them).

    Nesting deep enough to exhaust the interpreter's recursion limit (``[[[[...`` from a
    hostile device) is refused like any other broken payload, not treated as a bug.
    """
    try:
        return _DECODER.decode(payload.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise FormatError("json", f"payload is not JSON: {err}") from None
    except RecursionError:
        raise FormatError("json", "payload is not JSON: nested too deeply") from None


#: Objects nested deeper than this are refused: a sensor name is at most 64 characters, so a
#: deeper path could not name a reading anyway, and the limit keeps the recursion bounded.
MAX_JSON_DEPTH = 64


def flatten_json(
    value: dict[str, object],
    separator: str,
    out: dict[str, object],
    prefix: str = "",
    depth: int = 1,
) -> None:
    """Every leaf of nested objects into ``out`` as ``path: value``, keys joined with
    ``separator`` (lists are leaves; the caller skips what is not a reading).

    Raises:
        FormatError: objects nested deeper than :data:`MAX_JSON_DEPTH`.
    """
    if depth > MAX_JSON_DEPTH:
        raise FormatError("json", f"objects nested deeper than {MAX_JSON_DEPTH} levels")
    for key, item in value.items():
        path = f"{prefix}{separator}{key}" if prefix else key
        if type(item) is dict:
            flatten_json(item, separator, out, path, depth + 1)
        else:
            out[path] = item


def plain_value(payload: bytes) -> Value:
    """A plain payload's value: a number, ON/OFF/true/false as a boolean, else the text."""
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise FormatError("value", "payload is not UTF-8 text") from None
    if not text:
        raise FormatError("value", "payload is empty")
    lowered = text.lower()
    if lowered in {"on", "true"}:
        return True
    if lowered in {"off", "false"}:
        return False
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number):  # ESPHome publishes "nan" for a sensor without a value
            raise FormatError("value", f"value {text!r} is not a finite number")
        return number
    if len(text) > MAX_VALUE_LENGTH:
        raise FormatError("value", f"text value longer than {MAX_VALUE_LENGTH} characters")
    return text


# -- InfluxDB line protocol ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line:
    """One line of line protocol: ``measurement,tags fields [timestamp]``."""

    measurement: str
    tags: dict[str, str]
    fields: dict[str, Value]
    timestamp: int | None


_PRECISION_TO_MS = {"ns": 1_000_000, "us": 1_000, "ms": 1, "s": 0}
_TRUE = {"t", "T", "true", "True", "TRUE"}
_FALSE = {"f", "F", "false", "False", "FALSE"}


def parse_lines(payload: bytes) -> list[Line]:
    """Every line of a line-protocol payload (blank lines and ``#`` comments skipped).

    Escaping as InfluxDB documents it: ``\\`` before comma and space in measurements, before
    comma, equals sign and space in tag keys, tag values and field keys; string field values
    are double-quoted with ``\\"`` and ``\\\\`` inside.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("line", "payload is not UTF-8 text") from None
    lines = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            lines.append(_parse_line(line))
        except FormatError as err:
            raise FormatError("line", f"line {number}: {err.message}") from None
    if not lines:
        raise FormatError("line", "no line-protocol line in the payload")
    return lines


# What _split stops at: an escape (skipped whole), a quote, or the separator. A regular
# expression finds them without a Python step per character, so a 256 KiB line costs
# milliseconds, not a tenth of a second.
_SPECIAL = {sep: re.compile(r'\\.|"|' + re.escape(sep), re.DOTALL) for sep in " ,="}
_ESCAPED = re.compile(r'\\([, ="\\])')


def _split(text: str, separator: str) -> list[str]:
    """Split at unescaped ``separator`` outside double quotes; escapes are kept."""
    if "\\" not in text and '"' not in text:
        return text.split(separator)  # the common case
    parts: list[str] = []
    start = 0
    quoted = False
    for match in _SPECIAL[separator].finditer(text):
        found = match.group()
        if found == '"':
            quoted = not quoted
        elif found == separator and not quoted:
            parts.append(text[start : match.start()])
            start = match.end()
    if quoted:
        raise FormatError("line", "unterminated string")
    parts.append(text[start:])
    return parts


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    return _ESCAPED.sub(r"\1", text)


def _pair(text: str, what: str) -> tuple[str, str]:
    parts = _split(text, "=")
    if len(parts) != 2 or not parts[0]:
        raise FormatError("line", f"{what} {text!r} is not key=value")
    return _unescape(parts[0]), parts[1]


def _field_value(text: str) -> Value:
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        value = _unescape(text[1:-1])
        if len(value) > MAX_VALUE_LENGTH:
            raise FormatError("line", f"string longer than {MAX_VALUE_LENGTH} characters")
        return value
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    try:
        if text.endswith(("i", "u")):
            return int(text[:-1])
        number = float(text)
    except ValueError:
        raise FormatError("line", f"field value {text!r} is not a number") from None
    if not math.isfinite(number):
        raise FormatError("line", f"field value {text!r} is not a finite number")
    return number


def _parse_line(line: str) -> Line:
    sections = [part for part in _split(line, " ") if part]
    if len(sections) not in {2, 3}:
        raise FormatError("line", "expected 'measurement[,tags] fields [timestamp]'")
    head = _split(sections[0], ",")
    measurement = _unescape(head[0])
    if not measurement:
        raise FormatError("line", "empty measurement")
    tags = dict(_pair(item, "tag") for item in head[1:])
    tags = {key: _unescape(value) for key, value in tags.items()}
    fields = {key: _field_value(value) for key, value in map(_pair_field, _split(sections[1], ","))}
    timestamp = None
    if len(sections) == 3:
        try:
            timestamp = int(sections[2])
        except ValueError:
            raise FormatError("line", f"timestamp {sections[2]!r} is not an integer") from None
    return Line(measurement, tags, fields, timestamp)


def _pair_field(text: str) -> tuple[str, str]:
    return _pair(text, "field")


def timestamp_ms(timestamp: int, precision: str) -> int:
    """A line-protocol timestamp of ``precision`` (ns, us, ms, s) in epoch milliseconds."""
    factor = _PRECISION_TO_MS[precision]
    return timestamp * 1000 if factor == 0 else timestamp // factor
