"""The store writer against the real RabbitMQ and a real SQLite store."""

from __future__ import annotations

import json
import random
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from consumers.query import iter_readings, store_stats
from consumers.settings import ConsumeSettings, InfluxSettings
from consumers.sqlite_store import SQLiteStore
from consumers.store import DeviceStatus, Message, StoreUnavailable, WriteResult
from iotpipe.amqp import HEADER_ERROR
from iotpipe.envelope import MAX_PAYLOAD
from iotpipe.receipts import Receipt, SeqSet, decode_receipt
from iotpipe.settings import AmqpSettings, load
from tests.conftest import wait_for
from tests.consumers.conftest import (
    T0_MS,
    Outgoing,
    Running,
    SiteQueue,
    assert_receipt_properties,
    drain,
    publish,
    raw,
    status,
    take,
    telemetry,
)

StartConsumer = Callable[[str, ConsumeSettings, Any], Running]


def stored_keys(path: Path) -> Counter[tuple[str, str, str, str, int]]:
    """Every stored reading as (id, site, device, sensor, ts), counted."""
    return Counter(
        (row.id, row.site, row.device, row.sensor, row.ts) for row in iter_readings(path)
    )


def expected_keys(messages: Sequence[Outgoing]) -> Counter[tuple[str, str, str, str, int]]:
    """The readings ``messages`` carry, once each."""
    keys: Counter[tuple[str, str, str, str, int]] = Counter()
    for m in {m.id: m for m in messages if m.id}.values():
        env = json.loads(m.body)
        for r in env["readings"]:
            keys[(env["id"], env["site"], env["device"], r["sensor"], _rfc3339(env["ts"]))] = 1
    return keys


def _rfc3339(ts_ms: int) -> str:
    from datetime import UTC, datetime

    dt = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"


def stored_total(running: Running) -> float:
    """Messages stored plus duplicates absorbed, from the consumer's own counters."""
    m = running.consumer.totals
    return m.messages + m.duplicates


def fleet(site: str, devices: int, per_device: int) -> list[Outgoing]:
    """``per_device`` consecutive messages from each of ``devices`` devices."""
    return [telemetry(site, f"d{d}", seq) for d in range(devices) for seq in range(per_device)]


def test_every_reading_once_when_all_arrives_twice_and_reordered(
    site_queue: SiteQueue, start_consumer: StartConsumer, tmp_path: Path
) -> None:
    messages = fleet(site_queue.site, devices=4, per_device=150)
    again = list(messages)
    random.Random(7).shuffle(again)
    db = tmp_path / "telemetry.db"
    running = start_consumer(
        site_queue.url, site_queue.settings(f"sqlite:///{db}"), SQLiteStore(db)
    )
    publish(site_queue.url, [*messages[::-1], *again])

    assert wait_for(lambda: stored_total(running) >= 2 * len(messages), 60)
    assert stored_keys(db) == expected_keys(messages)
    totals = running.consumer.totals
    assert (totals.messages, totals.duplicates) == (len(messages), len(messages))
    stats = store_stats(db)
    assert stats.readings == 2 * len(messages)
    assert sum(d.gaps for d in stats.devices) == 0
    # First pass arrives newest-first: every message but the highest seq of a device is late.
    assert sum(d.out_of_order for d in stats.devices) == len(messages) - 4
    assert wait_for(lambda: site_queue.ready() == 0, 10)


def test_status_messages_keep_the_newest_state(
    site_queue: SiteQueue, start_consumer: StartConsumer, tmp_path: Path
) -> None:
    db = tmp_path / "telemetry.db"
    running = start_consumer(
        site_queue.url, site_queue.settings(f"sqlite:///{db}"), SQLiteStore(db)
    )
    site = site_queue.site
    publish(
        site_queue.url,
        [
            status(site, "d1", "online", T0_MS),
            status(site, "d1", "offline", T0_MS + 5000),
            status(site, "d1", "online", T0_MS + 1000),  # late copy of an older birth
            telemetry(site, "d1", 0),
        ],
    )
    assert wait_for(lambda: running.consumer.statuses >= 3, 30)
    assert wait_for(lambda: running.consumer.totals.messages >= 1, 30)
    (device,) = store_stats(db).devices
    assert (device.site, device.device, device.state) == (site, "d1", "offline")


def test_poison_is_dead_lettered_with_its_reason_and_good_messages_flow(
    site_queue: SiteQueue, start_consumer: StartConsumer, tmp_path: Path
) -> None:
    site = site_queue.site
    good = fleet(site, devices=1, per_device=20)
    valid = json.loads(good[0].body)
    poison = {
        "bad_json": raw(site, "d0", b'{"site": "' + site.encode() + b'", '),
        "bad_encoding": raw(site, "d0", b'{"site": "' + site.encode() + b'\xff"}'),
        "schema": raw(site, "d0", json.dumps(valid | {"seq": -1}).encode()),
        "unsupported_version": raw(site, "d0", json.dumps(valid | {"v": "2.0"}).encode()),
        "topic_mismatch": raw(site, "d9", json.dumps(valid).encode()),
        "too_large": raw(site, "d0", site.encode() + b" " * (MAX_PAYLOAD + 1)),
    }
    db = tmp_path / "telemetry.db"
    running = start_consumer(
        site_queue.url, site_queue.settings(f"sqlite:///{db}"), SQLiteStore(db)
    )
    publish(site_queue.url, [*good[:10], *poison.values(), *good[10:]])

    assert wait_for(lambda: running.consumer.totals.messages >= 20, 30)
    dead: list[tuple[str, dict[str, Any], bytes]] = []
    assert wait_for(lambda: len(dead.extend(site_queue.dead_letters()) or dead) >= 6, 30)
    assert sorted(key for key, _, _ in dead) == sorted(f"consumer.{r}" for r in poison)
    for key, headers, body in dead:
        reason = key.removeprefix("consumer.")
        assert body == poison[reason].body, "the body is dead-lettered unchanged"
        assert headers[HEADER_ERROR], "a readable error travels with it"
    assert stored_keys(db) == expected_keys(good)


class Refusing:
    """A SQLite store that refuses messages whose id starts with ``poison``."""

    def __init__(self, path: Path) -> None:
        self.inner = SQLiteStore(path)
        self.offered: Counter[str] = Counter()

    def write(self, messages: Sequence[Message], statuses: Sequence[DeviceStatus]) -> WriteResult:
        keep = [n for n, m in enumerate(messages) if not m.id.startswith("poison")]
        for m in messages:
            self.offered[m.id] += 1
        result = self.inner.write([messages[n] for n in keep], statuses)
        result.rejected = {
            n: "value out of range for this sensor"
            for n, m in enumerate(messages)
            if m.id.startswith("poison")
        }
        return result

    def prune(self, now_ms: int) -> int:
        return self.inner.prune(now_ms)

    def check(self) -> None:
        self.inner.check()

    def close(self) -> None:
        self.inner.close()


def test_a_refused_message_is_retried_up_to_the_delivery_limit_then_dead_lettered(
    site_queue: SiteQueue, start_consumer: StartConsumer, tmp_path: Path
) -> None:
    site = site_queue.site
    good = fleet(site, devices=1, per_device=10)
    bad = telemetry(site, "d1", 0, msg_id=f"poison-{site}")
    store = Refusing(tmp_path / "t.db")
    settings = site_queue.settings("sqlite:///t.db", delivery_limit=3)
    running = start_consumer(site_queue.url, settings, store)
    publish(site_queue.url, [*good[:5], bad, *good[5:]])

    dead: list[tuple[str, dict[str, Any], bytes]] = []
    assert wait_for(lambda: len(dead.extend(site_queue.dead_letters()) or dead) >= 1, 60)
    ((key, headers, body),) = dead
    assert key == "consumer.store_rejected"
    assert body == bad.body
    assert "value out of range" in headers[HEADER_ERROR]
    assert store.offered[bad.id or ""] == 3, "offered once per allowed delivery"
    assert running.consumer.requeued == 2
    assert stored_keys(tmp_path / "t.db") == expected_keys(good)


class Flaky:
    """A SQLite store that is unavailable while ``down`` is set."""

    def __init__(self, path: Path) -> None:
        self.inner = SQLiteStore(path)
        self.down = True
        self.failures = 0

    def write(self, messages: Sequence[Message], statuses: Sequence[DeviceStatus]) -> WriteResult:
        if self.down:
            self.failures += 1
            raise StoreUnavailable("disk full (simulated)")
        return self.inner.write(messages, statuses)

    def prune(self, now_ms: int) -> int:
        return self.inner.prune(now_ms)

    def check(self) -> None:
        if self.down:
            raise StoreUnavailable("disk full (simulated)")

    def close(self) -> None:
        self.inner.close()


def test_a_store_outage_holds_the_batch_unacknowledged_and_loses_nothing(
    site_queue: SiteQueue, start_consumer: StartConsumer, tmp_path: Path
) -> None:
    messages = fleet(site_queue.site, devices=2, per_device=50)
    store = Flaky(tmp_path / "t.db")
    settings = site_queue.settings("sqlite:///t.db", delivery_limit=2)
    running = start_consumer(site_queue.url, settings, store)
    publish(site_queue.url, messages)

    assert wait_for(lambda: store.failures >= 3, 30), "retried with backoff"
    assert site_queue.ready() == 0, "the batch is held (unacknowledged), not requeued"
    healthy, details = running.consumer.health()
    assert not healthy
    assert "disk full" in details["store"]
    store.down = False
    assert wait_for(lambda: running.consumer.totals.messages >= 100, 60)
    assert stored_keys(tmp_path / "t.db") == expected_keys(messages)
    assert running.consumer.requeued == 0, "an outage is not a refusal"
    assert site_queue.dead_letters() == []
    assert running.consumer.health()[0]


def test_metrics_and_healthz_are_served(
    site_queue: SiteQueue, start_consumer: StartConsumer, tmp_path: Path
) -> None:
    db = tmp_path / "telemetry.db"
    running = start_consumer(
        site_queue.url, site_queue.settings(f"sqlite:///{db}"), SQLiteStore(db)
    )
    publish(site_queue.url, fleet(site_queue.site, devices=1, per_device=3))
    assert wait_for(lambda: running.consumer.totals.messages >= 3, 30)
    port = running.consumer.http_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        health = json.load(resp)
    assert health["healthy"] is True
    assert health["amqp"] == "connected"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert "iotpipe_consumer_stored_readings_total 6.0" in text
    assert 'iotpipe_consumer_received_total{kind="telemetry"} 3.0' in text
    assert "iotpipe_consumer_seq_gaps 0.0" in text
    publish(site_queue.url, [telemetry(site_queue.site, "d0", 10)])  # seq 3..9 never arrive
    assert wait_for(lambda: running.consumer.totals.messages >= 4, 30)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert "iotpipe_consumer_seq_gaps 7.0" in resp.read().decode()


def test_sample_config_loads_as_the_defaults_and_lists_every_option(tmp_path: Path) -> None:
    """configs/consume.toml loads as the defaults, and uncommenting its options changes none."""
    sample = Path(__file__).resolve().parents[2] / "configs" / "consume.toml"
    assert load(ConsumeSettings, "consume", config_file=sample, environ={}) == ConsumeSettings()
    assert load(InfluxSettings, "influxdb", config_file=sample, environ={}) == InfluxSettings()
    assert load(AmqpSettings, "amqp", config_file=sample, environ={}) == AmqpSettings()
    uncommented = tmp_path / "consume.toml"
    uncommented.write_text(
        "\n".join(
            line.removeprefix("# ") if line.startswith("# ") and " = " in line else line
            for line in sample.read_text().splitlines()
            if not line.startswith(("# [", "# ca_file", "# cert_file", "# key_file", "# insecure"))
        )
    )
    data = tomllib.loads(uncommented.read_text())
    assert set(data["consume"]) == set(ConsumeSettings.model_fields), "every option is listed"
    # [influxdb.tls] is shown as a commented table (left out above, like [amqp.tls]).
    assert set(data["influxdb"]) | {"tls"} == set(InfluxSettings.model_fields), "every option"
    assert "# [influxdb.tls]" in sample.read_text()
    assert load(ConsumeSettings, "consume", config_file=uncommented, environ={}) == (
        ConsumeSettings()
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///state/t.db", "state/t.db"),
        ("sqlite:////var/lib/t.db", "/var/lib/t.db"),
        ("state/t.db", "state/t.db"),
    ],
)
def test_sqlite_store_urls(url: str, expected: str) -> None:
    from consumers.settings import SqliteTarget, parse_store

    assert parse_store(url) == SqliteTarget(Path(expected))


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mysql://db/x", "unknown store type"),
        ("sqlite://", "sqlite:///relative.db"),
        ("influxdb://user:pw@host:8086", "token goes in"),
        ("influxdb://:8086", "influxdb://host:port"),
        ("", "empty"),
    ],
)
def test_bad_store_urls_say_what_is_allowed(url: str, problem: str) -> None:
    from consumers.settings import parse_store
    from iotpipe.errors import ConfigError

    with pytest.raises(ConfigError, match=problem):
        parse_store(url)


@pytest.mark.parametrize("url", ["influxdb://u:T0ken-pw@h:8086", "influxdb://u:T0ken/pw@h:8086"])
def test_a_store_url_with_credentials_is_refused_without_showing_them(url: str) -> None:
    """The token belongs in [influxdb].token; the error names the URL with the secret hidden."""
    from consumers.settings import ConsumeSettings
    from iotpipe.errors import ConfigError
    from iotpipe.settings import load

    with pytest.raises(ConfigError, match="token goes in") as caught:
        load(ConsumeSettings, "consume", overrides={"store": url}, environ={})
    assert "T0ken" not in str(caught.value)
    assert "u:***@h:8086" in str(caught.value)


def test_influx_store_urls() -> None:
    from consumers.settings import InfluxTarget, parse_store

    assert parse_store("influxdb://vm:8428") == InfluxTarget("http://vm:8428")
    assert parse_store("influxdbs://cloud.example.com") == InfluxTarget(
        "https://cloud.example.com:8086"
    )


def test_the_consumer_declares_a_queue_that_keeps_dead_letters(
    site_queue: SiteQueue, start_consumer: StartConsumer, tmp_path: Path
) -> None:
    """Its own dead letters (and the broker's, at the delivery limit) have somewhere to go."""
    dlq = f"{site_queue.name}.dlq"
    site_queue.extra.append(dlq)
    db = tmp_path / "telemetry.db"
    settings = site_queue.settings(f"sqlite:///{db}", dead_letter_queue=dlq)
    running = start_consumer(site_queue.url, settings, SQLiteStore(db))
    poison = raw(site_queue.site, "d0", b"not json " + site_queue.site.encode())
    publish(site_queue.url, [poison])
    assert wait_for(lambda: running.consumer.dead_lettered >= 1, 30)
    kept = [m for m in drain(site_queue.url, dlq) if m[2] == poison.body]
    assert [key for key, _, _ in kept] == ["consumer.bad_json"]


def test_receipts_cover_exactly_what_the_consumer_stored(
    site_queue: SiteQueue, start_consumer: StartConsumer, tmp_path: Path
) -> None:
    """Receipts on iotpipe.receipts name every stored seq of each device, and nothing else."""
    db = tmp_path / "telemetry.db"
    settings = site_queue.settings(f"sqlite:///{db}", receipt_interval=0.2)
    running = start_consumer(site_queue.url, settings, SQLiteStore(db))
    queue = site_queue.bind_receipts()
    site = site_queue.site
    stored = {"d0": list(range(0, 40)), "d1": [*range(3, 10), *range(20, 31)]}
    publish(site_queue.url, [telemetry(site, d, seq) for d, seqs in stored.items() for seq in seqs])
    assert wait_for(lambda: running.consumer.totals.messages >= 58, 30)

    covered: dict[str, SeqSet] = {"d0": SeqSet(), "d1": SeqSet()}
    messages: list[tuple[str, Any, bytes]] = []

    def all_receipted() -> bool:
        for message in take(site_queue.url, queue):
            messages.append(message)
            receipt = decode_receipt(message[2])
            assert isinstance(receipt, Receipt), receipt
            assert (receipt.site, [e.boot for e in receipt.stored]) == (site, ["b1"])
            for lo, hi in receipt.stored[0].ranges:
                covered[receipt.device].add_range(lo, hi)
        return all(list(covered[d]) == seqs for d, seqs in stored.items())

    assert wait_for(all_receipted, 30), {d: s.ranges() for d, s in covered.items()}
    for key, props, _body in messages:
        device = key.split(".")[3]
        assert key == f"iotpipe.v1.{site}.{device}.receipt"
        assert_receipt_properties(props, site, device)
    registry = running.consumer.metrics.registry
    counter = "iotpipe_consumer_receipts_published_total"
    assert wait_for(lambda: registry.get_sample_value(counter) == len(messages), 5)
