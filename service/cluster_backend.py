"""The cluster store's contract: session records, ownership with fencing epochs, replica leases
and hand-over messages; and :class:`MemoryBackend`, its reference implementation in memory.

A cluster of replicas (processes, machines) shares one store. For every live session it holds a
record under the session's key (:func:`record_key`):

- ``blob``: the session as last written (service.snapshots' format with one session: its state,
  step count, incarnation, last reply, model version and model sha256);
- ``epoch``: the fencing epoch, drawn anew at every change of owner from one counter of the
  whole store, so that an epoch is never used twice, not even by a session closed and opened
  again under the same id (a write delayed from the first could otherwise land on the second);
- ``replica``: the replica that owns it now, or "" when it was released.

A replica is alive while its lease (:meth:`ClusterBackend.register`, renewed by
:meth:`ClusterBackend.renew`) has not expired. Ownership of a session is never leased on its own:
it lasts while its owner's lease does, so one renewal per replica keeps every session it owns.
The store checks the epoch on every write (:meth:`ClusterBackend.write`): a write from an owner
that lost the session (its lease lapsed while it was paused or cut off, and another replica took
the session with a higher epoch) is refused, whatever that owner believes.

Backends: this module's :class:`MemoryBackend` (tests, and the embedded store of ``--workers``,
service.cluster_embedded), and Redis (service.cluster_redis), where each operation is one Lua
script, so it is atomic like here. Every method is a coroutine; none waits longer than the
backend's own timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from service.session import scoped_key


def record_key(model: str, session_id: str, owner: str) -> str:
    """The store's key of session ``session_id`` of identity ``owner`` on model ``model`` (any
    version: an id lives on one version of a model at a time)."""
    return f"{model}\0{scoped_key(session_id, owner)}"


@dataclass(frozen=True)
class Claimed:
    """This replica owns the session now, under ``epoch``. ``blob``: the session as last written.
    ``released``: its previous owner released it after its last chunk (a hand-over, a drain), so
    the blob holds every step applied; otherwise (taken from a replica whose lease expired) steps
    applied after the last write may be lost, and its client must say from where it goes on."""

    epoch: int
    blob: bytes
    released: bool


@dataclass(frozen=True)
class HeldBy:
    """A live replica owns the session: ask it to hand the session over."""

    replica: str


@dataclass(frozen=True)
class Write:
    """One write of a session by its owner ``replica`` under ``epoch``. ``blob`` None: only check
    that the session is still this owner's. ``release``: the owner gives it up with this write."""

    key: str
    replica: str
    epoch: int
    blob: bytes | None = None
    release: bool = False


@dataclass(frozen=True)
class Message:
    """A hand-over message between replicas: ``kind`` "release" (``sender`` asks the owner to
    release ``key``) or "released" (the owner did, or does not hold it)."""

    kind: str
    key: str
    sender: str


Inbox = Callable[[Message], Awaitable[None] | None]


class ClusterBackend(Protocol):
    """The operations a cluster store provides, each atomic. ``ttl_s`` (0: none): how long a
    record lives after its last write (a session idle that long is gone, as on one replica)."""

    async def register(self, replica: str, lease_s: float) -> None:
        """Start (or restart) ``replica``'s lease, for ``lease_s`` seconds."""
        ...

    async def renew(self, replica: str, lease_s: float) -> bool:
        """Extend ``replica``'s lease to ``lease_s`` from now. False: it had expired (other
        replicas may have taken its sessions; it is not renewed: :meth:`register` again)."""
        ...

    async def leave(self, replica: str) -> None:
        """End ``replica``'s lease now (a drained replica)."""
        ...

    async def create(self, key: str, replica: str, blob: bytes, ttl_s: float) -> int | None:
        """A new record owned by ``replica``; returns its epoch. None: the key exists (not
        changed)."""
        ...

    async def acquire(self, key: str, replica: str, ttl_s: float) -> Claimed | HeldBy | None:
        """Take the session if it is released, or its owner's lease expired, or ``replica``
        owns it already: a new epoch, higher than every epoch the store gave before. :class:`HeldBy` when a live replica owns it; None when
        there is no such session."""
        ...

    async def write(self, writes: Sequence[Write], ttl_s: float) -> list[bool]:
        """Apply each write whose epoch and replica are the record's; False for each refused
        (fenced: the writer no longer owns it, or the record is gone)."""
        ...

    async def delete(self, key: str, replica: str, epoch: int) -> bool:
        """Remove the record (the session ended) if ``replica`` owns it under ``epoch``."""
        ...

    async def send(self, replica: str, message: Message) -> None:
        """Put ``message`` in ``replica``'s inbox (lost if nobody listens: senders retry)."""
        ...

    async def listen(self, replica: str, inbox: Inbox) -> None:
        """Deliver ``replica``'s messages to ``inbox`` from now until cancelled."""
        ...

    async def close(self) -> None: ...

    def describe(self) -> str:
        """Where the store is, safe to log (no password)."""
        ...


@dataclass
class _Record:
    blob: bytes
    epoch: int
    replica: str
    expires_s: float | None


@dataclass
class MemoryBackend:
    """The contract in memory: one process's replicas (tests), or the store the ``--workers``
    supervisor holds for its workers (service.cluster_embedded). ``clock``: monotonic seconds.

    Concurrency: every method runs on one event loop and none awaits in the middle of its
    change, so each operation is atomic, as one Lua script is in Redis."""

    clock: Callable[[], float] = time.monotonic
    records: dict[str, _Record] = field(default_factory=dict)
    last_epoch: int = 0  # the store's epoch counter
    leases: dict[str, float] = field(default_factory=dict)  # replica -> lease end, clock seconds
    inboxes: dict[str, list[Inbox]] = field(default_factory=dict)

    def _alive(self, replica: str) -> bool:
        end = self.leases.get(replica)
        return end is not None and end > self.clock()

    def _expires(self, ttl_s: float) -> float | None:
        return self.clock() + ttl_s if ttl_s > 0 else None

    def _record(self, key: str) -> _Record | None:
        record = self.records.get(key)
        if record is not None and record.expires_s is not None and record.expires_s <= self.clock():
            del self.records[key]
            return None
        return record

    async def register(self, replica: str, lease_s: float) -> None:
        self.leases[replica] = self.clock() + lease_s

    async def renew(self, replica: str, lease_s: float) -> bool:
        if not self._alive(replica):
            self.leases.pop(replica, None)
            return False
        self.leases[replica] = self.clock() + lease_s
        return True

    async def leave(self, replica: str) -> None:
        self.leases.pop(replica, None)

    async def create(self, key: str, replica: str, blob: bytes, ttl_s: float) -> int | None:
        if self._record(key) is not None:
            return None
        self.last_epoch += 1
        self.records[key] = _Record(blob, self.last_epoch, replica, self._expires(ttl_s))
        return self.last_epoch

    async def acquire(self, key: str, replica: str, ttl_s: float) -> Claimed | HeldBy | None:
        record = self._record(key)
        if record is None:
            return None
        if record.replica and record.replica != replica and self._alive(record.replica):
            return HeldBy(record.replica)
        released = not record.replica
        self.last_epoch += 1
        record.epoch = self.last_epoch
        record.replica = replica
        record.expires_s = self._expires(ttl_s)
        return Claimed(record.epoch, record.blob, released)

    async def write(self, writes: Sequence[Write], ttl_s: float) -> list[bool]:
        landed = []
        for w in writes:
            record = self._record(w.key)
            ok = record is not None and record.epoch == w.epoch and record.replica == w.replica
            if ok and record is not None:
                if w.blob is not None:
                    record.blob = w.blob
                    record.expires_s = self._expires(ttl_s)
                if w.release:
                    record.replica = ""
            landed.append(ok)
        return landed

    async def delete(self, key: str, replica: str, epoch: int) -> bool:
        record = self._record(key)
        if record is None or record.epoch != epoch or record.replica != replica:
            return False
        del self.records[key]
        return True

    async def send(self, replica: str, message: Message) -> None:
        for inbox in list(self.inboxes.get(replica, ())):
            delivered = inbox(message)
            if delivered is not None:
                await delivered

    async def listen(self, replica: str, inbox: Inbox) -> None:
        self.inboxes.setdefault(replica, []).append(inbox)
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            self.inboxes[replica].remove(inbox)

    async def close(self) -> None:
        return None

    def describe(self) -> str:
        return "memory"
