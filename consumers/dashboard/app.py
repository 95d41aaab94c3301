"""The dashboard's HTTP side: query API v1 (``docs/api.md``) under ``/api/v1``, the page at ``/``.

:func:`create_app` builds a FastAPI application for one SQLite store file. Every request opens
the file read-only (:func:`~consumers.dashboard.queries.open_store`), so the dashboard never
blocks or changes the consumer writing it. A missing file is not fatal: the API answers 503
with a readable reason until the file appears, and the page shows that state.

Errors are ``{"error": "<one line>"}``: 400 for a bad or missing parameter (FastAPI's 422
validation errors included), 404 for an unknown site, device or sensor, 503 for the store.

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
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from consumers.dashboard import queries
from consumers.dashboard.queries import MAX_POINTS, MIN_POINTS, ParameterError, QueryError
from iotpipe import __version__
from iotpipe.errors import ConfigError
from iotpipe.timeparse import parse_time

log = logging.getLogger(__name__)

__all__ = ["STATIC_DIR", "create_app"]

STATIC_DIR = Path(__file__).parent / "static"
"""The web page: ``index.html`` and its scripts, served at ``/``."""

_DEFAULT_RANGE_MS = 3_600_000
_TIME_DOC = "Epoch ms, RFC 3339 (2026-11-26T08:00:00Z) or relative to now (-1h, -30d)."


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _parse_time(name: str, text: str, now_ms: int) -> int:
    try:
        return parse_time(text, field=name, now_ms=now_ms)
    except ConfigError as err:
        raise ParameterError(f"{name}={text!r}: {err.allowed}") from None


def _validation_message(err: RequestValidationError) -> str:
    """FastAPI's validation error as one line: the first problem, naming the parameter."""
    problems = list(err.errors())
    if not problems:
        return "bad request"
    first = problems[0]
    name = str(first.get("loc", ("", "?"))[-1])
    if first.get("type") == "missing":
        return f"missing query parameter {name!r}"
    return f"bad query parameter {name!r}: {first.get('msg', 'invalid')}"


def create_app(
    store: Path,
    *,
    store_label: str | None = None,
    poll_interval: float = 0.5,
    keepalive: float = 15.0,
    static_dir: Path = STATIC_DIR,
    stopping: threading.Event | None = None,
) -> FastAPI:
    """Build the dashboard application for one SQLite store file.

    Args:
        store: the store file (it may not exist yet: the API answers 503 until it does).
        store_label: how ``/api/v1/health`` names the store (default: the path).
        poll_interval: seconds between the live stream's polls of the store.
        keepalive: seconds between the live stream's keep-alive comments.
        static_dir: the web page's directory, served at ``/``.
        stopping: set when the server shuts down: live streams then end (they never end by
            themselves, and the server waits for open responses before it exits).
    """
    stopping = stopping or threading.Event()
    label = store_label or str(store)
    app = FastAPI(
        title="iotpipe query API",
        version=f"1 (iotpipe {__version__})",
        description="Read-only API over an iotpipe SQLite store; see docs/api.md.",
        openapi_url="/api/v1/openapi.json",
        # FastAPI's docs pages load their scripts from a CDN: not here.
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(QueryError)
    async def query_error(_request: Request, err: QueryError) -> JSONResponse:
        return _error(err.status, err.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(err))

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, err: HTTPException) -> Response:
        return _error(err.status_code, str(err.detail))

    @app.get("/api/v1/sites", summary="Sites with device counts")
    def get_sites() -> dict[str, Any]:
        """Every site: its devices, how many are online, its latest reading time."""
        with queries.open_store(store) as conn:
            return {"sites": queries.sites(conn)}

    @app.get("/api/v1/devices", summary="Devices with completeness figures")
    def get_devices(
        site: Annotated[str | None, Query(description="Only this site.")] = None,
    ) -> dict[str, Any]:
        """Every device (of one site): state, last reading, messages, gaps, completeness."""
        with queries.open_store(store) as conn:
            return {"devices": queries.devices(conn, site)}

    @app.get("/api/v1/devices/{site}/{device}", summary="One device and its sensors")
    def get_device(site: str, device: str) -> dict[str, Any]:
        """One device as in /devices, plus ``sensor_list``."""
        with queries.open_store(store) as conn:
            return queries.device(conn, site, device)

    @app.get("/api/v1/series", summary="A sensor's readings, downsampled")
    def get_series(
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
        from_ms = (
            _parse_time("from", from_, now_ms) if from_ is not None else to_ms - _DEFAULT_RANGE_MS
        )
        if from_ms > to_ms:
            raise ParameterError(f"from ({from_ms}) is after to ({to_ms})")
        with queries.open_store(store) as conn:
            return queries.series(
                conn, site, device, sensor, from_ms=from_ms, to_ms=to_ms, points=points
            )

    @app.get(
        "/api/v1/live",
        summary="Server-sent events: each new stored reading",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def get_live(
        site: Annotated[str | None, Query(description="Only this site.")] = None,
        device: Annotated[str | None, Query(description="Only this device.")] = None,
    ) -> StreamingResponse:
        """``event: reading`` per stored reading, a comment line every 15 s as keep-alive."""

        def head() -> int:
            with queries.open_store(store) as conn:
                return queries.feed_head(conn)

        cursor = await anyio.to_thread.run_sync(head)
        return StreamingResponse(
            _events(
                store,
                cursor,
                site=site,
                device=device,
                poll_interval=poll_interval,
                keepalive=keepalive,
                stopping=stopping,
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/api/v1/health", summary="Can the store be read?")
    def get_health() -> JSONResponse:
        """200 when the store can be read, else 503 with the reason in ``error``."""
        body: dict[str, Any] = {"healthy": True, "store": label, "readings": None}
        try:
            with queries.open_store(store) as conn:
                conn.execute("SELECT count(*) FROM meta").fetchone()
        except QueryError as err:
            return JSONResponse(
                {**body, "healthy": False, "error": err.message}, status_code=err.status
            )
        return JSONResponse(body)

    # Last: the page catches every path the API does not.
    app.mount("/", StaticFiles(directory=static_dir, html=True, check_dir=False), name="page")
    return app


async def _events(
    store: Path,
    cursor: int,
    *,
    site: str | None,
    device: str | None,
    poll_interval: float,
    keepalive: float,
    stopping: threading.Event,
) -> AsyncIterator[str]:
    """The live stream: poll the feed after ``cursor``, one ``reading`` event per reading."""

    def poll(after: int) -> tuple[list[dict[str, Any]], int]:
        with queries.open_store(store) as conn:
            return queries.feed_since(conn, after, site=site, device=device)

    # A first comment sends the headers at once: the client knows it is connected.
    yield ": connected\n\n"
    quiet_since = time.monotonic()
    failing: str | None = None
    while not stopping.is_set():
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
        elif time.monotonic() - quiet_since >= keepalive:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(poll_interval)
