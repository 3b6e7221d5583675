"""Computing one batch: chunks of any lengths through one model, exactly, touching no session.

:class:`BatchRunner` decides where a batch computes; :func:`compute_batch` computes it and sees only
the arrays it is handed. :func:`check_outcome` proves that what came back fits
the batch before anything is written to a session, so a model that answers in the wrong shapes
fails its batch instead of corrupting state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import InternalError
from service.repository import ModelSpec
from service.runtime import CallCost, ModelRuntime
from service.state_bank import HostRows, RowOps

logger = logging.getLogger(__name__)

HOST_ROWS = HostRows()

ModelCall = Callable[[np.ndarray, list[Any]], tuple[np.ndarray, list[Any]]]


@dataclass(eq=False, slots=True)
class BatchOutcome:
    """Per-chunk outputs, the batch's final states, and which chunks finished (a failed model call
    leaves the chunks it held unfinished, with ``error``). ``states`` are batch arrays in the
    model's state residency (numpy arrays, or OrtValues on the device)."""

    outputs: list[np.ndarray]
    states: list[Any]
    finished: list[bool]  # per chunk
    error: InternalError | None
    calls: list[tuple[int, float]]  # (rows, seconds) of each model call, for the metrics


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest of ``buckets`` (ascending) holding ``rows``; ``rows`` itself when none does
    (no buckets, or more rows than the largest)."""
    for size in buckets:
        if size >= rows:
            return size
    return rows


def compute_batch(
    call: ModelCall,
    label: str,
    inputs: Sequence[np.ndarray],
    states: list[Any],
    rows_ops: RowOps = HOST_ROWS,
    buckets: Sequence[int] = (),
) -> BatchOutcome:
    """Run chunks ``inputs`` ([steps, features] each) from ``states`` ([layers, rows, hidden]).

    The batch runs in step-aligned segments: every chunk takes part in the first call, which
    covers as many steps as the shortest chunk; the chunks with steps left continue from the
    states they reached, and so on. Chaining states this way is exactly the computation of one
    call over each whole chunk, so no masking is involved, and when all chunks have the
    same length (the common case) the batch is a single call. A failing call is logged and ends
    the batch: the chunks it held are left unfinished with an :class:`InternalError`.

    ``rows_ops`` moves rows of the state arrays (host or device, :mod:`service.state_bank`).
    With ``buckets``, each call is padded up to the smallest bucket that holds it
    (:func:`bucket_for`) with rows of the first row's input and zero state: in a recurrent model
    a row's outputs and states depend on that row alone (the load-time check proves it), so the
    padding rows change nothing and are dropped.
    """
    lengths = [x.shape[0] for x in inputs]
    pieces: list[list[np.ndarray]] = [[] for _ in inputs]
    finished = [False] * len(inputs)
    error: InternalError | None = None
    calls: list[tuple[int, float]] = []
    done_steps = 0
    ends = sorted(set(lengths))
    for end in ends:
        rows = [i for i, n in enumerate(lengths) if n >= end]
        everyone = len(rows) == len(inputs)
        if len(ends) == 1:  # one length (the common case): whole chunks, one call
            x = np.array(inputs)
        else:
            x = np.array([inputs[i][done_steps:end] for i in rows])
        row_index = None if everyone else np.array(rows, np.int64)
        segment_states = states if row_index is None else rows_ops.take(states, row_index)
        started = time.perf_counter()
        try:
            y, new_states = padded_call(call, rows_ops, bucket_for(len(rows), buckets),
                                        x, segment_states)  # fmt: skip
            calls.append((len(rows), time.perf_counter() - started))
        except Exception as exc:
            logger.exception("model %s failed on a batch of %d", label, len(rows))
            error = InternalError(f"model {label} failed: {type(exc).__name__}")
            break
        if row_index is None:
            states = list(new_states)
        else:
            states = rows_ops.put(states, row_index, new_states)
        for i, y_row in zip(rows, y, strict=True):
            pieces[i].append(y_row)
            finished[i] = lengths[i] == end
        done_steps = end
    outputs = [p[0] if len(p) == 1 else np.concatenate(p) if p else np.empty((0,)) for p in pieces]
    return BatchOutcome(outputs, states, finished, error, calls)


def padded_call(
    call: ModelCall, rows_ops: RowOps, padded_rows: int, x: np.ndarray, states: list[Any]
) -> tuple[np.ndarray, list[Any]]:
    """``call(x, states)`` padded with rows (the first row's input, zero state) up to ``padded_rows`` rows, checked
    (:func:`check_call`), with the padding dropped from what it returns."""
    rows = x.shape[0]
    if padded_rows > rows:  # copies of the first row's input: valid whatever its type and range
        x = np.concatenate([x, np.repeat(x[:1], padded_rows - rows, axis=0)])
        states = rows_ops.pad(states, padded_rows)
    y, new_states = call(x, states)
    check_call(x, [rows_ops.shape(s) for s in states], y, [rows_ops.shape(s) for s in new_states])
    if padded_rows > rows:
        y = y[:rows]
        new_states = rows_ops.take(new_states, np.arange(rows, dtype=np.int64))
    return y, new_states


def check_call(
    x: np.ndarray,
    state_shapes: Sequence[tuple[int, ...]],
    y: np.ndarray,
    new_state_shapes: Sequence[tuple[int, ...]],
) -> None:
    """A model call's results must fit its inputs: y [rows, steps, *], one new state per state,
    each of its state's shape. Raises ValueError naming the mismatch."""
    rows, steps = x.shape[0], x.shape[1]
    if y.ndim != 3 or y.shape[:2] != (rows, steps):
        raise ValueError(f"output y has shape {list(y.shape)}, expected [{rows}, {steps}, *]")
    if len(new_state_shapes) != len(state_shapes):
        raise ValueError(
            f"{len(new_state_shapes)} state outputs for {len(state_shapes)} state inputs"
        )
    for k, (old, new) in enumerate(zip(state_shapes, new_state_shapes, strict=True)):
        if new != old:
            raise ValueError(f"state output {k} has shape {list(new)}, expected {list(old)}")


class BatchRunner:
    """Where one model's batches compute: in the model's single worker thread (onnxruntime
    releases the GIL, so the event loop serves I/O meanwhile), or on the event loop itself when the
    model's :class:`CallCost` (timed at load) puts the batch under ``inline_compute_below_s``:
    handing a 50 µs call to a thread and waking the loop again costs more CPU than the call
    (docs/PERFORMANCE.md). Those run on the runtime's one-thread session. The choice is made from
    rows and steps, never from measured call times, which include waits for the GIL.

    ``rows_ops`` says where the batch's states live (the model's state bank): host arrays go
    through :meth:`ModelRuntime.run`, device arrays through :meth:`ModelRuntime.run_bound`."""

    def __init__(
        self,
        runtime: ModelRuntime,
        spec: ModelSpec,
        inline_compute_below_s: float,
        call_cost: CallCost | None,  # None: every batch goes to the worker thread
        rows_ops: RowOps = HOST_ROWS,
        buckets: Sequence[int] = (),
    ) -> None:
        self.runtime = runtime
        self.label = spec.label
        self.inline_compute_below_s = inline_compute_below_s
        self.call_cost = call_cost
        self.rows_ops = rows_ops
        self.buckets = tuple(buckets)
        self._on_device = not isinstance(rows_ops, HostRows)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{spec.name}")

    async def run(self, inputs: list[np.ndarray], states: list[Any]) -> BatchOutcome:
        steps = max(x.shape[0] for x in inputs)
        cost = self.call_cost
        inline = (
            cost is not None and cost.estimate_s(len(inputs), steps) < self.inline_compute_below_s
        )
        call = self._call_inline if inline else self._call
        if inline:
            return compute_batch(call, self.label, inputs, states, self.rows_ops, self.buckets)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, compute_batch, call, self.label, inputs, states, self.rows_ops,
            self.buckets,
        )  # fmt: skip

    def _call(self, x: np.ndarray, states: list[Any]) -> tuple[np.ndarray, list[Any]]:
        if self._on_device:
            return self.runtime.run_bound(x, states)
        return self.runtime.run(x, states)

    def _call_inline(self, x: np.ndarray, states: list[Any]) -> tuple[np.ndarray, list[Any]]:
        if self._on_device:
            return self.runtime.run_bound(x, states, single_thread=True)
        return self.runtime.run(x, states, single_thread=True)

    def close(self) -> None:
        """Stop the worker thread, not waiting: a call still running must not hold up shutdown."""
        self._executor.shutdown(wait=False, cancel_futures=True)
