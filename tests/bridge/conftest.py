"""Fixtures for the embedded broker: started in-process on a free port, with users and an ACL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from bridge.broker import BrokerThread, add_user
from bridge.settings import BrokerSettings
from iotpipe.mqtt import MqttClient
from iotpipe.settings import MqttSettings
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"

#: Users in the ``credentials`` password file; each password is ``pw-`` + the username.
USERS = ("home/dev1", "home/dev2", "bridge", "simulator")


def password_of(username: str) -> str:
    """The test password of one of ``USERS``."""
    return f"pw-{username}"


def client(
    broker: BrokerThread | int,
    username: str | None = None,
    password: str | None = None,
    **kwargs: Any,
) -> MqttClient:
    """An MqttClient for ``broker`` (or a port), logged in as ``username`` (default: its test password)."""
    auth = ""
    if username is not None:
        secret = password if password is not None else password_of(username)
        auth = f"{quote(username, safe='')}:{quote(secret, safe='')}@"
    port = broker if isinstance(broker, int) else broker.settings.port
    settings = MqttSettings(url=f"mqtt://{auth}127.0.0.1:{port}")
    return MqttClient(settings, **kwargs)


StartBroker = Callable[..., BrokerThread]


@pytest.fixture
def start_broker() -> Iterator[StartBroker]:
    """Start embedded brokers on free ports (``start_broker(password_file=...)``); all stopped after.

    ``serve_http=True`` also serves its /metrics and /healthz (on a free port unless given).
    """
    started: list[BrokerThread] = []

    def start(*, serve_http: bool = False, **fields: Any) -> BrokerThread:
        fields.setdefault("port", free_port())
        fields.setdefault("http_port", 0)
        runner = BrokerThread(BrokerSettings(**fields), serve_http=serve_http).start()
        started.append(runner)
        return runner

    yield start
    for runner in reversed(started):
        runner.stop()


@pytest.fixture
def embedded_broker(start_broker: StartBroker) -> BrokerThread:
    """The embedded broker with its defaults (auth off) on a free port."""
    return start_broker()


@dataclass(frozen=True)
class Credentials:
    """A password file with ``USERS`` and the shipped example ACL."""

    password_file: Path
    acl_file: Path


@pytest.fixture(scope="session")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    """A password file for ``USERS`` (hashing is slow, so once per session) + configs/broker-acl.toml."""
    password_file = tmp_path_factory.mktemp("broker") / "passwd"
    for username in USERS:
        add_user(password_file, username, password_of(username))
    return Credentials(password_file, CONFIGS / "broker-acl.toml")


@pytest.fixture
def secured_broker(start_broker: StartBroker, credentials: Credentials) -> BrokerThread:
    """An embedded broker with the ``credentials`` password file and the example ACL."""
    return start_broker(password_file=credentials.password_file, acl_file=credentials.acl_file)
