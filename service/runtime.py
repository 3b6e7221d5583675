"""One onnxruntime session per model version, and the choice of execution providers.

Provider choice is a pure function (:func:`resolve_providers`) so it can be tested without a GPU:
``cpu`` uses the CPU provider; ``cuda`` and ``tensorrt`` ask for the GPU providers and either fail
with a clear message when onnxruntime lacks them, or, with ``provider_fallback``, log a warning and
run on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.settings import ExecutionProvider

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


class ModelRuntime:
    """Runs one ONNX model: ``run(x, states) -> (y, new_states)`` with numpy arrays.

    ``run`` is called from a worker thread (onnxruntime releases the GIL while it computes) and
    only ever by one thread at a time per model: the model's scheduler owns it.
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
    ) -> None:
        providers = resolve_providers(provider, ort.get_available_providers(), fallback)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        spin = "1" if spin_wait else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        active = self.session.get_providers()
        if providers[0] not in active:
            # onnxruntime may skip a provider whose libraries fail to load; treat that like absence.
            resolve_providers(provider, active, fallback)
        self.providers: list[str] = active
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(
        self, x: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"x": x}
        for name, state in zip(self.input_names[1:], states, strict=True):
            feeds[name] = state
        y, *new_states = self.session.run(self.output_names, feeds)
        return y, new_states
