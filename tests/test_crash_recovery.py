"""Real server processes, real signals: SIGTERM under load and kill -9 under load. Clients stream
with the client library, which reconnects and replays; every session's outputs must equal the
uninterrupted offline run. No timing assumptions: the signal is sent once every session has made
progress, wherever the sessions then are."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.client import Client
from tests.models_for_tests import OfflineReference
from tests.server_process import ServerProcess, free_port, serve_command

pytestmark = pytest.mark.slow  # real server processes under load and signals

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny_lstm"
SESSIONS = 6
CHUNKS = 60


def recovery_server(repository: Path, state: Path, port: int, *extra: str) -> ServerProcess:
    """A server on ``port`` (both of its lives: clients reconnect to the same address)."""
    flags = ["--snapshot-dir", str(state), "--session-ttl-s", "0", *extra]
    return ServerProcess(serve_command(repository, port, *flags))


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def server_factory(tiny_repository: Path, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.kill()


def until_in_a_snapshot(client: Client, session_id: str, tries: int = 20_000) -> None:
    """Ask until a periodic snapshot holds some of the session (durable_steps > 0): a session
    could otherwise stream all its chunks before the first snapshot after it opened, and never
    reach the point where the server may be killed. Bounded by a number of questions."""
    request = pb.GetSessionRequest(model=MODEL, session_id=session_id)
    for _ in range(tries):
        if client.stub.GetSession(request, timeout=10).durable_steps:
            return
    raise AssertionError(f"no snapshot held session {session_id} after {tries} questions")


def run_sessions_through_a_fault(
    servers: list[ServerProcess], port: int, tiny_repository: Path, fault: int
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """SESSIONS client threads stream CHUNKS chunks each; once every thread is a third of the way
    and its session is in a snapshot (else a kill -9 right after it opened would rightly lose it),
    the server gets ``fault`` and a new server starts on the same port and state directory."""
    rng = np.random.default_rng(2)
    inputs = []
    for _ in range(SESSIONS):
        lengths = rng.integers(1, 4, CHUNKS)
        inputs.append([rng.standard_normal((n, 3)).astype(np.float32) for n in lengths])
    progressed = threading.Barrier(SESSIONS + 1)
    replayed = [0] * SESSIONS
    results: list[tuple[np.ndarray, np.ndarray, int] | BaseException] = [None] * SESSIONS  # type: ignore[list-item]

    def stream(i: int) -> None:
        try:
            with Client(f"127.0.0.1:{port}") as client:
                session = client.open_session(MODEL, reconnect_timeout_s=60)
                outputs = []
                waiting = True
                for k, x in enumerate(inputs[i]):
                    outputs.append(session.step(x))
                    if waiting and k >= CHUNKS // 3:
                        if fault == signal.SIGKILL:
                            until_in_a_snapshot(client, session.session_id)
                        progressed.wait(timeout=60)
                        waiting = False
                session.close()
                results[i] = (
                    np.concatenate(inputs[i]),
                    np.concatenate(outputs),
                    session.reconnects,
                )
                replayed[i] = session.replayed_steps
        except BaseException as error:  # reported by the main thread
            results[i] = error
            progressed.abort()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(SESSIONS)]
    for t in threads:
        t.start()
    progressed.wait(timeout=60)
    servers[0].signal(fault)
    servers[1].start()
    for t in threads:
        t.join(timeout=120)
    for outcome in results:
        if isinstance(outcome, BaseException):
            raise outcome
    steps = sum(len(r[0]) for r in results)  # type: ignore[index]
    print(
        f"\n{signal.Signals(fault).name}: {SESSIONS} sessions, {steps} steps, replayed {replayed}"
    )
    if fault == signal.SIGTERM:  # graceful: the shutdown snapshot holds every accepted chunk
        assert replayed == [0] * SESSIONS
    return results  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("fault", "extra"),
    [
        (signal.SIGTERM, ()),  # graceful: drain, snapshot, stop
        # kill -9: only periodic snapshots exist; clients replay what came after the last one
        (signal.SIGKILL, ("--snapshot-interval-s", "0.05", "--snapshot-when-idle-s", "0")),
    ],
    ids=["sigterm", "kill-9"],
)
def test_sessions_continue_exactly_after_the_server_dies_under_load(
    fault: int, extra: tuple[str, ...], port: int, tiny_repository: Path, tmp_path: Path,
    server_factory: list[ServerProcess],
) -> None:  # fmt: skip
    state = tmp_path / "state"
    server_factory += [recovery_server(tiny_repository, state, port, *extra) for _ in range(2)]
    server_factory[0].start()
    results = run_sessions_through_a_fault(server_factory, port, tiny_repository, fault)
    reference = OfflineReference(tiny_repository, MODEL)
    for x, y, reconnects in results:
        assert reconnects == 1
        np.testing.assert_allclose(y, reference(x), atol=1e-5)
    restored = [json.loads(line) for line in server_factory[1].lines]
    assert any("restored" in r["message"] and MODEL in r["message"] for r in restored)
