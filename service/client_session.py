"""A session on its own bidirectional stream: what its chunks send (:class:`ChunkInputs`, kept
until a snapshot holds them) and :class:`StreamingSession`, which sends them one at a time, states
the step count each expects, and after a break reconnects, attaches and replays so that the
outputs are those of an uninterrupted run (docs/RELIABILITY.md). Opened by
:meth:`service.client.Client.open_session` and :meth:`~service.client.Client.attach`.
"""

from __future__ import annotations

import dataclasses
import queue
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import grpc
import numpy as np

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.api.native_messages import to_array, to_tensor
from service.client_paths import (
    Reconnect,
    ServerGone,
    describe_break,
    in_flight_still,
    is_dead_path,
    routing_metadata,
)

if TYPE_CHECKING:
    from service.client import Client


class SessionEndedError(RuntimeError):
    """The server ended the session (idle timeout, eviction, shutdown)."""


class SessionLostError(RuntimeError):
    """The session cannot go on exactly after its stream broke: the server has no snapshot of it
    (or only of another session of its id), it came back behind the inputs this client kept, or
    the chunk of an earlier call that failed was applied after all (send that chunk again)."""


REPLAY_CHUNK_STEPS = 1024
# Ends after which the session lives on elsewhere: the server shut down (its snapshot, or the
# cluster store, has it) or another replica of the cluster took it. The client reconnects.
RESUMED_AFTER = (pb.END_REASON_SHUTDOWN, pb.END_REASON_MOVED)


class ChunkInputs:
    """What one or more chunks send: the model's one input, or every input by name (a model of
    several, docs/YOUR_MODEL.md); ``len`` is the steps. Float inputs travel as float32 and
    integer ones (token ids) as int64. Kept until a snapshot covers them, to replay."""

    def __init__(self, arrays: dict[str, np.ndarray], named: bool) -> None:
        self.arrays = arrays  # one entry, key "", when not named
        self.named = named

    @classmethod
    def of(cls, x: np.ndarray | Mapping[str, np.ndarray]) -> ChunkInputs:
        """``x``: [steps, features] (one step may be [features]), [steps] token ids, or a
        mapping of input names to such arrays."""
        if isinstance(x, Mapping):
            return cls({name: _wire_array(a, ids_1d=True) for name, a in x.items()}, True)
        return cls({"": _wire_array(x, ids_1d=False)}, False)

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, steps: slice) -> ChunkInputs:
        return ChunkInputs({k: a[steps] for k, a in self.arrays.items()}, self.named)

    @staticmethod
    def joined(parts: Sequence[ChunkInputs]) -> ChunkInputs:
        """``parts`` one after another (none: no steps)."""
        if not parts:
            return ChunkInputs({"": np.empty((0, 0), np.float32)}, False)
        keys = parts[0].arrays
        return ChunkInputs(
            {k: np.concatenate([p.arrays[k] for p in parts]) for k in keys}, parts[0].named
        )

    def same_as(self, other: ChunkInputs) -> bool:
        return self is other or (
            self.arrays.keys() == other.arrays.keys()
            and all(np.array_equal(a, other.arrays[k]) for k, a in self.arrays.items())
        )

    def message(self, expected_steps: int) -> pb.Chunk:
        if self.named:
            inputs = {k: to_tensor(a) for k, a in self.arrays.items()}
            return pb.Chunk(inputs=inputs, expected_steps=expected_steps)
        return pb.Chunk(input=to_tensor(self.arrays[""]), expected_steps=expected_steps)


def _wire_array(x: np.ndarray, ids_1d: bool) -> np.ndarray:
    """An input as it is sent: integers as int64 ids ([steps]), anything else float32
    ([steps, features]; a lone step [features] becomes [1, features] unless ``ids_1d``)."""
    array = np.asarray(x)
    if array.dtype.kind in "iu":
        return np.ascontiguousarray(array, np.int64)
    chunk = np.ascontiguousarray(array, np.float32)
    return chunk if chunk.ndim != 1 or ids_1d else chunk[None]


class StreamingSession:
    """One open session on its own stream. Use as a context manager, or call :meth:`close`.

    With ``resume`` (the default) the session survives a server restart or crash, and a proxy
    losing its path to the server: the client keeps the inputs the server has not yet written to
    a snapshot (the replies' ``durable_steps`` say how far it has), and if the stream breaks
    (:func:`is_dead_path`, or the server's shutdown notice) it reconnects, attaches to the session
    (the same incarnation, never another session opened under the id), replays the inputs after the
    step the session is at and carries on, so the outputs are those of an uninterrupted run. A
    reply lost on the way is recovered from the session's last output. Every chunk states the step
    count it expects, so none is ever applied twice or onto another history: where exact
    resumption is impossible the client raises :class:`SessionLostError`. Reconnecting follows
    ``reconnect`` (bounded tries with backoff); an error the server sent is raised at once.
    """

    def __init__(
        self,
        client: Client,
        open_request: pb.StreamRequest,
        *,
        resume: bool = True,
        reconnect_timeout_s: float | None = None,
        reconnect: Reconnect | None = None,
    ) -> None:
        self._client = client
        self.resume = resume
        policy = reconnect or client.reconnect
        if reconnect_timeout_s is not None:
            policy = dataclasses.replace(policy, timeout_s=reconnect_timeout_s)
        self.reconnect = policy
        self._kept: list[ChunkInputs] = []  # inputs not yet in a snapshot, oldest first
        self.reconnects = 0  # times the session was resumed after its stream broke
        self.replayed_steps = 0  # inputs sent again because the restored session lacked them
        self.breaks: list[str] = []  # what broke the stream each time ("CODE: details")
        self._closed = False
        self._stream_failed = False  # the stream ended (a refused chunk); the session lives on
        self._unresolved: ChunkInputs | None = None  # sent on a broken path, maybe applied
        # A model of several outputs: the last chunk's, by name.
        self.last_outputs: dict[str, np.ndarray] = {}
        kind = open_request.WhichOneof("kind")
        named = open_request.open.session_id if kind == "open" else open_request.attach.session_id
        try:
            opened = self._open_stream(open_request, named)
        except ServerGone as error:  # not retried: an open may have been applied
            raise ConnectionError(
                f"the stream broke before the session was {kind}ed: {error}"
            ) from error
        self.session_id: str = opened.session_id
        self.model: str = opened.model
        self.version: str = opened.version
        self.incarnation: str = opened.incarnation  # which session of this id it is
        self.steps: int = opened.steps  # steps the server has applied
        self.durable_steps: int = opened.durable_steps  # of those, how many a snapshot holds
        self._kept_from: int = opened.steps  # step index of the first kept input

    @property
    def reconnect_timeout_s(self) -> float:
        return self.reconnect.timeout_s

    def _open_stream(self, request: pb.StreamRequest, session_id: str) -> pb.SessionInfo:
        self._requests: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        self._requests.put(request)
        self._responses: Iterator[pb.StreamResponse] = self._client.stub.Stream(
            iter(self._requests.get, None),
            metadata=self._client.metadata + routing_metadata(session_id),
        )
        first = self._next_response()
        if first.WhichOneof("kind") != "opened":  # a server answers open and attach first
            raise ServerGone(f"the stream answered {first.WhichOneof('kind')} before the session")
        info: pb.SessionInfo = first.opened
        return info

    def _next_response(self) -> pb.StreamResponse:
        """The stream's next reply. Every reply of a server says what it is; an empty one is a
        proxy's error page that gRPC read as a message (nginx's 502 without the shipped
        configuration's error_page), and the call's status follows it."""
        try:
            for _ in range(2):
                response: pb.StreamResponse = next(self._responses)
                if response.WhichOneof("kind") is not None:
                    return response
        except StopIteration:  # ended without a status: only a proxy that lost the server does so
            raise ServerGone("the stream ended without a reply") from None
        raise ServerGone("the stream answered with something that is not an rnnserve reply")

    def _exchange(self, chunk: ChunkInputs, expected_steps: int) -> pb.StepResponse:
        """Send ``chunk``, stating the step count the session must be at for it to apply (the
        server refuses any other with ABORTED, unapplied: a chunk is never applied twice)."""
        message = chunk.message(expected_steps)
        self._requests.put(pb.StreamRequest(chunk=message))
        response = self._next_response()
        if response.WhichOneof("kind") == "ended":
            reason = response.ended.reason
            if self.resume and reason in RESUMED_AFTER:
                raise ServerGone(f"the session left this server ({pb.EndReason.Name(reason)})")
            self._closed = True
            raise SessionEndedError(
                f"session {self.session_id} ended by the server: {pb.EndReason.Name(reason)}"
            )
        return response.output

    def step(self, x: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        """Send one chunk [steps, features] (token ids: [steps] integers; a model of several
        inputs: a mapping of their names to such arrays); return its outputs [steps, outputs]
        (a model of several outputs: side by side; :attr:`last_outputs` has them by name).

        An error the server sent is raised as it is (the chunk was not applied; the session goes
        on). A broken path is retried (:meth:`_recover`); if that fails too, the error is raised
        and whether the chunk was applied is settled by the next call: if it was, the next call
        must send the same chunk, and gets its outputs (exactly once), or it raises
        :class:`SessionLostError`."""
        chunk = ChunkInputs.of(x)
        try:
            if self._stream_failed:
                return self._resume_once(chunk)
            reply = self._exchange(chunk, self.steps)
        except (grpc.RpcError, ServerGone) as error:
            return self._after_break(chunk, error)
        self._applied(chunk, reply.steps, reply.durable_steps)
        return self._outputs(reply)

    def _outputs(self, reply: pb.StepResponse) -> np.ndarray:
        """A reply's outputs (and, for a model of several, :attr:`last_outputs` by name)."""
        self.last_outputs = {name: to_array(t, name).copy() for name, t in reply.outputs.items()}
        return to_array(reply.output, "output").copy()

    def _after_break(self, chunk: ChunkInputs, error: grpc.RpcError | ServerGone) -> np.ndarray:
        if isinstance(error, grpc.RpcError) and not is_dead_path(error):
            self._fail_stream()  # the server refused it: not applied
            raise error
        if self._unresolved is None:  # sent, so perhaps applied: only the server knows
            self._unresolved = chunk
        self.breaks.append(describe_break(error))
        try:
            if not self.resume:
                raise error
            return self._recover(chunk)
        except (grpc.RpcError, ServerGone) as failed:
            self._fail_stream()
            if isinstance(failed, ServerGone):
                raise ConnectionError(f"session {self.session_id}: {failed}") from failed
            raise

    def _fail_stream(self) -> None:
        """The stream is over (a refused chunk ends it, the native API's way) but not the
        session: the next call attaches again and goes on."""
        self._requests.put(None)
        self._stream_failed = True

    def _attach(self) -> pb.SessionInfo:
        """A new stream to the same session: the same incarnation, never another session opened
        under the id (that is NOT_FOUND: :class:`SessionLostError`)."""
        request = pb.StreamRequest(
            attach=pb.GetSessionRequest(
                model=self.model,
                version=self.version,
                session_id=self.session_id,
                incarnation=self.incarnation,
            )
        )
        try:
            opened = self._open_stream(request, self.session_id)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            self._stream_failed = True
            raise SessionLostError(
                f"the server has no session {self.session_id} (none restored, or only another "
                f"session of that id): {error.details()}"
            ) from error
        self._stream_failed = False
        return opened

    def _applied(self, chunk: ChunkInputs, steps: int, durable_steps: int) -> None:
        self.steps = steps
        self.durable_steps = durable_steps
        if not self.resume:
            return
        self._kept.append(chunk)
        while self._kept and self._kept_from + len(self._kept[0]) <= durable_steps:
            self._kept_from += len(self._kept.pop(0))

    def _recover(self, pending: ChunkInputs) -> np.ndarray:
        """Reconnect, attach, replay what the session lacks, then apply ``pending``.

        Tried again, with backoff, while the path to the server is broken (:func:`is_dead_path`, a
        shutdown notice) and while the session still has the previous stream's chunk in flight
        (the server lived; only the path broke): at most ``reconnect.attempts`` tries within
        ``reconnect.timeout_s``, then the last error is raised. Each wait is drawn between half and
        all of the backoff, so that the many clients one restart cuts off do not all come back at
        the same instants: a busy server admits new streams at only tens per second
        (docs/PERFORMANCE.md).
        """
        policy = self.reconnect
        deadline = time.monotonic() + policy.timeout_s
        backoff_s = policy.first_backoff_s
        for attempt in range(1, policy.attempts + 1):
            self._requests.put(None)  # let go of the broken stream
            try:
                output = self._resume_once(pending)
                self.reconnects += 1
                return output
            except (grpc.RpcError, ServerGone) as error:
                retry = not isinstance(error, grpc.RpcError) or (
                    is_dead_path(error) or in_flight_still(error)
                )
                if not retry or attempt == policy.attempts or time.monotonic() > deadline:
                    raise
                self.breaks.append(describe_break(error))
                time.sleep(random.uniform(backoff_s / 2, backoff_s))  # away; try again
                backoff_s = min(backoff_s * 2, policy.max_backoff_s)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _resume_once(self, pending: ChunkInputs) -> np.ndarray:
        """Attach, settle whether the chunk of the broken call (``_unresolved``) was applied,
        replay what the session lacks (from the inputs kept since the last snapshot), then apply
        ``pending``, stating the step count every time."""
        opened = self._attach()
        restored, known = int(opened.steps), self.steps
        unresolved = self._unresolved
        if unresolved is not None and restored == known + len(unresolved):
            # Applied before the break; only its reply was lost: it is the session's last output.
            if not unresolved.same_as(pending):
                self._fail_stream()  # settled by the next call, with the same chunk
                raise SessionLostError(
                    f"session {self.session_id} is at step {restored}: the chunk of an earlier "
                    f"call that failed ({len(unresolved)} steps) was applied after all; send that "
                    "chunk again to get its outputs"
                )
            last = to_array(opened.last_output, "last_output").copy()
            self._unresolved = None
            self._applied(pending, restored, int(opened.durable_steps))
            return last
        lowest = self._kept_from if self.resume else known  # what this client can replay
        if not lowest <= restored <= known:
            self._fail_stream()
            raise SessionLostError(
                f"session {self.session_id} is at step {restored}, but this client is at step "
                f"{known} and can replay only from step {lowest}: it restarted from an older "
                "snapshot, or another client stepped it"
            )
        self._unresolved = pending  # the earlier one was not applied; this one is on its way
        kept = ChunkInputs.joined(self._kept)
        replay = kept[restored - self._kept_from : known - self._kept_from]
        for start in range(0, len(replay), REPLAY_CHUNK_STEPS):
            part = replay[start : start + REPLAY_CHUNK_STEPS]  # outputs already delivered
            self._exchange(part, restored + start)
            self.replayed_steps += len(part)
        reply = self._exchange(pending, known)
        self._unresolved = None
        self._applied(pending, reply.steps, reply.durable_steps)
        return self._outputs(reply)

    def close(self) -> int:
        """Close the session on the server; returns its final step count."""
        if self._closed:
            return self.steps
        try:
            if self._stream_failed:
                self._attach()
            self._closed = True
            self._requests.put(pb.StreamRequest(close=pb.Close()))
            ended = self._next_response().ended
        except ServerGone as error:
            raise ConnectionError(
                f"the stream broke while session {self.session_id} closed: {error}"
            ) from error
        self._requests.put(None)
        return int(ended.steps)

    def state(self) -> list[np.ndarray]:
        """The session's recurrent state now, one [layers, hidden] array per state tensor (h, then
        c for an LSTM): after the chunks answered so far, none in flight."""
        info: pb.SessionInfo = self._client.stub.GetSession(
            pb.GetSessionRequest(
                model=self.model,
                version=self.version,
                session_id=self.session_id,
                include_state=True,
                incarnation=self.incarnation,
            ),
            timeout=self._client.timeout_s,
            metadata=self._client.metadata,  # x-session-id: added from the request
        )
        return [to_array(t, f"state[{i}]").copy() for i, t in enumerate(info.state)]

    def fork(self, session_id: str = "") -> StreamingSession:
        """A new session of the same model version that starts from this one's state now (for
        beam search or what-if runs); this session goes on unchanged. Its step count starts at 0."""
        return self._client.open_session(
            self.model, self.version, session_id, initial_state=self.state(), resume=self.resume,
            reconnect=self.reconnect,
        )  # fmt: skip

    def detach(self) -> None:
        """Close the stream but leave the session alive on the server (it follows its idle TTL)."""
        self._closed = True
        self._requests.put(None)

    def __enter__(self) -> StreamingSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.detach()
