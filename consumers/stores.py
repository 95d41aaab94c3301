"""Open the store a ``--store`` URL names, with the settings it needs."""

from __future__ import annotations

from consumers.settings import ConsumeSettings, InfluxSettings, InfluxTarget, PostgresTarget
from consumers.store import Store


def open_store(settings: ConsumeSettings, influx: InfluxSettings) -> Store:
    """Open (and create if needed) the store of ``settings.store``.

    Raises:
        ConfigError: the store cannot be opened with these settings.
        CertificateError: an ``influxdbs://`` server's TLS certificate failed verification.
    """
    target = settings.target
    if isinstance(target, InfluxTarget):
        return _open_influx(target, settings, influx)
    if isinstance(target, PostgresTarget):
        from consumers.pg_store import PostgresStore

        return PostgresStore(
            target.url, retention_ms=settings.retention_ms, durability=settings.durability
        )
    from consumers.sqlite_store import SQLiteStore

    return SQLiteStore(
        target.path,
        retention_ms=settings.retention_ms,
        durability=settings.durability,
        busy_timeout_s=settings.busy_timeout,
    )


def _open_influx(target: InfluxTarget, settings: ConsumeSettings, influx: InfluxSettings) -> Store:
    from consumers.influx_store import InfluxStore
    from consumers.seen import RedisSeen
    from consumers.state import StateDB

    state = StateDB(
        settings.state_path,
        retention_ms=settings.retention_ms,
        durability=settings.durability,
        busy_timeout_s=settings.busy_timeout,
    )
    seen = (
        RedisSeen(settings.dedupe, retention_ms=settings.retention_ms) if settings.dedupe else None
    )
    store = InfluxStore(
        target.url,
        org=influx.org,
        bucket=influx.bucket,
        token=influx.token.get_secret_value(),
        state=state,
        seen=seen,
        measurement=influx.measurement,
        timeout_s=influx.timeout,
        tls=influx.tls,
    )
    store.check_certificate()
    return store
