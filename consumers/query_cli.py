"""``iotpipe export`` and ``iotpipe stats``: read a store file without disturbing its consumer.

Mounted by :mod:`iotpipe.cli` as single commands. Both open the file read-only
(:mod:`consumers.query`); a mistake (bad URL, missing file, bad time) raises
:class:`~iotpipe.errors.ConfigError`, which the root command prints as one line (exit 2).
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from consumers.query import DeviceStats, ExportRow, StoreStats, iter_readings, store_stats
from consumers.settings import DEFAULT_STATE_PATH, InfluxTarget, store_path
from consumers.store import Value
from iotpipe.errors import ConfigError
from iotpipe.settings import DEFAULT_STORE_URL
from iotpipe.timeparse import TIME_FORMS, parse_time

__all__ = ["ExportFormat", "export", "stats"]

_CSV_HEADER = ("id", "site", "device", "sensor", "ts", "value", "unit", "tags")


class ExportFormat(StrEnum):
    """Output formats of ``iotpipe export``."""

    JSONL = "jsonl"
    CSV = "csv"


# -- export -----------------------------------------------------------------------------------


def _csv_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def write_jsonl(rows: Iterable[ExportRow], out: TextIO) -> int:
    """Write one compact JSON object per reading; return how many."""
    count = 0
    for row in rows:
        out.write(json.dumps(row.as_dict(), separators=(",", ":"), ensure_ascii=False) + "\n")
        count += 1
    return count


def write_csv(rows: Iterable[ExportRow], out: TextIO) -> int:
    """Write a header and one line per reading (tags as JSON); return how many."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_CSV_HEADER)
    count = 0
    for row in rows:
        tags = json.dumps(row.tags, separators=(",", ":"), ensure_ascii=False) if row.tags else ""
        unit = row.unit or ""
        writer.writerow(
            (row.id, row.site, row.device, row.sensor, row.ts, _csv_value(row.value), unit, tags)
        )
        count += 1
    return count


_WRITERS: dict[ExportFormat, Callable[[Iterable[ExportRow], TextIO], int]] = {
    ExportFormat.JSONL: write_jsonl,
    ExportFormat.CSV: write_csv,
}


def _open_output(path: Path) -> TextIO:
    """Open ``--output`` for writing, or say in one line why not."""
    try:
        return path.open("w", encoding="utf-8", newline="")
    except OSError as err:
        raise ConfigError("--output", path, f"cannot write it: {err.strerror}") from None


def _influx_not_exportable(store: str) -> ConfigError:
    return ConfigError(
        "--store",
        store,
        "export reads SQLite stores; read InfluxDB data with InfluxDB's own tools "
        "(influx query / the UI's CSV export; see docs/store.md)",
    )


_EXPORT_EXAMPLES = """

[bold]Examples[/bold]

  [dim]# everything, as JSON lines on stdout[/dim]
  iotpipe export --store sqlite:///state/telemetry.db

  [dim]# one device's last day, as CSV into a file[/dim]
  iotpipe export --store state/telemetry.db --device pi-kitchen \\
      --since -1d --format csv --output kitchen.csv

  [dim]# one sensor over a fixed window (until is exclusive)[/dim]
  iotpipe export --store state/telemetry.db --sensor temperature \\
      --since 2026-11-26T00:00:00Z --until 2026-11-27T00:00:00Z

  [dim]# the shared PostgreSQL store (password in PGPASSWORD or ~/.pgpass)[/dim]
  iotpipe export --store postgresql://iotpipe@db:5432/iotpipe --since -1h
"""


def export(
    *,
    store: Annotated[
        str,
        typer.Option(
            "--store",
            help="SQLite store (sqlite:///relative.db, sqlite:////abs.db or a file path) "
            "or PostgreSQL store (postgresql://user@host:5432/db).",
            show_default=False,
        ),
    ],
    site: Annotated[
        str | None, typer.Option("--site", help="Only this site.", show_default=False)
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="Only this device.", show_default=False)
    ] = None,
    sensor: Annotated[
        str | None, typer.Option("--sensor", help="Only this sensor.", show_default=False)
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help=f"Readings at or after: {TIME_FORMS}.", show_default=False),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(
            "--until", help="Readings before (same forms as --since).", show_default=False
        ),
    ] = None,
    output_format: Annotated[
        ExportFormat,
        typer.Option("--format", "-f", help="jsonl (one JSON object per line) or csv."),
    ] = ExportFormat.JSONL,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="File to write (replaced if it exists). \\[default: stdout]",
            show_default=False,
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Export stored readings as JSON lines or CSV, ordered by site, device, sensor and time.

    Reads the store read-only: safe while iotpipe consume is writing it.
    Each line has id, site, device, sensor, ts (RFC 3339 UTC), value, unit and tags.
    """
    location = store_path(store)
    if isinstance(location, InfluxTarget):
        raise _influx_not_exportable(store)
    now_ms = time.time_ns() // 1_000_000
    rows = iter_readings(
        location,
        site=site,
        device=device,
        sensor=sensor,
        since_ms=parse_time(since, field="--since", now_ms=now_ms) if since else None,
        until_ms=parse_time(until, field="--until", now_ms=now_ms) if until else None,
    )
    write = _WRITERS[output_format]
    if output is None:
        _write_stdout(write, rows)
        return
    with _open_output(output) as out:
        count = write(rows, out)
    typer.echo(f"exported {count:,} readings to {output}", err=True)


def _write_stdout(
    write: Callable[[Iterable[ExportRow], TextIO], int], rows: Iterable[ExportRow]
) -> None:
    """Write to stdout; a reader that stops early (``| head``) ends the export quietly."""
    try:
        write(rows, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would complain again when flushing stdout at exit.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


export.__doc__ = inspect.cleandoc(export.__doc__ or "") + _EXPORT_EXAMPLES


# -- stats ------------------------------------------------------------------------------------


_AGE_UNITS = ((86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1000, "s"))


def _age(ms: int | None, now_ms: int) -> str:
    """How long ago ``ms`` was, in its largest whole unit (``45s``, ``3h``, ``12d``), or ``-``."""
    if ms is None:
        return "-"
    elapsed = now_ms - ms
    if elapsed < 0:
        return "future"
    for size, unit in _AGE_UNITS:
        if elapsed >= size:
            return f"{elapsed // size}{unit}"
    return "0s"


def _percent(device: DeviceStats) -> str:
    share = device.completeness
    return "-" if share is None else f"{share:.1%}"


def stats_dict(figures: StoreStats) -> dict[str, Any]:
    """The figures as a JSON-able dict (times in epoch ms; ``completeness`` 0..1 or null)."""
    totals = {
        key: getattr(figures, key)
        for key in (
            "path",
            "readings",
            "messages",
            "seen_ids",
            "sensors",
            "duplicates",
            "out_of_order",
            "gaps",
            "type_changes",
        )
    }
    devices = []
    for device in figures.devices:
        row = {name: getattr(device, name) for name in DeviceStats.__dataclass_fields__}
        row["completeness"] = device.completeness
        devices.append(row)
    return {**totals, "devices": devices}


def render_stats(figures: StoreStats, *, now_ms: int | None = None) -> None:
    """Print the totals and a per-device table with rich (agents and exact times: ``--json``)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    console = Console(highlight=False)
    readings = "-" if figures.readings is None else f"{figures.readings:,}"
    console.print(f"[bold]{escape(figures.path)}[/bold]")
    console.print(
        f"readings {readings} · messages {figures.messages:,} · seen ids {figures.seen_ids:,}"
        f" · devices {len(figures.devices):,} · sensors {figures.sensors:,}"
    )
    console.print(
        f"duplicates absorbed {figures.duplicates:,} · out of order {figures.out_of_order:,}"
        f" · gaps {figures.gaps:,} · type changes {figures.type_changes:,}"
    )
    if not figures.devices:
        console.print("[dim]no devices yet[/dim]")
        return
    table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    # Only the device column may wrap: at 80 columns long names fold, figures stay whole.
    table.add_column("site/device", overflow="fold")
    for name in ("state", "since", "seen", "msgs", "gaps", "compl.", "dups", "ooo", "types"):
        table.add_column(name, justify="left" if name == "state" else "right", no_wrap=True)
    table.add_column("boots", justify="right", no_wrap=True)
    for d in figures.devices:
        table.add_row(
            escape(f"{d.site}/{d.device}"),
            d.state or "-",
            _age(d.state_ts_ms, now),
            _age(d.last_seen_ms, now),
            f"{d.messages:,}",
            f"{d.gaps:,}",
            _percent(d),
            f"{d.duplicates:,}",
            f"{d.out_of_order:,}",
            f"{d.type_changes:,}",
            f"{d.boots:,}",
        )
    console.print(table)
    console.print(
        "[dim]since/seen: age of the latest status / reading; compl. = msgs / (msgs + gaps)[/dim]"
    )


_STATS_EXAMPLES = """

[bold]Examples[/bold]

  [dim]# the default SQLite store of iotpipe consume[/dim]
  iotpipe stats --store sqlite:///state/telemetry.db

  [dim]# an InfluxDB consumer: its local state file holds the figures[/dim]
  iotpipe stats --store influxdb://influx:8086 --state state/consumer/state.db

  [dim]# the shared PostgreSQL store of several consumer hosts[/dim]
  iotpipe stats --store postgresql://iotpipe@db:5432/iotpipe

  [dim]# for scripts and monitoring[/dim]
  iotpipe stats --store state/telemetry.db --json | jq '.gaps'
"""


def stats(
    *,
    store: Annotated[
        str,
        typer.Option(
            "--store",
            help="sqlite:///relative.db, sqlite:////abs.db, a file path, "
            "postgresql://user@host/db, or influxdb[s]://host "
            f"(then --state is read). \\[default: {DEFAULT_STORE_URL}]",
            show_default=False,
        ),
    ] = DEFAULT_STORE_URL,
    state: Annotated[
        Path,
        typer.Option(
            "--state",
            help="State file of an InfluxDB consumer (\\[consume].state_path). "
            "\\[default: state/consumer/state.db]",
            show_default=False,
            dir_okay=False,
        ),
    ] = DEFAULT_STATE_PATH,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (times in epoch ms) for machines.")
    ] = False,
) -> None:
    """Show what a store holds: totals and per-device completeness.

    Per device: its state (from status messages), last reading time, messages
    stored, gaps in the seq numbers, completeness, duplicates absorbed,
    out-of-order arrivals, sensor type changes and boots. Read-only: safe while
    iotpipe consume is writing.
    """
    location = store_path(store)
    path = state if isinstance(location, InfluxTarget) else location
    if isinstance(location, InfluxTarget) and not state.is_file():
        raise ConfigError(
            "--state", state, "no such file (the InfluxDB consumer's [consume].state_path)"
        )
    figures = store_stats(path)
    if as_json:
        typer.echo(json.dumps(stats_dict(figures), indent=2))
    else:
        render_stats(figures)


stats.__doc__ = inspect.cleandoc(stats.__doc__ or "") + _STATS_EXAMPLES
