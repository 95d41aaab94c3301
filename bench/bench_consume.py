"""``iotpipe consume`` throughput into SQLite and VictoriaMetrics, next to raw store writes.

    .venv/bin/python bench/bench_consume.py [--messages 20000] [--readings-per-message 5]
        [--rounds 3] [--store sqlite|influxdb|both] [--amqp URL] [--profile] [--no-save]

Uses the shared RabbitMQ (``--amqp``, default ``amqp://guest:guest@127.0.0.1:5672/``) with a
fresh, uniquely named quorum queue per round, declared exactly as the consumer declares it
(``QueueSpec.arguments()``) and deleted afterwards; the InfluxDB store writes to a private
VictoriaMetrics (``tests/victoria.py``, free loopback port, temporary data directory). Each
store gets, ``--rounds`` times, interleaved so machine noise hits every figure alike:

(a) consume: ``--messages`` wire-1.0 telemetry envelopes (``--readings-per-message`` readings,
    20 devices, unique ids, tags, ~450-byte bodies, AMQP properties as the bridge sets them) are
    published with confirms into the round's queue (bound to a site of its own; not measured).
    Then ``iotpipe consume --config FILE`` runs as a subprocess at its default batch settings
    (``batch_size`` 1000, ``batch_latency`` 0.2 s, ``prefetch`` 2000, ``durability`` fsync):
    AMQP in, decode, dedupe, write, commit, ack. The rate is readings / (the consumer logged
    ``consuming`` -> every message is in the store), polling every 20 ms the ``messages`` table
    of the SQLite store, or of the InfluxDB consumer's state file. Then SIGTERM (must exit 0),
    and a check that exactly messages x readings readings arrived (SQLite ``readings`` rows;
    VictoriaMetrics raw samples via ``/api/v1/export`` after a force flush).
(b) raw: the same number of readings written straight to the store, rows or lines prebuilt:
    SQLite ``executemany`` ``INSERT OR IGNORE`` into a fresh file with the ``readings`` schema
    (WAL, ``synchronous=FULL``, one commit per 5000 rows); VictoriaMetrics influxdb-client
    synchronous writes of prebuilt line protocol (``message_lines``), 5000 lines per request.
(c) store: ``SQLiteStore.write`` / ``InfluxStore.write`` called in-process with batches of 1000
    decoded messages (fresh file, fsync): the store's own share, without AMQP and decoding.

Also reported: the consumer process's CPU milliseconds per 1000 readings over the measured
window (``/proc/<pid>/stat``, user + system, all threads) and the codec's CPU per message
(``decode`` + ``Message.from_envelope``), so a slow path says where its time goes. The rates
include RabbitMQ delivering from a quorum queue, which competes for the same 2 cores.
``--profile`` runs one more SQLite consume round under cProfile (slower: a distorted clock, but
the shares are indicative) and writes ``bench/results/consume-profile.txt`` (with
``--no-save``, prints it to stderr).

Prints one JSON object: per store the medians of consume and raw readings/s, their ratio, the
samples and the CPU cost; the target (``consume`` into SQLite >= 10,000 readings/s on this
machine) and a verdict. Writes it to ``bench/results/consume.json`` unless ``--no-save``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pstats
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pika  # type: ignore[import-untyped]
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ is not an installed package; Victoria lives there

from consumers.influx_store import BATCH_LINES, InfluxStore, message_lines  # noqa: E402
from consumers.sqlite_store import READINGS_SCHEMA, SQLiteStore, reading_rows  # noqa: E402
from consumers.state import StateDB  # noqa: E402
from consumers.store import Message  # noqa: E402
from iotpipe.amqp import (  # noqa: E402
    TELEMETRY_EXCHANGE,
    ConfirmingPublisher,
    MessageProperties,
    Outcome,
    declare_topology,
    describe_error,
    telemetry_properties,
)
from iotpipe.amqp_consumer import QueueSpec  # noqa: E402
from iotpipe.envelope import Envelope, decode  # noqa: E402
from iotpipe.settings import AmqpSettings  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "consume.json"
PROFILE = ROOT / "bench" / "results" / "consume-profile.txt"
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
TARGET_SQLITE_READINGS_S = 10_000
DEVICES = 20
RAW_CHUNK = 5000  # rows per SQLite commit, lines per VictoriaMetrics request
STORE_BATCH = 1000  # messages per in-process store write: the consumer's default batch_size
WARMUP_MESSAGES = 2000
POLL_S = 0.02
ROUND_TIMEOUT_S = 300.0
SENSORS = (  # name, unit, typical value
    ("temperature", "Cel", 21.0),
    ("humidity", "%RH", 45.0),
    ("pressure", "Pa", 101_300.0),
    ("co2", "ppm", 600.0),
    ("battery", "V", 3.7),
)
ROOMS = ("kitchen", "boiler-room", "greenhouse", "garage", "attic")
IOTPIPE = [sys.executable, "-c", "from iotpipe.cli import main; main()"]
# Profiles Consumer.run only (not imports or start-up), on the consuming thread.
PROFILED = """
import cProfile, sys
import consumers.service as service
out, run = sys.argv.pop(1), service.Consumer.run
def profiled(self):
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        run(self)
    finally:
        profiler.disable()
        profiler.dump_stats(out)
service.Consumer.run = profiled
from iotpipe.cli import main
main()
"""
assert BATCH_LINES == RAW_CHUNK  # the raw writes use the store's request size


class BenchError(Exception):
    """Something the benchmark cannot measure around: one line for the user, exit 1."""


# -- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One AMQP message as the bridge publishes it."""

    routing_key: str
    body: bytes
    properties: MessageProperties


def make_messages(site: str, count: int, readings: int) -> tuple[list[Outgoing], list[Message]]:
    """``count`` telemetry messages of ``site`` from 20 devices, and the same, decoded.

    One message per device per second, ending an hour ago; ids ``<site>-<device>-<seq>``.
    """
    end_ms = (int(time.time()) - 3600) * 1000
    start_ms = end_ms - (count // DEVICES + 1) * 1000
    received = time.time()
    outgoing: list[Outgoing] = []
    decoded: list[Message] = []
    for i in range(count):
        device, seq = f"pi-{i % DEVICES:02d}", i // DEVICES
        ts = datetime.fromtimestamp((start_ms + seq * 1000 + i % DEVICES) / 1000, UTC)
        envelope = {
            "v": "1.0",
            "id": f"{site}-{device}-{seq}",
            "site": site,
            "device": device,
            "seq": seq,
            "boot": "b-7f3a09",
            "ts": f"{ts:%Y-%m-%dT%H:%M:%S}.{ts.microsecond // 1000:03d}Z",
            "readings": [
                {
                    "sensor": name if k < len(SENSORS) else f"{name}-{k}",
                    "value": round(typical * (0.9 + (i * 37 + k) % 200 / 1000), 2),
                    "unit": unit,
                }
                for k in range(readings)
                for name, unit, typical in [SENSORS[k % len(SENSORS)]]
            ],
            "tags": {"room": ROOMS[i % DEVICES % len(ROOMS)], "fw": "2.3.1"},
        }
        topic = f"iotpipe/v1/{site}/{device}/telemetry"
        body = json.dumps(envelope, separators=(",", ":")).encode()
        parsed = decode(topic, body)
        if not isinstance(parsed, Envelope):
            raise BenchError(f"bench message breaks the wire contract: {parsed}")
        decoded.append(Message.from_envelope(parsed))
        props = telemetry_properties(
            message_id=parsed.id,
            version="1.0",
            site=site,
            device=device,
            topic=topic,
            kind="telemetry",
            received_at=received,
        )
        outgoing.append(Outgoing(topic.replace("/", "."), body, props))
    return outgoing, decoded


def codec_us_per_message(outgoing: list[Outgoing]) -> float:
    """CPU microseconds per message of what the consumer does before the store: decode + build."""
    started = time.process_time()
    for m in outgoing:
        parsed = decode(m.routing_key.replace(".", "/"), m.body)
        assert isinstance(parsed, Envelope)
        Message.from_envelope(parsed)
    return (time.process_time() - started) / len(outgoing) * 1e6


# -- RabbitMQ ------------------------------------------------------------------------------------


class Broker:
    """The shared RabbitMQ: declares this run's queues and deletes every one of them at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.queues: list[str] = []
        try:
            conn = pika.BlockingConnection(pika.URLParameters(url))
        except (pika.exceptions.AMQPError, OSError) as err:
            raise BenchError(
                f"RabbitMQ is not reachable at {url}: {describe_error(err)}; "
                "start it (`make setup` installs it) or pass --amqp URL"
            ) from None
        self.version = str(conn._impl.server_properties.get("version", "?"))
        conn.close()

    @contextlib.contextmanager
    def _channel(self) -> Iterator[Any]:
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            yield conn.channel()
        finally:
            with contextlib.suppress(pika.exceptions.AMQPError):
                conn.close()

    def declare(self, name: str, site: str) -> None:
        """Declare ``name`` as ``iotpipe consume`` would, bound to ``site`` only."""
        spec = QueueSpec(name=name, bindings=(f"iotpipe.v1.{site}.#",))
        self.queues.append(name)
        with self._channel() as channel:
            declare_topology(channel)
            channel.queue_declare(name, durable=True, arguments=spec.arguments())
            for key in spec.bindings:
                channel.queue_bind(name, TELEMETRY_EXCHANGE, routing_key=key)

    def publish(self, messages: list[Outgoing], timeout: float = 120.0) -> None:
        """Publish with confirms; fail unless every message was confirmed (routed, persisted)."""
        outcomes: list[Outcome] = []
        done = threading.Event()

        def on_result(_token: object, outcome: Outcome) -> None:
            outcomes.append(outcome)
            if len(outcomes) == len(messages):
                done.set()

        publisher = ConfirmingPublisher(
            AmqpSettings(url=self.url), on_result, connection_name="bench-consume-publisher"
        )
        publisher.start()
        try:
            for n, m in enumerate(messages):
                publisher.publish(TELEMETRY_EXCHANGE, m.routing_key, m.body, m.properties, token=n)
            if not done.wait(timeout):
                raise BenchError(f"only {len(outcomes)}/{len(messages)} publishes confirmed")
        finally:
            publisher.close()
        bad = [o for o in outcomes if o is not Outcome.CONFIRMED]
        if bad:
            raise BenchError(f"{len(bad)} of {len(messages)} publishes not confirmed: {bad[0]}")

    def delete_all(self) -> None:
        """Delete every queue this run declared (with whatever is left in them)."""
        if not self.queues:
            return
        try:
            with self._channel() as channel:
                for name in self.queues:
                    channel.queue_delete(name)
            self.queues.clear()
        except (pika.exceptions.AMQPError, OSError) as err:
            print(f"could not delete queues {self.queues}: {err}", file=sys.stderr)


# -- the consumer process ------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def stored_messages(db: Path, conn: list[sqlite3.Connection]) -> int:
    """Rows in ``messages`` of ``db`` (0 before it exists); ``conn`` caches the connection."""
    if not conn:
        if not db.exists():
            return 0
        conn.append(sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None))
    try:
        return int(conn[0].execute("SELECT count(*) FROM messages").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # schema not created yet, or busy for a moment


@dataclass
class Sample:
    """One consume round."""

    readings_s: float
    cpu_ms_per_1000: float
    first_commit_ms: float


@dataclass
class Rig:
    """What every round needs: the broker, the store servers, the run's working directory."""

    broker: Broker
    workdir: Path
    readings: int
    vm: Any = None  # tests.victoria.Victoria, when the InfluxDB store is measured
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    rounds_run: int = 0

    def fresh(self, kind: str) -> tuple[str, Path]:
        """A unique site name and an empty directory for one round."""
        self.rounds_run += 1
        site = f"bench{self.token}{kind}{self.rounds_run}"
        path = self.workdir / site
        path.mkdir()
        return site, path

    def consume(self, store: str, count: int, profile: Path | None = None) -> Sample:
        """Publish ``count`` messages, then time ``iotpipe consume`` storing all of them."""
        site, path = self.fresh(f"c{store[0]}")
        queue = f"bench.consume.{site}"
        outgoing, _ = make_messages(site, count, self.readings)
        self.broker.declare(queue, site)
        self.broker.publish(outgoing)
        if store == "sqlite":
            target, counted = f"sqlite:///{path / 'telemetry.db'}", path / "telemetry.db"
        else:
            target, counted = f"influxdb://127.0.0.1:{self.vm.port}", path / "state.db"
        config = path / "consume.toml"
        config.write_text(
            f'[amqp]\nurl = "{self.broker.url}"\n'
            f'[consume]\nstore = "{target}"\nqueue = "{queue}"\n'
            f'bindings = ["iotpipe.v1.{site}.#"]\nhttp_port = 0\n'
            f'state_path = "{path / "state.db"}"\n'
            '[influxdb]\norg = "bench"\nbucket = "bench"\ntoken = "bench"\n'
        )
        log = path / "consumer.log"
        argv = ["--log-level", "info", "consume", "--config", str(config)]
        if profile is None:
            command = [*IOTPIPE, *argv]
        else:
            command = [sys.executable, "-c", PROFILED, str(profile), *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("IOTPIPE_")}
        with log.open("wb") as out:
            # Own session: a Ctrl-C of the bench does not reach it; the bench stops it itself.
            proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.procs.append(proc)

        def tail() -> str:
            return "\n".join(log.read_text(errors="replace").splitlines()[-15:])

        deadline = time.monotonic() + 60
        while b"consuming queue=" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"consumer did not start (exit {proc.poll()}):\n{tail()}")
            time.sleep(0.005)
        started = time.monotonic()
        cpu_start = cpu_seconds(proc.pid)
        first_commit = 0.0
        cache: list[sqlite3.Connection] = []
        deadline = started + ROUND_TIMEOUT_S
        try:
            while (n := stored_messages(counted, cache)) < count:
                if n and not first_commit:
                    first_commit = time.monotonic()
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"consumer stored {n}/{count} (exit {proc.poll()}):\n{tail()}")
                time.sleep(POLL_S)
            finished = time.monotonic()
            cpu = cpu_seconds(proc.pid) - cpu_start
        finally:
            for conn in cache:
                conn.close()
        self.stop(proc, tail)
        total = count * self.readings
        if store == "sqlite":
            with contextlib.closing(sqlite3.connect(counted)) as conn:
                got = int(conn.execute("SELECT count(*) FROM readings").fetchone()[0])
        else:
            series = self.vm.export(f'{{__name__=~"telemetry_.*",site="{site}"}}')
            got = sum(len(s.values) for s in series)
        if got != total:
            raise BenchError(f"{store}: {got} readings stored, expected exactly {total}")
        return Sample(
            readings_s=total / (finished - started),
            cpu_ms_per_1000=cpu * 1000 / (total / 1000),
            first_commit_ms=((first_commit or finished) - started) * 1000,
        )

    def stop(self, proc: subprocess.Popen[bytes], tail: Callable[[], str]) -> None:
        """SIGTERM; the consumer must finish its batch and exit 0."""
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise BenchError(f"consumer ignored SIGTERM for 30 s:\n{tail()}") from None
        finally:
            self.procs.remove(proc)
        if code != 0:
            raise BenchError(f"consumer exited {code} after SIGTERM:\n{tail()}")

    def kill_all(self) -> None:
        """Stop consumers left running by a failure or Ctrl-C."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    # -- baselines ------------------------------------------------------------------------------

    def raw_sqlite(self, count: int) -> float:
        """Readings/s of executemany INSERT OR IGNORE, rows prebuilt, one commit per 5000."""
        site, path = self.fresh("rs")
        rows = reading_rows(make_messages(site, count, self.readings)[1])
        conn = sqlite3.connect(path / "raw.db", isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(READINGS_SCHEMA)
            insert = f"INSERT OR IGNORE INTO readings VALUES ({', '.join('?' * 10)})"
            started = time.perf_counter()
            for i in range(0, len(rows), RAW_CHUNK):
                conn.execute("BEGIN")
                conn.executemany(insert, rows[i : i + RAW_CHUNK])
                conn.execute("COMMIT")
            elapsed = time.perf_counter() - started
            stored = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
        finally:
            conn.close()
        if stored != len(rows):
            raise BenchError(f"raw SQLite stored {stored} of {len(rows)} rows")
        return len(rows) / elapsed

    def raw_influx(self, count: int) -> float:
        """Readings/s of influxdb-client synchronous writes of prebuilt lines, 5000 per request."""
        site, _ = self.fresh("ri")
        lines = [
            line for m in make_messages(site, count, self.readings)[1] for line in message_lines(m)
        ]
        bodies = [
            "\n".join(lines[i : i + RAW_CHUNK]).encode() for i in range(0, len(lines), RAW_CHUNK)
        ]
        with InfluxDBClient(url=self.vm.url, token="bench", org="bench", timeout=30_000) as client:
            api = client.write_api(write_options=SYNCHRONOUS)
            started = time.perf_counter()
            for body in bodies:
                api.write("bench", "bench", body)
            elapsed = time.perf_counter() - started
            api.close()
        got = sum(
            len(s.values) for s in self.vm.export(f'{{__name__=~"telemetry_.*",site="{site}"}}')
        )
        if got != len(lines):
            raise BenchError(f"raw VictoriaMetrics holds {got} of {len(lines)} samples")
        return len(lines) / elapsed

    def store_api(self, store: str, count: int) -> float:
        """Readings/s of the store's own ``write`` in batches of 1000 decoded messages (fsync)."""
        site, path = self.fresh(f"s{store[0]}")
        messages = make_messages(site, count, self.readings)[1]
        opened: SQLiteStore | InfluxStore
        if store == "sqlite":
            opened = SQLiteStore(path / "telemetry.db", durability="fsync")
        else:
            state = StateDB(path / "state.db", durability="fsync")
            opened = InfluxStore(
                self.vm.url, org="bench", bucket="bench", token="bench", state=state
            )
        try:
            started = time.perf_counter()
            for i in range(0, count, STORE_BATCH):
                opened.write(messages[i : i + STORE_BATCH], [])
            elapsed = time.perf_counter() - started
        finally:
            opened.close()
        return count * self.readings / elapsed


@contextlib.contextmanager
def victoria(workdir: Path, wanted: bool) -> Iterator[Any]:
    """A private VictoriaMetrics for the block (None when the InfluxDB store is not measured)."""
    if not wanted:
        yield None
        return
    from tests.victoria import Victoria

    workdir.mkdir(parents=True, exist_ok=True)
    try:
        vm = Victoria(workdir)
    except FileNotFoundError as err:
        raise BenchError(f"{err}: run `make setup` (apt-get install victoria-metrics)") from None
    vm.start()
    try:
        yield vm
    finally:
        vm.stop()


#: Where own time goes, first match wins: (label, what the function's file or name contains).
_PROFILE_GROUPS = (
    ("waiting for the socket or a lock (wall time, not CPU)", ("select.epoll", "_thread.lock")),
    ("pika: AMQP frames, BlockingConnection", ("/pika/",)),
    ("sqlite3 calls (C: execute, executemany, commit)", ("sqlite3.",)),
    ("pydantic: envelope validation (Rust)", ("pydantic",)),
    ("consumers/ Python code", ("/consumers/",)),
    ("iotpipe/ Python code", ("/iotpipe/",)),
    ("prometheus_client", ("prometheus_client",)),
)


def summarize_profile(path: Path, header: str, top: int = 20) -> str:
    """The profile of ``Consumer.run`` as shares of its time: by area, then the top functions."""
    stats: dict[tuple[str, int, str], tuple[Any, ...]] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    total = max(ct for _cc, _nc, _tt, ct, _callers in stats.values()) or 1.0

    def label(key: tuple[str, int, str]) -> str:
        filename, line, name = key
        short = filename.split("/site-packages/")[-1].removeprefix(str(ROOT) + "/")
        return f"{name} ({short}:{line})" if line else name

    groups: dict[str, float] = {}
    for key, (_cc, _nc, tt, _ct, _callers) in stats.items():
        where = f"{key[0]} {key[2]}"
        group = next((g for g, marks in _PROFILE_GROUPS if any(m in where for m in marks)), "other")
        groups[group] = groups.get(group, 0.0) + tt
    lines = [
        header,
        "",
        f"Consumer.run, {total:.2f} s under the profiler = 100%; own time by area:",
    ]
    lines += [
        f"  {100 * t / total:5.1f}%  {g}" for g, t in sorted(groups.items(), key=lambda i: -i[1])
    ]
    lines += ["", f"top {top} functions by own time:"]
    by_own = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    lines += [f"  {100 * v[2] / total:5.1f}%  {v[1]:>8} calls  {label(k)}" for k, v in by_own]
    lines += ["", f"top {top} functions including callees (below 95%: not the entry chain):"]
    inner = [(k, v) for k, v in stats.items() if v[3] < 0.95 * total]
    by_cum = sorted(inner, key=lambda item: -item[1][3])[:top]
    lines += [f"  {100 * v[3] / total:5.1f}%  {v[1]:>8} calls  {label(k)}" for k, v in by_cum]
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # run every finally: queues, processes, files


def _median(values: list[float], digits: int = 0) -> float:
    return round(statistics.median(values), digits or None) if values else 0.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every round; return the result object."""
    stores = ("sqlite", "influxdb") if args.store == "both" else (args.store,)
    began = time.monotonic()
    load_start = os.getloadavg()[0]
    broker = Broker(args.amqp)
    consume: dict[str, list[Sample]] = {s: [] for s in stores}
    raw: dict[str, list[float]] = {s: [] for s in stores}
    api: dict[str, list[float]] = {s: [] for s in stores}
    raws: dict[str, Callable[[int], float]] = {}
    profile_note = None
    with tempfile.TemporaryDirectory(prefix="bench-consume-") as tmp:
        workdir = Path(tmp)
        with victoria(workdir / "victoria", "influxdb" in stores) as vm:
            rig = Rig(broker, workdir, args.readings_per_message, vm)
            raws = {"sqlite": rig.raw_sqlite, "influxdb": rig.raw_influx}
            try:
                for store in stores:  # unmeasured: warms RabbitMQ, the page cache, the server
                    rig.consume(store, WARMUP_MESSAGES)
                    broker.delete_all()
                codec_us = codec_us_per_message(make_messages("codec", 5000, rig.readings)[0])
                for r in range(args.rounds):
                    for store in stores:
                        consume[store].append(rig.consume(store, args.messages))
                        broker.delete_all()
                        raw[store].append(raws[store](args.messages))
                        api[store].append(rig.store_api(store, args.messages))
                        print(
                            f"round {r + 1}/{args.rounds} {store}: consume "
                            f"{consume[store][-1].readings_s:,.0f}, raw {raw[store][-1]:,.0f}, "
                            f"store.write {api[store][-1]:,.0f} readings/s",
                            file=sys.stderr,
                        )
                if args.profile:
                    prof = workdir / "consume.prof"
                    sample = rig.consume("sqlite", args.messages, profile=prof)
                    broker.delete_all()
                    profile_note = summarize_profile(
                        prof,
                        f"iotpipe consume, SQLite store, {args.messages} messages x "
                        f"{rig.readings} readings under cProfile: {sample.readings_s:,.0f} "
                        f"readings/s (cProfile slows pure-Python code; read the shares)",
                    )
                    if args.no_save:
                        print(profile_note, file=sys.stderr)
                    else:
                        PROFILE.parent.mkdir(parents=True, exist_ok=True)
                        PROFILE.write_text(profile_note)
            finally:
                rig.kill_all()
                broker.delete_all()
            vm_version = ""
            if vm is not None:
                out = subprocess.run(
                    [vm.binary, "-version"], check=False, capture_output=True, text=True
                )
                vm_version = (out.stdout or out.stderr).strip()

    per_store: dict[str, Any] = {}
    for store in stores:
        c = _median([s.readings_s for s in consume[store]])
        b = _median(raw[store])
        per_store[store] = {
            "consume_readings_s": c,
            "raw_readings_s": b,
            "ratio": round(c / b, 3),
            "store_write_readings_s": _median(api[store]),
            "samples": {
                "consume_readings_s": [round(s.readings_s) for s in consume[store]],
                "raw_readings_s": [round(v) for v in raw[store]],
                "store_write_readings_s": [round(v) for v in api[store]],
            },
            "cpu_ms_per_1000_readings": _median([s.cpu_ms_per_1000 for s in consume[store]], 1),
            "first_commit_ms": _median([s.first_commit_ms for s in consume[store]]),
        }
    if "sqlite" in per_store:
        got = per_store["sqlite"]["consume_readings_s"]
        ok = got >= TARGET_SQLITE_READINGS_S
        verdict = (
            f"{'pass' if ok else 'FAIL'}: consume into SQLite {got:,.0f} readings/s "
            f"{'>=' if ok else '<'} target {TARGET_SQLITE_READINGS_S:,}"
        )
    else:
        verdict = "no verdict: the SQLite store was not measured (--store influxdb)"
    return {
        "benchmark": "consume",
        "messages_per_round": args.messages,
        "readings_per_message": args.readings_per_message,
        "readings_per_round": args.messages * args.readings_per_message,
        "devices": DEVICES,
        "rounds": args.rounds,
        "consumer_settings": "defaults: batch_size 1000, batch_latency 0.2, prefetch 2000, "
        "durability fsync, quorum queue",
        "raw_settings": f"{RAW_CHUNK} rows per commit (WAL, synchronous=FULL) / "
        f"{RAW_CHUNK} prebuilt lines per request",
        **per_store,
        "codec_cpu_us_per_message": round(codec_us, 1),
        "target_sqlite_readings_s": TARGET_SQLITE_READINGS_S,
        "verdict": verdict,
        "loadavg_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "python": platform.python_version(),
        "pika": version("pika"),
        "influxdb_client": version("influxdb-client"),
        "sqlite_version": sqlite3.sqlite_version,
        "rabbitmq": broker.version,
        **({"victoria_metrics": vm_version} if vm_version else {}),
        "machine": f"{platform.machine()} x{os.cpu_count() or 1}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bench_seconds": round(time.monotonic() - began),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per round")
    parser.add_argument("--readings-per-message", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", choices=("sqlite", "influxdb", "both"), default="both")
    parser.add_argument("--amqp", default=DEFAULT_AMQP, help=f"RabbitMQ URL [{DEFAULT_AMQP}]")
    parser.add_argument(
        "--profile", action="store_true", help="one more SQLite consume round under cProfile"
    )
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    args = parser.parse_args()
    if args.messages < DEVICES or not 1 <= args.readings_per_message <= 1000 or args.rounds < 1:
        parser.error("need --messages >= 20, --readings-per-message 1..1000, --rounds >= 1")
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python keeps that.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _interrupt)
    try:
        result = run(args)
    except BenchError as err:
        sys.exit(f"bench_consume: {err}")
    except KeyboardInterrupt:
        sys.exit("bench_consume: interrupted (queues, consumers and temporary files cleaned up)")
    print(json.dumps(result))
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = RESULTS.with_suffix(".json.tmp")
        tmp_file.write_text(json.dumps(result, indent=2) + "\n")
        tmp_file.replace(RESULTS)


if __name__ == "__main__":
    main()
