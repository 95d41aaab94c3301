"""MQTT logins of devices and services: fresh passwords, and the brokers' password files.

Two formats, one line per user (``user:hash``; ``#`` comments and blank lines are kept):

* **amqtt** (``iotpipe broker --password-file``): ``user:$argon2id$...``, amqtt's
  ``FileAuthPlugin`` format; the embedded broker re-reads the file when it changes.
* **Mosquitto** 2.0 (``password_file``): ``user:$7$<iterations>$<base64 salt>$<base64 hash>``,
  PBKDF2-HMAC-SHA512, as ``mosquitto_passwd`` writes it; Mosquitto re-reads it on SIGHUP.

:func:`set_password` adds or replaces a user's line, :func:`remove_user` deletes it (revoking the
login), :func:`list_users` reads the names; every write is atomic and leaves the file 0600. Used
by ``iotpipe broker --add-user``, ``iotpipe device`` and ``iotpipe edge flash|seed``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Any

from iotpipe.errors import ConfigError

__all__ = [
    "PasswordFormat",
    "argon2_hasher",
    "check_username",
    "list_users",
    "mosquitto_hash",
    "new_password",
    "remove_user",
    "set_password",
]

#: Mosquitto 2.0's ``mosquitto_passwd`` default. The passwords iotpipe makes carry 192 random
#: bits, which no iteration count protects further; a higher one would only slow every CONNECT.
MOSQUITTO_ITERATIONS = 101
_MOSQUITTO_SALT_BYTES = 12


class PasswordFormat(StrEnum):
    """Which broker a password file is for."""

    AMQTT = "amqtt"
    MOSQUITTO = "mosquitto"


def new_password() -> str:
    """A fresh random password: 24 bytes (192 bits) from the OS, URL-safe base64 (32 characters)."""
    return secrets.token_urlsafe(24)


def argon2_hasher() -> Any:
    """The argon2id hasher of amqtt-format files (pwdlib is imported only when needed)."""
    from pwdlib.hashers.argon2 import Argon2Hasher

    # OWASP's minimum for argon2id (19 MiB, 2 passes): ~25 ms per CONNECT here, and affordable on
    # a Raspberry Pi, where amqtt's default 64 MiB x 3 would be slow and memory-hungry.
    return Argon2Hasher(time_cost=2, memory_cost=19456, parallelism=1)


def mosquitto_hash(
    password: str, *, salt: bytes | None = None, iterations: int = MOSQUITTO_ITERATIONS
) -> str:
    """A Mosquitto 2.0 ``$7$`` hash (PBKDF2-HMAC-SHA512, 12-byte salt), as mosquitto_passwd makes."""
    salt = os.urandom(_MOSQUITTO_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_username(username: str, field: str = "username") -> None:
    """Refuse a name no password file can hold.

    Raises:
        ConfigError: empty, or containing ':' or whitespace.
    """
    if not username or ":" in username or any(c.isspace() for c in username):
        raise ConfigError(field, username, "a username must be non-empty, without ':' or spaces")


def _hash(password: str, kind: PasswordFormat) -> str:
    if kind is PasswordFormat.MOSQUITTO:
        return mosquitto_hash(password)
    hashed: str = argon2_hasher().hash(password)
    return hashed


def _user_of(line: str) -> str | None:
    """The username of a ``user:hash`` line, None for a comment or a blank line."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    return stripped.partition(":")[0]


def _read_lines(path: Path, field: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(field, path, f"cannot read it ({err})") from None


def _write_lines(path: Path, lines: list[str], field: str) -> None:
    """Replace the file atomically (a broker re-reading it never sees half of it), mode 0600."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("".join(f"{line}\n" for line in lines))
        os.replace(tmp, path)
    except OSError as err:
        raise ConfigError(field, path, f"cannot write it ({err.strerror})") from None


def set_password(
    path: Path,
    username: str,
    password: str,
    kind: PasswordFormat = PasswordFormat.AMQTT,
    *,
    field: str = "--password-file",
) -> bool:
    """Add a user to a password file, or replace their password; create the file if needed.

    Other lines and comments are kept; the file is rewritten atomically with mode 0600.

    Returns:
        True if the user was new, False if an existing password was replaced.

    Raises:
        ConfigError: the username or password is unusable, or the file cannot be written
            (``field`` names the option that gave the file).
    """
    check_username(username)
    if not password:
        raise ConfigError("password", "", "must not be empty")
    line = f"{username}:{_hash(password, kind)}"
    lines = _read_lines(path, field)
    found = [i for i, existing in enumerate(lines) if _user_of(existing) == username]
    for i in found:
        lines[i] = line
    if not found:
        lines.append(line)
    _write_lines(path, lines, field)
    return not found


def remove_user(path: Path, username: str, *, field: str = "--password-file") -> bool:
    """Delete a user's line from a password file (either format): that login stops working.

    Returns:
        True if the user was there, False if not (the file is then left untouched).

    Raises:
        ConfigError: the file cannot be read or written.
    """
    lines = _read_lines(path, field)
    kept = [line for line in lines if _user_of(line) != username]
    if len(kept) == len(lines):
        return False
    _write_lines(path, kept, field)
    return True


def list_users(path: Path, *, field: str = "--password-file") -> list[str]:
    """The usernames in a password file (either format), in file order.

    Raises:
        ConfigError: the file does not exist or cannot be read.
    """
    if not path.exists():
        raise ConfigError(field, path, "no such file")
    return [user for line in _read_lines(path, field) if (user := _user_of(line)) is not None]
