"""A session, as the core holds it and as the outside sees it: ids, owners, end reasons."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np

from service.errors import FailedPrecondition, InvalidArgument, NotFound, OtherIncarnation, shown

MAX_ID_BYTES = 128


class EndReason(Enum):
    CLOSED = "closed"
    IDLE_TIMEOUT = "idle_timeout"
    EVICTED = "evicted"
    SHUTDOWN = "shutdown"
    FAILED = "failed"  # its state could not be stored (a device error): never continued
    MOVED = "moved"  # another replica of the cluster owns it now (it lives on there)


@dataclass(eq=False, slots=True)
class Session:
    """One client's recurrent state handle. ``steps`` counts the steps applied so far.

    Slots, and no listener list until one is added: 100,000 idle sessions take about 10 MB less
    of the Python heap than with a per-instance dict and an empty list each (docs/PERFORMANCE.md).
    """

    session_id: str
    slot: int
    # Random, drawn when opened and again at each restart (START): an id closed and opened again,
    # or a restarted sequence, is another incarnation; a snapshot of an older one is not durable.
    incarnation: int
    last_used_s: float
    steps: int = 0
    owner: str = ""  # the identity that created it; others are told it does not exist
    client: str = ""  # what per-client session limits count (the owner, or the peer address)
    durable_steps: int = 0  # steps covered by the latest snapshot written (0: none yet)
    last_output: np.ndarray | None = None  # reply to the last chunk, kept for a client's resume
    busy: bool = False
    ended: EndReason | None = None
    close_when_idle: EndReason | None = None
    broken: str | None = None  # why a pipelined sequence cannot go on until it restarts
    # Restored from a snapshot that may be older than the last reply its client got (the server
    # stopped without a final snapshot): a chunk must state the step count it expects first.
    unconfirmed: bool = False
    end_listeners: list[Callable[[Session, EndReason], None]] | None = None
    # In a cluster (service.cluster): the fencing epoch this replica owns the session under, the
    # incarnation its last landed write held (with ``durable_steps``: what the store has), and
    # whether it is being handed over (then it takes no new chunks). ``on_idle``: called once
    # when its chunks in flight and waiting are all done.
    epoch: int = 0
    written_incarnation: int = 0
    moving: bool = False
    on_idle: Callable[[], None] | None = None

    def add_end_listener(self, listener: Callable[[Session, EndReason], None]) -> None:
        """Call ``listener(session, reason)`` when this session ends."""
        if self.end_listeners is None:
            self.end_listeners = []
        self.end_listeners.append(listener)

    def remove_end_listener(self, listener: Callable[[Session, EndReason], None]) -> None:
        if self.end_listeners and listener in self.end_listeners:
            self.end_listeners.remove(listener)


def scoped_key(session_id: str, owner: str) -> str:
    """Where a session lives in its store: ids are scoped to their owner, so two identities may
    use the same id without either learning of the other."""
    return f"{owner}\0{session_id}" if owner else session_id


def session_not_found(session_id: str) -> NotFound:
    """The one NOT_FOUND for a session, whether it never existed, ended, or is someone else's."""
    return NotFound(f"session {shown(session_id)} not found (never opened, closed or expired)")


def other_incarnation(session_id: str) -> OtherIncarnation:
    """The one error for an incarnation that is not the session's."""
    return OtherIncarnation(
        f"session {shown(session_id)} is not the one you had: it was closed and opened again "
        "under the same id, or restarted, since (another incarnation)"
    )


def break_sequence(session: Session, reason: str, *, mark: bool = True) -> FailedPrecondition:
    """The error of the requests sent behind a failed request of a pipelined sequence (KServe):
    they would apply to a history that lacks it. ``mark``: the sequence stays broken for the
    requests still to come, until one that fixes the history itself (a START, or a stated step
    count) is accepted; the first reason is kept."""
    if mark and session.broken is None:
        session.broken = reason or "unknown error"
    return broken_sequence(session.session_id, session.broken or reason)


def broken_sequence(session_id: str, reason: str) -> FailedPrecondition:
    """The error of a request of sequence ``session_id`` sent behind one that failed with
    ``reason`` (see :func:`break_sequence`)."""
    return FailedPrecondition(
        f"sequence {shown(session_id)} cannot go on: an earlier request of it failed "
        f"({reason}); send START to begin it again, or state sequence_expected_steps to go on "
        "from where it is"
    )


def new_session_id() -> str:
    """128 random bits, hex: unguessable and safe in logs and URLs."""
    return secrets.token_hex(16)


def new_incarnation() -> int:
    """63 random bits: tell apart two sessions opened under one id one after the other (an int,
    not text: 100,000 idle sessions hold about 4 MB less)."""
    return secrets.randbits(63)


def incarnation_text(incarnation: int) -> str:
    """An incarnation as clients and snapshots see it: 16 hex digits."""
    return f"{incarnation:016x}"


def parse_incarnation(text: str) -> int | None:
    """The incarnation ``text`` names (None: not one)."""
    if len(text) != 16:
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None


def check_session_id(session_id: str) -> None:
    if not session_id:
        raise InvalidArgument("session id must not be empty")
    if len(session_id.encode()) > MAX_ID_BYTES:
        raise InvalidArgument(f"session id is longer than {MAX_ID_BYTES} bytes")
    if not session_id.isprintable():
        raise InvalidArgument("session id must be printable text")


@dataclass(frozen=True)
class Caller:
    """Who sends a request. ``owner`` is the authenticated identity (bearer token or client
    certificate; "" without authentication): sessions belong to it, and another owner is told a
    session does not exist. ``client`` is what per-client limits count: the owner, or the peer's
    address for anonymous callers."""

    owner: str = ""
    client: str = ""


ANONYMOUS = Caller()


@dataclass(frozen=True)
class SessionView:
    session_id: str
    model: str
    version: str
    steps: int
    idle_s: float
    state: list[np.ndarray] | None = None
    durable_steps: int = 0
    last_output: np.ndarray | None = None  # the reply to the session's last chunk
    incarnation: str = ""  # incarnation_text of Session.incarnation


@dataclass(frozen=True)
class SessionEnd:
    session_id: str
    reason: EndReason
    steps: int
