"""One onnxruntime session per model version, and the choice of execution providers.

Provider choice is a pure function (:func:`resolve_providers`) so it can be tested without a GPU:
``cpu`` uses the CPU provider; ``cuda`` and ``tensorrt`` ask for the GPU providers and either fail
with a clear message when onnxruntime lacks them, or, with ``provider_fallback``, log a warning and
run on the CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.logs import ONNXRUNTIME_LOG_SEVERITY
from service.settings import ExecutionProvider
from service.state_bank import Device

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
PROVIDER_CHAINS: dict[str, list[str]] = {
    "cpu": [CPU],
    "cuda": [CUDA, CPU],
    "tensorrt": [TENSORRT, CUDA, CPU],
}


class ProviderUnavailable(RuntimeError):
    """The configured execution provider is not available in this onnxruntime build or machine."""


def resolve_providers(
    requested: ExecutionProvider, available: Sequence[str], fallback: bool
) -> list[str]:
    """The provider list to hand onnxruntime for ``requested`` given the ``available`` ones."""
    chain = PROVIDER_CHAINS[requested]
    primary = chain[0]
    if primary in available:
        return [p for p in chain if p in available]
    message = (
        f"execution provider {requested!r} needs {primary}, but this onnxruntime offers only "
        f"{', '.join(available) or 'nothing'}; install onnxruntime-gpu with matching CUDA libraries, "
        "or set RNNSERVE_EXECUTION_PROVIDER=cpu"
    )
    if not fallback:
        raise ProviderUnavailable(message + " (or RNNSERVE_PROVIDER_FALLBACK=true to run on CPU)")
    logger.warning("%s; falling back to CPUExecutionProvider (provider_fallback is on)", message)
    return [CPU]


ProviderChoice = str | tuple[str, dict[str, str]]


def with_options(providers: Sequence[str], device_id: int) -> list[ProviderChoice]:
    """``providers`` as onnxruntime takes them, with the options exactness needs: the GPU
    providers on ``device_id``, and the CUDA provider computing float32 products in float32
    (``use_tf32=0``: by default it rounds them to TF32, a 10-bit mantissa, which puts outputs
    ~1e-3 away from the offline run's instead of float32 rounding)."""
    chosen: list[ProviderChoice] = []
    for name in providers:
        if name == CUDA:
            chosen.append((name, {"device_id": str(device_id), "use_tf32": "0"}))
        elif name == TENSORRT:
            chosen.append((name, {"device_id": str(device_id)}))
        else:
            chosen.append(name)
    return chosen


MEASURED_ROWS_AT_MOST = 256  # keeps the load-time measurement short for any max_batch_size


@dataclass(frozen=True)
class CallCost:
    """What one model call costs on this machine, measured when the model loads: a fixed part
    and a part per batch row, both per time step (a recurrent model's work grows linearly with the
    chunk's steps). Used to decide where a batch runs, never to report anything."""

    fixed_s: float
    per_row_s: float

    def estimate_s(self, rows: int, steps: int) -> float:
        return steps * (self.fixed_s + self.per_row_s * rows)


class ModelRuntime:
    """Runs one ONNX model: ``run(x, states) -> (y, new_states)`` with numpy arrays.

    ``run`` is called from the model's worker thread or, for cheap batches, the event loop
    (onnxruntime releases the GIL while it computes), and only ever by one thread at a time per
    model: the model's batcher owns it.

    With ``single_thread_twin`` on the CPU provider, a second session of the same model runs with
    one intra-op thread, for ``run(..., single_thread=True)``: a small call is faster on the
    calling thread alone than split across a pool whose threads must be woken on a machine busy
    with network I/O, while large calls still gain from the pool (docs/PERFORMANCE.md).
    """

    def __init__(
        self,
        path: Path,
        *,
        provider: ExecutionProvider = "cpu",
        fallback: bool = False,
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        spin_wait: bool = False,
        single_thread_twin: bool = False,
        device_id: int = 0,
    ) -> None:
        providers = resolve_providers(provider, ort.get_available_providers(), fallback)

        def open_session(
            intra_threads: int, chosen: list[str], arena: bool = True
        ) -> ort.InferenceSession:
            options = ort.SessionOptions()
            options.log_severity_level = ONNXRUNTIME_LOG_SEVERITY  # errors only: not JSON
            options.enable_cpu_mem_arena = arena
            options.intra_op_num_threads = intra_threads
            options.inter_op_num_threads = inter_op_threads
            spin = "1" if spin_wait else "0"
            options.add_session_config_entry("session.intra_op.allow_spinning", spin)
            options.add_session_config_entry("session.inter_op.allow_spinning", spin)
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            return ort.InferenceSession(
                str(path), options, providers=with_options(chosen, device_id)
            )

        self.session = open_session(intra_op_threads, providers)
        active = self.session.get_providers()
        if providers[0] not in active:
            # onnxruntime may skip a provider whose libraries fail to load; treat that like absence.
            resolve_providers(provider, active, fallback)
        self.providers: list[str] = active
        self.single_thread_session = self.session
        if single_thread_twin and active == [CPU] and intra_op_threads != 1:
            self.single_thread_session = open_session(1, [CPU], arena=False)
        self.state_inputs: list[str] = [i.name for i in self.session.get_inputs()][1:]
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]
        self.device = Device("cuda" if active[0] in (CUDA, TENSORRT) else "cpu", device_id)

    def bind(self, state_inputs: Sequence[str], state_outputs: Sequence[str]) -> None:
        """Feed the states to ``state_inputs`` and read them from ``state_outputs``, by name and
        in that order, whatever order the graph declares its tensors in (by position, a graph
        declaring ``[x, c0, h0]`` would be fed h as c: silently wrong outputs)."""
        self.state_inputs = list(state_inputs)
        self.output_names = ["y", *state_outputs]

    def run(
        self, x: np.ndarray, states: Sequence[np.ndarray], single_thread: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"x": x}
        for name, state in zip(self.state_inputs, states, strict=True):
            feeds[name] = state
        session = self.single_thread_session if single_thread else self.session
        y, *new_states = session.run(self.output_names, feeds)
        return y, new_states

    def run_bound(
        self, x: np.ndarray, states: Sequence[ort.OrtValue], single_thread: bool = False
    ) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """:meth:`run` with the states already on :attr:`device` (``state_residency=device``):
        ``x`` goes in from the host, ``y`` comes back to it, and the new states are left on the
        device, in arrays onnxruntime allocates there."""
        session = self.single_thread_session if single_thread else self.session
        binding = session.io_binding()
        binding.bind_cpu_input("x", x)
        for name, state in zip(self.state_inputs, states, strict=True):
            binding.bind_ortvalue_input(name, state)
        y_name, *state_outputs = self.output_names
        binding.bind_output(y_name, "cpu")
        for name in state_outputs:
            binding.bind_output(name, self.device.kind, self.device.device_id)
        session.run_with_iobinding(binding)
        y, *new_states = binding.get_outputs()
        return y.numpy(), new_states

    def measure_cost(
        self, *, input_size: int, layers: int, hidden: int, max_rows: int, repeats: int = 5
    ) -> CallCost:
        """Time calls of one step at 1 and at ``max_rows`` rows on zeros (the fastest of
        ``repeats`` each, so a busy machine inflates it little) and fit :class:`CallCost`. The
        single-thread session is timed: it is the one that runs the batches this cost places on
        the event loop. The first calls also warm onnxruntime up before any client waits."""

        def fastest_s(rows: int) -> float:
            x = np.zeros((rows, 1, input_size), np.float32)
            states = [np.zeros((layers, rows, hidden), np.float32) for _ in self.state_inputs]
            self.run(x, states, single_thread=True)
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                self.run(x, states, single_thread=True)
                best = min(best, time.perf_counter() - started)
            return best

        one = fastest_s(1)
        rows = min(max_rows, MEASURED_ROWS_AT_MOST)  # the cost is linear in rows beyond this
        if rows <= 1:
            return CallCost(fixed_s=one, per_row_s=0.0)
        per_row = max(0.0, (fastest_s(rows) - one) / (rows - 1))
        return CallCost(fixed_s=max(0.0, one - per_row), per_row_s=per_row)
