"""The dashboard's API tokens: a small JSON file of names and SHA-256 hashes, never the tokens.

A token is ``iotpipe_`` + 32 random bytes (URL-safe base64), shown once when it is created.
The file keeps only its SHA-256: a high-entropy secret needs no slow, salted hash, since
nobody can guess it from the hash. The file is written whole to a temporary file and renamed
(mode 0600), so a reader never sees half of it. A running dashboard re-reads it when it
changes (one ``stat`` per check), so a revoked token is refused at its next request.

File format (``version`` 1)::

    {"version": 1, "tokens": [{"name": "alice", "sha256": "<hex>", "created": "<RFC 3339>"}]}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import stat
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from iotpipe.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["TokenEntry", "TokenFile", "check_permissions", "default_tokens_path", "token_hash"]

PREFIX = "iotpipe_"
"""Every token starts with it, so secret scanners and people recognise one."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_VERSION = 1


def default_tokens_path(store: Path) -> Path:
    """The token file beside a store: ``state/telemetry.db`` -> ``state/telemetry.tokens.json``."""
    return store.with_name(f"{store.stem}.tokens.json")


def token_hash(token: str) -> str:
    """The hex SHA-256 the file keeps for a token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One token as the file keeps it: its name, hash and creation time (RFC 3339, UTC)."""

    name: str
    sha256: str
    created: str


class TokenFile:
    """The token file at ``path``: add, revoke and list tokens; check a presented token.

    Args:
        path: the JSON file (it need not exist before the first :meth:`add`).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) last loaded
        self._names: dict[str, str] = {}  # sha256 -> name
        self._valid: frozenset[str] = frozenset()  # the names in the file

    def exists(self) -> bool:
        """Whether the file exists (a dashboard with one requires authentication)."""
        return self.path.exists()

    def entries(self) -> list[TokenEntry]:
        """Every token in the file (none when it does not exist).

        Raises:
            ConfigError: the file cannot be read or is not a token file.
        """
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise ConfigError("--tokens", self.path, f"cannot read it ({err.strerror})") from None
        return _parse(self.path, text)

    def add(self, name: str) -> str:
        """Create a token called ``name`` and return it (the file keeps its hash only).

        Raises:
            ConfigError: a bad name, or a token of that name exists.
        """
        if not _NAME.fullmatch(name):
            raise ConfigError(
                "NAME", name, "1-64 letters, digits, '.', '_', '@' or '-', starting alphanumeric"
            )
        entries = self.entries()
        if any(entry.name == name for entry in entries):
            raise ConfigError("NAME", name, "a token of that name exists; revoke it first")
        token = PREFIX + secrets.token_urlsafe(32)
        created = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        self._write([*entries, TokenEntry(name, token_hash(token), created)])
        return token

    def revoke(self, name: str) -> None:
        """Remove the token called ``name``; the file stays (authentication stays on).

        Raises:
            ConfigError: there is no token of that name.
        """
        entries = self.entries()
        kept = [entry for entry in entries if entry.name != name]
        if len(kept) == len(entries):
            known = ", ".join(entry.name for entry in entries) or "none"
            raise ConfigError("NAME", name, f"no such token in {self.path} (tokens: {known})")
        self._write(kept)

    def check(self, token: str) -> str | None:
        """The name of a presented token, or None when it is not (or no longer) in the file.

        A file that disappeared or cannot be read admits nobody (logged once per change).
        """
        digest = token_hash(token)
        with self._lock:
            self._reload()
            return self._names.get(digest)

    def holds(self, name: str) -> bool:
        """Whether a token called ``name`` is (still) in the file: a session ends with it."""
        with self._lock:
            self._reload()
            return name in self._valid

    def _reload(self) -> None:
        """Load the file again if it changed since the last load (caller holds the lock)."""
        try:
            info = os.stat(self.path)
        except OSError:
            if self._seen != (0, 0, 0):
                log.warning("token file %s is missing: every token is refused", self.path)
            self._seen, self._names, self._valid = (0, 0, 0), {}, frozenset()
            return
        seen = (info.st_ino, info.st_size, info.st_mtime_ns)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            self._names = {entry.sha256: entry.name for entry in self.entries()}
        except ConfigError as err:
            log.error("token file unusable, every token is refused: %s", err)
            self._names = {}
        self._valid = frozenset(self._names.values())

    def _write(self, entries: list[TokenEntry]) -> None:
        """Replace the file with ``entries``: a 0600 temporary file, fsynced, renamed."""
        body = {
            "version": _VERSION,
            "tokens": [{"name": e.name, "sha256": e.sha256, "created": e.created} for e in entries],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(body, out, indent=2)
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        except OSError as err:
            temporary.unlink(missing_ok=True)
            raise ConfigError("--tokens", self.path, f"cannot write it ({err.strerror})") from None


def _parse(path: Path, text: str) -> list[TokenEntry]:
    """The entries of a token file's text; a :class:`ConfigError` naming the file otherwise."""
    try:
        body: Any = json.loads(text)
        if body.get("version") != _VERSION:
            raise ValueError(f"version {body.get('version')!r}, expected {_VERSION}")
        return [
            TokenEntry(str(t["name"]), str(t["sha256"]), str(t["created"])) for t in body["tokens"]
        ]
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ConfigError("--tokens", path, f"not an iotpipe token file ({err})") from None


def check_permissions(path: Path) -> None:
    """Refuse a token file that other users may write (they could add a token of their own).

    Raises:
        ConfigError: group or others have write permission.
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if mode & 0o022:
        raise ConfigError(
            "--tokens", path, f"writable by other users (mode {mode:04o}): chmod 600 {path}"
        )
