"""PostgreSQL for tests: a database of its own on the shared server, or a private cluster.

The shared server (127.0.0.1:5432, trust auth) is never stopped or reconfigured: tests create a
database with a unique name and drop it afterwards. Tests that kill or restart PostgreSQL start a
private cluster (``initdb`` under ``tmp_path``, a free port, ``pg_ctl``), killed at teardown.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import wait_for

SHARED = "postgresql://postgres@127.0.0.1:5432/postgres"


def pg_bin(name: str) -> str:
    """Path of a PostgreSQL server program (initdb, pg_ctl, postgres), newest version first."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    if found:
        return found[0]
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (apt postgresql)")
    return path


def shared_server_up() -> bool:
    """Whether the shared server answers."""
    try:
        with psycopg.connect(SHARED, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@contextlib.contextmanager
def scratch_database(server: str = SHARED, prefix: str = "iotpipe_test_") -> Iterator[str]:
    """A new database with a unique name on ``server``; yields its URL, drops it afterwards."""
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield server.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def count_seen_ids(url: str) -> int:
    """Message ids committed in a PostgreSQL store (0 before it exists or while it is down)."""
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            row = conn.execute("SELECT count(*) FROM seen_ids").fetchone()
    except psycopg.Error:
        return 0
    return int(row[0]) if row else 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server_user() -> list[str]:
    """The command prefix that runs a server program: PostgreSQL refuses to run as root."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class PrivateCluster:
    """A PostgreSQL cluster of the test's own: its own data directory, port and socket.

    The directory is made under /tmp (``tmp_path`` is private to root, and a root test runs
    the server as ``postgres``) and removed by :meth:`remove`. ``kill()`` SIGKILLs the
    postmaster and its backends (a crash: the next start replays the WAL), ``start()`` starts
    it again on the same port.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="iotpipe-pg-"))
        self.data = self.root / "pgdata"
        self.log = self.root / "postgres.log"
        self.port = _free_port()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        subprocess.run(
            [
                *_as_server_user(),
                pg_bin("initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "iotpipe",
            ],
            check=True,
            capture_output=True,
        )
        self.url = f"postgresql://iotpipe@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Start the postmaster and wait until it accepts connections."""
        # fsync stays on: a SIGKILL of the server must not lose a committed batch.
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1"
        subprocess.run(
            [
                *_as_server_user(),
                pg_bin("pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                options,
                "-w",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        assert wait_for(self.accepts, 60, "private PostgreSQL accepting"), self.log.read_text()

    def accepts(self) -> bool:
        """Whether the server answers a query."""
        try:
            with psycopg.connect(self.url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def pid(self) -> int | None:
        """The postmaster's pid, or ``None`` when it is not running."""
        pidfile = self.data / "postmaster.pid"
        try:
            return int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (as a crash of the machine's server would)."""
        pid = self.pid()
        assert pid is not None, "not running"
        children = subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        pids = [pid, *map(int, children)]
        for each in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, signal.SIGKILL)
        # Gone, not just dying: a start sooner finds the old postmaster.pid "in use".
        assert wait_for(lambda: not any(map(_alive, pids)), 30, "private PostgreSQL gone")

    def remove(self) -> None:
        """Stop it at once and delete its directory (teardown)."""
        if self.pid() is not None:
            subprocess.run(
                [
                    *_as_server_user(),
                    pg_bin("pg_ctl"),
                    "-D",
                    str(self.data),
                    "-m",
                    "immediate",
                    "stop",
                ],
                capture_output=True,
                check=False,
            )
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_cluster() -> Iterator[PrivateCluster]:
    """A running private PostgreSQL cluster, removed at teardown."""
    cluster = PrivateCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()
