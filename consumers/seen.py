"""Message ids already stored, shared through Redis by consumers on several hosts.

An :class:`~consumers.influx_store.InfluxStore` keeps the ids it has stored in its local state
file. That is enough for one consumer host; when consumers on several hosts write to the same
InfluxDB, a message redelivered to another host would be written again. :class:`RedisSeen` lets
them share one set of ids: one key per id, ``<prefix><id>``, expiring after the retention window.

Two copies of one message may reach two consumers at the same moment (a device retransmits,
RabbitMQ hands the copies to different consumers). So a consumer first **claims** each id
(``SET NX`` of a pending marker with a short expiry), writes the points of the ids it claimed,
then marks them **done** (``1``, kept for the retention window). An id another consumer has
claimed is waited for: once it is done, the copy is a duplicate; if its claim expires (that
consumer died before finishing), it is claimed again. A claim is never taken for done, so a copy
is never acknowledged as a duplicate before its points were written. The claim script uses
several keys at once: a single Redis (or a Redis Cluster with all keys in one slot, e.g. a
``{tag}`` in the prefix).

Durability: a Redis without persistence forgets every id when it restarts. Configure a
production Redis with ``appendonly yes`` (AOF, ``appendfsync everysec``) so the ids survive a
restart. If they are lost anyway, nothing breaks: messages redelivered after that are written to
InfluxDB a second time, and since a point is fully determined by its reading (same series, same
timestamp, same value), InfluxDB overwrites it with itself. Only the duplicate *counts* are lost.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from enum import IntEnum
from typing import cast

import redis

from consumers.store import StoreUnavailable

#: Seconds to wait for Redis to connect and to answer: a stuck Redis must not stall a consumer.
TIMEOUT_S = 5.0
#: The value of a done id.
_DONE = b"1"

# KEYS: the ids' keys; ARGV: our claim token, claim expiry in ms. Per key: 0 = claimed by us
# (now or earlier), 1 = done, 2 = claimed by another consumer.
_CLAIM = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[i] = 0
  else
    local value = redis.call('GET', key)
    if value == false then
      redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
      out[i] = 0
    elseif value == ARGV[1] then
      out[i] = 0
    elseif value == '1' then
      out[i] = 1
    else
      out[i] = 2
    end
  end
end
return out
"""

# KEYS: keys to release; ARGV: our claim token. Deletes only claims that are still ours.
_RELEASE = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    n = n + redis.call('DEL', key)
  end
end
return n
"""


class Claim(IntEnum):
    """What :meth:`RedisSeen.claim` found for one id."""

    MINE = 0
    """Claimed by this consumer: write its points, then :meth:`RedisSeen.done`."""
    DONE = 1
    """Stored already (by anyone): a duplicate."""
    BUSY = 2
    """Claimed by another consumer that has not finished: ask again shortly."""


class RedisSeen:
    """The set of stored message ids, in Redis.

    Each method makes one round trip (a pipeline or a multi-key command), whatever the batch
    size. Redis errors become :class:`~consumers.store.StoreUnavailable`.

    Args:
        url: ``redis://[:password@]host[:port][/db]``, ``rediss://...`` or ``unix://path``.
        prefix: prepended to every id to make its key; lets several pipelines share a Redis.
        retention_ms: how long an id is remembered after it was first recorded.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "iotpipe:seen:",
        retention_ms: int,
        claim_ms: int = 30_000,
    ) -> None:
        if retention_ms <= 0:
            raise ValueError(f"retention_ms must be positive, got {retention_ms}")
        self.prefix = prefix
        self.retention_ms = retention_ms
        self.claim_ms = claim_ms
        self._token = f"pending:{uuid.uuid4().hex}"
        self._client = redis.Redis.from_url(
            url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
        )
        conn = self._client.connection_pool.connection_kwargs
        # For messages: where, without the password.
        self._where = conn.get("path") or f"{conn.get('host')}:{conn.get('port')}"

    def unseen(self, ids: Sequence[str]) -> list[bool]:
        """For each id, whether it is new (not done within the retention window; a claim in
        progress is not done).

        Raises:
            StoreUnavailable: Redis cannot be reached or failed.
        """
        if not ids:
            return []
        try:
            found = cast(list[bytes | None], self._client.mget([self.prefix + i for i in ids]))
        except redis.RedisError as err:
            raise self._unavailable(err) from err
        return [value != _DONE for value in found]

    def claim(self, ids: Sequence[str]) -> list[Claim]:
        """Claim each id for writing; see :class:`Claim` for the answers.

        A claim expires after ``claim_ms`` (a consumer that died while holding it).

        Raises:
            StoreUnavailable: Redis cannot be reached or failed.
        """
        if not ids:
            return []
        keys = [self.prefix + i for i in ids]
        try:
            found = self._client.eval(_CLAIM, len(keys), *keys, self._token, str(self.claim_ms))
        except redis.RedisError as err:
            raise self._unavailable(err) from err
        return [Claim(int(code)) for code in cast(list[int], found)]

    def done(self, ids: Sequence[str]) -> None:
        """Mark ids as stored, for the retention window (whoever claimed them).

        Raises:
            StoreUnavailable: Redis cannot be reached or failed.
        """
        if not ids:
            return
        pipe = self._client.pipeline(transaction=False)
        for i in ids:
            pipe.set(self.prefix + i, _DONE, px=self.retention_ms)
        try:
            pipe.execute()
        except redis.RedisError as err:
            raise self._unavailable(err) from err

    def release(self, ids: Sequence[str]) -> None:
        """Give up claims that are still ours (their points were not written); best effort."""
        if not ids:
            return
        keys = [self.prefix + i for i in ids]
        # On failure the claims expire by themselves after claim_ms.
        with contextlib.suppress(redis.RedisError):
            self._client.eval(_RELEASE, len(keys), *keys, self._token)

    def record(self, ids: Sequence[str]) -> None:
        """Remember ids as stored (an id already recorded keeps its first expiry).

        Raises:
            StoreUnavailable: Redis cannot be reached or failed.
        """
        if not ids:
            return
        pipe = self._client.pipeline(transaction=False)
        for i in ids:
            pipe.set(self.prefix + i, b"1", nx=True, px=self.retention_ms)
        try:
            pipe.execute()
        except redis.RedisError as err:
            raise self._unavailable(err) from err

    def check(self) -> None:
        """Raise :class:`~consumers.store.StoreUnavailable` unless Redis answers a PING."""
        try:
            self._client.ping()
        except redis.RedisError as err:
            raise self._unavailable(err) from err

    def close(self) -> None:
        """Close the connections to Redis."""
        self._client.close()

    def _unavailable(self, err: redis.RedisError) -> StoreUnavailable:
        return StoreUnavailable(f"Redis at {self._where} (seen ids): {err or type(err).__name__}")
