"""Recordings of MQTT traffic: the file format, a writer and a validating reader.

A recording is a UTF-8 `JSON Lines <https://jsonlines.org>`_ file. The first line is a header,
every further line one message, in the order the messages were received::

    {"format": "iotpipe-recording", "version": "1.0", "created": "2026-11-26T08:15:02.125Z",
     "source": "mqtt://127.0.0.1:1883", "filters": ["iotpipe/#"]}
    {"t": 0.0, "topic": "iotpipe/v1/s1/d1/status", "qos": 1, "retain": true, "payload": "{...}"}
    {"t": 0.250117, "topic": "iotpipe/v1/s1/d1/telemetry", "qos": 1, "retain": false,
     "payload": "AP8=", "encoding": "base64"}

(each object is on one line in the file). ``t`` is the receive time in seconds since the first
message (microsecond precision, never decreasing). A payload that is valid UTF-8 is stored as
text; any other payload is stored as base64 with ``"encoding": "base64"``. Either way reading it
back gives exactly the bytes that were received. ``docs/recording.md`` is the full specification.

Compatibility: ``version`` is ``"MAJOR.MINOR"``. A minor version only adds optional fields, and
readers ignore fields they do not know, so this reader accepts every ``1.x`` file; a file of
another major version is refused with a clear :class:`~iotpipe.errors.RecordingError`.

Crash safety: the writer flushes every line to the operating system as it writes it, so a
recorder that is killed leaves a valid file up to its last complete line. At worst the last line
is cut short; the reader skips such an incomplete *last* line and reports it through
:attr:`RecordingReader.truncated_line` (or refuses it with ``allow_truncated=False``). Damage
anywhere else is an error naming the line.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from iotpipe.closing import Closing
from iotpipe.errors import RecordingError

if TYPE_CHECKING:
    from iotpipe.mqtt import Message

__all__ = [
    "FORMAT",
    "SUPPORTED_MAJOR",
    "VERSION",
    "Header",
    "RecordedMessage",
    "Recorder",
    "RecordingReader",
    "RecordingWriter",
    "decode_message",
    "encode_header",
    "encode_message",
    "read_recording",
    "write_recording",
]

FORMAT = "iotpipe-recording"
"""The ``format`` value of every recording header."""
VERSION = "1.0"
"""The format version this module writes."""
SUPPORTED_MAJOR = 1
"""The major format version this module reads."""

_VERSION_RE = re.compile(r"(\d{1,4})\.(\d{1,4})")
_MAX_TOPIC_BYTES = 65_535  # MQTT strings carry a 16-bit length prefix.


@dataclass(frozen=True, slots=True)
class RecordedMessage:
    """One message of a recording.

    Attributes:
        offset: seconds since the first message of the recording (``t`` in the file).
        topic: the MQTT topic it was received on.
        payload: the payload bytes exactly as received.
        qos: the QoS it was delivered with (0, 1 or 2).
        retain: the retain flag as received (set for retained messages sent at subscribe time).
    """

    offset: float
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Header:
    """The first line of a recording.

    Attributes:
        created: when recording started (UTC).
        source: the broker it was recorded from, without credentials (``mqtt://host:1883``).
        filters: the MQTT subscription filters that were recorded.
        version: the file's format version (``"1.0"``); :data:`VERSION` for new files.
        extra: header fields this version does not know (kept, never interpreted).
    """

    created: datetime | None = None
    source: str | None = None
    filters: tuple[str, ...] = ()
    version: str = VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)


# -- encoding ---------------------------------------------------------------------------------


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_header(header: Header) -> str:
    """Serialise a header to one JSON line (without the newline)."""
    obj: dict[str, Any] = {"format": FORMAT, "version": header.version}
    if header.created is not None:
        obj["created"] = _rfc3339(header.created)
    if header.source is not None:
        obj["source"] = header.source
    obj["filters"] = list(header.filters)
    for key, value in header.extra.items():
        obj.setdefault(key, value)
    return json.dumps(obj, ensure_ascii=False)


def encode_message(message: RecordedMessage) -> str:
    """Serialise a message to one JSON line (without the newline).

    The payload is written as text when it is valid UTF-8. Python's strict UTF-8 decoder never
    yields a lone surrogate, so the text always encodes back to the very same bytes; control
    characters such as NUL are escaped by JSON (``\\u0000``) and round-trip too.
    """
    obj: dict[str, Any] = {
        "t": round(float(message.offset), 6),
        "topic": message.topic,
        "qos": message.qos,
        "retain": message.retain,
    }
    try:
        obj["payload"] = message.payload.decode("utf-8")
    except UnicodeDecodeError:
        obj["payload"] = base64.b64encode(message.payload).decode("ascii")
        obj["encoding"] = "base64"
    return json.dumps(obj, ensure_ascii=False)


# -- decoding ---------------------------------------------------------------------------------


class _LineError(Exception):
    """A problem with one line; the reader adds the path and line number.

    ``syntax`` marks lines that are not even UTF-8 JSON: what a cut-off last line looks like.
    """

    def __init__(self, reason: str, *, syntax: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.syntax = syntax


def _refuse_constant(name: str) -> object:
    raise _LineError(f"not JSON ({name} is not a JSON value)")


def _parse_object(line: bytes | str, what: str) -> dict[str, Any]:
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _LineError(
                f"not UTF-8 text (bad byte at column {err.start + 1})", syntax=True
            ) from None
    try:
        obj = json.loads(line, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise _LineError(f"not JSON ({err.msg} at column {err.colno})", syntax=True) from None
    except RecursionError:
        raise _LineError("not JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise _LineError(f"{what} must be a JSON object, not {_json_type(obj)}")
    return obj


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _require(obj: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in obj:
        raise _LineError(f'{what} has no "{key}" field')
    return obj[key]


def _check_topic(topic: object) -> str:
    if not isinstance(topic, str):
        raise _LineError(f'"topic" must be a string, not {_json_type(topic)}')
    if not topic:
        raise _LineError('"topic" is empty')
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        raise _LineError('"topic" is not valid Unicode (it contains a lone surrogate)') from None
    if size > _MAX_TOPIC_BYTES:
        raise _LineError(f'"topic" is longer than {_MAX_TOPIC_BYTES} bytes')
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise _LineError(f'"topic" {topic[:80]!r} contains a wildcard or NUL')
    return topic


def _check_payload(obj: Mapping[str, Any]) -> bytes:
    payload = _require(obj, "payload", "message")
    if not isinstance(payload, str):
        raise _LineError(f'"payload" must be a string, not {_json_type(payload)}')
    encoding = obj.get("encoding")
    if encoding is None:
        try:
            return payload.encode("utf-8")
        except UnicodeEncodeError:
            raise _LineError(
                '"payload" text contains a lone surrogate, which no UTF-8 payload can; '
                'store such bytes with "encoding": "base64"'
            ) from None
    if encoding != "base64":
        raise _LineError(f'unknown payload "encoding" {encoding!r} (expected "base64")')
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise _LineError(f'"payload" is not valid base64 ({err})') from None


def decode_message(line: bytes | str) -> RecordedMessage:
    """Parse and validate one message line (unknown fields are ignored).

    Raises:
        ValueError: the line is not a valid message; the message says why.
    """
    try:
        return _decode_message(line)
    except _LineError as err:
        raise ValueError(err.reason) from None


def _decode_message(line: bytes | str) -> RecordedMessage:
    obj = _parse_object(line, "a message")
    offset = _require(obj, "t", "message")
    if isinstance(offset, bool) or not isinstance(offset, int | float):
        raise _LineError(f'"t" must be a number of seconds, not {_json_type(offset)}')
    if not math.isfinite(offset) or offset < 0:
        raise _LineError(f'"t" must be a finite number >= 0, not {offset!r}')
    topic = _check_topic(_require(obj, "topic", "message"))
    qos = _require(obj, "qos", "message")
    if isinstance(qos, bool) or not isinstance(qos, int) or qos not in (0, 1, 2):
        raise _LineError(f'"qos" must be 0, 1 or 2, not {qos!r}')
    retain = _require(obj, "retain", "message")
    if not isinstance(retain, bool):
        raise _LineError(f'"retain" must be true or false, not {retain!r}')
    return RecordedMessage(float(offset), topic, _check_payload(obj), qos, retain)


def _decode_header(line: bytes) -> Header:
    obj = _parse_object(line, "the header")
    if obj.get("format") != FORMAT:
        if "topic" in obj or "payload" in obj:
            raise _LineError(
                f'missing header: the first line is a message, not {{"format": "{FORMAT}", ...}}'
            )
        raise _LineError(f'missing header: the first line must be {{"format": "{FORMAT}", ...}}')
    version = _require(obj, "version", "the header")
    match = _VERSION_RE.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise _LineError(f'header "version" must be a "MAJOR.MINOR" string, not {version!r}')
    major = int(match.group(1))
    if major > SUPPORTED_MAJOR:
        raise _LineError(
            f"recording format version {version} is newer than this iotpipe can read "
            f"({SUPPORTED_MAJOR}.x); upgrade iotpipe"
        )
    if major < SUPPORTED_MAJOR:
        raise _LineError(
            f"unknown recording format version {version} (expected {SUPPORTED_MAJOR}.x)"
        )
    created: datetime | None = None
    if "created" in obj:
        raw = obj["created"]
        try:
            created = datetime.fromisoformat(raw) if isinstance(raw, str) else None
        except ValueError:
            created = None
        if created is None or created.tzinfo is None:
            raise _LineError(f'header "created" must be an RFC 3339 time with offset, not {raw!r}')
    source = obj.get("source")
    if source is not None and not isinstance(source, str):
        raise _LineError(f'header "source" must be a string, not {_json_type(source)}')
    filters = obj.get("filters", [])
    if not isinstance(filters, list) or not all(isinstance(f, str) for f in filters):
        raise _LineError('header "filters" must be an array of strings')
    known = {"format", "version", "created", "source", "filters"}
    extra = {k: v for k, v in obj.items() if k not in known}
    return Header(created, source, tuple(filters), version, extra)


# -- files ------------------------------------------------------------------------------------


class RecordingWriter(Closing):
    """Write a recording file, one flushed line per message.

    Use it as a context manager, or call :meth:`close`. The header is written (and flushed) on
    opening, so even a recording that never received a message is a valid, empty one.

    Args:
        path: the file to create.
        header: its header (defaults: created now, no source, no filters).
        overwrite: replace an existing file instead of refusing.

    Raises:
        RecordingError: the file exists (and ``overwrite`` is false) or cannot be written.
    """

    def __init__(
        self, path: str | Path, header: Header | None = None, *, overwrite: bool = False
    ) -> None:
        self.path = Path(path)
        self.header = header if header is not None else Header(created=datetime.now(UTC))
        self.messages = 0
        self.payload_bytes = 0
        self._last_offset = 0.0
        try:
            self._file: IO[str] = self.path.open(
                "w" if overwrite else "x", encoding="utf-8", newline="\n"
            )
        except FileExistsError:
            raise RecordingError(
                str(self.path), 0, "already exists (refusing to overwrite it)"
            ) from None
        except OSError as err:
            raise RecordingError(
                str(self.path), 0, f"cannot write it ({err.strerror or err})"
            ) from None
        self._write_line(encode_header(self.header))

    def _write_line(self, line: str) -> None:
        try:
            self._file.write(line + "\n")
            # One flush per line: a killed recorder loses at most the line being written. The
            # write syscall costs ~1 us, against ~100 us of MQTT client work per message.
            self._file.flush()
        except OSError as err:
            raise RecordingError(
                str(self.path), 0, f"cannot write it ({err.strerror or err})"
            ) from None

    def write(self, message: RecordedMessage) -> None:
        """Append one message.

        Raises:
            ValueError: its offset is earlier than the previous message's (offsets never decrease).
            RecordingError: the file cannot be written (disk full, ...).
        """
        if message.offset < self._last_offset:
            raise ValueError(f"offset {message.offset} is before the previous {self._last_offset}")
        self._write_line(encode_message(message))
        self._last_offset = message.offset
        self.messages += 1
        self.payload_bytes += len(message.payload)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._file.closed

    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        if not self._file.closed:
            self._file.close()


class RecordingReader(Closing):
    """Read and validate a recording, one message at a time.

    The header is read and checked on opening; messages are validated as they are iterated
    (the reader is single-pass). Every problem raises :class:`~iotpipe.errors.RecordingError`
    with the 1-based line number and the reason. Blank lines are skipped.

    Args:
        path: the recording file.
        allow_truncated: skip an incomplete last line (no final newline, not parseable) that a
            killed recorder can leave, recording its number in :attr:`truncated_line`; if false,
            such a line is an error like any other.

    Attributes:
        header: the file's header.
        truncated_line: the line number of a skipped incomplete last line, once iteration has
            reached the end; ``None`` if the file ended cleanly.

    Raises:
        RecordingError: the file is missing or unreadable, or its header is missing or invalid.
    """

    def __init__(self, path: str | Path, *, allow_truncated: bool = True) -> None:
        self.path = Path(path)
        self.allow_truncated = allow_truncated
        self.truncated_line: int | None = None
        self._line = 0
        self._last_offset = 0.0
        self._iterated = False
        try:
            self._file: IO[bytes] = self.path.open("rb")
        except FileNotFoundError:
            raise self._error(0, "no such file") from None
        except IsADirectoryError:
            raise self._error(0, "is a directory, not a recording file") from None
        except OSError as err:
            raise self._error(0, f"cannot read it ({err.strerror or err})") from None
        try:
            self.header = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _error(self, line: int, reason: str) -> RecordingError:
        return RecordingError(str(self.path), line, reason)

    def _next_line(self) -> tuple[bytes, bool] | None:
        """The next non-blank line and whether it ended with a newline; None at end of file.

        Only the file's last line can lack the newline (``readline`` stops at end of file).
        """
        while True:
            try:
                raw = self._file.readline()
            except OSError as err:
                raise self._error(
                    self._line + 1, f"cannot read it ({err.strerror or err})"
                ) from None
            if not raw:
                return None
            self._line += 1
            if raw.strip():
                return raw, raw.endswith(b"\n")

    def _read_header(self) -> Header:
        first = self._next_line()
        if first is None:
            raise self._error(0, "empty file (expected a recording header line)")
        raw, complete = first
        try:
            return _decode_header(raw)
        except _LineError as err:
            reason = err.reason if complete else f"{err.reason} (the header line is incomplete)"
            raise self._error(self._line, reason) from None

    def __iter__(self) -> Iterator[RecordedMessage]:
        if self._iterated:
            raise RuntimeError("a RecordingReader can be iterated only once; open the file again")
        self._iterated = True
        return self._messages()

    def _messages(self) -> Iterator[RecordedMessage]:
        try:
            while (entry := self._next_line()) is not None:
                raw, complete = entry
                try:
                    message = _decode_message(raw)
                except _LineError as err:
                    if complete or not err.syntax:
                        raise self._error(self._line, err.reason) from None
                    if not self.allow_truncated:
                        raise self._error(
                            self._line,
                            f"incomplete last line, {err.reason} "
                            "(was the recorder killed while writing it?)",
                        ) from None
                    self.truncated_line = self._line
                    return
                if message.offset < self._last_offset:
                    raise self._error(
                        self._line,
                        f'"t" goes backwards ({message.offset:g} after {self._last_offset:g})',
                    )
                self._last_offset = message.offset
                yield message
        finally:
            self.close()

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()


class Recorder:
    """Writes each received message to a recording, up to an optional count.

    Pass :meth:`on_message` as the MQTT client's message handler. Offsets come from ``clock``
    (monotonic seconds) relative to the first message.

    Attributes:
        writer: the open recording.
        count: stop accepting messages after this many (``None``: no limit).
    """

    def __init__(
        self,
        writer: RecordingWriter,
        *,
        count: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.writer = writer
        self.count = count
        self._clock = clock
        self._first: float | None = None

    @property
    def full(self) -> bool:
        """Whether ``count`` messages have been recorded."""
        return self.count is not None and self.writer.messages >= self.count

    def on_message(self, message: Message) -> None:
        """Record one message (ignored once the recording is full)."""
        if self.full:
            return
        now = self._clock()
        if self._first is None:
            self._first = now
        self.writer.write(
            RecordedMessage(
                now - self._first, message.topic, message.payload, message.qos, message.retain
            )
        )


def read_recording(
    path: str | Path, *, allow_truncated: bool = True
) -> tuple[Header, list[RecordedMessage]]:
    """Read a whole recording into memory (see :class:`RecordingReader` for the rules).

    Raises:
        RecordingError: the file is missing, unreadable or malformed.
    """
    with RecordingReader(path, allow_truncated=allow_truncated) as reader:
        return reader.header, list(reader)


def write_recording(
    path: str | Path,
    messages: Iterable[RecordedMessage],
    header: Header | None = None,
    *,
    overwrite: bool = False,
) -> int:
    """Write a whole recording; returns the number of messages written.

    Raises:
        RecordingError: the file exists (and ``overwrite`` is false) or cannot be written.
        ValueError: the messages' offsets decrease.
    """
    with RecordingWriter(path, header, overwrite=overwrite) as writer:
        for message in messages:
            writer.write(message)
        return writer.messages
