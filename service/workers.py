"""``rnnserve serve --workers N``: N worker processes serving one address as one cluster.

Why one port shared with SO_REUSEPORT: clients keep one address and there is no extra hop (no
proxy process in front copying every message); the kernel spreads new connections over the
workers' listening sockets (a hash of each connection's addresses and ports). A connection, and
so a gRPC channel with all its streams, lands on one worker; a session is not tied to a worker:
its record lives in the cluster store, and a worker that gets a chunk of a session another worker
holds has it handed over (service.cluster), so every session is served exactly on every worker.

The supervisor (this module; the process ``rnnserve serve --workers N`` runs as):

- resolves the gRPC port: for port 0 it binds a SO_REUSEPORT socket to a free port on the host
  and keeps it, bound but not listening (the kernel routes no connection to it), for its whole
  life, so the port stays reserved while workers come and go; a port given is first checked to
  be free (another server with SO_REUSEPORT on it would otherwise silently share it);
- holds the embedded cluster store (service.cluster_embedded) unless ``cluster_redis_url`` is set
  (the workers then join that Redis cluster, with any other replicas of it);
- starts N workers: the normal single-process server with the same flags and environment, plus
  ``RNNSERVE_WORKERS=1``, ``RNNSERVE_REUSE_PORT=true``, ``RNNSERVE_GRPC_PORT``,
  ``RNNSERVE_CLUSTER_EMBEDDED_SOCKET``, ``RNNSERVE_PORT_FILE`` (in the supervisor's private
  directory), ``RNNSERVE_CLUSTER_REPLICA_ID=worker-<k>-<random>`` and ``RNNSERVE_METRICS_PORT``;
  each worker dies with the supervisor (a parent-death signal) and has its own process group, so
  a terminal's Ctrl-C reaches the supervisor only, which stops the workers in order;
- once every worker serves, writes its own ``port_file`` (``grpc_port``, ``metrics_ports``,
  ``worker_pids``; rewritten when a worker is replaced) and logs one line with the address;
- on SIGTERM or SIGINT, sends SIGTERM to every worker and waits for them (each drains and hands
  its sessions over to the store), then stops the store and exits 0;
- restarts a worker that dies (logged; its lease is ended at once, so that its sessions move
  without waiting for it to expire), at most :data:`RESTARTS_ALLOWED` times in
  :data:`RESTART_WINDOW_S` seconds: beyond that it stops everything and exits 1;
- stops everything and exits 1 with a worker's last log lines if a worker fails at start-up (a
  model that does not load, a port taken).

Worker logs reach the supervisor's stdout and stderr (stderr line by line through the supervisor,
which keeps each worker's last lines for the report of a failure).

Metrics: each worker serves its own Prometheus endpoint, on ``metrics_port + k`` for worker k
(0 <= k < N); with ``metrics_port`` 0 each picks a free port, listed in the port file. Scrape every
worker's port (Prometheus: one target per port) and sum the series across them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.server import write_port_file
from service.settings import Settings

logger = logging.getLogger(__name__)

RESTARTS_ALLOWED = 5  # restarts within RESTART_WINDOW_S before the supervisor gives up
RESTART_WINDOW_S = 60.0
TAIL_LINES = 20  # a worker's last log lines kept for a failure's report
SHUTDOWN_MARGIN_S = 30.0  # beyond drain_timeout_s, before a worker that does not stop is killed
READY_POLL_S = 0.05  # how often a starting worker's port file is looked for
MAX_LOG_LINE_BYTES = 1024 * 1024
# What the supervisor sets for each worker (never passed on from its own flags).
WORKER_SETTINGS = (
    "workers",
    "reuse_port",
    "grpc_port",
    "metrics_port",
    "port_file",
    "cluster_embedded_socket",
    "cluster_replica_id",
)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class WorkersFailed(Exception):
    """The workers cannot go on: the message says why (a worker's last lines included)."""


@dataclass
class RestartBudget:
    """At most ``allowed`` restarts within any ``window_s`` seconds."""

    allowed: int = RESTARTS_ALLOWED
    window_s: float = RESTART_WINDOW_S
    clock: Callable[[], float] = time.monotonic
    times: deque[float] = field(default_factory=deque)

    def spend(self) -> bool:
        """Count one restart now; False when that is one too many (give up)."""
        now = self.clock()
        while self.times and self.times[0] <= now - self.window_s:
            self.times.popleft()
        if len(self.times) >= self.allowed:
            return False
        self.times.append(now)
        return True


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` with SO_REUSEPORT (never listening), held so that the
    port stays this server's; port 0 picks a free one (``getsockname()`` says which). A port
    given that something already listens on is refused (OSError)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    if port != 0:  # is it free? (a plain bind: SO_REUSEPORT would join another's group)
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    reserved = socket.socket(family, kind, proto)
    try:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind(address)
    except BaseException:
        reserved.close()
        raise
    return reserved


def worker_flags(args: argparse.Namespace) -> list[str]:
    """The settings flags given on the command line, as flags again (a worker gets the same),
    without those the supervisor sets per worker."""
    flags = []
    for name in Settings.model_fields:
        value = getattr(args, name, None)
        if value is None or name in WORKER_SETTINGS:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the worker gets SIGTERM when the supervisor dies (Linux), and a process
    group of its own (a terminal's Ctrl-C goes to the supervisor, which stops workers in order)."""
    prctl: Callable[..., int] | None = None
    if sys.platform == "linux":
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the supervisor died before the signal was set
                os._exit(1)

    return preexec


@dataclass(eq=False)
class Worker:
    """One life of worker ``index``."""

    index: int
    replica: str
    port_file: Path
    process: asyncio.subprocess.Process
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    forwarding: asyncio.Task[None] | None = None
    metrics_port: int = 0

    def last_lines(self) -> str:
        return "".join(self.tail).rstrip() or "(no output)"


def exit_status(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"


class Supervisor:
    """``serve --workers N``: :meth:`run` returns the exit status (raises
    :class:`WorkersFailed` when the workers cannot start)."""

    def __init__(self, settings: Settings, flags: list[str]) -> None:
        self.settings = settings
        self.flags = flags
        self.count = settings.workers
        self.grpc_port = 0
        self.directory: Path | None = None
        self.socket_path: Path | None = None
        self.workers: dict[int, Worker] = {}
        self.budget = RestartBudget()
        self._stopping = False
        self._stop_requested: asyncio.Event | None = None
        self._store: object | None = None  # an EmbeddedStore (imported when started)

    def _environment(self, index: int, replica: str, port_file: Path) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)
        env.pop("RNNSERVE_CLUSTER_EMBEDDED_SOCKET", None)  # set below, unless Redis
        env.update(
            RNNSERVE_WORKERS="1",
            RNNSERVE_REUSE_PORT="true",
            RNNSERVE_GRPC_PORT=str(self.grpc_port),
            RNNSERVE_METRICS_PORT=str(s.metrics_port + index if s.metrics_port else 0),
            RNNSERVE_PORT_FILE=str(port_file),
            RNNSERVE_CLUSTER_REPLICA_ID=replica,
            PYTHONUNBUFFERED="1",
        )
        if self.socket_path is not None:
            env["RNNSERVE_CLUSTER_EMBEDDED_SOCKET"] = str(self.socket_path)
        return env

    async def _spawn(self, index: int) -> Worker:
        assert self.directory is not None
        replica = f"worker-{index}-{secrets.token_hex(3)}"
        port_file = self.directory / f"worker-{index}.json"
        port_file.unlink(missing_ok=True)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli", "serve", *self.flags,
            stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env=self._environment(index, replica, port_file),
            preexec_fn=_die_with_parent(os.getpid()), limit=MAX_LOG_LINE_BYTES,
        )  # fmt: skip
        worker = Worker(index, replica, port_file, process)
        worker.forwarding = asyncio.create_task(self._forward(worker))
        logger.debug("worker %d started (pid %d, replica %s)", index, process.pid, replica)
        return worker

    async def _forward(self, worker: Worker) -> None:
        """Copy the worker's stderr to ours line by line, keeping its last lines."""
        stream = worker.process.stderr
        assert stream is not None
        out = sys.stderr.buffer
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over MAX_LOG_LINE_BYTES (dropped by the reader)
                line = b"(a log line too long to forward)\n"
            if not line:
                return
            with contextlib.suppress(OSError):
                out.write(line)
                out.flush()
            worker.tail.append(line.decode(errors="replace"))

    async def _until_serving(self, worker: Worker) -> bool:
        """Wait until ``worker`` has written its port file (True), or exited first (False)."""
        exited = asyncio.ensure_future(worker.process.wait())
        try:
            while not exited.done():
                ports = self._read_ports(worker.port_file)
                if ports is not None:
                    worker.metrics_port = int(ports["metrics_port"])
                    return True
                await asyncio.wait({exited}, timeout=READY_POLL_S)
            return False
        finally:
            if not exited.done():
                exited.cancel()

    @staticmethod
    def _read_ports(path: Path) -> dict[str, int] | None:
        try:
            ports = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):  # not yet written, or half written
            return None
        return ports if isinstance(ports, dict) and "metrics_port" in ports else None

    async def _exited(self, worker: Worker) -> int:
        code = await worker.process.wait()
        if worker.forwarding is not None:
            await worker.forwarding  # its last lines
        return code

    def _write_port_file(self) -> None:
        path = self.settings.port_file
        if path is None:
            return
        write_port_file(path, {
            "grpc_port": self.grpc_port,
            "metrics_ports": [self.workers[k].metrics_port for k in sorted(self.workers)],
            "worker_pids": [self.workers[k].process.pid for k in sorted(self.workers)],
        })  # fmt: skip

    async def _start_all(self) -> None:
        """Start every worker; return once all serve. A worker that exits first: the others are
        stopped and :class:`WorkersFailed` says why."""
        for index in range(self.count):
            self.workers[index] = await self._spawn(index)
        waits: dict[asyncio.Future[bool], Worker] = {
            asyncio.ensure_future(self._until_serving(worker)): worker
            for worker in self.workers.values()
        }
        stop = asyncio.ensure_future(self._wait_stop())
        try:
            pending = set(waits)
            while pending:
                done, pending = await asyncio.wait(
                    pending | {stop}, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(stop)
                if stop in done:
                    return
                for task in done:
                    if not task.result():
                        worker = waits[task]
                        code = await self._exited(worker)
                        raise WorkersFailed(
                            f"worker {worker.index} exited with {exit_status(code)} before "
                            f"serving; its last lines:\n{worker.last_lines()}"
                        )
        finally:
            stop.cancel()
            for task in waits:
                task.cancel()

    async def _wait_stop(self) -> bool:
        assert self._stop_requested is not None
        return await self._stop_requested.wait()

    async def _keep(self, index: int) -> None:
        """Watch worker ``index``; replace it whenever it dies, within the restart budget."""
        while True:
            worker = self.workers[index]
            code = await self._exited(worker)
            if self._stopping:
                return
            await self._forget(worker)
            if not self.budget.spend():
                raise WorkersFailed(
                    f"worker {index} (pid {worker.process.pid}) exited with {exit_status(code)}, "
                    f"more than {self.budget.allowed} restarts in {self.budget.window_s:g} s: "
                    f"giving up; its last lines:\n{worker.last_lines()}"
                )
            logger.warning("worker %d (pid %d) exited with %s; restarting it",
                           index, worker.process.pid, exit_status(code))  # fmt: skip
            replacement = await self._spawn(index)
            self.workers[index] = replacement
            if await self._until_serving(replacement) and not self._stopping:
                self._write_port_file()
                logger.info("worker %d serves again (pid %d)", index, replacement.process.pid)

    async def _forget(self, worker: Worker) -> None:
        """End a dead worker's lease in the embedded store: it cannot write any more, so its
        sessions may move now rather than when the lease expires."""
        from service.cluster_embedded import EmbeddedStore

        if isinstance(self._store, EmbeddedStore):
            await self._store.backend.leave(worker.replica)

    async def _stop_workers(self) -> bool:
        """SIGTERM to every worker, wait for each (killed after the drain time and a margin);
        True when every one exited 0."""
        self._stopping = True
        workers = list(self.workers.values())
        for worker in workers:
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
        limit_s = self.settings.drain_timeout_s + SHUTDOWN_MARGIN_S
        # One deadline for all: they drain together, so N hung workers take one limit, not N.
        deadline = asyncio.get_running_loop().time() + limit_s
        clean = True
        for worker in workers:
            try:
                async with asyncio.timeout_at(deadline):
                    code = await self._exited(worker)
            except TimeoutError:
                logger.error("worker %d (pid %d) did not stop within %.0f s; killing it",
                             worker.index, worker.process.pid, limit_s)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                code = await self._exited(worker)
            clean = clean and code == 0
        return clean

    async def run(self) -> int:
        s = self.settings
        if s.metrics_port and s.metrics_port + self.count - 1 > 65535:
            raise WorkersFailed(
                f"metrics ports {s.metrics_port}..{s.metrics_port + self.count - 1} (one per "
                "worker) go past 65535; choose a lower --metrics-port"
            )
        try:
            reserved = reserve_port(s.host, s.grpc_port)
        except OSError as error:
            raise WorkersFailed(
                f"cannot bind gRPC to {s.host}:{s.grpc_port} ({error.strerror or error}); choose "
                "another port (--grpc-port)"
            ) from None
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop_requested.set)
        self.directory = Path(tempfile.mkdtemp(prefix="rnnserve-workers-"))  # mode 0700
        try:
            self.grpc_port = int(reserved.getsockname()[1])
            return await self._serve()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            reserved.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    async def _serve(self) -> int:
        from service.cluster_embedded import EmbeddedStore

        s = self.settings
        assert self.directory is not None and self._stop_requested is not None
        store = None
        if not s.cluster_redis_url:
            self.socket_path = self.directory / "cluster.sock"
            store = EmbeddedStore(self.socket_path)
            await store.start()
            self._store = store
        keepers: list[asyncio.Task[None]] = []
        failure: BaseException | None = None
        try:
            await self._start_all()
            if self._stop_requested.is_set():
                logger.info("stop requested while the workers started; stopping them")
            else:
                self._write_port_file()
                logger.info(
                    "%d workers serving on %s:%d (gRPC, one port), metrics on ports %s; "
                    "cluster store: %s",
                    self.count, s.host, self.grpc_port,
                    ", ".join(str(self.workers[k].metrics_port) for k in sorted(self.workers)),
                    store.describe() if store is not None else "Redis",
                )  # fmt: skip
                keepers = [asyncio.create_task(self._keep(k)) for k in range(self.count)]
                stop = asyncio.ensure_future(self._wait_stop())
                done, _ = await asyncio.wait({stop, *keepers}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                failure = next((t.exception() for t in done if t is not stop), None)
                if failure is not None:
                    logger.error("%s", failure)
                else:
                    logger.info("stop requested; stopping %d workers", self.count)
        finally:
            # No worker is replaced from here on; every one still there gets SIGTERM.
            self._stopping = True
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
            clean = await self._stop_workers()
            if store is not None:
                await store.stop()
        if failure is not None:
            return 1
        logger.info("stopped" if clean else "stopped; a worker did not exit cleanly")
        return 0 if clean else 1


def supervise(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``serve --workers N`` until SIGTERM or SIGINT; the exit status. Raises
    :class:`service.server.StartupError` when the workers cannot start."""
    from service.event_loop import run_to_result
    from service.server import StartupError

    supervisor = Supervisor(settings, worker_flags(args))
    try:
        return run_to_result(supervisor.run(), settings.event_loop)
    except WorkersFailed as error:
        raise StartupError(str(error)) from None
