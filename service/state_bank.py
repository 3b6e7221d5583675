"""Where a model's recurrent state lives: host memory (numpy) or the model's device (OrtValues).

A bank holds one array per state tensor, ``[pre, capacity, post]`` (a state as stored:
:mod:`service.signature`), a slot per session. A
batch *gathers* its sessions' slots into batch-sized arrays ``[pre, rows, post]``, computes,
and *scatters* the new states back. With ``state_residency=host`` those arrays are numpy arrays
and every model call copies the batch's states to the device and back (free on the CPU provider).
With ``state_residency=device`` they are onnxruntime OrtValues on the model's device, and
gathering, scattering, growing and picking rows run there as tiny companion graphs
(``service/state_ops``, made by ``scripts/generate_state_ops.py``): only a chunk's inputs and
outputs cross the bus. The CPU provider runs the same graphs over CPU OrtValues, so the device
path is tested on every machine.

Both kinds share one interface, :class:`StateBank`, and batch-level row operations,
:class:`RowOps`, which :func:`service.batch_compute.compute_batch` uses without knowing which kind
it holds.

Concurrency: a bank is touched only from the event loop thread (gather before a batch goes to the
worker thread, scatter after it returns), like the session store that owns it. The row operations
on a batch's own arrays run in the worker thread, on arrays no other thread sees. onnxruntime runs
every call to completion before returning (the CUDA provider synchronizes its stream at the end
of a run unless told otherwise, and nothing here tells it otherwise), so a companion graph's
output is complete before the model call that reads it starts, whichever thread calls.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import onnxruntime as ort

from service.logs import ONNXRUNTIME_LOG_SEVERITY

STATE_OPS = Path(__file__).resolve().parent / "state_ops"

StateResidency = Literal["host", "device"]


@dataclass(frozen=True)
class Device:
    """An onnxruntime device: ``kind`` as IOBinding names it (``cpu`` or ``cuda``) and its id."""

    kind: Literal["cpu", "cuda"]
    device_id: int = 0

    @property
    def providers(self) -> list[Any]:
        """The providers that run the companion graphs on this device."""
        if self.kind == "cuda":
            return [
                ("CUDAExecutionProvider", {"device_id": self.device_id}),
                "CPUExecutionProvider",
            ]
        return ["CPUExecutionProvider"]


CPU_DEVICE = Device("cpu")


class RowOps(Protocol):
    """Row operations on a batch's state arrays (``[layers, rows, hidden]`` each), whatever
    they are: numpy arrays or OrtValues. ``rows`` are int64 row indices into the batch."""

    def take(self, states: list[Any], rows: np.ndarray) -> list[Any]:
        """New arrays holding ``rows`` of ``states``, in that order."""
        ...

    def put(self, states: list[Any], rows: np.ndarray, new: list[Any]) -> list[Any]:
        """``states`` with ``rows`` replaced by ``new`` (may write in place); returns them."""
        ...

    def pad(self, states: list[Any], rows: int) -> list[Any]:
        """``states`` followed by zero rows up to ``rows`` rows (new arrays)."""
        ...

    def shape(self, state: Any) -> tuple[int, ...]: ...


class StateBank(Protocol):
    """One model version's session states: one array per state tensor, a slot per session."""

    residency: StateResidency
    capacity: int
    rows: RowOps

    @property
    def nbytes(self) -> int:
        """Bytes the arrays hold (allocated capacity, not just live sessions)."""
        ...

    def grow(self, capacity: int) -> None:
        """Hold ``capacity`` slots (more than now), keeping every slot's state."""
        ...

    def write(self, slot: int, values: Sequence[np.ndarray] | None) -> None:
        """Set ``slot``'s state to ``values`` (``[pre, post]`` each), or the initial state."""
        ...

    def read(self, slots: Sequence[int]) -> list[np.ndarray]:
        """Host copies of ``slots``' states, ``[pre, len(slots), post]`` each."""
        ...

    def gather(self, slots: np.ndarray, restarted: Sequence[int] = ()) -> list[Any]:
        """The states of ``slots`` as batch arrays; batch rows ``restarted`` get the initial
        state instead (a START)."""
        ...

    def scatter(self, slots: np.ndarray, states: list[Any]) -> None:
        """Write batch arrays ``states`` (one row per slot) into ``slots``."""
        ...


# ----- host: numpy arrays -------------------------------------------------------------------


class HostRows:
    """:class:`RowOps` for numpy arrays."""

    def take(self, states: list[np.ndarray], rows: np.ndarray) -> list[np.ndarray]:
        return [s[:, rows, :] for s in states]

    def put(
        self, states: list[np.ndarray], rows: np.ndarray, new: list[np.ndarray]
    ) -> list[np.ndarray]:
        for state, values in zip(states, new, strict=True):
            state[:, rows, :] = values
        return states

    def pad(self, states: list[np.ndarray], rows: int) -> list[np.ndarray]:
        return [
            np.concatenate([s, np.zeros((s.shape[0], rows - s.shape[1], s.shape[2]), s.dtype)], 1)
            for s in states
        ]

    def shape(self, state: np.ndarray) -> tuple[int, ...]:
        return tuple(state.shape)


class HostStateBank:
    """States in numpy arrays in host memory (``state_residency=host``)."""

    residency: StateResidency = "host"
    rows: RowOps = HostRows()

    def __init__(self, *, fills: Sequence[np.ndarray], capacity: int) -> None:
        """``fills``: each state's initial value as stored, ``[pre, post]``."""
        self.fills = [np.asarray(f, np.float32) for f in fills]
        self.capacity = capacity
        self.arrays = [self._fresh(f, capacity) for f in self.fills]

    @staticmethod
    def _fresh(fill: np.ndarray, rows: int) -> np.ndarray:
        """Zeros: a slot gets its state when a session is created there (:meth:`write`)."""
        return np.zeros((fill.shape[0], rows, fill.shape[1]), np.float32)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def grow(self, capacity: int) -> None:
        for k, old in enumerate(self.arrays):
            grown = self._fresh(self.fills[k], capacity)
            grown[:, : self.capacity] = old
            self.arrays[k] = grown
        self.capacity = capacity

    def write(self, slot: int, values: Sequence[np.ndarray] | None) -> None:
        for k, array in enumerate(self.arrays):
            array[:, slot, :] = self.fills[k] if values is None else values[k]

    def read(self, slots: Sequence[int]) -> list[np.ndarray]:
        return [array[:, list(slots), :] for array in self.arrays]  # fancy index: a copy

    def gather(self, slots: np.ndarray, restarted: Sequence[int] = ()) -> list[np.ndarray]:
        if len(slots) == 1:  # a slice is several times cheaper than fancy indexing
            slot = int(slots[0])
            states = [array[:, slot : slot + 1, :].copy() for array in self.arrays]
        else:
            states = [array.take(slots, axis=1) for array in self.arrays]  # take: new, C-ordered
        for row in restarted:
            for state, fill in zip(states, self.fills, strict=True):
                state[:, row, :] = fill
        return states

    def scatter(self, slots: np.ndarray, states: list[np.ndarray]) -> None:
        if len(slots) == 1:
            slot = int(slots[0])
            for array, new in zip(self.arrays, states, strict=True):
                array[:, slot : slot + 1, :] = new
            return
        for array, new in zip(self.arrays, states, strict=True):
            array[:, slots, :] = new


# ----- device: OrtValues moved by companion graphs -------------------------------------------


class StateGraphs:
    """The companion graphs on one device, and :class:`RowOps` for OrtValues built on them.

    Each call binds its inputs and outputs with IOBinding: arrays already on the device stay
    there, host inputs (indices, masks) are copied in, and outputs are allocated on the device.
    Scatters bind their output to their input, so onnxruntime's ScatterND writes the rows in place
    instead of copying the whole bank (both the CPU and the CUDA kernel skip the copy when input
    and output share a buffer: 5 µs instead of 6 ms for a 64k-slot bank here)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        options = ort.SessionOptions()
        options.log_severity_level = ONNXRUNTIME_LOG_SEVERITY
        options.intra_op_num_threads = 1  # row copies: too small to gain from a thread pool
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

        def load(name: str) -> ort.InferenceSession:
            path = STATE_OPS / f"{name}.onnx"
            return ort.InferenceSession(str(path), options, providers=device.providers)

        self._gather = load("gather_rows")
        self._scatter = load("scatter_rows")
        self._grow = load("grow_rows")
        self.zero = self.on_device(np.zeros((1, 1, 1), np.float32))

    # The primitives ------------------------------------------------------------------------
    def picked(
        self,
        state: ort.OrtValue,
        rows: np.ndarray,
        keep: np.ndarray,
        fill: ort.OrtValue,
        on_host: bool = False,
    ) -> ort.OrtValue:
        """``state[:, rows, :]`` with the rows where ``keep`` is false set to ``fill``
        ([pre, 1, post] or [1, 1, 1], on the device); on the device, or copied to the host
        (``on_host``)."""
        binding = self._gather.io_binding()
        binding.bind_ortvalue_input("states", state)
        binding.bind_cpu_input("rows", np.ascontiguousarray(rows, np.int64))
        binding.bind_cpu_input("keep", np.ascontiguousarray(keep, np.bool_).reshape(1, -1, 1))
        binding.bind_ortvalue_input("fill", fill)
        if on_host:
            binding.bind_output("picked", "cpu")
        else:
            binding.bind_output("picked", self.device.kind, self.device.device_id)
        self._gather.run_with_iobinding(binding)
        value: ort.OrtValue = binding.get_outputs()[0]
        return value

    def picked_to_host(self, state: ort.OrtValue, rows: np.ndarray) -> np.ndarray:
        """``state[:, rows, :]`` copied to a host array."""
        keep = np.ones(len(rows), np.bool_)
        host: np.ndarray = self.picked(state, rows, keep, self.zero, on_host=True).numpy()
        return host

    def write_rows(self, state: ort.OrtValue, rows: np.ndarray, updates: Any) -> None:
        """``state[:, rows, :] = updates`` in place; ``updates`` an OrtValue or a host array."""
        layers = state.shape()[0]
        index = np.empty((layers, len(rows), 2), np.int64)
        index[:, :, 0] = np.arange(layers)[:, None]
        index[:, :, 1] = rows
        binding = self._scatter.io_binding()
        binding.bind_ortvalue_input("states", state)
        binding.bind_cpu_input("index", index)
        if isinstance(updates, np.ndarray):
            binding.bind_cpu_input("updates", np.ascontiguousarray(updates, np.float32))
        else:
            binding.bind_ortvalue_input("updates", updates)
        binding.bind_ortvalue_output("written", state)  # in place: see the class docstring
        self._scatter.run_with_iobinding(binding)

    def grown(self, state: ort.OrtValue, extra_rows: int) -> ort.OrtValue:
        """``state`` followed by ``extra_rows`` zero rows (a new array)."""
        binding = self._grow.io_binding()
        binding.bind_ortvalue_input("states", state)
        binding.bind_cpu_input("pads", np.array([0, 0, 0, 0, extra_rows, 0], np.int64))
        binding.bind_output("grown", self.device.kind, self.device.device_id)
        self._grow.run_with_iobinding(binding)
        value: ort.OrtValue = binding.get_outputs()[0]
        return value

    def on_device(self, array: np.ndarray) -> ort.OrtValue:
        """A copy of host ``array`` on the device (on the CPU device the OrtValue shares the
        numpy array's memory and keeps it alive: the array must not be written afterwards)."""
        return ort.OrtValue.ortvalue_from_numpy(
            np.array(array, np.float32), self.device.kind, self.device.device_id
        )

    # RowOps ----------------------------------------------------------------------------------
    def take(self, states: list[ort.OrtValue], rows: np.ndarray) -> list[ort.OrtValue]:
        keep = np.ones(len(rows), np.bool_)
        return [self.picked(s, rows, keep, self.zero) for s in states]

    def put(
        self, states: list[ort.OrtValue], rows: np.ndarray, new: list[ort.OrtValue]
    ) -> list[ort.OrtValue]:
        for state, values in zip(states, new, strict=True):
            self.write_rows(state, rows, values)
        return states

    def pad(self, states: list[ort.OrtValue], rows: int) -> list[ort.OrtValue]:
        return [self.grown(s, rows - s.shape()[1]) for s in states]

    def shape(self, state: ort.OrtValue) -> tuple[int, ...]:
        return tuple(state.shape())


@functools.cache
def graphs_on(device: Device) -> StateGraphs:
    """The companion graphs of ``device``, loaded once per process and shared by every model on
    it: each onnxruntime session on a GPU holds its own memory arena and library handles.
    onnxruntime sessions may run concurrently from several threads."""
    return StateGraphs(device)


class DeviceStateBank:
    """States in OrtValues on the model's device (``state_residency=device``)."""

    residency: StateResidency = "device"

    def __init__(self, *, fills: Sequence[np.ndarray], capacity: int, device: Device) -> None:
        """``fills``: each state's initial value as stored, ``[pre, post]``."""
        self.graphs = graphs_on(device)
        self.rows: RowOps = self.graphs
        self.capacity = capacity
        self.fills = [np.asarray(f, np.float32) for f in fills]
        self.device_fills = [self.graphs.on_device(f[:, None, :]) for f in self.fills]
        self.arrays = [  # zeros: a slot gets its state when a session is created there
            self.graphs.on_device(np.zeros((f.shape[0], capacity, f.shape[1]))) for f in self.fills
        ]

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.fills) * self.capacity * 4

    def grow(self, capacity: int) -> None:
        """New slots hold zeros until a session is created there (:meth:`write`)."""
        self.arrays = [self.graphs.grown(a, capacity - self.capacity) for a in self.arrays]
        self.capacity = capacity

    def write(self, slot: int, values: Sequence[np.ndarray] | None) -> None:
        rows = np.array([slot], np.int64)
        for k, array in enumerate(self.arrays):
            row = self.fills[k] if values is None else values[k]
            self.graphs.write_rows(array, rows, np.asarray(row, np.float32)[:, None, :])

    def read(self, slots: Sequence[int]) -> list[np.ndarray]:
        rows = np.asarray(slots, np.int64)
        if not len(rows):
            return [np.zeros((f.shape[0], 0, f.shape[1]), np.float32) for f in self.fills]
        return [self.graphs.picked_to_host(array, rows) for array in self.arrays]

    def gather(self, slots: np.ndarray, restarted: Sequence[int] = ()) -> list[ort.OrtValue]:
        keep = np.ones(len(slots), np.bool_)
        keep[list(restarted)] = False
        rows = slots.astype(np.int64, copy=False)
        return [
            self.graphs.picked(array, rows, keep, fill)
            for array, fill in zip(self.arrays, self.device_fills, strict=True)
        ]

    def scatter(self, slots: np.ndarray, states: list[ort.OrtValue]) -> None:
        rows = slots.astype(np.int64, copy=False)
        for array, new in zip(self.arrays, states, strict=True):
            self.graphs.write_rows(array, rows, new)


def make_bank(
    residency: StateResidency, device: Device, *, fills: Sequence[np.ndarray], capacity: int
) -> StateBank:
    """A bank of one array per state (``fills``: each one's initial value as stored, [pre, post])
    with room for ``capacity`` sessions."""
    if residency == "device":
        return DeviceStateBank(fills=fills, capacity=capacity, device=device)
    return HostStateBank(fills=fills, capacity=capacity)
