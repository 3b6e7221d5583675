"""The cluster's acceptance (issue #19) against real processes, all on loopback: ``rnnserve serve``
replicas sharing a real Redis as their cluster store (tests/cluster_replicas.py), Debian's nginx
running the shipped deploy/nginx/rnnserve.conf in front of them (tests/nginx_server.py), and the
Python client or tritonclient as callers. The same stories in one process, with an in-memory
store and a test-driven clock, are tests/test_cluster.py.

- 200 sessions stream through nginx while one replica is replaced (SIGTERM, a replacement on a new
  port, nginx reloaded), a fourth is added (nginx reloaded with 4 replicas) and another is killed
  with -9: every session's outputs equal the offline run or its client got an explicit error;
  nothing is replayed before the kill; the figures (sessions moved by how, steps replayed, time
  to move) are printed and written to the test's directory as JSON.
- A replica paused (SIGSTOP) past its lease with steps it never wrote: another replica takes its
  sessions from their last write; woken (SIGCONT), none of its writes lands (fenced, counted),
  and the sessions go on exactly, replaying from the last write.
- tritonclient with ``headers={"x-session-id": ...}``: a sequence goes on exactly, without a
  START, on another replica after its replica drained.
- A replica restarted in its old directory with old local snapshots restores none of them.

Nothing waits by sleeping: every wait polls a condition, bounded; every process is stopped at
the end whatever happens; inputs come from fixed seeds.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.client import Client, Reconnect, StreamingSession
from tests.cluster_replicas import (
    FENCED,
    LOST,
    MOVED,
    ClusterFigures,
    ClusterReplica,
    StoreView,
    difference,
    grid,
    labelled,
    percentile,
    summary,
    table,
)
from tests.models_for_tests import OfflineReference
from tests.nginx_server import Nginx, nginx_binary
from tests.redis_server import redis_server
from tests.server_process import ServerProcess, free_port, serve_command

pytestmark = pytest.mark.slow  # real replicas, Redis and nginx, under load and signals

ROOT = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).with_name("nginx_tritonclient_probe.py")
MODELS = ("tiny_lstm", "tiny_gru")  # both take 3 features
FEATURES = 3
ATOL = 1e-5
# Quick reconnects (the defaults are for real networks); enough time for a dead replica's lease
# to run out and its sessions to be restored elsewhere.
FAST = Reconnect(timeout_s=30.0, attempts=300, first_backoff_s=0.02, max_backoff_s=0.2)
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                   ("grpc.max_reconnect_backoff_ms", 300)]  # fmt: skip
WAIT_S = 120.0  # the bound of every wait on other threads or processes


def chunked(rng: np.random.Generator, chunks: int, longest: int = 6) -> list[np.ndarray]:
    """Inputs in chunks of mixed lengths (1..longest steps)."""
    return [rng.standard_normal((int(n), FEATURES)).astype(np.float32)
            for n in rng.integers(1, longest + 1, chunks)]  # fmt: skip


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Cluster:
    """Redis, replicas and nginx for one test, stopped (all of them) when it ends."""

    def __init__(self, repository: Path, directory: Path, stack: contextlib.ExitStack) -> None:
        nginx_binary()  # fails at once, saying how to install it, when nginx is missing
        self.repository = repository
        self.directory = directory
        self.url = stack.enter_context(redis_server(directory))
        self.replicas: list[ClusterReplica] = []
        self.nginx: Nginx | None = None
        self.store = StoreView(self.url)
        stack.callback(self.stop)
        self.references = {m: OfflineReference(repository, m) for m in MODELS}

    def add(self, name: str, *flags: str, start: bool = True, port: int = 0) -> ClusterReplica:
        replica = ClusterReplica(self.repository, self.url, name, *flags, port=port)
        self.replicas.append(replica)
        if start:
            replica.start()
        return replica

    def start_together(self, *names: str) -> list[ClusterReplica]:
        started = [self.add(name, start=False) for name in names]
        for replica in started:
            replica.launch()
        for replica in started:
            replica.wait_serving()
        return started

    def front(self, replicas: list[ClusterReplica], **options: Any) -> Nginx:
        self.nginx = Nginx(self.directory / "nginx", [r.port for r in replicas], **options)
        self.nginx.check()
        self.nginx.start()
        return self.nginx

    def alive(self) -> list[ClusterReplica]:
        return [r for r in self.replicas if r.alive()]

    def stop(self) -> None:
        """Everything stopped; each replica's log kept in the test's directory."""
        if self.nginx is not None:
            self.nginx.stop()
        for replica in self.replicas:
            if replica.process is not None and replica.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    replica.process.send_signal(signal.SIGCONT)  # (a test may have paused it)
                replica.kill()
            (self.directory / f"replica-{replica.name}.log").write_text("".join(replica.lines))
        self.store.close()

    def exact(self, model: str, chunks: list[np.ndarray], outputs: list[np.ndarray]) -> bool:
        """Whether ``outputs`` (one per chunk, maybe fewer) equal the offline run of as many
        chunks."""
        if not outputs:
            return True
        done = chunks[: len(outputs)]
        expected = self.references[model](np.concatenate(done))
        return bool(np.allclose(np.concatenate(outputs), expected, atol=ATOL))


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


# ---------------------------------------------------------------------------------------------
# 1. 200 sessions through a rolling update, a scale-up and a crash

SESSIONS = 200
THREADS = 20  # each drives SESSIONS / THREADS sessions, one chunk each in turn
ROUNDS = 36  # chunks per session
# The faults, each with the round every thread must have reached before it begins and the round
# no thread passes before it is over: every session streams while it happens.
ROLLING_UPDATE, SCALE_UP, CRASH = (6, 12), (14, 20), (22, 28)
FAULTS = ("rolling_update", "scale_up", "crash")


@dataclass(eq=False)  # (compared by identity)
class Run:
    """One session of the load: its inputs, what its client got, and how."""

    model: str
    chunks: list[np.ndarray]
    outputs: list[np.ndarray] = field(default_factory=list)
    session: StreamingSession | None = None
    error: str = ""  # the explicit error its client raised, if any
    error_at: float = math.inf  # when (time.monotonic())
    # The calls that reconnected: (when each ended, time.monotonic(); how long it took).
    resumed: list[tuple[float, float]] = field(default_factory=list)

    def fail(self, error: BaseException) -> None:
        self.error = f"{type(error).__name__}: {error}"[:300]
        self.error_at = time.monotonic()


class Gates:
    """Where the client threads are, and the faults' windows (see ROLLING_UPDATE)."""

    def __init__(self, threads: int, windows: list[tuple[int, int]]) -> None:
        self.progress = [0] * threads
        self.windows = windows
        self.over = [threading.Event() for _ in windows]
        self.aborted = False
        self._changed = threading.Condition()

    def reached(self, thread: int, rounds: int) -> None:
        with self._changed:
            self.progress[thread] = rounds
            self._changed.notify_all()

    def all_reached(self, rounds: int) -> None:
        with self._changed:
            ok = self._changed.wait_for(lambda: min(self.progress) >= rounds, WAIT_S)
        assert ok, f"the client threads did not reach round {rounds}: {self.progress}"

    def hold(self, rounds: int) -> None:
        """Before round ``rounds``: wait for every fault whose window ends there."""
        for (_, end), over in zip(self.windows, self.over, strict=True):
            if end == rounds:
                assert over.wait(WAIT_S), f"the fault before round {rounds} never ended"

    def abort(self) -> None:
        self.aborted = True
        for over in self.over:
            over.set()


def drive(client: Client, runs: list[Run], thread: int, gates: Gates) -> None:
    """One client thread: open its sessions, step each in turn for ROUNDS rounds, close them.
    A session whose client raises is marked failed (explicitly) and left; the others go on."""
    for run in runs:
        try:
            run.session = client.open_session(run.model)
        except Exception as error:
            run.fail(error)
    for k in range(ROUNDS):
        gates.hold(k)
        if gates.aborted:
            return
        for run in runs:
            if run.session is None or run.error:
                continue
            reconnects, began = run.session.reconnects, time.monotonic()
            try:
                run.outputs.append(run.session.step(run.chunks[k]))
            except Exception as error:
                run.fail(error)
                continue
            if run.session.reconnects != reconnects:
                ended = time.monotonic()
                run.resumed.append((ended, ended - began))
        gates.reached(thread, k + 1)
    for run in runs:
        if run.session is not None and not run.error:
            try:
                run.session.close()
            except Exception as error:
                run.fail(error)


def test_200_sessions_stay_exact_through_a_rolling_update_a_scale_up_and_a_crash(
    tiny_repository: Path, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    """Three replicas behind nginx (hash on x-session-id), 200 sessions of both models streaming
    through the Python client (chunks of 1-6 steps) from 20 threads. While they stream:

    1. rolling update: replica a gets SIGTERM (its sessions written and released: a drain), a
       replacement starts on a new port and nginx is reloaded with it in a's place;
    2. scale-up: a fourth replica starts and nginx is reloaded with four (about a quarter of the
       ids hash elsewhere);
    3. crash: replica b is killed with -9 (its sessions are restored elsewhere from their last
       write, at most cluster_write_interval_s old, and their clients replay the rest).

    nginx closes the connections its old worker still has 1 s after a reload
    (worker_shutdown_timeout), so that every stream is routed by the new upstream list: the
    sessions whose ids hash elsewhere move there (a hand-over from their live owner).

    Every session's outputs equal the offline run, or its client raised an error, and then only
    after the kill (the outputs it had got up to then are exact too): zero silent divergences;
    nothing is replayed, and no session fails, through the drain and the scale-up."""
    began = time.monotonic()
    cluster = Cluster(tiny_repository, tmp_path, stack)
    a, b, c = cluster.start_together("a", "b", "c")
    front = cluster.front([a, b, c], shutdown_timeout_s=1.0)
    rng = np.random.default_rng(2024)
    runs = [Run(MODELS[i % 2], chunked(rng, ROUNDS)) for i in range(SESSIONS)]
    per_thread = SESSIONS // THREADS
    gates = Gates(THREADS, [ROLLING_UPDATE, SCALE_UP, CRASH])
    clients = [
        stack.enter_context(Client(front.target, name_sessions=True, reconnect=FAST,
                                   options=CHANNEL_OPTIONS))
        for _ in range(THREADS)
    ]  # fmt: skip
    crashes: list[BaseException] = []

    def thread_main(t: int) -> None:
        try:
            drive(clients[t], runs[t * per_thread : (t + 1) * per_thread], t, gates)
        except BaseException as error:  # a bug of the test itself: reported by the main thread
            crashes.append(error)
        finally:
            gates.reached(t, ROUNDS)

    def replayed() -> int:
        return sum(r.session.replayed_steps for r in runs if r.session is not None)

    threads = [threading.Thread(target=thread_main, args=(t,), daemon=True) for t in range(THREADS)]
    for t in threads:
        t.start()
    figures = ClusterFigures()
    # As each fault begins, and at the end: the cluster's counters, the steps replayed so far,
    # the time. A fault's window ends after its effects (a reload's old worker gone), and the
    # next begins once every thread is two rounds further: what lies between two marks is the
    # first one's fault's doing.
    marks: list[tuple[dict[str, float], int, float]] = []
    killed_at = math.inf
    try:
        gates.all_reached(ROLLING_UPDATE[0])
        marks.append((figures.now(cluster.alive()), replayed(), time.monotonic()))
        failed_before_faults = [r.error for r in runs if r.error]
        figures.before_exit(a)  # its counters, before it exits with them
        drained, ended_on_a = a.drain()
        a2 = cluster.add("a2")
        front.reload([a2.port, b.port, c.port])  # a2 in a's place
        front.wait_old_workers_gone()  # (streams still on the old routes cut, 1 s after)
        gates.over[0].set()

        gates.all_reached(SCALE_UP[0])
        marks.append((figures.now(cluster.alive()), replayed(), time.monotonic()))
        d = cluster.add("d")
        front.reload([a2.port, b.port, c.port, d.port])
        front.wait_old_workers_gone()
        gates.over[1].set()

        gates.all_reached(CRASH[0])
        marks.append((figures.now(cluster.alive()), replayed(), time.monotonic()))
        failed_before_crash = [r.error for r in runs if r.error]
        figures.before_exit(b)
        killed_at = time.monotonic()
        b.kill()
        gates.over[2].set()
    except BaseException:
        gates.abort()
        raise
    finally:
        for t in threads:
            t.join(timeout=WAIT_S)
    assert not crashes, crashes
    assert not any(t.is_alive() for t in threads), "a client thread did not finish"
    marks.append((figures.now(cluster.alive()), replayed(), time.monotonic()))
    seconds = time.monotonic() - began

    divergent = [i for i, r in enumerate(runs) if not cluster.exact(r.model, r.chunks, r.outputs)]
    failed = [i for i, r in enumerate(runs) if r.error]
    incomplete = [i for i, r in enumerate(runs) if not r.error and len(r.outputs) != ROUNDS]
    sessions = [r.session for r in runs if r.session is not None]
    calls = [call for r in runs for call in r.resumed]  # (ended, took) of every resumed call
    faults: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(FAULTS):
        (before, replayed_before, since), (after, replayed_after, until) = marks[k], marks[k + 1]
        took = [t for ended, t in calls if since <= ended < until]
        faults[name] = {
            **summary(difference(after, before)),
            "steps_replayed": replayed_after - replayed_before,
            "client_calls_resumed": len(took),
            "client_resumed_call_p50_s": percentile(took, 0.5),
            "client_resumed_call_p99_s": percentile(took, 0.99),
            "client_resumed_call_max_s": max(took, default=math.nan),
            "began_at_s": since - began,
        }
    total = summary(marks[-1][0])
    moved = total["sessions_moved"]
    assert isinstance(moved, dict)
    took_all = [t for _, t in calls]
    results: dict[str, Any] = {
        "sessions": SESSIONS,
        "chunks_per_session": ROUNDS,
        "steps": sum(len(x) for r in runs for x in r.chunks),
        "seconds": seconds,
        "sessions_drained_by_a": drained,
        **total,
        "sessions_moved_total": sum(moved.values()),
        "sessions_reconnected": sum(1 for s in sessions if s.reconnects),
        "client_calls_resumed": len(took_all),
        "client_resumed_call_p50_s": percentile(took_all, 0.5),
        "client_resumed_call_p99_s": percentile(took_all, 0.99),
        "steps_replayed": sum(s.replayed_steps for s in sessions),
        "sessions_that_replayed": sum(1 for s in sessions if s.replayed_steps),
        "explicit_errors": len(failed),
        "silent_divergences": len(divergent),
        "errors": sorted({runs[i].error for i in failed})[:5],
        "by_fault": faults,
    }
    path = tmp_path / "cluster_acceptance.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    totals = [(k, v) for k, v in results.items() if k not in ("errors", "by_fault")]
    columns = ["sessions_moved", "steps_replayed", "move_p50_s", "move_p99_s",
               "client_calls_resumed", "client_resumed_call_p99_s", "client_resumed_call_max_s"]  # fmt: skip
    print(f"\ncluster acceptance ({path}):\n{table(totals)}\n"
          f"{grid(['fault', *columns], [[n, *(f[c] for c in columns)] for n, f in faults.items()])}")  # fmt: skip
    if failed:
        print(f"  errors: {results['errors']}")

    assert not divergent, f"silent divergences: sessions {divergent[:10]}"
    assert not incomplete, f"sessions neither finished nor failed: {incomplete[:10]}"
    assert not failed_before_faults, failed_before_faults[:5]
    assert not failed_before_crash, f"sessions failed before the kill: {failed_before_crash[:5]}"
    assert all(runs[i].error_at > killed_at for i in failed), results["errors"]
    assert ended_on_a == 0 and drained > 0, (drained, ended_on_a)
    # Routed by their ids, the sessions never moved before the faults.
    assert not any(labelled(marks[0][0], MOVED, "how").values()), marks[0][0]
    # The drain's sessions were taken released (or handed over, had one been asked for while
    # a still held it), the re-hashed ones handed over by their live owners, the killed
    # replica's restored from their last write; only its clients replayed.
    update, scale_up, crash = (faults[name]["sessions_moved"] for name in FAULTS)
    assert update.get("released", 0) + update.get("handover", 0) >= drained, update
    assert update.get("released", 0) >= 1 and not update.get("restored"), update
    assert scale_up.get("handover", 0) >= 1 and not scale_up.get("restored"), scale_up
    assert crash.get("restored", 0) >= 1, crash
    assert faults["rolling_update"]["steps_replayed"] == 0, "the drain made a client replay"
    assert faults["scale_up"]["steps_replayed"] == 0, "a hand-over made a client replay"
    assert total["fenced_writes"] == 0, "no replica was paused: no write may be refused"


# ---------------------------------------------------------------------------------------------
# 2. Fencing: a paused replica's writes are refused


def test_a_paused_replicas_writes_are_fenced_and_its_sessions_stay_exact(
    tiny_repository: Path, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    """Replica p writes nothing (cluster_write_interval_s 3600) and q, behind nginx. Sessions
    stream through nginx until p owns at least 4 whose steps it never wrote (the store holds them
    at step 0). p gets SIGSTOP; a request for each of them goes to q directly, all at once: q
    asks p to hand them over (p, paused, will read those requests when it wakes), then takes them
    from their last write once p's lease has run out (restored, step 0). p gets SIGCONT: it
    drops every one of them, none of its writes lands (the store still holds q's records), and
    it counts them: rnnserve_cluster_fenced_writes_total > 0 and
    rnnserve_cluster_sessions_lost_total one per session. The sessions then go on through nginx
    (p's back to p, from q): their clients replay from step 0 and every output equals the
    offline run; q's own sessions never notice."""
    cluster = Cluster(tiny_repository, tmp_path, stack)
    p = cluster.add("p", "--cluster-write-interval-s", "3600", start=False)
    q = cluster.add("q", start=False)
    for replica in (p, q):
        replica.launch()
    for replica in (p, q):
        replica.wait_serving()
    front = cluster.front([p, q])
    rng = np.random.default_rng(11)
    client = stack.enter_context(
        Client(front.target, name_sessions=True, reconnect=FAST, options=CHANNEL_OPTIONS)
    )
    runs: list[Run] = []
    on_p: list[Run] = []
    for i in range(40):  # until p owns 4 (the ids are random: about half hash to p)
        run = Run(MODELS[i % 2], chunked(rng, 8))
        run.session = client.open_session(run.model)
        run.outputs = [run.session.step(x) for x in run.chunks[:3]]
        runs.append(run)
        if cluster.store.owner(run.model, run.session.session_id) == "p":
            on_p.append(run)
        if len(on_p) >= 4 and len(runs) - len(on_p) >= 2:
            break
    assert len(on_p) >= 4 and len(runs) > len(on_p), "the ids did not spread over p and q"
    on_q = [r for r in runs if r not in on_p]
    ids = [r.session.session_id for r in on_p if r.session is not None]
    for run, sid in zip(on_p, ids, strict=True):  # steps applied on p that it never wrote
        assert run.session is not None and run.session.steps > 0
        record = cluster.store.record(run.model, sid)
        assert record is not None and record.replica == "p" and record.steps == 0, record

    assert p.process is not None
    p.process.send_signal(signal.SIGSTOP)
    direct = stack.enter_context(Client(q.address))

    def take(run: Run, sid: str) -> int:
        request = pb.GetSessionRequest(model=run.model, session_id=sid)
        return int(direct.stub.GetSession(request, timeout=30).steps)

    with ThreadPoolExecutor(len(on_p)) as pool:  # all at once, while p's lease still holds
        taken = list(pool.map(take, on_p, ids))
    assert taken == [0] * len(on_p), taken  # p's last write of each: the session's creation
    epochs = {}
    for run, sid in zip(on_p, ids, strict=True):
        record = cluster.store.record(run.model, sid)
        assert record is not None and record.replica == "q", record
        epochs[sid] = record.epoch
    assert q.value(f'{MOVED}{{how="restored"}}') == len(on_p)

    p.process.send_signal(signal.SIGCONT)
    wait_for(lambda: p.active_sessions() == 0, "p to drop the sessions q took")
    fenced, lost = p.value(FENCED), p.value(LOST)
    for run, sid in zip(on_p, ids, strict=True):  # none of p's writes landed: q's records
        record = cluster.store.record(run.model, sid)
        assert record is not None, sid
        assert (record.replica, record.epoch, record.steps) == ("q", epochs[sid], 0), record

    for run in runs:  # through nginx again: p's sessions move back to p (from q) and replay
        assert run.session is not None
        run.outputs += [run.session.step(x) for x in run.chunks[3:]]
        run.session.close()
    counts = summary(ClusterFigures().now([p, q]))
    replayed = [r.session.replayed_steps for r in on_p if r.session is not None]
    print(
        f"\nfencing: {len(on_p)} sessions on p paused past its lease, {len(on_q)} on q; p: fenced "
        f"writes {fenced:g}, sessions lost {lost:g}; replayed {replayed}; moved "
        f"{counts['sessions_moved']}"
    )
    for run in runs:
        assert cluster.exact(run.model, run.chunks, run.outputs), run.session
    for run in on_p:
        assert run.session is not None
        assert run.session.replayed_steps == sum(len(x) for x in run.chunks[:3])
    for run in on_q:
        assert run.session is not None
        assert run.session.reconnects == 0 and run.session.replayed_steps == 0, run.session.breaks
    # p counted what it dropped: each session's write refused, each session lost here.
    assert fenced >= 1, f"p's refused writes were not counted (fenced {fenced:g}, lost {lost:g})"
    assert lost == len(on_p), f"p dropped {len(on_p)} sessions and counted {lost:g} as lost"


# ---------------------------------------------------------------------------------------------
# 3. tritonclient with the header, across a drain


def run_probe(target: str, tmp_path: Path, inputs: Path, name: str, *args: str) -> Any:
    """tests/nginx_tritonclient_probe.py (tritonclient in its own process: its copy of the
    ``inference`` protobuf package cannot share one with the server's)."""
    out = tmp_path / f"{name}.npz"
    result = subprocess.run(
        [sys.executable, str(PROBE), target, "tiny_lstm", str(inputs), str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return np.load(out)


def test_a_tritonclient_sequence_goes_on_exactly_on_another_replica_after_a_drain(
    tiny_repository: Path, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    """Four sequences by tritonclient's ``infer`` with ``headers={"x-session-id": str(id)}``
    through nginx, half sent (START with the first); the replica that holds the first drains
    (SIGTERM: its sequences written and released); the rest of each sequence (no START, END with
    the last) reaches another replica through nginx (the drained one refuses the connection) and
    every sequence's outputs equal the offline run."""
    cluster = Cluster(tiny_repository, tmp_path, stack)
    replicas = cluster.start_together("a", "b", "c")
    front = cluster.front(replicas)
    rng = np.random.default_rng(23)
    ids = [9100 + i for i in range(4)]
    sequences = [chunked(rng, 6) for _ in ids]
    data: dict[str, Any] = {"ids": np.array(ids)}
    for i, chunks in enumerate(sequences):
        data[f"x_{i}"] = np.concatenate(chunks)
        data[f"chunks_{i}"] = np.array([len(c) for c in chunks])
    np.savez(tmp_path / "in.npz", **data)

    first = run_probe(front.target, tmp_path, tmp_path / "in.npz", "first", "0", "3")
    owners = [cluster.store.owner("tiny_lstm", str(i)) for i in ids]
    holder = next(r for r in replicas if r.name == owners[0])
    handed_over, ended_here = holder.drain()
    assert handed_over == owners.count(holder.name) and ended_here == 0
    for i, chunks, owner in zip(ids, sequences, owners, strict=True):
        if owner == holder.name:  # written and released by the drain, every step in it
            record = cluster.store.record("tiny_lstm", str(i))
            assert record is not None and record.replica == "" and record.confirmed, record
            assert record.steps == sum(len(x) for x in chunks[:3]), record
    rest = run_probe(front.target, tmp_path, tmp_path / "in.npz", "rest", "3", "end")

    reference = cluster.references["tiny_lstm"]
    for i in range(len(ids)):
        outputs = np.concatenate([first[f"infer_{i}"], rest[f"infer_{i}"]])
        np.testing.assert_allclose(outputs, reference(data[f"x_{i}"]), atol=ATOL)
    for i in ids:  # every sequence ended (its END): gone from the store
        assert cluster.store.record("tiny_lstm", str(i)) is None
    # nginx's account of the first sequence: its first half to the holder, its rest elsewhere
    # (tried on the holder first while nginx still counted it up: refused, passed on).
    wait_for(lambda: len(calls_of(front, str(ids[0]))) == 6, "nginx to log every call")
    routes = calls_of(front, str(ids[0]))
    assert all(route == [holder.address] for route in routes[:3]), routes
    assert all(route[-1] != holder.address for route in routes[3:]), routes
    survivors = [r for r in replicas if r is not holder]
    moved = labelled(ClusterFigures().now(survivors), MOVED, "how")
    print(f"\ntritonclient across a drain: {handed_over} sequence(s) drained; routes {routes}; "
          f"moved {moved}")  # fmt: skip
    assert moved.get("released", 0) == handed_over, moved


def calls_of(front: Nginx, session_id: str) -> list[list[str]]:
    """The replicas nginx tried for each finished call of ``session_id``, in order."""
    return [
        [address.rstrip(",") for address in fields[1:-2]]
        for fields in front.access_log()
        if fields[0] == session_id
    ]


# ---------------------------------------------------------------------------------------------
# 4. Old local snapshots are never restored in a cluster


def test_a_replica_restarted_in_its_old_directory_restores_none_of_its_old_snapshots(
    tiny_repository: Path, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    """Replica r runs alone with a snapshot directory: sessions "kept" and "only-here" stream,
    and its SIGTERM writes them to its final snapshot. The cluster moves on: "kept" is opened
    there anew (on q) and streams another history. r restarts in the cluster, in its old
    directory: it restores nothing ("only-here" is NOT_FOUND through r), and "kept" through r is
    the cluster's session (handed over from q), exact."""
    cluster = Cluster(tiny_repository, tmp_path, stack)
    state = tmp_path / "r-state"
    port = free_port()
    alone = ServerProcess(
        serve_command(tiny_repository, port, "--snapshot-dir", str(state), "--session-ttl-s", "0",
                      "--intra-op-threads", "1")
    )  # fmt: skip
    stack.callback(alone.kill)
    alone.start()
    rng = np.random.default_rng(5)
    with Client(f"127.0.0.1:{port}") as client:
        for sid in ("kept", "only-here"):
            session = client.open_session("tiny_lstm", session_id=sid)
            for x in chunked(rng, 3):
                session.step(x)
            session.detach()
    assert alone.signal(signal.SIGTERM) == 0
    assert any(state.rglob("*")), "the lone replica wrote no snapshot"

    q = cluster.add("q")
    xs = chunked(rng, 6)
    outputs = []
    with Client(q.address) as client:
        session = client.open_session("tiny_lstm", session_id="kept")
        outputs += [session.step(x) for x in xs[:3]]
        session.detach()
    r = cluster.add("r", "--snapshot-backend", "directory", "--snapshot-dir", str(state),
                    port=port)  # fmt: skip
    assert r.restored == [], r.restored
    assert r.value('rnnserve_sessions_restored_total{model="tiny_lstm",version="1"}') == 0
    with Client(r.address) as client:
        with pytest.raises(grpc.RpcError) as unknown:
            client.attach("tiny_lstm", "only-here")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        session = client.attach("tiny_lstm", "kept")
        assert session.steps == sum(len(x) for x in xs[:3])  # the cluster's, not r's old one
        outputs += [session.step(x) for x in xs[3:]]
        session.close()
    assert cluster.exact("tiny_lstm", xs, outputs)
    assert r.value(f'{MOVED}{{how="handover"}}') == 1
