"""Cross-session batching for one model version.

Chunks from many sessions wait in one queue. A batch starts when ``max_batch_size`` chunks wait,
when every live session of the model has a chunk waiting (nothing else can arrive), or when the
oldest has waited ``max_queue_delay_s``; it holds at most one chunk per session, because a
session never has more than one chunk in flight (the engine refuses a second one). Chunks of any
lengths share the batch's model calls exactly, with neither padding nor masking (see
:meth:`BatchScheduler._compute`).

Concurrency:
- Everything here but :meth:`_compute` runs on the event loop thread, including the gather and the
  scatter of session state, so the session store needs no lock.
- :meth:`_compute` runs in a single worker thread per model (onnxruntime releases the GIL), so the
  event loop keeps serving I/O while a batch computes, and one model never runs two batches at once.
  While a batch computes, the next one fills up: under load, batches form without any delay.
- Except when the batch is cheap: when the model's :class:`CallCost` (measured as it loaded)
  puts the batch under ``inline_compute_below_s``, :meth:`_compute` runs on the event loop itself.
  Handing a 50 µs call to a thread and waking the loop again costs more CPU than the call, and on
  a small machine that CPU is taken from the gRPC threads (measured in docs/PERFORMANCE.md). The
  choice is made per batch from its rows and steps, never from measured call times: those include
  waiting for the GIL, which the worker thread does most, so a feedback from them could keep a
  fast model in the thread for good. The batch loop awaits :meth:`_execute` either way, so one
  model still never runs two batches at once.
- Every chunk's future is resolved exactly once, with its output rows or with the error of its own
  model call; a chunk whose caller went away is still applied (its session's state and step count
  move on) so that a client that reconnects can resume from the step count.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.errors import DeadlineExceeded, InternalError, ResourceExhausted, Unavailable
from service.metrics import Metrics
from service.repository import ModelSpec
from service.runtime import CallCost, ModelRuntime
from service.session_store import Session, SessionStore

logger = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class PendingChunk:
    session: Session
    x: np.ndarray  # [steps, features] float32
    future: asyncio.Future[np.ndarray]
    enqueued_s: float
    deadline_s: float | None = None  # perf_counter instant after which it is not computed


@dataclass(eq=False, slots=True)
class BatchOutcome:
    """What the worker thread hands back: per-chunk outputs, the batch's final states, and which
    chunks finished (a failed model call leaves the chunks it held unfinished, with ``error``)."""

    outputs: list[np.ndarray]
    states: list[np.ndarray]
    finished: np.ndarray
    error: Exception | None


class BatchScheduler:
    """The queue and batch loop of one model version. Create and start it on the running loop."""

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
        inline_compute_below_s: float = 0.0,
        call_cost: CallCost | None = None,
    ) -> None:
        self.spec = spec
        self.runtime = runtime
        self.store = store
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_chunks = max_queue_chunks
        self.inline_compute_below_s = inline_compute_below_s
        self.call_cost = call_cost  # None: every batch goes to the worker thread
        self._executing = False  # the batch task is inside _execute (maybe awaiting the worker)
        self._all_finished = np.ones(max_batch_size, bool)
        self._all_finished.flags.writeable = False
        self._queue: deque[PendingChunk] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{spec.name}")
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        labels = {"model": spec.name, "version": spec.version}
        self._queue_wait = metrics.queue_wait.labels(**labels)
        self._compute_time = metrics.compute.labels(**labels)
        self._batch_size = metrics.batch_size.labels(**labels)
        self._steps = metrics.steps.labels(**labels)
        # Read at scrape time, so batches pay nothing for it; len() of a deque is atomic.
        metrics.queue_depth.labels(**labels).set_function(lambda: len(self._queue))
        self._deadline_dropped = metrics.deadline_dropped.labels(**labels)
        self._task = asyncio.create_task(self._run_forever(), name=f"batcher-{spec.label}")

    def submit(
        self, session: Session, x: np.ndarray, deadline_s: float | None = None
    ) -> asyncio.Future[np.ndarray]:
        """Queue one chunk of ``session``; the future resolves to its output rows [steps, outputs].

        The caller has checked the chunk and that the session has nothing in flight; this marks the
        session busy until the chunk has been applied.
        """
        if not self._accepting:
            raise Unavailable("the server is shutting down; no new chunks are accepted")
        if len(self._queue) >= self.max_queue_chunks:
            raise ResourceExhausted(
                f"model {self.spec.label} has {len(self._queue)} chunks waiting; retry later"
            )
        future: asyncio.Future[np.ndarray] = self._loop.create_future()
        session.busy = True
        self._queue.append(PendingChunk(session, x, future, time.perf_counter(), deadline_s))
        complete = self._batch_complete()
        if complete and not self._executing and self._next_batch_runs_inline():
            batch = self._take_batch()
            if batch:
                self._execute_now(batch)
            if not self._queue:
                return future
        self._idle.clear()
        if complete or len(self._queue) == 1:
            self._wakeup.set()
        return future

    def _batch_complete(self) -> bool:
        """No reason to wait: the batch is full, or every live session already has a chunk queued
        (so no other chunk can arrive before one of these is answered)."""
        return len(self._queue) >= self.max_batch_size or len(self._queue) >= len(self.store)

    async def _run_forever(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self._batch_complete() and self.max_queue_delay_s > 0:
                waited = time.perf_counter() - self._queue[0].enqueued_s
                remaining = self.max_queue_delay_s - waited
                if remaining > 0:
                    # A timer that sets the event: asyncio.wait_for would create a task per batch.
                    self._wakeup.clear()
                    timer = self._loop.call_later(remaining, self._wakeup.set)
                    try:
                        await self._wakeup.wait()
                    finally:
                        timer.cancel()
            batch = self._take_batch()
            if batch:
                await self._execute(batch)

    def _take_batch(self) -> list[PendingChunk]:
        """Up to ``max_batch_size`` chunks in arrival order; chunks whose caller's deadline has
        passed are failed here, uncomputed, so that the session stays where it was."""
        batch: list[PendingChunk] = []
        now = time.perf_counter()
        while self._queue and len(batch) < self.max_batch_size:
            chunk = self._queue.popleft()
            if chunk.deadline_s is not None and chunk.deadline_s <= now:
                self._deadline_dropped.inc()
                self._fail([chunk], DeadlineExceeded("the deadline passed before the chunk ran"))
                continue
            batch.append(chunk)
        return batch

    def _runs_inline(self, rows: int, steps: int) -> bool:
        """Whether a batch of ``rows`` chunks of at most ``steps`` steps runs on the event loop."""
        cost = self.call_cost
        return cost is not None and cost.estimate_s(rows, steps) < self.inline_compute_below_s

    def _next_batch_runs_inline(self) -> bool:
        chunks = itertools.islice(self._queue, self.max_batch_size)
        rows, steps = min(len(self._queue), self.max_batch_size), max(c.x.shape[0] for c in chunks)
        return self._runs_inline(rows, steps)

    def _gather(self, batch: list[PendingChunk]) -> tuple[np.ndarray, list[np.ndarray]]:
        started = time.perf_counter()
        for chunk in batch:
            self._queue_wait.observe(started - chunk.enqueued_s)
        slots = np.array([c.session.slot for c in batch], dtype=np.intp)
        return slots, self.store.gather(slots)

    async def _execute(self, batch: list[PendingChunk]) -> None:
        self._executing = True
        try:
            slots, states = self._gather(batch)
            inputs = [c.x for c in batch]
            try:
                if self._runs_inline(len(batch), max(x.shape[0] for x in inputs)):
                    outcome = self._compute(inputs, states, inline=True)
                else:
                    outcome = await self._loop.run_in_executor(
                        self._executor, self._compute, inputs, states
                    )
            except BaseException as exc:  # cancelled during shutdown, or the executor is gone
                self._fail(
                    batch, exc if isinstance(exc, Exception) else Unavailable("shutting down")
                )
                raise
            self._apply(batch, slots, outcome)
        finally:
            self._executing = False

    def _execute_now(self, batch: list[PendingChunk]) -> None:
        """The fast path of :meth:`submit`: compute a complete, cheap batch right here.

        It never awaits, so nothing else runs on the loop meanwhile and the one-batch-at-a-time
        rule holds; the futures are resolved before ``submit`` returns, which saves the callers
        two trips through the event loop (waking the batch task, and being woken by it).
        """
        slots, states = self._gather(batch)
        self._apply(batch, slots, self._compute([c.x for c in batch], states, inline=True))

    def _apply(self, batch: list[PendingChunk], slots: np.ndarray, outcome: BatchOutcome) -> None:
        """Scatter the new states and resolve every chunk's future (on the loop thread)."""
        finished = outcome.finished
        if outcome.error is None:
            self.store.scatter(slots, outcome.states)
        elif finished.any():
            self.store.scatter(slots[finished], [s[:, finished, :] for s in outcome.states])
        if not outcome.outputs:  # the batch's only model call failed
            self._fail(batch, outcome.error or InternalError("batch not computed"))
            return
        applied_steps = 0
        now_s = self.store.clock()
        for chunk, ok, output in zip(batch, finished.tolist(), outcome.outputs, strict=True):
            if not ok:
                self._fail([chunk], outcome.error or InternalError("chunk not computed"))
                continue
            steps = chunk.x.shape[0]
            applied_steps += steps
            session = chunk.session
            session.steps += steps
            session.last_output = output
            self.store.finish_chunk(session, now_s)
            if not chunk.future.done():
                chunk.future.set_result(output)
        self._steps.inc(applied_steps)

    def _compute(
        self, inputs: list[np.ndarray], states: list[np.ndarray], inline: bool = False
    ) -> BatchOutcome:
        """Worker thread: run a batch of chunks of any lengths exactly, touching no session state.

        The batch runs in step-aligned segments: every chunk takes part in the first call, which
        covers as many steps as the shortest chunk; the chunks with steps left continue from the
        states they reached, and so on. Chaining states this way is exactly the same computation as
        one call over the whole chunk, so no padding or masking is involved, and when all chunks
        have the same length (the common case) the batch is a single call.
        """
        steps = inputs[0].shape[0]
        if all(x.shape[0] == steps for x in inputs):
            return self._compute_uniform(inputs, states, inline)
        lengths = np.fromiter((x.shape[0] for x in inputs), dtype=np.intp, count=len(inputs))
        pieces: list[list[np.ndarray]] = [[] for _ in inputs]
        finished = np.zeros(len(inputs), dtype=bool)
        error: Exception | None = None
        done_steps = 0
        for end in np.unique(lengths):
            active = np.flatnonzero(lengths >= end)
            everyone = len(active) == len(inputs)
            if len(active) == 1:
                x = inputs[active[0]][None, done_steps:end]
            else:
                x = np.stack([inputs[i][done_steps:end] for i in active])
            segment_states = states if everyone else [s[:, active, :] for s in states]
            try:
                y, new_states = self._call_model(x, segment_states, inline)
            except InternalError as failure:
                error = failure
                break
            if everyone:
                states = list(new_states)
            else:
                for state, new in zip(states, new_states, strict=True):
                    state[:, active, :] = new
            for row, i in enumerate(active):
                pieces[i].append(y[row])
            finished[lengths == end] = True
            done_steps = int(end)
        outputs = [
            p[0] if len(p) == 1 else np.concatenate(p) if p else np.empty((0,)) for p in pieces
        ]
        return BatchOutcome(outputs=outputs, states=states, finished=finished, error=error)

    def _compute_uniform(
        self, inputs: list[np.ndarray], states: list[np.ndarray], inline: bool
    ) -> BatchOutcome:
        """The common case of :meth:`_compute`: chunks of one length, so one model call."""
        first = inputs[0]
        if len(inputs) == 1:
            x = first[None]
        else:  # concatenating rows and reshaping is several times cheaper than np.stack
            x = np.concatenate(inputs).reshape(len(inputs), *first.shape)
        try:
            y, new_states = self._call_model(x, states, inline)
        except InternalError as error:
            return BatchOutcome([], states, np.zeros(len(inputs), bool), error)
        return BatchOutcome(list(y), new_states, self._all_finished[: len(inputs)], None)

    def _call_model(
        self, x: np.ndarray, states: list[np.ndarray], inline: bool
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One onnxruntime call, timed and counted; a failure is logged and becomes InternalError.
        An inline call (on the event loop) uses the runtime's single-thread session."""
        started = time.perf_counter()
        try:
            y, new_states = self.runtime.run(x, states, single_thread=inline)
        except Exception as exc:
            logger.exception("model %s failed on a batch of %d", self.spec.label, x.shape[0])
            raise InternalError(f"model {self.spec.label} failed: {type(exc).__name__}") from exc
        finally:
            self._compute_time.observe(time.perf_counter() - started)
            self._batch_size.observe(x.shape[0])
        return y, new_states

    def _fail(self, chunks: list[PendingChunk], error: Exception) -> None:
        for chunk in chunks:
            self.store.finish_chunk(chunk.session)
            if not chunk.future.done():
                chunk.future.set_exception(error)

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting chunks and wait for queued ones to finish; False if time ran out."""
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Cancel the batch loop, fail what is still queued, and stop the worker thread."""
        self._accepting = False
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        leftover = list(self._queue)
        self._queue.clear()
        self._fail(leftover, Unavailable("the server shut down before this chunk ran"))
        self._executor.shutdown(wait=True)
