"""``iotpipe status``: each running component's health and main counters.

The services publish ``/healthz`` (JSON) and ``/metrics`` (Prometheus text) on their HTTP port
(:mod:`iotpipe.health`). This module reads them over plain HTTP, so it needs none of the
components' code: ``iotpipe up`` uses it for its live view, ``iotpipe status`` for a one-shot
report. ``iotpipe up`` lists what it started in ``state/up/components.json``
(:data:`COMPONENTS_FILE`); ``status`` reads that file, or takes the URLs as flags.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer

#: Where ``iotpipe up`` lists its components, relative to its state directory.
COMPONENTS_FILE = Path("up") / "components.json"

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")

#: The counters shown per service kind: (label, metric summed over its labels).
COUNTERS: dict[str, tuple[tuple[str, str], ...]] = {
    "broker": (
        ("received", "iotpipe_broker_received_messages_total"),
        ("connections", "iotpipe_broker_connections"),
        ("sessions", "iotpipe_broker_sessions"),
        ("queued", "iotpipe_broker_queued_messages"),
        ("in-flight", "iotpipe_broker_inflight_messages"),
        ("dropped", "iotpipe_broker_dropped_messages_total"),
    ),
    "bridge": (
        ("received", "iotpipe_bridge_received_total"),
        ("forwarded", "iotpipe_bridge_forwarded_total"),
        ("dead-lettered", "iotpipe_bridge_dead_lettered_total"),
        ("spool", "iotpipe_bridge_spool_depth"),
    ),
    "consumer": (
        ("stored messages", "iotpipe_consumer_stored_messages_total"),
        ("stored readings", "iotpipe_consumer_stored_readings_total"),
        ("duplicates", "iotpipe_consumer_duplicates_total"),
        ("dead-lettered", "iotpipe_consumer_dead_lettered_total"),
    ),
}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → ``{metric name: value summed over every label set}``."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match.group(2))
        except ValueError:
            continue
        if not math.isnan(value):
            totals[match.group(1)] = totals.get(match.group(1), 0.0) + value
    return totals


def _get(url: str, timeout: float) -> tuple[int, bytes] | None:
    """(HTTP status, body), or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http only
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as err:  # 503 (unhealthy) still carries the JSON
        return err.code, bytes(err.read())
    except (OSError, ValueError):
        return None


@dataclass
class Probe:
    """What one service's HTTP endpoints said.

    Attributes:
        reachable: ``/healthz`` answered at all.
        healthy: it answered 200.
        health: its JSON body (empty when unreachable).
        metrics: ``/metrics`` summed per metric name (empty when unreachable).
    """

    reachable: bool = False
    healthy: bool = False
    health: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def probe(base_url: str, *, timeout: float = 2.0, metrics: bool = True) -> Probe:
    """Read ``BASE/healthz`` (and ``BASE/metrics``) of a service."""
    base = base_url.rstrip("/")
    answer = _get(f"{base}/healthz", timeout)
    if answer is None:
        return Probe()
    status, body = answer
    try:
        health = json.loads(body)
    except ValueError:
        health = {}
    result = Probe(True, status == 200, health if isinstance(health, dict) else {})
    if metrics:
        scraped = _get(f"{base}/metrics", timeout)
        if scraped is not None and scraped[0] == 200:
            result.metrics = parse_metrics(scraped[1].decode(errors="replace"))
    return result


def counters(kind: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """The main counters of a ``broker``, ``bridge`` or ``consumer`` (see :data:`COUNTERS`)."""
    return {label: metrics.get(name, 0.0) for label, name in COUNTERS.get(kind, ())}


def accepting(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie counts until its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_components(state_dir: Path) -> dict[str, Any] | None:
    """``state/up/components.json`` as written by ``iotpipe up``, or None if absent/unreadable."""
    try:
        data = json.loads((state_dir / COMPONENTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class Report:
    """One component's line in ``iotpipe status``."""

    name: str
    healthy: bool
    state: str
    where: str
    details: dict[str, Any] = field(default_factory=dict)


def check(component: Mapping[str, Any]) -> Report:
    """Check one entry of ``components.json``: its /healthz if it has one, else pid and port."""
    name = str(component.get("name", "?"))
    where = str(component.get("url", ""))
    pid = component.get("pid")
    if isinstance(pid, int) and not pid_alive(pid):
        return Report(name, False, "not running", where, {"pid": pid})
    http = component.get("http")
    if isinstance(http, str) and http:
        found = probe(http)
        if not found.reachable:
            return Report(name, False, "not answering", f"{http}/healthz")
        details: dict[str, Any] = {**found.health}
        details.pop("healthy", None)
        details.update(counters(str(component.get("kind", name)), found.metrics))
        state = "healthy" if found.healthy else "unhealthy"
        return Report(name, found.healthy, state, f"{http}/healthz", details)
    parts = urlsplit(where)
    if component.get("kind") != "simulator" and parts.hostname and parts.port:
        up = accepting(parts.hostname, parts.port)
        return Report(name, up, "healthy" if up else "not answering", where)
    return Report(name, True, "running", where, {"pid": pid} if pid else {})


def _format_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


_STATUS_EXAMPLES = """

[bold]Examples[/bold]

  iotpipe status                         [dim]# what `iotpipe up` started here[/dim]
  iotpipe status --json
  iotpipe status --bridge http://gw:9181 --consumer http://127.0.0.1:9182
  iotpipe status --broker http://127.0.0.1:9184   [dim]# an `iotpipe broker`[/dim]
"""


def status(
    *,
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            help="Embedded broker (iotpipe broker) HTTP base URL (e.g. http://127.0.0.1:9184) "
            "instead of state/up.",
            show_default=False,
        ),
    ] = None,
    bridge: Annotated[
        str | None,
        typer.Option(
            "--bridge",
            help="Bridge HTTP base URL (e.g. http://127.0.0.1:9181) instead of state/up.",
            show_default=False,
        ),
    ] = None,
    consumer: Annotated[
        str | None,
        typer.Option(
            "--consumer",
            help="Consumer HTTP base URL (e.g. http://127.0.0.1:9182) instead of state/up.",
            show_default=False,
        ),
    ] = None,
    state_dir: Annotated[
        Path,
        typer.Option("--state-dir", help="State directory of `iotpipe up`.", file_okay=False),
    ] = Path("state"),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show each pipeline component's health (/healthz) and main counters.

    Reads what [bold]iotpipe up[/bold] started from state/up/components.json, or checks the
    services given with --broker/--bridge/--consumer. Exit 0 when every component is healthy, 1
    otherwise.
    """
    components: list[dict[str, Any]]
    if broker or bridge or consumer:
        components = [
            {"name": kind, "kind": kind, "http": url}
            for kind, url in (("broker", broker), ("bridge", bridge), ("consumer", consumer))
            if url
        ]
    else:
        listing = read_components(state_dir)
        up_pid = listing.get("up_pid") if listing else None
        if listing is None or not isinstance(up_pid, int) or not pid_alive(up_pid):
            typer.secho(
                f"iotpipe status: nothing is running here (no live `iotpipe up` in "
                f"{state_dir / COMPONENTS_FILE}); start it with `iotpipe up`, or pass "
                "--broker/--bridge/--consumer URLs",
                err=True,
            )
            raise typer.Exit(1)
        components = [c for c in listing.get("components", []) if isinstance(c, dict)]
    reports = [check(component) for component in components]
    healthy = all(report.healthy for report in reports)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "healthy": healthy,
                    "components": [
                        {"name": r.name, "healthy": r.healthy, "state": r.state, "url": r.where}
                        | r.details
                        for r in reports
                    ],
                },
                default=str,
            )
        )
    else:
        width = max((len(r.name) for r in reports), default=0)
        for report in reports:
            colour = typer.colors.GREEN if report.healthy else typer.colors.RED
            state = typer.style(f"{report.state:<13}", fg=colour)
            typer.echo(f"{report.name:<{width}}  {state} {report.where}")
            if report.details:
                shown = ", ".join(f"{k} {_format_value(v)}" for k, v in report.details.items())
                typer.echo(f"{'':<{width}}  {shown}")
    raise typer.Exit(0 if healthy else 1)


status.__doc__ = inspect.cleandoc(status.__doc__ or "") + _STATUS_EXAMPLES
