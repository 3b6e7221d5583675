"""``rnnserve serve --workers N``: the embedded cluster store (service.cluster_embedded) in
process, then the supervisor (service.workers) as a real process on loopback: N workers on one
port, SIGTERM, kill -9 of a worker, a worker failing at start-up, and the exactness promise
through one address while every chunk of a session takes a new connection (so sessions move
between workers).

No fixed sleeps: a test waits for a log line, a port file or a connection count, each within a
bound."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.harness import scrape
from service import workers as workers_module
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.api.native_messages import to_array, to_tensor
from service.cli import build_parser
from service.client import Client
from service.cluster_backend import Claimed, HeldBy, Message, Write
from service.cluster_embedded import EmbeddedStore, SocketBackend
from service.settings import Settings
from service.workers import RESTARTS_ALLOWED, RestartBudget, Supervisor, Worker, worker_flags
from tests.models_for_tests import OfflineReference
from tests.server_process import START_TIMEOUT_S, ServerProcess, serve_command

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 10.0  # the most an in-process condition is waited for


# --- The embedded store, in process -------------------------------------------------------------


@pytest.fixture
def short_directory() -> Iterator[Path]:
    """A directory in the system's temporary one (pytest's are too deep for a Unix socket)."""
    with tempfile.TemporaryDirectory(prefix="rnnserve-test-") as directory:
        yield Path(directory)


@pytest.fixture
async def store() -> Any:
    embedded = EmbeddedStore()
    await embedded.start()
    yield embedded
    await embedded.stop()


async def test_the_socket_and_its_directory_are_this_users_alone(store: EmbeddedStore) -> None:
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(store.path.stat().st_mode)


async def test_concurrent_callers_on_one_connection_each_get_their_own_reply(
    store: EmbeddedStore,
) -> None:
    backend = SocketBackend(store.path)
    try:
        await backend.register("a", 60)
        keys = [f"model\0session-{i}" for i in range(300)]
        blobs = [os.urandom(i % 97) + str(i).encode() for i in range(300)]
        created = await asyncio.gather(
            *(backend.create(k, "a", b, 0) for k, b in zip(keys, blobs, strict=True))
        )
        assert sorted(created) == list(range(1, 301))  # (epochs: one counter for the store)
        claimed = await asyncio.gather(*(backend.acquire(k, "a", 0) for k in keys))
        assert [c.blob for c in claimed if isinstance(c, Claimed)] == blobs
        epochs = [c.epoch for c in claimed if isinstance(c, Claimed)]
        assert sorted(epochs) == list(range(301, 601))
        writes = [
            Write(k, "a", epoch, blob=b"new" if i % 2 else None)
            for i, (k, epoch) in enumerate(zip(keys, epochs, strict=True))
        ]
        assert await backend.write(writes, 0) == [True] * 300
        big = os.urandom(8 * 1024 * 1024)  # a large state crosses whole
        first = Write(keys[0], "a", epochs[0], blob=big, release=True)
        assert await backend.write([first], 0) == [True]
        again = await backend.acquire(keys[0], "b", 0)
        assert isinstance(again, Claimed) and again.blob == big and again.released
        assert store.connections == 1
    finally:
        await backend.close()


async def test_listen_delivers_until_cancelled(store: EmbeddedStore) -> None:
    a, b = SocketBackend(store.path), SocketBackend(store.path)
    try:
        arrived: list[Message] = []
        followed: asyncio.Queue[Message] = asyncio.Queue()

        def inbox(message: Message) -> Any:
            arrived.append(message)

            async def follow_up() -> None:  # what an inbox awaits may call the store itself
                await a.renew("a", 60)
                followed.put_nowait(message)

            return follow_up()

        await a.register("a", 60)
        listening = asyncio.create_task(a.listen("a", inbox))
        sent = Message("release", "k", "b")
        for _ in range(100):  # until the listen is registered
            await b.send("a", sent)
            await a.renew("a", 60)  # answered after the push that b's send wrote to a
            if arrived:
                break
        assert arrived == [sent]
        assert await asyncio.wait_for(followed.get(), WAIT_S) == sent
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        await a.renew("a", 60)  # answered after the unlisten that the cancel sent
        assert store.backend.inboxes["a"] == []
    finally:
        await a.close()
        await b.close()


CLIENT_KILLED = """
import asyncio, sys
from service.cluster_backend import Message
from service.cluster_embedded import SocketBackend

async def main():
    backend = SocketBackend(sys.argv[1])
    await backend.register("doomed", 60)
    await backend.create("held by doomed", "doomed", b"its state", 0)
    heard = asyncio.Event()
    listening = asyncio.ensure_future(backend.listen("doomed", lambda message: heard.set()))
    for _ in range(100):  # until a message to itself comes back: its inbox is registered
        await backend.send("doomed", Message("ping", "", "doomed"))
        try:
            await asyncio.wait_for(heard.wait(), 0.1)
            break
        except TimeoutError:
            pass
    print("listening" if heard.is_set() else "deaf", flush=True)
    await listening

asyncio.run(main())
"""


async def test_a_client_killed_costs_the_server_nothing(store: EmbeddedStore) -> None:
    mine = SocketBackend(store.path)
    try:
        await mine.register("mine", 60)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT_KILLED, str(store.path), cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        try:
            assert process.stdout is not None
            async with asyncio.timeout(START_TIMEOUT_S):
                assert await process.stdout.readline() == b"listening\n"
            assert store.connections == 2 and len(store.backend.inboxes["doomed"]) == 1
        finally:
            process.kill()
            await process.wait()
        await store.until_connections(1, WAIT_S)
        assert store.backend.inboxes["doomed"] == []  # unregistered with its connection
        # The store kept what the dead client wrote; the others go on.
        assert await mine.acquire("held by doomed", "mine", 0) == HeldBy("doomed")
        await mine.send("doomed", Message("release", "held by doomed", "mine"))
        await mine.leave("doomed")  # what the supervisor does for a worker it saw die
        claimed = await mine.acquire("held by doomed", "mine", 0)
        assert isinstance(claimed, Claimed) and claimed.blob == b"its state"
        assert not claimed.released
    finally:
        await mine.close()


async def test_a_dead_store_is_a_connection_error_naming_the_socket() -> None:
    store = EmbeddedStore()
    await store.start()
    backend = SocketBackend(store.path, timeout_s=2.0)
    try:
        await backend.register("a", 60)
        listening = asyncio.create_task(backend.listen("a", lambda message: None))
        await backend.renew("a", 60)  # the listen is registered (requests apply in order)
        await store.stop()
        with pytest.raises(ConnectionError, match=re.escape(str(store.path))):
            async with asyncio.timeout(WAIT_S):
                await listening
        with pytest.raises(ConnectionError, match=re.escape(str(store.path))):
            await backend.renew("a", 60)
    finally:
        await backend.close()


async def test_a_store_that_does_not_answer_is_a_connection_error_within_the_timeout(
    short_directory: Path,
) -> None:
    path = short_directory / "silent.sock"
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_unix_server(silent, path=str(path))
    backend = SocketBackend(path, timeout_s=0.2)
    try:
        with pytest.raises(ConnectionError, match=re.escape("no reply to renew within 0.2 s")):
            async with asyncio.timeout(WAIT_S):
                await backend.renew("a", 60)
    finally:
        await backend.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_store_path_in_a_directory_others_may_enter_is_refused(
    short_directory: Path,
) -> None:
    os.chmod(short_directory, 0o755)
    with pytest.raises(PermissionError, match="mode 0700"):
        await EmbeddedStore(short_directory / "s.sock").start()


# --- The supervisor's parts ---------------------------------------------------------------------


def test_the_restart_budget_allows_five_restarts_a_minute() -> None:
    now = [0.0]
    budget = RestartBudget(allowed=5, window_s=60.0, clock=lambda: now[0])
    assert all(budget.spend() for _ in range(5))
    assert not budget.spend()
    now[0] = 59.9
    assert not budget.spend()
    now[0] = 60.1  # the first five are a minute old
    assert budget.spend()


async def test_hung_workers_are_killed_after_one_limit_not_one_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """They all drain at once: 4 workers ignoring SIGTERM are killed after one drain limit."""
    monkeypatch.setattr(workers_module, "SHUTDOWN_MARGIN_S", 0.4)
    supervisor = Supervisor(Settings(drain_timeout_s=0.1), [])
    ignore = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print(1, flush=True); time.sleep(60)"
    )
    for k in range(4):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ignore, stdout=asyncio.subprocess.PIPE
        )
        assert process.stdout is not None
        await process.stdout.readline()
        supervisor.workers[k] = Worker(k, f"w{k}", Path("/nonexistent"), process)
    began = time.monotonic()
    assert not await supervisor._stop_workers()  # (killed: not clean)
    assert time.monotonic() - began < 1.5  # one limit of 0.5 s, not four


def test_workers_get_the_flags_given_but_those_set_per_worker() -> None:
    args = build_parser().parse_args(
        ["serve", "--workers", "3", "--grpc-port", "0", "--metrics-port", "9000",
         "--port-file", "p.json", "--no-reuse-port", "--model-repository", "/m",
         "--log-format", "json", "--evict-when-full"]
    )  # fmt: skip
    assert isinstance(args, argparse.Namespace)
    assert worker_flags(args) == [
        "--model-repository", "/m", "--evict-when-full", "--log-format", "json",
    ]  # fmt: skip


# --- The supervisor as a process ----------------------------------------------------------------

CHANNEL = [("grpc.use_local_subchannel_pool", 1)]  # a channel of its own: its own connection


class Supervised(ServerProcess):
    """``rnnserve serve --workers 2`` on loopback, port 0; its log read by a thread that wakes
    whoever waits for a line (:meth:`wait_for`)."""

    def __init__(self, repository: Path, directory: Path, *flags: str) -> None:
        self.port_file = directory / "ports.json"
        super().__init__(
            serve_command(repository, 0, "--workers", "2", "--port-file", str(self.port_file),
                          "--intra-op-threads", "1", "--session-ttl-s", "0", *flags)
        )  # fmt: skip
        self._changed = threading.Condition()
        self._ended = False
        self.ports: dict[str, Any] = {}

    def start(self) -> None:
        self.launch()
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for("workers serving on")
        self.ports = json.loads(self.port_file.read_text())

    def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        with self.process.stderr:
            for line in self.process.stderr:
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, text: str, after: int = 0, timeout_s: float = START_TIMEOUT_S) -> str:
        """The first log line from index ``after`` on that holds ``text``; fails if the process
        ends first or after ``timeout_s``."""

        def found() -> str | None:
            return next((line for line in self.lines[after:] if text in line), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self._ended, timeout_s)
            line = found()
        if line is None:
            pytest.fail(f"no {text!r} in the log: {''.join(self.lines)[-4000:]}")
        return line

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc_port']}"

    def worker_metric(self, prefix: str) -> list[float]:
        """Each worker's sum of the samples whose name starts with ``prefix``."""
        ports = json.loads(self.port_file.read_text())["metrics_ports"]
        return [sum(v for k, v in scrape(port).items() if k.startswith(prefix)) for port in ports]


@pytest.fixture
def supervised(tiny_repository: Path, tmp_path: Path) -> Iterator[Supervised]:
    server = Supervised(tiny_repository, tmp_path)
    try:
        server.start()
    except BaseException:
        server.kill()
        raise
    yield server
    if server.alive():
        server.signal(signal.SIGTERM)
    server.kill()


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def open_and_close(target: str, model: str = "tiny_lstm") -> None:
    """One session, created and closed through a connection of its own."""
    with Client(target, timeout_s=30, options=CHANNEL) as client:
        info = client.stub.CreateSession(pb.CreateSessionRequest(model=model), timeout=30)
        client.stub.CloseSession(
            pb.CloseSessionRequest(model=model, session_id=info.session_id), timeout=30
        )


def until_both_workers_served(server: Supervised, most_channels: int = 64) -> list[float]:
    """Open sessions, each on a new connection, until both workers have started one (the kernel
    spreads connections by a hash: 64 all landing on one worker has odds of 2^-63)."""
    started = [0.0, 0.0]
    for n in range(1, most_channels + 1):
        open_and_close(server.target)
        if n % 8 == 0:
            started = server.worker_metric("rnnserve_sessions_started")
            if all(started):
                break
    return started


@pytest.mark.slow
def test_two_workers_serve_one_port_and_stop_on_sigterm(supervised: Supervised) -> None:
    ports = supervised.ports
    assert len(ports["worker_pids"]) == 2 and len(set(ports["metrics_ports"])) == 2
    started = until_both_workers_served(supervised)
    assert all(started), f"sessions started per worker: {started}"
    pids = ports["worker_pids"]
    assert supervised.signal(signal.SIGTERM) == 0
    assert not any(alive(pid) for pid in pids)
    assert "stopped" in supervised.wait_for('"stopped')


@pytest.mark.slow
def test_a_worker_killed_9_is_restarted(supervised: Supervised) -> None:
    old = supervised.ports["worker_pids"]
    seen = len(supervised.lines)
    os.kill(old[0], signal.SIGKILL)
    supervised.wait_for("worker 0 serves again", after=seen)
    restarted = supervised.wait_for("restarting it", after=seen)
    assert f"pid {old[0]}" in restarted and "SIGKILL" in restarted
    ports = json.loads(supervised.port_file.read_text())
    assert ports["worker_pids"][1] == old[1] and ports["worker_pids"][0] not in old
    assert all(until_both_workers_served(supervised))  # the new worker 0 serves on the port
    assert supervised.signal(signal.SIGTERM) == 0
    assert not any(alive(pid) for pid in ports["worker_pids"])


@pytest.mark.slow
def test_a_worker_dying_again_and_again_stops_the_server(supervised: Supervised) -> None:
    for death in range(RESTARTS_ALLOWED + 1):
        seen = len(supervised.lines)
        os.kill(json.loads(supervised.port_file.read_text())["worker_pids"][0], signal.SIGKILL)
        if death < RESTARTS_ALLOWED:
            supervised.wait_for("worker 0 serves again", after=seen)
    assert supervised.process is not None
    assert supervised.process.wait(timeout=START_TIMEOUT_S) == 1
    report = supervised.wait_for("giving up")
    assert f"more than {RESTARTS_ALLOWED} restarts in" in report
    assert not any(
        alive(pid) for pid in json.loads(supervised.port_file.read_text())["worker_pids"]
    )


@pytest.mark.slow
def test_the_workers_die_with_the_supervisor(supervised: Supervised) -> None:
    pids = supervised.ports["worker_pids"]
    supervised.kill()  # kill -9: no stop in order; the workers get SIGTERM from the kernel
    deadline = time.monotonic() + START_TIMEOUT_S
    while any(alive(pid) for pid in pids):  # not our children: nothing to wait on but this
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_worker_failing_at_start_up_stops_the_server(
    tiny_repository: Path, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]  # worker 0's metrics port (worker 1 gets port + 1)
        server = Supervised(tiny_repository, tmp_path, "--metrics-port", str(port))
        server.launch()
        threading.Thread(target=server._read, daemon=True).start()
        try:
            assert server.process is not None
            assert server.process.wait(timeout=START_TIMEOUT_S) == 1
        finally:
            server.kill()
    report = server.wait_for("before serving")  # the supervisor's line, quoting the worker's
    assert "cannot start: worker 0 exited with code 1" in report
    assert "cannot bind metrics" in report
    assert not server.port_file.exists()


# --- The acceptance test: exact outputs through one address while sessions move ----------------

SESSIONS = 40
THREADS = 8


def plan(seed: int) -> list[tuple[str, np.ndarray, list[int]]]:
    """(model, inputs, chunk lengths) of each session: 12 to 30 steps in chunks of 1 to 6."""
    rng = np.random.default_rng(seed)
    sessions = []
    for i in range(SESSIONS):
        steps = int(rng.integers(12, 31))
        chunks: list[int] = []
        while sum(chunks) < steps:
            chunks.append(min(int(rng.integers(1, 7)), steps - sum(chunks)))
        x = rng.standard_normal((steps, 3)).astype(np.float32)
        sessions.append(("tiny_lstm" if i % 2 == 0 else "tiny_gru", x, chunks))
    return sessions


def stream_through_new_connections(
    target: str, index: int, model: str, x: np.ndarray, chunks: list[int]
) -> np.ndarray:
    """Session ``index``: created, stepped chunk by chunk, closed, each call on a new channel
    (a new connection, so any worker): even chunks attach a stream and step once, odd chunks are
    one unary Step, each stating the step count it expects (never applied twice)."""
    session_id = f"moving-{index}"
    with Client(target, timeout_s=30, options=CHANNEL) as client:
        opened = client.stub.CreateSession(
            pb.CreateSessionRequest(model=model, session_id=session_id), timeout=30
        )
    outputs, steps = [], 0
    for k, n in enumerate(chunks):
        chunk = x[steps : steps + n]
        with Client(target, timeout_s=30, options=CHANNEL) as client:
            if k % 2 == 0:
                session = client.attach(model, session_id, incarnation=opened.incarnation)
                assert session.steps == steps
                outputs.append(session.step(chunk))
                session.detach()
            else:
                reply = client.stub.Step(
                    pb.StepRequest(model=model, session_id=session_id, input=to_tensor(chunk),
                                   expected_steps=steps, incarnation=opened.incarnation),
                    timeout=30,
                )  # fmt: skip
                assert reply.steps == steps + n
                outputs.append(to_array(reply.output, "output").copy())
        steps += n
    with Client(target, timeout_s=30, options=CHANNEL) as client:
        ended = client.stub.CloseSession(
            pb.CloseSessionRequest(model=model, session_id=session_id), timeout=30
        )
    assert ended.steps == steps
    return np.concatenate(outputs)


@pytest.mark.slow
def test_workers_2_the_exactness_test_passes_against_one_address(
    supervised: Supervised, tiny_repository: Path
) -> None:
    sessions = plan(7)
    references = {m: OfflineReference(tiny_repository, m) for m in ("tiny_lstm", "tiny_gru")}
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [
            pool.submit(stream_through_new_connections, supervised.target, i, model, x, chunks)
            for i, (model, x, chunks) in enumerate(sessions)
        ]
        outputs = [future.result(timeout=300) for future in futures]
    for (model, x, chunks), y in zip(sessions, outputs, strict=True):
        np.testing.assert_allclose(y, references[model](x), atol=1e-5, err_msg=f"{model} {chunks}")
    # Both workers served chunks, and sessions moved between them.
    assert all(supervised.worker_metric("rnnserve_request_latency_seconds_count"))
    moved = sum(supervised.worker_metric("rnnserve_cluster_sessions_moved_total"))
    print(f"\n{SESSIONS} sessions, {sum(len(c) for _, _, c in sessions)} chunks; moved {moved:.0f}")
    assert moved > 0
    assert supervised.signal(signal.SIGTERM) == 0


@pytest.mark.slow
def test_the_workers_benchmark_runs(tiny_repository: Path) -> None:
    result = subprocess.run(
        [sys.executable, "scripts/bench_workers.py", "--model-repository", str(tiny_repository),
         "--model", "tiny_gru", "--runs", "1", "--sessions", "8", "--channels", "4",
         "--duration-s", "0.3", "--warmup-s", "0.1", "--workers", "1", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| 1", "| 2"]
