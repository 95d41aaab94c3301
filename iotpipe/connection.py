"""Where a broker is: connection URLs, TLS files, and the ``[mqtt]`` section.

Free of pydantic (:mod:`iotpipe.schema`), so the edge agent and :mod:`iotpipe.mqtt` load it on a
small Pi without pydantic; :mod:`iotpipe.settings` re-exports the settings, and pydantic sections
(``[amqp]``, ``[influxdb]``) nest :class:`TlsSettings` as they would a model.

TLS is the same on every link (MQTT, AMQP, InfluxDB): :func:`tls_context` builds the client
context (verification on unless ``insecure``), and :func:`certificate_problem` finds a refused
server certificate in whatever a client library raised, so each link can stop with one line.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

from iotpipe.errors import ConfigError
from iotpipe.schema import Schema, setting

__all__ = [
    "BrokerUrl",
    "MqttSettings",
    "Secret",
    "TlsSettings",
    "certificate_problem",
    "parse_url",
    "tls_context",
]


class Secret:
    """A password that never shows in logs, reprs or errors (``get_secret_value()`` reveals it)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        """The secret itself."""
        return self._value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"


class BrokerUrl(NamedTuple):
    """A parsed ``scheme://user:pass@host:port/vhost`` connection URL."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: Secret | None = None
    path: str = ""

    @property
    def tls(self) -> bool:
        """Whether the scheme asks for TLS (``mqtts``, ``amqps``)."""
        return self.scheme.endswith("s")

    def redacted(self) -> str:
        """The URL without the password, safe to log."""
        user = f"{self.username}@" if self.username else ""
        return f"{self.scheme}://{user}{self.host}:{self.port}{self.path}"

    def __str__(self) -> str:
        return self.redacted()


_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883, "amqp": 5672, "amqps": 5671}


def parse_url(value: str, schemes: tuple[str, ...]) -> BrokerUrl:
    """Parse a connection URL whose scheme must be one of ``schemes``.

    Raises:
        ValueError: the URL is malformed or uses another scheme (the message says what is allowed).
    """
    allowed = " or ".join(f"{s}://[user:pass@]host[:port]" for s in schemes)
    try:
        parts = urlsplit(value)
    except ValueError as err:
        raise ValueError(f"{err}; expected {allowed}") from None
    if "@" not in parts.netloc and "@" in value.partition("://")[2]:
        # urlsplit ended the host at a '/', '?' or '#' of the user name or password, which
        # would then be taken for the host, port and path (and shown in errors and logs).
        raise ValueError(
            "'@' after the host: write '/', '?', '#' in a user name or password as "
            f"%2F, %3F, %23, and '@' in a path as %40; expected {allowed}"
        )
    try:
        port = parts.port
    except ValueError as err:
        raise ValueError(f"{err}; expected {allowed}") from None
    if parts.scheme not in schemes:
        raise ValueError(f"scheme must be {' or '.join(schemes)}; expected {allowed}")
    if not parts.hostname:
        raise ValueError(f"missing host; expected {allowed}")
    return BrokerUrl(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port or _DEFAULT_PORTS[parts.scheme],
        username=unquote(parts.username) if parts.username else None,
        password=Secret(unquote(parts.password)) if parts.password is not None else None,
        path=parts.path,
    )


def _existing_file(path: Path | None) -> None:
    if path is not None and not path.is_file():
        raise ValueError("file does not exist")


def _mqtt_url(value: str) -> None:
    parse_url(value, ("mqtt", "mqtts"))


class TlsSettings(Schema):
    """TLS material for ``mqtts://`` and ``amqps://`` connections."""

    ca_file: Path | None = setting(
        None, "CA bundle to verify the server (PEM)", check=_existing_file
    )
    cert_file: Path | None = setting(
        None, "client certificate (PEM) for mutual TLS", check=_existing_file
    )
    key_file: Path | None = setting(
        None, "client private key (PEM) for mutual TLS", check=_existing_file
    )
    insecure: bool = setting(False, "skip server certificate verification (testing only)")


def tls_context(tls: TlsSettings, section: str) -> ssl.SSLContext:
    """The client TLS context of one link: the same rules for MQTT, AMQP and InfluxDB.

    The server's certificate must chain to ``tls.ca_file`` (default: the system's CA bundle) and
    name the host connected to, unless ``tls.insecure``; ``tls.cert_file`` and ``tls.key_file``
    are presented to a server that asks for a client certificate.

    Args:
        tls: the link's TLS files.
        section: where they were set, e.g. ``mqtt.tls``, for the error message.

    Raises:
        ConfigError: a file is not PEM, or the key does not belong to the certificate.
    """
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"{section}.ca_file", tls.ca_file, f"not a PEM CA bundle ({err})"
        ) from None
    if tls.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file is not None:
        key = str(tls.key_file) if tls.key_file else None
        try:
            context.load_cert_chain(str(tls.cert_file), key)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(
                f"{section}.cert_file",
                tls.cert_file,
                f"cannot load it with key_file {key or '(none)'} ({err.strerror or err})",
            ) from None
    return context


def certificate_problem(error: BaseException | None) -> str | None:
    """Why the server's certificate was refused, if that is what ``error`` comes down to.

    Follows ``__cause__``/``__context__`` and wrappers that keep the cause in ``reason``
    (urllib3), ``exception`` or ``exceptions`` (pika), since clients wrap the
    :class:`ssl.SSLCertVerificationError` differently.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen or not isinstance(err, BaseException):
            continue
        seen.add(id(err))
        if isinstance(err, ssl.SSLCertVerificationError):
            return str(err.verify_message or err.reason or err)
        todo += [err.__cause__, err.__context__, getattr(err, "reason", None)]
        todo.append(getattr(err, "exception", None))
        todo += list(getattr(err, "exceptions", None) or ())
    return None


class MqttSettings(Schema):
    """How to reach an MQTT broker (the ``[mqtt]`` section)."""

    url: str = setting(
        "mqtt://127.0.0.1:1883",
        "mqtt://[user:pass@]host[:port] or mqtts://",
        check=_mqtt_url,
        secret=True,
    )
    client_id: str = setting("", "MQTT client id; empty picks a random one")
    keepalive: int = setting(30, "keep-alive interval, seconds", ge=5, le=3600)
    tls: TlsSettings = setting(TlsSettings(), "TLS files for mqtts://")

    @property
    def broker(self) -> BrokerUrl:
        """The parsed URL."""
        return parse_url(self.url, ("mqtt", "mqtts"))
