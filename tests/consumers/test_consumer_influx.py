"""The consumer's InfluxDB path end to end: RabbitMQ -> consumer -> a private VictoriaMetrics.

The SQLite-path twins are ``test_consumer.py`` and ``test_consumer_faults.py``; these tests reuse
their helpers. VictoriaMetrics runs without ``-dedup.minScrapeInterval``, so it keeps every
sample it is sent: a reading written twice shows up as two samples at one timestamp. That makes
the export an exact count of how often each point was written. Rows printed with ``pytest -s``
report what the InfluxDB path shows under faults.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import signal
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from consumers.settings import InfluxSettings
from consumers.stores import open_store
from tests.conftest import wait_for
from tests.consumers.conftest import Outgoing, SiteQueue, publish
from tests.consumers.test_consumer import StartConsumer, fleet, stored_total
from tests.consumers.test_consumer_faults import (
    Processes,
    kill_while_streaming,
    stream,
    write_config,
)
from tests.consumers.test_influx_store import of_site
from tests.victoria import Victoria, redis_keys

pytestmark = [pytest.mark.rabbitmq, pytest.mark.tsdb]

#: RedisSeen's default key prefix: ``[consume]`` has no setting for another one.
SEEN_PREFIX = "iotpipe:seen:"

#: A reading as VictoriaMetrics identifies it: (device, sensor, timestamp in ms).
Key = tuple[str, str, int]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Consumer processes of one test (``test_consumer_faults.Processes``), killed at teardown."""
    procs = Processes(tmp_path)
    yield procs
    procs.kill_all()


def store_url(port: int) -> str:
    """The ``--store`` URL of a VictoriaMetrics on ``127.0.0.1:port``."""
    return f"influxdb://127.0.0.1:{port}"


def influx_config(path: Path, queue: SiteQueue, port: int, state: Path, **consume: object) -> Path:
    """``test_consumer_faults.write_config`` with an InfluxDB store and its own state file."""
    config = write_config(path, queue, state, state_path=str(state), **consume)
    sqlite_store = f'store = "sqlite:///{state}"'
    text = config.read_text()
    assert sqlite_store in text
    config.write_text(text.replace(sqlite_store, f'store = "{store_url(port)}"'))
    return config


def expected_readings(messages: Sequence[Outgoing]) -> dict[Key, float]:
    """The value of every reading ``messages`` carry, once per distinct id."""
    out: dict[Key, float] = {}
    for m in {m.id: m for m in messages if m.id}.values():
        env = json.loads(m.body)
        for r in env["readings"]:
            out[env["device"], r["sensor"], r.get("ts", env["ts"])] = float(r["value"])
    return out


def samples(victoria: Victoria, site: str) -> dict[Key, list[float]]:
    """Every raw sample VictoriaMetrics holds for ``site``, per reading."""
    out: dict[Key, list[float]] = {}
    for series in victoria.export(of_site(site)):
        assert series.name == "telemetry_value", series.labels
        assert series.labels["unit"] == "Cel"
        for ts, value in zip(series.timestamps, series.values, strict=True):
            key = (series.labels["device"], series.labels["sensor"], ts)
            out.setdefault(key, []).append(value)
    return out


def state_totals(*states: Path) -> tuple[int, int]:
    """(messages stored, duplicates absorbed) recorded in consumers' state files."""
    stored = duplicates = 0
    for path in states:
        if not path.exists():
            continue
        uri = f"file:{path}?mode=ro"
        with (
            contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn,
            contextlib.suppress(sqlite3.OperationalError),  # the tables are not created yet
        ):
            row = conn.execute("SELECT sum(messages), sum(duplicates) FROM streams").fetchone()
            stored += row[0] or 0
            duplicates += row[1] or 0
    return stored, duplicates


def get(port: int | None, path: str) -> tuple[int, str]:
    """(status, body) of a GET on the consumer's HTTP endpoint."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def metric(port: int | None, name: str) -> float:
    """One unlabelled sample of the consumer's ``/metrics``."""
    _, text = get(port, "/metrics")
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_every_reading_one_sample_when_all_arrives_twice_and_reordered(
    site_queue: SiteQueue, start_consumer: StartConsumer, victoria: Victoria, tmp_path: Path
) -> None:
    """Every message replayed twice, out of order: VictoriaMetrics holds one sample per reading."""
    messages = fleet(site_queue.site, devices=4, per_device=150)
    again = list(messages)
    random.Random(7).shuffle(again)
    settings = site_queue.settings(
        store_url(victoria.port), state_path=tmp_path / "state.db", durability="process"
    )
    running = start_consumer(site_queue.url, settings, open_store(settings, InfluxSettings()))
    publish(site_queue.url, [*messages[::-1], *again])

    assert wait_for(lambda: stored_total(running) >= 2 * len(messages), 60)
    expected = expected_readings(messages)
    assert samples(victoria, site_queue.site) == {k: [v] for k, v in expected.items()}
    totals = running.consumer.totals
    assert (totals.messages, totals.readings) == (len(messages), len(expected))
    assert totals.duplicates == len(messages), "every replayed copy absorbed"
    # First pass arrives newest-first: every message but the highest seq of a device is late.
    assert totals.out_of_order == len(messages) - 4
    assert wait_for(lambda: site_queue.ready() == 0, 10)
    assert site_queue.dead_letters() == []


@pytest.mark.slow
def test_sigkill_mid_stream_loses_nothing_and_only_rewrites_identical_points(
    site_queue: SiteQueue, processes: Processes, victoria: Victoria, tmp_path: Path
) -> None:
    """Consumers SIGKILLed and crashing after commit lose no reading; rewrites are identical."""
    state = tmp_path / "state.db"
    batch_size = 500
    config = influx_config(
        tmp_path / "consume.toml", site_queue, victoria.port, state, batch_size=batch_size
    )
    sent = stream(site_queue.site, devices=20, per_device=550, copies=0.1, seed=11)
    distinct = len({m.id for m in sent})
    assert distinct >= 10_000

    kills, crashes = kill_while_streaming(processes, config, site_queue, sent, state)

    expected = expected_readings(sent)
    got = samples(victoria, site_queue.site)
    lost = sum(1 for k in expected if k not in got)
    doubled = sum(1 for v in got.values() if len(v) > 1)
    extra = sum(len(v) - 1 for v in got.values())
    # Only a SIGKILL between the write and the dedupe record rewrites points, one batch at most
    # (the runner crashes after the record); bound by every kill and crash all the same.
    per_batch = batch_size * 2  # readings per message
    bound = (kills + crashes) * per_batch
    print(
        f"\nInfluxDB path (VictoriaMetrics, no dedup): consumer SIGKILLed {kills}x, crashed "
        f"after commit {crashes}x: sent {len(sent)} msgs ({distinct} distinct, "
        f"{len(expected)} readings); {sum(map(len, got.values()))} samples; lost {lost}; "
        f"readings with a second identical sample (rewritten after a crash between the "
        f"InfluxDB write and the dedupe record) {doubled} ({extra} extra samples, "
        f"bound {bound}); differing samples 0"
    )
    assert lost == 0
    assert set(got) == set(expected), "no sample outside the readings sent"
    differing = {k: v for k, v in got.items() if set(v) != {expected[k]}}
    assert not differing, "every rewrite is the identical point (same time, same value)"
    assert extra <= bound
    assert site_queue.dead_letters() == []


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.parametrize(
    "arrival",
    ["replayed", "retransmitted"],
)
def test_two_hosts_sharing_redis_write_each_reading_once(
    arrival: str,
    site_queue: SiteQueue,
    processes: Processes,
    victoria: Victoria,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """Two competing consumers with their own state files, sharing Redis: one sample per reading.

    ``replayed``: the copies are sent after the originals are stored. ``retransmitted``: each
    copy right behind its original, so the two hosts (served round-robin) hold them at once.
    """
    site = site_queue.site
    states = [tmp_path / f"host{n}" / "state.db" for n in range(2)]
    configs = [
        influx_config(
            tmp_path / f"host{n}.toml",
            site_queue,
            victoria.port,
            states[n],
            dedupe=redis_url,
            prefetch=200,
            batch_size=100,
        )
        for n in range(2)
    ]
    messages = fleet(site, devices=10, per_device=100)
    again = list(messages)
    random.Random(5).shuffle(again)
    # Ids are "<site>-<device>-<boot>-<seq>": the default prefix plus the site is this test's own.
    with redis_keys(redis_url, f"{SEEN_PREFIX}{site}-") as client:
        consumers = [processes.consume(config) for config in configs]
        assert wait_for(lambda: all("consuming" in processes.log(n) for n in (0, 1)), 60), (
            processes.logs()
        )
        if arrival == "replayed":
            publish(site_queue.url, messages)
            assert wait_for(lambda: state_totals(*states)[0] >= len(messages), 60)
            publish(site_queue.url, again)
        else:
            publish(site_queue.url, [m for m in messages for _ in range(2)])
        assert wait_for(lambda: sum(state_totals(*states)) >= 2 * len(messages), 60), (
            f"{state_totals(*states)}\n{processes.logs()}"
        )
        assert wait_for(lambda: site_queue.ready() == 0, 30)
        for proc in consumers:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(30) for proc in consumers] == [0, 0], processes.logs()
        keys = sum(1 for _ in client.scan_iter(match=f"{SEEN_PREFIX}{site}-*", count=1000))

    expected = expected_readings(messages)
    got = samples(victoria, site)
    shares = [state_totals(path) for path in states]
    print(
        f"\nInfluxDB path, 2 hosts sharing Redis, copies {arrival}: sent {2 * len(messages)} msgs "
        f"({len(messages)} distinct, {len(expected)} readings); "
        f"{sum(map(len, got.values()))} samples; "
        f"readings with a second sample {sum(1 for v in got.values() if len(v) > 1)}; "
        f"(stored, duplicates) per host {shares}"
    )
    assert keys == len(messages), "every id recorded in Redis"
    assert got == {k: [v] for k, v in expected.items()}
    assert state_totals(*states) == (len(messages), len(messages))
    assert all(stored > 0 for stored, _ in shares), "both hosts shared the work"
    assert site_queue.dead_letters() == []


@pytest.mark.slow
def test_influxdb_down_holds_the_batch_then_stores_everything_once(
    site_queue: SiteQueue, start_consumer: StartConsumer, tmp_path: Path
) -> None:
    """With InfluxDB down the batch waits unacknowledged; when it is back, each reading lands once."""
    (tmp_path / "vm").mkdir()
    server = Victoria(tmp_path / "vm")  # a private one: its port stays closed until start()
    messages = fleet(site_queue.site, devices=2, per_device=50)
    settings = site_queue.settings(store_url(server.port), state_path=tmp_path / "state.db")
    running = start_consumer(site_queue.url, settings, open_store(settings, InfluxSettings()))
    port = running.consumer.http_port
    try:
        publish(site_queue.url, messages)
        errors = "iotpipe_consumer_store_errors_total"
        assert wait_for(lambda: metric(port, errors) >= 3, 30), "retried with backoff"
        assert site_queue.ready() == 0, "the batch is held (unacknowledged), not requeued"
        status, body = get(port, "/healthz")
        assert status == 503
        assert f"InfluxDB at {server.url}" in json.loads(body)["store"]
        assert metric(port, "iotpipe_consumer_store_up") == 0

        server.start()
        assert wait_for(lambda: running.consumer.totals.messages >= len(messages), 60)
        assert samples(server, site_queue.site) == {
            k: [v] for k, v in expected_readings(messages).items()
        }
        assert get(port, "/healthz")[0] == 200
        assert running.consumer.requeued == 0, "an outage is not a refusal"
        assert site_queue.ready() == 0
        assert site_queue.dead_letters() == []
    finally:
        running.stop()
        server.stop()
