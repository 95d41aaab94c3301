"""``iotpipe rabbitmq setup``: least-privilege users, proven on a private RabbitMQ node.

The node is private (tests/rabbitmq.py) and shared by this module's tests: setup runs once, as a
user would run it, with the node's ``rabbitmqctl``; every test then connects as one of the users
it made, does what its component does (allowed), or what it must not do (refused with
ACCESS_REFUSED, reply code 403).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika  # type: ignore[import-untyped]
import pytest

from bridge.receipts import receipt_queue_spec
from bridge.settings import BridgeSettings
from bridge.uplink import own_uplink_queue, uplink_queue
from iotpipe.amqp import (
    DEAD_EXCHANGE,
    DEAD_LETTER_QUEUE,
    TELEMETRY_EXCHANGE,
    ConfirmingPublisher,
    MessageProperties,
    Outcome,
)
from iotpipe.amqp_consumer import BatchConsumer, QueueSpec
from iotpipe.errors import ConfigError
from iotpipe.rabbitmq import definitions, hash_password, reader_role, roles_for, secret_file
from iotpipe.receipts import EXCHANGE as RECEIPTS_EXCHANGE
from iotpipe.settings import AmqpSettings
from tests.conftest import IOTPIPE, wait_for
from tests.rabbitmq import PrivateRabbit, blocking_channel, rabbitmq_bin

VHOST = "iotpipe"


# -- without a broker -------------------------------------------------------------------------


def test_password_hash_is_rabbitmq_sha256_format() -> None:
    """The hash is base64 of a 4-byte salt and sha256(salt + password), as RabbitMQ stores it."""
    raw = base64.b64decode(hash_password("s3cret", salt=b"\x90\x8d\xc6\x0a"))
    assert raw[:4] == b"\x90\x8d\xc6\x0a"
    assert raw[4:] == hashlib.sha256(b"\x90\x8d\xc6\x0as3cret").digest()
    assert hash_password("s3cret") != hash_password("s3cret"), "a fresh salt each time"


def test_definitions_hold_hashes_never_passwords() -> None:
    """The definitions document names users, vhost and permissions; no plain password in it."""
    roles = roles_for(["bridge", "consumer"], ["grafana"])
    document = definitions("plant", [(role, f"pw-{role.name}-x") for role in roles])
    text = json.dumps(document)
    assert "pw-" not in text
    assert [u["name"] for u in document["users"]] == ["bridge", "consumer", "grafana"]
    assert {p["vhost"] for p in document["permissions"]} == {"plant"}
    assert document["vhosts"] == [{"name": "plant"}]


def test_secret_files_are_private_and_kept(tmp_path: Path) -> None:
    """Password files are 0600 in a 0700 directory; a second run keeps the first password."""
    path, first, made = secret_file(tmp_path / "s", "bridge")
    assert made
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    _, again, made_again = secret_file(tmp_path / "s", "bridge")
    assert (again, made_again) == (first, False)


@pytest.mark.parametrize("name", ["bridge", "guest", "Bad", "a.b", ""])
def test_reader_names_are_checked(name: str) -> None:
    """A reader name must be a lowercase word that is no component's or guest's."""
    with pytest.raises(ConfigError):
        reader_role(name)


@pytest.mark.parametrize(
    "args",
    [["--user", "nobody"], ["--reader", "Bad.Name"], ["--consumer-queue", "iotpipe.telemetry"]],
)
def test_setup_mistakes_exit_2_in_one_line(tmp_path: Path, args: list[str]) -> None:
    """A bad user, reader or queue name ends in one line on stderr and exit code 2."""
    result = subprocess.run(
        [*IOTPIPE, "rabbitmq", "setup", "--definitions", str(tmp_path / "d.json"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("rabbitmqctl", "code", "says"),
    [("/nonexistent/rabbitmqctl", 2, "not found"), ("/bin/false", 3, "import_definitions failed")],
)
def test_setup_without_a_working_rabbitmqctl_fails_in_one_line(
    tmp_path: Path, rabbitmqctl: str, code: int, says: str
) -> None:
    """A rabbitmqctl that is missing or fails ends in one line naming what went wrong."""
    result = subprocess.run(
        [*IOTPIPE, "rabbitmq", "setup", "--rabbitmqctl", rabbitmqctl, "--secrets-dir", "s"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == code, result.stderr
    last = result.stderr.splitlines()[-1]
    assert says in last
    assert "Traceback" not in result.stderr


def test_definitions_file_is_private_and_passwords_are_not_echoed(tmp_path: Path) -> None:
    """--definitions writes a 0600 file; stdout and stderr name the password files, not passwords."""
    out = tmp_path / "definitions.json"
    result = subprocess.run(
        [*IOTPIPE, "rabbitmq", "setup", "--definitions", str(out), "--secrets-dir", "s"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    for user in ("bridge", "consumer", "unpack"):
        password = (tmp_path / "s" / user).read_text().strip()
        assert password not in result.stdout + result.stderr + out.read_text()
        assert f"s/{user}" in result.stdout


# -- on a private node ------------------------------------------------------------------------


@dataclass
class Users:
    """The node setup ran on, and the password files it wrote."""

    node: PrivateRabbit
    secrets: Path

    def settings(self, user: str) -> AmqpSettings:
        """AmqpSettings of ``user``: a URL without password, and its password file."""
        return AmqpSettings(
            url=f"amqp://{user}@127.0.0.1:{self.node.port}/{VHOST}",
            password_file=self.secrets / user,
        )

    def url(self, user: str) -> str:
        """A pika URL with ``user``'s password."""
        password = (self.secrets / user).read_text().strip()
        return f"amqp://{user}:{password}@127.0.0.1:{self.node.port}/{VHOST}"


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Users]:
    """A private node with vhost ``iotpipe`` set up by ``iotpipe rabbitmq setup`` (+ reader)."""
    if rabbitmq_bin() is None:
        pytest.fail("rabbitmq-server is not installed: run `make setup`", pytrace=False)
    workdir = tmp_path_factory.mktemp("least-privilege")
    node = PrivateRabbit(workdir / "rabbitmq")
    try:
        node.start()
        secrets = workdir / "secrets"
        command = [
            *IOTPIPE,
            "rabbitmq",
            "setup",
            "--rabbitmqctl",
            str(node.bin / "rabbitmqctl"),
            "--node",
            node.name,
            "--secrets-dir",
            str(secrets),
            "--reader",
            "reader",
        ]
        result = subprocess.run(
            command, env=node.env(), capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        yield Users(node, secrets)
    finally:
        node.kill()
        shutil.rmtree(node.mnesia, ignore_errors=True)


@pytest.fixture(scope="module")
def topology(users: Users) -> Users:
    """The node after the consumer and the bridge connected once (their queues exist)."""
    for user, spec in (
        ("consumer", QueueSpec(dead_letter_queue=DEAD_LETTER_QUEUE)),
        ("bridge", receipt_queue_spec(BridgeSettings())),
    ):
        source = BatchConsumer(users.settings(user), spec, publish_exchanges=(RECEIPTS_EXCHANGE,))
        source.connect(timeout=10)
        source.close()
    return users


def _collect() -> tuple[dict[object, Outcome], Callable[[object, Outcome], None]]:
    outcomes: dict[object, Outcome] = {}
    lock = threading.Lock()

    def on_result(token: object, outcome: Outcome) -> None:
        with lock:
            outcomes[token] = outcome

    return outcomes, on_result


_PROPS = MessageProperties(message_id="m-1", type="iotpipe.telemetry")


@pytest.mark.slow
@pytest.mark.rabbitmq
def test_components_work_with_their_users(users: Users) -> None:
    """The consumer declares and reads its queue, the bridge publishes to it and reads receipts,
    and the reader reads telemetry from its own queue, each as its own user."""
    consumer = BatchConsumer(
        users.settings("consumer"),
        QueueSpec(dead_letter_queue=DEAD_LETTER_QUEUE),
        publish_exchanges=(RECEIPTS_EXCHANGE,),
    )
    consumer.connect(timeout=10)
    relay = BatchConsumer(users.settings("bridge"), receipt_queue_spec(BridgeSettings()))
    relay.connect(timeout=10)
    with blocking_channel(users.url("reader")) as reader:
        reader.queue_declare("reader.telemetry", exclusive=True)
        reader.queue_bind("reader.telemetry", TELEMETRY_EXCHANGE, routing_key="iotpipe.v1.#")
        outcomes, on_result = _collect()
        bridge = ConfirmingPublisher(
            users.settings("bridge"), on_result, dead_letter_queue=DEAD_LETTER_QUEUE
        )
        bridge.start(timeout=10)
        key = "iotpipe.v1.s1.d1.telemetry"
        bridge.publish(TELEMETRY_EXCHANGE, key, b"{}", _PROPS, token="t")
        bridge.publish(DEAD_EXCHANGE, "bridge.schema", b"x", _PROPS, token="d")
        assert bridge.close(timeout=10)
        assert outcomes == {"t": Outcome.CONFIRMED, "d": Outcome.CONFIRMED}
        batch = wait_for(lambda: consumer.next_batch(10, 0.2), 10, "the consumer's delivery")
        assert batch[0].routing_key == key
        receipt = "iotpipe.v1.s1.d1.receipt"
        assert consumer.publish(RECEIPTS_EXCHANGE, receipt, b"{}", _PROPS)
        consumer.ack_through(batch[-1])
        got = wait_for(lambda: relay.next_batch(10, 0.2), 10, "the bridge's receipt")
        assert got[0].routing_key == receipt
        method, _ = _get(reader, "reader.telemetry")
        assert method.routing_key == key
    consumer.close()
    relay.close()


def _get(channel: Any, queue: str) -> tuple[Any, bytes]:
    """The next message of ``queue`` (waits up to 5 s), acknowledged."""

    def poll() -> tuple[Any, bytes] | None:
        method, _, body = channel.basic_get(queue, auto_ack=True)
        return None if method is None else (method, body)

    found: tuple[Any, bytes] = wait_for(poll, 5, f"a message on {queue}")
    return found


#: (user, what it tries, the operation): each must be refused with ACCESS_REFUSED (403).
REFUSED: list[tuple[str, str, Callable[[Any], object]]] = [
    ("bridge", "read iotpipe.store", lambda ch: ch.basic_get("iotpipe.store")),
    (
        "bridge",
        "declare iotpipe.store",
        lambda ch: ch.queue_declare("iotpipe.store", durable=True),
    ),
    (
        "bridge",
        "bind a queue to iotpipe.telemetry",
        lambda ch: ch.queue_bind("iotpipe.receipts.bridge", TELEMETRY_EXCHANGE, "#"),
    ),
    (
        "consumer",
        "publish to iotpipe.telemetry",
        lambda ch: ch.basic_publish(TELEMETRY_EXCHANGE, "iotpipe.v1.s.d.telemetry", b"{}"),
    ),
    (
        "consumer",
        "read the bridge's receipts",
        lambda ch: ch.basic_get("iotpipe.receipts.bridge"),
    ),
    (
        "reader",
        "publish to iotpipe.telemetry",
        lambda ch: ch.basic_publish(TELEMETRY_EXCHANGE, "iotpipe.v1.s.d.telemetry", b"{}"),
    ),
    ("reader", "read iotpipe.store", lambda ch: ch.basic_get("iotpipe.store")),
    ("reader", "read iotpipe.dead", lambda ch: ch.basic_get("iotpipe.dead")),
    (
        "reader",
        "declare a queue outside reader.*",
        lambda ch: ch.queue_declare("other.queue", auto_delete=True),
    ),
    (
        "reader",
        "declare a look-alike readerx.*",
        lambda ch: ch.queue_declare("readerx.queue", auto_delete=True),
    ),
    (
        "reader",
        "bind its queue to iotpipe.dead",
        lambda ch: (
            ch.queue_declare("reader.q", auto_delete=True),
            ch.queue_bind("reader.q", DEAD_EXCHANGE, "#"),
        ),
    ),
    (
        "reader",
        "delete iotpipe.telemetry",
        lambda ch: ch.exchange_delete(TELEMETRY_EXCHANGE),
    ),
    ("unpack", "read iotpipe.store", lambda ch: ch.basic_get("iotpipe.store")),
    (
        "reader",
        "declare a server-named queue",
        lambda ch: ch.queue_declare("", exclusive=True),
    ),
]


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.parametrize(
    ("user", "operation"),
    [(user, op) for user, _, op in REFUSED],
    ids=[f"{user}-{what.replace(' ', '-')}" for user, what, _ in REFUSED],
)
def test_what_a_user_must_not_do_is_refused(
    topology: Users, user: str, operation: Callable[[Any], object]
) -> None:
    """RabbitMQ closes the channel with ACCESS_REFUSED (403) for an operation the user lacks."""
    with blocking_channel(topology.url(user)) as channel:
        channel.confirm_delivery()  # a refused publish then fails at once, not later
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            operation(channel)
        assert refused.value.reply_code == 403, refused.value


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.parametrize("user", ["guest", "bridge"])
def test_guest_has_no_access_to_the_vhost_and_passwords_matter(users: Users, user: str) -> None:
    """guest cannot open the vhost at all; a component user with a wrong password is refused."""
    password = "guest" if user == "guest" else "wrong"
    url = f"amqp://{user}:{password}@127.0.0.1:{users.node.port}/{VHOST}"
    with pytest.raises(pika.exceptions.AMQPConnectionError), blocking_channel(url):
        pass


@pytest.mark.slow
@pytest.mark.rabbitmq
def test_packed_bridge_and_unpack_declare_the_uplink(users: Users) -> None:
    """A packed bridge declares and publishes to the uplink; unpack declares and reads it."""
    outcomes, on_result = _collect()
    bridge = ConfirmingPublisher(
        users.settings("bridge"),
        on_result,
        dead_letter_queue=DEAD_LETTER_QUEUE,
        own_queue=own_uplink_queue(),
    )
    bridge.start(timeout=10)
    bridge.publish("iotpipe.uplink", "iotpipe.uplink", b"pack", _PROPS, token="p")
    assert bridge.close(timeout=10)
    assert outcomes == {"p": Outcome.CONFIRMED}
    unpack = BatchConsumer(
        users.settings("unpack"), uplink_queue(), publish_exchanges=(DEAD_EXCHANGE,)
    )
    unpack.connect(timeout=10)
    try:
        batch = wait_for(lambda: unpack.next_batch(10, 0.2), 10, "the pack")
        assert batch[0].body == b"pack"
        unpack.ack_through(batch[-1])
    finally:
        unpack.close()


@pytest.mark.slow
@pytest.mark.rabbitmq
def test_setup_again_keeps_passwords_and_permissions(users: Users) -> None:
    """A second setup on the same node changes no password: existing users still log in."""
    before = (users.secrets / "bridge").read_text()
    command = [
        *IOTPIPE,
        "rabbitmq",
        "setup",
        "--rabbitmqctl",
        str(users.node.bin / "rabbitmqctl"),
        "--node",
        users.node.name,
        "--secrets-dir",
        str(users.secrets),
        "--user",
        "bridge",
    ]
    result = subprocess.run(
        command, env=users.node.env(), capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (users.secrets / "bridge").read_text() == before
    with blocking_channel(users.url("bridge")) as channel:
        channel.exchange_declare(TELEMETRY_EXCHANGE, "topic", durable=True)
    listed = users.node.ctl("list_permissions", "-p", VHOST).stdout
    assert "guest" not in listed


EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "rabbitmq-definitions.json"


def test_example_definitions_grant_what_setup_grants() -> None:
    """configs/rabbitmq-definitions.json holds the permissions setup grants, and no hash."""
    example = json.loads(EXAMPLE.read_text())
    made = definitions(
        VHOST, [(r, "x") for r in roles_for(["bridge", "consumer", "unpack"], ["reader"])]
    )
    assert example["permissions"] == made["permissions"]
    assert {u["password_hash"] for u in example["users"]} == {""}


@pytest.mark.slow
@pytest.mark.rabbitmq
def test_example_definitions_import(users: Users, tmp_path: Path) -> None:
    """RabbitMQ imports the example (its _comment key included), here under other names."""
    text = EXAMPLE.read_text().replace('"iotpipe"', '"example"')
    for user in ("bridge", "consumer", "unpack", "reader"):
        text = text.replace(f'"{user}"', f'"{user}-example"')
    copy = tmp_path / "example.json"
    copy.write_text(text)
    copy.chmod(0o644)
    result = users.node.ctl("import_definitions", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr
    listed = users.node.ctl("list_permissions", "-p", "example").stdout
    assert all(f"{user}-example" in listed for user in ("bridge", "consumer", "unpack", "reader"))
