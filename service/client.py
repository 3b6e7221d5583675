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

The client is three modules: this one (:class:`Client`: the connection, the model calls, opening
and attaching sessions), ``service.client_session`` (the streaming session and what its chunks
send) and ``service.client_paths`` (a broken path told from a refusal, the reconnect policy, the
``x-session-id`` routing). Every public name of the three is importable from here.
"""

from __future__ import annotations

import secrets
from typing import Any

import grpc
import numpy as np

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service._proto.rnnserve.v1 import streaming_pb2_grpc as pb_grpc
from service.api.native_messages import to_tensor
from service.client_paths import (
    DEAD_PATH_SIGNATURES,
    RECONNECT_CODES,
    SESSION_HEADER,
    SESSION_STEPS_KEY,
    Reconnect,
    SessionRouting,
    is_dead_path,
    is_server_error,
    routing_metadata,
    routing_value,
)
from service.client_session import (
    REPLAY_CHUNK_STEPS,
    ChunkInputs,
    SessionEndedError,
    SessionLostError,
    StreamingSession,
)

__all__ = [
    "DEAD_PATH_SIGNATURES",
    "RECONNECT_CODES",
    "REPLAY_CHUNK_STEPS",
    "SESSION_HEADER",
    "SESSION_STEPS_KEY",
    "ChunkInputs",
    "Client",
    "Reconnect",
    "SessionEndedError",
    "SessionLostError",
    "StreamingSession",
    "is_dead_path",
    "is_server_error",
    "routing_metadata",
    "routing_value",
]


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
            grpc.intercept_channel(self.channel, SessionRouting())
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
