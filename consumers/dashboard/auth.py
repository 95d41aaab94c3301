"""Who may read the dashboard: API tokens, login sessions, and the gate in front of every route.

Authentication is on when the dashboard was given a token file (:mod:`consumers.dashboard.tokens`).
Then a request is let in when it carries

- ``Authorization: Bearer <token>`` of a token in the file (scripts, ``curl``), or
- the session cookie the login page sets (the web page): an opaque random id, of which the
  server keeps only the SHA-256, with the token's name and an absolute expiry. Sessions live
  in memory: a restart logs everybody out. A session ends with its token: revoking a token
  ends the sessions opened with it at their next request.

Without either, ``/api/...`` answers 401 ``{"error": ...}``, the page (``/``) redirects to the
login form, anything else answers 401. Open to all: the login form (``/login``), the
stylesheet it uses, ``/logout``, and ``/api/v1/health`` (which says whether the store is readable).

The cookie is ``HttpOnly`` and ``SameSite=Strict`` (no other site can send it, so the
read-only API needs no CSRF token), ``Secure`` when the request came over TLS (directly, or
from a reverse proxy on loopback sending ``X-Forwarded-Proto: https``, which uvicorn trusts).
The login and logout forms refuse cross-site posts (``Sec-Fetch-Site``).

Without a token file the dashboard serves loopback only, and then answers only requests whose
``Host`` is a loopback name (``localhost``, ``127.0.0.1``, ``[::1]``): a web page elsewhere
could otherwise make the browser of someone on this host read the data through a host name
it re-points at 127.0.0.1 (DNS rebinding). Others get 421.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from consumers.dashboard.tokens import TokenFile

__all__ = [
    "SESSION_COOKIE",
    "SESSION_TTL",
    "Auth",
    "AuthGate",
    "Sessions",
    "is_loopback",
    "router",
]

SESSION_COOKIE = "iotpipe_session"
SESSION_TTL = 12 * 3600.0
"""Seconds a login lasts (absolute, not renewed by use)."""

LOGIN_PAGE = Path(__file__).parent / "static" / "login.html"
_OPEN_PATHS = frozenset({"/login", "/logout", "/app.css", "/api/v1/health"})
_PAGE_PATHS = frozenset({"/", "/index.html"})
_MAX_FORM_BYTES = 4096
_CROSS_SITE = frozenset({"cross-site", "same-site"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name, IPv6 in brackets or not) is loopback.

    ``localhost`` is; other names are not (they are not resolved).
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name of a ``Host`` header without its port: ``[::1]:8080`` -> ``::1``."""
    if header.startswith("["):
        return header[1 : header.find("]")]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class Sessions:
    """Login sessions in memory: hash of the cookie's id -> (token name, expiry).

    Args:
        ttl: seconds a session lasts from its login.
        clock: monotonic seconds (injected by tests).
    """

    def __init__(self, ttl: float = SESSION_TTL, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, tuple[str, float]] = {}

    def open(self, name: str) -> str:
        """Start a session for the token ``name``; return the id the cookie carries."""
        session_id = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            self._open = {k: v for k, v in self._open.items() if v[1] > now}  # drop expired
            self._open[_digest(session_id)] = (name, now + self.ttl)
        return session_id

    def user(self, session_id: str) -> str | None:
        """The token name of a live session, or None (unknown, expired or closed)."""
        key = _digest(session_id)
        with self._lock:
            found = self._open.get(key)
            if found is None:
                return None
            if found[1] <= self._clock():
                del self._open[key]
                return None
            return found[0]

    def close(self, session_id: str) -> None:
        """End a session (logout)."""
        with self._lock:
            self._open.pop(_digest(session_id), None)


@dataclass(frozen=True, slots=True)
class Auth:
    """The token file and the sessions of one dashboard with authentication on."""

    tokens: TokenFile
    sessions: Sessions = field(default_factory=Sessions)

    def user(self, request: Request) -> str | None:
        """The token name a request authenticates as (Bearer token or session), else None."""
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credential:
            return self.tokens.check(credential.strip())
        session_id = request.cookies.get(SESSION_COOKIE)
        if not session_id:
            return None
        name = self.sessions.user(session_id)
        return name if name is not None and self.tokens.holds(name) else None


def _auth(request: Request) -> Auth | None:
    auth: Auth | None = request.app.state.auth
    return auth


def _user(request: Request) -> str | None:
    """The token name the gate found for this request (None: not logged in, or no auth)."""
    user: str | None = getattr(request.state, "user", None)
    return user


class AuthGate:
    """ASGI middleware: let a request through when authentication is off, it authenticates, or
    its path is open; answer 401 or redirect to the login form otherwise.

    Args:
        app: the application behind the gate.
        auth: tokens and sessions; None: no authentication.
        loopback_only: without authentication, answer 421 to a ``Host`` that is not loopback.
    """

    def __init__(self, app: ASGIApp, auth: Auth | None, loopback_only: bool = False) -> None:
        self.app = app
        self.auth = auth
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check one request (HTTP only; lifespan events pass)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if self.auth is None:
            if self.loopback_only and not is_loopback(_host_name(request.headers.get("host", ""))):
                refused = JSONResponse(
                    {
                        "error": "without authentication this dashboard answers only to loopback "
                        "host names (localhost, 127.0.0.1): create a token (docs/dashboard.md)"
                    },
                    status_code=421,
                )
                await refused(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        user = self.auth.user(request)
        root = scope.get("root_path", "")
        path = scope["path"].removeprefix(root) if root else scope["path"]
        if user is not None or path in _OPEN_PATHS:
            scope.setdefault("state", {})["user"] = user
            await self.app(scope, receive, send)
            return
        refusal: Response
        if path in _PAGE_PATHS and scope["method"] in ("GET", "HEAD"):
            refusal = RedirectResponse("login", status_code=303)
        else:
            refusal = JSONResponse(
                {"error": "authentication required: send 'Authorization: Bearer <token>'"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="iotpipe"'},
            )
        await refusal(scope, receive, send)


router = APIRouter(include_in_schema=False)


def _login_page(message: str = "", status: int = 200) -> HTMLResponse:
    """The login form, with a fixed message (never user input) above it."""
    shown = f'<p class="login-message" role="alert">{escape(message)}</p>' if message else ""
    html = LOGIN_PAGE.read_text().replace("<!-- message -->", shown)
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def _cross_site(request: Request) -> bool:
    """A form posted from another site (browsers say so in Sec-Fetch-Site)."""
    return request.headers.get("sec-fetch-site", "same-origin") in _CROSS_SITE


@router.get("/login")
def login_form(request: Request) -> Response:
    """The login form; the page itself when authentication is off or already logged in."""
    auth = _auth(request)
    if auth is None or _user(request) is not None:
        return RedirectResponse("./", status_code=303)
    return _login_page()


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the posted token; on success set the session cookie and go to the page."""
    auth = _auth(request)
    if auth is None:
        return RedirectResponse("./", status_code=303)
    if _cross_site(request):
        return _login_page("Refused: the form was posted from another site.", 403)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            return _login_page("Refused: the form is too large.", 413)
    token = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0].strip()
    name = auth.tokens.check(token) if token else None
    if name is None:
        return _login_page("That token is not valid (or it was revoked).", 401)
    response = RedirectResponse("./", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        auth.sessions.open(name),
        max_age=int(auth.sessions.ttl),
        path=request.scope.get("root_path") or "/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    """End the session and clear its cookie; back to the login form."""
    auth = _auth(request)
    if auth is not None and _cross_site(request):
        return _login_page("Refused: the form was posted from another site.", 403)
    session_id = request.cookies.get(SESSION_COOKIE)
    if auth is not None and session_id:
        auth.sessions.close(session_id)
    response = RedirectResponse("login" if auth is not None else "./", status_code=303)
    response.delete_cookie(
        SESSION_COOKIE,
        path=request.scope.get("root_path") or "/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@router.get("/session")
def session(request: Request) -> dict[str, object]:
    """Whether authentication is on and who is logged in (the page shows its logout button)."""
    return {"auth": _auth(request) is not None, "user": _user(request)}
