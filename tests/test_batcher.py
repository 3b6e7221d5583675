"""The batcher with a fake model: batch formation, per-session order, lengths, errors, a loop that
cannot die. No sleeps."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.batcher import Batcher
from service.chunks import PendingChunk, StepResult
from service.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unconfirmed,
)
from service.metrics import Metrics
from service.repository import ModelSpec
from service.runtime import CallCost
from service.session import EndReason, Session, break_sequence
from service.session_store import SessionStore


class GatedFakeModel:
    """y = x + h (per step, cumulative); h' = h + sum over steps. Blocks until released if gated."""

    def __init__(self, gated: bool = False) -> None:
        self.calls: list[tuple[int, int]] = []  # (batch, steps)
        self.threads: list[int] = []  # which thread ran each call
        self.single_thread: list[bool] = []  # which session each call asked for
        self.entered = threading.Event()
        self.release = threading.Event()
        if not gated:
            self.release.set()
        self.fail_on_value: float | None = None

    def run(
        self, x: np.ndarray, states: Sequence[np.ndarray], single_thread: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        self.calls.append((x.shape[0], x.shape[1]))
        self.threads.append(threading.get_ident())
        self.single_thread.append(single_thread)
        self.entered.set()
        self.release.wait(timeout=30)
        if self.fail_on_value is not None and (x == self.fail_on_value).any():
            raise RuntimeError("boom")
        h = states[0][0, :, :1]  # [batch, 1]
        cumulative = np.cumsum(x[..., :1], axis=1) + h[:, None, :]
        new_h = states[0] + x[..., :1].sum(axis=1)[None, :, :]
        return cumulative.astype(np.float32), [new_h.astype(np.float32)]


def spec() -> ModelSpec:
    return ModelSpec(
        name="fake", version="1", directory=Path("."), cell="gru", num_layers=1, hidden_size=1,
        input_size=1, output_size=1, sha256="", metadata={},
    )  # fmt: skip


def make(
    model: GatedFakeModel, store: SessionStore | None = None, **kw: object
) -> tuple[Batcher, SessionStore, Metrics]:
    if store is None:
        store = SessionStore(state_count=1, layers=1, hidden=1, max_sessions=100)
    metrics = Metrics()
    options = {"max_batch_size": 8, "max_queue_delay_s": 0.0, "max_queue_chunks": 100,
               "max_waiting_per_session": 4, **kw}  # fmt: skip
    batcher = Batcher(spec=spec(), runtime=model, store=store, metrics=metrics, **options)  # type: ignore[arg-type]
    return batcher, store, metrics


def submit_chunk(
    batcher: Batcher, session: Session, x: np.ndarray, deadline_s: float | None = None, *,
    wait: bool = False, start: bool = False, end: bool = False, expected_steps: int | None = None,
    incarnation: int | None = None,
) -> asyncio.Future[StepResult]:  # fmt: skip
    """Hand one chunk to the batcher as the engine does; the future of its result."""
    future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
    latency = Metrics().request_latency.labels("fake", "1", "test")
    pending = PendingChunk(session, x, future, time.perf_counter(), latency, deadline_s, start, end,
                           ordered=wait, expected_steps=expected_steps,
                           incarnation=incarnation)  # fmt: skip
    batcher.submit(pending)
    return future


def submit(
    batcher: Batcher, session: Session, x: np.ndarray, deadline_s: float | None = None
) -> asyncio.Future[np.ndarray]:
    """:func:`submit_chunk`, resolving to the chunk's output rows."""
    result = submit_chunk(batcher, session, x, deadline_s)
    output: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()

    def done(f: asyncio.Future[StepResult]) -> None:
        error = f.exception()
        if error is not None:
            output.set_exception(error)
        else:
            output.set_result(f.result().output)

    result.add_done_callback(done)
    return output


def chunk(*values: float) -> np.ndarray:
    return np.array(values, np.float32)[:, None]


async def batch_in_flight(
    batcher: Batcher, model: GatedFakeModel, session: Session
) -> asyncio.Future[np.ndarray]:
    """Submit ``session``'s chunk [1] to the gated ``model`` and wait until its call has started,
    so that what is submitted next queues behind it; release the model to finish it."""
    first = submit(batcher, session, chunk(1))
    await asyncio.to_thread(model.entered.wait, 30)
    return first


async def test_chunks_queued_while_a_batch_computes_form_the_next_batch() -> None:
    model = GatedFakeModel(gated=True)
    batcher, store, metrics = make(model)
    sessions = [store.create(str(i)) for i in range(4)]
    first = await batch_in_flight(batcher, model, sessions[0])
    rest = [submit(batcher, s, chunk(i + 2)) for i, s in enumerate(sessions[1:])]
    depth = {"model": "fake", "version": "1"}
    assert metrics.registry.get_sample_value("rnnserve_queue_depth", depth) == 3
    model.release.set()
    outputs = await asyncio.gather(first, *rest)
    assert model.calls == [(1, 1), (3, 1)]
    assert [float(o[0, 0]) for o in outputs] == [1.0, 2.0, 3.0, 4.0]
    assert all(s.steps == 1 and not s.busy for s in sessions)
    assert metrics.registry.get_sample_value("rnnserve_queue_depth", depth) == 0
    await batcher.close()


async def test_batch_is_capped_at_max_batch_size() -> None:
    model = GatedFakeModel(gated=True)
    batcher, store, _ = make(model, max_batch_size=2)
    sessions = [store.create(str(i)) for i in range(5)]
    first = await batch_in_flight(batcher, model, sessions[0])
    rest = [submit(batcher, s, chunk(1)) for s in sessions[1:]]
    model.release.set()
    await asyncio.gather(first, *rest)
    assert [b for b, _ in model.calls] == [1, 2, 2]
    await batcher.close()


async def test_different_lengths_share_step_aligned_calls() -> None:
    model = GatedFakeModel(gated=True)
    batcher, store, _ = make(model)
    a, b, c, d = (store.create(n) for n in "abcd")
    first = await batch_in_flight(batcher, model, a)
    fb = submit(batcher, b, chunk(1, 2))
    fc = submit(batcher, c, chunk(1, 2, 3))
    fd = submit(batcher, d, chunk(5, 5))
    model.release.set()
    await first
    yb, yc, yd = await asyncio.gather(fb, fc, fd)
    # All three run the first two steps together; the 3-step chunk continues alone from its state.
    assert model.calls[1:] == [(3, 2), (1, 1)]
    np.testing.assert_array_equal(yb[:, 0], [1, 3])
    np.testing.assert_array_equal(yc[:, 0], [1, 3, 6])
    np.testing.assert_array_equal(yd[:, 0], [5, 10])
    assert (b.steps, c.steps, d.steps) == (2, 3, 2)
    await batcher.close()


async def test_state_carries_over_between_chunks_of_a_session() -> None:
    batcher, store, _ = make(GatedFakeModel())
    s = store.create("s")
    y1 = await submit(batcher, s, chunk(1, 2))
    y2 = await submit(batcher, s, chunk(10))
    np.testing.assert_array_equal(y1[:, 0], [1, 3])
    np.testing.assert_array_equal(y2[:, 0], [13])
    assert s.steps == 3
    await batcher.close()


async def test_a_failing_call_fails_only_its_own_chunks() -> None:
    model = GatedFakeModel(gated=True)
    model.fail_on_value = 99.0
    batcher, store, _ = make(model)
    a, b, c = (store.create(n) for n in "abc")
    first = await batch_in_flight(batcher, model, a)
    bad = submit(batcher, b, chunk(1, 99))  # its second segment fails
    good = submit(batcher, c, chunk(7))  # shares only the first segment, which succeeds
    model.release.set()
    await first
    with pytest.raises(InternalError, match="fake/1 failed"):
        await bad
    assert float((await good)[0, 0]) == 7.0
    assert b.steps == 0 and not b.busy and c.steps == 1
    assert (store.read_state(b)[0] == 0).all() and (store.read_state(c)[0] == 7).all()
    await batcher.close()


async def test_full_queue_is_refused_with_resource_exhausted() -> None:
    model = GatedFakeModel(gated=True)
    batcher, store, _ = make(model, max_queue_chunks=2)
    sessions = [store.create(str(i)) for i in range(4)]
    first = await batch_in_flight(batcher, model, sessions[0])
    queued = [submit(batcher, s, chunk(1)) for s in sessions[1:3]]
    with pytest.raises(ResourceExhausted, match="retry later"):
        submit(batcher, sessions[3], chunk(1))
    assert not sessions[3].busy
    model.release.set()
    await asyncio.gather(first, *queued)
    await batcher.close()


async def test_batch_size_metric_counts_sessions_per_call() -> None:
    model = GatedFakeModel(gated=True)
    batcher, store, metrics = make(model)
    sessions = [store.create(str(i)) for i in range(6)]
    first = await batch_in_flight(batcher, model, sessions[0])
    rest = [submit(batcher, s, chunk(1)) for s in sessions[1:]]
    model.release.set()
    await asyncio.gather(first, *rest)
    total = metrics.registry.get_sample_value(
        "rnnserve_batch_size_sum", {"model": "fake", "version": "1"}
    )
    count = metrics.registry.get_sample_value(
        "rnnserve_batch_size_count", {"model": "fake", "version": "1"}
    )
    assert (total, count) == (6.0, 2.0)
    await batcher.close()


async def test_batch_fires_without_delay_once_every_session_has_a_chunk_queued() -> None:
    model = GatedFakeModel()
    batcher, store, _ = make(model, max_queue_delay_s=3600.0)
    a, b = store.create("a"), store.create("b")
    first = submit(batcher, a, chunk(1))
    second = submit(batcher, b, chunk(2))
    # With an hour of queue delay, only the all-sessions-queued rule can fire this batch.
    outputs = await asyncio.wait_for(asyncio.gather(first, second), timeout=30)
    assert model.calls == [(2, 1)] and [float(o[0, 0]) for o in outputs] == [1.0, 2.0]
    await batcher.close()


async def test_a_lone_chunk_waits_for_the_others_up_to_the_delay() -> None:
    model = GatedFakeModel()
    batcher, store, _ = make(model, max_queue_delay_s=0.01)
    a, _idle = store.create("a"), store.create("idle")
    assert float((await asyncio.wait_for(submit(batcher, a, chunk(5)), timeout=30))[0, 0]) == 5.0
    assert model.calls == [(1, 1)]  # fired by the deadline: the idle session never sent a chunk
    await batcher.close()


async def test_cheap_batches_compute_on_the_loop_and_costly_ones_in_the_worker_thread() -> None:
    # The model's cost says one row of one step takes 0.9 ms, under the 1 ms bar: that batch runs
    # on the loop. Two steps, or two rows, cross the bar and go to the worker thread. The outputs
    # are the same either way.
    model = GatedFakeModel()
    cost = CallCost(fixed_s=0.0005, per_row_s=0.0004)
    batcher, store, _ = make(model, inline_compute_below_s=0.001, call_cost=cost)
    a, b = store.create("a"), store.create("b")
    y1 = await submit(batcher, a, chunk(1))
    y2 = await submit(batcher, a, chunk(2, 3))
    y3, y4 = await asyncio.gather(submit(batcher, a, chunk(4)), submit(batcher, b, chunk(5)))
    loop_thread = threading.get_ident()
    assert model.calls == [(1, 1), (1, 2), (2, 1)]
    assert model.threads[0] == loop_thread
    assert model.threads[1] != loop_thread and model.threads[2] != loop_thread
    assert model.single_thread == [True, False, False]  # the loop's calls use one thread
    np.testing.assert_array_equal(y1[:, 0], [1])
    np.testing.assert_array_equal(y2[:, 0], [3, 6])
    np.testing.assert_array_equal(y3[:, 0], [10])
    np.testing.assert_array_equal(y4[:, 0], [5])
    await batcher.close()


def test_call_cost_grows_with_rows_and_steps() -> None:
    cost = CallCost(fixed_s=0.0001, per_row_s=0.00001)
    assert cost.estimate_s(1, 1) == pytest.approx(0.00011)
    assert cost.estimate_s(10, 1) == pytest.approx(0.0002)
    assert cost.estimate_s(10, 3) == pytest.approx(0.0006)


async def test_a_failing_single_call_batch_fails_its_chunks_and_keeps_their_state() -> None:
    model = GatedFakeModel(gated=True)
    model.fail_on_value = 99.0
    batcher, store, _ = make(model)
    a, b, c = (store.create(n) for n in "abc")
    first = await batch_in_flight(batcher, model, a)
    failing = [submit(batcher, b, chunk(99)), submit(batcher, c, chunk(3))]  # one call
    model.release.set()
    await first
    for future in failing:
        with pytest.raises(InternalError, match="fake/1 failed"):
            await future
    assert (b.steps, c.steps) == (0, 0) and not b.busy and not c.busy
    assert (store.read_state(b)[0] == 0).all() and (store.read_state(c)[0] == 0).all()
    assert float((await submit(batcher, c, chunk(4)))[0, 0]) == 4.0
    await batcher.close()


async def test_a_chunk_whose_deadline_passed_in_the_queue_is_not_computed() -> None:
    model = GatedFakeModel(gated=True)
    batcher, store, metrics = make(model, deadline_margin_s=0.001)
    a, b, c = store.create("a"), store.create("b"), store.create("c")
    first = await batch_in_flight(batcher, model, a)
    with pytest.raises(DeadlineExceeded, match="not applied"):
        submit(batcher, b, chunk(5), deadline_s=time.perf_counter())  # no time left: refused
    late = submit(batcher, c, chunk(5), deadline_s=time.perf_counter() + 0.02)
    # Answered by its timer while the model still computes the batch before it: in time for
    # a caller whose own deadline is about to fire.
    with pytest.raises(DeadlineExceeded, match="not applied") as refused:
        await late
    assert refused.value.session_steps == 0 and not model.release.is_set()
    model.release.set()
    await first
    assert (b.steps, c.steps) == (0, 0) and not b.busy and not c.busy
    assert (store.read_state(c)[0] == 0).all()
    assert model.calls == [(1, 1)]  # neither reached the model
    dropped = metrics.registry.get_sample_value(
        "rnnserve_deadline_dropped_total", {"model": "fake", "version": "1"}
    )
    assert dropped == 1.0  # the one that had been queued
    assert float((await submit(batcher, c, chunk(2)))[0, 0]) == 2.0  # c carries on from zero
    await batcher.close()


async def test_a_waiting_chunk_past_its_deadline_fails_with_those_behind_it_up_to_a_start() -> None:
    model = GatedFakeModel(gated=True)
    batcher, store, _ = make(model)
    a = store.create("a")
    first = submit_chunk(batcher, a, chunk(1), wait=True)
    await asyncio.to_thread(model.entered.wait, 30)
    late = submit_chunk(batcher, a, chunk(10), time.perf_counter() + 0.02, wait=True)
    behind = submit_chunk(batcher, a, chunk(100), wait=True)
    restart = submit_chunk(batcher, a, chunk(7), wait=True, start=True)
    with pytest.raises(DeadlineExceeded):
        await late
    with pytest.raises(FailedPrecondition, match="cannot go on"):
        await behind  # it would apply to a history without the late chunk
    model.release.set()
    assert (await first).steps == 1
    result = await restart
    assert (result.steps, float(result.output[0, 0])) == (1, 7.0)
    await batcher.close()


async def test_a_chunk_that_expects_another_step_count_is_aborted_unapplied() -> None:
    model = GatedFakeModel(gated=False)
    batcher, store, _ = make(model)
    a = store.create("a")
    assert (await submit_chunk(batcher, a, chunk(1), expected_steps=0)).steps == 1
    with pytest.raises(Aborted, match="at step 1, this chunk expected step 0") as refused:
        await submit_chunk(batcher, a, chunk(1), expected_steps=0)  # a retry of the applied one
    assert refused.value.session_steps == 1 and a.steps == 1 and not a.busy
    assert (await submit_chunk(batcher, a, chunk(2), expected_steps=1)).steps == 2
    await batcher.close()


async def test_an_unconfirmed_session_takes_only_a_chunk_that_states_count_and_incarnation() -> (
    None
):
    model = GatedFakeModel(gated=False)
    batcher, store, _ = make(model)
    a = store.create("a")
    a.steps, a.unconfirmed = 5, True  # as restored from a snapshot an unclean stop left
    with pytest.raises(Unconfirmed, match=r"cluster store\) at step 5") as refused:
        await submit_chunk(batcher, a, chunk(1))
    assert refused.value.session_steps == 5
    with pytest.raises(Unconfirmed):  # the count alone: an older history may be at it too
        await submit_chunk(batcher, a, chunk(1), expected_steps=5)
    with pytest.raises(NotFound, match="not the one you had"):
        await submit_chunk(batcher, a, chunk(1), expected_steps=5, incarnation=a.incarnation + 1)
    with pytest.raises(Aborted):  # the client was further on
        await submit_chunk(batcher, a, chunk(1), expected_steps=7, incarnation=a.incarnation)
    assert a.unconfirmed and a.steps == 5
    result = await submit_chunk(batcher, a, chunk(1), expected_steps=5, incarnation=a.incarnation)
    assert result.steps == 6 and not a.unconfirmed
    assert (await submit_chunk(batcher, a, chunk(1))).steps == 7  # confirmed: plain chunks again
    await batcher.close()


async def test_chunks_of_a_busy_session_wait_in_its_line_and_apply_in_order() -> None:
    model = GatedFakeModel(gated=True)
    batcher, store, _ = make(model, max_waiting_per_session=2)
    a = store.create("a")
    first = submit_chunk(batcher, a, chunk(1))
    await asyncio.to_thread(model.entered.wait, 30)
    waiting = [submit_chunk(batcher, a, chunk(v), wait=True) for v in (10, 100)]
    with pytest.raises(ResourceExhausted, match="chunks waiting"):
        submit_chunk(batcher, a, chunk(5), wait=True)  # the line holds 2
    with pytest.raises(FailedPrecondition, match="in flight"):
        submit_chunk(batcher, a, chunk(5))  # an API that does not queue
    model.release.set()
    results = [await f for f in (first, *waiting)]
    assert [float(r.output[0, 0]) for r in results] == [1.0, 11.0, 111.0]  # cumulative: in order
    assert [r.steps for r in results] == [1, 2, 3] and not a.busy
    assert model.calls == [(1, 1), (1, 1), (1, 1)]  # one chunk of a session per batch
    await batcher.close()


async def test_end_then_start_in_one_line_restarts_and_end_fails_what_waits_without_start() -> None:
    model = GatedFakeModel(gated=True)
    batcher, store, _ = make(model)
    a = store.create("a")
    first = submit_chunk(batcher, a, chunk(1), end=True)
    await asyncio.to_thread(model.entered.wait, 30)
    restarted = submit_chunk(batcher, a, chunk(5), wait=True, start=True)
    model.release.set()
    assert (await first).ended
    result = await restarted
    assert (float(result.output[0, 0]), result.steps) == (5.0, 1)  # from zero state, step 0
    model.release.clear()
    model.entered.clear()
    last = submit_chunk(batcher, a, chunk(1), end=True)
    await asyncio.to_thread(model.entered.wait, 30)
    orphan = submit_chunk(batcher, a, chunk(2), wait=True)  # no START after the END
    model.release.set()
    await last
    with pytest.raises(NotFound):
        await orphan
    assert a.ended is not None and len(store) == 0
    await batcher.close()


class BrokenScatterStore(SessionStore):
    """A store whose scatter raises once: a failure while a batch's results are applied."""

    def __init__(self) -> None:
        super().__init__(state_count=1, layers=1, hidden=1, max_sessions=100)
        self.fail_next_scatter = False

    def scatter(self, slots: np.ndarray, new_states: Sequence[np.ndarray]) -> None:
        if self.fail_next_scatter:
            self.fail_next_scatter = False
            raise IndexError("scatter broke")
        super().scatter(slots, new_states)


class BrokenGatherStore(SessionStore):
    """A store whose gather raises once: a batch that breaks before its model call."""

    def __init__(self) -> None:
        super().__init__(state_count=1, layers=1, hidden=1, max_sessions=100)
        self.fail_next_gather = False

    def gather(self, slots: np.ndarray, restarted: Sequence[int] = ()) -> list[Any]:
        if self.fail_next_gather:
            self.fail_next_gather = False
            raise MemoryError("gather broke")
        return super().gather(slots, restarted)


async def test_a_batch_that_breaks_before_its_call_fails_its_chunks_and_keeps_their_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Batcher._batch_failed: a batch broken outside the model call (here its states could not
    be gathered) answers each of its chunks INTERNAL, not applied; their sessions keep their
    state and step counts, and the loop and the other sessions go on."""
    model = GatedFakeModel(gated=True)
    store = BrokenGatherStore()
    batcher, _, metrics = make(model, store)
    a, b, c = (store.create(n) for n in "abc")
    first = await batch_in_flight(batcher, model, a)  # a's chunk computes; b and c queue
    queued = [submit(batcher, b, chunk(2)), submit(batcher, c, chunk(3))]
    store.fail_next_gather = True  # the next batch (b and c) breaks before its call
    model.release.set()
    assert float((await first)[0, 0]) == 1.0
    for future in queued:
        with pytest.raises(InternalError, match="model fake/1 failed to run a batch"):
            await asyncio.wait_for(future, timeout=30)
    assert (b.steps, c.steps) == (0, 0) and not b.busy and not c.busy
    assert (store.read_state(b)[0] == 0).all() and b.ended is None and c.ended is None
    failures = metrics.registry.get_sample_value(
        "rnnserve_batch_failures_total", {"model": "fake", "version": "1"}
    )
    assert failures == 1.0 and batcher.failure is None
    assert any("MemoryError: gather broke" in r.getMessage() for r in caplog.records)
    yb = await asyncio.wait_for(submit(batcher, b, chunk(2)), timeout=30)  # goes on from 0
    assert float(yb[0, 0]) == 2.0 and b.steps == 1
    await batcher.close()


async def test_a_batch_whose_apply_raises_fails_only_its_chunks_and_the_loop_goes_on() -> None:
    # Regression: an exception while a batch's results were applied killed the model's batch
    # loop silently, and every later chunk of every session of the model hung. A failed state
    # write may have left part of a session's state new (state tensors are written one after
    # another): that session ends (reason failed) rather than go on from it.
    model = GatedFakeModel(gated=True)
    store = BrokenScatterStore()
    ended: list[tuple[str, EndReason]] = []
    store.on_end = lambda session, reason: ended.append((session.session_id, reason))
    batcher, _, metrics = make(model, store)
    a, b, c = (store.create(n) for n in "abc")
    first = await batch_in_flight(batcher, model, a)
    store.fail_next_scatter = True  # the batch in flight fails as it is applied
    model.release.set()
    with pytest.raises(InternalError, match="could not store the new state of session 'a'"):
        await asyncio.wait_for(first, timeout=30)
    assert a.steps == 0 and ended == [("a", EndReason.FAILED)] and store.find("a") is None
    # A concurrent session of the same model is answered.
    yb = await asyncio.wait_for(submit(batcher, b, chunk(2)), timeout=30)
    assert float(yb[0, 0]) == 2.0
    failures = metrics.registry.get_sample_value(
        "rnnserve_batch_failures_total", {"model": "fake", "version": "1"}
    )
    assert failures == 1.0 and batcher.failure is None and c.steps == 0
    await batcher.close()


async def test_outputs_of_the_wrong_shape_fail_the_batch_before_any_state_is_written() -> None:
    class WrongStates(GatedFakeModel):
        def run(
            self, x: np.ndarray, states: Sequence[np.ndarray], single_thread: bool = False
        ) -> tuple[np.ndarray, list[np.ndarray]]:
            y, new = super().run(x, states, single_thread)
            return y, [np.concatenate([new[0], new[0]], axis=1)]  # twice the rows

    batcher, store, _ = make(WrongStates())
    a = store.create("a")
    with pytest.raises(InternalError, match="fake/1 failed: ValueError"):
        await asyncio.wait_for(submit(batcher, a, chunk(4)), timeout=30)
    assert a.steps == 0 and not a.busy and (store.read_state(a)[0] == 0).all()
    await batcher.close()


async def test_a_batch_loop_that_stops_fails_everything_fast_and_reports_the_model_failed() -> None:
    model = GatedFakeModel(gated=True)
    failed: list[Batcher] = []
    batcher, store, _ = make(model, on_failed=failed.append)
    a, b = store.create("a"), store.create("b")
    first = await batch_in_flight(batcher, model, a)
    queued = submit(batcher, b, chunk(2))
    batcher._task.cancel()  # the loop stops, as if it had died
    for future in (first, queued):
        with pytest.raises(Unavailable, match="not available"):
            await asyncio.wait_for(future, timeout=30)
    assert failed == [batcher] and batcher.failure is not None
    with pytest.raises(Unavailable, match="batch loop stopped"):
        submit(batcher, a, chunk(1))
    assert not a.busy and not b.busy
    model.release.set()
    await batcher.close()


async def test_a_batch_loop_that_dies_of_an_exception_fails_fast_and_closes_cleanly() -> None:
    batcher, store, _ = make(GatedFakeModel())
    a, b = store.create("a"), store.create("b")
    assert float((await submit(batcher, a, chunk(1)))[0, 0]) == 1.0

    async def broken() -> None:
        raise RuntimeError("the loop itself broke")

    batcher._batch_ready = broken  # type: ignore[method-assign]  # the round after next raises
    assert float((await submit(batcher, b, chunk(2)))[0, 0]) == 2.0  # this round still runs
    for _ in range(1000):  # let the loop take its next round: no timer
        if batcher.failure is not None:
            break
        await asyncio.sleep(0)
    assert batcher.failure is not None and "the loop itself broke" in batcher.failure
    with pytest.raises(Unavailable, match="not available"):
        submit(batcher, a, chunk(3))
    await batcher.close()  # does not raise the loop's exception


async def test_a_failed_chunk_of_a_pipelined_sequence_fails_those_behind_it_up_to_a_start() -> None:
    # They would otherwise apply to a history that lacks it: silently wrong outputs.
    model = GatedFakeModel(gated=True)
    model.fail_on_value = 99.0
    batcher, store, _ = make(model)
    a = store.create("a")
    model.release.set()
    assert (await submit_chunk(batcher, a, chunk(1), wait=True)).steps == 1
    model.release.clear()
    model.entered.clear()
    failing = submit_chunk(batcher, a, chunk(99), wait=True)
    await asyncio.to_thread(model.entered.wait, 30)
    behind = submit_chunk(batcher, a, chunk(5), wait=True)
    restart = submit_chunk(batcher, a, chunk(7), wait=True, start=True)
    after = submit_chunk(batcher, a, chunk(1), wait=True)
    model.release.set()
    with pytest.raises(InternalError):
        await failing
    with pytest.raises(FailedPrecondition, match="cannot go on: an earlier request of it failed"):
        await behind
    restarted, continued = await restart, await after
    assert (float(restarted.output[0, 0]), restarted.steps) == (7.0, 1)  # from zero state
    assert (float(continued.output[0, 0]), continued.steps) == (8.0, 2)
    assert a.broken is None and not a.busy
    await batcher.close()


async def test_a_failed_start_leaves_the_state_as_it_was() -> None:
    model = GatedFakeModel()
    model.fail_on_value = 99.0
    batcher, store, _ = make(model)
    a = store.create("a")
    await submit(batcher, a, chunk(3))
    with pytest.raises(InternalError):
        await submit_chunk(batcher, a, chunk(99), start=True)
    assert a.steps == 1 and (store.read_state(a)[0] == 3).all()
    await batcher.close()


async def test_a_cancelled_chunk_in_a_batch_that_breaks_still_frees_its_session() -> None:
    # Its caller went away (the future is cancelled); the batch then fails as it is applied. The
    # session must not stay busy, or it could never be closed, expired or stepped again.
    model = GatedFakeModel(gated=True)
    store = BrokenScatterStore()
    batcher, _, _ = make(model, store)
    a = store.create("a")
    gone = submit_chunk(batcher, a, chunk(1))
    await asyncio.to_thread(model.entered.wait, 30)
    gone.cancel()
    store.fail_next_scatter = True
    model.release.set()
    await asyncio.get_running_loop().run_in_executor(
        batcher.runner._executor, lambda: None
    )  # call done
    for _ in range(1000):  # let the loop apply (and fail) that batch: no timer
        if not a.busy:
            break
        await asyncio.sleep(0)
    assert float((await asyncio.wait_for(submit(batcher, a, chunk(2)), timeout=30))[0, 0]) == 2.0
    assert not a.busy and a.steps == 1
    await batcher.close()


async def test_a_chunk_answered_by_its_deadline_leaves_the_queue_at_once() -> None:
    model = GatedFakeModel(gated=True)
    batcher, store, _ = make(model, max_queue_chunks=1)
    a, b, c = store.create("a"), store.create("b"), store.create("c")
    first = await batch_in_flight(batcher, model, a)
    with pytest.raises(DeadlineExceeded):
        await submit(batcher, b, chunk(1), deadline_s=time.perf_counter() + 0.02)
    # Its place in the queue is free again: no spurious "chunks waiting" refusal.
    queued = submit(batcher, c, chunk(2))
    model.release.set()
    await first
    assert float((await queued)[0, 0]) == 2.0 and b.steps == 0
    await batcher.close()


async def test_an_anchored_chunk_waiting_when_a_later_request_fails_does_not_mend_the_break() -> (
    None
):
    # The client sent A, B (stating its count), then C, which failed (refused), then D: D would
    # apply to a history without C, so the sequence stays broken for D, whatever B does.
    model = GatedFakeModel(gated=True)
    batcher, store, _ = make(model)
    a = store.create("a")
    first = submit_chunk(batcher, a, chunk(1), wait=True)
    await asyncio.to_thread(model.entered.wait, 30)
    anchored = submit_chunk(batcher, a, chunk(2), wait=True, expected_steps=1)
    break_sequence(a, "C was refused")  # as the engine does when C is refused
    model.release.set()
    await first
    assert (await anchored).steps == 2
    assert a.broken == "C was refused"  # D, sent after C, must still be refused
    await batcher.close()


async def test_a_failed_start_that_opened_its_session_closes_it_again() -> None:
    model = GatedFakeModel(gated=True)
    batcher, store, _ = make(model)
    busy, opened = store.create("busy"), store.create("new")
    first = await batch_in_flight(batcher, model, busy)
    future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
    latency = Metrics().request_latency.labels("fake", "1", "test")
    batcher.submit(PendingChunk(opened, chunk(1), future, time.perf_counter(), latency,
                                time.perf_counter() + 0.02, start=True, ordered=True,
                                opens=True))  # fmt: skip
    with pytest.raises(DeadlineExceeded):
        await future
    assert store.find("new") is None  # no empty session left to count against the limits
    model.release.set()
    await first
    await batcher.close()
