"""Receipts: the seq set, the receipt codec and the per-device batching book."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotpipe.receipts import (
    MAX_RANGES,
    BootReceipt,
    Receipt,
    ReceiptBook,
    SeqSet,
    decode_receipt,
    encode_receipt,
    nearest_rank,
    resend_timeout,
)

seq_ranges = st.lists(
    st.tuples(st.integers(0, 500), st.integers(0, 20)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=30,
)


@given(seq_ranges)
def test_seqset_is_the_set_of_its_ranges(ranges: list[tuple[int, int]]) -> None:
    """A SeqSet holds exactly the union of the ranges added, as disjoint non-adjacent ranges."""
    seqs = SeqSet(ranges)
    expected = {n for lo, hi in ranges for n in range(lo, hi + 1)}
    assert set(seqs) == expected
    assert len(seqs) == len(expected)
    assert all(n in seqs for n in expected)
    assert all(n not in seqs for n in range(0, 530) if n not in expected)
    pairs = seqs.ranges()
    assert all(lo <= hi for lo, hi in pairs)
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(pairs))


@given(seq_ranges, seq_ranges)
def test_seqset_union_is_order_independent(
    a: list[tuple[int, int]], b: list[tuple[int, int]]
) -> None:
    """Adding receipts in any order, or twice, gives the same set (idempotent, commutative)."""
    left, right = SeqSet(a), SeqSet(b)
    left.update(SeqSet(b))
    right.update(SeqSet(a))
    right.update(SeqSet(a))
    assert left == right


@given(seq_ranges, st.integers(0, 530))
def test_discard_through_forgets_the_prefix(ranges: list[tuple[int, int]], through: int) -> None:
    """discard_through keeps exactly the seqs above the cut."""
    seqs = SeqSet(ranges)
    before = set(seqs)
    seqs.discard_through(through)
    assert set(seqs) == {n for n in before if n > through}


def test_seqset_rejects_bad_ranges() -> None:
    """A range whose end is before its start, or a negative seq, is refused."""
    with pytest.raises(ValueError, match="bad range"):
        SeqSet([(5, 4)])
    with pytest.raises(ValueError, match="bad range"):
        SeqSet().add(-1)


receipts = st.builds(
    Receipt,
    site=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    device=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    ts=st.integers(0, 253402300799999),
    stored=st.lists(
        st.builds(
            BootReceipt,
            boot=st.one_of(st.none(), st.text(max_size=24)),
            ranges=seq_ranges.map(lambda r: tuple(SeqSet(r).ranges())),
            through=st.one_of(st.none(), st.integers(0, 2**40)),
        ),
        min_size=1,
        max_size=4,
    ).map(tuple),
    v=st.just("1.1"),  # builds() would fill a NamedTuple's defaulted field with any string
)


@given(receipts)
def test_encode_then_decode_is_identity(receipt: Receipt) -> None:
    """Every receipt the encoder writes decodes to the same receipt."""
    assert decode_receipt(encode_receipt(receipt)) == receipt


@given(st.binary(max_size=300))
def test_decode_never_raises(payload: bytes) -> None:
    """Any bytes give a receipt or a one-line error, never an exception."""
    result = decode_receipt(payload)
    assert isinstance(result, Receipt | str)


def test_decode_accepts_unsorted_overlapping_ranges_and_unknown_fields() -> None:
    """Readers treat ranges as a set and ignore fields they do not know."""
    payload = json.dumps(
        {
            "v": "1.7",
            "site": "s",
            "device": "d",
            "ts": 5,
            "new": {"x": 1},
            "stored": [{"boot": "b", "ranges": [[9, 12], [1, 3], [2, 5]], "later": True}],
        }
    )
    receipt = decode_receipt(payload)
    assert isinstance(receipt, Receipt)
    assert receipt.stored[0].ranges == ((1, 5), (9, 12))
    assert receipt.covers("b", 4)
    assert not receipt.covers("b", 7)
    assert not receipt.covers("other", 4)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"v": 1.1}, "v: must be"),
        ({"v": "2.0"}, "v: must be"),
        ({"v": "1.1", "site": "s", "device": "d", "ts": -1}, "ts:"),
        ({"v": "1.1", "site": "s", "device": "d", "ts": 1, "stored": []}, "stored:"),
        (
            {"v": "1.1", "site": "s", "device": "d", "ts": 1, "stored": [{"ranges": [[3, 2]]}]},
            "stored[0].ranges[0]",
        ),
        (
            {"v": "1.1", "site": "s", "device": "d", "ts": 1, "stored": [{"through": True}]},
            "stored[0].through",
        ),
    ],
)
def test_decode_names_what_is_wrong(body: dict[str, object], error: str) -> None:
    """A malformed receipt is described, field first."""
    result = decode_receipt(json.dumps(body))
    assert isinstance(result, str)
    assert result.startswith(error)


def test_through_covers_the_prefix() -> None:
    """An entry's through covers every seq from 0 to it."""
    entry = BootReceipt(boot="b", ranges=((10, 12),), through=4)
    assert [n for n in range(15) if entry.covers(n)] == [0, 1, 2, 3, 4, 10, 11, 12]


def test_book_sends_at_once_then_at_most_once_per_interval() -> None:
    """The first stored envelopes of a device are receipted at once, later ones batched per interval."""
    book = ReceiptBook(interval=1.0)
    book.record("s", "d", "b", 0)
    first = book.due(now=100.0, ts_ms=1)
    assert [r.stored for r in first] == [(BootReceipt("b", ((0, 0),)),)]
    for seq in range(1, 50):
        book.record("s", "d", "b", seq)
    book.record("s", "d", "b", 10)  # a duplicate the device resent
    assert book.due(now=100.5, ts_ms=2) == []
    later = book.due(now=101.0, ts_ms=3)
    assert [r.stored for r in later] == [(BootReceipt("b", ((1, 49),)),)]
    assert book.due(now=105.0, ts_ms=4) == []
    assert len(book) == 0


def test_book_keeps_devices_and_boots_apart() -> None:
    """Each device gets its own receipt, with one entry per boot."""
    book = ReceiptBook()
    book.record("s", "a", "b1", 7)
    book.record("s", "a", "b2", 0)
    book.record("s", "b", None, 3)
    got = {(r.site, r.device): r for r in book.due(now=0.0, ts_ms=9)}
    assert got["s", "a"].covers("b1", 7)
    assert got["s", "a"].covers("b2", 0)
    assert got["s", "b"].covers(None, 3)
    assert decode_receipt(encode_receipt(got["s", "b"])) == got["s", "b"]


def test_book_bounds_ranges_to_the_newest() -> None:
    """A device with more gaps than a receipt holds gets its newest ranges."""
    book = ReceiptBook()
    for seq in range(0, 4 * MAX_RANGES, 2):
        book.record("s", "d", "b", seq)
    (receipt,) = book.due(now=0.0, ts_ms=0, flush=True)
    ranges = receipt.stored[0].ranges
    assert len(ranges) == MAX_RANGES
    assert ranges[-1] == (4 * MAX_RANGES - 2, 4 * MAX_RANGES - 2)


def test_resend_timeout_is_four_p99_within_bounds() -> None:
    """Producers wait 4 x the observed p99 receipt latency, never below the minimum or above the maximum."""
    assert resend_timeout(None, 5.0, 300.0) == 5.0
    assert resend_timeout(0.2, 5.0, 300.0) == 5.0
    assert resend_timeout(3.0, 5.0, 300.0) == 12.0
    assert resend_timeout(500.0, 5.0, 300.0) == 300.0


def test_nearest_rank_picks_the_rank_not_an_interpolation() -> None:
    """The quantile is an element of the sequence, the ceil(q*n)-th smallest."""
    values = list(range(1, 101))
    assert nearest_rank(values, 0.5) == 50
    assert nearest_rank(values, 0.99) == 99
    assert nearest_rank([7], 0.99) == 7


def test_book_record_range_is_every_seq_of_the_range() -> None:
    """Recording a range gives the same receipt as recording each of its seqs."""
    one, many = ReceiptBook(), ReceiptBook()
    one.record_range("s", "d", "b", 3, 9)
    for seq in range(3, 10):
        many.record("s", "d", "b", seq)
    assert one.due(now=0.0, ts_ms=1) == many.due(now=0.0, ts_ms=1)
