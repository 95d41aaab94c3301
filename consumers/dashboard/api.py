"""Query API v1 (``docs/api.md``): the routes under ``/api/v1``, as one FastAPI router.

Every route reads the store through :mod:`consumers.dashboard.queries`, which opens it
read-only per request, so the API never blocks or changes the consumer writing it. What a route
needs to know about its application (the store, the live stream's timing, the stop signal)
comes from :class:`DashboardConfig` on ``app.state.dashboard``, which
:func:`~consumers.dashboard.app.create_app` puts there.

``/api/v1/live`` is a server-sent event stream: it polls the store's ``readings_feed`` (a
numbered journal of inserted readings, see :mod:`consumers.sqlite_store`) every
``poll_interval`` seconds from the number it last saw, so late data arrives too, and sends a
comment line every ``keepalive`` seconds so proxies keep the connection open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from consumers.dashboard import queries
from consumers.dashboard.queries import MAX_POINTS, MIN_POINTS, ParameterError, QueryError
from consumers.query import Location
from iotpipe.errors import ConfigError
from iotpipe.timeparse import parse_time

log = logging.getLogger(__name__)

__all__ = ["DashboardConfig", "router"]

_DEFAULT_RANGE_MS = 3_600_000
_TIME_DOC = "Epoch ms, RFC 3339 (2026-11-26T08:00:00Z) or relative to now (-1h, -30d)."


@dataclass(frozen=True, slots=True)
class DashboardConfig:
    """What the routes of one dashboard application read and how the live stream behaves.

    Attributes:
        store: the SQLite store file (it may not exist yet: routes answer 503 until it does)
            or a PostgreSQL store.
        label: how ``/api/v1/health`` names the store.
        poll_interval: seconds between the live stream's polls of the store.
        keepalive: seconds between the live stream's keep-alive comments.
        stopping: set when the server shuts down; live streams then end.
    """

    store: Location
    label: str
    poll_interval: float
    keepalive: float
    stopping: threading.Event


def _config(request: Request) -> DashboardConfig:
    """The application's :class:`DashboardConfig` (a FastAPI dependency)."""
    config: DashboardConfig = request.app.state.dashboard
    return config


Config = Annotated[DashboardConfig, Depends(_config)]

router = APIRouter(prefix="/api/v1")


def _parse_time(name: str, text: str, now_ms: int) -> int:
    """A ``from``/``to`` parameter in epoch ms; a :class:`ParameterError` (400) naming it."""
    try:
        return parse_time(text, field=name, now_ms=now_ms)
    except ConfigError as err:
        raise ParameterError(f"{name}={text!r}: {err.allowed}") from None


@router.get("/sites", summary="Sites with device counts")
def get_sites(config: Config) -> dict[str, Any]:
    """Every site: its devices, how many are online, its latest reading time."""
    with queries.open_store(config.store) as conn:
        return {"sites": queries.sites(conn)}


@router.get("/devices", summary="Devices with completeness figures")
def get_devices(
    config: Config,
    site: Annotated[str | None, Query(description="Only this site.")] = None,
) -> dict[str, Any]:
    """Every device (of one site): state, last reading, messages, gaps, completeness."""
    with queries.open_store(config.store) as conn:
        return {"devices": queries.devices(conn, site)}


@router.get("/devices/{site}/{device}", summary="One device and its sensors")
def get_device(config: Config, site: str, device: str) -> dict[str, Any]:
    """One device as in /devices, plus ``sensor_list``."""
    with queries.open_store(config.store) as conn:
        return queries.device(conn, site, device)


@router.get("/series", summary="A sensor's readings, downsampled")
def get_series(
    config: Config,
    *,
    site: Annotated[str, Query()],
    device: Annotated[str, Query()],
    sensor: Annotated[str, Query()],
    from_: Annotated[str | None, Query(alias="from", description=_TIME_DOC)] = None,
    to: Annotated[str | None, Query(description=_TIME_DOC + " Default: now.")] = None,
    points: Annotated[
        int, Query(ge=MIN_POINTS, le=MAX_POINTS, description="Most buckets returned.")
    ] = 500,
) -> dict[str, Any]:
    """Buckets with min/mean/max/n (numbers, booleans as 0/1) or the latest strings.

    ``from`` defaults to one hour before ``to``.
    """
    now_ms = time.time_ns() // 1_000_000
    to_ms = _parse_time("to", to, now_ms) if to is not None else now_ms
    from_ms = _parse_time("from", from_, now_ms) if from_ is not None else to_ms - _DEFAULT_RANGE_MS
    if from_ms > to_ms:
        raise ParameterError(f"from ({from_ms}) is after to ({to_ms})")
    with queries.open_store(config.store) as conn:
        return queries.series(
            conn, site, device, sensor, from_ms=from_ms, to_ms=to_ms, points=points
        )


@router.get(
    "/live",
    summary="Server-sent events: each new stored reading",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def get_live(
    config: Config,
    site: Annotated[str | None, Query(description="Only this site.")] = None,
    device: Annotated[str | None, Query(description="Only this device.")] = None,
) -> StreamingResponse:
    """``event: reading`` per stored reading, a comment line every 15 s as keep-alive."""

    def head() -> int:
        with queries.open_store(config.store) as conn:
            return queries.feed_head(conn)

    cursor = await anyio.to_thread.run_sync(head)
    return StreamingResponse(
        _events(config, cursor, site=site, device=device),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/health", summary="Can the store be read?")
def get_health(config: Config) -> JSONResponse:
    """200 when the store can be read, else 503 with the reason in ``error``."""
    body: dict[str, Any] = {"healthy": True, "store": config.label, "readings": None}
    try:
        with queries.open_store(config.store) as conn:
            conn.execute("SELECT count(*) FROM meta").fetchone()
    except QueryError as err:
        return JSONResponse(
            {**body, "healthy": False, "error": err.message}, status_code=err.status
        )
    return JSONResponse(body)


async def _events(
    config: DashboardConfig, cursor: int, *, site: str | None, device: str | None
) -> AsyncIterator[str]:
    """The live stream: poll the feed after ``cursor``, one ``reading`` event per reading."""

    def poll(after: int) -> tuple[list[dict[str, Any]], int]:
        with queries.open_store(config.store) as conn:
            return queries.feed_since(conn, after, site=site, device=device)

    # A first comment sends the headers at once: the client knows it is connected.
    yield ": connected\n\n"
    quiet_since = time.monotonic()
    failing: str | None = None
    while not config.stopping.is_set():
        try:
            readings, cursor = await anyio.to_thread.run_sync(poll, cursor)
        except QueryError as err:
            if err.message != failing:
                failing = err.message
                log.warning("live stream cannot read the store: %s", err.message)
                yield f"event: problem\ndata: {json.dumps({'error': err.message})}\n\n"
            readings = []
        else:
            failing = None
        for reading in readings:
            yield f"event: reading\ndata: {json.dumps(reading, separators=(',', ':'))}\n\n"
        if readings:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= config.keepalive:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(config.poll_interval)
