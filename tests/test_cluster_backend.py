"""The cluster store contract (service.cluster_backend), run against every backend: MemoryBackend
(its reference, on a fake clock) and RedisBackend against a real redis-server this test starts on
loopback. A new backend joins the suite with one entry in KINDS and one branch in make_backend.

Time: a backend on a fake clock has it advanced; one on real time gets short leases and record
TTLs, and each test waits for their end by polling a condition, within a bound (eventually)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.cluster_backend import (
    Claimed,
    ClusterBackend,
    HeldBy,
    MemoryBackend,
    Message,
    Write,
    record_key,
)
from service.cluster_embedded import EmbeddedStore, SocketBackend
from service.cluster_redis import RedisBackend
from tests.redis_server import redis_server

KINDS = ["memory", "redis", "embedded"]

LIVE_S = 60.0  # a lease or record TTL that outlasts any test
SHORT_S = 0.15  # one a test waits out
WAIT_S = 5.0  # the most any condition is waited for


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Store:
    """A backend under test, and how time passes for it: ``clock`` when it runs on a fake one
    (advanced by :meth:`eventually`), None on real time."""

    backend: ClusterBackend
    clock: FakeClock | None = None

    async def eventually(
        self, condition: Callable[[], bool | Awaitable[bool]], what: str = "the condition"
    ) -> None:
        """Let time pass until ``condition`` holds; fail after WAIT_S seconds (real time)."""
        deadline = time.monotonic() + WAIT_S
        while True:
            held = condition()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return
            assert time.monotonic() < deadline, f"{what} not within {WAIT_S} s"
            if self.clock is not None:
                self.clock.now += SHORT_S / 4
                await asyncio.sleep(0.001)  # let other tasks (a listener) run
            else:
                await asyncio.sleep(0.01)

    async def lapsed(self, replica: str) -> None:
        """Wait until ``replica``'s lease is over as another replica sees it: a probe record it
        owns can be taken (acquire is the contract's only view of a lease)."""
        probe = f"probe of {replica}"
        assert await self.backend.create(probe, replica, b"", 0) is not None

        async def taken() -> bool:
            return isinstance(await self.backend.acquire(probe, "prober", 0), Claimed)

        await self.eventually(taken, f"the end of {replica}'s lease")

    async def expired(self, key: str, replica: str, epoch: int) -> None:
        """Wait until record ``key`` (owned by ``replica`` under ``epoch``) is gone, checking
        with ownership-only writes (they do not extend a record's life)."""

        async def gone() -> bool:
            return await self.backend.write([Write(key, replica, epoch)], LIVE_S) == [False]

        await self.eventually(gone, f"the expiry of {key!r}")


@contextlib.asynccontextmanager
async def make_backend(kind: str, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh, empty backend of ``kind`` for one test (its server too, if it needs one)."""
    if kind == "memory":
        clock = FakeClock()
        yield Store(MemoryBackend(clock=clock), clock)
    elif kind == "redis":
        with redis_server(tmp_path) as url:
            backend = RedisBackend(url, timeout_s=2.0)
            try:
                yield Store(backend)
            finally:
                await backend.close()
    elif kind == "embedded":  # the --workers store: a MemoryBackend behind a Unix socket
        clock = FakeClock()
        server = EmbeddedStore(backend=MemoryBackend(clock=clock))
        await server.start()
        client = SocketBackend(server.path, timeout_s=2.0)
        try:
            yield Store(client, clock)
        finally:
            await client.close()
            await server.stop()
    else:
        raise ValueError(f"no backend kind {kind!r}")


@pytest.fixture(params=KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with make_backend(request.param, tmp_path) as made:
        yield made


@contextlib.asynccontextmanager
async def listening(store: Store, replica: str, inbox: list[Message]) -> AsyncIterator[None]:
    """Run ``listen(replica)`` into ``inbox`` for the block, once it receives (probes, sent until
    one arrives: a subscription may take a moment); stop it after."""

    async def collect(message: Message) -> None:
        inbox.append(message)

    task = asyncio.create_task(store.backend.listen(replica, collect))

    async def probed() -> bool:
        if any(m.kind == "probe" for m in inbox):
            return True
        await store.backend.send(replica, Message("probe", "", "test"))
        return False

    try:
        await store.eventually(probed, f"{replica} listening")
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.done()


def real(inbox: list[Message]) -> list[Message]:
    return [m for m in inbox if m.kind != "probe"]


# Records and ownership


async def test_create_makes_epoch_1_once(store: Store) -> None:
    b = store.backend
    await b.register("a", LIVE_S)
    assert await b.create("k", "a", b"first", LIVE_S) == 1
    assert await b.create("k", "b", b"second", LIVE_S) is None
    assert await b.create("k", "a", b"third", LIVE_S) is None
    assert await b.acquire("k", "b", LIVE_S) == HeldBy("a")  # still a's, with its blob:
    assert await b.acquire("k", "a", LIVE_S) == Claimed(2, b"first", released=False)


async def test_acquire_of_a_missing_key_is_none(store: Store) -> None:
    assert await store.backend.acquire("nothing", "a", LIVE_S) is None


async def test_a_live_owner_holds_its_session(store: Store) -> None:
    b = store.backend
    await b.register("a", LIVE_S)
    await b.register("b", LIVE_S)
    await b.create("k", "a", b"x", LIVE_S)
    assert await b.acquire("k", "b", LIVE_S) == HeldBy("a")
    assert await b.acquire("k", "b", LIVE_S) == HeldBy("a")  # nothing changed
    assert await b.write([Write("k", "a", 1, b"y")], LIVE_S) == [True]


async def test_the_owner_acquiring_its_own_gets_a_new_epoch(store: Store) -> None:
    b = store.backend
    await b.register("a", LIVE_S)
    await b.create("k", "a", b"x", LIVE_S)
    assert await b.acquire("k", "a", LIVE_S) == Claimed(2, b"x", released=False)
    assert await b.acquire("k", "a", LIVE_S) == Claimed(3, b"x", released=False)
    assert await b.write([Write("k", "a", 2, b"old")], LIVE_S) == [False]  # fenced, even by itself
    assert await b.write([Write("k", "a", 3, b"new")], LIVE_S) == [True]


async def test_a_released_session_is_claimed_with_every_step(store: Store) -> None:
    b = store.backend
    await b.register("a", LIVE_S)
    await b.register("b", LIVE_S)
    await b.create("k", "a", b"x", LIVE_S)
    assert await b.write([Write("k", "a", 1, b"last", release=True)], LIVE_S) == [True]
    assert await b.write([Write("k", "a", 1, b"late")], LIVE_S) == [False]  # no longer a's
    assert await b.delete("k", "a", 1) is False
    assert await b.acquire("k", "b", LIVE_S) == Claimed(2, b"last", released=True)
    assert await b.acquire("k", "a", LIVE_S) == HeldBy("b")
    # Released without a blob: the blob stays; released by b, taken back by a.
    assert await b.write([Write("k", "b", 2, release=True)], LIVE_S) == [True]
    assert await b.acquire("k", "a", LIVE_S) == Claimed(3, b"last", released=True)


async def test_a_session_of_a_lapsed_owner_is_taken_and_the_owner_fenced(store: Store) -> None:
    b = store.backend
    await b.register("a", SHORT_S)
    await b.register("b", LIVE_S)
    assert await b.create("k", "a", b"x", LIVE_S) == 1
    assert await b.write([Write("k", "a", 1, b"written")], LIVE_S) == [True]
    await store.lapsed("a")  # (its probe record drew epoch 2)
    assert await b.acquire("k", "b", LIVE_S) == Claimed(4, b"written", released=False)
    # a comes back (it was paused) and believes it still owns the session: fenced.
    await b.register("a", LIVE_S)
    assert await b.write([Write("k", "a", 1, b"stale")], LIVE_S) == [False]
    assert await b.write([Write("k", "a", 1, b"stale", release=True)], LIVE_S) == [False]
    assert await b.delete("k", "a", 1) is False
    assert await b.acquire("k", "a", LIVE_S) == HeldBy("b")


async def test_writes_land_only_for_the_owner_under_its_epoch(store: Store) -> None:
    b = store.backend
    await b.register("a", LIVE_S)
    await b.register("b", LIVE_S)
    await b.create("k", "a", b"x", LIVE_S)
    assert await b.write([Write("k", "a", 1, b"y")], LIVE_S) == [True]
    assert await b.write([Write("k", "a", 0, b"stale")], LIVE_S) == [False]
    assert await b.write([Write("k", "a", 2, b"future")], LIVE_S) == [False]
    assert await b.write([Write("k", "b", 1, b"other")], LIVE_S) == [False]
    assert await b.write([Write("missing", "a", 1, b"z")], LIVE_S) == [False]
    assert await b.write([Write("k", "a", 1, b"z", release=True)], LIVE_S) == [True]
    assert await b.acquire("k", "b", LIVE_S) == Claimed(2, b"z", released=True)


async def test_a_write_without_a_blob_only_checks_ownership(store: Store) -> None:
    b = store.backend
    await b.register("a", LIVE_S)
    await b.create("k", "a", b"kept", LIVE_S)
    assert await b.write([Write("k", "a", 1)], LIVE_S) == [True]
    assert await b.write([Write("k", "a", 7)], LIVE_S) == [False]
    assert await b.write([Write("k", "b", 1)], LIVE_S) == [False]
    assert await b.write([Write("k", "a", 1, release=True)], LIVE_S) == [True]
    assert await b.acquire("k", "b", LIVE_S) == Claimed(2, b"kept", released=True)


async def test_many_writes_in_one_call_each_get_their_answer(store: Store) -> None:
    b = store.backend
    for replica in ("a", "b"):
        await b.register(replica, LIVE_S)
    await b.create("k1", "a", b"1", LIVE_S)
    await b.create("k2", "a", b"2", LIVE_S)
    await b.create("k3", "b", b"3", LIVE_S)
    await b.create("k4", "a", b"", LIVE_S)
    writes = [
        Write("k1", "a", 1, b"1+"),  # lands
        Write("k2", "a", 5, b"2+"),  # stale epoch
        Write("k3", "a", 3, b"3+"),  # not a's
        Write("gone", "a", 1, b"?"),  # no record
        Write("k3", "b", 3),  # b's, ownership only
        Write("k4", "a", 4, b"4+", release=True),  # lands and releases...
        Write("k4", "a", 4, b"4++"),  # ...so the next one in the same batch is refused
        Write("k1", "a", 1, b"1++", release=True),  # a second write of k1 lands after the first
    ]
    assert await b.write(writes, LIVE_S) == [True, False, False, False, True, True, False, True]
    assert await b.write([], LIVE_S) == []
    assert await b.acquire("k1", "b", LIVE_S) == Claimed(5, b"1++", released=True)
    assert await b.acquire("k2", "b", LIVE_S) == HeldBy("a")
    assert await b.acquire("k4", "b", LIVE_S) == Claimed(6, b"4+", released=True)
    assert await b.write([Write("k3", "b", 3, release=True)], LIVE_S) == [True]
    assert await b.acquire("k3", "a", LIVE_S) == Claimed(7, b"3", released=True)
    assert await b.acquire("gone", "a", LIVE_S) is None


async def test_only_the_owner_under_its_epoch_deletes(store: Store) -> None:
    b = store.backend
    await b.register("a", LIVE_S)
    await b.create("k", "a", b"x", LIVE_S)
    await b.acquire("k", "a", LIVE_S)  # epoch 2
    assert await b.delete("k", "b", 2) is False
    assert await b.delete("k", "a", 1) is False
    assert await b.delete("missing", "a", 2) is False
    assert await b.delete("k", "a", 2) is True
    assert await b.delete("k", "a", 2) is False
    assert await b.acquire("k", "a", LIVE_S) is None
    # A new session under the key: a new epoch, never one used before (a write delayed from
    # the first session cannot land on the second).
    assert await b.create("k", "b", b"again", LIVE_S) == 3
    assert await b.write([Write("k", "b", 1, b"old"), Write("k", "b", 2, b"old")], LIVE_S) == [
        False,
        False,
    ]


# Leases


async def test_renew_extends_a_live_lease_and_refuses_an_expired_one(store: Store) -> None:
    b = store.backend
    await b.register("a", LIVE_S)
    assert await b.renew("a", LIVE_S) is True
    assert await b.renew("a", SHORT_S) is True  # now a short one
    await store.lapsed("a")
    assert await b.renew("a", LIVE_S) is False
    assert await b.renew("a", LIVE_S) is False  # a refused renewal revives nothing
    await b.create("k", "a", b"x", LIVE_S)
    assert isinstance(await b.acquire("k", "b", LIVE_S), Claimed)
    await b.register("a", LIVE_S)  # register again: alive
    assert await b.renew("a", LIVE_S) is True
    assert await b.renew("never registered", LIVE_S) is False


async def test_a_renewed_lease_outlasts_its_first_term(store: Store) -> None:
    b = store.backend
    await b.register("a", SHORT_S)
    await b.register("b", SHORT_S)
    await b.create("k", "a", b"x", LIVE_S)
    assert await b.renew("a", LIVE_S) is True
    await store.lapsed("b")  # b's term of the same length is over; a's renewed one is not
    assert await b.acquire("k", "c", LIVE_S) == HeldBy("a")


async def test_leave_ends_the_lease_at_once(store: Store) -> None:
    b = store.backend
    await b.register("a", LIVE_S)
    await b.create("k", "a", b"x", LIVE_S)
    await b.leave("a")
    assert await b.acquire("k", "b", LIVE_S) == Claimed(2, b"x", released=False)
    assert await b.renew("a", LIVE_S) is False
    await b.leave("a")  # twice, or never registered: nothing to end
    await b.leave("never registered")


# Record TTL


async def test_a_record_expires_ttl_after_its_last_write_unless_ttl_is_0(store: Store) -> None:
    b = store.backend
    await b.register("a", LIVE_S)
    assert await b.create("short", "a", b"x", SHORT_S) == 1
    assert await b.create("forever", "a", b"x", 0) == 2
    assert await b.create("persisted by acquire", "a", b"x", SHORT_S) == 3
    assert await b.create("persisted by write", "a", b"x", SHORT_S) == 4
    assert await b.create("checked only", "a", b"x", 0) == 5
    assert await b.acquire("persisted by acquire", "a", 0) == Claimed(6, b"x", released=False)
    assert await b.write([Write("persisted by write", "a", 4, b"y")], 0) == [True]
    # An ownership check neither gives a TTL to a record without one, nor extends one.
    assert await b.write([Write("checked only", "a", 5)], SHORT_S) == [True]
    assert await b.write([Write("short", "a", 1)], 0) == [True]
    await store.expired("short", "a", 1)
    assert await b.acquire("short", "a", LIVE_S) is None
    assert await b.create("short", "a", b"new", 0) == 7
    assert await b.write([Write("forever", "a", 2)], 0) == [True]
    assert await b.write([Write("persisted by acquire", "a", 6)], 0) == [True]
    assert await b.write([Write("persisted by write", "a", 4)], 0) == [True]
    assert await b.write([Write("checked only", "a", 5)], 0) == [True]
    if store.clock is not None:  # "never", as far as a fake clock can tell
        store.clock.now += 10 * 365 * 86400
        assert await b.acquire("forever", "a", 0) == Claimed(8, b"x", released=False)


async def test_a_write_with_a_blob_restarts_the_ttl(store: Store) -> None:
    b = store.backend
    await b.register("a", LIVE_S)
    assert await b.create("k", "a", b"x", 0) == 1
    assert await b.write([Write("k", "a", 1, b"y")], SHORT_S) == [True]  # now it has one
    await store.expired("k", "a", 1)
    assert await b.create("k", "a", b"x", SHORT_S) == 2
    assert await b.acquire("k", "a", SHORT_S) == Claimed(3, b"x", released=False)
    await store.expired("k", "a", 3)


# Hand-over messages


async def test_messages_reach_their_replica_only_in_order(store: Store) -> None:
    b = store.backend
    to_a: list[Message] = []
    to_b: list[Message] = []
    a1, a2, a3 = (Message("release", f"k{i}", "b") for i in (1, 2, 3))
    b1 = Message("released", "k9", "a")
    end = Message("release", "end", "c")
    async with listening(store, "a", to_a), listening(store, "b", to_b):
        for message in (a1, a2, a3):
            await b.send("a", message)
        await b.send("b", b1)
        await b.send("nobody", Message("release", "lost", "a"))  # nobody listens: lost
        await b.send("a", end)
        await store.eventually(lambda: len(real(to_a)) == 4 and len(real(to_b)) == 1)
    assert real(to_a) == [a1, a2, a3, end]
    assert real(to_b) == [b1]


async def test_a_plain_function_is_an_inbox_too(store: Store) -> None:
    got: list[Message] = []
    task = asyncio.create_task(store.backend.listen("a", got.append))

    async def arrived() -> bool:
        if got:
            return True
        await store.backend.send("a", Message("released", "k", "b"))
        return False

    try:
        await store.eventually(arrived, "a message")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert got[0] == Message("released", "k", "b")


async def test_listen_ends_when_cancelled(store: Store) -> None:
    before: list[Message] = []
    after: list[Message] = []
    async with listening(store, "a", before):
        pass  # listening() cancels it, and checks that it ended
    count = len(before)
    message = Message("release", "k", "b")
    async with listening(store, "a", after):
        await store.backend.send("a", message)
        await store.eventually(lambda: real(after) == [message])
    assert len(before) == count


# Keys and names: any text


async def test_keys_with_nul_bytes_and_unicode(store: Store) -> None:
    b = store.backend
    owner, other = "réplica-東京", "реплика\U0001f680"
    key = record_key("gru\0model", "session ü\0東京", "owner\0with nul")
    near = record_key("gru\0model", "session ü\0東京", "owner\0with nuL")  # differs at the end
    await b.register(owner, LIVE_S)
    await b.register(other, LIVE_S)
    assert await b.create(key, owner, b"\0blob\xff", LIVE_S) == 1
    assert await b.create(key, other, b"", LIVE_S) is None
    assert await b.create(near, other, b"near", LIVE_S) == 2
    assert await b.acquire(key, other, LIVE_S) == HeldBy(owner)
    assert await b.write([Write(key, owner, 1, b"\0\0", release=True)], LIVE_S) == [True]
    assert await b.acquire(key, other, LIVE_S) == Claimed(3, b"\0\0", released=True)
    assert await b.acquire(near, owner, LIVE_S) == HeldBy(other)
    assert await b.delete(key, other, 3) is True
    assert await b.acquire(key, owner, LIVE_S) is None
    assert await b.acquire(near, other, LIVE_S) == Claimed(4, b"near", released=False)
    got: list[Message] = []
    message = Message("release", key, "sender\0ü")
    async with listening(store, owner, got):
        await b.send(owner, message)
        await store.eventually(lambda: real(got) == [message])


# Redis only: its layout, its failures


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path) as url:
        yield url


async def test_redis_layout_and_description(redis_url: str) -> None:
    backend = RedisBackend(redis_url, prefix="t:")
    try:
        assert backend.describe() == "redis " + redis_url.removeprefix("redis://")
        await backend.register("a", 30.0)
        key = record_key("m", "s", "o")
        await backend.create(key, "a", b"x", 30.0)
        client, record = backend.client, b"t:s:" + key.encode()
        assert b"\0" in record
        assert await client.hgetall(record) == {
            b"blob": b"x",
            b"epoch": b"1",
            b"replica": b"a",
        }
        assert 29_000 < await client.pttl(record) <= 30_000
        assert 29_000 < await client.pttl(b"t:r:a") <= 30_000
        await backend.acquire(key, "a", 0)
        assert await client.pttl(record) == -1  # no expiry
    finally:
        await backend.close()
    described = RedisBackend("redis://user:secret@127.0.0.1:6379/2?health_check_interval=1")
    try:
        assert described.describe() == "redis 127.0.0.1:6379/2"
        assert described.where == "redis://127.0.0.1:6379/2"
    finally:
        await described.close()


async def test_redis_scripts_are_loaded_again_after_a_flush(redis_url: str) -> None:
    backend = RedisBackend(redis_url)
    try:
        await backend.register("a", 30.0)
        assert await backend.create("k", "a", b"x", 0) == 1
        await backend.client.script_flush()  # as after a restart or a failover: NOSCRIPT
        assert await backend.create("k", "a", b"x", 0) is None
        assert await backend.write([Write("k", "a", 1, b"y")], 0) == [True]
    finally:
        await backend.close()


async def test_redis_listen_skips_malformed_messages(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = RedisBackend(redis_url)
    store = Store(backend)
    got: list[Message] = []
    try:
        async with listening(store, "a", got):
            for raw in (b"not json", b"\xff\xfe", b"[1, 2]", b'{"kind": 1, "key": "k"}'):
                await backend.client.publish(b"rnnserve:cluster:inbox:a", raw)
            await backend.send("a", Message("release", "k", "b"))
            await store.eventually(lambda: real(got) == [Message("release", "k", "b")])
    finally:
        await backend.close()
    skipped = [r for r in caplog.records if "malformed hand-over message" in r.getMessage()]
    assert len(skipped) == 4


async def test_redis_listen_fails_on_inbox_error_only_for_that_message(redis_url: str) -> None:
    store = Store(RedisBackend(redis_url))
    got: list[Message] = []

    def inbox(message: Message) -> None:
        if message.key == "fails":
            raise RuntimeError("a broken inbox")
        got.append(message)

    task = asyncio.create_task(store.backend.listen("a", inbox))

    async def delivered() -> bool:
        if any(m.key == "ok" for m in got):
            return True
        await store.backend.send("a", Message("release", "fails", "b"))
        await store.backend.send("a", Message("release", "ok", "b"))
        return False

    try:
        await store.eventually(delivered, "the message after a failing one")
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.backend.close()


async def test_redis_listen_subscribes_again_after_a_lost_connection(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = RedisBackend(redis_url)
    store = Store(backend)
    got: list[Message] = []
    caplog.set_level(logging.INFO, logger="service.cluster_redis")
    try:
        async with listening(store, "a", got):
            for _ in range(2):  # twice: the second loss is logged again, after "back"
                killed = await backend.client.client_kill_filter(_type="pubsub")
                assert killed == 1
                got.clear()

                async def probed() -> bool:
                    if got:
                        return True
                    await backend.send("a", Message("probe", "", "test"))
                    return False

                await store.eventually(probed, "listening again")
    finally:
        await backend.close()
    text = [r.getMessage() for r in caplog.records]
    assert sum("lost the inbox of a" in line for line in text) == 2
    assert sum("inbox of a back" in line for line in text) == 2


async def test_redis_an_idle_inbox_stays_subscribed(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = RedisBackend(redis_url, timeout_s=0.1)  # silent 0.1 s: a PING; 0.2 s: lost
    store = Store(backend)
    got: list[Message] = []
    message = Message("release", "k", "b")
    try:
        async with listening(store, "a", got):
            await asyncio.sleep(0.5)  # idle: several PINGs answered
            await backend.send("a", message)
            await store.eventually(lambda: real(got) == [message])
    finally:
        await backend.close()
    assert not [r for r in caplog.records if "lost the inbox" in r.getMessage()]


async def test_redis_listen_returns_when_the_backend_closes(redis_url: str) -> None:
    backend = RedisBackend(redis_url)
    got: list[Message] = []
    task = asyncio.create_task(backend.listen("a", got.append))

    async def probed() -> bool:
        await backend.send("a", Message("probe", "", "test"))
        return bool(got)

    try:
        await Store(backend).eventually(probed, "listening")
    finally:
        await backend.close()
    async with asyncio.timeout(WAIT_S):
        await task


async def test_redis_listen_returns_when_the_backend_closes_during_a_delivery(
    redis_url: str,
) -> None:
    """Closed while its inbox handles a message: it must not subscribe again afterwards."""
    backend = RedisBackend(redis_url, timeout_s=0.5)
    sender = RedisBackend(redis_url, timeout_s=0.5)
    entered, release = asyncio.Event(), asyncio.Event()

    async def inbox(message: Message) -> None:
        entered.set()
        await release.wait()

    task = asyncio.create_task(backend.listen("r", inbox))
    try:
        async with asyncio.timeout(WAIT_S):
            while not entered.is_set():
                await sender.send("r", Message("release", "k", "s"))
                await asyncio.sleep(0.05)
        await backend.close()
        release.set()
        async with asyncio.timeout(WAIT_S):
            await task
    finally:
        task.cancel()
        await sender.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_redis_is_a_connection_error_naming_it() -> None:
    port = closed_port()
    url = f"redis://user:secret@127.0.0.1:{port}/0"
    backend = RedisBackend(url, timeout_s=0.5)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: backend.register("a", 1.0),
        lambda: backend.renew("a", 1.0),
        lambda: backend.leave("a"),
        lambda: backend.create("k", "a", b"x", 0),
        lambda: backend.acquire("k", "a", 0),
        lambda: backend.write([Write("k", "a", 1, b"x")], 0),
        lambda: backend.delete("k", "a", 1),
        lambda: backend.send("a", Message("release", "k", "b")),
    ]
    try:
        for call in calls:
            started = time.monotonic()
            with pytest.raises(ConnectionError) as raised:
                await call()
            assert time.monotonic() - started < 2.0
            message = str(raised.value)
            assert f"cluster store Redis at redis://127.0.0.1:{port}/0 is unavailable" in message
            assert "secret" not in message
        assert "secret" not in backend.describe()
    finally:
        await backend.close()


async def test_a_silent_redis_is_a_connection_error_after_the_timeout() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        backend = RedisBackend(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
        try:
            started = time.monotonic()
            with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}/0 is unavailable"):
                await backend.acquire("k", "a", 0)
            assert 0.25 < time.monotonic() - started < 2.0
        finally:
            await backend.close()


async def test_listen_on_an_unreachable_redis_keeps_trying(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = RedisBackend(f"redis://127.0.0.1:{closed_port()}/0", timeout_s=0.2)
    task = asyncio.create_task(backend.listen("a", lambda message: None))
    try:
        await asyncio.sleep(0.5)  # several tries (a backoff from 50 ms)
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await backend.close()
    lost = [r for r in caplog.records if "lost the inbox of a" in r.getMessage()]
    assert len(lost) == 1  # logged once, not once per try
