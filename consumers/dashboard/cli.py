"""``iotpipe dashboard``: serve the query API and the web page over a SQLite store; its tokens.

Mounted by :mod:`iotpipe.cli` as a group whose callback serves (``iotpipe dashboard --store
...``) and whose ``token add|revoke|list`` manage the API tokens (:mod:`.tokens`). A token
file makes the dashboard require authentication; without one it serves loopback only. A mistake (an InfluxDB store, a file that is not an iotpipe store,
a port in use) raises :class:`~iotpipe.errors.ConfigError`: one line, exit 2. A store file that
does not exist *yet* is not a mistake: the dashboard starts, says so on stderr, and the page
shows "no store yet" (the API answers 503) until ``iotpipe consume`` creates it.
"""

from __future__ import annotations

import inspect
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from consumers.settings import InfluxTarget, PostgresTarget, store_path
from iotpipe.errors import ConfigError
from iotpipe.options import ConfigOption
from iotpipe.settings import DEFAULT_STORE_URL

if TYPE_CHECKING:
    from consumers.dashboard.tokens import TokenFile

__all__ = ["app", "dashboard"]

_EXAMPLES = """

[bold]Examples[/bold]

  [dim]# the default store of iotpipe consume, on http://127.0.0.1:8080/[/dim]
  iotpipe dashboard --store sqlite:///state/telemetry.db

  [dim]# reachable from the network: create a token first (printed once), then log in with it[/dim]
  iotpipe dashboard token add alice --store state/telemetry.db
  iotpipe dashboard --store state/telemetry.db --host 0.0.0.0 --port 8000

  [dim]# with TLS[/dim]
  iotpipe dashboard --store state/telemetry.db --host 0.0.0.0 --tls-cert cert.pem --tls-key key.pem

  [dim]# the API alone[/dim]
  curl -s -H "Authorization: Bearer $TOKEN" 'http://127.0.0.1:8080/api/v1/devices?site=home'
"""

app = typer.Typer(
    name="dashboard",
    invoke_without_command=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
token_app = typer.Typer(
    name="token",
    help="Create, revoke and list the dashboard's API tokens (docs/dashboard.md).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
)
app.add_typer(token_app)

StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="SQLite store (sqlite:///relative.db, sqlite:////abs.db or a file path) or "
        "PostgreSQL store (postgresql://user@host/db). "
        f"\\[default: \\[consume] store of --config, else {DEFAULT_STORE_URL}]",
        show_default=False,
    ),
]
TokensOption = Annotated[
    Path | None,
    typer.Option(
        "--tokens",
        help="Token file (names and SHA-256 hashes). Its existence turns authentication on. "
        "\\[default: beside the store: state/telemetry.db -> state/telemetry.tokens.json]",
        show_default=False,
        dir_okay=False,
    ),
]


def _listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket now, so a port in use is one clear line, not a log dump."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only for TCP
    # sockets, and without it every response on a kept-alive connection waits ~40 ms for the
    # client's delayed ACK (headers and body go out as two writes).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(
            "--port", port, f"cannot listen on {host}:{port} ({err.strerror})"
        ) from None
    return sock


PG_TOKENS = Path("state/dashboard.tokens.json")
"""The token file of a dashboard on a PostgreSQL store, unless --tokens names one."""


def _sqlite_store(store: str | None, config: Path | None) -> tuple[str, Path | PostgresTarget]:
    """The store URL (from --store, else the config) and its SQLite file or PostgreSQL
    database; InfluxDB refused."""
    if store is None:
        from consumers.settings import ConsumeSettings
        from iotpipe.settings import config_path, load

        store = load(ConsumeSettings, "consume", config_file=config_path(config)).store
    location = store_path(store)
    if isinstance(location, InfluxTarget):
        raise ConfigError(
            "--store",
            store,
            "the dashboard reads SQLite stores; for InfluxDB use Grafana "
            "(configs/grafana/, docs/grafana.md)",
        )
    return store, location


def _token_file(tokens: Path | None, store: str | None, config: Path | None) -> TokenFile:
    """The token file of --tokens, else the one beside the store."""
    from consumers.dashboard.tokens import TokenFile, default_tokens_path

    if tokens is not None:
        return TokenFile(tokens)
    location = _sqlite_store(store, config)[1]
    if isinstance(location, PostgresTarget):
        return TokenFile(PG_TOKENS)  # no file beside a database: a fixed local path
    return TokenFile(default_tokens_path(location))


def _check_tls(cert: Path | None, key: Path | None) -> None:
    """Both TLS files or neither, and they load: one line otherwise."""
    if cert is None and key is None:
        return
    if cert is None or key is None:
        given = "--tls-cert" if cert is not None else "--tls-key"
        raise ConfigError(given, cert or key, "give both --tls-cert and --tls-key")
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError("--tls-cert", cert, f"cannot load it with {key} ({err})") from None


@app.callback()
def dashboard(
    ctx: typer.Context,
    *,
    config: ConfigOption = None,
    store: StoreOption = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", help="Port to listen on.", min=0, max=65535)
    ] = 8080,
    tokens: TokensOption = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option("--tls-cert", help="TLS certificate (PEM): serve https.", dir_okay=False),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option("--tls-key", help="The certificate's private key (PEM).", dir_okay=False),
    ] = None,
) -> None:
    """Serve the web dashboard and the query API (docs/api.md) over a SQLite store.

    A postgresql:// store works too (no live view yet; tokens default to
    state/dashboard.tokens.json).

    The page at / shows sites, devices with their completeness, charts of any
    sensor over any range (hourly/minutely rollups keep months fast) and a live
    view. Reads the store read-only: safe while iotpipe consume is writing. A
    store file that does not exist yet is waited for (the API answers 503).
    InfluxDB stores: use Grafana (configs/grafana/, docs/grafana.md).

    Authentication is on when the token file exists (iotpipe dashboard token
    add): the API wants Authorization: Bearer TOKEN, the page a login. Without
    it the dashboard listens on loopback only.
    """
    if ctx.invoked_subcommand is not None:
        return
    store, location = _sqlite_store(store, config)
    token_file = _token_file(tokens, store, config)
    from consumers.dashboard.auth import is_loopback

    if not token_file.exists() and not is_loopback(host):
        raise ConfigError(
            "--host",
            host,
            "no authentication is configured: create a token first "
            f"(iotpipe dashboard token add NAME --store {store}), or listen on 127.0.0.1 "
            "behind a reverse proxy (docs/dashboard.md)",
        )
    _check_tls(tls_cert, tls_key)
    if token_file.exists():
        from consumers.dashboard.tokens import check_permissions

        check_permissions(token_file.path)
        token_file.entries()  # refuse a broken file now, not per request
    if isinstance(location, PostgresTarget):
        from consumers.pg_store import connect_readonly

        connect_readonly(location.url).close()  # unreachable, foreign or newer: refused now
    elif location.exists():
        from consumers.query import open_readonly

        open_readonly(location).close()  # refuse a foreign or newer file now, not per request
    else:
        typer.echo(
            f"iotpipe: store {location} does not exist yet; the dashboard shows it once "
            "iotpipe consume creates it",
            err=True,
        )

    import uvicorn

    from consumers.dashboard.app import create_app
    from iotpipe.compat import uvicorn_server
    from iotpipe.watchdog import Liveness, Supervisor

    stopping = threading.Event()
    liveness = Liveness()
    supervisor = Supervisor(liveness, "dashboard")  # sd_notify under systemd

    def on_exit() -> None:
        stopping.set()
        supervisor.stop()

    # live streams end at their next poll, so shutdown does not wait; SIGTERM and Ctrl-C are a
    # normal stop (exit 0) for iotpipe, not the signal's death uvicorn would re-raise
    server_class = uvicorn_server(on_exit=on_exit, liveness=liveness)

    sock = _listen(host, port)
    guarded = token_file if token_file.exists() else None
    server_config = uvicorn.Config(
        create_app(
            location,
            store_label=store,
            stopping=stopping,
            tokens=guarded,
            loopback_only=guarded is None,
        ),
        log_config=None,  # keep iotpipe's logging (--log-level)
        access_log=False,
        timeout_graceful_shutdown=5,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
    )
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if tls_cert is not None else "http"
    access = f"tokens in {token_file.path}" if guarded else "no authentication"
    typer.echo(
        f"iotpipe dashboard on {scheme}://{shown}:{sock.getsockname()[1]}/ ({store}; {access})",
        err=True,
    )
    supervisor.start()
    try:
        server_class(server_config).run(sockets=[sock])
    finally:
        supervisor.stop()
        supervisor.join()


dashboard.__doc__ = inspect.cleandoc(dashboard.__doc__ or "") + _EXAMPLES
app.info.help = dashboard.__doc__


@token_app.command("add")
def token_add(
    name: Annotated[str, typer.Argument(help="Who or what the token is for, e.g. alice, grafana.")],
    store: StoreOption = None,
    tokens: TokensOption = None,
    config: ConfigOption = None,
) -> None:
    """Create a token and print it (once: only its hash is kept).

    [bold]Examples[/bold]

      iotpipe dashboard token add alice --store state/telemetry.db
      iotpipe dashboard token add grafana --tokens /etc/iotpipe/dashboard-tokens.json
    """
    token_file = _token_file(tokens, store, config)
    token = token_file.add(name)
    typer.echo(token)
    typer.echo(
        f"iotpipe: token {name!r} added to {token_file.path}; it is shown only now. "
        "A running dashboard accepts it at once.",
        err=True,
    )


@token_app.command("revoke")
def token_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    store: StoreOption = None,
    tokens: TokensOption = None,
    config: ConfigOption = None,
) -> None:
    """Revoke a token: a running dashboard refuses it, and ends its sessions, at once.

    [bold]Examples[/bold]

      iotpipe dashboard token revoke alice --store state/telemetry.db
    """
    token_file = _token_file(tokens, store, config)
    token_file.revoke(name)
    typer.echo(f"iotpipe: token {name!r} revoked in {token_file.path}", err=True)


@token_app.command("list")
def token_list(
    store: StoreOption = None,
    tokens: TokensOption = None,
    config: ConfigOption = None,
) -> None:
    """List the tokens: name and creation time (the tokens themselves are not kept).

    [bold]Examples[/bold]

      iotpipe dashboard token list --store state/telemetry.db
    """
    token_file = _token_file(tokens, store, config)
    for entry in token_file.entries():
        typer.echo(f"{entry.name}\t{entry.created}")
