"""Opening one model version and proving it fit to serve, before any session reaches it.

A model is served only if (1) its model.json reads, (2) onnxruntime loads its model.onnx, (3) its
graph has the contract's tensors by name, with matching types and sizes (the runtime then binds
them by name, never by position), and (4) it *behaves* as a streaming model: on random inputs, a
multi-step chunk over a batch of 2 gives what the same steps give one at a time, and what each
row gives alone. (4) catches what names cannot: states wired to the wrong outputs, a time-major
graph, a time axis fixed at export, rows that influence each other.

Used by the registry at start-up (a model that fails is refused, the others serve) and by
``rnnserve check`` (the same checks, offline). numpy and onnxruntime only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.batch_compute import compute_batch
from service.errors import ModelContractError
from service.repository import REEXPORT, ModelSpec, check_contract, read_spec
from service.runtime import ModelRuntime, tensorrt_profile
from service.settings import Settings
from service.state_bank import make_bank

CHECK_ROWS = 2
CHECK_STEPS = 3  # not CHECK_ROWS: a time-major graph then fails instead of passing by chance
CHECK_TOLERANCE = 1e-4  # float32 rounding of a few steps of a small recurrent model
CHECK_SEED = 0


def open_model(
    directory: Path, settings: Settings, runtime_class: type[ModelRuntime] = ModelRuntime
) -> tuple[ModelSpec, ModelRuntime]:
    """The spec and runtime of the model version in ``directory``, checked (1)-(4); raises
    :class:`ModelContractError` with one line naming the model and what to do."""
    spec = read_spec(directory)
    s = settings
    try:
        runtime = runtime_class(
            spec.onnx_path,
            provider=s.execution_provider,
            fallback=s.provider_fallback,
            intra_op_threads=s.intra_op_threads,
            inter_op_threads=s.inter_op_threads,
            spin_wait=s.ort_spin_wait,
            single_thread_twin=s.inline_compute_below_s > 0,
            device_id=s.gpu_device_id,
            tensorrt=tensorrt_profile(spec.tensors, s.max_batch_size, s.max_chunk_steps),
        )
    except Exception as error:
        raise unloadable(spec, error) from error
    check_contract(spec, runtime)
    runtime.bind(spec.tensors)
    check_behaviour(spec, runtime)
    on_gpu = runtime.device.kind == "cuda"
    if s.resolved_state_residency(on_gpu) == "device" and runtime.runs_device_state:
        check_device_state(spec, runtime, s.resolved_batch_buckets(on_gpu))
    return spec, runtime


def unloadable(spec: ModelSpec, error: Exception) -> Exception:
    """onnxruntime's error for a model.onnx it cannot load (no common base class: told by its
    module) as a ModelContractError naming the model in one line; any other error as it is."""
    if not type(error).__module__.startswith("onnxruntime"):
        return error
    reason = " ".join(str(error).split())
    return ModelContractError(
        f"model {spec.label}: onnxruntime cannot load {spec.onnx_path} ({reason}); {REEXPORT}"
    )


def check_behaviour(spec: ModelSpec, runtime: ModelRuntime) -> None:
    """(4): a chunk over a batch equals its steps one at a time and each row alone."""
    rng = np.random.default_rng(CHECK_SEED)
    x = spec.tensors.sample(rng, CHECK_ROWS, CHECK_STEPS)
    states = [  # as stored: [pre, rows, post]
        0.1 * rng.standard_normal((s.pre, CHECK_ROWS, s.post)).astype(np.float32)
        for s in spec.tensors.states
    ]
    try:
        y, final = runtime.run(x, states)
        stepped, carried = [], states
        for t in range(CHECK_STEPS):
            y_t, carried = runtime.run(x[:, t : t + 1], carried)
            stepped.append(y_t)
        alone = [runtime.run(x[r : r + 1], [s[:, r : r + 1] for s in states]) for r in range(2)]
    except Exception as error:  # onnxruntime's shape errors: a fixed axis, a time-major graph
        reason = " ".join(str(error).split())[:300]
        raise behaviour_error(spec, f"a chunk of {CHECK_STEPS} steps over {CHECK_ROWS} rows "
                                    f"failed ({reason})") from None  # fmt: skip
    expected_y = (CHECK_ROWS, CHECK_STEPS, spec.output_size)
    if np.shape(y) != expected_y:
        raise behaviour_error(spec, f"y came back {list(np.shape(y))}, expected {list(expected_y)}")
    if not close(y, np.concatenate(stepped, axis=1)) or not all(
        close(a, b) for a, b in zip(final, carried, strict=True)
    ):
        raise behaviour_error(
            spec, "a multi-step chunk differs from the same steps one at a time (the states are "
            "not carried from each step to the next: states wired to the wrong outputs?)"
        )  # fmt: skip
    for row, (y_row, final_row) in enumerate(alone):
        if not close(y[row : row + 1], y_row) or not all(
            close(f[:, row : row + 1], g) for f, g in zip(final, final_row, strict=True)
        ):
            raise behaviour_error(
                spec, "a row computed in a batch differs from the same row alone (rows "
                "influence each other: a time-major graph, or batch and time swapped?)"
            )  # fmt: skip


def check_device_state(spec: ModelSpec, runtime: ModelRuntime, buckets: tuple[int, ...]) -> None:
    """With ``state_residency=device``: one batch through the device path (a bank on the
    model's device, gather, a padded call bound by IOBinding, scatter, read back) gives what the
    host path gives, so a model or provider that cannot serve it is refused at load instead of
    failing every chunk."""
    rng = np.random.default_rng(CHECK_SEED)
    x = spec.tensors.sample(rng, CHECK_ROWS, CHECK_STEPS)
    sig = spec.tensors
    initial = [
        [0.1 * rng.standard_normal(s.shape).astype(np.float32) for s in sig.states]
        for _ in range(CHECK_ROWS)
    ]
    stored = [np.stack([s.stored(row[k]) for row in initial], axis=1)
              for k, s in enumerate(sig.states)]  # fmt: skip
    try:
        y_host, states_host = runtime.run(x, stored)
        bank = make_bank("device", runtime.device, capacity=CHECK_ROWS,
                         fills=[s.stored(s.initial_value()) for s in sig.states])  # fmt: skip
        slots = np.arange(CHECK_ROWS)
        for slot in slots:
            bank.write(int(slot), [s.stored(initial[slot][k]) for k, s in enumerate(sig.states)])
        outcome = compute_batch(runtime.run_bound, spec.label, list(x), bank.gather(slots),
                                bank.rows, buckets)  # fmt: skip
        if outcome.error is not None:
            raise outcome.error
        bank.scatter(slots, outcome.states)
        states_device = bank.read(list(slots))
    except Exception as error:
        reason = " ".join(str(error).split())[:300]
        raise ModelContractError(
            f"model {spec.label} cannot keep its state on the {runtime.device.kind} device "
            f"({type(error).__name__}: {reason}); set RNNSERVE_STATE_RESIDENCY=host"
        ) from None
    same = all(close(a, b) for a, b in zip(outcome.outputs, y_host, strict=True)) and all(
        close(a, b) for a, b in zip(states_device, states_host, strict=True)
    )
    if not same:
        raise ModelContractError(
            f"model {spec.label}: with its state on the {runtime.device.kind} device it computes "
            "other values than with the state on the host; set RNNSERVE_STATE_RESIDENCY=host"
        )


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.shape(a) == np.shape(b) and np.allclose(a, b, atol=CHECK_TOLERANCE))


def behaviour_error(spec: ModelSpec, what: str) -> ModelContractError:
    """The refusal of a model that does not stream exactly, with the fixes that apply to it."""
    declare = (
        "if the graph is time-major or its states sit otherwise, say so in model.json's "
        '"signature" (layout "TB", the states\' names and batch_axis: docs/YOUR_MODEL.md); '
        "if it comes from torch, export it batch-major with a dynamic time axis "
        "(python -m training export-module, docs/TRAINING.md); or remove its folder"
    )
    return ModelContractError(f"model {spec.label} does not stream exactly: {what}; {declare}")
