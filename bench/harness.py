"""Processes and limits for the benchmark: the server under test, the no-op transport server,
server CPU time, the batch sizes the server formed, and onnxruntime's in-process throughput."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from bench.noop_server import Flavour
from service.repository import read_spec
from service.runtime import ModelRuntime

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The checkout this package runs from: the processes started here import ``bench`` (and, unless
# told to run another source tree, ``service``) from it.
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServerProcess:
    """A server started for one measurement; stopped (SIGTERM, then kill) by :meth:`stop`."""

    process: subprocess.Popen[str]
    grpc_port: int
    metrics_port: int | None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def stop(self) -> None:
        """Stop the process; its output pipe is closed by the thread that reads it to its end."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass(frozen=True)
class RunningServer:
    """A server this benchmark did not start (``python -m bench --target``): measured through its
    API and, given its metrics port, its batch sizes; its CPU time is not known here."""

    target: str
    metrics_port: int | None = None


def served_input_size(target: str, model: str) -> int:
    """Input features per step of ``model``, as the server at ``target`` describes it."""
    import grpc

    from service._proto.rnnserve.v1 import streaming_pb2 as pb
    from service._proto.rnnserve.v1 import streaming_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.StreamingInferenceStub(channel)
        info = stub.GetModel(pb.GetModelRequest(model=model), timeout=30)
    return int(info.input_size)


@dataclass(frozen=True)
class MachineTicks:
    """The whole machine's CPU time counters (Linux /proc/stat, clock ticks over all CPUs)."""

    total: int
    idle: int  # idle and iowait
    steal: int  # taken by the hypervisor for other guests: the noise of a shared VM

    @classmethod
    def now(cls) -> MachineTicks:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        # user nice system idle iowait irq softirq steal (guest time is already in user)
        return cls(total=sum(fields[:8]), idle=fields[3] + fields[4], steal=fields[7])

    def fractions_since(self, earlier: MachineTicks) -> tuple[float, float]:
        """(idle, steal) fractions of the machine's CPU time between ``earlier`` and this."""
        total = max(self.total - earlier.total, 1)
        return (self.idle - earlier.idle) / total, (self.steal - earlier.steal) / total


class WindowCounters:
    """CPU counters read at the edges of a load's measured window: pass :meth:`record` to
    ``drive`` as its ``on_window_edge``, then read the server's CPU seconds and the machine's idle
    and steal fractions over exactly that window."""

    def __init__(self, server: ServerProcess | None = None) -> None:
        self.server = server
        self._edges: dict[str, tuple[float, MachineTicks]] = {}

    def record(self, edge: str) -> None:
        cpu = self.server.cpu_seconds() if self.server is not None else 0.0
        self._edges[edge] = (cpu, MachineTicks.now())

    @property
    def server_cpu_s(self) -> float:
        return self._edges["end"][0] - self._edges["start"][0]

    @property
    def idle_and_steal(self) -> tuple[float, float]:
        return self._edges["end"][1].fractions_since(self._edges["start"][1])


def _discard(stream: IO[str]) -> None:
    """Read ``stream`` to its end (the process exited) and close it."""
    with stream:
        for _ in stream:
            pass


def source_env(source: Path = REPO_ROOT) -> dict[str, str]:
    """The environment of a ``python -m`` child that imports its packages from the source tree
    ``source`` (run it with ``cwd=source`` too): that tree first on PYTHONPATH, output unbuffered."""
    pythonpath = os.pathsep.join(p for p in (str(source), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}


def _start(
    command: list[str], ready_marker: str, source: Path = REPO_ROOT
) -> tuple[subprocess.Popen[str], dict[str, int]]:
    """Run ``command`` (``python -m MODULE ...``) from the source tree ``source``."""
    port_file = Path(tempfile.mkdtemp(prefix="rnnserve-bench-")) / "ports.json"
    process = subprocess.Popen(
        [*command, "--port-file", str(port_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=source,
        env=source_env(source),
    )
    assert process.stdout is not None
    for line in process.stdout:  # blocks until the server says it serves, or exits
        if ready_marker in line:
            break
    else:
        process.stdout.close()
        raise RuntimeError(f"{command[2:4]} exited with {process.wait()} before serving")
    # Keep reading its output so a chatty server never blocks on a full pipe.
    threading.Thread(target=_discard, args=(process.stdout,), daemon=True).start()
    return process, json.loads(port_file.read_text())


def start_server(
    repository: Path,
    *,
    zero_model: bool = False,
    source: Path | None = None,
    **settings: object,
) -> ServerProcess:
    """``rnnserve serve`` on free loopback ports with the given settings; with ``zero_model``, the
    diagnostic whose model calls return zeros (``bench.zero_model_server``); with ``source``, the
    server of another source tree (a checkout of another commit, e.g. a ``git worktree``), run as
    ``python -m service.cli serve`` with that tree as working directory and first on PYTHONPATH.

    The server runs in its source tree's directory: relative paths in ``settings`` resolve there.
    """
    if zero_model and source is not None:
        raise ValueError("the zero-model server runs from this checkout only")
    module = "bench.zero_model_server" if zero_model else "service.cli"
    command = [sys.executable, "-m", module, "serve", "--host", "127.0.0.1", "--grpc-port", "0",
               "--metrics-port", "0", "--model-repository", str(repository.resolve()),
               "--session-ttl-s", "0", "--snapshot-backend", "none"]  # fmt: skip
    for name, value in settings.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    process, ports = _start(command, "serving", REPO_ROOT if source is None else source.resolve())
    return ServerProcess(process, ports["grpc_port"], ports["metrics_port"])


def start_noop_server(outputs: int, flavour: Flavour = "asyncio") -> ServerProcess:
    """The no-op transport server (``bench.noop_server``) on a free loopback port."""
    command = [sys.executable, "-m", "bench.noop_server", "--outputs", str(outputs),
               "--flavour", flavour]  # fmt: skip
    process, ports = _start(command, "serving")
    return ServerProcess(process, ports["grpc_port"], None)


def scrape(metrics_port: int) -> dict[str, float]:
    """The server's Prometheus samples as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def batch_sizes(
    before: dict[str, float], after: dict[str, float], model: str
) -> tuple[float, float]:
    """(model calls, mean sessions per call) between two scrapes."""
    labels = f'{{model="{model}",version="1"}}'
    calls = after.get(f"rnnserve_batch_size_count{labels}", 0.0) - before.get(
        f"rnnserve_batch_size_count{labels}", 0.0
    )
    total = after.get(f"rnnserve_batch_size_sum{labels}", 0.0) - before.get(
        f"rnnserve_batch_size_sum{labels}", 0.0
    )
    return calls, (total / calls if calls else 0.0)


def compute_limit(
    version_dir: Path, batch: int, chunk_steps: int, seconds: float = 1.0, threads: int = 0
) -> float:
    """Steps per second onnxruntime reaches in-process at this batch size (no transport, no queue)."""
    spec = read_spec(version_dir)
    runtime = ModelRuntime(spec.onnx_path, intra_op_threads=threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, chunk_steps, spec.input_size)).astype(np.float32)
    states = [
        np.zeros((spec.num_layers, batch, spec.hidden_size), np.float32) for _ in spec.state_inputs
    ]
    runtime.run(x, states)  # warm-up
    calls = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        _, states = runtime.run(x, states)
        calls += 1
    return calls * batch * chunk_steps / (time.perf_counter() - started)
