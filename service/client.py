"""A small Python client for the native API.

    from service.client import Client
    with Client("127.0.0.1:8001") as client:
        with client.open_session("timer_lstm") as session:
            y = session.step(x)          # x: [steps, features] float32 -> y: [steps, outputs]
            print(session.steps)         # steps the server has applied so far

A session streams over one bidirectional gRPC stream; chunks are sent one at a time and each reply
is awaited, so the session's chunks are applied in order.
"""

from __future__ import annotations

import queue
import random
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service._proto.rnnserve.v1 import streaming_pb2_grpc as pb_grpc
from service.api.native_messages import to_array, to_tensor


class SessionEndedError(RuntimeError):
    """The server ended the session (idle timeout, eviction, shutdown)."""


class SessionLostError(RuntimeError):
    """The session could not be resumed exactly after the server went away: it has no snapshot of
    it, or the snapshot is older than the inputs this client kept."""


RECONNECT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
REPLAY_CHUNK_STEPS = 1024


class StreamingSession:
    """One open session on its own stream. Use as a context manager, or call :meth:`close`.

    With ``resume`` (the default) the session survives a server restart or crash: the client keeps
    the inputs the server has not yet written to a snapshot (the replies' ``durable_steps`` say how
    far it has), and if the stream breaks it reconnects, attaches to the restored session (the same
    incarnation, never another session opened under the id), replays the inputs after the restored
    step and carries on, so the outputs are those of an uninterrupted run. A reply lost in the
    crash is recovered from the session's last output. Every chunk states the step count it
    expects, so none is ever applied twice or onto another history: where exact resumption is
    impossible the client raises :class:`SessionLostError` (or the server's ABORTED).
    """

    def __init__(
        self,
        client: Client,
        open_request: pb.StreamRequest,
        *,
        resume: bool = True,
        reconnect_timeout_s: float = 60.0,
    ) -> None:
        self._client = client
        self.resume = resume
        self.reconnect_timeout_s = reconnect_timeout_s
        self._kept: list[np.ndarray] = []  # inputs not yet in a snapshot, oldest first
        self.reconnects = 0  # times the session was resumed after its stream broke
        self.replayed_steps = 0  # inputs sent again because the restored session lacked them
        self._closed = False
        self._stream_failed = False  # a refused chunk ended the stream; the session lives on
        opened = self._open_stream(open_request)
        self.session_id: str = opened.session_id
        self.model: str = opened.model
        self.version: str = opened.version
        self.incarnation: str = opened.incarnation  # which session of this id it is
        self.steps: int = opened.steps  # steps the server has applied
        self.durable_steps: int = opened.durable_steps  # of those, how many a snapshot holds
        self._kept_from: int = opened.steps  # step index of the first kept input

    def _open_stream(self, request: pb.StreamRequest) -> pb.SessionInfo:
        self._requests: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        self._requests.put(request)
        self._responses: Iterator[pb.StreamResponse] = self._client.stub.Stream(
            iter(self._requests.get, None), metadata=self._client.metadata
        )
        info: pb.SessionInfo = next(self._responses).opened
        return info

    def _exchange(self, chunk: np.ndarray, expected_steps: int) -> pb.StepResponse:
        """Send ``chunk``, stating the step count the session must be at for it to apply (the
        server refuses any other with ABORTED, unapplied: a chunk is never applied twice)."""
        message = pb.Chunk(input=to_tensor(chunk), expected_steps=expected_steps)
        self._requests.put(pb.StreamRequest(chunk=message))
        response = next(self._responses)
        if response.WhichOneof("kind") == "ended":
            reason = response.ended.reason
            if self.resume and reason == pb.END_REASON_SHUTDOWN:
                raise _ServerGone("the server is shutting down")
            self._closed = True
            raise SessionEndedError(
                f"session {self.session_id} ended by the server: {pb.EndReason.Name(reason)}"
            )
        return response.output

    def step(self, x: np.ndarray) -> np.ndarray:
        """Send one chunk [steps, features]; return its outputs [steps, outputs]."""
        chunk = np.ascontiguousarray(x, dtype=np.float32)
        if chunk.ndim == 1:
            chunk = chunk[None]
        if self._stream_failed:
            self._reattach()
        try:
            reply = self._exchange(chunk, self.steps)
            output = to_array(reply.output, "output").copy()
            self._applied(chunk, reply.steps, reply.durable_steps)
        except (grpc.RpcError, _ServerGone) as error:
            if not self.resume or (
                isinstance(error, grpc.RpcError) and error.code() not in RECONNECT_CODES
            ):
                if isinstance(error, grpc.RpcError):
                    self._fail_stream()
                raise
            try:
                output = self._recover(chunk)
            except grpc.RpcError:
                self._fail_stream()
                raise
        return output

    def _fail_stream(self) -> None:
        """A refused chunk ended the stream (the native API's way), not the session: it was not
        applied, so the next call attaches again and goes on."""
        self._requests.put(None)
        self._stream_failed = True

    def _reattach(self) -> None:
        """A new stream to the same session (the same incarnation), which must be where this
        client left it."""
        opened = self._open_stream(
            pb.StreamRequest(
                attach=pb.GetSessionRequest(
                    model=self.model,
                    version=self.version,
                    session_id=self.session_id,
                    incarnation=self.incarnation,
                )
            )
        )
        self._stream_failed = False
        if opened.steps != self.steps:
            raise SessionLostError(
                f"session {self.session_id} is at step {opened.steps}, not {self.steps}: "
                "another client stepped it"
            )

    def _applied(self, chunk: np.ndarray, steps: int, durable_steps: int) -> None:
        self.steps = steps
        self.durable_steps = durable_steps
        if not self.resume:
            return
        self._kept.append(chunk)
        while self._kept and self._kept_from + len(self._kept[0]) <= durable_steps:
            self._kept_from += len(self._kept.pop(0))

    def _recover(self, pending: np.ndarray) -> np.ndarray:
        """Reconnect, attach, replay what the restored session lacks, then apply ``pending``.

        Retried, with backoff, while the server is away or going away (UNAVAILABLE, a shutdown
        notice), for up to ``reconnect_timeout_s``. Each wait is drawn between half and all of the
        backoff, so that the many clients one restart cuts off do not all come back at the same
        instants: a busy server admits new streams at only tens per second (docs/PERFORMANCE.md).
        """
        deadline = time.monotonic() + self.reconnect_timeout_s
        backoff_s = 0.05
        while True:
            self._requests.put(None)  # let go of the broken stream
            try:
                output = self._resume_once(pending)
                self.reconnects += 1
                return output
            except (grpc.RpcError, _ServerGone) as error:
                if isinstance(error, grpc.RpcError):
                    if error.code() == grpc.StatusCode.NOT_FOUND:
                        raise SessionLostError(
                            f"the server came back without session {self.session_id} "
                            f"(no snapshot of it, or only of another session of that id): "
                            f"{error.details()}"
                        ) from error
                    if error.code() not in RECONNECT_CODES:
                        raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(backoff_s / 2, backoff_s))  # restarting; try again
                backoff_s = min(backoff_s * 2, 1.0)

    def _resume_once(self, pending: np.ndarray) -> np.ndarray:
        attach = pb.StreamRequest(
            attach=pb.GetSessionRequest(
                model=self.model,
                version=self.version,
                session_id=self.session_id,
                incarnation=self.incarnation,  # never another session opened under this id
            )
        )
        opened = self._open_stream(attach)
        restored, known = int(opened.steps), self.steps
        if restored == known + len(pending):  # applied before the crash; only the reply was lost
            last = to_array(opened.last_output, "last_output").copy()
            self._applied(pending, restored, int(opened.durable_steps))
            return last
        if not self._kept_from <= restored <= known:
            raise SessionLostError(
                f"session {self.session_id} came back at step {restored}, but this client has "
                f"steps {self._kept_from}..{known} to replay"
            )
        kept = np.concatenate(self._kept) if self._kept else np.empty((0, pending.shape[1]))
        replay = kept[restored - self._kept_from : known - self._kept_from]
        self.replayed_steps += len(replay)
        for start in range(0, len(replay), REPLAY_CHUNK_STEPS):
            part = replay[start : start + REPLAY_CHUNK_STEPS]  # outputs already delivered
            self._exchange(part, restored + start)
        reply = self._exchange(pending, known)
        self._applied(pending, reply.steps, reply.durable_steps)
        return to_array(reply.output, "output").copy()

    def close(self) -> int:
        """Close the session on the server; returns its final step count."""
        if self._closed:
            return self.steps
        if self._stream_failed:
            self._reattach()
        self._closed = True
        self._requests.put(pb.StreamRequest(close=pb.Close()))
        ended = next(self._responses).ended
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
            metadata=self._client.metadata,
        )
        return [to_array(t, f"state[{i}]").copy() for i, t in enumerate(info.state)]

    def fork(self, session_id: str = "") -> StreamingSession:
        """A new session of the same model version that starts from this one's state now (for
        beam search or what-if runs); this session goes on unchanged. Its step count starts at 0."""
        return self._client.open_session(
            self.model, self.version, session_id, initial_state=self.state(), resume=self.resume,
            reconnect_timeout_s=self.reconnect_timeout_s,
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
    """The stream told us the server is going away (shutdown notice)."""


class Client:
    """Connection to an rnnserve server's native API."""

    def __init__(
        self,
        target: str,
        timeout_s: float | None = None,
        options: list[tuple[str, Any]] | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        """``credentials``: TLS (``grpc.ssl_channel_credentials``); ``token``: a bearer token."""
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options or [])
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options or [])
        self.stub = pb_grpc.StreamingInferenceStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

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
        reconnect_timeout_s: float = 60.0,
    ) -> StreamingSession:
        request = pb.StreamRequest(
            open=pb.CreateSessionRequest(
                model=model,
                version=version,
                session_id=session_id,
                initial_state=[to_tensor(s) for s in initial_state or []],
            )
        )
        return StreamingSession(
            self, request, resume=resume, reconnect_timeout_s=reconnect_timeout_s
        )

    def attach(
        self,
        model: str,
        session_id: str,
        version: str = "",
        resume: bool = True,
        reconnect_timeout_s: float = 60.0,
        incarnation: str = "",
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
            self, request, resume=resume, reconnect_timeout_s=reconnect_timeout_s
        )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
