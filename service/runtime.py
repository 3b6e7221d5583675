"""One onnxruntime session per model version, and the choice of execution providers.

Provider choice is a pure function (:func:`resolve_providers`) so it can be tested without a GPU:
``cpu`` uses the CPU provider; ``cuda`` and ``tensorrt`` ask for the GPU providers and either fail
with a clear message when onnxruntime lacks them, or, with ``provider_fallback``, log a warning and
run on the CPU.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.logs import ONNXRUNTIME_LOG_SEVERITY
from service.settings import ExecutionProvider
from service.signature import Signature, StateSpec, TensorSpec
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
    requested: ExecutionProvider, available: Sequence[str], fallback: bool, loaded: bool = True
) -> list[str]:
    """The provider list to hand onnxruntime for ``requested`` given the ``available`` ones.
    ``loaded=False``: the provider is installed but onnxruntime could not start it."""
    chain = PROVIDER_CHAINS[requested]
    primary = chain[0]
    if primary in available:
        return [p for p in chain if p in available]
    if loaded:
        message = (
            f"execution provider {requested!r} needs {primary}, but this onnxruntime offers only "
            f"{', '.join(available) or 'nothing'}; install onnxruntime-gpu with matching CUDA "
            "libraries (docs/DEPLOY.md), or set RNNSERVE_EXECUTION_PROVIDER=cpu"
        )
    else:
        message = (
            f"execution provider {requested!r}: {primary} is installed but failed to start (no "
            "GPU or driver visible to this process, or a CUDA library missing: run the container "
            "with --gpus all and the NVIDIA container runtime, docs/DEPLOY.md), or set "
            "RNNSERVE_EXECUTION_PROVIDER=cpu"
        )
    if not fallback:
        raise ProviderUnavailable(message + " (or RNNSERVE_PROVIDER_FALLBACK=true to run on CPU)")
    logger.warning("%s; falling back to CPUExecutionProvider (provider_fallback is on)", message)
    return [CPU]


ProviderChoice = str | tuple[str, dict[str, str]]
TF32_OVERRIDE = "NVIDIA_TF32_OVERRIDE"


def with_options(
    providers: Sequence[str], device_id: int, tensorrt: dict[str, str] | None = None
) -> list[ProviderChoice]:
    """``providers`` as onnxruntime takes them: the GPU providers on ``device_id``, the CUDA
    provider computing float32 matrix products in float32 (``use_tf32=0``), TensorRT with
    ``tensorrt``'s options (:func:`tensorrt_profile`)."""
    chosen: list[ProviderChoice] = []
    for name in providers:
        if name == CUDA:
            chosen.append((name, {"device_id": str(device_id), "use_tf32": "0"}))
        elif name == TENSORRT:
            chosen.append((name, {"device_id": str(device_id), **(tensorrt or {})}))
        else:
            chosen.append(name)
    return chosen


def keep_float32_exact(environ: MutableMapping[str, str]) -> None:
    """Turn TF32 off in every CUDA library of this process before CUDA starts: cuDNN's RNN
    kernels (the ONNX LSTM/GRU/RNN ops) and TensorRT round float32 to TF32's 10-bit mantissa on
    recent GPUs whatever ``use_tf32`` says, which moves outputs ~1e-3 from the offline run.
    ``NVIDIA_TF32_OVERRIDE=0`` is the one switch they all obey; an operator who set it keeps
    their value (with a warning if it allows TF32)."""
    value = environ.setdefault(TF32_OVERRIDE, "0")
    if value != "0":
        logger.warning(
            "%s=%s: GPU float32 math may use TF32; outputs can differ from the offline run by "
            "~1e-3", TF32_OVERRIDE, value,
        )  # fmt: skip


def tensorrt_profile(signature: Signature, max_rows: int, max_steps: int) -> dict[str, str]:
    """TensorRT options for one model: an optimisation profile spanning every batch (1 to
    ``max_rows``) and chunk length (1 to ``max_steps``) the server can send, so one engine is
    built at the first call instead of a new one whenever a shape falls outside the last."""

    def shapes(rows: int, steps: int) -> str:
        dims = {i.name: i.graph_dims(rows, steps) for i in signature.inputs}
        dims.update({s.input: s.graph_dims(rows) for s in signature.states})
        return ",".join(f"{name}:{'x'.join(map(str, d))}" for name, d in dims.items())

    return {
        "trt_profile_min_shapes": shapes(1, 1),
        "trt_profile_opt_shapes": shapes(max_rows, 1),
        "trt_profile_max_shapes": shapes(max_rows, max_steps),
    }


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
        tensorrt: dict[str, str] | None = None,
    ) -> None:
        providers = resolve_providers(provider, ort.get_available_providers(), fallback)
        if providers[0] in (CUDA, TENSORRT):
            keep_float32_exact(os.environ)
            preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu >= 1.21
            if preload is not None:  # CUDA and cuDNN from their pip wheels, if installed so
                preload()

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
                str(path), options, providers=with_options(chosen, device_id, tensorrt)
            )

        self.session = open_session(intra_op_threads, providers)
        active = self.session.get_providers()
        if providers[0] not in active:
            # onnxruntime skips a provider whose libraries or device fail to load.
            resolve_providers(provider, active, fallback, loaded=False)
        self.providers: list[str] = active
        self.single_thread_session = self.session
        if single_thread_twin and active == [CPU] and intra_op_threads != 1:
            self.single_thread_session = open_session(1, [CPU], arena=False)
        # Until bind(): the default convention, tensors in the graph's declared order.
        self.signature = Signature((TensorSpec("x", (0,)),), (TensorSpec("y", (0,)),), ())
        self.state_inputs: list[str] = [i.name for i in self.session.get_inputs()][1:]
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]
        self.state_specs: tuple[StateSpec, ...] | None = None  # None: stored = graph shapes
        on_gpu = active[0] in (CUDA, TENSORRT)
        self.device = Device("cuda", device_id) if on_gpu else Device("cpu")

    @property
    def runs_device_state(self) -> bool:
        """Whether :meth:`run_bound` computes what :meth:`run` does: false for a subclass that
        overrides only :meth:`run` (its device path would bypass the override)."""
        cls = type(self)
        return cls.run is ModelRuntime.run or cls.run_bound is not ModelRuntime.run_bound

    def bind(self, signature: Signature) -> None:
        """Feed and read every tensor by its name in ``signature``, whatever order the graph
        declares them in (by position, a graph declaring ``[x, c0, h0]`` would be fed h as c:
        silently wrong outputs), converting layouts and state shapes (:mod:`service.signature`)."""
        self.signature = signature
        self.state_inputs = list(signature.state_inputs)
        self.output_names = [*(o.name for o in signature.outputs), *signature.state_outputs]
        self.state_specs = None if signature.conventional else signature.states

    def _graph_state(self, k: int, state: np.ndarray) -> np.ndarray:
        """Stored [pre, rows, post] as the graph's shape (a view)."""
        if self.state_specs is None:
            return state
        return state.reshape(self.state_specs[k].graph_dims(state.shape[1]))  # type: ignore[arg-type]

    def _stored_state(self, k: int, state: np.ndarray, rows: int) -> np.ndarray:
        """The graph's state as stored [pre, rows, post] (a view)."""
        if self.state_specs is None:
            return state
        spec = self.state_specs[k]
        return state.reshape(spec.pre, rows, spec.post)

    def run(
        self, x: np.ndarray, states: Sequence[np.ndarray], single_thread: bool = False
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call: ``x`` [rows, steps, features] and stored states [pre, rows, post] in, ``y``
        [rows, steps, outputs] and the new stored states out."""
        sig = self.signature
        feeds = {t.name: t.to_graph(a) for t, a in zip(sig.inputs, sig.unpack(x), strict=True)}
        for k, (name, state) in enumerate(zip(self.state_inputs, states, strict=True)):
            feeds[name] = self._graph_state(k, state)
        session = self.single_thread_session if single_thread else self.session
        results = session.run(self.output_names, feeds)
        count = len(sig.outputs)
        rows = x.shape[0]
        new = [self._stored_state(k, s, rows) for k, s in enumerate(results[count:])]
        return self._packed_outputs(results[:count]), new

    def _packed_outputs(self, ys: Sequence[np.ndarray]) -> np.ndarray:
        """The graph's outputs as one packed [rows, steps, output_size] array."""
        sig = self.signature
        return sig.pack_outputs([t.from_graph(y) for t, y in zip(sig.outputs, ys, strict=True)])

    def run_bound(
        self, x: np.ndarray, states: Sequence[ort.OrtValue], single_thread: bool = False
    ) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """:meth:`run` with the states already on :attr:`device` (``state_residency=device``):
        ``x`` goes in from the host, ``y`` comes back to it, and the new states are left on the
        device. A state whose graph shape differs from its stored shape is bound by address with
        the graph's shape (a reshape without a copy), into arrays allocated here in the stored
        shape; otherwise onnxruntime allocates them."""
        session = self.single_thread_session if single_thread else self.session
        binding = session.io_binding()
        sig = self.signature
        for tensor, array in zip(sig.inputs, sig.unpack(x), strict=True):
            binding.bind_cpu_input(tensor.name, tensor.to_graph(array))
        kind, device_id = self.device.kind, self.device.device_id
        rows = x.shape[0]
        allocated: list[ort.OrtValue | None] = []
        for k, (name, state) in enumerate(zip(self.state_inputs, states, strict=True)):
            if self.state_specs is None:
                binding.bind_ortvalue_input(name, state)
                continue
            dims = self.state_specs[k].graph_dims(rows)
            binding.bind_input(name, kind, device_id, np.float32, dims, state.data_ptr())
        count = len(sig.outputs)
        for name in self.output_names[:count]:
            binding.bind_output(name, "cpu")
        for k, name in enumerate(self.output_names[count:]):
            if self.state_specs is None:
                binding.bind_output(name, kind, device_id)
                allocated.append(None)
                continue
            spec = self.state_specs[k]
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                [spec.pre, rows, spec.post], np.float32, kind, device_id
            )
            binding.bind_output(
                name, kind, device_id, np.float32, spec.graph_dims(rows), value.data_ptr()
            )
            allocated.append(value)
        session.run_with_iobinding(binding)
        values = binding.get_outputs()
        new = [mine if mine is not None else got
               for mine, got in zip(allocated, values[count:], strict=True)]  # fmt: skip
        return self._packed_outputs([y.numpy() for y in values[:count]]), new

    def measure_cost(self, signature: Signature, max_rows: int, repeats: int = 5) -> CallCost:
        """Time calls of one step at 1 and at ``max_rows`` rows on initial states (the fastest
        of ``repeats`` each, so a busy machine inflates it little) and fit :class:`CallCost`. The
        single-thread session is timed: it is the one that runs the batches this cost places on
        the event loop. The first calls also warm onnxruntime up before any client waits."""

        def fastest_s(rows: int) -> float:
            x = signature.sample(np.random.default_rng(0), rows, 1)
            states = [np.zeros((s.pre, rows, s.post), np.float32) for s in signature.states]
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
