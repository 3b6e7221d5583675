"""A small Python client for the native API.

    from service.client import Client
    with Client("127.0.0.1:8001") as client:
        with client.open_session("timer_lstm") as session:
            y = session.step(x)          # x: [steps, features] float32 -> y: [steps, outputs]
            print(session.steps)         # steps the server has applied so far

A session streams over one bidirectional gRPC stream; chunks are sent one at a time and each reply
is awaited, so the session's chunks are applied in order.

Behind a load balancer: every call and stream of a session carries the session id as the gRPC
metadata ``x-session-id`` (nginx ``hash $http_x_session_id consistent``, Envoy ``RING_HASH``), and a
session whose path to its server breaks (the server restarted, or the proxy lost it) reconnects and
resumes exactly (docs/SCALING.md).
"""

from __future__ import annotations

import dataclasses
import queue
import random
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple

import grpc
import numpy as np

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service._proto.rnnserve.v1 import streaming_pb2_grpc as pb_grpc
from service.api.native_messages import to_array, to_tensor


class SessionEndedError(RuntimeError):
    """The server ended the session (idle timeout, eviction, shutdown)."""


class SessionLostError(RuntimeError):
    """The session cannot go on exactly after its stream broke: the server has no snapshot of it
    (or only of another session of its id), it came back behind the inputs this client kept, or
    the chunk of an earlier call that failed was applied after all (send that chunk again)."""


RECONNECT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
REPLAY_CHUNK_STEPS = 1024

# The routing key: a load balancer hashes it so that every call of a session reaches one server.
SESSION_HEADER = "x-session-id"
# Trailing metadata the server puts on every error about a session's chunk (its step count): an
# error that carries it comes from an rnnserve server, never from a proxy (service.api.status).
SESSION_STEPS_KEY = "rnnserve-session-steps"
# What gRPC reports when a proxy lost the path to the server (the server died or restarted under
# a stream, or could not be reached): nginx resets the stream ("Stream removed (RST_STREAM
# (Received RST_STREAM with error code 2))", INTERNAL), Envoy says "upstream connect error ...",
# and a proxy answering with an HTTP error instead of gRPC gets its status in the message (502,
# 503 and 504 as UNAVAILABLE, which is retried anyway; others as UNKNOWN). Matched in the details
# of INTERNAL and UNKNOWN errors only, lower-cased; an rnnserve server's own INTERNAL errors say
# "model ... failed" or "internal error (...)" and are never retried.
DEAD_PATH_SIGNATURES = (
    "stream removed",
    "rst_stream",
    "upstream connect error",
    "upstream prematurely closed",
    "upstream reset",
    "no healthy upstream",
    "connection reset",
    "socket closed",
    "goaway",
    "status: 502",
    "status: 503",
    "status: 504",
    "bad gateway",
    "gateway timeout",
)


def routing_value(session_id: str) -> str:
    """The ``x-session-id`` value for a session: the id itself, or, for an id that is not visible
    ASCII (which gRPC metadata cannot carry as it is), its UTF-8 percent-encoded. Any client of the
    session must send the same value (tritonclient users: ``str(sequence_id)``)."""
    if session_id and all("!" <= c <= "~" for c in session_id):
        return session_id
    return urllib.parse.quote(session_id, safe="")


def routing_metadata(session_id: str) -> tuple[tuple[str, str], ...]:
    """The metadata that routes a call of ``session_id`` (none for an id not known yet)."""
    return ((SESSION_HEADER, routing_value(session_id)),) if session_id else ()


def is_server_error(error: grpc.RpcError) -> bool:
    """Whether ``error`` visibly comes from an rnnserve server: it carries the session's step
    count in its trailing metadata."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return any(key == SESSION_STEPS_KEY for key, _ in trailing or ())


def is_dead_path(error: grpc.RpcError) -> bool:
    """Whether ``error`` says that the path to the server went away (reconnect and resume), rather
    than that the server refused or failed the call (raise it): UNAVAILABLE or CANCELLED, or an
    INTERNAL or UNKNOWN that no server sent and that reads as a proxy's (:data:`DEAD_PATH_SIGNATURES`).
    """
    code = error.code()
    if code in RECONNECT_CODES:
        return True
    if code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) or is_server_error(error):
        return False
    details = (error.details() or "").lower()
    return any(signature in details for signature in DEAD_PATH_SIGNATURES)


@dataclasses.dataclass(frozen=True)
class Reconnect:
    """How a session reconnects after its stream breaks: at most ``attempts`` tries, for at most
    ``timeout_s`` seconds in all, waiting before each further try a random time between half and
    all of a backoff that starts at ``first_backoff_s`` and doubles up to ``max_backoff_s``."""

    timeout_s: float = 60.0
    attempts: int = 100
    first_backoff_s: float = 0.05
    max_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.timeout_s < 0 or self.first_backoff_s <= 0:
            raise ValueError(f"a reconnect policy needs attempts >= 1 and a backoff > 0: {self}")
        if self.max_backoff_s < self.first_backoff_s:
            raise ValueError(f"max_backoff_s is below first_backoff_s: {self}")


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
        except _ServerGone as error:  # not retried: an open may have been applied
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
            raise _ServerGone(f"the stream answered {first.WhichOneof('kind')} before the session")
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
            raise _ServerGone("the stream ended without a reply") from None
        raise _ServerGone("the stream answered with something that is not an rnnserve reply")

    def _exchange(self, chunk: ChunkInputs, expected_steps: int) -> pb.StepResponse:
        """Send ``chunk``, stating the step count the session must be at for it to apply (the
        server refuses any other with ABORTED, unapplied: a chunk is never applied twice)."""
        message = chunk.message(expected_steps)
        self._requests.put(pb.StreamRequest(chunk=message))
        response = self._next_response()
        if response.WhichOneof("kind") == "ended":
            reason = response.ended.reason
            if self.resume and reason == pb.END_REASON_SHUTDOWN:
                raise _ServerGone("the server is shutting down")
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
        except (grpc.RpcError, _ServerGone) as error:
            return self._after_break(chunk, error)
        self._applied(chunk, reply.steps, reply.durable_steps)
        return self._outputs(reply)

    def _outputs(self, reply: pb.StepResponse) -> np.ndarray:
        """A reply's outputs (and, for a model of several, :attr:`last_outputs` by name)."""
        self.last_outputs = {name: to_array(t, name).copy() for name, t in reply.outputs.items()}
        return to_array(reply.output, "output").copy()

    def _after_break(self, chunk: ChunkInputs, error: grpc.RpcError | _ServerGone) -> np.ndarray:
        if isinstance(error, grpc.RpcError) and not is_dead_path(error):
            self._fail_stream()  # the server refused it: not applied
            raise error
        if self._unresolved is None:  # sent, so perhaps applied: only the server knows
            self._unresolved = chunk
        self.breaks.append(_describe(error))
        try:
            if not self.resume:
                raise error
            return self._recover(chunk)
        except (grpc.RpcError, _ServerGone) as failed:
            self._fail_stream()
            if isinstance(failed, _ServerGone):
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
            except (grpc.RpcError, _ServerGone) as error:
                retry = not isinstance(error, grpc.RpcError) or (
                    is_dead_path(error) or _in_flight_still(error)
                )
                if not retry or attempt == policy.attempts or time.monotonic() > deadline:
                    raise
                self.breaks.append(_describe(error))
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
        except _ServerGone as error:
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


class _ServerGone(Exception):
    """The stream told us the server is going away (shutdown notice), or ended without a reply."""


def _in_flight_still(error: grpc.RpcError) -> bool:
    """The server refused a resumed chunk because the previous stream's send of it (or of one
    before it) may still be computing: the path broke, not the server. Attaching again shows
    whether it was applied."""
    code = error.code()
    if code == grpc.StatusCode.ABORTED:  # applied meanwhile: the next attach shows it
        return True
    return code == grpc.StatusCode.FAILED_PRECONDITION and "in flight" in (error.details() or "")


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        code = error.code()
        return f"{code.name if code is not None else 'RpcError'}: {error.details()}"
    return f"{type(error).__name__.lstrip('_')}: {error}"


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class _SessionRouting(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds ``x-session-id`` to every unary call whose request names a session (CreateSession with
    a named id, Step, GetSession, CloseSession): made through :attr:`Client.stub` by this library
    or its user, they reach the server that holds the session. Streams get it when opened."""

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], details: Any, request: Any
    ) -> Any:
        session_id = getattr(request, "session_id", "")
        metadata = tuple(details.metadata or ())
        if session_id and not any(key == SESSION_HEADER for key, _ in metadata):
            details = _CallDetails(
                details.method, details.timeout, metadata + routing_metadata(session_id),
                details.credentials, details.wait_for_ready, details.compression,
            )  # fmt: skip
        return continuation(details, request)


class Client:
    """Connection to an rnnserve server's native API (or to a load balancer in front of several:
    docs/SCALING.md)."""

    def __init__(
        self,
        target: str,
        timeout_s: float | None = None,
        options: list[tuple[str, Any]] | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        reconnect: Reconnect | None = None,
        name_sessions: bool = False,
    ) -> None:
        """``credentials``: TLS (``grpc.ssl_channel_credentials``); ``token``: a bearer token;
        ``reconnect``: how sessions reconnect after their stream breaks (default
        :class:`Reconnect`). ``name_sessions``: a session opened without an id gets one drawn
        here (128 random bits, as the server draws them) instead of by the server, so that even
        its first call carries ``x-session-id`` and a load balancer that hashes it routes the
        open where every later call of the session goes."""
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options or [])
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options or [])
        self.stub = pb_grpc.StreamingInferenceStub(
            grpc.intercept_channel(self.channel, _SessionRouting())
        )
        self.timeout_s = timeout_s
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.reconnect = reconnect or Reconnect()
        self.name_sessions = name_sessions

    def models(self) -> list[pb.ModelInfo]:
        """The models the server serves."""
        return list(self.repository().models)

    def repository(self) -> pb.ListModelsResponse:
        """The models the server serves, and those of its repository it refused (with why)."""
        reply: pb.ListModelsResponse = self.stub.ListModels(
            pb.ListModelsRequest(), timeout=self.timeout_s, metadata=self.metadata
        )
        return reply

    def model(self, name: str, version: str = "") -> pb.ModelInfo:
        info: pb.ModelInfo = self.stub.GetModel(
            pb.GetModelRequest(model=name, version=version),
            timeout=self.timeout_s,
            metadata=self.metadata,
        )
        return info

    def open_session(
        self,
        model: str,
        version: str = "",
        session_id: str = "",
        initial_state: list[np.ndarray] | None = None,
        resume: bool = True,
        reconnect_timeout_s: float | None = None,
        reconnect: Reconnect | None = None,
    ) -> StreamingSession:
        """A new session on its own stream (``session_id``: named by the caller; "" lets the
        server draw one, or this client with ``name_sessions``). ``reconnect`` (or just its
        ``reconnect_timeout_s``) overrides the client's policy for this session."""
        if not session_id and self.name_sessions:
            session_id = secrets.token_hex(16)
        request = pb.StreamRequest(
            open=pb.CreateSessionRequest(
                model=model,
                version=version,
                session_id=session_id,
                initial_state=[to_tensor(s) for s in initial_state or []],
            )
        )
        return StreamingSession(
            self, request, resume=resume, reconnect_timeout_s=reconnect_timeout_s,
            reconnect=reconnect,
        )  # fmt: skip

    def attach(
        self,
        model: str,
        session_id: str,
        version: str = "",
        resume: bool = True,
        reconnect_timeout_s: float | None = None,
        incarnation: str = "",
        reconnect: Reconnect | None = None,
    ) -> StreamingSession:
        """Continue an existing session (e.g. after a reconnect) on a new stream. ``incarnation``
        (the session's ``incarnation`` as this client knew it): refuse any other session under
        the id, and go on with one the server restored after an unclean stop."""
        request = pb.StreamRequest(
            attach=pb.GetSessionRequest(
                model=model, version=version, session_id=session_id, incarnation=incarnation
            )
        )
        return StreamingSession(
            self, request, resume=resume, reconnect_timeout_s=reconnect_timeout_s,
            reconnect=reconnect,
        )  # fmt: skip

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
