"""Time-series servers for tests: a private VictoriaMetrics, and the machine's shared Redis.

A pytest plugin (``pytest_plugins = [..., "tests.victoria"]`` in ``tests/conftest.py``) with:

``victoria``
    A :class:`Victoria`: a private VictoriaMetrics (Debian's ``victoria-metrics`` binary) on a
    free loopback port with its data in a temporary directory, for the whole session. It speaks
    the InfluxDB v2 write API (``/api/v2/write``, org and bucket ignored). Started *without*
    ``-dedup.minScrapeInterval``, so a sample written twice shows up twice in
    :meth:`Victoria.export`: that is how tests prove a point was written once. Series of
    different tests never mix as long as each test writes its own ``site`` (use ``unique``).
``redis_url``
    The shared Redis, ``redis://127.0.0.1:6379/0`` (or ``$IOTPIPE_TEST_REDIS_URL``), or when
    none answers a private ``redis-server`` on a free port for the session. Tests only use keys
    under a prefix of their own and delete them; they never flush or reconfigure it.

A missing binary or an unreachable Redis fails the test with what to do (``make setup``); it
never skips silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port, wait_for
from tests.tlsca import ServerTls

BINARY = "victoria-metrics"
REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_URL_ENV = "IOTPIPE_TEST_REDIS_URL"


@dataclass(frozen=True, slots=True)
class Series:
    """One exported series: its labels (``__name__`` included) and raw samples, oldest first."""

    labels: dict[str, str]
    values: list[float]
    timestamps: list[int]

    @property
    def name(self) -> str:
        """The metric name, e.g. ``telemetry_value``."""
        return self.labels["__name__"]


class Victoria:
    """A private VictoriaMetrics process on ``127.0.0.1:port`` with its data under ``workdir``.

    Attributes:
        url: ``http://127.0.0.1:PORT`` (``https://`` when made with ``tls``), for
            ``InfluxStore`` and influxdb-client.
        start_seconds: how long :meth:`start` took.
    """

    def __init__(self, workdir: Path, tls: ServerTls | None = None) -> None:
        binary = shutil.which(BINARY) or shutil.which(BINARY, path="/usr/bin:/usr/sbin")
        if binary is None:
            raise FileNotFoundError(f"{BINARY} is not installed")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.log = workdir / "victoria-metrics.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    def start(self, timeout: float = 30.0) -> None:
        """Start the process and wait until ``/health`` answers ``OK``."""
        began = time.monotonic()
        args = [
            self.binary,
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-storageDataPath={self.workdir / 'data'}",
            # Tests write readings from any year the contract allows; keep them all.
            "-retentionPeriod=100y",
            # /api/v1/query would hide the last 30 s of samples otherwise.
            "-search.latencyOffset=0s",
            "-search.disableCache",
            # It scrapes nothing and reports nothing: only what tests write is stored.
            "-selfScrapeInterval=0",
            "-loggerLevel=WARN",
        ]
        if self.tls is not None:
            args += ["-tls", f"-tlsCertFile={self.tls.cert}", f"-tlsKeyFile={self.tls.key}"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

        def healthy() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                pytest.fail(f"victoria-metrics exited while starting:\n{self.log_tail()}")
            try:
                return self._get("/health").strip() == "OK"
            except OSError:
                return False

        wait_for(healthy, timeout, f"victoria-metrics on port {self.port}")
        self.start_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Stop the process (SIGTERM, SIGKILL if it hangs)."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of its log."""
        if not self.log.is_file():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def flush(self) -> None:
        """Make every sample written so far visible to searches (``/internal/force_flush``)."""
        self._get("/internal/force_flush")

    def export(self, selector: str) -> list[Series]:
        """Every raw sample of the series ``selector`` matches (after a :meth:`flush`).

        Args:
            selector: a series selector, e.g. ``{__name__=~"telemetry_.*",site="s1"}``.

        Returns:
            One :class:`Series` per matching series, sorted by labels.
        """
        self.flush()
        query = urllib.parse.urlencode({"match[]": selector})
        text = self._get(f"/api/v1/export?{query}")
        out = []
        for line in text.splitlines():
            if line.strip():
                item = json.loads(line)
                pairs = sorted(zip(item["timestamps"], item["values"], strict=True))
                out.append(Series(item["metric"], [v for _, v in pairs], [t for t, _ in pairs]))
        return sorted(out, key=lambda s: sorted(s.labels.items()))

    def sample_counts(self, selector: str) -> Counter[tuple[tuple[tuple[str, str], ...], int]]:
        """How many samples each (series labels, timestamp in ms) holds: 1 everywhere = no dups."""
        counts: Counter[tuple[tuple[tuple[str, str], ...], int]] = Counter()
        for series in self.export(selector):
            key = tuple(sorted(series.labels.items()))
            for ts in series.timestamps:
                counts[key, ts] += 1
        return counts

    def _get(self, path: str) -> str:
        # The harness's own probes need no verification: what it serves may be a bad certificate.
        context = ssl._create_unverified_context() if self.tls else None
        with urllib.request.urlopen(self.url + path, timeout=10, context=context) as response:
            return str(response.read().decode())


@pytest.fixture(scope="session")
def victoria(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Victoria]:
    """A private VictoriaMetrics for the session; stopped (and its data deleted) at the end."""
    workdir = tmp_path_factory.mktemp("victoria")
    try:
        server = Victoria(workdir)
    except FileNotFoundError:
        pytest.fail(
            f"{BINARY} is not installed: run `make setup` (apt-get install victoria-metrics)",
            pytrace=False,
        )
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir / "data", ignore_errors=True)


def _redis_answers(url: str) -> str | None:
    """None if Redis at ``url`` answers PING, else why not."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as err:
        return str(err)
    finally:
        client.close()
    return None


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shared Redis (``$IOTPIPE_TEST_REDIS_URL``), else a private ``redis-server``.

    Fails the test, saying what to do, when neither is available.
    """
    url = os.environ.get(REDIS_URL_ENV, REDIS_URL)
    problem = _redis_answers(url)
    if problem is None:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            f"Redis is not reachable at {url} ({problem}) and redis-server is not installed: "
            f"run `make setup` (apt-get install redis-server) or point ${REDIS_URL_ENV} at one",
            pytrace=False,
        )
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    log = (workdir / "redis.log").open("wb")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    private = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: proc.poll() is not None or _redis_answers(private) is None, 30)
        assert proc.poll() is None, (workdir / "redis.log").read_text()
        yield private
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@contextlib.contextmanager
def redis_keys(url: str, prefix: str) -> Iterator[redis.Redis]:
    """A client for ``url``; every key under ``prefix`` is deleted afterwards."""
    client = redis.Redis.from_url(url)
    try:
        yield client
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def closed_port_url() -> str:
    """``http://127.0.0.1:PORT`` where nothing listens (a server that is down)."""
    return f"http://127.0.0.1:{free_port()}"


__all__ = ["Series", "Victoria", "closed_port_url", "redis_keys"]
