"""``iotpipe consume``: the store writer (RabbitMQ -> SQLite, PostgreSQL or InfluxDB, exactly once)."""

from __future__ import annotations

import inspect
from typing import Annotated, Any

import typer

from iotpipe.options import AmqpUrlOption, ConfigOption, run_in_foreground
from iotpipe.settings import DEFAULT_STORE_URL

_EXAMPLES = """

[bold]Examples[/bold]

  [dim]# local RabbitMQ -> state/telemetry.db (SQLite, zero set-up)[/dim]
  iotpipe consume

  [dim]# another file, another broker[/dim]
  iotpipe consume --amqp amqp://iot:pw@rabbit:5672/ \\
      --store sqlite:////var/lib/iotpipe/telemetry.db

  [dim]# InfluxDB 2.x / 3.x / Cloud, or anything speaking its v2 write API[/dim]
  IOTPIPE_INFLUXDB__TOKEN=... iotpipe consume --store influxdb://influx:8086

  [dim]# PostgreSQL shared by several consumer hosts (exactly once, no Redis)[/dim]
  PGPASSWORD=... iotpipe consume --store postgresql://iotpipe@db:5432/iotpipe

  [dim]# everything from a file (commented sample: configs/consume.toml)[/dim]
  iotpipe consume --config configs/consume.toml
"""


def consume(
    *,
    config: ConfigOption = None,
    amqp: AmqpUrlOption = None,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="sqlite:///path/telemetry.db (relative), sqlite:////abs/path.db, or "
            "influxdb[s]://host:port (org, bucket, token from \\[influxdb]), or "
            "postgresql://user@host:5432/db (shared by many consumer hosts). "
            f"\\[default: {DEFAULT_STORE_URL}]",
            show_default=False,
        ),
    ] = None,
    queue: Annotated[
        str | None,
        typer.Option(
            "--queue", help="Queue to consume. \\[default: iotpipe.store]", show_default=False
        ),
    ] = None,
    http_port: Annotated[
        int | None,
        typer.Option(
            "--http-port",
            help="Port of /metrics and /healthz. \\[default: 9182]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Store telemetry from RabbitMQ, each reading exactly once.

    Declares its durable queue (quorum, with a delivery limit and dead-lettering
    to iotpipe.dead) bound to iotpipe.v1.#, writes batches to the store and
    acknowledges a batch only after the store committed it. Messages are
    deduplicated by id, so redeliveries and replays never add a second point.
    A store outage holds the batch and retries; nothing is lost. SIGTERM or
    Ctrl-C: finish the batch, acknowledge it, exit 0.
    """
    from consumers.service import Consumer
    from consumers.settings import ConsumeSettings, InfluxSettings
    from consumers.stores import open_store
    from iotpipe.settings import AmqpSettings, config_path, load

    path = config_path(config)
    amqp_settings = load(AmqpSettings, "amqp", config_file=path, overrides={"url": amqp})
    flags: dict[str, Any] = {"store": store, "queue": queue, "http_port": http_port}
    settings = load(ConsumeSettings, "consume", config_file=path, overrides=flags)
    influx = load(InfluxSettings, "influxdb", config_file=path)
    service = Consumer.from_settings(amqp_settings, settings, open_store(settings, influx))
    run_in_foreground(
        service,
        f"iotpipe consume {amqp_settings.broker} queue {settings.queue} -> {settings.target}; "
        f"http://{settings.http_host}:{settings.http_port}/metrics",
    )


consume.__doc__ = inspect.cleandoc(consume.__doc__ or "") + _EXAMPLES
