"""Least privilege on RabbitMQ: one vhost, one user per component, each with only what it needs.

Every component declares its topology on connect (:mod:`iotpipe.amqp`,
:mod:`iotpipe.amqp_consumer`), and RabbitMQ asks ``configure`` for every declare, even of an
exchange or queue that exists, ``read`` on a queue consumed or declared with a dead-letter
exchange (and on the source exchange of a binding), and ``write`` on an exchange published to, on
the destination queue of a binding and on a queue's dead-letter exchange. Permissions are
regular expressions matched against the *name* of an exchange or a queue, so ``iotpipe.dead``
(exchange and queue) is one resource to them. :data:`ROLES` is what each component does, by name:

=========  =====================================  ==============================  =========================
user       configure                              write                           read
=========  =====================================  ==============================  =========================
bridge     telemetry, dead, receipts, uplink,     telemetry, dead, uplink,        dead, receipts, uplink,
           receipts.bridge*                       receipts.bridge*                receipts.bridge*
consumer   telemetry, dead, receipts, store       dead, receipts, store           telemetry, dead, store
unpack     telemetry, dead, uplink                telemetry, dead, uplink         dead, uplink
NAME       NAME.*                                 NAME.*                          telemetry, NAME.*
=========  =====================================  ==============================  =========================

(all names but the reader's start ``iotpipe.``; ``NAME`` is a foreign reader from ``--reader``).

:func:`definitions` turns users and passwords into a RabbitMQ definitions document holding only
salted password hashes (``rabbit_password_hashing_sha256``); :func:`apply` imports it into a node
with ``rabbitmqctl import_definitions`` and takes ``guest``'s permissions on the vhost away.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from iotpipe.errors import ConfigError, ConnectError

__all__ = [
    "DEFAULT_VHOST",
    "ROLES",
    "STORE_QUEUE",
    "Role",
    "apply",
    "consumer_role",
    "definitions",
    "hash_password",
    "rabbitmqctl",
    "reader_role",
    "roles_for",
    "secret_file",
]

DEFAULT_VHOST = "iotpipe"

HASHING = "rabbit_password_hashing_sha256"
"""RabbitMQ's default password hashing: base64(salt + sha256(salt + password)), 4-byte salt."""

Ctl = Callable[[Sequence[str], str | None], "subprocess.CompletedProcess[str]"]
"""``ctl(args, stdin)`` runs ``rabbitmqctl ARGS`` against one node (``stdin`` its input)."""


class Role(NamedTuple):
    """The permissions of one user in the vhost (RabbitMQ regular expressions)."""

    name: str
    configure: str
    write: str
    read: str
    summary: str


def _names(*names: str) -> str:
    """``^iotpipe\\.(a|b)$``: exactly these names under ``iotpipe.``."""
    return r"^iotpipe\.(" + "|".join(names) + r")$"


STORE_QUEUE = "iotpipe.store"
"""The queue ``iotpipe consume`` reads by default (``[consume] queue``)."""


def consumer_role(queue: str = STORE_QUEUE) -> Role:
    """The consumer's role, reading ``queue`` (bound to ``iotpipe.telemetry``).

    Raises:
        ConfigError: ``queue`` is empty, longer than 255 bytes, or one of the contract's names.
    """
    taken = {"iotpipe.telemetry", "iotpipe.dead", "iotpipe.receipts", "iotpipe.uplink"}
    if not queue or len(queue.encode()) > 255 or queue in taken:
        raise ConfigError(
            "rabbitmq.consumer_queue", queue, "1 to 255 bytes, not an exchange's name"
        )
    own = re.escape(queue)
    return Role(
        "consumer",
        rf"^(iotpipe\.(telemetry|dead|receipts)|{own})$",
        rf"^(iotpipe\.(dead|receipts)|{own})$",
        rf"^(iotpipe\.(telemetry|dead)|{own})$",
        f"reads {queue} (bound to iotpipe.telemetry); publishes dead letters and receipts",
    )


ROLES: dict[str, Role] = {
    role.name: role
    for role in (
        Role(
            "bridge",
            _names("telemetry", "dead", "receipts", "uplink", r"receipts\.bridge.*"),
            _names("telemetry", "dead", "uplink", r"receipts\.bridge.*"),
            _names("dead", "receipts", "uplink", r"receipts\.bridge.*"),
            "publishes to iotpipe.telemetry/iotpipe.dead (or packs to iotpipe.uplink); "
            "reads its receipts queue iotpipe.receipts.bridge*",
        ),
        consumer_role(),
        Role(
            "unpack",
            _names("telemetry", "dead", "uplink"),
            _names("telemetry", "dead", "uplink"),
            _names("dead", "uplink"),
            "reads packs from iotpipe.uplink; publishes to iotpipe.telemetry and iotpipe.dead",
        ),
    )
}
"""The component users; :func:`reader_role` makes the foreign readers'."""

_READER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")


def reader_role(name: str) -> Role:
    """A foreign reader: declares, binds and reads only queues named ``NAME.*``.

    It may bind them to ``iotpipe.telemetry`` (read on the exchange) but publishes nowhere, and
    cannot read ``iotpipe.store`` or any other component's queue.

    Raises:
        ConfigError: ``name`` is not a lowercase word (or is a component's name).
    """
    if not _READER_NAME.fullmatch(name) or name in ROLES or name == "guest":
        raise ConfigError(
            "rabbitmq.reader",
            name,
            "a lowercase name (a-z, 0-9, '-', '_'), not bridge, consumer, unpack or guest",
        )
    own = "^" + re.escape(name) + r"\..+$"
    return Role(
        name,
        own,
        own,
        r"^(iotpipe\.telemetry|" + re.escape(name) + r"\..+)$",
        f"declares, binds (to iotpipe.telemetry) and reads only its queues {name}.*",
    )


def roles_for(
    components: Iterable[str], readers: Iterable[str] = (), *, consumer_queue: str = STORE_QUEUE
) -> list[Role]:
    """The roles of the named components (of :data:`ROLES`) and of the foreign readers.

    Raises:
        ConfigError: an unknown component, a bad reader name or consumer queue.
    """
    roles = []
    for name in components:
        if name not in ROLES:
            raise ConfigError("rabbitmq.users", name, f"one of {', '.join(ROLES)}")
        roles.append(consumer_role(consumer_queue) if name == "consumer" else ROLES[name])
    roles.extend(reader_role(name) for name in readers)
    return roles


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The ``password_hash`` RabbitMQ stores: base64(salt + sha256(salt + password)).

    Args:
        password: the password (UTF-8).
        salt: 4 bytes; random when not given.
    """
    salt = secrets.token_bytes(4) if salt is None else salt
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def definitions(vhost: str, users: Sequence[tuple[Role, str]]) -> dict[str, Any]:
    """A RabbitMQ definitions document: the vhost, the users (hashes only), their permissions.

    Args:
        vhost: the virtual host.
        users: each role with its user's password.
    """
    return {
        "vhosts": [{"name": vhost}],
        "users": [
            {
                "name": role.name,
                "password_hash": hash_password(password),
                "hashing_algorithm": HASHING,
                "tags": "",
            }
            for role, password in users
        ],
        "permissions": [
            {
                "user": role.name,
                "vhost": vhost,
                "configure": role.configure,
                "write": role.write,
                "read": role.read,
            }
            for role, _ in users
        ],
        "topic_permissions": [],
        "parameters": [],
        "policies": [],
        "queues": [],
        "exchanges": [],
        "bindings": [],
    }


def secret_file(directory: Path, user: str) -> tuple[Path, str, bool]:
    """The password of ``user`` from ``directory/USER``, made (random) when there is none.

    The directory is made ``0700`` and the file ``0600``; an existing file is kept, so running
    setup again does not change passwords, and a password can be given by writing the file first.

    Returns:
        The file, the password, and whether it was made now.

    Raises:
        ConfigError: the directory or file cannot be written or read, or the file is empty.
    """
    path = directory / user
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.chmod(0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            path.chmod(0o600)
            password = path.read_text().strip()
            if not password:
                raise ConfigError(
                    "rabbitmq.secrets_dir", path, "the password file is empty"
                ) from None
            return path, password, False
        password = secrets.token_urlsafe(24)
        with os.fdopen(fd, "w") as out:
            out.write(password + "\n")
        return path, password, True
    except OSError as err:
        raise ConfigError("rabbitmq.secrets_dir", directory, err.strerror or str(err)) from None


def rabbitmqctl(command: Sequence[str], *, node: str | None = None) -> Ctl:
    """A :data:`Ctl` running ``COMMAND [-n NODE] ARGS`` (``COMMAND`` e.g. ``["rabbitmqctl"]``)."""
    prefix = [*command, *(["-n", node] if node else [])]

    def run(args: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(  # noqa: S603 - our own argv, no shell
                [*prefix, *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except FileNotFoundError:
            raise ConfigError(
                "rabbitmq.rabbitmqctl",
                prefix[0],
                "not found: install rabbitmq-server, pass --rabbitmqctl PATH, or write a "
                "definitions file with --definitions FILE",
            ) from None
        except subprocess.TimeoutExpired:
            raise ConnectError(
                f"RabbitMQ node {node or '(default)'}", "rabbitmqctl timed out"
            ) from None

    return run


def apply(ctl: Ctl, document: dict[str, Any], *, vhost: str) -> None:
    """Import ``document`` into the node ``ctl`` talks to, and clear ``guest`` from ``vhost``.

    Importing adds the vhost and users, or updates them (password, permissions) when they exist;
    it never deletes anything. The document (password hashes only) goes through rabbitmqctl's
    standard input: no file to leave behind, and Debian's wrapper, which runs rabbitmqctl as the
    ``rabbitmq`` user, need not be able to read one of ours.

    Raises:
        ConnectError: rabbitmqctl failed (its message, on one line).
    """
    imported = ctl(["import_definitions", "--format", "json"], json.dumps(document))
    _check(imported, "import_definitions")
    result = ctl(["clear_permissions", "-p", vhost, "guest"], None)
    if result.returncode != 0 and "no_such_user" not in result.stdout + result.stderr:
        _check(result, "clear_permissions")


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit code {result.returncode}"
        raise ConnectError("RabbitMQ (rabbitmqctl)", f"{what} failed: {reason}")
