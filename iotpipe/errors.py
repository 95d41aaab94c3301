"""The exceptions iotpipe raises.

Every error a user can cause (bad settings, an unreachable broker, a malformed file) is an
``IotpipeError``: the command line prints its message on one line and exits non-zero, without a
traceback. Anything else is a bug and keeps its traceback.

    IotpipeError
    ├── ConfigError          a setting is invalid (names the field, the value, what is allowed)
    ├── ConnectError         a broker or server cannot be reached or refused us
    │   └── CertificateError a server's TLS certificate failed verification (exit 2)
    ├── RecordingError       a recording file is unreadable or malformed
    ├── DeliveryError        a broker refused or lost acknowledgements
    ├── iotpipe.pack.PackError     bytes that are not a valid pack (the packed uplink)
    ├── edge.image.ImageError      an SD card image is unreadable or not a Pi OS image
    └── edge.bundle.BundleError    the offline bundle cannot be built

Envelope validation failures are *values*, not exceptions: see ``iotpipe.envelope.Rejection``.
"""

from __future__ import annotations

from pathlib import PurePath


class IotpipeError(Exception):
    """Root of every error iotpipe raises for a user-facing problem."""

    exit_code: int = 1


class ConfigError(IotpipeError):
    """A setting is invalid.

    Attributes:
        field: dotted name of the setting, e.g. ``mqtt.url``.
        value: the offending value (already redacted if it was a secret).
        allowed: what would have been accepted.
    """

    exit_code = 2

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        shown = repr(str(value)) if isinstance(value, PurePath) else repr(value)
        super().__init__(f"invalid setting {field}={shown}: {allowed}")


class ConnectError(IotpipeError):
    """A broker or server cannot be reached, or refused the connection.

    Attributes:
        target: what we tried to reach, without credentials (``mqtt://host:1883``).
        reason: why it failed.
    """

    exit_code = 3

    def __init__(self, target: str, reason: str) -> None:
        self.target = target
        self.reason = reason
        super().__init__(f"cannot connect to {target}: {reason}")


class CertificateError(ConnectError):
    """A server's TLS certificate failed verification: retrying cannot help, a person must act.

    Raised at start-up for a wrong CA, an expired certificate or one for another host name,
    instead of retrying as for a broker that is away.

    Attributes:
        link: which connection, ``mqtt``, ``amqp`` or ``influxdb``.
        target: the URL, without credentials.
        reason: what the TLS library said, e.g. ``certificate has expired``.
    """

    exit_code = 2

    def __init__(self, link: str, target: str, reason: str) -> None:
        self.link = link
        self.target = target
        self.reason = reason
        IotpipeError.__init__(self, f"{link} ({target}): TLS certificate verify failed: {reason}")


class RecordingError(IotpipeError):
    """A recording file is unreadable or malformed.

    Attributes:
        path: the file.
        line: 1-based line number, or 0 for the file as a whole.
        reason: what is wrong.
    """

    exit_code = 2

    def __init__(self, path: str, line: int, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {reason}")


class DeliveryError(IotpipeError):
    """A broker refused publishes or acknowledgements went missing."""

    exit_code = 4
