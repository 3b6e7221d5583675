"""Routing through a real nginx (Debian's package) running the shipped deploy/nginx/rnnserve.conf in
front of three ``rnnserve serve`` replicas, all on loopback (issue #19, item 6).

The Python client sends every call and stream of a session with ``x-session-id``, and nginx's
``hash $http_x_session_id consistent`` sends them all to one replica; when the path to that replica
breaks (the replica stops or dies and comes back on its port, or nginx itself restarts) the client
reconnects and resumes exactly; an error the server sent goes to the caller, never retried.
tritonclient passes the same header with ``headers=`` (tests/nginx_tritonclient_probe.py).

The shipped file is for replicas that form a cluster (a shared cluster store: any replica serves
any session), so it passes a call whose replica refuses the connection to the next replica. These
replicas are not a cluster (each keeps its own snapshots): a session survives its replica's
restart, not a move. So most tests run the file as its own comment says to write it for such
replicas (:func:`per_replica_config`: no failover), and one runs it unchanged and checks where
its failover sends each call.
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service._proto.rnnserve.v1 import streaming_pb2_grpc as pb_grpc
from service.api.native_messages import to_array, to_tensor
from service.client import (
    SESSION_STEPS_KEY,
    Client,
    Reconnect,
    SessionLostError,
    StreamingSession,
    is_dead_path,
    is_server_error,
    routing_value,
)
from tests.models_for_tests import OfflineReference
from tests.nginx_server import Nginx, nginx, nginx_binary
from tests.server_process import ServerProcess, free_port, serve_command

ROOT = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).with_name("nginx_tritonclient_probe.py")
MODELS = ("tiny_lstm", "tiny_gru")  # both take 3 features
FEATURES = 3
REPLICAS = 3
ATOL = 1e-5
# Periodic snapshots every second (none when idle): a replica killed with -9 comes back with its
# sessions as they were up to a second before, and the clients replay the rest.
SERVER_FLAGS = ("--snapshot-interval-s", "1", "--snapshot-when-idle-s", "0",
                "--session-ttl-s", "0", "--intra-op-threads", "1")  # fmt: skip
# Quick reconnects for the test (the defaults are for real networks).
FAST = Reconnect(timeout_s=30.0, attempts=200, first_backoff_s=0.02, max_backoff_s=0.2)
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                   ("grpc.max_reconnect_backoff_ms", 300)]  # fmt: skip


class Replica(ServerProcess):
    """``python -m service.cli serve`` on its own fixed port and snapshot directory, which a
    restart keeps (as a replica restarted on its machine does)."""

    def __init__(self, repository: Path, state: Path) -> None:
        self.port = free_port()
        super().__init__(
            serve_command(repository, self.port, "--snapshot-dir", str(state), *SERVER_FLAGS)
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, signum: int = signal.SIGTERM) -> int:
        return self.signal(signum)

    def holds(self, model: str, session_id: str) -> bool:
        """Asked on its own port, not through nginx: does this replica hold the session?"""
        with grpc.insecure_channel(self.address) as ch:
            try:
                pb_grpc.StreamingInferenceStub(ch).GetSession(
                    pb.GetSessionRequest(model=model, session_id=session_id), timeout=10
                )
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND, error
                return False
        return True


def per_replica_config(text: str) -> str:
    """The shipped configuration as its comment says to write it for replicas that are not a
    cluster: ``max_fails=0`` on every server line and ``grpc_next_upstream off`` (a replica that is
    down fails its sessions' calls until it is back, instead of passing them to a replica that
    does not know them)."""
    text, servers = re.subn(r" max_fails=1 fail_timeout=10s;", " max_fails=0;", text)
    text, passes = re.subn(r"^( *)grpc_next_upstream error timeout;",
                           r"\1grpc_next_upstream off;", text, flags=re.M)  # fmt: skip
    assert servers >= 2 and passes == 1, "deploy/nginx/rnnserve.conf: failover lines not found"
    return text


class PerReplicaNginx(Nginx):
    """:class:`Nginx` running :func:`per_replica_config` of the shipped file."""

    def __init__(self, directory: Path, replica_ports: list[int], port: int = 0) -> None:
        super().__init__(directory, replica_ports, port)
        config = directory / "rnnserve.conf"
        config.write_text(per_replica_config(config.read_text()))


class Cluster:
    def __init__(self, repository: Path, directory: Path) -> None:
        self.repository = repository
        self.replicas = [Replica(repository, directory / f"state{i}") for i in range(REPLICAS)]
        for replica in self.replicas:  # start together, then wait for each
            replica.launch()
        for replica in self.replicas:
            replica.wait_serving()
        self.nginx = PerReplicaNginx(directory / "nginx", [r.port for r in self.replicas])
        self.nginx.check()
        self.nginx.start()
        self.references = {m: OfflineReference(repository, m) for m in MODELS}

    def heal(self) -> None:
        """Every replica running (a test may have stopped one)."""
        for replica in self.replicas:
            if not replica.alive():
                replica.start()

    def holder(self, model: str, session_id: str) -> Replica:
        """The one replica that holds the session (asked on each replica's port)."""
        holders = [r for r in self.replicas if r.holds(model, session_id)]
        assert len(holders) == 1, f"session {session_id} is held by {len(holders)} replicas"
        return holders[0]

    def stop(self) -> None:
        self.nginx.stop()
        for replica in self.replicas:
            if replica.alive():
                replica.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster_once(
    tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    nginx_binary()  # fails at once, saying how to install it, when nginx is missing
    cluster = Cluster(tiny_repository, tmp_path_factory.mktemp("nginx-routing"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(cluster_once: Cluster) -> Cluster:
    cluster_once.heal()
    return cluster_once


def chunked(rng: np.random.Generator, chunks: int, longest: int = 6) -> list[np.ndarray]:
    """Inputs in chunks of mixed lengths (1..longest steps)."""
    return [rng.standard_normal((int(n), FEATURES)).astype(np.float32)
            for n in rng.integers(1, longest + 1, chunks)]  # fmt: skip


def assert_exact(
    cluster: Cluster, model: str, chunks: list[np.ndarray], outputs: list[Any]
) -> None:
    x, y = np.concatenate(chunks), np.concatenate(outputs)
    np.testing.assert_allclose(y, cluster.references[model](x), atol=ATOL)


def wait_for(condition: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# Telling a dead path from the server's own error (no nginx needed)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[Any, ...] = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[Any, ...]:
        return self._trailing


S = grpc.StatusCode
NGINX_RESET = "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))"
ENVOY_RESET = "upstream connect error or disconnect/reset before headers. reset reason: overflow"


@pytest.mark.parametrize(
    ("code", "details", "trailing", "dead"),
    [
        (S.INTERNAL, NGINX_RESET, (), True),  # nginx: the replica died under the stream
        (S.UNAVAILABLE, "Received http2 header with status: 502", (), True),  # nginx: none there
        (S.UNAVAILABLE, "Stream removed (Socket closed)", (), True),  # nginx itself went away
        (S.UNKNOWN, "Received RST_STREAM with error code 8", (), True),
        (S.INTERNAL, ENVOY_RESET, (), True),
        (S.UNAVAILABLE, "the server is shutting down; retry shortly", (), True),  # ours: retried
        # The server's own errors, through nginx or not: raised.
        (S.INTERNAL, NGINX_RESET, ((SESSION_STEPS_KEY, "4"),), False),  # a server said it
        (S.INTERNAL, "model tiny_lstm/1 failed: RuntimeError", ((SESSION_STEPS_KEY, "4"),), False),
        (S.INTERNAL, "internal error (ValueError); see the server log", (), False),
        (S.UNKNOWN, "Received http2 header with status: 500", (), False),
        (S.INVALID_ARGUMENT, "model tiny_lstm/1 takes 3 features per step, got 4", (), False),
        (S.NOT_FOUND, "session 'x' not found (never opened, closed or expired)", (), False),
        (S.ABORTED, "session 'x' is at step 2, this chunk expected step 9: not applied", (), False),
        (S.DEADLINE_EXCEEDED, "Deadline Exceeded", (), False),
    ],
)
def test_a_dead_path_is_told_from_the_servers_own_error(
    code: grpc.StatusCode, details: str, trailing: tuple[Any, ...], dead: bool
) -> None:
    assert is_dead_path(FakeRpcError(code, details, trailing)) is dead


def test_the_client_knows_the_servers_metadata_key_and_sends_header_safe_ids() -> None:
    from service.api.status import SESSION_STEPS_KEY as servers

    assert servers == SESSION_STEPS_KEY
    assert routing_value("42") == "42"
    assert routing_value("user:7/a") == "user:7/a"
    assert routing_value("a b") == "a%20b"  # not visible ASCII: percent-encoded UTF-8
    assert routing_value("é") == "%C3%A9"
    with pytest.raises(ValueError, match="attempts"):
        Reconnect(attempts=0)


class ScriptedServer:
    """A stand-in for ``Client.stub`` (one server behind a proxy) for the client's resume logic
    alone, with faults scripted by the test. One session, whose "model" answers each step with its
    input plus the step's index in the session: a chunk applied twice or skipped shows."""

    def __init__(self) -> None:
        self.steps = 0
        self.last: np.ndarray | None = None
        self.cut_before_apply = 0  # chunks the path loses on their way
        self.cut_after_apply = 0  # chunks applied whose reply the path then loses
        self.cut_in_flight = 0  # chunks the path loses while they still compute
        self.computing: np.ndarray | None = None  # such a chunk: done when the next one comes
        self.attach_refusals = 0  # attaches answered UNAVAILABLE (the replica is away)
        self.applied: list[int] = []  # the length of every chunk applied
        self.metadata: list[dict[str, str]] = []  # every stream's

    @staticmethod
    def offline(x: np.ndarray) -> np.ndarray:
        return x + np.arange(len(x), dtype=np.float32)[:, None]

    def Stream(self, requests: Iterator[pb.StreamRequest], metadata: Any = ()) -> Any:
        self.metadata.append(dict(metadata))
        return self._serve(requests)

    def _opened(self) -> pb.StreamResponse:
        info = pb.SessionInfo(session_id="s", model="m", version="1", steps=self.steps,
                              durable_steps=self.steps, incarnation="i1")  # fmt: skip
        if self.last is not None:
            info.last_output.CopyFrom(to_tensor(self.last))
        return pb.StreamResponse(opened=info)

    def _apply(self, x: np.ndarray) -> np.ndarray:
        y = x + np.arange(self.steps, self.steps + len(x), dtype=np.float32)[:, None]
        self.steps += len(x)
        self.last = y
        self.applied.append(len(x))
        return y

    def _serve(self, requests: Iterator[pb.StreamRequest]) -> Iterator[pb.StreamResponse]:
        for request in requests:
            kind = request.WhichOneof("kind")
            if kind == "attach" and self.attach_refusals:
                self.attach_refusals -= 1
                raise FakeRpcError(S.UNAVAILABLE, "nginx: no answer from the replica")
            if kind in ("open", "attach"):
                yield self._opened()
            elif kind == "close":
                yield pb.StreamResponse(ended=pb.SessionEnded(session_id="s", steps=self.steps))
            elif self.cut_before_apply:
                self.cut_before_apply -= 1
                raise FakeRpcError(S.INTERNAL, NGINX_RESET)
            elif self.cut_in_flight:
                self.cut_in_flight -= 1
                self.computing = to_array(request.chunk.input, "input")
                raise FakeRpcError(S.INTERNAL, NGINX_RESET)
            elif self.computing is not None:  # the lost one finishes; this one is refused
                self._apply(self.computing)
                self.computing = None
                steps = ((SESSION_STEPS_KEY, str(self.steps)),)
                raise FakeRpcError(S.FAILED_PRECONDITION, "already has a chunk in flight", steps)
            else:
                x = to_array(request.chunk.input, "input")
                if request.chunk.expected_steps != self.steps:
                    raise FakeRpcError(S.ABORTED, "not applied", ((SESSION_STEPS_KEY, "0"),))
                y = self._apply(x)
                if self.cut_after_apply:
                    self.cut_after_apply -= 1
                    raise FakeRpcError(S.INTERNAL, NGINX_RESET)  # applied; its reply is lost
                reply = pb.StepResponse(session_id="s", output=to_tensor(y), steps=self.steps,
                                        durable_steps=self.steps)  # fmt: skip
                yield pb.StreamResponse(output=reply)


def scripted_session(
    policy: Reconnect, token: str | None = None
) -> tuple[ScriptedServer, StreamingSession]:
    server = ScriptedServer()
    client = Client("127.0.0.1:9", reconnect=policy, token=token)  # the stub is scripted
    client.stub = server  # type: ignore[assignment]
    return server, client.open_session("m", session_id="s")


def test_a_reply_lost_on_the_path_is_recovered_once_from_the_last_output() -> None:
    token = "t" * 20
    server, session = scripted_session(Reconnect(attempts=5, first_backoff_s=0.001), token)
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    outputs = [session.step(x[:2])]
    server.cut_after_apply = 1
    outputs.append(session.step(x[2:5]))  # applied, reply lost: recovered, not sent again
    outputs.append(session.step(x[5:]))
    np.testing.assert_array_equal(np.concatenate(outputs), server.offline(x))
    assert server.applied == [2, 3, 1] and session.reconnects == 1
    # The open and the attach: both routed, both with the bearer token.
    assert server.metadata == [{"authorization": f"Bearer {token}", "x-session-id": "s"}] * 2


def test_a_chunk_whose_call_failed_on_the_path_is_settled_by_the_next_call() -> None:
    """The path breaks after the chunk was applied and stays broken for every retry: the call
    raises. The next call finds the chunk applied: with another chunk it raises SessionLostError
    (the caller believes the first was not applied); with the same chunk it returns that chunk's
    outputs without applying it again, and the session goes on exactly."""
    server, session = scripted_session(Reconnect(attempts=3, first_backoff_s=0.001))
    x = np.arange(16, dtype=np.float32).reshape(8, 2)
    outputs = [session.step(x[:2])]
    server.cut_after_apply, server.attach_refusals = 1, 3
    with pytest.raises(grpc.RpcError) as away:
        session.step(x[2:5])
    assert away.value.code() == grpc.StatusCode.UNAVAILABLE and len(session.breaks) == 3
    with pytest.raises(SessionLostError, match="applied after all"):
        session.step(x[5:])
    outputs.append(session.step(x[2:5]))  # the same chunk again: its outputs, once
    outputs.append(session.step(x[5:]))
    np.testing.assert_array_equal(np.concatenate(outputs), server.offline(x))
    assert server.applied == [2, 3, 3]


def test_a_chunk_still_computing_when_the_path_broke_is_waited_for_not_sent_twice() -> None:
    """The path broke while the chunk computed on a live server (nginx restarted): the resent
    chunk is refused (in flight), and the next attach finds it applied: its outputs, once."""
    server, session = scripted_session(Reconnect(attempts=5, first_backoff_s=0.001))
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    outputs = [session.step(x[:2])]
    server.cut_in_flight = 1
    outputs.append(session.step(x[2:4]))
    outputs.append(session.step(x[4:]))
    np.testing.assert_array_equal(np.concatenate(outputs), server.offline(x))
    assert server.applied == [2, 2, 2] and session.reconnects == 1
    assert [b.split(":")[0] for b in session.breaks] == ["INTERNAL", "FAILED_PRECONDITION"]


def test_a_chunk_whose_call_failed_before_it_was_applied_is_simply_sent_again() -> None:
    server, session = scripted_session(Reconnect(attempts=2, first_backoff_s=0.001))
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    outputs = [session.step(x[:2])]
    server.cut_before_apply, server.attach_refusals = 1, 2
    with pytest.raises(grpc.RpcError):
        session.step(x[2:4])
    outputs.append(session.step(x[2:4]))
    outputs.append(session.step(x[4:]))
    np.testing.assert_array_equal(np.concatenate(outputs), server.offline(x))
    assert server.applied == [2, 2, 1]


# ---------------------------------------------------------------------------------------------
# (a) every call of a session reaches one replica


def test_sessions_through_nginx_each_stay_on_one_replica_and_equal_the_offline_run(
    cluster: Cluster,
) -> None:
    """24 streamed sessions (ids named by the caller, or drawn by the client with name_sessions)
    and 6 driven by unary calls through ``Client.stub``, both models, chunks of 1-6 steps; half
    way every stream is detached and attached again and the state read by a unary GetSession,
    each a new call that nginx routes on its own. Each session is then held by exactly one
    replica (asked on the replicas' own ports), every call nginx logged for it went there, and its
    outputs equal the offline run."""
    rng = np.random.default_rng(19)
    streamed, unary, chunks = 24, 6, 8
    target = cluster.nginx.target
    with Client(target, name_sessions=True, reconnect=FAST) as client:
        plans: list[tuple[str, list[np.ndarray], list[Any]]] = []
        sessions: list[StreamingSession] = []
        for i in range(streamed):
            model = MODELS[i % 2]
            sessions.append(client.open_session(model, session_id=f"route-{i}" if i % 2 else ""))
            plans.append((model, chunked(rng, chunks), []))
        for k in range(chunks):
            for i, session in enumerate(sessions):
                model, inputs, outputs = plans[i]
                if k == chunks // 2:
                    assert len(session.state()) == (2 if model == "tiny_lstm" else 1)
                    session.detach()  # a new stream, routed anew
                    session = sessions[i] = client.attach(
                        model, session.session_id, incarnation=session.incarnation
                    )
                outputs.append(session.step(inputs[k]))
        ids = [s.session_id for s in sessions]
        for i in range(unary):  # CreateSession, Step, GetSession, CloseSession: headers added
            model, session_id = MODELS[i % 2], f"unary-{i}"
            inputs, outputs = chunked(rng, chunks), []
            client.stub.CreateSession(pb.CreateSessionRequest(model=model, session_id=session_id))
            for k, x in enumerate(inputs):
                reply = client.stub.Step(
                    pb.StepRequest(model=model, session_id=session_id, input=to_tensor(x),
                                   expected_steps=sum(len(c) for c in inputs[:k]))
                )  # fmt: skip
                outputs.append(to_array(reply.output, "output"))
            client.stub.GetSession(pb.GetSessionRequest(model=model, session_id=session_id))
            plans.append((model, inputs, outputs))
            ids.append(session_id)

        holders = [cluster.holder(plans[i][0], session_id) for i, session_id in enumerate(ids)]
        for session in sessions:
            assert session.reconnects == 0 and session.breaks == []
            session.close()
        for i in range(unary):
            client.stub.CloseSession(
                pb.CloseSessionRequest(model=MODELS[i % 2], session_id=f"unary-{i}")
            )
    for model, inputs, outputs in plans:
        assert_exact(cluster, model, inputs, outputs)
    assert len({h.port for h in holders}) >= 2, "the sessions should spread over the replicas"

    # nginx's own account: every call that named a session went to its holder. Streamed: the
    # open, GetSession, the attached stream; unary: Create, the Steps, GetSession, Close.
    expected = {sid: 3 if i < streamed else chunks + 3 for i, sid in enumerate(ids)}

    def logged() -> dict[str, list[str]]:
        seen: dict[str, list[str]] = {}
        for session_id, upstream, status, _ in cluster.nginx.access_log():
            if session_id in expected:
                assert status == "200"
                seen.setdefault(session_id, []).append(upstream)
        return seen

    wait_for(lambda: all(len(logged().get(s, [])) >= n for s, n in expected.items()),
             "nginx to log every call")  # fmt: skip
    seen = logged()
    for session_id, holder in zip(ids, holders, strict=True):
        assert set(seen[session_id]) == {holder.address}, session_id


# ---------------------------------------------------------------------------------------------
# (b) the path breaks: the replica restarts, or nginx does


def stream_through_a_restart(
    sessions: list[StreamingSession], plans: list[list[np.ndarray]], replica: Replica, signum: int
) -> list[list[np.ndarray]]:
    """Each session streams its plan in its own thread. Once every one is a third of the way,
    ``replica`` gets ``signum`` while they go on; none goes past two thirds before it has exited,
    so every session streams while it stops, while it is away and once it is back: the replica
    starts again on its port and snapshot directory right away."""
    progressed = threading.Barrier(len(sessions) + 1)
    stopped = threading.Event()
    outputs: list[list[np.ndarray]] = [[] for _ in sessions]
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            for k, x in enumerate(plans[i]):
                if k == len(plans[i]) // 3:
                    progressed.wait(timeout=60)
                if k == 2 * len(plans[i]) // 3:
                    assert stopped.wait(timeout=120), "the replica never stopped"
                outputs[i].append(sessions[i].step(x))
        except BaseException as error:  # reported by the main thread
            errors.append(error)
            progressed.abort()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    try:
        progressed.wait(timeout=60)
        replica.stop(signum)
        stopped.set()
        replica.start()
    except threading.BrokenBarrierError:
        pass  # a client failed before the fault: its error is raised below
    finally:
        stopped.set()
        for t in threads:
            t.join(timeout=120)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a client thread did not finish"
    return outputs


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_a_session_resumes_exactly_when_its_replica_restarts_behind_nginx(
    cluster: Cluster, signum: int
) -> None:
    """9 sessions stream through nginx; the replica holding the first is stopped (SIGTERM: it
    drains and writes a final snapshot; kill -9: only the periodic snapshot taken after each
    session's first chunk) and started again on its port and snapshot directory while they
    stream. Its sessions see nginx's dead-path errors (a reset stream, UNAVAILABLE while it is
    away), reconnect through nginx and resume, replaying what the snapshot lacks: every output
    equals the offline run, and the other replicas' sessions never notice."""
    rng = np.random.default_rng(int(signum))
    count, chunks = 9, 30
    with Client(cluster.nginx.target, name_sessions=True, reconnect=FAST,
                options=CHANNEL_OPTIONS) as client:  # fmt: skip
        models = [MODELS[i % 2] for i in range(count)]
        sessions = [client.open_session(m) for m in models]
        plans = [chunked(rng, chunks, longest=4) for _ in range(count)]
        victim = cluster.holder(models[0], sessions[0].session_id)
        on_victim = [
            cluster.holder(m, s.session_id) is victim for m, s in zip(models, sessions, strict=True)
        ]
        # A first chunk each, then a snapshot of every session (or a kill -9 would rightly lose
        # it); snapshots come every second, so the kill finds the sessions ahead of theirs.
        first = [[session.step(plan[0])] for session, plan in zip(sessions, plans, strict=True)]
        for session in sessions:
            wait_for(lambda s=session: durable_steps(client, s) > 0, "a snapshot of it")
        rest = [plan[1:] for plan in plans]
        outputs = stream_through_a_restart(sessions, rest, victim, signum)
        for session in sessions:
            session.close()

    divergences = 0
    for model, plan, head, out in zip(models, plans, first, outputs, strict=True):
        x, y = np.concatenate(plan), np.concatenate(head + out)
        divergences += not np.allclose(y, cluster.references[model](x), atol=ATOL)
    breaks = [b for s, v in zip(sessions, on_victim, strict=True) if v for b in s.breaks]
    print(
        f"\n{signal.Signals(signum).name}: {count} sessions ({sum(on_victim)} on the restarted "
        f"replica), {sum(len(np.concatenate(p)) for p in plans)} steps, divergences "
        f"{divergences}, reconnects {[s.reconnects for s in sessions]}, replayed "
        f"{[s.replayed_steps for s in sessions]}; breaks {sorted(set(breaks))[:5]}"
    )
    assert divergences == 0
    for session, moved in zip(sessions, on_victim, strict=True):
        assert (session.reconnects >= 1) if moved else (session.reconnects == 0), session.breaks
        if signum == signal.SIGTERM:  # the final snapshot holds every accepted chunk
            assert session.replayed_steps == 0
    assert any("nginx: no answer from the replica" in b for b in breaks), breaks  # while away
    if signum == signal.SIGKILL:  # nginx resets the streams whose replica died
        assert any(b.startswith("INTERNAL") and "RST_STREAM" in b for b in breaks), breaks
        assert any(s.replayed_steps for s in sessions), "the kill found every session snapshotted"


def test_sessions_resume_exactly_when_nginx_itself_restarts(cluster: Cluster) -> None:
    """The replicas live on; nginx stops (its streams cut) and a new one starts on its port. Every
    session attaches again where it was: nothing to replay, outputs exact."""
    rng = np.random.default_rng(7)
    with Client(cluster.nginx.target, name_sessions=True, reconnect=FAST,
                options=CHANNEL_OPTIONS) as client:  # fmt: skip
        models = [MODELS[i % 2] for i in range(6)]
        sessions = [client.open_session(m) for m in models]
        plans = [chunked(rng, 12) for _ in models]
        outputs: list[list[np.ndarray]] = [[] for _ in models]
        for k in range(12):
            if k == 6:
                cluster.nginx.stop()
                cluster.nginx = PerReplicaNginx(cluster.nginx.directory,
                                                [r.port for r in cluster.replicas],
                                                port=cluster.nginx.port)  # fmt: skip
                cluster.nginx.start()
            for i, session in enumerate(sessions):
                outputs[i].append(session.step(plans[i][k]))
        for session in sessions:
            assert session.reconnects == 1 and session.replayed_steps == 0, session.breaks
            session.close()
    for model, plan, out in zip(models, plans, outputs, strict=True):
        assert_exact(cluster, model, plan, out)


def upstreams_of(directory: Path, session_id: str) -> list[list[str]]:
    """The replicas nginx tried for each finished call of ``session_id``, in order (nginx logs
    ``$upstream_addr`` as ``a, b`` when it passed a call on)."""
    path = directory / "access.log"
    lines = [line.split(" ") for line in path.read_text().splitlines()] if path.exists() else []
    return [[a.rstrip(",") for a in fields[1:-2]] for fields in lines if fields[0] == session_id]


def test_the_shipped_config_passes_a_call_on_only_when_its_replica_cannot_be_reached(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The shipped file unchanged. A stream that reached its replica is not sent elsewhere when
    that replica dies under it (the client gets a dead path, as without failover). A new call for
    the session: the dead replica refuses the connection, and nginx passes the call to the next
    replica in the hash (both in ``$upstream_addr``); that replica is then out of the hash
    (``max_fails=1``), so the next call goes straight to the other one. These replicas are not a
    cluster, so that one answers NOT_FOUND, where a cluster member would take the session over from
    the cluster store: what this checks is where nginx sends each call."""
    model, session_id = "tiny_lstm", "failover-0"
    metadata = (("x-session-id", session_id),)
    directory = tmp_path / "shipped"
    with (
        nginx(directory, [r.port for r in cluster.replicas]) as shipped,
        grpc.insecure_channel(shipped.target) as channel,
    ):
        stub = pb_grpc.StreamingInferenceStub(channel)
        create = pb.CreateSessionRequest(model=model, session_id=session_id)
        stub.CreateSession(create, metadata=metadata, timeout=10)
        victim = cluster.holder(model, session_id)
        requests: queue.SimpleQueue[pb.StreamRequest | None] = queue.SimpleQueue()
        replies = stub.Stream(iter(requests.get, None), metadata=metadata, timeout=30)
        requests.put(pb.StreamRequest(attach=pb.GetSessionRequest(model=model,
                                                                  session_id=session_id)))  # fmt: skip
        assert next(replies).WhichOneof("kind") == "opened"
        x = np.zeros((2, FEATURES), np.float32)
        requests.put(pb.StreamRequest(chunk=pb.Chunk(input=to_tensor(x), expected_steps=0)))
        assert next(replies).WhichOneof("kind") == "output"

        victim.stop(signal.SIGKILL)
        requests.put(pb.StreamRequest(chunk=pb.Chunk(input=to_tensor(x), expected_steps=2)))
        with pytest.raises(grpc.RpcError) as cut:
            next(replies)
        assert is_dead_path(cut.value), cut.value
        requests.put(None)

        get = pb.GetSessionRequest(model=model, session_id=session_id)
        for _ in range(2):  # passed on; then straight to the next replica
            with pytest.raises(grpc.RpcError) as elsewhere:
                stub.GetSession(get, metadata=metadata, timeout=10)
            assert elsewhere.value.code() == grpc.StatusCode.NOT_FOUND, elsewhere.value

        wait_for(lambda: len(upstreams_of(directory, session_id)) == 4, "nginx to log every call")
    created, stream, passed_on, straight = upstreams_of(directory, session_id)
    assert created == stream == [victim.address]
    (other,) = ({r.address for r in cluster.replicas} - {victim.address}) & set(passed_on)
    assert passed_on == [victim.address, other], passed_on
    assert straight == [other], straight


# ---------------------------------------------------------------------------------------------
# (c) the server's own errors are raised, and retries are bounded


def test_server_errors_through_nginx_are_raised_not_retried(cluster: Cluster) -> None:
    rng = np.random.default_rng(3)
    inputs = chunked(rng, 4)
    with Client(cluster.nginx.target, name_sessions=True, reconnect=FAST) as client:
        session = client.open_session("tiny_lstm")
        outputs = [session.step(inputs[0]), session.step(inputs[1])]
        with pytest.raises(grpc.RpcError) as refused:
            session.step(np.zeros((2, FEATURES + 1), np.float32))  # wrong feature count
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "takes 3 features" in str(refused.value.details())
        assert is_server_error(refused.value)  # its trailing metadata came through nginx
        assert session.reconnects == 0 and session.breaks == []
        outputs += [session.step(inputs[2]), session.step(inputs[3])]  # the session goes on
        assert session.reconnects == 0
        session.close()
        assert_exact(cluster, "tiny_lstm", inputs, outputs)

        with pytest.raises(grpc.RpcError) as unknown:
            client.attach("tiny_lstm", "never-opened")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as unknown:
            client.stub.GetSession(pb.GetSessionRequest(model="tiny_lstm", session_id="nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_replica_that_stays_away_ends_the_retries_after_the_policys_attempts(
    cluster: Cluster,
) -> None:
    """The replica holding a session dies and does not come back: the client tries exactly
    ``attempts`` times, then raises nginx's UNAVAILABLE; once the replica is back (its periodic
    snapshot holds the session), the session goes on exactly."""
    rng = np.random.default_rng(5)
    inputs = chunked(rng, 4)
    bounded = Reconnect(timeout_s=30.0, attempts=4, first_backoff_s=0.01, max_backoff_s=0.02)
    with Client(cluster.nginx.target, name_sessions=True, reconnect=bounded,
                options=CHANNEL_OPTIONS) as client:  # fmt: skip
        session = client.open_session("tiny_gru")
        outputs = [session.step(inputs[0])]
        holder = cluster.holder("tiny_gru", session.session_id)
        wait_for(lambda: durable_steps(client, session) == session.steps, "a snapshot of it")
        holder.stop(signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as gone:
            session.step(inputs[1])
        assert gone.value.code() == grpc.StatusCode.UNAVAILABLE, gone.value
        assert len(session.breaks) == bounded.attempts, session.breaks
        holder.start()
        outputs += [session.step(x) for x in inputs[1:]]  # attaches again, replays, goes on
        session.close()
    assert_exact(cluster, "tiny_gru", inputs, outputs)


def durable_steps(client: Client, session: StreamingSession) -> int:
    info = client.stub.GetSession(
        pb.GetSessionRequest(model=session.model, session_id=session.session_id)
    )
    return int(info.durable_steps)


# ---------------------------------------------------------------------------------------------
# (d) tritonclient with the header


def run_probe(cluster: Cluster, tmp_path: Path, inputs: Path, name: str, *args: str) -> Any:
    out = tmp_path / f"{name}.npz"
    result = subprocess.run(
        [sys.executable, str(PROBE), cluster.nginx.target, "tiny_lstm", str(inputs), str(out),
         *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return np.load(out)


def test_tritonclient_with_the_header_completes_sequences_exactly_through_nginx(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Four sequences by ``infer`` and four on streams, each with ``headers={"x-session-id":
    ...}``: exact. Without the header nginx spreads a sequence's requests round robin, and each
    such sequence fails on a replica that never saw its START. Then a sequence half sent, its
    replica restarted gracefully (SIGTERM, same port and snapshot directory), the rest sent:
    it continues exactly."""
    rng = np.random.default_rng(23)
    sequences = [chunked(rng, int(rng.integers(3, 7))) for _ in range(4)]
    data: dict[str, Any] = {"ids": np.array([7001 + i for i in range(len(sequences))])}
    for i, chunks in enumerate(sequences):
        data[f"x_{i}"] = np.concatenate(chunks)
        data[f"chunks_{i}"] = np.array([len(c) for c in chunks])
    np.savez(tmp_path / "in.npz", **data)
    results = run_probe(cluster, tmp_path, tmp_path / "in.npz", "all", "0", "end", "all")
    reference = cluster.references["tiny_lstm"]
    for i in range(len(sequences)):
        expected = reference(data[f"x_{i}"])
        np.testing.assert_allclose(results[f"infer_{i}"], expected, atol=ATOL)
        np.testing.assert_allclose(results[f"stream_{i}"], expected, atol=ATOL)
    assert int(results["unrouted"]) == len(sequences)

    # Across a graceful restart of the sequence's replica.
    chunks = chunked(rng, 6)
    one: dict[str, Any] = {"ids": np.array([7100]), "x_0": np.concatenate(chunks),
           "chunks_0": np.array([len(c) for c in chunks])}  # fmt: skip
    np.savez(tmp_path / "one.npz", **one)
    first = run_probe(cluster, tmp_path, tmp_path / "one.npz", "first", "0", "3")
    holder = cluster.holder("tiny_lstm", "7100")  # the sequence id's text is its session id
    holder.stop(signal.SIGTERM)
    holder.start()
    rest = run_probe(cluster, tmp_path, tmp_path / "one.npz", "rest", "3", "end")
    outputs = np.concatenate([first["infer_0"], rest["infer_0"]])
    np.testing.assert_allclose(outputs, reference(one["x_0"]), atol=ATOL)
