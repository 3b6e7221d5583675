"""Chunks waiting for their session's turn: per session, in arrival order, with a bound.

A session has at most one chunk queued or computing; the batcher parks the later ones here and
takes the next when the one before finishes. Loop thread only, like the batcher.
"""

from __future__ import annotations

import collections

from service.chunks import PendingChunk
from service.errors import ResourceExhausted, ServiceError, shown
from service.session import Session


class SessionLines:
    """The waiting chunks of every busy session of one model."""

    def __init__(self, max_per_session: int) -> None:
        self.max_per_session = max_per_session
        self._lines: dict[Session, collections.deque[PendingChunk]] = {}

    def wait(self, chunk: PendingChunk) -> None:
        """Park ``chunk`` behind its session's chunk in flight (RESOURCE_EXHAUSTED when full)."""
        waiting = len(self._lines.get(chunk.session, ()))
        if waiting >= self.max_per_session:
            raise ResourceExhausted(
                f"session {shown(chunk.session.session_id)} already has {waiting} chunks waiting; "
                "wait for replies before sending more"
            )
        self._lines.setdefault(chunk.session, collections.deque()).append(chunk)

    def next_after(self, finished: PendingChunk, applied_end: bool) -> PendingChunk | None:
        """The chunk that takes the session's turn after ``finished``, if one may.

        None when nothing waits, when the session is closing, or when ``finished`` ended the
        sequence (``applied_end``) and the next chunk does not start it again (Triton's START):
        those are the caller's to fail with :meth:`fail`.
        """
        session = finished.session
        line = self._lines.get(session)
        if not line or session.close_when_idle is not None or (applied_end and not line[0].start):
            return None
        chunk = line.popleft()
        if not line:
            del self._lines[session]
        return chunk

    def waiting(self, session: Session) -> bool:
        return session in self._lines

    def fail_until_start(self, session: Session, error: ServiceError) -> bool:
        """Fail the chunks waiting for ``session`` up to the first that restarts it (START) or
        states the step count it expects (:attr:`PendingChunk.anchored`). True if such a chunk
        waits: the requests sent after it follow it, not the failure."""
        line = self._lines.get(session)
        while line and not line[0].anchored:
            fail_chunk(line.popleft(), error)
        if line is not None and not line:
            del self._lines[session]
        return bool(line)

    def fail_from(self, chunk: PendingChunk, error: ServiceError, behind: ServiceError) -> bool:
        """Fail waiting ``chunk`` with ``error``, and those behind it up to the next anchored one
        (START, or a stated step count) with ``behind``: they would apply to a history that lacks
        it. True if an anchored one waits behind them (see :meth:`fail_until_start`)."""
        line = self._lines.get(chunk.session)
        if not line or chunk not in line:
            return True
        chunks = list(line)
        at = chunks.index(chunk)
        restart = next((i for i in range(at + 1, len(chunks)) if chunks[i].anchored), len(chunks))
        fail_chunk(chunk, error)
        for waiting in chunks[at + 1 : restart]:
            fail_chunk(waiting, behind)
        rest = chunks[:at] + chunks[restart:]
        if rest:
            self._lines[chunk.session] = collections.deque(rest)
        else:
            del self._lines[chunk.session]
        return restart < len(chunks)

    def fail(self, session: Session, error: ServiceError) -> None:
        """Fail every chunk waiting for ``session``."""
        for waiting in self._lines.pop(session, ()):
            fail_chunk(waiting, error)

    def fail_all(self, error: ServiceError) -> None:
        for session in list(self._lines):
            self.fail(session, error)


def fail_chunk(chunk: PendingChunk, error: ServiceError) -> None:
    """Answer a waiting chunk with ``error`` (its future may have been cancelled by its caller)."""
    if chunk.deadline_timer is not None:
        chunk.deadline_timer.cancel()
    if not chunk.future.done():
        chunk.future.set_exception(error.with_session_steps(chunk.session.steps))
    chunk.answered = True
