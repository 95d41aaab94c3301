"""Consumers under faults: SIGKILL mid-stream, death between commit and ack, competing processes.

Each test runs ``iotpipe consume`` as real processes against the shared RabbitMQ (a queue of its
own) and a SQLite store, publishes a stream of telemetry with known ids (and copies of some of
them, as retransmitting devices send), kills consumers while it flows, then lets one consumer
finish and compares the store with what was sent. It prints one row: sent, distinct, stored
readings, lost, doubled, dead-lettered (``pytest -s`` shows it).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from consumers.query import iter_readings
from consumers.settings import PostgresTarget
from tests.conftest import IOTPIPE, wait_for
from tests.consumers.conftest import Outgoing, SiteQueue, publish, telemetry
from tests.consumers.crashing_consumer import EXIT_CODE

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("IOTPIPE_")}


def write_config(
    path: Path, queue: SiteQueue, db: Path | PostgresTarget, **consume: object
) -> Path:
    """A config file for consumer processes on the test's queue (a SQLite or PostgreSQL store)."""
    store = db.url if isinstance(db, PostgresTarget) else f"sqlite:///{db}"
    lines = [
        "[amqp]",
        f'url = "{queue.url}"',
        "[consume]",
        f'store = "{store}"',
        f'queue = "{queue.name}"',
        f'bindings = ["iotpipe.v1.{queue.site}.#"]',
        *(
            f"{k} = {json.dumps(v)}"
            for k, v in (
                {"http_port": 0, "batch_latency": 0.05, "batch_size": 500} | consume
            ).items()
        ),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


class Processes:
    """Consumer processes started by a test; all killed at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def consume(self, config: Path) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"consumer-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [*IOTPIPE, "--log-level", "info", "consume", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=self.workdir,
        )
        self.procs.append(proc)
        return proc

    def crashing(self, config: Path, after_commits: int) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"crashing-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.consumers.crashing_consumer",
                str(config),
                f"{after_commits}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=Path(__file__).resolve().parents[2],
        )
        self.procs.append(proc)
        return proc

    def log(self, n: int) -> str:
        """The output of the ``n``-th process started."""
        path = sorted(self.workdir.glob(f"*-{n}.log"))
        return path[0].read_text(errors="replace") if path else ""

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
            for p in sorted(self.workdir.glob("*.log"))
        )

    def kill_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.kill_all()


def stored_messages(db: Path | PostgresTarget) -> int:
    """Distinct message ids committed so far (0 before the store exists or while it is down)."""
    if isinstance(db, PostgresTarget):
        from tests.postgres import count_seen_ids

        return count_seen_ids(db.url)
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def stream(site: str, devices: int, per_device: int, copies: float, seed: int) -> list[Outgoing]:
    """Messages of ``devices`` devices, plus re-sent copies of a ``copies`` share of them."""
    rng = random.Random(seed)
    messages = [telemetry(site, f"d{d}", s) for s in range(per_device) for d in range(devices)]
    for m in rng.sample(messages, int(len(messages) * copies)):
        messages.insert(rng.randrange(len(messages)), m)
    return messages


def report(name: str, sent: Sequence[Outgoing], db: Path | PostgresTarget) -> tuple[int, int]:
    """Print the row and return (lost, doubled) readings."""
    wanted = {m.id: m.readings for m in sent}
    got: dict[str, int] = {}
    for row in iter_readings(db):
        got[row.id] = got.get(row.id, 0) + 1
    lost = sum(max(0, n - got.get(i or "", 0)) for i, n in wanted.items())
    doubled = sum(max(0, got.get(i or "", 0) - n) for i, n in wanted.items())
    doubled += sum(n for i, n in got.items() if i not in wanted)
    print(
        f"\n{name}: sent {len(sent)} msgs ({len(wanted)} distinct, "
        f"{sum(wanted.values())} readings); stored {sum(got.values())} readings; "
        f"lost {lost}; doubled {doubled}"
    )
    return lost, doubled


def kill_while_streaming(
    processes: Processes,
    config: Path,
    queue: SiteQueue,
    sent: Sequence[Outgoing],
    db: Path | PostgresTarget,
) -> tuple[int, int]:
    """Stream ``sent`` while consumers are SIGKILLed mid-stream and die after a commit (3x each),
    then let one consumer finish and stop it with SIGTERM.

    ``db`` is the file whose ``messages`` table counts what was committed (the SQLite store, or
    an InfluxDB consumer's state file). Returns (kills, crashes).
    """
    distinct = len({m.id for m in sent})
    # The first consumer declares the queue; messages published before it exists are unroutable.
    first = processes.consume(config)
    assert wait_for(lambda: "consuming" in processes.log(0), 60), processes.logs()
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    publisher = threading.Thread(
        target=lambda: [publish(queue.url, sent[i : i + 2000]) for i in range(0, len(sent), 2000)]
    )
    publisher.start()
    rng = random.Random(3)
    kills = crashes = 0
    for _ in range(3):
        # Killed from outside at a random point of the stream...
        proc = processes.consume(config)
        target = stored_messages(db) + rng.randrange(300, 1500)
        assert wait_for(
            lambda p=proc, t=target: stored_messages(db) >= t or p.poll() is not None,  # type: ignore[misc]
            60,
        ), processes.logs()
        assert proc.poll() is None, processes.logs()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
        # ...and dying on its own right after a commit, before the ack.
        crash = processes.crashing(config, after_commits=rng.randrange(1, 4))
        assert crash.wait(60) == EXIT_CODE, processes.logs()
        crashes += 1
    publisher.join(120)
    assert not publisher.is_alive()

    final = processes.consume(config)
    assert wait_for(lambda: stored_messages(db) >= distinct, 120), (
        f"{stored_messages(db)}/{distinct}\n{processes.logs()}"
    )
    assert wait_for(lambda: queue.ready() == 0, 30)
    final.send_signal(signal.SIGTERM)
    assert final.wait(30) == 0, processes.logs()
    return kills, crashes


def test_sigkill_mid_stream_and_between_commit_and_ack_store_every_reading_once(
    site_queue: SiteQueue, processes: Processes, tmp_path: Path
) -> None:
    db = tmp_path / "telemetry.db"
    config = write_config(tmp_path / "consume.toml", site_queue, db)
    sent = stream(site_queue.site, devices=20, per_device=550, copies=0.1, seed=11)
    distinct = len({m.id for m in sent})
    assert distinct >= 10_000

    kills, crashes = kill_while_streaming(processes, config, site_queue, sent, db)
    lost, doubled = report(
        f"consumer SIGKILLed {kills}x, crashed after commit {crashes}x", sent, db
    )
    assert (lost, doubled) == (0, 0)
    assert site_queue.dead_letters() == []


def test_three_competing_consumers_store_every_reading_once(
    site_queue: SiteQueue, processes: Processes, tmp_path: Path
) -> None:
    db = tmp_path / "telemetry.db"
    config = write_config(tmp_path / "consume.toml", site_queue, db, prefetch=200, batch_size=100)
    sent = stream(site_queue.site, devices=10, per_device=300, copies=0.2, seed=5)
    distinct = len({m.id for m in sent})
    consumers = [processes.consume(config) for _ in range(3)]
    logs = [tmp_path / f"consumer-{n}.log" for n in range(3)]
    assert wait_for(lambda: all("consuming" in log.read_text() for log in logs), 60), (
        processes.logs()
    )
    publish(site_queue.url, sent)

    assert wait_for(lambda: stored_messages(db) >= distinct, 120), processes.logs()
    assert wait_for(lambda: site_queue.ready() == 0, 30)
    for proc in consumers:
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(30) for proc in consumers] == [0, 0, 0], processes.logs()
    lost, doubled = report("3 competing consumers", sent, db)
    assert (lost, doubled) == (0, 0)
    assert site_queue.dead_letters() == []
    shares = [
        int(re.findall(r"stopped: stored (\d+) messages", log.read_text())[-1]) for log in logs
    ]
    print(f"messages stored per consumer: {shares}")
    assert all(share > 0 for share in shares), "the three consumers shared the work"


def test_sigterm_finishes_the_batch_and_exits_0(
    site_queue: SiteQueue, processes: Processes, tmp_path: Path
) -> None:
    db = tmp_path / "telemetry.db"
    config = write_config(tmp_path / "consume.toml", site_queue, db)
    sent = stream(site_queue.site, devices=10, per_device=800, copies=0.0, seed=1)
    declare = processes.consume(config)
    assert wait_for(lambda: "consuming" in processes.log(0), 60), processes.logs()
    declare.send_signal(signal.SIGTERM)
    assert declare.wait(30) == 0, processes.logs()
    publish(site_queue.url, sent)
    proc = processes.consume(config)
    assert wait_for(lambda: stored_messages(db) >= 200, 60), processes.logs()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, processes.logs()
    stored = stored_messages(db)
    assert stored < len(sent), "stopped mid-stream"
    assert wait_for(lambda: site_queue.ready() == len(sent) - stored, 10), (
        "acknowledged exactly what was stored; the rest went back to the queue"
    )
    processes.consume(config)
    assert wait_for(lambda: stored_messages(db) >= len(sent), 60), processes.logs()
    assert report("SIGTERM then restart", sent, db) == (0, 0)
