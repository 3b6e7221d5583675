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
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service._proto.rnnserve.v1 import streaming_pb2_grpc as pb_grpc
from service.api.native import to_array, to_tensor


class SessionEndedError(RuntimeError):
    """The server ended the session (idle timeout, eviction, shutdown)."""


class StreamingSession:
    """One open session on its own stream. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        stub: pb_grpc.StreamingInferenceStub,
        open_request: pb.StreamRequest,
        timeout_s: float | None,
    ) -> None:
        self._requests: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        self._requests.put(open_request)
        self._responses: Iterator[pb.StreamResponse] = stub.Stream(
            iter(self._requests.get, None), timeout=timeout_s
        )
        opened = next(self._responses).opened
        self.session_id: str = opened.session_id
        self.model: str = opened.model
        self.version: str = opened.version
        self.steps: int = opened.steps
        self._closed = False

    def step(self, x: np.ndarray) -> np.ndarray:
        """Send one chunk [steps, features]; return its outputs [steps, outputs]."""
        chunk = np.ascontiguousarray(x, dtype=np.float32)
        if chunk.ndim == 1:
            chunk = chunk[None]
        self._requests.put(pb.StreamRequest(chunk=pb.Chunk(input=to_tensor(chunk))))
        response = next(self._responses)
        if response.WhichOneof("kind") == "ended":
            self._closed = True
            raise SessionEndedError(
                f"session {self.session_id} ended by the server: {pb.EndReason.Name(response.ended.reason)}"
            )
        self.steps = response.output.steps
        return to_array(response.output.output, "output").copy()

    def close(self) -> int:
        """Close the session on the server; returns its final step count."""
        if self._closed:
            return self.steps
        self._closed = True
        self._requests.put(pb.StreamRequest(close=pb.Close()))
        ended = next(self._responses).ended
        self._requests.put(None)
        return int(ended.steps)

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


class Client:
    """Connection to an rnnserve server's native API."""

    def __init__(
        self,
        target: str,
        timeout_s: float | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self.channel = grpc.insecure_channel(target, options=options or [])
        self.stub = pb_grpc.StreamingInferenceStub(self.channel)
        self.timeout_s = timeout_s

    def models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s).models)

    def model(self, name: str, version: str = "") -> pb.ModelInfo:
        return self.stub.GetModel(
            pb.GetModelRequest(model=name, version=version), timeout=self.timeout_s
        )

    def open_session(
        self,
        model: str,
        version: str = "",
        session_id: str = "",
        initial_state: list[np.ndarray] | None = None,
    ) -> StreamingSession:
        request = pb.StreamRequest(
            open=pb.CreateSessionRequest(
                model=model,
                version=version,
                session_id=session_id,
                initial_state=[to_tensor(s) for s in initial_state or []],
            )
        )
        return StreamingSession(self.stub, request, None)

    def attach(self, model: str, session_id: str, version: str = "") -> StreamingSession:
        """Continue an existing session (e.g. after a reconnect) on a new stream."""
        request = pb.StreamRequest(
            attach=pb.GetSessionRequest(model=model, version=version, session_id=session_id)
        )
        return StreamingSession(self.stub, request, None)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
