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
  A connected user whose line is deleted or changed (``iotpipe device revoke``, a rotation) is
  disconnected within :data:`REVOKE_CHECK_INTERVAL`.
* **Per-device ACL** (:class:`Acl`, a commented TOML file): a device authenticates as
  ``{site}/{device}`` and may publish only under ``iotpipe/v1/{site}/{device}/``; named service
  users get their own rules. The same convention as Mosquitto's ``pattern write iotpipe/v1/%u/#``.
  Denied publishes are acknowledged (MQTT 3.1.1 has no negative PUBACK) but never forwarded nor
  retained; they are logged and counted (:attr:`BrokerStats.denied_publishes`). Will messages are
  checked at CONNECT, because amqtt publishes a will without consulting topic plugins.
* **A bound on what a disconnected session may queue** (amqtt's queue is unbounded), and every
  message the broker drops counted by reason and logged (:class:`DropCounter`).
* **Its own ``/metrics`` and ``/healthz``** (:class:`BrokerEndpoint`, :mod:`bridge.broker_metrics`).
* **State across restarts** (``state_file``): persistent sessions with their subscriptions,
  in-flight and queued messages, and retained messages are restored at start, saved every
  ``autosave_interval`` seconds when something changed and at a clean stop
  (:mod:`bridge.broker_store` holds the file; :func:`capture_state` and :func:`restore_state`
  move the state out of and into amqtt). amqtt's own persistence plugin is not used (see
  ``docs/broker.md``).

Limits of amqtt 0.12 (see ``docs/broker.md``): MQTT 3.1.1 only, no shared subscriptions, state in
memory unless ``state_file`` is set. Throughput: ``bench/bench_broker.py`` (:mod:`bridge.broker_speed`
and :mod:`bridge.mqtt311` trim amqtt's per-packet costs).
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
import ssl
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action, BaseContext
from amqtt.errors import BrokerError, MQTTError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin
from amqtt.session import OutgoingApplicationMessage
from amqtt.utils import gen_client_id
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from bridge.broker_metrics import DROP_REASONS, BrokerEndpoint, DropCounter
from bridge.broker_speed import TrimmedBroker
from bridge.broker_store import (
    BrokerState,
    BrokerStore,
    BrokerStoreError,
    InflightMessage,
    StoredMessage,
    StoredSession,
    Subscription,
)
from bridge.mqtt311 import KEEPALIVE_GRACE, Mqtt311Broker
from bridge.settings import BrokerSettings
from iotpipe.credentials import PasswordFormat, argon2_hasher, set_password
from iotpipe.errors import ConfigError
from iotpipe.topics import check_filter, is_valid_name
from iotpipe.watchdog import Liveness, Supervisor

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
    "Restored",
    "SessionQueueLimitPlugin",
    "add_user",
    "amqtt_config",
    "capture_state",
    "filter_covers",
    "load_acl",
    "report_loop_error",
    "restore_state",
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
        self._hasher = argon2_hasher()
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

    @property
    def users(self) -> Mapping[str, str]:
        """Username -> hash as last loaded (a new mapping object after every change)."""
        return self._users

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
    """Add a user to an amqtt-format password file, or replace their password (0600, atomic).

    Returns:
        True if the user was new, False if an existing password was replaced.

    Raises:
        ConfigError: the username or password is unusable, or the file cannot be written.
    """
    return set_password(path, username, password, PasswordFormat.AMQTT)


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
    broker's memory without limit. Drops are counted (reason ``queue_full``) and logged at
    WARNING when a session's queue starts to overflow, then once per 1000 drops.
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
        self.drops = DropCounter()
        self._broker_context = context
        # Client ids whose queue overflows now: the first drop of each overflow is logged. An id
        # leaves once its queue is seen below the limit (its client came back meanwhile).
        self._overflowing: set[str] = set()

    async def on_broker_retained_message(
        self, *, client_id: str | None, retained_message: Any
    ) -> None:
        """Called after amqtt queued a message for a disconnected session (client_id set)."""
        del retained_message
        if client_id is None:
            return  # an ordinary retained message, not a session queue
        get_session = getattr(self._broker_context, "get_session", None)
        session = get_session(client_id) if get_session is not None else None
        if session is not None:
            self.enforce(session)

    def enforce(self, session: Session) -> int:
        """Drop the oldest messages of ``session``'s queue beyond the limit; return how many.

        Called for every queued message, and for each session restored from the state file.
        """
        queue: asyncio.Queue[Any] = session.retained_messages
        client_id = session.client_id
        if queue.qsize() <= self.limit:
            # A queue exactly at the limit may be one this overflow just trimmed: amqtt fires its
            # events after the fact, several messages at once. Only a queue below the limit shows
            # that the client came back and took its messages, so the overflow is over.
            if queue.qsize() < self.limit:
                self._overflowing.discard(client_id)
            return 0
        dropped = 0
        while queue.qsize() > self.limit:
            queue.get_nowait()
            dropped += 1
        burst = client_id not in self._overflowing
        if burst:
            if len(self._overflowing) >= 100_000:  # bounded: ids of expired sessions stay here
                self._overflowing.clear()
            self._overflowing.add(client_id)
        self.drops.add("queue_full", dropped, client_id, burst=burst, limit=self.limit)
        return dropped


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
    listeners: dict[str, dict[str, Any]] = {
        "default": {"type": "tcp", "bind": f"{settings.host}:{settings.port}"}
    }
    if settings.tls_port:
        listeners["tls"] = _tls_listener(settings)
    return {
        "listeners": listeners,
        "session_expiry_interval": settings.session_expiry or None,
        "plugins": plugins,
    }


def _tls_listener(settings: BrokerSettings) -> dict[str, Any]:
    """amqtt's config of the ``tls_port`` listener, once its files are known to load.

    Raises:
        ConfigError: the certificate or the key is missing, unreadable or not a pair.
    """
    cert, key = settings.tls_cert_file, settings.tls_key_file
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as err:
        reason = getattr(err, "strerror", None) or getattr(err, "reason", None) or str(err)
        raise ConfigError(
            "broker.tls_cert_file", str(cert), f"cannot load it with {key} ({reason})"
        ) from None
    return {
        "type": "tcp",
        "bind": f"{settings.host}:{settings.tls_port}",
        "ssl": True,
        "certfile": str(cert),
        "keyfile": str(key),
    }


def _bind_error(settings: BrokerSettings, field: str, port: int, err: OSError) -> ConfigError:
    """Turn a failed bind of ``port`` (setting ``field``) into one line naming the setting."""
    if isinstance(err, socket.gaierror):
        return ConfigError("broker.host", settings.host, "cannot resolve this name")
    if err.errno == errno.EADDRINUSE:
        return ConfigError(
            field,
            port,
            f"{settings.host}:{port} is already in use (another broker running? pick another port)",
        )
    if err.errno == errno.EADDRNOTAVAIL:
        return ConfigError("broker.host", settings.host, "not an address of this machine")
    if err.errno == errno.EACCES:
        return ConfigError(field, port, "permission denied (ports below 1024 need root)")
    return ConfigError("broker.host", f"{settings.host}:{port}", f"cannot listen there ({err})")


def check_bind(settings: BrokerSettings) -> None:
    """Try to bind the listen addresses, so a busy port is one clear error and not a traceback.

    Raises:
        ConfigError: an address cannot be bound.
    """
    ports = [("broker.port", settings.port)]
    if settings.tls_port:
        ports.append(("broker.tls_port", settings.tls_port))
    for name, port in ports:
        try:
            infos = socket.getaddrinfo(
                settings.host, port, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
            )
            for family, kind, proto, _, address in infos:
                with socket.socket(family, kind, proto) as sock:
                    # The option asyncio's start_server uses, so TIME_WAIT leftovers don't count.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(address)
        except OSError as err:
            raise _bind_error(settings, name, port, err) from None


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


class _HardenedBroker(TrimmedBroker, Mqtt311Broker):
    """amqtt's Broker with MQTT 3.1.1's rules (:mod:`bridge.mqtt311`) and trimmed per-packet costs
    (:mod:`bridge.broker_speed`); a CONNECT is authenticated before it may touch an existing session.

    amqtt 0.12 resolves the session first and authenticates afterwards, so a client that then
    fails authentication has already deleted (clean_session=1) or hijacked (clean_session=0) the
    persistent session of whatever client id it claimed: with a wrong password, anyone who knows
    (or guesses) the bridge's client id could silently throw away its queued messages and its
    subscriptions. Here a refused CONNECT gets its CONNACK "not authorized" and leaves no trace.
    The session handling below is amqtt's own, unchanged, after that check.

    It also counts, in plain integers read by :attr:`EmbeddedBroker.stats`, what amqtt does not:
    PUBLISH packets received (:attr:`received`) and the messages a persistent session still
    held when it expired or was replaced by a clean session (:attr:`drops`).

    Attributes:
        drops: messages dropped with their session (``session_expired``, ``session_replaced``).
        received: PUBLISH packets received from clients.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drops = DropCounter()
        self.received = 0
        self._closing = False

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            handler, session = await self.handler_class.init_from_connect(
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
        # MQTT-3.1.2-24: silent for 1.5x the keep-alive means gone (amqtt: the keep-alive itself).
        session.keep_alive *= KEEPALIVE_GRACE
        session.attributes[_VERIFIED] = True
        return handler, session

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        # Already checked in _initialize_client_session; don't verify the password twice.
        if session.attributes.pop(_VERIFIED, False):
            return True
        ok: bool = await super()._authenticate(session, listener)
        return ok

    # -- counting: small overrides around amqtt's own code ------------------------------------

    async def _accept(self, client_session: Session, message: Any) -> bool:
        # One integer per PUBLISH; amqtt's message_received plugin event would cost a task each.
        if message is not None:
            self.received += 1
        return await super()._accept(client_session, message)

    async def _delete_session(self, client_id: str) -> None:
        # amqtt calls this only when a clean_session=1 CONNECT takes over a client id.
        self.count_discarded(client_id, "session_replaced")
        await super()._delete_session(client_id)

    async def _cleanup_session(self, client_id: str) -> None:
        # amqtt calls this for a session past session_expiry, for a clean session once its client
        # is gone (nothing of a persistent session is lost there), and for all at shutdown.
        if not self._closing:
            self.count_discarded(client_id, "session_expired")
        await super()._cleanup_session(client_id)

    async def shutdown(self) -> None:
        """Stop; the sessions amqtt cleans up now are not expiring, so nothing counts as dropped."""
        self._closing = True
        await super().shutdown()

    def count_discarded(self, client_id: str, reason: str) -> None:
        """Count what a persistent session holds as dropped for ``reason``; call before discarding it.

        What it holds: the messages queued for it while it was away and those sent to it but not
        yet acknowledged. A clean session's state ends with its connection by definition (MQTT
        3.1.1 section 3.1.2.4), so nothing of it is counted.
        """
        session = self._sessions.get(client_id, (None, None))[0]
        if session is None or session.clean_session:
            return
        queued = int(session.retained_messages.qsize())
        inflight = len(session.inflight_out)
        self.drops.add(
            reason, queued + inflight, client_id, burst=True, queued=queued, inflight=inflight
        )


async def _end_connections(broker: Broker, timeout: float = 5.0) -> None:
    """End every client connection as if the client had closed it, before amqtt's shutdown.

    amqtt's shutdown cancels each connection's reader task and waits for it. On Python 3.11,
    ``asyncio.wait_for`` swallows a cancellation that arrives together with data (say a PUBACK
    in flight), the reader reads on, and shutdown waits forever. An end-of-file instead makes
    every reader stop by itself. Wills are not published: a broker shutdown is not a device
    going offline.
    """
    # First no new connections: a client reconnecting at once (the bridge does) would otherwise
    # get a fresh session on the broker that is stopping, and what it published there after the
    # state was saved would be acknowledged and then lost.
    for server in broker._servers.values():
        if server.instance is not None:
            server.instance.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        live = [
            (session, handler)
            for session, handler in broker.sessions.values()
            if session.transitions.state == "connected"
        ]
        if not live:
            return
        for session, handler in live:  # again for one that finished its CONNECT meanwhile
            session.will_flag = False
            if handler.reader is not None:
                handler.reader.feed_eof()
        await asyncio.sleep(0.01)


#: How often the password file is checked for revoked logins to disconnect (a stat call).
REVOKE_CHECK_INTERVAL = 1.0


def _auth_plugin(broker: Broker) -> IotpipeAuthPlugin | None:
    return next(
        (p for p in broker.plugins_manager.plugins if isinstance(p, IotpipeAuthPlugin)), None
    )


async def _end_revoked_logins(broker: Broker, passwords: PasswordFile) -> None:
    """Disconnect a connected client whose password line was deleted or changed.

    A new CONNECT is checked against the file anyway; this ends the connections opened before
    ``iotpipe device revoke`` (or a rotation), as Mosquitto does on its reload. The connection
    ends as if the client had dropped it (its will is published).
    """
    known = passwords.users
    while True:
        await asyncio.sleep(REVOKE_CHECK_INTERVAL)
        passwords.refresh()
        current = passwords.users
        if current is known:
            continue
        withdrawn = {user for user, hashed in known.items() if current.get(user) != hashed}
        known = current
        for session, handler in list(broker.sessions.values()):
            if (
                session.username in withdrawn
                and session.transitions.state == "connected"
                and handler.reader is not None
            ):
                log.warning(
                    "broker disconnected client_id=%s username=%s reason=credentials-withdrawn",
                    session.client_id,
                    session.username,
                )
                handler.reader.feed_eof()


# -- state across restarts -------------------------------------------------------------------


def capture_state(broker: Broker, now: float | None = None) -> BrokerState:
    """What the state file keeps, copied out of amqtt (call it on the broker's loop).

    Synchronous, so the copy is consistent: nothing runs on the loop while it is taken. Only
    persistent sessions (``clean_session=0``, not anonymous) are kept; a session connected at
    this moment counts as disconnected from ``now`` on, should the next start follow a crash.
    """
    now = time.time() if now is None else now
    subscriptions: dict[str, list[Subscription]] = {}
    for topic_filter, subscribers in broker.subscriptions.items():
        for session, qos in subscribers:
            subscriptions.setdefault(session.client_id, []).append(
                Subscription(topic_filter, int(qos))
            )
    sessions: list[StoredSession] = []
    for client_id, (session, _) in broker.sessions.items():
        if session.clean_session or session.is_anonymous:
            continue
        disconnected_at = session.last_disconnect_time
        if session.transitions.state == "connected" or disconnected_at is None:
            disconnected_at = int(now)
        sessions.append(
            StoredSession(
                client_id=client_id,
                disconnected_at=int(disconnected_at),
                subscriptions=tuple(subscriptions.get(client_id, ())),
                inflight=tuple(
                    _stored_inflight(message)
                    for message in session.inflight_out.values()
                    if message.packet_id is not None and message.qos in (1, 2)
                ),
                queued=tuple(
                    StoredMessage(message.topic, bytes(message.data), int(message.qos or 0))
                    # Read in place: taking items out of an asyncio.Queue and putting them back
                    # would wake its getters. ``_queue`` is CPython's deque behind every Queue.
                    for message in session.retained_messages._queue
                ),
            )
        )
    retained = tuple(
        StoredMessage(message.topic, bytes(message.data), int(message.qos or 0))
        for message in broker.retained_messages.values()
    )
    return BrokerState(sessions=tuple(sessions), retained=retained, taken_at=now)


def _stored_inflight(message: OutgoingApplicationMessage) -> InflightMessage:
    return InflightMessage(
        packet_id=int(message.packet_id),
        topic=message.topic,
        payload=bytes(message.data),
        qos=int(message.qos),
        retain=bool(message.retain),
        released=message.qos == 2 and message.pubrec_packet is not None,
    )


@dataclass(frozen=True)
class Restored:
    """What a start took from the state file.

    Attributes:
        sessions: persistent sessions restored.
        queued: messages back in their sessions' queues.
        inflight: unacknowledged messages to resend (``dup=1``) when their clients return.
        retained: retained messages.
        expired: sessions not restored: disconnected for longer than ``session_expiry``.
        dropped: queued messages dropped for ``max_queued_messages``.
    """

    sessions: int = 0
    queued: int = 0
    inflight: int = 0
    retained: int = 0
    expired: int = 0
    dropped: int = 0


def restore_state(
    broker: Broker,
    state: BrokerState,
    *,
    session_expiry: int = 0,
    limit: SessionQueueLimitPlugin | None = None,
    now: float | None = None,
) -> Restored:
    """Put a saved state into a started amqtt broker that has none yet (call it on its loop).

    Each session comes back *disconnected*, as if its client had just gone away: its
    subscriptions receive (and queue) from now on, and when the client reconnects with
    ``clean_session=0`` it gets ``session_present=1``, its in-flight messages again with
    ``dup=1`` and their packet ids, then its queue. ``session_expiry`` and the queue ``limit``
    apply as to live sessions.
    """
    now = time.time() if now is None else now
    sessions = queued = inflight = expired = dropped = 0
    for stored in state.sessions:
        if session_expiry and stored.disconnected_at < int(now - session_expiry):
            expired += 1
            continue
        handler, session = broker.create_offline_session(stored.client_id)
        session.clean_session = False
        session.last_disconnect_time = stored.disconnected_at
        for subscription in stored.subscriptions:
            broker.subscriptions.setdefault(subscription.topic_filter, []).append(
                (session, subscription.qos)
            )
        for sent in stored.inflight:
            session.inflight_out[sent.packet_id] = _outgoing(sent)
        if stored.inflight:
            # New packet ids continue after the restored ones (next_packet_id skips any in use).
            session._packet_id = stored.inflight[-1].packet_id
        for message in stored.queued:
            session.retained_messages.put_nowait(
                RetainedApplicationMessage(None, message.topic, message.payload, message.qos)
            )
        if limit is not None:
            dropped += limit.enforce(session)
        broker.sessions[stored.client_id] = (session, handler)
        sessions += 1
        inflight += len(stored.inflight)
        queued += session.retained_messages.qsize()
    for message in state.retained:
        broker.retained_messages[message.topic] = RetainedApplicationMessage(
            None, message.topic, message.payload, message.qos
        )
    return Restored(sessions, queued, inflight, len(state.retained), expired, dropped)


def _outgoing(sent: InflightMessage) -> OutgoingApplicationMessage:
    """An in-flight message as amqtt holds one that was sent and awaits its acknowledgement."""
    message = OutgoingApplicationMessage(
        sent.packet_id, sent.topic, sent.qos, sent.payload, sent.retain
    )
    # A PUBLISH was sent: a retry goes out with dup=1 (MQTT-3.3.1-1).
    message.publish_packet = message.build_publish_packet()
    if sent.released:
        # QoS 2 past PUBREC: what is resent is the PUBREL (MQTT-4.4.0-1).
        message.pubrec_packet = PubrecPacket.build(sent.packet_id)
        message.pubrel_packet = PubrelPacket.build(sent.packet_id)
    return message


class _StatefulBroker(_HardenedBroker):
    """:class:`_HardenedBroker` that starts from a saved state and tells when its state changed.

    The restore happens inside ``start()``, after amqtt has emptied its sessions, subscriptions
    and retained messages and before its listeners open, so no client is served before the
    saved state is back. :meth:`fingerprint` is the cheap "did anything change" check of the
    autosave.
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        restore: BrokerState | None = None,
        session_expiry: int = 0,
    ) -> None:
        super().__init__(config)
        self._restore = restore
        self._session_expiry = session_expiry
        #: What the start took from the state file (None without one).
        self.restored: Restored | None = None
        # Bumped by every change the fingerprint cannot see in the sessions' sizes.
        self._changes = 0
        self._published = 0
        self._distributed = 0

    async def _start_listeners(self) -> None:
        if self._restore is not None:
            limit = next(
                (p for p in self.plugins_manager.plugins if isinstance(p, SessionQueueLimitPlugin)),
                None,
            )
            self.restored = restore_state(
                self, self._restore, session_expiry=self._session_expiry, limit=limit
            )
            self._restore = None
        await super()._start_listeners()

    def fingerprint(self) -> tuple[int, ...]:
        """Changes if the state the file keeps changed; O(sessions), no copying.

        Counters cover what only grows or is replaced (publishes, their distribution to the
        sessions, retained messages, subscriptions, sessions ending). The sums cover the rest:
        with no new distribution, queues and in-flight sets can only shrink (delivery,
        acknowledgement), so their sizes move; and every message put in flight takes a new
        packet id, so the sum of the sessions' last packet ids moves too.
        """
        queued = inflight = packet_ids = connected = 0
        for session, _ in self.sessions.values():
            queued += session.retained_messages.qsize()
            inflight += len(session.inflight_out)
            packet_ids += session._packet_id
            connected += session.transitions.state == "connected"
        return (
            self._changes,
            self._published,
            self._distributed,
            len(self.sessions),
            connected,
            queued,
            inflight,
            packet_ids,
        )

    @property
    def undistributed(self) -> int:
        """Messages accepted from publishers and not yet handed to the subscribers' sessions."""
        return self._published - self._distributed

    async def _broadcast_message(self, *args: Any, **kwargs: Any) -> None:
        self._published += 1
        await super()._broadcast_message(*args, **kwargs)

    async def _run_broadcast(self, *args: Any, **kwargs: Any) -> None:
        await super()._run_broadcast(*args, **kwargs)
        self._distributed += 1

    async def retain_message(self, *args: Any, **kwargs: Any) -> None:
        self._changes += 1
        await super().retain_message(*args, **kwargs)

    async def add_subscription(self, *args: Any, **kwargs: Any) -> int:
        self._changes += 1
        granted: int = await super().add_subscription(*args, **kwargs)
        return granted

    def _del_subscription(self, *args: Any, **kwargs: Any) -> int:
        self._changes += 1
        deleted: int = super()._del_subscription(*args, **kwargs)
        return deleted

    async def _delete_session(self, *args: Any, **kwargs: Any) -> None:
        self._changes += 1
        await super()._delete_session(*args, **kwargs)

    async def _cleanup_session(self, *args: Any, **kwargs: Any) -> None:
        self._changes += 1
        await super()._cleanup_session(*args, **kwargs)

    async def _stop_handler(self, *args: Any, **kwargs: Any) -> None:
        self._changes += 1  # a disconnect: the session's disconnected_at changed
        await super()._stop_handler(*args, **kwargs)


async def _settle(broker: _StatefulBroker, timeout: float = 5.0) -> None:
    """Wait until every accepted publish has reached its subscribers' sessions (or ``timeout``).

    At a clean stop, after the connections ended: what publishers were PUBACKed for then sits in
    the sessions' queues, and the final save has it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while broker.undistributed > 0 and loop.time() < deadline:
        await asyncio.sleep(0.01)
    if broker.undistributed > 0:
        log.warning("broker stopping with messages not distributed count=%d", broker.undistributed)


@dataclass
class BrokerStats:
    """What the embedded broker counted since it started, and its state now.

    Attributes:
        refused_connections: CONNECTs refused (credentials, will topic).
        denied_publishes: publishes the ACL denied.
        denied_subscribes: subscriptions the ACL denied.
        dropped: accepted messages discarded, per reason (every reason of ``DROP_REASONS``).
        received: PUBLISH packets received from clients.
        connections: open client connections (including those still in their CONNECT).
        sessions: sessions kept, whatever their state.
        connected_sessions: sessions whose client is connected.
        disconnected_sessions: persistent sessions waiting for their client.
        queued: messages queued for disconnected sessions, all sessions together.
        inflight: QoS 1/2 messages sent to clients and not yet acknowledged.
        retained: retained messages.
    """

    refused_connections: int = 0
    denied_publishes: int = 0
    denied_subscribes: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    received: int = 0
    connections: int = 0
    sessions: int = 0
    connected_sessions: int = 0
    disconnected_sessions: int = 0
    queued: int = 0
    inflight: int = 0
    retained: int = 0

    @property
    def dropped_total(self) -> int:
        """Messages dropped for any reason."""
        return sum(self.dropped.values())

    def summary(self) -> str:
        """The counters of the stop line: ``refused connections 0, ..., dropped 7 (queue_full 7)``."""
        reasons = ", ".join(f"{reason} {count}" for reason, count in self.dropped.items() if count)
        return (
            f"refused connections {self.refused_connections}, "
            f"denied publishes {self.denied_publishes}, "
            f"dropped {self.dropped_total}" + (f" ({reasons})" if reasons else "")
        )


@dataclass
class EmbeddedBroker:
    """amqtt configured from :class:`BrokerSettings`; start and stop it on one event loop.

    With ``settings.state_file``, the persistent sessions and retained messages saved there are
    restored at :meth:`start`, saved every ``settings.autosave_interval`` seconds when something
    changed (off the event loop, from a copy taken on it), and saved at :meth:`stop` after the
    clients are disconnected. A crash loses at most the changes since the last save.

    Attributes:
        settings: the validated settings.
        state_checks: autosave ticks so far (each compares the state with the last save).
        state_saves: saves of the state file so far (autosaves and the one at stop).
    """

    settings: BrokerSettings
    state_checks: int = field(default=0, init=False)
    state_saves: int = field(default=0, init=False)
    _broker: _HardenedBroker | None = field(default=None, init=False, repr=False)
    _store: BrokerStore | None = field(default=None, init=False, repr=False)
    _autosave: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _revoker: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _quiet: logging.Filter = field(default_factory=_QuietAmqttErrors, init=False, repr=False)

    async def start(self) -> None:
        """Restore the saved state (if configured), bind the listener and start serving.

        Raises:
            ConfigError: a file is invalid or the address cannot be bound.
            BrokerStoreError: the state file cannot be opened or read (e.g. it is from a newer
                iotpipe, or another broker has it open).
        """
        config = amqtt_config(self.settings)
        check_bind(self.settings)
        store = state = None
        if self.settings.state_file is not None:
            store = await asyncio.to_thread(BrokerStore, self.settings.state_file)
            try:
                state = await asyncio.to_thread(store.load)
            except BaseException:
                store.close()
                raise
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.addFilter(self._quiet)
        try:
            broker = (
                _StatefulBroker(config, restore=state, session_expiry=self.settings.session_expiry)
                if store is not None
                else _HardenedBroker(config)
            )
            broker.max_inflight = self.settings.max_inflight_messages
            await broker.start()
        except BaseException as err:
            amqtt_log.removeFilter(self._quiet)
            if store is not None:
                store.close()
            if not isinstance(err, BrokerError):
                raise
            cause = err.__cause__
            if isinstance(cause, OSError):
                raise _bind_error(self.settings, "broker.port", self.settings.port, cause) from None
            raise ConfigError("broker", self.settings.url, f"amqtt cannot start ({err})") from None
        self._broker = broker
        if store is not None and state is not None:
            self._store = store
            self._autosave = asyncio.create_task(
                self._autosave_loop(broker, store), name="iotpipe-broker-autosave"
            )
            self._log_restored(broker, state)
        auth = _auth_plugin(broker)
        if auth is not None and auth.passwords is not None:
            self._revoker = asyncio.create_task(
                _end_revoked_logins(broker, auth.passwords), name="iotpipe-broker-revoker"
            )
        log.info("broker started url=%s", self.settings.url)

    async def stop(self) -> None:
        """Disconnect every client, save the state (if configured) and close the listener.

        Idempotent.
        """
        broker, self._broker = self._broker, None
        store, self._store = self._store, None
        autosave, self._autosave = self._autosave, None
        revoker, self._revoker = self._revoker, None
        if broker is not None:
            stats = self._stats(broker)
            for task in (autosave, revoker):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await _end_connections(broker)
            if store is not None:
                # Before amqtt's shutdown, which forgets every session and retained message.
                await _settle(broker)
                await self._save(store, capture_state(broker), reason="stop")
            await broker.shutdown()
            if store is not None:
                store.close()
            logging.getLogger("amqtt.broker").removeFilter(self._quiet)
            log.info(
                "broker stopped received=%d refused_connections=%d denied_publishes=%d "
                "dropped_queue_full=%d dropped_session_expired=%d dropped_session_replaced=%d",
                stats.received,
                stats.refused_connections,
                stats.denied_publishes,
                stats.dropped["queue_full"],
                stats.dropped["session_expired"],
                stats.dropped["session_replaced"],
            )

    async def _autosave_loop(self, broker: _StatefulBroker, store: BrokerStore) -> None:
        """Every ``autosave_interval`` seconds, save the state if it changed since the last save."""
        restored = broker.restored
        # What the file holds now; unknown if the start dropped something from it.
        saved = (
            broker.fingerprint()
            if restored is None or not (restored.expired or restored.dropped)
            else None
        )
        while True:
            await asyncio.sleep(self.settings.autosave_interval)
            self.state_checks += 1
            try:
                seen = broker.fingerprint()
                if seen != saved and await self._save(store, capture_state(broker), "autosave"):
                    saved = seen
            except Exception:
                # A bug, not a user mistake: keep its traceback, and keep the broker serving.
                log.exception("broker autosave failed path=%s", store.path)

    async def _save(self, store: BrokerStore, state: BrokerState, reason: str) -> bool:
        """Write ``state`` in a worker thread; log, and return whether it was saved."""
        started = time.perf_counter()
        try:
            await asyncio.to_thread(store.save, state)
        except BrokerStoreError as err:
            # The previous save stays intact; the next autosave tries again.
            log.error("broker state not saved path=%s reason=%s error=%s", store.path, reason, err)
            return False
        self.state_saves += 1
        log.log(
            logging.INFO if reason == "stop" else logging.DEBUG,
            "broker state saved path=%s reason=%s sessions=%d queued=%d inflight=%d"
            " retained=%d seconds=%.3f",
            store.path,
            reason,
            len(state.sessions),
            state.queued,
            state.inflight,
            len(state.retained),
            time.perf_counter() - started,
        )
        return True

    def _log_restored(self, broker: _StatefulBroker, state: BrokerState) -> None:
        restored = broker.restored or Restored()
        age = (
            ""
            if state.taken_at is None
            else f" saved_seconds_ago={time.time() - state.taken_at:.0f}"
        )
        log.info(
            "broker state restored path=%s sessions=%d queued=%d inflight=%d retained=%d"
            " expired_sessions=%d dropped_queued=%d%s",
            self.settings.state_file,
            restored.sessions,
            restored.queued,
            restored.inflight,
            restored.retained,
            restored.expired,
            restored.dropped,
            age,
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

    def inflight_messages(self, client_id: str) -> int:
        """How many QoS 1/2 messages sent to ``client_id`` wait for their acknowledgement."""
        if self._broker is None:
            return 0
        session = self._broker.sessions.get(client_id, (None, None))[0]
        return len(session.inflight_out) if session is not None else 0

    @property
    def stats(self) -> BrokerStats:
        """Counters so far (zeros once stopped)."""
        return self._stats(self._broker) if self._broker is not None else BrokerStats()

    @staticmethod
    def _stats(broker: _HardenedBroker) -> BrokerStats:
        """Read amqtt's state and our counters (on the broker's loop: amqtt's state is its own)."""
        stats = BrokerStats(
            received=broker.received,
            sessions=len(broker.sessions),
            retained=len(broker.retained_messages),
            dropped=dict(broker.drops.counts),
            connections=sum(server.conn_count for server in broker._servers.values()),
        )
        for session, _ in broker.sessions.values():
            state = session.transitions.state
            if state == "connected":
                stats.connected_sessions += 1
            elif state == "disconnected" and not session.clean_session:
                stats.disconnected_sessions += 1
            stats.queued += session.retained_messages.qsize()
            stats.inflight += len(session.inflight_out)
        for plugin in broker.plugins_manager.plugins:
            if isinstance(plugin, IotpipeAuthPlugin):
                stats.refused_connections = plugin.refused
            elif isinstance(plugin, IotpipeAclPlugin):
                stats.denied_publishes = plugin.denied_publishes
                stats.denied_subscribes = plugin.denied_subscribes
            elif isinstance(plugin, SessionQueueLimitPlugin):
                for reason, count in plugin.drops.counts.items():
                    stats.dropped[reason] += count
        return stats


def describe(settings: BrokerSettings, metrics_url: str | None = None) -> str:
    """The start-up line: where the broker listens, how it is protected, where its metrics are."""
    auth = (
        f"passwords from {settings.password_file}"
        if settings.password_file
        else "off (anyone may connect)"
    )
    acl = f"{settings.acl_file}" if settings.acl_file else "off"
    tls = f" and mqtts://{settings.host}:{settings.tls_port}" if settings.tls_port else ""
    exposed = " (every interface!)" if settings.host == "0.0.0.0" else ""  # noqa: S104 - a warning, not a bind
    metrics = f"; {metrics_url}/metrics" if metrics_url else ""
    state = (
        f"state in {settings.state_file} (saved every {settings.autosave_interval:g} s and at stop)"
        if settings.state_file is not None
        else "state in memory (lost at restart)"
    )
    return (
        f"iotpipe broker listening on {settings.url}{tls}{exposed}; MQTT 3.1.1 (amqtt); "
        f"auth {auth}; acl {acl}; {state}{metrics}"
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
    endpoint: BrokerEndpoint | None = None
    liveness = Liveness()
    supervisor = Supervisor(liveness, "broker").start()  # sd_notify under systemd
    turning = asyncio.create_task(_turn(liveness))
    try:
        await broker.start()
        endpoint = BrokerEndpoint(broker, loop).start()  # a busy http_port: ConfigError, stop
        echo(describe(settings, endpoint.url))
        liveness.ready()
        if settings.password_file is None and settings.host not in ("127.0.0.1", "localhost"):
            log.warning(
                "broker auth is off: any client that can reach %s may publish", settings.url
            )
        elif settings.password_file is not None and settings.acl_file is None:
            log.warning(
                "broker has no ACL: every authenticated user may publish and subscribe anywhere"
            )
        await stop.wait()
        supervisor.stop()
        stats = broker.stats
        endpoint.stop()  # no scrape may wait on a loop that is shutting the broker down
        await broker.stop()
        echo(f"iotpipe broker stopped ({stats.summary()})")
    finally:
        turning.cancel()
        supervisor.stop()
        supervisor.join()
        if endpoint is not None:
            endpoint.stop()
        await broker.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _turn(liveness: Liveness, interval: float = 1.0) -> None:
    """Tell the watchdog the event loop still runs: a blocked loop stops the pings."""
    while True:
        liveness.turn()
        await asyncio.sleep(interval)


def run(settings: BrokerSettings, *, echo: Callable[[str], None] = print) -> None:
    """Blocking entry point for the CLI: serve until a signal, exit normally.

    Raises:
        ConfigError: a file is invalid or the address cannot be bound.
    """
    asyncio.run(serve(settings, echo=echo))


class BrokerThread:
    """An :class:`EmbeddedBroker` on its own event loop in a named background thread.

    For tests and for embedding the broker in another process; use as a context manager.

    Args:
        settings: the broker's settings.
        serve_http: also serve ``/metrics`` and ``/healthz`` on ``http_host:http_port``
            (see :attr:`endpoint`).
    """

    def __init__(self, settings: BrokerSettings, *, serve_http: bool = False) -> None:
        self.settings = settings
        self.broker = EmbeddedBroker(settings)
        self.endpoint: BrokerEndpoint | None = None
        self._serve_http = serve_http
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
            if self._serve_http:
                self.endpoint = BrokerEndpoint(self.broker, self._loop)
            asyncio.run_coroutine_threadsafe(self.broker.start(), self._loop).result(timeout)
        except BaseException:
            self._stop_endpoint()
            self._close_loop()
            raise
        if self.endpoint is not None:
            self.endpoint.start()
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
        self._stop_endpoint()
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(self.broker.stop(), self._loop).result(timeout)
        self._close_loop()

    def _stop_endpoint(self) -> None:
        if self.endpoint is not None:
            self.endpoint.stop()
            self.endpoint = None

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
