"""The embedded edge broker: amqtt with an explicit config, iotpipe auth and a per-device ACL.

``iotpipe broker`` runs `amqtt <https://github.com/Yakifo/amqtt>`_ in-process so an edge box needs
nothing but ``pip install iotpipe``. What this module adds to plain amqtt:

* **An explicit config, always** (amqtt's own default binds ``0.0.0.0:1883``); loopback by default.
* **Persistent sessions that work without credentials.** amqtt's ``AnonymousAuthPlugin`` marks
  credential-less clients anonymous, and amqtt neither keeps nor queues anonymous sessions, so a
  ``clean_session=False`` subscriber silently lost every QoS 1 message sent while it was away.
  :class:`IotpipeAuthPlugin` admits such clients without marking them anonymous.
* **Password file** in amqtt's ``FileAuthPlugin`` format (``user:$argon2id$...``), verified off the
  event loop and re-read when it changes; :func:`add_user` writes it (``iotpipe broker --add-user``).
* **Per-device ACL** (:class:`Acl`, a commented TOML file): a device authenticates as
  ``{site}/{device}`` and may publish only under ``iotpipe/v1/{site}/{device}/``; named service
  users get their own rules. The same convention as Mosquitto's ``pattern write iotpipe/v1/%u/#``.
  Denied publishes are acknowledged (MQTT 3.1.1 has no negative PUBACK) but never forwarded nor
  retained; they are logged and counted (:attr:`BrokerStats.denied_publishes`). Will messages are
  checked at CONNECT, because amqtt publishes a will without consulting topic plugins.
* **A bound on what a disconnected session may queue** (amqtt's queue is unbounded).

Limits of amqtt 0.12 (see ``docs/broker.md``): MQTT 3.1.1 only, no shared subscriptions, all state
in memory (sessions, queues and retained messages are lost on restart), ~0.35x Mosquitto's
throughput (``bench/bench_broker.py``; :mod:`bridge.broker_speed` trims what our layer can).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import signal
import socket
import tempfile
import threading
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.errors import BrokerError, MQTTError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin
from amqtt.utils import gen_client_id
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from bridge.broker_speed import TrimmedBroker
from bridge.settings import BrokerSettings
from iotpipe.errors import ConfigError
from iotpipe.topics import check_filter, is_valid_name

if TYPE_CHECKING:
    from amqtt.adapters import ReaderAdapter, WriterAdapter
    from amqtt.session import Session

log = logging.getLogger(__name__)

__all__ = [
    "Acl",
    "AclRule",
    "BrokerStats",
    "BrokerThread",
    "EmbeddedBroker",
    "IotpipeAclPlugin",
    "IotpipeAuthPlugin",
    "PasswordFile",
    "SessionQueueLimitPlugin",
    "add_user",
    "amqtt_config",
    "filter_covers",
    "load_acl",
    "report_loop_error",
    "run",
]


# -- ACL --------------------------------------------------------------------------------------


def filter_covers(allowed: str, requested: str) -> bool:
    """Tell whether every topic matching ``requested`` also matches ``allowed``.

    ``requested`` is a topic name (for a publish) or a filter (for a subscribe); both are valid
    MQTT filters. ``iotpipe/#`` covers ``iotpipe/v1/+/+/telemetry``, but ``iotpipe/v1/a/#`` does
    not cover ``iotpipe/v1/+/x`` (that would reach other sites too).
    """
    want = requested.split("/")
    have = allowed.split("/")
    for index, level in enumerate(have):
        if level == "#":
            return True
        if index >= len(want):
            return False
        asked = want[index]
        if asked == "#":
            return False
        if level == "+":
            continue
        if asked != level:
            return False
    return len(want) == len(have)


class AclRule(BaseModel):
    """What one user (or every device) may do: topic filters to publish to and subscribe to."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()

    @field_validator("publish", "subscribe")
    @classmethod
    def _filters(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            check_filter(value.replace("{site}", "s").replace("{device}", "d"))
        return values

    def may_publish(self, topic: str) -> bool:
        """Whether a publish to ``topic`` is allowed."""
        return any(filter_covers(allowed, topic) for allowed in self.publish)

    def may_subscribe(self, topic_filter: str) -> bool:
        """Whether a subscription to ``topic_filter`` is allowed."""
        return any(filter_covers(allowed, topic_filter) for allowed in self.subscribe)


_DEVICE_DEFAULT = AclRule(publish=("iotpipe/v1/{site}/{device}/#",))
_PLACEHOLDER = re.compile(r"\{([^}]*)\}")


class Acl(BaseModel):
    """Per-user topic rules, read from a TOML file (see ``configs/broker-acl.toml``).

    A username listed under ``[users.NAME]`` gets exactly that rule. Any other username of the
    form ``{site}/{device}`` (valid names) gets the ``[devices]`` rule with ``{site}`` and
    ``{device}`` filled in. Everyone else may connect but neither publish nor subscribe.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    devices: AclRule = _DEVICE_DEFAULT
    users: dict[str, AclRule] = Field(default_factory=dict)

    @field_validator("devices")
    @classmethod
    def _known_placeholders(cls, rule: AclRule) -> AclRule:
        for value in (*rule.publish, *rule.subscribe):
            unknown = set(_PLACEHOLDER.findall(value)) - {"site", "device"}
            if unknown:
                raise ValueError(f"{value!r}: unknown placeholder {{{sorted(unknown)[0]}}}")
        return rule

    @field_validator("users")
    @classmethod
    def _no_placeholders(cls, users: dict[str, AclRule]) -> dict[str, AclRule]:
        for name, rule in users.items():
            if any(_PLACEHOLDER.search(v) for v in (*rule.publish, *rule.subscribe)):
                raise ValueError(f"users.{name}: placeholders are only for [devices]")
        return users

    _device_rules: dict[str, AclRule] = PrivateAttr(default_factory=dict)

    def rule_for(self, username: str | None) -> AclRule | None:
        """The rule that applies to ``username``, or None (nothing allowed)."""
        if username is None:
            return None
        named = self.users.get(username)
        if named is not None:
            return named
        cached = self._device_rules.get(username)
        if cached is not None:
            return cached
        parts = username.split("/")
        if len(parts) != 2 or not all(is_valid_name(part) for part in parts):
            return None
        site, device = parts

        def fill(values: Iterable[str]) -> tuple[str, ...]:
            return tuple(v.replace("{site}", site).replace("{device}", device) for v in values)

        rule = AclRule(publish=fill(self.devices.publish), subscribe=fill(self.devices.subscribe))
        if len(self._device_rules) < 100_000:  # bounded: usernames come from authenticated clients
            self._device_rules[username] = rule
        return rule

    def may_publish(self, username: str | None, topic: str) -> bool:
        """Whether ``username`` may publish to ``topic``."""
        rule = self.rule_for(username)
        return rule is not None and rule.may_publish(topic)

    def may_subscribe(self, username: str | None, topic_filter: str) -> bool:
        """Whether ``username`` may subscribe to ``topic_filter``."""
        rule = self.rule_for(username)
        return rule is not None and rule.may_subscribe(topic_filter)


def load_acl(path: Path) -> Acl:
    """Read and validate an ACL file.

    Raises:
        ConfigError: the file is missing, not TOML, or a rule is invalid (names the rule).
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("broker.acl_file", str(path), "no such file") from None
    except OSError as err:
        raise ConfigError(
            "broker.acl_file", str(path), f"cannot read it ({err.strerror})"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError("broker.acl_file", str(path), f"not valid TOML ({err})") from None
    try:
        return Acl.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown key (allowed: [devices], [users.NAME]; publish, subscribe)"
        raise ConfigError("broker.acl_file", str(path), f"{where}: {message}") from None


# -- passwords --------------------------------------------------------------------------------


def _hasher() -> Any:
    from pwdlib.hashers.argon2 import Argon2Hasher

    # OWASP's minimum for argon2id (19 MiB, 2 passes): ~25 ms per CONNECT here, and affordable on
    # a Raspberry Pi, where amqtt's default 64 MiB x 3 would be slow and memory-hungry.
    return Argon2Hasher(time_cost=2, memory_cost=19456, parallelism=1)


def parse_password_file(text: str) -> dict[str, str]:
    """Parse ``user:hash`` lines (``#`` comments and blank lines ignored).

    Raises:
        ValueError: a line is malformed or its hash is not argon2 (names the line).
    """
    from pwdlib.hashers.argon2 import Argon2Hasher

    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        username, sep, password_hash = line.partition(":")
        if not sep or not username:
            raise ValueError(f"line {number}: expected user:hash")
        if not Argon2Hasher.identify(password_hash):
            raise ValueError(
                f"line {number} (user {username!r}): not an argon2 hash "
                "(mosquitto_passwd hashes do not work here; use iotpipe broker --add-user)"
            )
        users[username] = password_hash
    return users


class PasswordFile:
    """A password file in amqtt's ``FileAuthPlugin`` format, re-read when it changes on disk.

    A broken edit while the broker runs is logged and the previous users stay in force, so a
    half-saved file never locks every device out.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}
        self._hasher = _hasher()
        # Unknown users still cost one verification, so response time does not reveal them.
        self._decoy = self._hasher.hash(os.urandom(16).hex())
        try:
            self._load()
        except FileNotFoundError:
            raise ConfigError(
                "broker.password_file",
                str(path),
                "no such file (create it with: iotpipe broker --add-user USER --password-file FILE)",
            ) from None
        except OSError as err:
            raise ConfigError(
                "broker.password_file", str(path), f"cannot read it ({err.strerror})"
            ) from None
        except ValueError as err:
            raise ConfigError("broker.password_file", str(path), str(err)) from None

    def __len__(self) -> int:
        return len(self._users)

    def _load(self) -> None:
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp == self._stamp:
            return
        self._users = parse_password_file(self.path.read_text(encoding="utf-8"))
        self._stamp = stamp
        log.info("broker password file loaded path=%s users=%d", self.path, len(self._users))

    def refresh(self) -> None:
        """Re-read the file if it changed; keep the old users if the new content is broken."""
        try:
            self._load()
        except (OSError, ValueError) as err:
            log.error("broker password file not reloaded path=%s error=%s", self.path, err)

    def verify(self, username: str, password: str) -> bool:
        """Check a username and password (slow on purpose: call it off the event loop)."""
        known = self._users.get(username)
        ok: bool = self._hasher.verify(password, known or self._decoy)
        return ok and known is not None


def add_user(path: Path, username: str, password: str) -> bool:
    """Add a user to a password file, or replace their password; create the file if needed.

    The file is rewritten atomically with mode 0600; other lines and comments are kept.

    Returns:
        True if the user was new, False if an existing password was replaced.

    Raises:
        ConfigError: the username or password is unusable, or the file cannot be written.
    """
    if not username or ":" in username or any(c.isspace() for c in username):
        raise ConfigError(
            "--add-user", username, "a username must be non-empty, without ':' or spaces"
        )
    if not password:
        raise ConfigError("password", "", "must not be empty")
    line = f"{username}:{_hasher().hash(password)}"
    try:
        old = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    except OSError as err:
        raise ConfigError(
            "--password-file", str(path), f"cannot read it ({err.strerror})"
        ) from None
    lines: list[str] = []
    new = True
    for existing in old:
        if existing.strip().partition(":")[0] == username and not existing.lstrip().startswith("#"):
            lines.append(line)
            new = False
        else:
            lines.append(existing)
    if new:
        lines.append(line)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        raise ConfigError(
            "--password-file", str(path), f"cannot write it ({err.strerror})"
        ) from None
    return new


# -- amqtt plugins ----------------------------------------------------------------------------


def _plugin_config(context: BaseContext, kind: type[Any]) -> Any:
    """The plugin's ``Config`` instance (amqtt hydrates it into ``context.config``)."""
    config = context.config
    if not isinstance(config, kind):
        raise TypeError(f"expected {kind.__qualname__}, got {type(config).__name__}")
    return config


class IotpipeAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type hints
    """Who may connect: everyone (auth off) or password-file users only (auth on).

    With auth off, clients without credentials are admitted but **not** marked anonymous, so
    amqtt keeps their persistent sessions and queues QoS 1/2 messages while they are away. With
    auth on, clients without a username are refused. With an ACL, a CONNECT whose will topic the
    user may not publish to is refused too (amqtt publishes wills without asking topic plugins).
    """

    @dataclass
    class Config:
        """Plugin options (filled by amqtt from the ``plugins`` config)."""

        password_file: str | None = None
        acl_file: str | None = None

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        config: IotpipeAuthPlugin.Config = _plugin_config(context, IotpipeAuthPlugin.Config)
        self.passwords = PasswordFile(Path(config.password_file)) if config.password_file else None
        self.acl = load_acl(Path(config.acl_file)) if config.acl_file else None
        self.refused = 0

    async def authenticate(self, *, session: Session) -> bool:
        """Admit or refuse one CONNECT."""
        ok = await self._check(session)
        if not ok:
            self.refused += 1
        return ok

    async def _check(self, session: Session) -> bool:
        username = session.username
        if self.passwords is not None:
            if not username:
                log.warning(
                    "broker connect refused client_id=%s reason=no-credentials", session.client_id
                )
                return False
            self.passwords.refresh()
            password = session.password or ""
            if not await asyncio.to_thread(self.passwords.verify, username, password):
                log.warning(
                    "broker connect refused client_id=%s username=%s reason=bad-credentials",
                    session.client_id,
                    username,
                )
                return False
        will_topic = session.will_topic if session.will_flag else None
        if self.acl is not None and will_topic and not self.acl.may_publish(username, will_topic):
            log.warning(
                "broker connect refused client_id=%s username=%s reason=will-topic-denied topic=%s",
                session.client_id,
                username,
                will_topic,
            )
            return False
        return True


class IotpipeAclPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no type hints
    """What an authenticated user may publish and subscribe to (see :class:`Acl`).

    A denied SUBSCRIBE gets the failure return code (0x80) in its SUBACK. A denied PUBLISH cannot
    be refused in MQTT 3.1.1: it is acknowledged (PUBACK) but neither forwarded nor retained; the
    first denial per (user, topic) is logged at WARNING, later ones at DEBUG, all are counted.
    """

    @dataclass
    class Config:
        """Plugin options (filled by amqtt from the ``plugins`` config)."""

        acl_file: str = ""

    _LOGGED_LIMIT = 10_000

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        config: IotpipeAclPlugin.Config = _plugin_config(context, IotpipeAclPlugin.Config)
        self.acl = load_acl(Path(config.acl_file))
        self.denied_publishes = 0
        self.denied_subscribes = 0
        self._logged: set[tuple[str | None, str]] = set()

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        """Allow or deny one publish, subscribe or delivery."""
        if action == Action.RECEIVE:
            return True  # what a client may read was decided when it subscribed
        username = session.username if session is not None else None
        client_id = session.client_id if session is not None else None
        if topic is None:
            return False
        if action == Action.PUBLISH:
            if self.acl.may_publish(username, topic):
                return True
            self.denied_publishes += 1
            self._log_denial("publish", client_id, username, topic)
            return False
        if self.acl.may_subscribe(username, topic):
            return True
        self.denied_subscribes += 1
        self._log_denial("subscribe", client_id, username, topic)
        return False

    def _log_denial(
        self, what: str, client_id: str | None, username: str | None, topic: str
    ) -> None:
        key = (username, f"{what} {topic}")
        first = key not in self._logged
        if first and len(self._logged) < self._LOGGED_LIMIT:
            self._logged.add(key)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "broker %s denied client_id=%s username=%s topic=%s",
            what,
            client_id,
            username,
            topic,
        )


class SessionQueueLimitPlugin(BasePlugin[BaseContext]):  # type: ignore[misc]  # untyped amqtt
    """Bound the messages amqtt queues for a disconnected persistent session (oldest dropped).

    amqtt's per-session queue is unbounded: a subscriber that never returns would grow the
    broker's memory without limit. Drops are logged and counted.
    """

    @dataclass
    class Config:
        """Plugin options (filled by amqtt from the ``plugins`` config)."""

        max_queued_messages: int = 10_000

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        config: SessionQueueLimitPlugin.Config = _plugin_config(
            context, SessionQueueLimitPlugin.Config
        )
        self.limit = config.max_queued_messages
        self.dropped = 0
        self._broker_context = context

    async def on_broker_retained_message(
        self, *, client_id: str | None, retained_message: Any
    ) -> None:
        """Called after amqtt queued a message for a disconnected session (client_id set)."""
        del retained_message
        if client_id is None:
            return  # an ordinary retained message, not a session queue
        get_session = getattr(self._broker_context, "get_session", None)
        session = get_session(client_id) if get_session is not None else None
        if session is None:
            return
        queue: asyncio.Queue[Any] = session.retained_messages
        dropped = 0
        while queue.qsize() > self.limit:
            queue.get_nowait()
            dropped += 1
        if dropped:
            self.dropped += dropped
            if self.dropped == dropped or self.dropped % 1000 < dropped:
                log.warning(
                    "broker session queue full client_id=%s limit=%d dropped_total=%d",
                    client_id,
                    self.limit,
                    self.dropped,
                )


# -- runner -----------------------------------------------------------------------------------


def amqtt_config(settings: BrokerSettings) -> dict[str, Any]:
    """The complete amqtt config for ``settings`` (never amqtt's defaults, which bind 0.0.0.0).

    Raises:
        ConfigError: the password or ACL file is missing or invalid.
    """
    # Fail here with one clear line rather than inside amqtt's plugin loader.
    if settings.password_file is not None:
        PasswordFile(settings.password_file)
    if settings.acl_file is not None:
        load_acl(settings.acl_file)
    plugins: dict[str, dict[str, Any]] = {
        f"{__name__}.IotpipeAuthPlugin": {
            "password_file": str(settings.password_file) if settings.password_file else None,
            "acl_file": str(settings.acl_file) if settings.acl_file else None,
        }
    }
    if settings.acl_file is not None:
        plugins[f"{__name__}.IotpipeAclPlugin"] = {"acl_file": str(settings.acl_file)}
    if settings.max_queued_messages:
        plugins[f"{__name__}.SessionQueueLimitPlugin"] = {
            "max_queued_messages": settings.max_queued_messages
        }
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{settings.host}:{settings.port}"}},
        "session_expiry_interval": settings.session_expiry or None,
        "plugins": plugins,
    }


def _bind_error(settings: BrokerSettings, err: OSError) -> ConfigError:
    """Turn a failed bind into one line naming the setting to change."""
    if isinstance(err, socket.gaierror):
        return ConfigError("broker.host", settings.host, "cannot resolve this name")
    if err.errno == errno.EADDRINUSE:
        return ConfigError(
            "broker.port",
            settings.port,
            f"{settings.host}:{settings.port} is already in use (another broker running? pick --port)",
        )
    if err.errno == errno.EADDRNOTAVAIL:
        return ConfigError("broker.host", settings.host, "not an address of this machine")
    if err.errno == errno.EACCES:
        return ConfigError(
            "broker.port", settings.port, "permission denied (ports below 1024 need root)"
        )
    return ConfigError(
        "broker.host", f"{settings.host}:{settings.port}", f"cannot listen there ({err})"
    )


def check_bind(settings: BrokerSettings) -> None:
    """Try to bind the listen address, so a busy port is one clear error and not a traceback.

    Raises:
        ConfigError: the address cannot be bound.
    """
    try:
        infos = socket.getaddrinfo(
            settings.host, settings.port, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as sock:
                # The same option asyncio's start_server uses, so TIME_WAIT leftovers don't count.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
    except OSError as err:
        raise _bind_error(settings, err) from None


class _QuietAmqttErrors(logging.Filter):
    """One line instead of a traceback for amqtt's own error logs (unless we log at DEBUG).

    A busy port is reported by us as a ConfigError, so amqtt's "Broker startup failed" traceback
    is dropped altogether.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() == "Broker startup failed":
            return False
        if (
            record.exc_info
            and record.exc_info[1] is not None
            and not log.isEnabledFor(logging.DEBUG)
        ):
            record.msg = f"{record.getMessage()}: {record.exc_info[1]!r}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def report_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The broker loop's exception handler: one line, the traceback only when we log at DEBUG.

    amqtt leaves tasks and futures whose exception nobody reads; asyncio reports each from its
    finalizer, so the report is made inside whichever garbage collection frees it, which may
    fire in the middle of another thread's ``ast.parse`` (pytest parses source to show a
    failure). On CPython 3.11 formatting a traceback calls ``ast.parse``, and one nested in
    another fails the outer with ``SystemError: AST constructor recursion depth mismatch``:
    the AST builder's recursion counter is one per interpreter (python/cpython#106905).
    """
    if log.isEnabledFor(logging.DEBUG):
        loop.default_exception_handler(context)
        return
    log.error(
        "broker loop error message=%s error=%r",
        context.get("message", "unhandled exception"),
        context.get("exception"),
    )


_VERIFIED = "iotpipe.verified"


class _HardenedBroker(TrimmedBroker):
    """amqtt's Broker, but a CONNECT is authenticated before it may touch an existing session.

    amqtt 0.12 resolves the session first and authenticates afterwards, so a client that then
    fails authentication has already deleted (clean_session=1) or hijacked (clean_session=0) the
    persistent session of whatever client id it claimed: with a wrong password, anyone who knows
    (or guesses) the bridge's client id could silently throw away its queued messages and its
    subscriptions. Here a refused CONNECT gets its CONNACK "not authorized" and leaves no trace.
    The session handling below is amqtt's own, unchanged, after that check.
    """

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except MQTTError:
            await writer.close()
            raise
        if not await super()._authenticate(session, None):
            handler.attach(session, reader, writer)
            await handler.mqtt_connack_authorize(False)
            await writer.close()
            raise MQTTError(
                f"client {session.client_id!r} from {remote_address}:{remote_port} not authorized"
            )

        # From here on: amqtt 0.12's Broker._initialize_client_session, unchanged.
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for attribute in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "keep_alive",
                "username",
                "password",
            ):
                setattr(existing, attribute, getattr(session, attribute))
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        session.attributes[_VERIFIED] = True
        return handler, session

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        # Already checked in _initialize_client_session; don't verify the password twice.
        if session.attributes.pop(_VERIFIED, False):
            return True
        ok: bool = await super()._authenticate(session, listener)
        return ok


async def _end_connections(broker: Broker, timeout: float = 5.0) -> None:
    """End every client connection as if the client had closed it, before amqtt's shutdown.

    amqtt's shutdown cancels each connection's reader task and waits for it. On Python 3.11,
    ``asyncio.wait_for`` swallows a cancellation that arrives together with data (say a PUBACK
    in flight), the reader reads on, and shutdown waits forever. An end-of-file instead makes
    every reader stop by itself. Wills are not published: a broker shutdown is not a device
    going offline.
    """
    loop = asyncio.get_running_loop()
    for session, handler in list(broker.sessions.values()):
        if session.transitions.state == "connected" and handler.reader is not None:
            session.will_flag = False
            handler.reader.feed_eof()
    deadline = loop.time() + timeout
    while loop.time() < deadline and any(
        session.transitions.state == "connected" for session, _ in broker.sessions.values()
    ):
        await asyncio.sleep(0.01)


@dataclass
class BrokerStats:
    """What the embedded broker counted since it started."""

    refused_connections: int = 0
    denied_publishes: int = 0
    denied_subscribes: int = 0
    dropped_queued: int = 0
    sessions: int = 0
    retained: int = 0


@dataclass
class EmbeddedBroker:
    """amqtt configured from :class:`BrokerSettings`; start and stop it on one event loop.

    Attributes:
        settings: the validated settings.
    """

    settings: BrokerSettings
    _broker: Broker | None = field(default=None, init=False, repr=False)
    _quiet: logging.Filter = field(default_factory=_QuietAmqttErrors, init=False, repr=False)

    async def start(self) -> None:
        """Bind the listener and start serving.

        Raises:
            ConfigError: a file is invalid or the address cannot be bound.
        """
        config = amqtt_config(self.settings)
        check_bind(self.settings)
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.addFilter(self._quiet)
        try:
            broker = _HardenedBroker(config)
            await broker.start()
        except BrokerError as err:
            amqtt_log.removeFilter(self._quiet)
            cause = err.__cause__
            if isinstance(cause, OSError):
                raise _bind_error(self.settings, cause) from None
            raise ConfigError("broker", self.settings.url, f"amqtt cannot start ({err})") from None
        self._broker = broker
        log.info("broker started url=%s", self.settings.url)

    async def stop(self) -> None:
        """Disconnect every client and close the listener (idempotent)."""
        broker, self._broker = self._broker, None
        if broker is not None:
            stats = self._stats(broker)
            await _end_connections(broker)
            await broker.shutdown()
            logging.getLogger("amqtt.broker").removeFilter(self._quiet)
            log.info(
                "broker stopped refused_connections=%d denied_publishes=%d dropped_queued=%d",
                stats.refused_connections,
                stats.denied_publishes,
                stats.dropped_queued,
            )

    @property
    def running(self) -> bool:
        """Whether the broker is serving."""
        return self._broker is not None

    def queued_messages(self, client_id: str) -> int:
        """How many messages wait for the disconnected persistent session ``client_id``."""
        if self._broker is None:
            return 0
        session = self._broker.sessions.get(client_id, (None, None))[0]
        return int(session.retained_messages.qsize()) if session is not None else 0

    @property
    def stats(self) -> BrokerStats:
        """Counters so far (zeros once stopped)."""
        return self._stats(self._broker) if self._broker is not None else BrokerStats()

    @staticmethod
    def _stats(broker: Broker) -> BrokerStats:
        stats = BrokerStats(sessions=len(broker.sessions), retained=len(broker.retained_messages))
        for plugin in broker.plugins_manager.plugins:
            if isinstance(plugin, IotpipeAuthPlugin):
                stats.refused_connections = plugin.refused
            elif isinstance(plugin, IotpipeAclPlugin):
                stats.denied_publishes = plugin.denied_publishes
                stats.denied_subscribes = plugin.denied_subscribes
            elif isinstance(plugin, SessionQueueLimitPlugin):
                stats.dropped_queued = plugin.dropped
        return stats


def describe(settings: BrokerSettings) -> str:
    """The start-up line: where the broker listens and how it is protected."""
    auth = (
        f"passwords from {settings.password_file}"
        if settings.password_file
        else "off (anyone may connect)"
    )
    acl = f"{settings.acl_file}" if settings.acl_file else "off"
    exposed = " (every interface!)" if settings.host == "0.0.0.0" else ""  # noqa: S104 - a warning, not a bind
    return (
        f"iotpipe broker listening on {settings.url}{exposed}; MQTT 3.1.1 (amqtt); "
        f"auth {auth}; acl {acl}; state in memory"
    )


async def serve(settings: BrokerSettings, *, echo: Callable[[str], None] = print) -> None:
    """Run the broker until SIGTERM or SIGINT, then shut it down cleanly.

    Raises:
        ConfigError: a file is invalid or the address cannot be bound.
    """
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(report_loop_error)
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    broker = EmbeddedBroker(settings)
    try:
        await broker.start()
        echo(describe(settings))
        if settings.password_file is None and settings.host not in ("127.0.0.1", "localhost"):
            log.warning(
                "broker auth is off: any client that can reach %s may publish", settings.url
            )
        elif settings.password_file is not None and settings.acl_file is None:
            log.warning(
                "broker has no ACL: every authenticated user may publish and subscribe anywhere"
            )
        await stop.wait()
        stats = broker.stats
        await broker.stop()
        echo(
            "iotpipe broker stopped "
            f"(refused connections {stats.refused_connections}, "
            f"denied publishes {stats.denied_publishes}, dropped queued {stats.dropped_queued})"
        )
    finally:
        await broker.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)


def run(settings: BrokerSettings, *, echo: Callable[[str], None] = print) -> None:
    """Blocking entry point for the CLI: serve until a signal, exit normally.

    Raises:
        ConfigError: a file is invalid or the address cannot be bound.
    """
    asyncio.run(serve(settings, echo=echo))


class BrokerThread:
    """An :class:`EmbeddedBroker` on its own event loop in a named background thread.

    For tests and for embedding the broker in another process; use as a context manager.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.broker = EmbeddedBroker(settings)
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(report_loop_error)
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="iotpipe-broker", daemon=True
        )

    def start(self, timeout: float = 15.0) -> BrokerThread:
        """Start the loop and the broker; return once it accepts connections.

        Raises:
            ConfigError: a file is invalid or the address cannot be bound.
        """
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.broker.start(), self._loop).result(timeout)
        except BaseException:
            self._close_loop()
            raise
        return self

    def call(self, func: Callable[[EmbeddedBroker], Any], timeout: float = 5.0) -> Any:
        """Run ``func(broker)`` on the broker's loop and return its result (thread-safe)."""

        async def _call() -> Any:
            return func(self.broker)

        return asyncio.run_coroutine_threadsafe(_call(), self._loop).result(timeout)

    @property
    def stats(self) -> BrokerStats:
        """The broker's counters, read on its own loop."""
        stats: BrokerStats = self.call(lambda broker: broker.stats)
        return stats

    def stop(self, timeout: float = 15.0) -> None:
        """Shut the broker down and end the thread."""
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(self.broker.stop(), self._loop).result(timeout)
        self._close_loop()

    def _close_loop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> BrokerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
