"""The InfluxDB store: readings as points over the InfluxDB v2 write API, dedupe state kept locally.

InfluxDB (2.x, 3.x, Cloud) or anything speaking its ``/api/v2/write`` (VictoriaMetrics) holds
the readings; a :class:`~consumers.state.StateDB` file beside the consumer holds the seen ids,
completeness, sensor types and device registry, and an optional
:class:`~consumers.seen.RedisSeen` shares the seen ids between consumer hosts.

One :meth:`InfluxStore.write`:

1. finds the batch's new messages (the state file, then Redis when configured);
2. writes their points, at most :data:`BATCH_LINES` lines per request;
3. only then records their ids (Redis, then the state file, with the device statuses).

A crash between 2 and 3 leaves ids unrecorded, so the batch is written again after redelivery.
That is harmless because a point is fully determined by its reading (:func:`message_lines`):
InfluxDB overwrites a point with an identical one. (VictoriaMetrics, which keeps every sample,
then holds the value twice at the same timestamp; see ``docs/influxdb.md``.)

Point schema (``docs/influxdb.md`` is the reference; dashboards depend on it)::

    telemetry,device=<device>,sensor=<sensor>,site=<site>[,unit=<unit>][,<tag>=<value>...] \
<value|value_bool|value_str>=<v> <reading time in ns>
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import urllib3
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException
from influxdb_client.service.ping_service import PingService
from pydantic import SecretStr

from consumers.seen import Claim, RedisSeen
from consumers.state import StateDB
from consumers.store import DeviceStatus, Message, Reading, StoreUnavailable, WriteResult
from iotpipe.connection import certificate_problem, tls_context
from iotpipe.errors import CertificateError, ConfigError
from iotpipe.settings import TlsSettings

log = logging.getLogger(__name__)

#: How much longer than a claim's expiry a copy waits for the consumer that claimed it.
TIMEOUT_MARGIN_S = 5.0

__all__ = ["BATCH_LINES", "RESERVED_TAGS", "InfluxStore", "message_lines"]

#: Most lines (points) per write request; a message (<= 1000 readings) is never split.
BATCH_LINES = 5000
#: Tag keys the store sets itself; a user tag with one of these keys is written as ``tag_<key>``.
RESERVED_TAGS = frozenset({"site", "device", "sensor", "unit"})
#: Longest server error text kept in a rejection reason.
_REASON_LIMIT = 500

# Escaping as influxdb-client's Point does it, so a line is byte-identical to what the official
# client would write. Line protocol cannot carry a newline in any value: like Point for tags,
# newlines become the two characters ``\n`` (and ``\r``, ``\t`` likewise in tags).
_ESCAPE_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_KEY = str.maketrans(
    {",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"}
)
_ESCAPE_STRING = str.maketrans({'"': r"\"", "\\": r"\\", "\n": r"\n", "\r": r"\r"})


def _tag_value(value: str) -> str:
    escaped = value.translate(_ESCAPE_KEY)
    # A trailing backslash would escape the separator after it; Point adds a space, so do we.
    return escaped + " " if escaped.endswith("\\") else escaped


def _user_tag_keys(tags: Mapping[str, str]) -> dict[str, str]:
    """Map each user tag key to the key it is written under.

    Keys the store uses itself (:data:`RESERVED_TAGS`), ``time`` and keys starting with ``_``
    (reserved by InfluxDB) get a ``tag_`` prefix, repeated until the key is unique.
    """
    taken = set(RESERVED_TAGS) | set(tags)
    out: dict[str, str] = {}
    for key in sorted(tags):
        if key in RESERVED_TAGS or key == "time" or key.startswith("_"):
            renamed = f"tag_{key}"
            while renamed in taken:
                renamed = f"tag_{renamed}"
            taken.add(renamed)
            out[key] = renamed
        else:
            out[key] = key
    return out


def _message_tags(message: Message) -> list[tuple[str, str]]:
    """(key, escaped ``key=value``) of the tags every reading of ``message`` carries."""
    tags = {"site": message.site, "device": message.device}
    if message.tags:
        for key, written in _user_tag_keys(message.tags).items():
            tags[written] = message.tags[key]
    return [
        (key, f"{key.translate(_ESCAPE_KEY)}={_tag_value(value)}")
        for key, value in tags.items()
        if key and value  # line protocol has no empty keys or values; Point drops them too
    ]


def _field(reading: Reading) -> str:
    value = reading.value
    if isinstance(value, bool):
        return "value_bool=true" if value else "value_bool=false"
    if isinstance(value, str):
        return f'value_str="{value.translate(_ESCAPE_STRING)}"'
    # Always a float (no `i` suffix), so an int after a float is never a type conflict.
    text = repr(float(value))
    return f"value={text[:-2] if text.endswith('.0') else text}"


def message_lines(message: Message, measurement: str = "telemetry") -> list[str]:
    """The line protocol of a message's readings, one line per reading (no newlines).

    Deterministic: the same message always gives the same lines (tags sorted by key, numbers
    as floats, time in nanoseconds), so writing it again overwrites each point with itself.
    """
    # The message's tags are the same on every line: place them around `sensor` and `unit`
    # (never user keys: those are renamed) once, instead of sorting per reading.
    tags = sorted(_message_tags(message))
    head = measurement.translate(_ESCAPE_MEASUREMENT) + ","
    head += "".join(pair + "," for key, pair in tags if key < "sensor")
    middle = "".join("," + pair for key, pair in tags if "sensor" < key < "unit")
    tail = "".join("," + pair for key, pair in tags if key > "unit")
    lines = []
    for r in message.readings:
        unit = f",unit={_tag_value(r.unit)}" if r.unit else ""
        lines.append(
            f"{head}sensor={_tag_value(r.sensor)}{middle}{unit}{tail} {_field(r)} "
            f"{r.ts_ms * 1_000_000}"
        )
    return lines


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class InfluxStore:
    """Readings in InfluxDB (v2 write API), seen ids and registry in a local state file.

    Implements :class:`~consumers.store.Store`. It owns ``state`` and ``seen``: :meth:`close`
    closes them.

    Args:
        url: ``http(s)://host:port`` of the server.
        org: organisation (VictoriaMetrics ignores it).
        bucket: bucket the points go to (VictoriaMetrics ignores it).
        token: API token with write access to the bucket.
        state: the local state file (seen ids, completeness, sensor types, devices).
        seen: seen ids shared with consumers on other hosts, or None for this host only.
        measurement: the measurement of every point.
        timeout_s: seconds a write request may take before the batch is retried.
        tls: for ``https://``: CA bundle (default: the system's), client certificate, insecure.
        clock: epoch milliseconds now (the start of each id's retention window).

    Raises:
        ConfigError: ``url`` or ``measurement`` is invalid.
    """

    def __init__(
        self,
        url: str,
        *,
        org: str,
        bucket: str,
        token: str | SecretStr,
        state: StateDB,
        seen: RedisSeen | None = None,
        measurement: str = "telemetry",
        timeout_s: float = 10.0,
        tls: TlsSettings | None = None,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError("influxdb url", url, "expected http(s)://host:port")
        if not measurement or measurement.startswith("#"):
            raise ConfigError("influxdb.measurement", measurement, "non-empty, not starting '#'")
        secret = token.get_secret_value() if isinstance(token, SecretStr) else token
        self.url = url
        self.bucket = bucket
        self.org = org
        self.measurement = measurement
        self.state = state
        self.seen = seen
        self._clock = clock
        tls = tls or TlsSettings()
        self._client = InfluxDBClient(
            url=url,
            token=secret,
            org=org,
            timeout=int(timeout_s * 1000),
            retries=False,
            verify_ssl=not tls.insecure,
            ssl_context=tls_context(tls, "influxdb.tls") if url.startswith("https://") else None,
        )
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)

    # -- Store --------------------------------------------------------------------------------

    def write(self, messages: Sequence[Message], statuses: Sequence[DeviceStatus]) -> WriteResult:
        """Write the points of the batch's new messages, then record their ids.

        With shared seen ids (Redis), each new id is claimed first; a copy another consumer is
        writing at that moment is waited for and then counted as a duplicate.

        Raises:
            StoreUnavailable: the server, the state file or Redis cannot take the batch now;
                nothing was recorded (points already written are written again on retry).
        """
        result = WriteResult()
        with self.state.transaction() as conn:
            new, duplicates = self.state.unseen(conn, messages)
        if self.seen is None:
            rejected = self._write_points(messages, new)
            stored = [i for i in new if i not in rejected]
        else:
            stored, shared_duplicates, rejected = self._write_claimed(messages, new, self.seen)
            duplicates = sorted([*duplicates, *shared_duplicates])
        with self.state.transaction() as conn:
            self.state.record(
                conn,
                [messages[i] for i in stored],
                [messages[i] for i in duplicates],
                result,
                self._clock(),
            )
            self.state.update_devices(conn, statuses)
        result.rejected = rejected
        return result

    def _write_claimed(
        self, messages: Sequence[Message], candidates: Sequence[int], seen: RedisSeen
    ) -> tuple[list[int], list[int], dict[int, str]]:
        """Write the candidates whose ids this consumer claims in Redis; wait out the others.

        Returns:
            (stored, duplicates, rejected) as indices into ``messages``.
        """
        stored: list[int] = []
        duplicates: list[int] = []
        rejected: dict[int, str] = {}
        waiting = list(candidates)
        delay = 0.01
        deadline = time.monotonic() + seen.claim_ms / 1000 + TIMEOUT_MARGIN_S
        while waiting:
            claims = seen.claim([messages[i].id for i in waiting])
            mine = [i for i, c in zip(waiting, claims, strict=True) if c is Claim.MINE]
            duplicates += [i for i, c in zip(waiting, claims, strict=True) if c is Claim.DONE]
            waiting = [i for i, c in zip(waiting, claims, strict=True) if c is Claim.BUSY]
            try:
                refused = self._write_points(messages, mine)
            except StoreUnavailable:
                seen.release([messages[i].id for i in mine])
                raise
            seen.release([messages[i].id for i in refused])
            written = [i for i in mine if i not in refused]
            seen.done([messages[i].id for i in written])
            stored += written
            rejected |= refused
            if waiting:
                if time.monotonic() > deadline:
                    raise StoreUnavailable(
                        f"{len(waiting)} message ids stay claimed by another consumer in Redis"
                    )
                # Another consumer is writing copies of these messages: usually milliseconds.
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        return stored, duplicates, rejected

    def prune(self, now_ms: int) -> int:
        """Forget ids older than the retention window (Redis expires its own keys)."""
        return self.state.prune(now_ms)

    def check(self) -> None:
        """Raise :class:`StoreUnavailable` unless the server, the state file and Redis answer."""
        if not self._client.ping():
            raise StoreUnavailable(f"InfluxDB at {self.url} does not answer /ping")
        self.state.check()
        if self.seen is not None:
            self.seen.check()

    def check_certificate(self) -> None:
        """For ``https://``, ask ``/ping`` once and fail if the server's certificate is refused.

        A server that is down or slow is left to the write path (batches are held and retried);
        a certificate that fails verification would fail every retry, so it stops the start.

        Raises:
            CertificateError: the server's TLS certificate failed verification.
        """
        if not self.url.startswith("https://"):
            return
        try:
            PingService(self._client.api_client).get_ping()  # type: ignore[no-untyped-call]
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as err:
            problem = certificate_problem(err)
            if problem is not None:
                raise CertificateError("influxdb", self.url, problem) from None
            log.info("influxdb not answering at start url=%s reason=%s", self.url, err)

    def close(self) -> None:
        """Close the HTTP client, the state file and the Redis connections."""
        self._write_api.close()  # type: ignore[no-untyped-call]
        self._client.close()  # type: ignore[no-untyped-call]
        self.state.close()
        if self.seen is not None:
            self.seen.close()

    # -- writing points -----------------------------------------------------------------------

    def _write_points(self, messages: Sequence[Message], indices: Sequence[int]) -> dict[int, str]:
        """Write the points of ``messages[i]`` for each i; return the refused ones (i -> why).

        Requests carry whole messages, at most :data:`BATCH_LINES` lines. When the server
        refuses a request as invalid (400, 422), its messages are written one at a time to find
        the refused ones; the others are stored.
        """
        rejected: dict[int, str] = {}
        chunk: list[int] = []
        lines: list[str] = []
        for index in indices:
            own = message_lines(messages[index], self.measurement)
            if lines and len(lines) + len(own) > BATCH_LINES:
                self._write_chunk(messages, chunk, lines, rejected)
                chunk, lines = [], []
            chunk.append(index)
            lines.extend(own)
        if lines:
            self._write_chunk(messages, chunk, lines, rejected)
        return rejected

    def _write_chunk(
        self,
        messages: Sequence[Message],
        chunk: Sequence[int],
        lines: Sequence[str],
        rejected: dict[int, str],
    ) -> None:
        refused = self._post(lines)
        if refused is None:
            return
        if len(chunk) == 1:
            rejected[chunk[0]] = refused
            return
        log.info("server refused a batch of %d messages, finding which: %s", len(chunk), refused)
        for index in chunk:
            reason = self._post(message_lines(messages[index], self.measurement))
            if reason is not None:
                rejected[index] = reason

    def _post(self, lines: Sequence[str]) -> str | None:
        """POST lines; None when stored, the server's reason when it refused them as invalid.

        Raises:
            StoreUnavailable: the server is unreachable, too slow, overloaded, failing, or
                refused the token.
        """
        body = "\n".join(lines).encode()
        try:
            # Timestamps are in nanoseconds: the client's default precision (WritePrecision.NS).
            self._write_api.write(self.bucket, self.org, body)
        except ApiException as err:
            status = int(err.status or 0)
            reason = _server_message(err)
            if status in (400, 422):
                return reason
            raise StoreUnavailable(self._describe(status, reason, err)) from err
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise StoreUnavailable(f"InfluxDB at {self.url}: {err}") from err
        return None

    def _describe(self, status: int, reason: str, err: ApiException) -> str:
        where = f"InfluxDB at {self.url}"
        if status in (401, 403):
            return (
                f"{where} refused the token (HTTP {status}): check [influxdb].token "
                f"(IOTPIPE_INFLUXDB__TOKEN) and its write access to bucket {self.bucket!r}: {reason}"
            )
        if status == 404:
            return f"{where}: org {self.org!r} or bucket {self.bucket!r} not found: {reason}"
        if status == 429:
            after = err.headers.get("Retry-After") if err.headers else None
            return f"{where} is rate limiting writes (HTTP 429, retry after {after or '?'} s)"
        return f"{where} failed (HTTP {status}): {reason}"


def _server_message(err: ApiException) -> str:
    """The server's explanation of an error response, on one line and not too long."""
    message = getattr(err, "message", None) or err.body or err.reason or ""
    if isinstance(message, bytes):
        message = message.decode(errors="replace")
    text = " ".join(str(message).split())
    return text[:_REASON_LIMIT]
