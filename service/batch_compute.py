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

import numpy as np

from service.errors import InternalError
from service.repository import ModelSpec
from service.runtime import CallCost, ModelRuntime

logger = logging.getLogger(__name__)

ModelCall = Callable[[np.ndarray, list[np.ndarray]], tuple[np.ndarray, list[np.ndarray]]]


@dataclass(eq=False, slots=True)
class BatchOutcome:
    """Per-chunk outputs, the batch's final states, and which chunks finished (a failed model call
    leaves the chunks it held unfinished, with ``error``)."""

    outputs: list[np.ndarray]
    states: list[np.ndarray]
    finished: list[bool]  # per chunk
    error: InternalError | None
    calls: list[tuple[int, float]]  # (rows, seconds) of each model call, for the metrics


def compute_batch(
    call: ModelCall, label: str, inputs: Sequence[np.ndarray], states: list[np.ndarray]
) -> BatchOutcome:
    """Run chunks ``inputs`` ([steps, features] each) from ``states`` ([layers, rows, hidden]).

    The batch runs in step-aligned segments: every chunk takes part in the first call, which
    covers as many steps as the shortest chunk; the chunks with steps left continue from the
    states they reached, and so on. Chaining states this way is exactly the computation of one
    call over each whole chunk, so no padding or masking is involved, and when all chunks have the
    same length (the common case) the batch is a single call. A failing call is logged and ends
    the batch: the chunks it held are left unfinished with an :class:`InternalError`.
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
        segment_states = states if everyone else [s[:, rows, :] for s in states]
        started = time.perf_counter()
        try:
            y, new_states = call(x, segment_states)
            calls.append((len(rows), time.perf_counter() - started))
            check_call(x, segment_states, y, new_states)
        except Exception as exc:
            logger.exception("model %s failed on a batch of %d", label, len(rows))
            error = InternalError(f"model {label} failed: {type(exc).__name__}")
            break
        if everyone:
            states = list(new_states)
        else:
            for state, new in zip(states, new_states, strict=True):
                state[:, rows, :] = new
        for i, y_row in zip(rows, y, strict=True):
            pieces[i].append(y_row)
            finished[i] = lengths[i] == end
        done_steps = end
    outputs = [p[0] if len(p) == 1 else np.concatenate(p) if p else np.empty((0,)) for p in pieces]
    return BatchOutcome(outputs, states, finished, error, calls)


def check_call(
    x: np.ndarray, states: Sequence[np.ndarray], y: np.ndarray, new_states: Sequence[np.ndarray]
) -> None:
    """A model call's results must fit its inputs: y [rows, steps, *], one new state per state,
    each of its state's shape. Raises ValueError naming the mismatch."""
    rows, steps = x.shape[0], x.shape[1]
    if y.ndim != 3 or y.shape[:2] != (rows, steps):
        raise ValueError(f"output y has shape {list(y.shape)}, expected [{rows}, {steps}, *]")
    if len(new_states) != len(states):
        raise ValueError(f"{len(new_states)} state outputs for {len(states)} state inputs")
    for k, (old, new) in enumerate(zip(states, new_states, strict=True)):
        if new.shape != old.shape:
            raise ValueError(
                f"state output {k} has shape {list(new.shape)}, expected {list(old.shape)}"
            )


class BatchRunner:
    """Where one model's batches compute: in the model's single worker thread (onnxruntime
    releases the GIL, so the event loop serves I/O meanwhile), or on the event loop itself when the
    model's :class:`CallCost` (timed at load) puts the batch under ``inline_compute_below_s``:
    handing a 50 µs call to a thread and waking the loop again costs more CPU than the call
    (docs/PERFORMANCE.md). Those run on the runtime's one-thread session. The choice is made from
    rows and steps, never from measured call times, which include waits for the GIL."""

    def __init__(
        self,
        runtime: ModelRuntime,
        spec: ModelSpec,
        inline_compute_below_s: float,
        call_cost: CallCost | None,  # None: every batch goes to the worker thread
    ) -> None:
        self.runtime = runtime
        self.label = spec.label
        self.inline_compute_below_s = inline_compute_below_s
        self.call_cost = call_cost
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{spec.name}")

    async def run(self, inputs: list[np.ndarray], states: list[np.ndarray]) -> BatchOutcome:
        steps = max(x.shape[0] for x in inputs)
        cost = self.call_cost
        if cost is not None and cost.estimate_s(len(inputs), steps) < self.inline_compute_below_s:
            return compute_batch(self._call_inline, self.label, inputs, states)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, compute_batch, self.runtime.run, self.label, inputs, states
        )

    def _call_inline(
        self, x: np.ndarray, states: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.runtime.run(x, states, single_thread=True)

    def close(self) -> None:
        """Stop the worker thread, not waiting: a call still running must not hold up shutdown."""
        self._executor.shutdown(wait=False, cancel_futures=True)
