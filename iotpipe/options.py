"""Command-line options shared by every ``iotpipe`` command, and logging set-up.

Components declare their typer options with these aliases so that ``--config`` and ``--mqtt``
mean the same thing everywhere. Logging set-up lives in :mod:`iotpipe.logs` (re-exported here).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Protocol

import typer

from iotpipe.logs import KeyValueFormatter, setup_logging
from iotpipe.schema import redact_url
from iotpipe.watchdog import Liveness, Supervisor

__all__ = [
    "AmqpUrlOption",
    "ConfigOption",
    "KeyValueFormatter",
    "MqttUrlOption",
    "Service",
    "run_in_foreground",
    "setup_logging",
    "warn_password_in_flag",
]


def warn_password_in_flag(flag: str, section: str) -> Callable[[str | None], str | None]:
    """A typer callback for a URL flag: one line on stderr when the URL carries a password.

    A command line is readable by every user of the machine (``ps``, ``/proc/<pid>/cmdline``);
    the environment and a config file are not, so the warning points there. The value itself is
    returned unchanged: the command still runs.
    """

    def check(value: str | None) -> str | None:
        if value is not None and _has_password(value):
            typer.echo(
                f"warning: the password in {flag} is visible to every user in `ps`; "
                f"set IOTPIPE_{section.upper()}__URL or [{section}] url in the config file "
                "instead",
                err=True,
            )
        return value

    return check


#: RabbitMQ's built-in login (loopback only), the default URL's: public, nothing to warn about.
_PUBLIC_LOGIN = "://guest:guest@"


def _has_password(url: str) -> bool:
    return redact_url(url) != url and _PUBLIC_LOGIN not in url


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML config file (default: $IOTPIPE_CONFIG). Flags override it; "
        "IOTPIPE_<SECTION>__<FIELD> variables override the file.",
        show_default=False,
        dir_okay=False,
    ),
]

AmqpUrlOption = Annotated[
    str | None,
    typer.Option(
        "--amqp",
        help="RabbitMQ URL: amqp://user:pass@host:port/vhost or amqps://... "
        "\\[default: amqp://guest:guest@127.0.0.1:5672/]",
        show_default=False,
        callback=warn_password_in_flag("--amqp", "amqp"),
    ),
]

MqttUrlOption = Annotated[
    str | None,
    typer.Option(
        "--mqtt",
        help="MQTT broker URL: mqtt://\\[user:pass@]host\\[:port] or mqtts://... "
        "\\[default: mqtt://127.0.0.1:1883]",
        show_default=False,
        callback=warn_password_in_flag("--mqtt", "mqtt"),
    ),
]


class Service(Protocol):
    """A long-running component (the bridge, a consumer): ``run`` blocks until ``stop``.

    ``liveness`` is what its main loop reports to systemd's watchdog (:mod:`iotpipe.watchdog`).
    """

    liveness: Liveness

    def run(self) -> None:
        """Serve until stopped."""

    def stop(self) -> None:
        """Ask :meth:`run` to finish its work in hand and return (safe from a signal handler)."""


def run_in_foreground(service: Service, banner: str) -> None:
    """Print ``banner`` to stderr and run ``service`` until SIGTERM or SIGINT stops it gracefully.

    Under systemd (``Type=notify``) it also sends ``READY=1`` once the service serves,
    ``WATCHDOG=1`` while its main loop turns and ``STOPPING=1`` on the signal.
    """
    supervisor = Supervisor(service.liveness, type(service).__name__.lower())

    def stop(*_: object) -> None:
        supervisor.stop()
        service.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    typer.echo(banner, err=True)
    supervisor.start()
    try:
        service.run()
    finally:
        supervisor.stop()
        supervisor.join()
