"""Per-model sessions: their slots in the model's state bank, limits, ends and idle expiry.

The bank (:mod:`service.state_bank`, in host memory or on the model's device) holds one array per
state tensor, [layers, capacity, hidden]; a session owns slot ``s``. A batch gathers the slots of
its sessions into batch arrays, runs the model, and scatters the new states back. Capacity grows
by doubling up to ``max_sessions``.

Concurrency: the store is only touched from the event loop thread. The batcher gathers before it
hands a batch to the worker thread and scatters after the worker returns, so the worker never sees
the store and no lock is needed. A session with a chunk in flight (``busy``) is never expired, and
closing it defers freeing its slot until the chunk has been scattered.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from service.errors import AlreadyExists, InvalidArgument, ResourceExhausted, shown
from service.session import (
    EndReason,
    Session,
    check_session_id,
    new_incarnation,
    new_session_id,
    parse_incarnation,
    scoped_key,
    session_not_found,
)
from service.signature import StateSpec
from service.snapshots import SessionRecord
from service.state_bank import CPU_DEVICE, Device, StateBank, StateResidency, make_bank

logger = logging.getLogger(__name__)

INITIAL_CAPACITY = 64


class SessionStore:
    """Sessions of one model version, their slots and state arrays."""

    def __init__(
        self,
        *,
        max_sessions: int,
        states: Sequence[StateSpec] = (),
        state_count: int = 0,
        layers: int = 1,
        hidden: int = 1,
        evict_when_full: bool = False,
        clock: Callable[[], float] = time.monotonic,
        on_end: Callable[[Session, EndReason], None] | None = None,
        residency: StateResidency = "host",
        device: Device = CPU_DEVICE,
    ) -> None:
        """``states``: the model's state tensors (:class:`service.signature.StateSpec`); or, for
        tests, ``state_count`` states of [layers, hidden] from zeros."""
        self.state_specs = tuple(states) or tuple(
            StateSpec(f"s{k}", f"n{k}", (layers, hidden)) for k in range(state_count)
        )
        self.max_sessions = max_sessions
        self.evict_when_full = evict_when_full
        self.clock = clock
        self.on_end = on_end
        self.capacity = min(INITIAL_CAPACITY, max_sessions)
        self.state_count = len(self.state_specs)
        fills = [s.stored(s.initial_value()) for s in self.state_specs]
        self.bank: StateBank = make_bank(residency, device, fills=fills, capacity=self.capacity)
        self.sessions: dict[str, Session] = {}
        self._free_slots = list(range(self.capacity - 1, -1, -1))
        self._per_client: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self.sessions)

    @property
    def state_bytes(self) -> int:
        """Bytes held by the state arrays (allocated capacity, not just live sessions)."""
        return self.bank.nbytes

    @property
    def session_state_bytes(self) -> int:
        """Bytes of one session's state."""
        return 4 * sum(s.pre * s.post for s in self.state_specs)

    def _grow(self) -> None:
        new_capacity = min(self.capacity * 2, self.max_sessions)
        self.bank.grow(new_capacity)
        self._free_slots.extend(range(new_capacity - 1, self.capacity - 1, -1))
        logger.debug("session store grew from %d to %d slots", self.capacity, new_capacity)
        self.capacity = new_capacity

    def create(
        self,
        session_id: str | None = None,
        initial_state: Sequence[np.ndarray] | None = None,
        owner: str = "",
        client: str = "",
        incarnation: int | None = None,
    ) -> Session:
        """A new session with zero (or the given) state. Ids are generated when not given, and so
        is the incarnation (a restored session keeps the one it had)."""
        if session_id is None:
            session_id = new_session_id()
        else:
            check_session_id(session_id)
            if scoped_key(session_id, owner) in self.sessions:
                raise AlreadyExists(f"session {shown(session_id)} already exists")
        if initial_state is not None:
            self.check_state(initial_state)
        if len(self.sessions) >= self.max_sessions and not self._evict_longest_idle():
            raise ResourceExhausted(
                f"this model already holds its limit of {self.max_sessions} sessions; close some "
                "or raise RNNSERVE_MAX_SESSIONS"
            )
        if not self._free_slots:
            self._grow()
        slot = self._free_slots.pop()
        stored = None
        if initial_state is not None:
            stored = [s.stored(v) for s, v in zip(self.state_specs, initial_state, strict=True)]
        try:
            self.bank.write(slot, stored)
        except Exception:  # a device error: the slot stays free, no session is made
            self._free_slots.append(slot)
            raise
        now = self.clock()
        session = Session(
            session_id=session_id,
            slot=slot,
            incarnation=new_incarnation() if incarnation is None else incarnation,
            last_used_s=now,
            owner=owner,
            client=client or owner,
        )
        self.sessions[scoped_key(session_id, owner)] = session
        self._per_client[session.client] += 1
        return session

    def count_of(self, client: str) -> int:
        """Live sessions held by ``client``."""
        return self._per_client.get(client, 0)

    def restore(
        self,
        record: SessionRecord,
        state: Sequence[np.ndarray],
        *,
        confirmed: bool,
    ) -> Session:
        """Bring back a session from a snapshot: its state, step count, owner, client, incarnation
        and last reply. ``confirmed``: the snapshot is known to hold the session's latest step
        (a graceful shutdown wrote it); otherwise its next chunk must state the step count it
        expects (:attr:`Session.unconfirmed`)."""
        incarnation = parse_incarnation(record.incarnation)  # None in format 1: drawn anew
        shaped = [np.reshape(v, s.shape) for v, s in zip(state, self.state_specs, strict=True)]
        session = self.create(record.session_id, shaped, record.owner, record.client, incarnation)
        session.steps = session.durable_steps = record.steps
        session.last_output = record.last_output
        session.broken = record.broken
        session.unconfirmed = not confirmed
        return session

    def _evict_longest_idle(self) -> bool:
        """With the evict policy on, end the longest-idle session without a chunk in flight.

        A scan over the sessions, paid only when the store is full, so that the per-chunk path
        keeps no recency order.
        """
        if not self.evict_when_full:
            return False
        idle = [s for s in self.sessions.values() if not s.busy]
        if not idle:
            return False
        self._release(min(idle, key=lambda s: s.last_used_s), EndReason.EVICTED)
        return True

    def check_state(self, state: Sequence[np.ndarray]) -> None:
        """A client's initial state: one tensor per state, each of its declared shape, finite."""
        if len(state) != self.state_count:
            raise InvalidArgument(
                f"initial state needs {self.state_count} tensors, got {len(state)}"
            )
        for k, (tensor, spec) in enumerate(zip(state, self.state_specs, strict=True)):
            if tuple(tensor.shape) != spec.shape:
                raise InvalidArgument(
                    f"initial state tensor {k} ({spec.input}) has shape {list(tensor.shape)}, "
                    f"expected {list(spec.shape)}"
                )
            if not np.isfinite(tensor).all():
                raise InvalidArgument(f"initial state tensor {k} holds NaN or Inf")

    def find(self, session_id: str, owner: str = "") -> Session | None:
        return self.sessions.get(scoped_key(session_id, owner))

    def get(self, session_id: str, owner: str = "") -> Session:
        """The session ``session_id`` of ``owner``; NOT_FOUND whether it never existed, ended, or
        belongs to someone else (the message is the same)."""
        try:
            return self.sessions[scoped_key(session_id, owner)]
        except KeyError:
            raise session_not_found(session_id) from None

    def end(self, session: Session, reason: EndReason) -> None:
        """End ``session``; if a chunk is in flight the slot is freed when it comes back."""
        if session.ended is not None or session.close_when_idle is not None:
            return
        if session.busy:
            session.close_when_idle = reason
            return
        self._release(session, reason)

    def _release(self, session: Session, reason: EndReason) -> None:
        session.ended = reason
        del self.sessions[scoped_key(session.session_id, session.owner)]
        self._free_slots.append(session.slot)
        self._per_client[session.client] -= 1
        if not self._per_client[session.client]:
            del self._per_client[session.client]
        for listener in session.end_listeners or ():
            listener(session, reason)
        if self.on_end is not None:
            self.on_end(session, reason)

    def finish_chunk(self, session: Session) -> None:
        """The batcher is done with ``session``'s chunk: apply a close that waited for it."""
        session.busy = False
        session.last_used_s = self.clock()
        if session.on_idle is not None:
            on_idle, session.on_idle = session.on_idle, None
            on_idle()
        if session.close_when_idle is not None and session.ended is None:
            reason, session.close_when_idle = session.close_when_idle, None
            self._release(session, reason)

    def expire_idle(self, ttl_s: float) -> list[Session]:
        """End sessions idle for longer than ``ttl_s`` (busy ones are not idle)."""
        deadline = self.clock() - ttl_s
        expired = [s for s in self.sessions.values() if not s.busy and s.last_used_s < deadline]
        for session in expired:
            self._release(session, EndReason.IDLE_TIMEOUT)
        return expired

    def end_all(self, reason: EndReason) -> int:
        sessions = list(self.sessions.values())
        for session in sessions:
            if session.busy:
                session.busy = False  # shutdown: no chunk will come back to scatter
            self._release(session, reason)
        return len(sessions)

    def gather(self, slots: np.ndarray, restarted: Sequence[int] = ()) -> list[Any]:
        """The states of ``slots`` as batch arrays [pre, len(slots), post] (copies, in the
        bank's residency); batch rows ``restarted`` start from the initial state (a START)."""
        return self.bank.gather(slots, restarted)

    def scatter(self, slots: np.ndarray, new_states: list[Any]) -> None:
        """Write batch arrays ``new_states`` (one row per slot) into ``slots``."""
        self.bank.scatter(slots, new_states)

    def read_states(self, sessions: Sequence[Session]) -> list[np.ndarray]:
        """Host copies of ``sessions``' states as stored, [pre, len(sessions), post] each."""
        return self.bank.read([s.slot for s in sessions])

    def read_state(self, session: Session) -> list[np.ndarray]:
        """Host copies of ``session``'s state, each of its declared shape."""
        arrays = self.read_states([session])
        return [a[:, 0, :].reshape(s.shape) for a, s in zip(arrays, self.state_specs, strict=True)]

    def restarted(self, session: Session) -> None:
        """``session`` starts over (its state was zeroed for the chunk that restarts it): step 0,
        no output, no durable step, a new incarnation, nothing unconfirmed. (A broken sequence
        was mended when the START was accepted; one broken since stays broken.)"""
        session.steps = session.durable_steps = 0
        session.unconfirmed = False
        session.last_output = None
        session.incarnation = new_incarnation()
