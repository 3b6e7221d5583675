"""The cluster store in Redis: :class:`RedisBackend`, the contract of service.cluster_backend.

Layout, under the prefix (``rnnserve:cluster:`` by default, one per cluster):

- ``s:<key>``: a session record, a hash with fields ``blob``, ``epoch`` and ``replica`` ("" when
  released); it expires ``ttl_s`` after its last write with a blob (no expiry when ttl_s is 0).
  Keys are binary-safe: a record key holds NUL bytes (service.cluster_backend.record_key);
- ``r:<replica>``: a replica's lease, a key that expires (PX) when the lease does;
- ``epoch``: the counter every new epoch is drawn from (INCR), so that none is ever reused;
- ``inbox:<replica>``: the pub/sub channel of a replica's hand-over messages, each one JSON
  ``{"kind", "key", "sender"}``.

Every operation is atomic: create, acquire, write (a whole batch in one call) and delete each run
one Lua script (EVALSHA, loaded again on NOSCRIPT); register, renew and leave are one command each
(SET PX, PEXPIRE, DEL). :meth:`RedisBackend.acquire` reads the owner's lease inside its script, at
a key named by the record it reads: that is fine on a standalone Redis or one behind Sentinel, but
Redis Cluster is not supported (the script touches a key its caller cannot declare).

A Redis that cannot be reached (refused, down, silent for ``timeout_s``) raises the builtin
:class:`ConnectionError` naming the URL (never its password); no call waits longer than
``timeout_s``. Commands are never retried by the client: a script whose reply was lost may have
run, and running it again would tell a different story (an acquire would report a released
session as taken from a lapsed owner; a release would be refused as fenced).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from service.cluster_backend import Claimed, HeldBy, Inbox, Message, Write

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub
    from redis.commands.core import AsyncScript

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# A new record, owned by ARGV[2] under a new epoch from the store's counter (ARGV[4], a key:
# epochs are never reused, not even after a delete). KEYS[1]: the record; ARGV: blob, replica,
# ttl ms, counter key. Returns the epoch, or nil if the record exists.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return false
end
local epoch = redis.call('INCR', ARGV[4])
redis.call('HSET', KEYS[1], 'blob', ARGV[1], 'epoch', epoch, 'replica', ARGV[2])
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return epoch
"""

# Take the record for ARGV[1] unless a live replica other than it owns it (its lease key, named
# by the lease prefix ARGV[3] and the owner, exists), under a new epoch from the counter ARGV[4].
# KEYS[1]: the record; ARGV: replica, ttl ms, lease prefix, counter key. Returns nil (no record),
# {0, owner} (held) or {1, epoch, blob, released}.
_ACQUIRE = """
local record = redis.call('HMGET', KEYS[1], 'blob', 'epoch', 'replica')
if not record[2] then
  return false
end
local owner = record[3] or ''
if owner ~= '' and owner ~= ARGV[1] and redis.call('EXISTS', ARGV[3] .. owner) == 1 then
  return {0, owner}
end
local epoch = redis.call('INCR', ARGV[4])
redis.call('HSET', KEYS[1], 'epoch', epoch, 'replica', ARGV[1])
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('PERSIST', KEYS[1])
end
local released = 0
if owner == '' then
  released = 1
end
return {1, epoch, record[1] or '', released}
"""

# A batch of writes, in order: KEYS[i] is write i's record; ARGV[1]: ttl ms; then 5 per write:
# replica, epoch, has blob ("1"/"0"), blob, release ("1"/"0"). Returns 1 (landed) or 0 per write.
_WRITE = """
local ttl = tonumber(ARGV[1])
local landed = {}
for i, key in ipairs(KEYS) do
  local at = 1 + (i - 1) * 5
  local record = redis.call('HMGET', key, 'epoch', 'replica')
  if record[1] and record[1] == ARGV[at + 2] and record[2] == ARGV[at + 1] then
    if ARGV[at + 3] == '1' then
      redis.call('HSET', key, 'blob', ARGV[at + 4])
      if ttl > 0 then
        redis.call('PEXPIRE', key, ttl)
      else
        redis.call('PERSIST', key)
      end
    end
    if ARGV[at + 5] == '1' then
      redis.call('HSET', key, 'replica', '')
    end
    landed[i] = 1
  else
    landed[i] = 0
  end
end
return landed
"""

# Remove the record if ARGV[1] owns it under epoch ARGV[2]. KEYS[1]: the record.
_DELETE = """
local record = redis.call('HMGET', KEYS[1], 'epoch', 'replica')
if record[1] and record[1] == ARGV[2] and record[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 2.0


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # any str, one to one


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


def _ms(seconds: float) -> int:
    """Milliseconds for a positive duration (at least 1), 0 for none."""
    return max(1, math.ceil(seconds * 1000)) if seconds > 0 else 0


def _message(data: object) -> Message:
    """The message a pub/sub payload holds; ValueError when it is not one."""
    if not isinstance(data, bytes | str):
        raise ValueError(f"a {type(data).__name__} payload")
    fields = json.loads(data)
    if not isinstance(fields, dict):
        raise ValueError("not a JSON object")
    kind, key, sender = fields.get("kind"), fields.get("key"), fields.get("sender")
    if not (isinstance(kind, str) and isinstance(key, str) and isinstance(sender, str)):
        raise ValueError("kind, key and sender must be strings")
    return Message(kind, key, sender)


class RedisBackend:
    """The cluster store contract (service.cluster_backend.ClusterBackend) on one Redis at
    ``url`` (``redis://[:password@]host:port/db``, ``rediss://`` with TLS, ``unix://``)."""

    def __init__(self, url: str, prefix: str = "rnnserve:cluster:", timeout_s: float = 5.0) -> None:
        try:
            import redis
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError as error:
            raise ModuleNotFoundError(
                "the Redis cluster store needs the redis package (a dependency of rnnserve): "
                "pip install 'redis>=5'"
            ) from error
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.client: Redis = redis.asyncio.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # never run a script twice (module docstring)
        )
        self._unreachable: tuple[type[Exception], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            TimeoutError,  # asyncio.timeout's
        )
        self._create: AsyncScript = self.client.register_script(_CREATE)
        self._acquire: AsyncScript = self.client.register_script(_ACQUIRE)
        self._write: AsyncScript = self.client.register_script(_WRITE)
        self._delete: AsyncScript = self.client.register_script(_DELETE)
        self._closed = False

    @property
    def where(self) -> str:
        """The URL without its user, password and query: safe to log and print."""
        scheme, separator, rest = self.url.partition("://")
        return scheme + separator + rest.rpartition("@")[2].partition("?")[0]

    def describe(self) -> str:
        scheme, _, rest = self.where.partition("://")
        return f"redis {rest if scheme in ('redis', 'rediss') else self.where}"

    def _unavailable(self, error: BaseException) -> ConnectionError:
        reason = str(error) or f"no reply in {self.timeout_s:g} s"
        return ConnectionError(f"cluster store Redis at {self.where} is unavailable ({reason})")

    async def _call(self, call: Awaitable[_T]) -> _T:
        """Await one command or script, within the timeout; ConnectionError when Redis is not
        there."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await call
        except self._unreachable as error:
            raise self._unavailable(error) from error

    def _record(self, key: str) -> bytes:
        return _bytes(self.prefix) + b"s:" + _bytes(key)

    def _lease_prefix(self) -> bytes:
        return _bytes(self.prefix) + b"r:"

    def _epoch_counter(self) -> bytes:
        return _bytes(self.prefix) + b"epoch"

    def _lease(self, replica: str) -> bytes:
        return self._lease_prefix() + _bytes(replica)

    def _inbox(self, replica: str) -> bytes:
        return _bytes(self.prefix) + b"inbox:" + _bytes(replica)

    async def register(self, replica: str, lease_s: float) -> None:
        lease_ms = _ms(lease_s)
        if lease_ms:
            await self._call(self.client.set(self._lease(replica), b"1", px=lease_ms))
        else:  # a lease of no time: over at once
            await self._call(self.client.delete(self._lease(replica)))

    async def renew(self, replica: str, lease_s: float) -> bool:
        # PEXPIRE sets a live key's expiry (none left: it deletes the key) and is 0 on a missing
        # one: the lease is extended if it had not expired, atomically, in one command.
        extended = await self._call(self.client.pexpire(self._lease(replica), _ms(lease_s)))
        return bool(extended)

    async def leave(self, replica: str) -> None:
        await self._call(self.client.delete(self._lease(replica)))

    async def create(self, key: str, replica: str, blob: bytes, ttl_s: float) -> int | None:
        created = await self._call(
            self._create(
                keys=[self._record(key)],
                args=[blob, _bytes(replica), _ms(ttl_s), self._epoch_counter()],
            )
        )
        return None if created is None else int(created)

    async def acquire(self, key: str, replica: str, ttl_s: float) -> Claimed | HeldBy | None:
        reply: Any = await self._call(
            self._acquire(
                keys=[self._record(key)],
                args=[_bytes(replica), _ms(ttl_s), self._lease_prefix(), self._epoch_counter()],
            )
        )
        if reply is None:
            return None
        if reply[0] == 0:
            return HeldBy(_text(reply[1]))
        _, epoch, blob, released = reply
        return Claimed(int(epoch), bytes(blob), bool(released))

    async def write(self, writes: Sequence[Write], ttl_s: float) -> list[bool]:
        if not writes:
            return []
        args: list[bytes | int] = [_ms(ttl_s)]
        for w in writes:
            has_blob = w.blob is not None
            args += [_bytes(w.replica), str(int(w.epoch)).encode(), b"1" if has_blob else b"0"]
            args += [w.blob if w.blob is not None else b"", b"1" if w.release else b"0"]
        landed: Any = await self._call(
            self._write(keys=[self._record(w.key) for w in writes], args=args)
        )
        return [bool(one) for one in landed]

    async def delete(self, key: str, replica: str, epoch: int) -> bool:
        deleted = await self._call(
            self._delete(keys=[self._record(key)], args=[_bytes(replica), str(int(epoch))])
        )
        return bool(deleted)

    async def send(self, replica: str, message: Message) -> None:
        payload = json.dumps({"kind": message.kind, "key": message.key, "sender": message.sender})
        await self._call(self.client.publish(self._inbox(replica), payload))

    async def listen(self, replica: str, inbox: Inbox) -> None:
        """Deliver ``replica``'s messages to ``inbox`` until cancelled (or the backend closed).
        One message that is not one (not JSON, wrong fields) is logged and skipped, and so is one
        that ``inbox`` fails on. A lost connection is logged once, then subscribed again with a
        backoff (doubling up to 2 s) until Redis is back: the messages sent meanwhile are lost,
        as the contract allows (senders retry)."""
        failures = 0
        while not self._closed:
            pubsub = self.client.pubsub()
            try:
                await self._subscribe(pubsub, self._inbox(replica))
                if failures:
                    logger.info("cluster store Redis at %s: inbox of %s back", self.where, replica)
                    failures = 0
                await self._receive(pubsub, inbox)
            except self._unreachable as error:
                if self._closed:
                    break
                if not failures:
                    logger.warning(
                        "cluster store Redis at %s: lost the inbox of %s (%s); subscribing "
                        "again until it is back",
                        self.where,
                        replica,
                        str(error) or type(error).__name__,
                    )
                failures += 1
                await asyncio.sleep(min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** (failures - 1)))
            finally:
                close: Callable[[], Awaitable[None]] = pubsub.aclose  # untyped in redis-py
                await close()

    async def _subscribe(self, pubsub: PubSub, channel: bytes) -> None:
        """Subscribe and wait for Redis to confirm it: messages sent from then on arrive."""
        async with asyncio.timeout(self.timeout_s):
            await pubsub.subscribe(channel)
            while True:
                reply = await pubsub.get_message(timeout=self.timeout_s)
                if reply is not None and reply["type"] == "subscribe":
                    return

    async def _receive(self, pubsub: PubSub, inbox: Inbox) -> None:
        """Deliver messages until the connection fails. A connection silent for ``timeout_s`` is
        sent a PING; one silent for another ``timeout_s`` after it counts as lost (TimeoutError),
        so a Redis gone without closing the connection is noticed too."""
        pinged = False
        while not self._closed:
            reply = await pubsub.get_message(timeout=self.timeout_s)
            if reply is None:
                if pinged:
                    raise TimeoutError(f"no reply to a PING in {self.timeout_s:g} s")
                await pubsub.ping()
                pinged = True
                continue
            pinged = False
            if reply["type"] == "message":
                await self._deliver(reply["data"], inbox)

    async def _deliver(self, data: object, inbox: Inbox) -> None:
        try:
            message = _message(data)
        except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError
            logger.warning("cluster store: skipped a malformed hand-over message (%s)", error)
            return
        try:
            delivered = inbox(message)
            if delivered is not None:
                await delivered
        except Exception:
            logger.exception("cluster store: the inbox failed on %s", message)

    async def close(self) -> None:
        self._closed = True
        await self.client.aclose()
