"""``iotpipe dashboard``: serve the query API and the web page over a SQLite store.

Mounted by :mod:`iotpipe.cli`. A mistake (an InfluxDB store, a file that is not an iotpipe store,
a port in use) raises :class:`~iotpipe.errors.ConfigError`: one line, exit 2. A store file that
does not exist *yet* is not a mistake: the dashboard starts, says so on stderr, and the page
shows "no store yet" (the API answers 503) until ``iotpipe consume`` creates it.
"""

from __future__ import annotations

import inspect
import socket
import threading
from typing import Annotated

import typer

from consumers.settings import InfluxTarget, store_path
from iotpipe.errors import ConfigError
from iotpipe.options import ConfigOption
from iotpipe.settings import DEFAULT_STORE_URL

__all__ = ["dashboard"]

_EXAMPLES = """

[bold]Examples[/bold]

  [dim]# the default store of iotpipe consume, on http://127.0.0.1:8080/[/dim]
  iotpipe dashboard --store sqlite:///state/telemetry.db

  [dim]# reachable from the network (no authentication: mind who can reach it)[/dim]
  iotpipe dashboard --store state/telemetry.db --host 0.0.0.0 --port 8000

  [dim]# the API alone[/dim]
  curl -s 'http://127.0.0.1:8080/api/v1/devices?site=home'
"""


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


def dashboard(
    *,
    config: ConfigOption = None,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="SQLite store: sqlite:///relative.db, sqlite:////abs.db or a file path. "
            f"\\[default: \\[consume] store of --config, else {DEFAULT_STORE_URL}]",
            show_default=False,
        ),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", help="Port to listen on.", min=0, max=65535)
    ] = 8080,
) -> None:
    """Serve the web dashboard and the query API (docs/api.md) over a SQLite store.

    The page at / shows sites, devices with their completeness, charts of any
    sensor over any range (hourly/minutely rollups keep months fast) and a live
    view. Reads the store read-only: safe while iotpipe consume is writing. A
    store file that does not exist yet is waited for (the API answers 503).
    InfluxDB stores: use Grafana (configs/grafana/, docs/grafana.md).
    """
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
    if location.exists():
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

    stopping = threading.Event()
    # live streams end at their next poll, so shutdown does not wait; SIGTERM and Ctrl-C are a
    # normal stop (exit 0) for iotpipe, not the signal's death uvicorn would re-raise
    server_class = uvicorn_server(on_exit=stopping.set)

    sock = _listen(host, port)
    server_config = uvicorn.Config(
        create_app(location, store_label=store, stopping=stopping),
        log_config=None,  # keep iotpipe's logging (--log-level)
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"iotpipe dashboard on http://{shown}:{sock.getsockname()[1]}/ ({store})", err=True)
    server_class(server_config).run(sockets=[sock])


dashboard.__doc__ = inspect.cleandoc(dashboard.__doc__ or "") + _EXAMPLES
