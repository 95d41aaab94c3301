"""Progress while the simulator runs: a live rich panel on a terminal, log lines elsewhere.

Both go to stderr, so ``--json`` output on stdout stays machine-readable.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Protocol, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table


@dataclass(frozen=True)
class Snapshot:
    """Where a running simulation stands (what the progress view shows).

    Attributes:
        elapsed: seconds since the first telemetry message.
        messages: envelopes generated (distinct ids).
        target: how many envelopes the run will generate, or None if unbounded.
        published: telemetry publishes, duplicates and resends included.
        acknowledged: publishes (telemetry and status) the broker acknowledged.
        inflight: publishes not acknowledged yet.
        held: messages held back by the offline or reorder faults.
        faults: faults injected so far, by kind.
        behind: seconds the paced schedule is running late (0 when on time or unpaced).
        reconnects: connections re-established.
        unconfirmed: envelopes no receipt covered yet (None: receipts off).
        latency_p50: median seconds from publish to receipt (None: receipts off).
        latency_p99: 99th percentile of the same.
    """

    elapsed: float
    messages: int
    target: int | None
    published: int
    acknowledged: int
    inflight: int
    held: int
    faults: dict[str, int]
    behind: float
    reconnects: int
    unconfirmed: int | None = None
    latency_p50: float | None = None
    latency_p99: float | None = None


class Progress(Protocol):
    """Receives snapshots while the simulation runs (see ``simulator.progress``)."""

    interval: float

    def update(self, snapshot: Snapshot) -> None:
        """Show the latest snapshot."""

    def close(self) -> None:
        """The run is over: stop refreshing."""


def _faults_text(faults: dict[str, int]) -> str:
    return ",".join(f"{kind}:{count}" for kind, count in sorted(faults.items())) or "none"


def _receipts_text(s: Snapshot) -> str:
    if s.unconfirmed is None:
        return ""
    return (
        f" unconfirmed={s.unconfirmed} receipt_p50={s.latency_p50 or 0:.3f}s"
        f" receipt_p99={s.latency_p99 or 0:.3f}s"
    )


class _Rate:
    """Publishes per second between two consecutive snapshots."""

    def __init__(self) -> None:
        self._last: tuple[float, int] | None = None
        self.value = 0.0

    def update(self, snapshot: Snapshot) -> float:
        if self._last is not None and snapshot.elapsed > self._last[0]:
            elapsed, published = self._last
            self.value = (snapshot.published - published) / (snapshot.elapsed - elapsed)
        self._last = (snapshot.elapsed, snapshot.published)
        return self.value


class LogProgress:
    """One ``key=value`` line every ``interval`` seconds on a stream (stderr by default)."""

    def __init__(self, stream: TextIO | None = None, interval: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._rate = _Rate()

    def update(self, snapshot: Snapshot) -> None:
        """Write one progress line."""
        s = snapshot
        rate = self._rate.update(s)
        target = f"/{s.target}" if s.target is not None else ""
        print(
            f"{time.strftime('%Y-%m-%dT%H:%M:%S')} simulate elapsed={s.elapsed:.1f}s "
            f"messages={s.messages}{target} published={s.published} acked={s.acknowledged} "
            f"inflight={s.inflight} held={s.held} rate={rate:.0f}/s behind={s.behind:.2f}s "
            f"reconnects={s.reconnects} faults={_faults_text(s.faults)}{_receipts_text(s)}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        """Nothing to clean up."""


class LiveProgress:
    """A small live-updating table (rich) on a terminal."""

    def __init__(self, console: Console | None = None, interval: float = 0.25) -> None:
        self.console = console if console is not None else Console(stderr=True)
        self.interval = interval
        self._rate = _Rate()
        # Refreshed by update() from the simulation's own thread: no extra thread stealing CPU.
        self._live = Live(self._render(None), console=self.console, auto_refresh=False)
        self._live.start()

    def _render(self, snapshot: Snapshot | None) -> Table:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", justify="right")
        table.add_column()
        if snapshot is None:
            table.add_row("simulate", "connecting...")
            return table
        s = snapshot
        rate = self._rate.update(s)
        done = f" / {s.target}" if s.target is not None else ""
        table.add_row("elapsed", f"{s.elapsed:.1f} s")
        table.add_row("messages", f"{s.messages}{done}")
        table.add_row("published", f"{s.published}  ({rate:,.0f} msg/s)")
        table.add_row("acknowledged", f"{s.acknowledged}  (in flight {s.inflight})")
        table.add_row("held back", f"{s.held}")
        table.add_row("behind", f"{s.behind:.2f} s")
        table.add_row("reconnects", f"{s.reconnects}")
        table.add_row("faults", _faults_text(s.faults))
        if s.unconfirmed is not None:
            table.add_row(
                "unconfirmed",
                f"{s.unconfirmed}  (receipt latency p50 {s.latency_p50 or 0:.3f} s, "
                f"p99 {s.latency_p99 or 0:.3f} s)",
            )
        return table

    def update(self, snapshot: Snapshot) -> None:
        """Redraw with the latest snapshot."""
        self._live.update(self._render(snapshot), refresh=True)

    def close(self) -> None:
        """Leave the last view on screen."""
        self._live.stop()


class NoProgress:
    """Shows nothing."""

    interval = 3600.0

    def update(self, snapshot: Snapshot) -> None:
        """Ignore the snapshot."""
        del snapshot

    def close(self) -> None:
        """Nothing to clean up."""


def choose(enabled: bool, stream: TextIO | None = None, interval: float = 5.0) -> Progress:
    """A live view when ``stream`` (stderr) is a terminal, log lines otherwise, or nothing."""
    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return NoProgress()
    if stream.isatty():
        return LiveProgress(Console(file=stream))
    return LogProgress(stream, interval)
