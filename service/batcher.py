"""The batcher of one model version: per-session order, the shared queue, and the batch loop.

A session has at most one chunk queued or computing (``busy``); later chunks of it wait in its
line (:mod:`service.session_lines`) and enter the queue one at a time, so a batch holds at most one
chunk per session and a session's chunks apply in order. A batch starts when ``max_batch_size``
chunks are queued, when every live session has one queued, or when the oldest has waited
``max_queue_delay_s``.

Concurrency:
- All of it runs on the event loop thread but the batch computation, which its
  :class:`BatchRunner` places (the model's worker thread, or the loop for a cheap batch). The loop
  awaits each batch, so one model never runs two batches at once.
- The loop cannot die silently: an exception in a batch fails exactly its unanswered chunks
  (INTERNAL, naming the model), is logged once, and leaves their sessions as they were (outputs are
  checked before any state is written). If the loop task stops anyway, the model is failed: its
  chunks fail with UNAVAILABLE, new ones fail fast, and ``on_failed`` tells the server.
- Every chunk is answered exactly once; one whose caller went away is still applied, so the step
  count stays the truth a reconnecting client resumes from.
- Deadlines: a chunk starts computing only while ``deadline_margin_s`` of its caller's deadline is
  left; a timer answers a chunk that is still queued or waiting at that point (DEADLINE_EXCEEDED,
  not applied) while its caller still listens. A chunk that started computing is applied and
  answered, whenever that is: its reply says so.
- Step checks happen when a chunk is taken into a batch, the one moment its session's step count
  is final (every earlier chunk of the session has finished): a chunk that states the count it
  expects is refused (ABORTED, not applied) if the session is elsewhere, and a session restored
  from a snapshot that may be behind its client (``unconfirmed``) takes only such a chunk.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from service.batch_compute import BatchOutcome, BatchRunner
from service.chunks import PendingChunk, StepResult, step_refusal, too_late
from service.errors import (
    FailedPrecondition,
    InternalError,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    Unconfirmed,
    shown,
)
from service.metrics import Metrics
from service.repository import ModelSpec
from service.runtime import CallCost, ModelRuntime
from service.session import (
    EndReason,
    break_sequence,
    session_not_found,
)
from service.session_lines import SessionLines
from service.session_store import SessionStore

logger = logging.getLogger(__name__)


class Batcher:
    """Queue, session lines and batch loop of one model version. Create it on the running loop."""

    def __init__(
        self,
        *,
        spec: ModelSpec,
        runtime: ModelRuntime,
        store: SessionStore,
        metrics: Metrics,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_chunks: int,
        max_waiting_per_session: int,
        deadline_margin_s: float = 0.0,
        inline_compute_below_s: float = 0.0,
        call_cost: CallCost | None = None,
        batch_buckets: Sequence[int] = (),
        on_applied: Callable[[], None] = lambda: None,
        on_failed: Callable[[Batcher], None] = lambda batcher: None,
    ) -> None:
        self.spec = spec
        self.store = store
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_chunks = max_queue_chunks
        self.deadline_margin_s = deadline_margin_s
        self.failure: str | None = None  # why the model cannot go on (None: it can)
        outputs = spec.tensors.outputs  # named in replies only when there are several
        self._output_names = tuple(o.name for o in outputs) if len(outputs) > 1 else ()
        self._on_applied = on_applied
        self._on_failed = on_failed
        self._queue: collections.deque[PendingChunk] = collections.deque()
        self._lines = SessionLines(max_waiting_per_session)
        self._executing: list[PendingChunk] = []
        self.runner = BatchRunner(
            runtime, spec, inline_compute_below_s, call_cost, store.bank.rows, batch_buckets
        )
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self._closing = False
        labels = {"model": spec.name, "version": spec.version}
        self._queue_wait = metrics.queue_wait.labels(**labels)
        self._compute_time = metrics.compute.labels(**labels)
        self._batch_size = metrics.batch_size.labels(**labels)
        self._steps = metrics.steps.labels(**labels)
        self._deadline_dropped = metrics.deadline_dropped.labels(**labels)
        self._batch_failures = metrics.batch_failures.labels(**labels)
        # Read at scrape time, so batches pay nothing for it; len() of a deque is atomic.
        metrics.queue_depth.labels(**labels).set_function(lambda: len(self._queue))
        self._task = asyncio.create_task(self._run_forever(), name=f"batcher-{spec.label}")
        self._task.add_done_callback(self._loop_stopped)

    # ----- entry -----------------------------------------------------------------------------
    def submit(self, chunk: PendingChunk) -> None:
        """Queue ``chunk``; its future resolves with its :class:`StepResult` or an error.

        A session with a chunk in flight is FAILED_PRECONDITION, unless the chunk is ``ordered``
        (part of a pipelined sequence): then it waits in the session's line (RESOURCE_EXHAUSTED
        once the line is full).
        """
        if self.failure is not None:
            raise Unavailable(f"model {self.spec.label} is not available: {self.failure}")
        if not self._accepting:
            raise Unavailable("the server is shutting down; no new chunks are accepted")
        session = chunk.session
        if chunk.deadline_s is not None:
            left_s = chunk.deadline_s - self.deadline_margin_s - time.perf_counter()
            if left_s <= 0:
                raise too_late(session)
            chunk.deadline_timer = self._loop.call_later(left_s, self._deadline_reached, chunk)
        try:
            if session.busy:
                if not chunk.ordered:
                    raise FailedPrecondition(
                        f"session {shown(session.session_id)} already has a chunk in flight; "
                        "send the next chunk after its reply"
                    )
                self._lines.wait(chunk)
                return
            if len(self._queue) >= self.max_queue_chunks:
                raise ResourceExhausted(
                    f"model {self.spec.label} has {len(self._queue)} chunks waiting; retry later"
                )
        except ServiceError:
            if chunk.deadline_timer is not None:
                chunk.deadline_timer.cancel()
            raise
        self._enqueue(chunk)

    def _enqueue(self, chunk: PendingChunk) -> None:
        session = chunk.session
        session.busy = True
        chunk.enqueued_s = time.perf_counter()
        self._queue.append(chunk)
        self._idle.clear()
        if len(self._queue) == 1 or self._batch_complete():
            self._wakeup.set()

    def _batch_complete(self) -> bool:
        """No reason to wait: the batch is full, or every live session already has a chunk queued
        (so no other chunk can arrive before one of these is answered)."""
        return len(self._queue) >= self.max_batch_size or len(self._queue) >= len(self.store)

    # ----- the loop --------------------------------------------------------------------------
    async def _run_forever(self) -> None:
        while True:
            await self._batch_ready()
            try:
                batch = self._take_batch()  # into self._executing as they are taken
                if batch:
                    await self._execute(batch)
            except Exception as error:  # anything at all: fail this batch, keep the loop
                self._batch_failed(self._executing, error)
            self._executing = []  # kept if the task is cancelled: close() fails those chunks

    async def _batch_ready(self) -> None:
        """Wait until the queue holds a batch worth starting."""
        while not self._queue:
            self._idle.set()  # nothing queued or computing, so no session is busy or waiting
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._batch_complete() or self.max_queue_delay_s <= 0:
            return
        remaining = self.max_queue_delay_s - (time.perf_counter() - self._queue[0].enqueued_s)
        if remaining > 0:
            # A timer that sets the event: asyncio.wait_for would create a task per batch.
            self._wakeup.clear()
            timer = self._loop.call_later(remaining, self._wakeup.set)
            try:
                await self._wakeup.wait()
            finally:
                timer.cancel()

    def _take_batch(self) -> list[PendingChunk]:
        """Up to ``max_batch_size`` chunks in arrival order. A chunk already answered (its
        deadline timer fired) is skipped; one that may not run is answered here, uncomputed, so
        that its session stays where it was (see the module's notes on deadlines and steps)."""
        batch: list[PendingChunk] = []
        self._executing = batch  # a failure while taking fails those taken
        now = time.perf_counter()
        while self._queue and len(batch) < self.max_batch_size:
            chunk = self._queue.popleft()
            if chunk.answered:
                continue
            if chunk.deadline_timer is not None:
                chunk.deadline_timer.cancel()
                if (
                    chunk.deadline_s is not None
                    and chunk.deadline_s - self.deadline_margin_s <= now
                ):
                    self._deadline_dropped.inc()
                    self._finish(chunk, too_late(chunk.session))
                    continue
            if not chunk.start and (
                chunk.expected_steps is not None
                or chunk.incarnation is not None
                or chunk.session.unconfirmed
            ):
                refusal = step_refusal(chunk)
                if refusal is not None:
                    self._finish(chunk, refusal)
                    continue
            self._queue_wait.observe(now - chunk.enqueued_s)
            chunk.computing = True
            batch.append(chunk)
        return batch

    def _deadline_reached(self, chunk: PendingChunk) -> None:
        """Timer: ``chunk`` cannot start in time. Answer it now, unapplied, unless it computes."""
        if chunk.answered or chunk.computing:
            return
        self._deadline_dropped.inc()
        error = too_late(chunk.session)
        if chunk.enqueued_s:  # queued: out of the queue (a rare scan), answered now
            self._queue.remove(chunk)
            self._finish(chunk, error)
        else:  # waiting behind its session's chunk in flight (a pipelined sequence)
            behind = break_sequence(chunk.session, error.message, mark=False)
            if not self._lines.fail_from(chunk, error, behind):  # nothing re-anchors it
                break_sequence(chunk.session, error.message)

    async def _execute(self, batch: list[PendingChunk]) -> None:
        """Gather the batch's states, compute, check, then write states and answer."""
        self._executing = batch
        slots = np.fromiter((c.session.slot for c in batch), dtype=np.intp, count=len(batch))
        restarting = [row for row, chunk in enumerate(batch) if chunk.start]  # from zero state
        states = self.store.gather(slots, restarting)
        outcome = await self.runner.run([c.x for c in batch], states)
        for rows, seconds in outcome.calls:
            self._compute_time.observe(seconds)
            self._batch_size.observe(rows)
        self._apply(batch, slots, outcome)

    def _apply(self, batch: list[PendingChunk], slots: np.ndarray, outcome: BatchOutcome) -> None:
        """Write the finished chunks' states, then answer every chunk (loop thread)."""
        finished = outcome.finished
        try:
            if all(finished):
                self.store.scatter(slots, outcome.states)
            elif any(finished):
                rows = np.flatnonzero(finished)
                self.store.scatter(slots[rows], self.store.bank.rows.take(outcome.states, rows))
        except Exception as error:  # a device error part-way through writing
            self._states_lost(batch, outcome, error)
            return
        applied_steps = 0
        now_s = time.perf_counter()
        for chunk, ok, output in zip(batch, finished, outcome.outputs, strict=True):
            if not ok:
                self._finish(chunk, outcome.error or InternalError("chunk not computed"))
                continue
            steps = chunk.x.shape[0]
            applied_steps += steps
            session = chunk.session
            if chunk.start:
                self.store.restarted(session)
            session.steps += steps
            session.last_output = output
            chunk.latency.observe(now_s - chunk.received_s)
            self._finish(chunk, StepResult(session.session_id, output, session.steps, chunk.end,
                                           session.durable_steps, session.incarnation,
                                           self.spec.version, self._named(output)))  # fmt: skip
        self._steps.inc(applied_steps)
        if applied_steps:
            self._on_applied()

    def _named(self, output: np.ndarray) -> tuple[tuple[str, np.ndarray], ...]:
        """A model of several outputs: each of a chunk's, by name (none for one output)."""
        if not self._output_names:
            return ()
        parts = self.spec.tensors.split_outputs(output)
        return tuple(zip(self._output_names, parts, strict=True))

    def _states_lost(
        self, batch: list[PendingChunk], outcome: BatchOutcome, error: Exception
    ) -> None:
        """Writing the new states failed part-way (on a device, state tensors are written one
        after another): a finished chunk's session may now hold part old, part new state, so it
        is ended (reason failed) and its chunk answered INTERNAL saying so, never left to go on
        from a state nobody can vouch for. Chunks the model did not finish were not written."""
        self._batch_failures.inc()
        logger.error(
            "model %s: writing the states of a batch of %d failed (%s: %s); its sessions end",
            self.spec.label, len(batch), type(error).__name__, error, exc_info=error,
        )  # fmt: skip
        for chunk, ok in zip(batch, outcome.finished, strict=True):
            if not ok:
                self._finish(chunk, outcome.error or InternalError("chunk not computed"))
                continue
            self.store.end(chunk.session, EndReason.FAILED)  # freed once this chunk is done
            self._finish(chunk, InternalError(
                f"model {self.spec.label} could not store the new state of session "
                f"{shown(chunk.session.session_id)} ({type(error).__name__}); the session is "
                "ended: open it again and replay its inputs from step 0"
            ))  # fmt: skip

    def _batch_failed(self, batch: list[PendingChunk], error: Exception) -> None:
        """A batch broke outside the model call: fail the chunks not yet answered."""
        self._batch_failures.inc()
        logger.error(
            "model %s: a batch of %d chunk(s) failed (%s: %s); their sessions keep their state",
            self.spec.label, len(batch), type(error).__name__, error, exc_info=error,
        )  # fmt: skip
        failure = InternalError(f"model {self.spec.label} failed to run a batch")
        for chunk in batch:
            if not chunk.answered:
                self._finish(chunk, failure)

    # ----- a chunk's end ---------------------------------------------------------------------
    def _finish(self, chunk: PendingChunk, result: StepResult | ServiceError) -> None:
        """Answer ``chunk``, then hand its session's turn on. Never raises: what goes wrong after
        the answer is logged, so that no other chunk of the batch is left unanswered."""
        chunk.answered = True
        if chunk.deadline_timer is not None:
            chunk.deadline_timer.cancel()
        if not chunk.future.done():  # a caller that went away has cancelled it
            if isinstance(result, StepResult):
                chunk.future.set_result(result)
            else:
                chunk.future.set_exception(result.with_session_steps(chunk.session.steps))
        try:
            self._pass_turn(chunk, result)
        except Exception:
            logger.exception("model %s: ending a chunk's turn failed", self.spec.label)

    def _pass_turn(self, chunk: PendingChunk, result: StepResult | ServiceError) -> None:
        """To the next chunk in the session's line, or back to the store (which then applies a
        close that waited for the chunk). A failed chunk of a pipelined sequence breaks it: the
        chunks sent behind it fail too, up to one that re-anchors it (a START or a stated step
        count), since they would apply to a history that lacks it; with no such chunk waiting,
        the requests still to come fail too. (A session restored unconfirmed refuses plain chunks
        by itself: its refusals break nothing.)"""
        session = chunk.session
        applied = isinstance(result, StepResult)
        if (
            isinstance(result, ServiceError)
            and chunk.ordered
            and not isinstance(result, Unconfirmed)
        ):
            behind = break_sequence(session, result.message, mark=False)
            if not self._lines.fail_until_start(session, behind):
                break_sequence(session, result.message)
        following = self._lines.next_after(chunk, applied_end=chunk.end and applied)
        if following is not None:
            self._enqueue(following)  # the session stays busy
            return
        self.store.finish_chunk(session)
        if (chunk.end and applied) or (chunk.opens and not applied and not session.steps):
            self.store.end(session, EndReason.CLOSED)  # ended, or a START that opened nothing
        if self._lines.waiting(session):  # behind a close or an END: the session is gone
            self._lines.fail(session, session_not_found(session.session_id))

    # ----- failure and shutdown ----------------------------------------------------------------
    def _loop_stopped(self, task: asyncio.Task[None]) -> None:
        """Done callback of the loop task: only :meth:`close` may stop it."""
        if self._closing:
            return
        cause = "cancelled" if task.cancelled() else repr(task.exception())
        self.failure = f"its batch loop stopped ({cause})"
        logger.error("model %s cannot go on: %s", self.spec.label, self.failure)
        self._fail_everything(Unavailable(f"model {self.spec.label} is not available"))
        self._on_failed(self)

    def _fail_everything(self, error: ServiceError) -> None:
        pending = [*self._executing, *self._queue]
        self._queue.clear()
        self._lines.fail_all(error)
        for chunk in pending:
            if not chunk.answered:
                self._finish(chunk, error)
        self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting chunks and wait for queued and waiting ones to finish; False if time
        ran out."""
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Stop the loop, fail what is still queued or waiting, and stop the worker thread."""
        self._accepting = False
        self._closing = True
        self._task.cancel()
        await asyncio.wait([self._task])  # never raises: a failure was reported as it stopped
        self._fail_everything(Unavailable("the server shut down before this chunk ran"))
        self.runner.close()
