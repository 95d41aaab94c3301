"""The recording format: byte-exact round trips, clear errors with line numbers, compatibility."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotpipe.errors import RecordingError
from iotpipe.recording import (
    FORMAT,
    VERSION,
    Header,
    RecordedMessage,
    RecordingReader,
    RecordingWriter,
    decode_message,
    encode_message,
    read_recording,
    write_recording,
)

HEADER = json.dumps({"format": FORMAT, "version": VERSION, "filters": ["a/#"]})

# A topic name as MQTT allows it to be published: valid Unicode, no wildcards, no NUL.
topics = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="+#\x00"), min_size=1, max_size=40
)
messages = st.builds(
    RecordedMessage,
    offset=st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
    topic=topics,
    payload=st.binary(max_size=300),
    qos=st.sampled_from([0, 1, 2]),
    retain=st.booleans(),
)


def write_lines(path: Path, *lines: str, end: str = "\n") -> Path:
    """Write raw lines (the last one followed by ``end``)."""
    path.write_text("\n".join(lines) + end, encoding="utf-8")
    return path


def message_line(**fields: object) -> str:
    """One message line with valid defaults, overridden or removed (value ``...``) by ``fields``."""
    obj: dict[str, object] = {"t": 0.5, "topic": "a/b", "qos": 1, "retain": False, "payload": "x"}
    obj.update(fields)
    return json.dumps({k: v for k, v in obj.items() if v is not ...})


def read_error(path: Path, **kwargs: bool) -> RecordingError:
    """The RecordingError that reading ``path`` raises."""
    with pytest.raises(RecordingError) as info:
        read_recording(path, **kwargs)
    return info.value


# -- round trips ------------------------------------------------------------------------------


@given(messages)
def test_any_message_round_trips_through_one_line(message: RecordedMessage) -> None:
    """Encoding then decoding a line gives back the same topic, bytes, QoS, retain and offset."""
    line = encode_message(message)
    assert "\n" not in line
    assert "\r" not in line
    decoded = decode_message(line.encode("utf-8"))
    assert decoded == RecordedMessage(
        round(message.offset, 6), message.topic, message.payload, message.qos, message.retain
    )


@given(st.lists(messages, max_size=20))
def test_any_recording_round_trips_through_a_file(batch: list[RecordedMessage]) -> None:
    """write_recording then read_recording returns every message, in order, byte for byte."""
    ordered = sorted(batch, key=lambda m: m.offset)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.jsonl"
        assert write_recording(path, ordered) == len(ordered)
        _header, back = read_recording(path, allow_truncated=False)
    assert [(m.topic, m.payload, m.qos, m.retain) for m in back] == [
        (m.topic, m.payload, m.qos, m.retain) for m in ordered
    ]
    assert [m.offset for m in back] == [round(m.offset, 6) for m in ordered]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00",
        b"a\x00b\r\n\t\x1b",
        "\u2028\u2029\x85\ufeff".encode(),  # line separators that naive splitting would cut at
        "😀 °C".encode(),
        b"\xed\xa0\x80",  # an encoded lone surrogate: not valid UTF-8
        b"\xff\xfe\x00\x01",
        bytes(range(256)),
    ],
)
def test_tricky_payloads_are_byte_exact(tmp_path: Path, payload: bytes) -> None:
    """Control characters, Unicode line separators and invalid UTF-8 all come back unchanged."""
    path = tmp_path / "r.jsonl"
    write_recording(path, [RecordedMessage(0.0, "t", payload), RecordedMessage(1.0, "t", b"next")])
    _header, back = read_recording(path, allow_truncated=False)
    assert [m.payload for m in back] == [payload, b"next"]


def test_utf8_payload_is_text_and_binary_is_base64() -> None:
    """Valid UTF-8 payloads are stored as readable text; anything else as flagged base64."""
    text = json.loads(encode_message(RecordedMessage(0.0, "t", '{"v": "1.0", "x": "é"}'.encode())))
    assert text["payload"] == '{"v": "1.0", "x": "é"}'
    assert "encoding" not in text
    binary = json.loads(encode_message(RecordedMessage(0.0, "t", b"\xff\x00")))
    assert binary["payload"] == "/wA="
    assert binary["encoding"] == "base64"


def test_offsets_are_floats_with_microsecond_precision() -> None:
    """``t`` is written as a float rounded to the microsecond, even for a whole second."""
    assert json.loads(encode_message(RecordedMessage(0, "t", b"")))["t"] == 0.0
    assert isinstance(json.loads(encode_message(RecordedMessage(0, "t", b"")))["t"], float)
    assert json.loads(encode_message(RecordedMessage(1.23456789, "t", b"")))["t"] == 1.234568


def test_header_round_trips(tmp_path: Path) -> None:
    """Creation time, source, filters and version survive writing and reading."""
    created = datetime(2026, 11, 26, 8, 15, 2, 125000, tzinfo=UTC)
    header = Header(created, "mqtt://127.0.0.1:1883", ("iotpipe/#", "x/+"))
    path = tmp_path / "r.jsonl"
    write_recording(path, [], header)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["format"] == FORMAT
    assert first["created"] == "2026-11-26T08:15:02.125Z"
    back, msgs = read_recording(path)
    assert (back.created, back.source, back.filters, back.version) == (
        created,
        "mqtt://127.0.0.1:1883",
        ("iotpipe/#", "x/+"),
        VERSION,
    )
    assert msgs == []


# -- writer -----------------------------------------------------------------------------------


def test_every_line_is_flushed_so_a_killed_writer_leaves_a_valid_file(tmp_path: Path) -> None:
    """Lines written so far can be read back while the writer is still open (never closed)."""
    path = tmp_path / "r.jsonl"
    writer = RecordingWriter(path)
    for i in range(3):
        writer.write(RecordedMessage(i / 10, "t", bytes([i])))
    _header, back = read_recording(path, allow_truncated=False)
    assert [m.payload for m in back] == [b"\x00", b"\x01", b"\x02"]
    writer.close()


def test_writer_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    """An existing file is an error naming it; overwrite=True replaces it."""
    path = tmp_path / "r.jsonl"
    path.write_text("precious\n")
    with pytest.raises(RecordingError, match="already exists"):
        RecordingWriter(path)
    assert path.read_text() == "precious\n"
    write_recording(path, [RecordedMessage(0, "t", b"new")], overwrite=True)
    assert [m.payload for m in read_recording(path)[1]] == [b"new"]


def test_writer_rejects_offsets_going_backwards(tmp_path: Path) -> None:
    """Offsets never decrease: a message earlier than the previous one is refused."""
    with RecordingWriter(tmp_path / "r.jsonl") as writer:
        writer.write(RecordedMessage(1.0, "t", b""))
        with pytest.raises(ValueError, match="before the previous"):
            writer.write(RecordedMessage(0.5, "t", b""))


def test_unwritable_path_is_a_recording_error(tmp_path: Path) -> None:
    """A file in a missing directory cannot be created: RecordingError with the reason."""
    with pytest.raises(RecordingError, match="cannot write it"):
        RecordingWriter(tmp_path / "missing" / "r.jsonl")


# -- compatibility ----------------------------------------------------------------------------


def test_unknown_fields_are_accepted_and_header_extras_kept(tmp_path: Path) -> None:
    """A newer minor version's extra header and message fields are ignored by this reader."""
    header = json.dumps({"format": FORMAT, "version": "1.7", "host_os": "linux", "filters": []})
    path = write_lines(tmp_path / "r.jsonl", header, message_line(props={"user": "x"}, dup=True))
    back, msgs = read_recording(path)
    assert back.version == "1.7"
    assert back.extra == {"host_os": "linux"}
    assert msgs == [RecordedMessage(0.5, "a/b", b"x", 1, False)]


def test_header_needs_only_format_and_version(tmp_path: Path) -> None:
    """created, source and filters are optional for readers."""
    path = write_lines(tmp_path / "r.jsonl", json.dumps({"format": FORMAT, "version": "1.0"}))
    back, msgs = read_recording(path)
    assert (back.created, back.source, back.filters, msgs) == (None, None, (), [])


def test_newer_major_version_is_refused_clearly(tmp_path: Path) -> None:
    """A 2.x recording is rejected on line 1 with advice to upgrade."""
    path = write_lines(tmp_path / "r.jsonl", json.dumps({"format": FORMAT, "version": "2.0"}))
    err = read_error(path)
    assert err.line == 1
    assert "version 2.0 is newer" in err.reason
    assert "upgrade iotpipe" in err.reason


@pytest.mark.parametrize("version", [1, "1", "one", "0.9", None])
def test_malformed_or_unknown_version_is_refused(tmp_path: Path, version: object) -> None:
    """A version that is not a known "MAJOR.MINOR" string is an error on line 1."""
    path = write_lines(tmp_path / "r.jsonl", json.dumps({"format": FORMAT, "version": version}))
    err = read_error(path)
    assert err.line == 1
    assert "version" in err.reason


# -- errors -----------------------------------------------------------------------------------


def test_missing_file_is_a_recording_error(tmp_path: Path) -> None:
    """A file that does not exist: RecordingError naming it, for the whole file (line 0)."""
    err = read_error(tmp_path / "nope.jsonl")
    assert (err.line, err.reason) == (0, "no such file")
    assert str(err) == f"{tmp_path / 'nope.jsonl'}: no such file"


def test_directory_is_a_recording_error(tmp_path: Path) -> None:
    """A directory instead of a file: RecordingError saying so."""
    assert "is a directory" in read_error(tmp_path).reason


def test_empty_file_is_refused(tmp_path: Path) -> None:
    """An empty file has no header: the error says so."""
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"")
    assert "empty file" in read_error(path).reason


def test_message_without_header_is_refused(tmp_path: Path) -> None:
    """A file that starts with a message line reports the missing header on line 1."""
    err = read_error(write_lines(tmp_path / "r.jsonl", message_line()))
    assert err.line == 1
    assert "missing header" in err.reason
    assert "is a message" in err.reason


def test_other_json_lines_are_not_a_recording(tmp_path: Path) -> None:
    """A JSON Lines file of another kind is refused as having no recording header."""
    err = read_error(write_lines(tmp_path / "r.jsonl", '{"hello": "world"}'))
    assert (err.line, err.reason.startswith("missing header")) == (1, True)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "must be a JSON object, not an array"),
        ('{"t": NaN, "topic": "a", "qos": 1, "retain": false, "payload": ""}', "not JSON"),
        (message_line(t=...), 'no "t" field'),
        (message_line(topic=...), 'no "topic" field'),
        (message_line(qos=...), 'no "qos" field'),
        (message_line(retain=...), 'no "retain" field'),
        (message_line(payload=...), 'no "payload" field'),
        (message_line(t="0.5"), '"t" must be a number'),
        (message_line(t=-1), '"t" must be a finite number >= 0'),
        (message_line(t=True), '"t" must be a number'),
        (message_line(topic=""), '"topic" is empty'),
        (message_line(topic="a/+/b"), "wildcard"),
        (message_line(topic=7), '"topic" must be a string'),
        (message_line(qos=3), '"qos" must be 0, 1 or 2'),
        (message_line(qos=1.0), '"qos" must be 0, 1 or 2'),
        (message_line(qos=True), '"qos" must be 0, 1 or 2'),
        (message_line(retain=1), '"retain" must be true or false'),
        (message_line(payload=None), '"payload" must be a string'),
        (message_line(payload="!!!", encoding="base64"), "not valid base64"),
        (message_line(payload="QQ", encoding="base64"), "not valid base64"),
        (message_line(encoding="hex"), "unknown payload \"encoding\" 'hex'"),
        (
            '{"t": 0, "topic": "a", "qos": 1, "retain": false, "payload": "\\ud800"}',
            "lone surrogate",
        ),
        (
            '{"t": 0, "topic": "\\udfff", "qos": 1, "retain": false, "payload": ""}',
            "lone surrogate",
        ),
    ],
)
def test_bad_message_line_names_line_and_reason(tmp_path: Path, line: str, reason: str) -> None:
    """A malformed message on line 3 raises RecordingError with line 3 and a precise reason."""
    path = write_lines(tmp_path / "r.jsonl", HEADER, message_line(), line, message_line(t=9))
    err = read_error(path)
    assert err.line == 3
    assert reason in err.reason
    assert str(err).startswith(f"{path}:3: ")


def test_non_utf8_line_is_refused(tmp_path: Path) -> None:
    """Raw bytes that are not UTF-8 (in a complete line) are an error with the line number."""
    path = tmp_path / "r.jsonl"
    path.write_bytes(HEADER.encode() + b'\n{"t": 0, "\xff": 1}\n')
    err = read_error(path)
    assert (err.line, "not UTF-8" in err.reason) == (2, True)


def test_offsets_going_backwards_are_refused(tmp_path: Path) -> None:
    """Offsets must never decrease; the error names the line and both values."""
    path = write_lines(tmp_path / "r.jsonl", HEADER, message_line(t=2.0), message_line(t=1.5))
    err = read_error(path)
    assert err.line == 3
    assert "goes backwards (1.5 after 2)" in err.reason


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    """Blank lines are ignored, and later errors still report the physical line number."""
    path = write_lines(tmp_path / "r.jsonl", HEADER, "", message_line(), "   ", "oops")
    err = read_error(path)
    assert err.line == 5


def test_reader_is_single_pass(tmp_path: Path) -> None:
    """Iterating a reader twice is a programming error, reported as such."""
    path = write_lines(tmp_path / "r.jsonl", HEADER, message_line())
    with RecordingReader(path) as reader:
        assert len(list(reader)) == 1
        with pytest.raises(RuntimeError, match="only once"):
            iter(reader)


# -- a killed recorder ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cut", [b'{"t": 0.7, "topic": "a/b", "qo', b'{"t": 0.7, "topic": "a/b", "payload": "\xc3']
)
def test_incomplete_last_line_is_skipped_and_reported(tmp_path: Path, cut: bytes) -> None:
    """A cut-off last line (no newline, not JSON) is ignored and its number reported."""
    path = tmp_path / "r.jsonl"
    path.write_bytes((HEADER + "\n" + message_line() + "\n").encode() + cut)
    with RecordingReader(path) as reader:
        assert [m.payload for m in reader] == [b"x"]
        assert reader.truncated_line == 3


def test_incomplete_last_line_is_an_error_when_strict(tmp_path: Path) -> None:
    """With allow_truncated=False the cut-off last line is an error that says what happened."""
    path = write_lines(tmp_path / "r.jsonl", HEADER, message_line(), '{"t": 0.7, "top', end="")
    err = read_error(path, allow_truncated=False)
    assert err.line == 3
    assert "incomplete last line" in err.reason


def test_complete_last_line_without_newline_is_fine(tmp_path: Path) -> None:
    """A valid last line that merely lacks the final newline is read normally."""
    path = write_lines(tmp_path / "r.jsonl", HEADER, message_line(), end="")
    with RecordingReader(path, allow_truncated=False) as reader:
        assert len(list(reader)) == 1
        assert reader.truncated_line is None


def test_invalid_last_line_without_newline_is_still_an_error(tmp_path: Path) -> None:
    """Only unparseable cut-offs count as truncation; a complete but invalid last line is an error."""
    path = write_lines(tmp_path / "r.jsonl", HEADER, message_line(qos=5), end="")
    err = read_error(path)
    assert (err.line, '"qos"' in err.reason) == (2, True)


def test_bad_line_before_the_end_is_never_treated_as_truncation(tmp_path: Path) -> None:
    """A cut-off line followed by more lines is damage, not a killed recorder: an error."""
    path = write_lines(tmp_path / "r.jsonl", HEADER, '{"t": 0.7, "top', message_line())
    assert read_error(path).line == 2


def test_incomplete_header_is_an_error(tmp_path: Path) -> None:
    """A file whose only line is a cut-off header is not a recording at all."""
    path = write_lines(tmp_path / "r.jsonl", HEADER[:20], end="")
    err = read_error(path)
    assert err.line == 1
    assert "header line is incomplete" in err.reason
