"""A chunk: what it must be before it is queued (float32 ``[steps, features]`` or int64 ids in
their range, a bounded number of steps, finite values unless allowed, a reply that fits a
message), its record on the way through the batcher, its result, and what may still refuse it
when its turn comes (its caller's deadline, the step count and incarnation it states)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from service.errors import (
    Aborted,
    DeadlineExceeded,
    InvalidArgument,
    ServiceError,
    Unconfirmed,
    shown,
)
from service.metrics import LoopHistogramChild
from service.repository import ModelSpec
from service.session import Session, other_incarnation
from service.signature import TensorSpec

SUMMED_IN_PYTHON_BELOW = 64  # values; under this a numpy reduction costs more than a Python sum
# What a reply adds to its output tensor: session id (<= 128 bytes), counts, incarnation, field
# framing; the model's name and version and any echoed client string are added to it. Generous: a
# chunk near the limit is refused, never applied and then answered too large.
REPLY_OVERHEAD_BYTES = 512


def all_finite(array: np.ndarray) -> bool:
    """True if no value is NaN or Inf.

    A finite sum proves every value finite (NaN and Inf propagate through a sum), so only a sum
    that is not finite needs the element-wise check; it may still be all finite values whose
    float32 sum overflowed. Small arrays are summed as Python floats (doubles: a sum of fewer than
    64 float32 values cannot overflow), which skips numpy's per-call overhead on the hot path.
    """
    if array.size < SUMMED_IN_PYTHON_BELOW:
        return math.isfinite(sum(array.ravel().tolist()))
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is an answer here
        total = array.sum()
    return math.isfinite(total) or bool(np.isfinite(array).all())


def check_chunk(
    spec: ModelSpec,
    given: np.ndarray | Mapping[str, np.ndarray],
    max_steps: int,
    reject_nonfinite: bool,
) -> np.ndarray:
    """A chunk as the core carries it, packed (:class:`service.signature.Signature`): one
    float32 array [steps, input_size]. ``given``: the model's one input, or every input by name.
    INVALID_ARGUMENT unless each input has its declared dtype (integers are taken as float32 for
    a float32 input) and shape ``[steps, features]`` (``[steps]`` for ids), ids lie in their
    range, values are finite (unless allowed), and all inputs have the same number of steps."""
    sig = spec.tensors
    if isinstance(given, np.ndarray):  # one input, the common case: the shortest path
        if len(sig.inputs) > 1:
            raise InvalidArgument(
                f"model {spec.label} takes {len(sig.inputs)} inputs, "
                f"{', '.join(t.name for t in sig.inputs)}: send each by name"
            )
        x = checked_input(spec, sig.input, given, reject_nonfinite, False)
        check_steps(x.shape[0], max_steps)
        return x if sig.packed_as_is else x.reshape(x.shape[0], -1).astype(np.float32)
    names = [t.name for t in sig.inputs]
    if sorted(given) != sorted(names):
        missing = [n for n in names if n not in given]
        unknown = [shown(n) for n in given if n not in names]
        raise InvalidArgument(
            f"model {spec.label} takes inputs {', '.join(names)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unknown {', '.join(unknown)}" if unknown else "")
        )
    several = len(sig.inputs) > 1
    arrays = [
        checked_input(spec, tensor, given[tensor.name], reject_nonfinite, several)
        for tensor in sig.inputs
    ]
    steps = arrays[0].shape[0]
    if any(a.shape[0] != steps for a in arrays):
        raise InvalidArgument(
            f"the inputs of a chunk must have as many steps each, got "
            f"{[a.shape[0] for a in arrays]}"
        )
    check_steps(steps, max_steps)
    if sig.packed_as_is:
        return arrays[0]
    packed = [a.reshape(steps, -1).astype(np.float32, copy=False) for a in arrays]
    return packed[0] if len(packed) == 1 else np.concatenate(packed, axis=1)


def check_steps(steps: int, max_steps: int) -> None:
    """A chunk has at least one step and at most ``max_steps``."""
    if steps < 1:
        raise InvalidArgument("a chunk needs at least one step")
    if steps > max_steps:
        raise InvalidArgument(f"chunk of {steps} steps exceeds the limit of {max_steps}")


def checked_input(
    spec: ModelSpec, tensor: TensorSpec, x: np.ndarray, reject_nonfinite: bool, named: bool
) -> np.ndarray:
    """One input of a chunk, checked against its declaration (see :func:`check_chunk`)."""
    what = f"input {tensor.name!r}" if named else "input"
    if x.dtype.kind in "iu" and tensor.dtype == "float32":
        x = x.astype(np.float32)
    if x.dtype != tensor.numpy_dtype:
        hint = " (token ids: an integer array [steps])" if tensor.dtype == "int64" else ""
        raise InvalidArgument(
            f"model {spec.label}: {what} must be {tensor.dtype}, got {x.dtype}{hint}"
        )
    if x.ndim != 1 + len(tensor.shape):
        wanted = "[steps]" if not tensor.shape else f"[steps, {tensor.size}]"
        raise InvalidArgument(f"{what} must be {wanted}, got shape {list(x.shape)}")
    if tensor.shape and x.shape[1] != tensor.size:
        raise InvalidArgument(
            f"model {spec.label} takes {tensor.size} features per step"
            f"{f' in {what}' if named else ''}, got {x.shape[1]}"
        )
    if tensor.value_range is not None:
        low, high = tensor.value_range
        if x.size and (int(x.min()) < low or int(x.max()) >= high):
            bad = int(x.min()) if int(x.min()) < low else int(x.max())
            raise InvalidArgument(
                f"model {spec.label} takes ids from {low} to {high - 1}"
                f"{f' in {what}' if named else ''}; the chunk holds {bad}"
            )
    elif reject_nonfinite and not all_finite(x):
        raise InvalidArgument(f"{what} holds NaN or Inf")
    return x


def check_reply_fits(
    spec: ModelSpec, steps: int, max_message_bytes: int, extra_bytes: int = 0
) -> None:
    """INVALID_ARGUMENT unless the reply to a chunk of ``steps`` fits ``max_message_bytes``
    (``extra_bytes``: what the API's reply echoes of the request): a chunk whose reply could not
    be sent must not be applied."""
    extra_bytes += len(spec.name) + len(spec.version)
    reply_bytes = 4 * steps * spec.output_size + REPLY_OVERHEAD_BYTES + extra_bytes
    if reply_bytes > max_message_bytes:
        room = max_message_bytes - REPLY_OVERHEAD_BYTES - extra_bytes
        raise InvalidArgument(
            f"a chunk of {steps} steps would need a reply of about {reply_bytes} bytes, "
            f"over max_message_bytes ({max_message_bytes}); send at most "
            f"{max(room // (4 * spec.output_size), 0)} steps per chunk"
        )


@dataclass(slots=True)
class StepResult:
    """What a chunk gave: its output rows and where its session stands after it."""

    session_id: str
    output: np.ndarray  # [steps, outputs] float32
    steps: int  # steps the session has consumed, this chunk included
    ended: bool  # the chunk closed its session (end)
    durable_steps: int = 0  # steps covered by the latest written snapshot
    incarnation: int = 0  # the session's (a START draws a new one)
    model_version: str = ""  # the version that computed it (a session stays on its own)
    # A model of several outputs: each by name, [steps, ...]; ``output`` holds them side by side.
    named_outputs: tuple[tuple[str, np.ndarray], ...] = ()


@dataclass(eq=False, slots=True)
class PendingChunk:
    """One chunk on its way through the batcher."""

    session: Session
    x: np.ndarray  # [steps, features] float32
    future: asyncio.Future[StepResult]
    received_s: float  # perf_counter instant the request arrived (latency is counted from it)
    latency: LoopHistogramChild  # the request latency histogram of the chunk's API
    deadline_s: float | None = None  # perf_counter instant after which it is not computed
    start: bool = False  # the session restarts (zero state, step 0) with this chunk
    end: bool = False  # close the session once this chunk is applied
    ordered: bool = False  # part of a pipelined sequence: its failure breaks the sequence
    expected_steps: int | None = None  # the session's step count the client expects before it
    incarnation: int | None = None  # the session's incarnation as the client knows it
    enqueued_s: float = 0.0  # when it entered the shared queue (0: not yet)
    answered: bool = False  # its future was resolved, or its caller had cancelled it
    computing: bool = False  # taken into a batch: it will be applied unless the batch fails
    opens: bool = False  # a START that opened its session: a failure of it closes it again
    deadline_timer: asyncio.TimerHandle | None = None  # answers it in time if it cannot run

    @property
    def anchored(self) -> bool:
        """It fixes where its session's history stands: a START, or a chunk that states the step
        count it expects. Such a chunk is safe behind a failed one of its sequence."""
        return self.start or self.expected_steps is not None


def too_late(session: Session) -> DeadlineExceeded:
    """The answer to a chunk that cannot start computing in time (see the batcher's notes)."""
    return DeadlineExceeded(
        "the deadline would pass before the chunk could run: not applied",
        session_steps=session.steps,
    )


def step_refusal(chunk: PendingChunk) -> ServiceError | None:
    """Why ``chunk`` may not apply to its session as it now stands, or None (it may; a session
    restored unconfirmed is confirmed by a chunk that states its step count and incarnation
    right)."""
    session = chunk.session
    expected = chunk.expected_steps
    if chunk.incarnation is not None and chunk.incarnation != session.incarnation:
        return other_incarnation(session.session_id)
    if session.unconfirmed and (expected is None or chunk.incarnation is None):
        return Unconfirmed(session.session_id, session.steps)
    if expected is not None and expected != session.steps:
        why = (
            "it is behind your count: restored from an earlier saved state; replay your chunks"
            if expected > session.steps
            else "an earlier send of it may have been applied; resume"
        )
        return Aborted(
            f"session {shown(session.session_id)} is at step {session.steps}, this chunk expected "
            f"step {expected}: not applied ({why} from step {session.steps})",
            session_steps=session.steps,
        )
    session.unconfirmed = False
    return None
