"""The fast path for RFC 3339 timestamps agrees with the full parser on every input."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from iotpipe import envelope as envelope_module
from tests.strategies import rfc3339_with_ms

FAST = envelope_module._rfc3339_to_ms
# Unwrapped: the full parser itself, with no cache in front of it.
FULL = envelope_module._parse_rfc3339.__wrapped__

BASES = [
    "2026-11-26T08:15:02.125Z",
    "2026-11-26T08:15:02Z",
    "1970-01-01T00:00:00.000Z",
    "1969-12-31T23:59:59.999Z",
    "9999-12-31T23:59:59.999Z",
    "2028-02-29T12:00:00Z",
    "2026-02-28T23:59:59.999Z",
]
# What a character of a timestamp might be replaced by: ASCII digits and the shape's own
# punctuation, near misses, and characters that str.isdigit() or int() accept beyond ASCII.
REPLACEMENTS = "0123456789-:.TtZz+ _/\x00\u0663\u00b2\uff15\u0966\u00e9"
EDGES = [
    f"{year}-{month}-{day}T{hour}:{minute}:{second}{fraction}Z"
    for year, month, day, hour, minute, second, fraction in itertools.product(
        ["0000", "1969", "1970", "2024", "2100", "9999"],
        ["00", "01", "02", "12", "13"],
        ["00", "01", "28", "29", "30", "31", "32"],
        ["00", "23", "24"],
        ["00", "59", "60"],
        ["00", "59", "60", "99"],
        ["", ".000", ".999", ".5", ".1234"],
    )
]


def outcome(parse: Callable[[str], int], text: str) -> tuple[str, object]:
    """What ``parse`` makes of ``text``: its value, or the type and message of its error."""
    try:
        return ("ok", parse(text))
    except Exception as err:  # any exception, so a difference in kind shows too
        return (type(err).__name__, str(err))


def variants() -> Iterator[str]:
    """Every base with each character replaced, deleted and doubled, then the edge cases."""
    for base in BASES:
        yield base
        for i in range(len(base)):
            for char in REPLACEMENTS:
                yield base[:i] + char + base[i + 1 :]
            yield base[:i] + base[i + 1 :]
            yield base[:i] + base[i] + base[i:]
        yield base.lower()
        yield base.replace("Z", "+00:00")
        yield base[:19] + ".12345Z"
        yield " " + base
        yield base + " "
    yield from EDGES
    yield from ["", "Z", "2026-11-26", "2026-11-26T08:15Z", "x" * 24, "x" * 20]


def test_the_fast_path_agrees_with_the_full_parser_on_a_large_set() -> None:
    """Valid and invalid strings, tens of thousands of them, give identical values or errors."""
    texts = list(dict.fromkeys(variants()))
    assert len(texts) > 10_000
    accepted = 0
    for text in texts:
        expected = outcome(FULL, text)
        assert outcome(FAST, text) == expected, text
        accepted += expected[0] == "ok"
    # The set exercises both sides: many accepted, many more refused.
    assert 1_000 < accepted < len(texts) - 1_000


@settings(max_examples=500, deadline=None)
@given(st.text("0123456789-:.TtZz+", min_size=18, max_size=26))
def test_the_fast_path_agrees_on_arbitrary_text_of_the_shape(text: str) -> None:
    """Strings of the timestamp's own characters give identical values or errors."""
    assert outcome(FAST, text) == outcome(FULL, text)


@settings(max_examples=300, deadline=None)
@given(rfc3339_with_ms())
def test_the_fast_path_reads_every_valid_timestamp(pair: tuple[str, int]) -> None:
    """Every valid RFC 3339 UTC string gives the epoch milliseconds it denotes."""
    text, expected = pair
    assert FAST(text) == FULL(text) == expected
