"""The dashboard's HTTP side: query API v1 (``docs/api.md``) under ``/api/v1``, the page at ``/``.

:func:`create_app` assembles a FastAPI application for one SQLite store file: the API's routes
(:mod:`consumers.dashboard.api`), the error handlers and the static page. Every request opens
the file read-only (:func:`~consumers.dashboard.queries.open_store`), so the dashboard never
blocks or changes the consumer writing it. A missing file is not fatal: the API answers 503
with a readable reason until the file appears, and the page shows that state.

Every response carries the security headers of :mod:`consumers.dashboard.headers`. With a
token file, :mod:`consumers.dashboard.auth` guards every route but the login form and
``/api/v1/health``; without one, nothing is guarded (the command allows that on loopback only).

Errors are ``{"error": "<one line>"}``: 400 for a bad or missing parameter (FastAPI's 422
validation errors included), 404 for an unknown site, device or sensor, 503 for the store.
"""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

from consumers.dashboard import auth
from consumers.dashboard.api import DashboardConfig, router
from consumers.dashboard.headers import SecurityHeaders
from consumers.dashboard.queries import QueryError
from consumers.dashboard.tokens import TokenFile
from consumers.query import Location
from iotpipe import __version__

__all__ = ["STATIC_DIR", "create_app"]

STATIC_DIR = Path(__file__).parent / "static"
"""The web page: ``index.html`` and its scripts, served at ``/``."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


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


async def _query_error(_request: Request, err: QueryError) -> Response:
    return _error(err.status, err.message)


async def _validation_error(_request: Request, err: RequestValidationError) -> Response:
    return _error(400, _validation_message(err))


async def _http_error(_request: Request, err: HTTPException) -> Response:
    return _error(err.status_code, str(err.detail))


class _Dashboard(FastAPI):
    """FastAPI with :class:`SecurityHeaders` outside even Starlette's error middleware, so a
    500 answer carries the headers too."""

    def build_middleware_stack(self) -> ASGIApp:
        """Starlette's stack, wrapped."""
        return SecurityHeaders(super().build_middleware_stack())


def create_app(
    store: Location,
    *,
    store_label: str | None = None,
    poll_interval: float = 0.5,
    keepalive: float = 15.0,
    static_dir: Path = STATIC_DIR,
    stopping: threading.Event | None = None,
    tokens: TokenFile | None = None,
    session_ttl: float = auth.SESSION_TTL,
    loopback_only: bool = False,
) -> FastAPI:
    """Build the dashboard application for one store (a SQLite file or a PostgreSQL database).

    Args:
        store: the store file (it may not exist yet: the API answers 503 until it does), or a
            PostgreSQL store (no live feed: ``/api/v1/live`` answers 503).
        store_label: how ``/api/v1/health`` names the store (default: the path).
        poll_interval: seconds between the live stream's polls of the store.
        keepalive: seconds between the live stream's keep-alive comments.
        static_dir: the web page's directory, served at ``/``.
        stopping: set when the server shuts down: live streams then end (they never end by
            themselves, and the server waits for open responses before it exits).
        tokens: the token file; given, every route but the login form and the health check
            needs a token or a login session. None: no authentication.
        session_ttl: seconds a login session lasts.
        loopback_only: without ``tokens``, answer only requests addressed to a loopback host
            name (``iotpipe dashboard`` sets it; see :mod:`consumers.dashboard.auth`).
    """
    app = _Dashboard(
        title="iotpipe query API",
        version=f"1 (iotpipe {__version__})",
        description="Read-only API over an iotpipe store; see docs/api.md.",
        openapi_url="/api/v1/openapi.json",
        # FastAPI's docs pages load their scripts from a CDN: not here.
        docs_url=None,
        redoc_url=None,
    )
    app.state.dashboard = DashboardConfig(
        store=store,
        label=store_label or str(store),
        poll_interval=poll_interval,
        keepalive=keepalive,
        stopping=stopping or threading.Event(),
    )
    app.exception_handler(QueryError)(_query_error)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(HTTPException)(_http_error)
    app.state.auth = None if tokens is None else auth.Auth(tokens, auth.Sessions(session_ttl))
    app.add_middleware(auth.AuthGate, auth=app.state.auth, loopback_only=loopback_only)
    app.include_router(router)
    app.include_router(auth.router)
    # Last: the page catches every path the API does not.
    app.mount("/", StaticFiles(directory=static_dir, html=True, check_dir=False), name="page")
    return app
