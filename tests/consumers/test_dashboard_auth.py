"""The dashboard's authentication and security headers: tokens, sessions, the command's refusals.

The API side runs the application in process (FastAPI's TestClient) over a small store
written with :class:`SQLiteStore`; the command side runs ``iotpipe dashboard`` as a
subprocess. The page in a browser is in test_dashboard_browser.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from consumers.dashboard.app import create_app
from consumers.dashboard.auth import SESSION_COOKIE, Sessions
from consumers.dashboard.headers import CONTENT_SECURITY_POLICY
from consumers.dashboard.tokens import TokenFile, token_hash
from consumers.sqlite_store import SQLiteStore
from consumers.store import Message, Reading
from tests.conftest import IOTPIPE, free_port, wait_for

DATA = "/api/v1/devices"


def small_store(path: Path) -> Path:
    """A store with one device and one reading."""
    store = SQLiteStore(path)
    store.write(
        [Message("m", "home", "pi", 0, "b", (Reading("t", 1_795_000_000_000, 1.0, None),))], []
    )
    store.close()
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return small_store(tmp_path / "telemetry.db")


@pytest.fixture
def tokens(tmp_path: Path) -> TokenFile:
    return TokenFile(tmp_path / "telemetry.tokens.json")


def client(store: Path, tokens: TokenFile | None, **kwargs: object) -> TestClient:
    return TestClient(create_app(store, tokens=tokens, **kwargs), follow_redirects=False)  # type: ignore[arg-type]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- tokens -------------------------------------------------------------------------------------


def test_token_file_keeps_hashes_only_with_mode_0600(tokens: TokenFile) -> None:
    """The file holds each token's SHA-256, never the token, and only its owner may read it."""
    first = tokens.add("alice")
    second = tokens.add("bob")
    text = tokens.path.read_text()
    assert first not in text
    assert second not in text
    assert first.removeprefix("iotpipe_") not in text
    assert token_hash(first) in text
    assert token_hash(second) in text
    assert stat.S_IMODE(os.stat(tokens.path).st_mode) == 0o600
    assert [e.name for e in tokens.entries()] == ["alice", "bob"]
    assert len(first) > 40
    assert first != second


def test_revoked_token_is_refused_by_a_running_app(store: Path, tokens: TokenFile) -> None:
    """A token revoked (by another process writing the file) is refused at its next request."""
    token = tokens.add("alice")
    other = tokens.add("bob")
    api = client(store, tokens)
    assert api.get(DATA, headers=bearer(token)).status_code == 200
    TokenFile(tokens.path).revoke("alice")
    refused = api.get(DATA, headers=bearer(token))
    assert refused.status_code == 401
    assert api.get(DATA, headers=bearer(other)).status_code == 200


# -- the API with authentication on -------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer iotpipe_wrong"}, {"Authorization": "Basic YTpi"}],
    ids=["none", "wrong-token", "basic"],
)
def test_api_without_a_valid_token_is_401(
    store: Path, tokens: TokenFile, headers: dict[str, str]
) -> None:
    """No token, a wrong one or another scheme: 401 with a JSON error and WWW-Authenticate."""
    tokens.add("alice")
    api = client(store, tokens)
    for url in (DATA, "/api/v1/sites", "/api/v1/series?site=home&device=pi&sensor=t"):
        response = api.get(url, headers=headers)
        assert response.status_code == 401, url
        assert "authentication required" in response.json()["error"]
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert api.get("/js/app.js", headers=headers).status_code == 401
    assert api.get("/api/v1/openapi.json", headers=headers).status_code == 401


def test_api_with_a_token_answers(store: Path, tokens: TokenFile) -> None:
    """A valid Bearer token reads the data; /api/v1/health needs none."""
    token = tokens.add("alice")
    api = client(store, tokens)
    response = api.get(DATA, headers=bearer(token))
    assert response.status_code == 200
    assert [d["device"] for d in response.json()["devices"]] == ["pi"]
    assert api.get("/api/v1/health").json()["healthy"] is True


def test_without_a_token_file_nothing_is_guarded(store: Path) -> None:
    """No token file: the API and the page answer without credentials (loopback use)."""
    api = client(store, None)
    assert api.get(DATA).status_code == 200
    assert api.get("/").status_code == 200
    assert api.get("/session").json() == {"auth": False, "user": None}
    assert api.get("/login").headers["location"] == "./"


# -- the page: login, session, logout -----------------------------------------------------------


def test_page_redirects_to_login_and_a_login_opens_a_session(
    store: Path, tokens: TokenFile
) -> None:
    """/ goes to the login form; a good token sets an HttpOnly, SameSite=Strict session cookie."""
    token = tokens.add("alice")
    page = client(store, tokens)
    first = page.get("/")
    assert first.status_code == 303
    assert first.headers["location"] == "login"
    form = page.get("/login")
    assert form.status_code == 200
    assert 'name="token"' in form.text
    bad = page.post("/login", data={"token": "iotpipe_nope"})
    assert bad.status_code == 401
    assert "not valid" in bad.text
    assert SESSION_COOKIE not in page.cookies
    good = page.post("/login", data={"token": token})
    assert good.status_code == 303
    assert good.headers["location"] == "./"
    cookie = good.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Max-Age=" in cookie
    assert "Secure" not in cookie  # plain http; https sets it (test_session_cookie_is_secure...)
    assert token not in cookie
    assert page.get("/").status_code == 200
    assert page.get(DATA).status_code == 200
    assert page.get("/session").json() == {"auth": True, "user": "alice"}
    out = page.post("/logout")
    assert out.status_code == 303
    assert out.headers["location"] == "login"
    assert page.get(DATA).status_code == 401


def test_session_cookie_is_secure_over_https(store: Path, tokens: TokenFile) -> None:
    """Served over TLS (or from a proxy that says https), the cookie is Secure."""
    token = tokens.add("alice")
    page = TestClient(create_app(store, tokens=tokens), base_url="https://dash.test")
    response = page.post("/login", data={"token": token}, follow_redirects=False)
    assert "Secure" in response.headers["set-cookie"]


def test_a_stolen_cookie_is_useless_after_logout(store: Path, tokens: TokenFile) -> None:
    """Logout ends the session on the server: the old cookie value no longer opens anything."""
    token = tokens.add("alice")
    page = client(store, tokens)
    page.post("/login", data={"token": token})
    stolen = page.cookies[SESSION_COOKIE]
    page.post("/logout")
    thief = client(store, tokens)
    thief.cookies.set(SESSION_COOKIE, stolen)
    assert thief.get(DATA).status_code == 401


def test_sessions_expire_and_end_with_their_token(store: Path, tokens: TokenFile) -> None:
    """A session ends at its expiry, and at once when its token is revoked."""
    now = [0.0]
    sessions = Sessions(ttl=60, clock=lambda: now[0])
    alice = sessions.open("alice")
    assert sessions.user(alice) == "alice"
    now[0] = 60.0
    assert sessions.user(alice) is None

    token = tokens.add("alice")
    page = client(store, tokens)
    page.post("/login", data={"token": token})
    assert page.get(DATA).status_code == 200
    tokens.revoke("alice")
    assert page.get(DATA).status_code == 401


def test_cross_site_login_and_logout_posts_are_refused(store: Path, tokens: TokenFile) -> None:
    """Forms posted from another site (Sec-Fetch-Site: cross-site) neither log in nor out."""
    token = tokens.add("alice")
    page = client(store, tokens)
    response = page.post("/login", data={"token": token}, headers={"Sec-Fetch-Site": "cross-site"})
    assert response.status_code == 403
    assert "set-cookie" not in response.headers
    page.post("/login", data={"token": token})
    forged = page.post("/logout", headers={"Sec-Fetch-Site": "cross-site"})
    assert forged.status_code == 403
    assert page.get(DATA).status_code == 200


# -- security headers ---------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [True, False], ids=["auth", "no-auth"])
def test_every_response_carries_the_security_headers(
    store: Path, tokens: TokenFile, auth: bool
) -> None:
    """Pages, API answers, errors, redirects and 401s all carry CSP, nosniff and frame denial."""
    tokens.add("alice")
    app = client(store, tokens if auth else None)
    responses = [
        app.get("/"),
        app.get("/login"),
        app.get("/app.css"),
        app.get(DATA),
        app.get("/api/v1/health"),
        app.get("/api/v1/series"),  # 400 or 401
        app.get("/no-such-file"),
    ]
    for response in responses:
        headers = response.headers
        url = response.request.url
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY, url
        assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
        assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
        assert headers["x-content-type-options"] == "nosniff", url
        assert headers["x-frame-options"] == "DENY", url
        assert headers["referrer-policy"] == "no-referrer", url


def test_static_pages_have_no_inline_script_or_style() -> None:
    """The shipped HTML has no inline <script>, style attribute, <style> or on* handler."""
    import re

    from consumers.dashboard.app import STATIC_DIR

    for page in STATIC_DIR.glob("*.html"):
        html = page.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), page
        assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=", html, re.IGNORECASE), page


# -- the command --------------------------------------------------------------------------------


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IOTPIPE, *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "dash.example"])
def test_command_refuses_a_public_address_without_tokens(tmp_path: Path, host: str) -> None:
    """Listening beyond loopback without a token file: one line naming the fix, exit 2."""
    small_store(tmp_path / "t.db")
    done = run("dashboard", "--store", "t.db", "--host", host, "--port", "0", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "no authentication is configured" in done.stderr
    assert "iotpipe dashboard token add NAME --store t.db" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_token_commands_add_list_revoke(tmp_path: Path) -> None:
    """add prints the token once (hash kept), list shows names, revoke removes; mistakes exit 2."""
    added = run("dashboard", "token", "add", "alice", "--store", "t.db", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert token.startswith("iotpipe_")
    path = tmp_path / "t.tokens.json"
    assert token not in path.read_text()
    assert json.loads(path.read_text())["tokens"][0]["sha256"] == token_hash(token)
    again = run("dashboard", "token", "add", "alice", "--store", "t.db", cwd=tmp_path)
    assert again.returncode == 2
    assert "exists" in again.stderr
    bad = run("dashboard", "token", "add", "no spaces", "--store", "t.db", cwd=tmp_path)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    listed = run("dashboard", "token", "list", "--store", "t.db", cwd=tmp_path)
    assert listed.stdout.split("\t")[0] == "alice"
    assert token not in listed.stdout
    revoked = run("dashboard", "token", "revoke", "alice", "--store", "t.db", cwd=tmp_path)
    assert revoked.returncode == 0
    gone = run("dashboard", "token", "revoke", "alice", "--store", "t.db", cwd=tmp_path)
    assert gone.returncode == 2
    assert "no such token" in gone.stderr
    assert run("dashboard", "token", "list", "--store", "t.db", cwd=tmp_path).stdout == ""


def test_command_refuses_a_token_file_others_may_write(tmp_path: Path) -> None:
    """A group- or world-writable token file: refused at start, naming the chmod."""
    tokens = TokenFile(tmp_path / "t.tokens.json")
    tokens.add("alice")
    tokens.path.chmod(0o666)
    done = run("dashboard", "--store", "t.db", "--port", "0", cwd=tmp_path)
    assert done.returncode == 2
    assert "writable by other users (mode 0666): chmod 600" in done.stderr


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``iotpipe dashboard --host 0.0.0.0`` with a token; yields (base URL, token)."""
    small_store(tmp_path / "t.db")
    token = run("dashboard", "token", "add", "ci", "--store", "t.db", cwd=tmp_path).stdout.strip()
    port = free_port()
    proc = subprocess.Popen(
        [*IOTPIPE, "dashboard", "--store", "t.db", "--host", "0.0.0.0", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            with urllib.request.urlopen(f"{base}/api/v1/health", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        wait_for(answers, 30, "the dashboard to answer")
        yield base, token
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_command_with_tokens_serves_the_network_and_guards_it(served: tuple[str, str]) -> None:
    """With a token file it listens on 0.0.0.0: 401 without the token, 200 with it."""
    base, token = served
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{base}{DATA}", timeout=5)
    assert refused.value.code == 401
    request = urllib.request.Request(f"{base}{DATA}", headers=bearer(token))
    with urllib.request.urlopen(request, timeout=5) as response:
        assert json.load(response)["devices"][0]["device"] == "pi"


def test_command_tls_needs_both_files_that_load(tmp_path: Path) -> None:
    """--tls-cert without --tls-key, or files that are no certificate: one line, exit 2."""
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    alone = run(
        "dashboard", "--store", "t.db", "--port", "0", "--tls-cert", "cert.pem", cwd=tmp_path
    )
    assert alone.returncode == 2
    assert "give both --tls-cert and --tls-key" in alone.stderr
    broken = run(
        "dashboard",
        "--store",
        "t.db",
        "--port",
        "0",
        "--tls-cert",
        "cert.pem",
        "--tls-key",
        "cert.pem",
        cwd=tmp_path,
    )
    assert broken.returncode == 2
    assert "cannot load it" in broken.stderr
    assert "Traceback" not in broken.stderr


def test_command_serves_https_with_a_secure_cookie(tmp_path: Path) -> None:
    """--tls-cert/--tls-key: the dashboard answers https, and its session cookie is Secure."""
    import http.client
    import ssl

    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=60,
    )
    small_store(tmp_path / "t.db")
    token = run("dashboard", "token", "add", "ci", "--store", "t.db", cwd=tmp_path).stdout.strip()
    port = free_port()
    proc = subprocess.Popen(
        [
            *IOTPIPE,
            "dashboard",
            "--store",
            "t.db",
            "--port",
            str(port),
            "--tls-cert",
            "cert.pem",
            "--tls-key",
            "key.pem",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    context.check_hostname = False

    def login() -> http.client.HTTPResponse | None:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
        try:
            conn.request(
                "POST",
                "/login",
                body=f"token={token}",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            return conn.getresponse()
        except OSError:
            return None

    try:
        response = wait_for(login, 30, "the dashboard to answer https")
        assert response.status == 303
        cookie = response.headers["set-cookie"]
        assert "Secure" in cookie
        assert "HttpOnly" in cookie
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:8080", 200),
        ("localhost:8080", 200),
        ("[::1]:8080", 200),
        ("127.3.4.5", 200),
        ("evil.example", 421),
        ("evil.example:8080", 421),
        ("192.0.2.1:8080", 421),
    ],
)
def test_without_tokens_only_loopback_host_names_are_answered(
    store: Path, host: str, status: int
) -> None:
    """No token file: a Host that is not loopback (DNS rebinding) gets 421, headers included."""
    app = client(store, None, loopback_only=True)
    for url in (DATA, "/"):
        response = app.get(url, headers={"Host": host})
        assert response.status_code == status, (url, response.text)
        assert response.headers["x-frame-options"] == "DENY"
    if status == 421:
        assert "loopback host names" in app.get(DATA, headers={"Host": host}).json()["error"]


def test_command_without_tokens_refuses_a_rebound_host_name(tmp_path: Path) -> None:
    """``iotpipe dashboard`` on loopback without tokens answers 127.0.0.1, not another Host."""
    import http.client

    small_store(tmp_path / "t.db")
    port = free_port()
    proc = subprocess.Popen(
        [*IOTPIPE, "dashboard", "--store", "t.db", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def status(host: str) -> int | None:
        assert proc.poll() is None
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", DATA, headers={"Host": host})
            return conn.getresponse().status
        except OSError:
            return None
        finally:
            conn.close()

    try:
        assert wait_for(lambda: status(f"127.0.0.1:{port}"), 30, "the dashboard") == 200
        assert status(f"rebound.example:{port}") == 421
    finally:
        proc.terminate()
        proc.wait(timeout=10)
