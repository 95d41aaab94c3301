"""Progress views: a live panel on a terminal, plain log lines elsewhere, nothing when asked."""

from __future__ import annotations

import io

from rich.console import Console

from simulator import progress
from simulator.progress import LiveProgress, LogProgress, NoProgress, Snapshot


def snap(elapsed: float, published: int) -> Snapshot:
    """A snapshot with the given elapsed time and publishes, and one fault."""
    return Snapshot(
        elapsed=elapsed,
        messages=published,
        target=1000,
        published=published,
        acknowledged=published - 5,
        inflight=5,
        held=2,
        faults={"duplicate": 3},
        behind=0.25,
        reconnects=1,
    )


class FakeTty(io.StringIO):
    """A text stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


def test_choose_picks_by_terminal() -> None:
    """A terminal gets the live panel, a pipe gets log lines, --no-progress gets nothing."""
    assert isinstance(progress.choose(True, io.StringIO()), LogProgress)
    live = progress.choose(True, FakeTty())
    assert isinstance(live, LiveProgress)
    live.close()
    assert isinstance(progress.choose(False, FakeTty()), NoProgress)


def test_log_lines_are_key_value_with_a_rate() -> None:
    """Each update is one key=value line; the rate is publishes per second between updates."""
    out = io.StringIO()
    view = LogProgress(out, interval=1.0)
    view.update(snap(1.0, 100))
    view.update(snap(3.0, 500))
    first, second = out.getvalue().splitlines()
    assert "messages=100/1000 published=100 acked=95 inflight=5 held=2" in first
    assert "rate=200/s" in second
    assert "faults=duplicate:3" in second
    assert "reconnects=1" in second


def test_live_panel_shows_the_counters() -> None:
    """The live panel renders every counter the user asks about."""
    out = io.StringIO()
    view = LiveProgress(Console(file=out, force_terminal=True, width=80))
    view.update(snap(2.0, 700))
    view.close()
    text = out.getvalue()
    for expected in ("700 / 1000", "in flight 5", "0.25 s", "duplicate:3"):
        assert expected in text
