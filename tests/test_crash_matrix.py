"""The crash matrix (issue #16): kill -9 at seeded random moments under load, for both snapshot
backends (directory, Redis) and both APIs (native client library, KServe v2 / Triton sequences),
with session ids reused after a close and KServe sequences restarted with START mid-way.

Each cell runs a real server process (same port across restarts, snapshots every 50 ms) and
CLIENTS threads that live through a fixed, seeded plan of short sessions. The main thread kills
the server with SIGKILL once the clients together have accepted a seeded random number of chunks,
starts a new one on the same port and state, and does that KILLS times; the clients carry on
(reconnect, replay, restart or give up, each as a real client would). At the end every session is
judged: every output its client accepted must equal the offline full-sequence run of its inputs
(from its latest START), whatever happened; a client may instead have got an explicit error. An
accepted output that differs is a *silent divergence*: there must be none.

Run ``python -m pytest -s tests/test_crash_matrix.py`` to see the tables (docs/RELIABILITY.md,
"Crash matrix").
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import queue
import random
import re
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.client import Client, SessionLostError, StreamingSession
from tests.models_for_tests import OfflineReference
from tests.redis_server import redis_server
from tests.server_process import ServerProcess, free_port, serve_command

pytestmark = pytest.mark.slow  # real server processes, redis-server, kill -9 under load

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("tiny_lstm", "tiny_gru")  # both take 3 features
FEATURES = 3
SESSIONS_PER_CELL = 200  # 4 cells: 800 sessions
CLIENTS = 12  # client threads per cell
KILLS = 5  # kill -9 per cell
MAX_RESTARTS = 3  # KServe clients that restart with START give up after this many restarts
CELL_DEADLINE_S = 75.0  # a cell that has not finished by then fails (normally ~10 s)
RPC_TIMEOUT_S = 20.0
ATOL = 1e-5
SERVER_FLAGS = ("--snapshot-interval-s", "0.05", "--snapshot-when-idle-s", "0",
                "--intra-op-threads", "1")  # fmt: skip
# Channels come back quickly after a restart (gRPC's default reconnect backoff grows to minutes).
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                   ("grpc.max_reconnect_backoff_ms", 300)]  # fmt: skip
SEED = int(os.environ.get("CRASH_MATRIX_SEED", "0"))  # fixed; another value hunts other kill points
VERBOSE = bool(os.environ.get("CRASH_MATRIX_VERBOSE"))  # print the events of every given-up session
# In-band errors have no status code: these messages are the server's UNAVAILABLE (not applied).
IN_BAND_UNAVAILABLE = ("still loading its models", "shutting down")
SERVER_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)

EXACT = "exact"
EXACT_ACROSS_KILL = "exact across a kill"
EXACT_AFTER_RESTART = "exact after a START restart"
GAVE_UP = "explicit error, gave up"
DIVERGED = "SILENT DIVERGENCE"
OUTCOMES = (EXACT, EXACT_ACROSS_KILL, EXACT_AFTER_RESTART, GAVE_UP, DIVERGED)


# ---------------------------------------------------------------------------------------------
# The plan: every session's inputs, fixed in advance by a seed


@dataclasses.dataclass(eq=False)  # compared by identity
class Session:
    """One incarnation of a session id: opened (START), streamed, closed (END)."""

    chunks: list[np.ndarray]
    starts: list[int]  # chunk indices sent with START (KServe; always 0, maybe one mid-way)
    accepted: list[tuple[int, np.ndarray]] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)  # explicit errors it saw
    events: list[str] = dataclasses.field(default_factory=list)  # for reports of divergences
    crossed_kill: bool = False
    restarts: int = 0
    finished: bool = False
    gave_up: str = ""

    def segment_start(self, k: int) -> int:
        return max(s for s in self.starts if s <= k)

    def note(self, text: str) -> None:
        self.events.append(f"{time.monotonic():.3f} {text}")


@dataclasses.dataclass
class Task:
    """A session id and the sessions one client lives under it, one after the other."""

    name: str
    model: str
    session_id: str | int  # "" on the native API: the server picks the id
    style: str  # native | kserve-replay-stream | kserve-replay-unary | kserve-plain-stream | ...
    restart_on_error: bool  # plain KServe clients: restart with START, or give up
    sessions: list[Session]


def make_plan(cell: int, api: str) -> list[Task]:
    rng = np.random.default_rng(1600 + cell + SEED)
    tasks: list[Task] = []
    planned = 0
    while planned < SESSIONS_PER_CELL:
        t = len(tasks)
        count = int(min(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]), SESSIONS_PER_CELL - planned))
        planned += count
        # Reused ids often get the same chunk lengths every time, so that after a crash an old
        # incarnation can be at the very step count the new one expects.
        same_lengths = count > 1 and rng.random() < 0.5
        lengths = rng.integers(1, 5, int(rng.integers(2, 7)))
        sessions = []
        for _ in range(count):
            if not same_lengths:
                lengths = rng.integers(1, 5, int(rng.integers(2, 7)))
            starts = [0]
            if api == "kserve" and len(lengths) >= 3 and rng.random() < 0.3:
                restart = int(rng.integers(1, len(lengths)))
                starts.append(restart)  # START again mid-way
                if rng.random() < 0.5:  # the same lengths again: the same step counts again
                    lengths = np.concatenate([lengths[:restart], lengths[: len(lengths) - restart]])
            chunks = [rng.standard_normal((int(n), FEATURES)).astype(np.float32) for n in lengths]
            sessions.append(Session(chunks, starts))
        model = MODELS[t % 2]
        if api == "native":
            named = count > 1 or t % 3 == 0
            session_id: str | int = f"c{cell}-t{t}" if named else ""
            style = "native"
        else:
            session_id = f"c{cell}-t{t}" if t % 2 else 100_000 * (cell + 1) + t  # string or int
            style = ["kserve-replay-stream", "kserve-plain-stream", "kserve-replay-unary",
                     "kserve-plain-unary"][int(rng.integers(0, 4))]  # fmt: skip
        tasks.append(Task(f"c{cell}-t{t}", model, session_id, style, t % 2 == 0, sessions))
    return tasks


# ---------------------------------------------------------------------------------------------
# Processes: the server (killed and restarted) and redis-server


def matrix_server(repository: Path, port: int, backend_flags: list[str]) -> ServerProcess:
    """The matrix's server on a fixed port: clients reconnect to it across its lives."""
    flags = ["--session-ttl-s", "0", *SERVER_FLAGS, *backend_flags]
    return ServerProcess(serve_command(repository, port, *flags))


# ---------------------------------------------------------------------------------------------
# Clients


class Cell:
    """What the clients of one cell share: the address, the count of accepted chunks (the kill
    points are counted in it), the deadline."""

    def __init__(self, port: int) -> None:
        self.target = f"127.0.0.1:{port}"
        self.accepted = 0
        self.changed = threading.Condition()
        self.deadline = time.monotonic() + CELL_DEADLINE_S
        self.clients_done = 0
        self.harness_errors: list[str] = []

    def count_accepted(self) -> None:
        with self.changed:
            self.accepted += 1
            self.changed.notify_all()

    def wait_out_restart(self, backoff: list[float]) -> None:
        """A client's pause before it tries again while the server is away."""
        if time.monotonic() > self.deadline:
            raise TimeoutError("the cell's deadline passed while the server was away")
        time.sleep(random.uniform(backoff[0] / 2, backoff[0]))
        backoff[0] = min(backoff[0] * 2, 0.5)


def error_kind(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        code = error.code()
        return str(code.name) if code is not None else "RpcError"
    return type(error).__name__


def run_native(cell: Cell, client: Client, task: Task) -> None:
    """The client library does the reconnecting and replaying; this client retries opening while
    the server is away and closes a stale session that a restart brought back under its id."""
    for session in task.sessions:
        stream = open_native(cell, client, task, session)
        if stream is None:
            continue
        for k, x in enumerate(session.chunks):
            try:
                y = stream.step(x)
            except (SessionLostError, grpc.RpcError) as error:
                session.errors.append(f"step {error_kind(error)}")
                session.gave_up = f"step: {error_kind(error)}"
                session.note(f"chunk {k}: {error_kind(error)}: {error}")
                stream.detach()
                break
            session.accepted.append((k, y))
            session.note(f"chunk {k}: steps {stream.steps} durable {stream.durable_steps}")
            cell.count_accepted()
        else:
            session.finished = True
            with contextlib.suppress(grpc.RpcError):  # the next open copes with a lost close
                stream.close()
        if stream.reconnects:
            session.crossed_kill = True
            session.note(f"reconnects {stream.reconnects}, replayed {stream.replayed_steps}")


def open_native(
    cell: Cell, client: Client, task: Task, session: Session
) -> StreamingSession | None:
    backoff = [0.05]
    stale_closed = False
    while True:
        try:
            stream = client.open_session(
                task.model, session_id=str(task.session_id), reconnect_timeout_s=30.0
            )
            session.note(f"opened {stream.session_id}")
            return stream
        except grpc.RpcError as error:
            code = error.code()
            if code in SERVER_GONE:
                session.crossed_kill = True
                cell.wait_out_restart(backoff)
                continue
            if code == grpc.StatusCode.ALREADY_EXISTS and not stale_closed:
                # A restart brought back the previous session of this id (its close, or this very
                # open, was not in the snapshot): close it and open again.
                session.errors.append("open ALREADY_EXISTS (closed the stale one)")
                session.note("open: ALREADY_EXISTS; closing the stale session")
                close_stale(cell, client, task)
                stale_closed = True
                continue
            session.errors.append(f"open {error_kind(error)}")
            session.gave_up = f"open: {error_kind(error)}"
            return None


def close_stale(cell: Cell, client: Client, task: Task) -> None:
    request = pb.CloseSessionRequest(model=task.model, session_id=str(task.session_id))
    backoff = [0.05]
    while True:
        try:
            client.stub.CloseSession(request, timeout=RPC_TIMEOUT_S)
            return
        except grpc.RpcError as error:
            if error.code() not in SERVER_GONE:
                return  # NOT_FOUND: gone already
            cell.wait_out_restart(backoff)


class InBandError(Exception):
    """A ModelStreamInfer reply with ``error_message`` (Triton's in-band error: no status code),
    and the sequence's step count it reports (``sequence_steps``), if any."""

    def __init__(self, message: str, steps: int | None = None) -> None:
        super().__init__(message)
        self.steps = steps


def steps_reported(error: BaseException) -> int | None:
    """The step count a failed request reports: trailing metadata, or the in-band parameter."""
    if isinstance(error, InBandError):
        return error.steps
    if isinstance(error, grpc.RpcError):
        value = dict(error.trailing_metadata() or ()).get("rnnserve-session-steps")  # type: ignore[attr-defined]
        return None if value is None else int(value)
    return None


class KServeConnection:
    """One request at a time, over a ModelStreamInfer stream (re-opened after it breaks) or
    unary ModelInfer calls."""

    def __init__(self, channel: grpc.Channel, streaming: bool) -> None:
        self.stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        self.streaming = streaming
        self.requests: queue.Queue[kpb.ModelInferRequest | None] | None = None
        self.replies: Any = None

    def call(self, request: kpb.ModelInferRequest) -> kpb.ModelInferResponse:
        if not self.streaming:
            reply: kpb.ModelInferResponse = self.stub.ModelInfer(request, timeout=RPC_TIMEOUT_S)
            return reply
        if self.replies is None:
            self.requests = queue.Queue()
            self.replies = self.stub.ModelStreamInfer(
                iter(self.requests.get, None), timeout=CELL_DEADLINE_S
            )
        assert self.requests is not None
        self.requests.put(request)
        try:
            streamed = next(self.replies)
        except grpc.RpcError:
            self.drop()
            raise
        except StopIteration:
            self.drop()
            raise InBandError("the stream ended without a reply") from None
        if streamed.error_message:
            parameters = streamed.infer_response.parameters
            steps = (
                parameters["sequence_steps"].int64_param if "sequence_steps" in parameters else None
            )
            raise InBandError(streamed.error_message, steps)
        if streamed.infer_response.id != request.id:
            raise AssertionError(f"reply {streamed.infer_response.id} to request {request.id}")
        answer: kpb.ModelInferResponse = streamed.infer_response
        return answer

    def drop(self) -> None:
        if self.requests is not None:
            self.requests.put(None)
        if self.replies is not None:
            self.replies.cancel()
        self.requests = self.replies = None


def kserve_request(
    task: Task, x: np.ndarray, request_id: str, *, start: bool, end: bool, expected: int | None,
    incarnation: str = "",
) -> kpb.ModelInferRequest:  # fmt: skip
    request = kpb.ModelInferRequest(model_name=task.model, id=request_id)
    if isinstance(task.session_id, str):
        request.parameters["sequence_id"].string_param = task.session_id
    else:
        request.parameters["sequence_id"].int64_param = task.session_id
    if start:
        request.parameters["sequence_start"].bool_param = True
    if end:
        request.parameters["sequence_end"].bool_param = True
    if expected is not None:  # the opt-in: "the sequence is at this step count before me"
        request.parameters["sequence_expected_steps"].int64_param = expected
    if incarnation:  # from the reply to the sequence's START
        request.parameters["sequence_incarnation"].string_param = incarnation
    request.inputs.add(name="x", datatype="FP32", shape=[1, *x.shape])
    request.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    return request


def replay_point(session: Session, k: int, steps: int | None) -> int | None:
    """The chunk to replay from when the sequence is at ``steps`` (counted from the START of
    chunk ``k``'s segment), if that count falls between chunks this client sent since."""
    if steps is None:
        return None
    first = session.segment_start(k)
    passed = 0
    for j in range(first, k + 1):
        if passed == steps:
            return j
        passed += len(session.chunks[j])
    return None


def in_band_kind(message: str) -> str:
    """In-band errors carry no code: group them by their message with numbers and ids blanked."""
    text = re.sub(r"'[^']*'|\d+", "#", message)
    return "in-band: " + (text[:60] + "..." if len(text) > 60 else text)


def run_kserve(cell: Cell, channel: grpc.Channel, task: Task) -> None:
    """Lock-step requests. The replaying clients send ``sequence_expected_steps`` and the
    ``sequence_incarnation`` of their START's reply on every continuing request and, after the
    server comes back, send the same request again; when it is refused with the count the
    sequence is at, and that count is one they passed since the START, they replay from there
    (up to MAX_RESTARTS times). The plain (Triton-style) clients send it again without. On any
    other explicit error a client restarts its sequence with START from its latest planned START
    (up to MAX_RESTARTS times), or gives up."""
    replay = "replay" in task.style
    connection = KServeConnection(channel, streaming=task.style.endswith("stream"))
    try:
        for number, session in enumerate(task.sessions):
            k, position, must_start = 0, 0, True  # position: steps since the latest START
            incarnation, resumes = "", 0
            backoff = [0.05]
            while k < len(session.chunks):
                start = must_start or k in session.starts
                if start:
                    position = 0
                x = session.chunks[k]
                request = kserve_request(
                    task, x, f"{task.name}.{number}.{k}.{session.restarts}", start=start,
                    end=k == len(session.chunks) - 1,
                    expected=position if replay and not start else None,
                    incarnation=incarnation if replay and not start else "",
                )  # fmt: skip
                try:
                    reply = connection.call(request)
                except (grpc.RpcError, InBandError) as error:
                    at = steps_reported(error)
                    back_to = replay_point(session, k, at) if replay and incarnation else None
                    if back_to is not None and resumes < MAX_RESTARTS:
                        resumes += 1
                        session.crossed_kill = True
                        session.errors.append(f"{error_kind(error)}, then replayed")
                        session.note(
                            f"chunk {k} at {position}: refused at {at}, replay from {back_to}"
                        )
                        k, position = back_to, int(at or 0)
                        continue
                    if isinstance(error, InBandError):
                        if any(text in str(error) for text in IN_BAND_UNAVAILABLE):
                            session.errors.append("in-band UNAVAILABLE (sent again)")
                            session.note(f"chunk {k} at {position}: {error}, again")
                            cell.wait_out_restart(backoff)
                            continue
                        kind, detail = in_band_kind(str(error)), str(error)
                    elif error.code() in SERVER_GONE:
                        session.crossed_kill = True
                        session.note(f"chunk {k} at {position}: {error_kind(error)}, again")
                        cell.wait_out_restart(backoff)
                        continue
                    else:
                        kind, detail = error_kind(error), str(error.details())
                else:
                    backoff = [0.05]
                    y = np.frombuffer(reply.raw_output_contents[0], "<f4")
                    session.accepted.append((k, y.reshape(list(reply.outputs[0].shape))[0]))
                    steps = reply.parameters["sequence_steps"].int64_param
                    session.note(f"chunk {k} start={start}: position {position} -> {steps}")
                    if start:
                        incarnation = reply.parameters["sequence_incarnation"].string_param
                    cell.count_accepted()
                    position += len(x)
                    must_start = False
                    k += 1
                    continue
                session.errors.append(kind)
                session.note(f"chunk {k} at {position}: {kind}: {detail}")
                if (replay or task.restart_on_error) and session.restarts < MAX_RESTARTS:
                    session.restarts += 1
                    k, must_start = session.segment_start(k), True
                    cell.wait_out_restart(backoff)
                    continue
                session.gave_up = kind
                break
            else:
                session.finished = True
    finally:
        connection.drop()


def client_thread(cell: Cell, tasks: queue.Queue[Task], api: str) -> None:
    try:
        if api == "native":
            with Client(cell.target, options=CHANNEL_OPTIONS) as client:
                while (task := next_task(tasks)) is not None:
                    run_native(cell, client, task)
        else:
            with grpc.insecure_channel(cell.target, options=CHANNEL_OPTIONS) as channel:
                while (task := next_task(tasks)) is not None:
                    run_kserve(cell, channel, task)
    except BaseException:  # reported by the test
        cell.harness_errors.append(traceback.format_exc())
    finally:
        with cell.changed:
            cell.clients_done += 1
            cell.changed.notify_all()


def next_task(tasks: queue.Queue[Task]) -> Task | None:
    try:
        return tasks.get_nowait()
    except queue.Empty:
        return None


# ---------------------------------------------------------------------------------------------
# Judging


def references(repository: Path, task: Task, session: Session) -> list[np.ndarray]:
    """The offline output of every chunk: the full run from the chunk's latest planned START."""
    offline = OfflineReference(repository, task.model)
    out: list[np.ndarray] = []
    bounds = [*session.starts, len(session.chunks)]
    for a, b in itertools.pairwise(bounds):
        y = offline(np.concatenate(session.chunks[a:b]))
        splits = np.cumsum([len(c) for c in session.chunks[a:b]])[:-1]
        out += np.split(y, splits)
    return out


def whose_output(repository: Path, task: Task, session: Session, k: int, y: np.ndarray) -> str:
    """For a divergence report: which history the wrong output of chunk ``k`` belongs to: another
    chunk's output, or chunk ``k`` computed on top of another history of this id."""
    offline = OfflineReference(repository, task.model)
    for number, other in enumerate(task.sessions):
        for j, expected in enumerate(references(repository, task, other)):
            if expected.shape == y.shape and np.allclose(y, expected, atol=ATOL, rtol=0):
                return f"it is the offline output of chunk {j} of session {number} of this id"
    x = session.chunks[k]
    if len(x) == len(y):
        for number, other in enumerate(task.sessions):
            for a in range(len(other.chunks)):
                for b in range(a + 1, len(other.chunks) + 1):
                    history = np.concatenate(other.chunks[a:b])
                    if np.allclose(offline(np.concatenate([history, x]))[-len(x) :], y, atol=ATOL):
                        return (
                            f"it is this chunk computed on the state of session {number}'s chunks "
                            f"{a}..{b - 1} ({len(history)} steps)"
                        )
    return f"it matches no history of this id's inputs that was tried: {y.ravel()[:4]}"


def judge(repository: Path, task: Task, session: Session) -> tuple[str, str]:
    """(outcome, details of a divergence)."""
    reference = references(repository, task, session)
    for k, y in session.accepted:
        if y.shape != reference[k].shape or not np.allclose(y, reference[k], atol=ATOL, rtol=0):
            diff = np.abs(y - reference[k]).max() if y.shape == reference[k].shape else np.inf
            return DIVERGED, (
                f"{whose_output(repository, task, session, k, y)}; "
                f"{task.style} {task.model} id {task.session_id!r} session "
                f"{task.sessions.index(session)} of {len(task.sessions)}, chunk {k} (planned "
                f"STARTs {session.starts}, lengths {[len(c) for c in session.chunks]}): accepted "
                f"output differs from offline by {diff:.3g}; events: {session.events}"
            )
    if not session.finished:
        return GAVE_UP, ""
    if session.restarts:
        return EXACT_AFTER_RESTART, ""
    return (EXACT_ACROSS_KILL if session.crossed_kill else EXACT), ""


@dataclasses.dataclass
class CellResult:
    name: str
    sessions: int
    kills: int
    seconds: float
    outcomes: Counter[str]
    errors: Counter[str]  # every explicit error clients saw, by kind (also those they got past)
    gave_up: Counter[str]  # the error each given-up session ended on
    restored: list[str]
    divergences: list[str]


RESULTS: dict[str, CellResult] = {}


def run_cell(
    name: str, cell_index: int, api: str, repository: Path, backend_flags: list[str]
) -> CellResult:
    tasks = make_plan(cell_index, api)
    sessions = sum(len(t.sessions) for t in tasks)
    total_chunks = sum(len(s.chunks) for t in tasks for s in t.sessions)
    rng = random.Random(4200 + cell_index + SEED)
    # Kill points: numbers of chunks accepted by all clients together, spread over the run.
    kill_at = sorted(
        int(total_chunks * rng.uniform(0.1 + 0.8 * i / KILLS, 0.1 + 0.8 * (i + 1) / KILLS) * 0.9)
        for i in range(KILLS)
    )
    port = free_port()
    server = matrix_server(repository, port, backend_flags)
    cell = Cell(port)
    work: queue.Queue[Task] = queue.Queue()
    for task in tasks:
        work.put(task)
    began = time.monotonic()
    kills = 0
    threads = [
        threading.Thread(target=client_thread, args=(cell, work, api), daemon=True)
        for _ in range(CLIENTS)
    ]
    try:
        server.start()
        cell.deadline = time.monotonic() + CELL_DEADLINE_S
        for t in threads:
            t.start()
        for threshold in kill_at:
            with cell.changed:
                while cell.accepted < threshold and cell.clients_done < CLIENTS:
                    if not cell.changed.wait(timeout=max(0.0, cell.deadline - time.monotonic())):
                        break
                if cell.accepted < threshold:
                    break  # the clients finished (or the deadline came) first: no more kills
            server.kill()
            kills += 1
            server.start()
        for t in threads:
            t.join(timeout=max(0.0, cell.deadline - time.monotonic()))
        stuck = sum(t.is_alive() for t in threads)
        assert not stuck, f"{stuck} client threads still running at the cell's deadline"
    finally:
        server.kill()  # unblocks any client still waiting on it
        for t in threads:
            if t.ident is not None:
                t.join(timeout=30)
    seconds = time.monotonic() - began
    assert not cell.harness_errors, "a client thread failed:\n" + "\n".join(cell.harness_errors)
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    gave_up: Counter[str] = Counter()
    divergences = []
    for task in tasks:
        for session in task.sessions:
            outcome, details = judge(repository, task, session)
            outcomes[outcome] += 1
            errors.update(session.errors)
            if outcome == GAVE_UP:
                gave_up[session.gave_up] += 1
                if VERBOSE:
                    print(f"gave up: {task.style} {task.session_id!r}: {session.events}")
            if details:
                divergences.append(details)
    result = CellResult(name, sessions, kills, seconds, outcomes, errors, gave_up,
                        server.restored, divergences)  # fmt: skip
    RESULTS[name] = result
    print_tables([result])
    return result


def print_tables(results: list[CellResult]) -> None:
    rows: list[tuple[str, ...]] = [("cell", "sessions", "kills", *OUTCOMES, "seconds")]
    for r in results:
        rows.append((r.name, str(r.sessions), str(r.kills),
                     *(str(r.outcomes[o]) for o in OUTCOMES), f"{r.seconds:.1f}"))  # fmt: skip
    if len(results) > 1:
        rows.append(("total", str(sum(r.sessions for r in results)),
                     str(sum(r.kills for r in results)),
                     *(str(sum(r.outcomes[o] for r in results)) for o in OUTCOMES),
                     f"{sum(r.seconds for r in results):.1f}"))  # fmt: skip
    print()
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows[1:]:
        print("| " + " | ".join(row) + " |")
    for r in results:
        print(f"{r.name}: explicit errors seen: {dict(r.errors.most_common())}")
        print(f"{r.name}: gave up on: {dict(r.gave_up.most_common())}")
        if len(results) == 1:
            print(f"{r.name}: restore log: {r.restored}")
        for d in r.divergences[:5]:
            print(f"{r.name}: DIVERGENCE: {d}")


@pytest.fixture(scope="module", autouse=True)
def totals() -> Iterator[None]:
    yield
    if RESULTS:
        print("\nCrash matrix, all cells:")
        print_tables(list(RESULTS.values()))


CELLS = [("directory", "native"), ("directory", "kserve"), ("redis", "native"), ("redis", "kserve")]


@pytest.mark.parametrize(("backend", "api"), CELLS, ids=[f"{b}-{a}" for b, a in CELLS])
def test_crash_matrix(backend: str, api: str, tiny_repository: Path, tmp_path: Path) -> None:
    """kill -9 KILLS times under load; zero silent divergences over SESSIONS_PER_CELL sessions."""
    cell_index = CELLS.index((backend, api))
    with contextlib.ExitStack() as stack:
        if backend == "redis":
            url = stack.enter_context(redis_server(tmp_path))
            flags = ["--snapshot-backend", "redis", "--snapshot-redis-url", url,
                     "--snapshot-redis-prefix", f"crash{cell_index}:"]  # fmt: skip
        else:
            flags = ["--snapshot-backend", "directory", "--snapshot-dir", str(tmp_path / "state")]
        result = run_cell(f"{backend}-{api}", cell_index, api, tiny_repository, flags)
    assert result.sessions >= SESSIONS_PER_CELL  # 4 cells: >= 512 sessions in all
    assert result.kills == KILLS, f"only {result.kills} of {KILLS} kills: the load ended first"
    assert not result.divergences, (
        f"{len(result.divergences)} silent divergence(s):\n" + "\n\n".join(result.divergences)
    )
    exact = sum(result.outcomes[o] for o in (EXACT, EXACT_ACROSS_KILL, EXACT_AFTER_RESTART))
    # Only sessions a kill touched may end in an error: most must finish, exactly.
    assert exact >= 0.75 * result.sessions, result.outcomes
    # The kills landed under load: some sessions crossed one (resumed, restarted or errored).
    assert result.sessions - result.outcomes[EXACT] > 0, result.outcomes


@pytest.mark.parametrize("between", ["start-restart", "end-then-start"])
def test_a_restored_older_history_at_the_same_step_count_is_never_continued(
    between: str, tiny_repository: Path, tmp_path: Path
) -> None:
    """The matrix's rare case made certain: a sequence's older history (before a START restart, or
    the previous sequence under a reused id) is restored by a kill -9 at exactly the step count the
    client states in ``sequence_expected_steps``. The request must be refused, or computed on the
    client's history: never on the older one. Snapshots only at shutdown make it deterministic."""
    flags = ["--snapshot-backend", "directory", "--snapshot-dir", str(tmp_path / "state")]
    port = free_port()
    server = matrix_server(tiny_repository, port, flags)
    server.command[server.command.index("--snapshot-interval-s") + 1] = "3600"
    task = Task("pin", MODELS[0], "pinned", "kserve-replay-unary", False, [])
    a, b, c, d = np.random.default_rng(7).standard_normal((4, 3, FEATURES)).astype(np.float32)

    def infer(x: np.ndarray, start: bool, end: bool, expected: int | None) -> np.ndarray:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = kserve_request(task, x, "r", start=start, end=end, expected=expected)
            reply = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        return np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(len(x), -1)

    try:
        server.start()
        infer(a, start=True, end=False, expected=None)  # the older history: 3 steps
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)  # its snapshot, at step 3
        server.process.wait(timeout=30)
        server.start()
        infer(b, start=False, end=between == "end-then-start", expected=3)
        infer(c, start=True, end=False, expected=None)  # the client's history: 3 steps again
        server.kill()  # no snapshot since the shutdown one: the older history comes back
        server.start()
        try:
            y = infer(d, start=False, end=True, expected=3)
        except grpc.RpcError as error:  # refused: an explicit error is fine
            assert error.code() != grpc.StatusCode.OK
            return
    finally:
        server.kill()
    offline = OfflineReference(tiny_repository, task.model)
    older = offline(np.concatenate([a, d]))[-3:]
    assert not np.allclose(y, older, atol=ATOL), "continued the older history: silent divergence"
    np.testing.assert_allclose(y, offline(np.concatenate([c, d]))[-3:], atol=ATOL)
