"""State banks (host numpy arrays vs device OrtValues), batch buckets and padding.

The device bank runs here over CPU OrtValues with the same companion graphs and IOBinding calls
as on a GPU, so its logic is proven on every machine; scripts/gpu_check.py repeats the checks on
a CUDA device.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.batch_compute import bucket_for, compute_batch
from service.model_check import open_model
from service.runtime import CPU, CUDA, TENSORRT, with_options
from service.session_store import SessionStore
from service.settings import Settings
from service.state_bank import CPU_DEVICE, DeviceStateBank, HostStateBank, StateBank
from tests.models_for_tests import OfflineReference

ROOT = Path(__file__).resolve().parent.parent
LAYERS, HIDDEN = 2, 5


def banks(capacity: int = 4) -> tuple[HostStateBank, DeviceStateBank]:
    shape: dict[str, Any] = {"count": 2, "layers": LAYERS, "hidden": HIDDEN, "capacity": capacity}
    return HostStateBank(**shape), DeviceStateBank(**shape, device=CPU_DEVICE)


def host_copy(bank: StateBank, states: list[Any]) -> list[np.ndarray]:
    return [s if isinstance(s, np.ndarray) else s.numpy() for s in states]


def test_host_and_device_banks_agree_through_every_operation() -> None:
    """A seeded run of writes, gathers (with restarting rows), scatters and growth: both banks
    hold the same bits after every step, and growing keeps every slot."""
    rng = np.random.default_rng(3)
    host, device = banks()
    for step in range(60):
        if step in (20, 40):  # grow past the initial capacity, as the store does when full
            for bank in (host, device):
                bank.grow(bank.capacity * 2)
        capacity = host.capacity
        slot = int(rng.integers(capacity))
        values = [rng.standard_normal((LAYERS, HIDDEN)).astype(np.float32) for _ in range(2)]
        fresh = None if step % 3 == 0 else values
        host.write(slot, fresh)
        device.write(slot, fresh)
        slots = rng.choice(capacity, size=int(rng.integers(1, capacity + 1)), replace=False)
        zeroed = [int(r) for r in np.flatnonzero(rng.random(len(slots)) < 0.3)]
        gathered = [host_copy(b, b.gather(slots, zeroed)) for b in (host, device)]
        for a, b in zip(*gathered, strict=True):
            assert a.shape == (LAYERS, len(slots), HIDDEN)
            np.testing.assert_array_equal(a, b)
            assert not a[:, zeroed, :].any()
        updates = [rng.standard_normal((LAYERS, len(slots), HIDDEN)).astype(np.float32)] * 2
        host.scatter(slots, updates)
        device.scatter(slots, [_on_device(device, u) for u in updates])
        everything = list(range(capacity))
        for a, b in zip(host.read(everything), device.read(everything), strict=True):
            np.testing.assert_array_equal(a, b)
    assert host.capacity == device.capacity == 16
    assert host.nbytes == device.nbytes == 2 * LAYERS * 16 * HIDDEN * 4


def _on_device(bank: DeviceStateBank, array: np.ndarray) -> Any:
    value = bank.graphs.zeros(*array.shape)
    bank.graphs.write_rows(value, np.arange(array.shape[1]), array)
    return value


def test_device_scatter_writes_in_place() -> None:
    """A scatter must not copy the bank (O(sessions) per batch): the array stays the same buffer."""
    _, device = banks(capacity=1024)
    before = [a.data_ptr() for a in device.arrays]
    device.scatter(np.array([3, 700]), device.gather(np.array([5, 6])))
    assert [a.data_ptr() for a in device.arrays] == before


def test_restarting_rows_start_from_zero_even_after_nonfinite_states() -> None:
    """Zeroing a START's row selects zeros (Where), it does not multiply: NaN * 0 is NaN."""
    host, device = banks()
    nan = [np.full((LAYERS, HIDDEN), np.nan, np.float32)] * 2
    for bank in (host, device):
        bank.write(1, nan)
        gathered = host_copy(bank, bank.gather(np.array([1, 1]), zeroed=[0]))
        assert not gathered[0][:, 0, :].any() and np.isnan(gathered[0][:, 1, :]).all()


def test_store_on_the_device_keeps_initial_states_across_growth() -> None:
    store = SessionStore(
        state_count=2, layers=LAYERS, hidden=HIDDEN, max_sessions=200, residency="device"
    )
    rng = np.random.default_rng(0)
    sessions = []
    for _ in range(150):  # grows 64 -> 128 -> 200
        state = [rng.standard_normal((LAYERS, HIDDEN)).astype(np.float32) for _ in range(2)]
        sessions.append((store.create(initial_state=state), state))
    assert store.capacity == 200 and isinstance(store.bank, DeviceStateBank)
    for session, state in sessions:
        for got, want in zip(store.read_state(session), state, strict=True):
            np.testing.assert_array_equal(got, want)
    assert store.state_bytes == 2 * LAYERS * 200 * HIDDEN * 4


@pytest.mark.parametrize(
    ("rows", "buckets", "padded"),
    [(1, (), 1), (5, (), 5), (5, (1, 8, 32), 8), (8, (1, 8, 32), 8), (33, (1, 8, 32), 33),
     (1, (4,), 4), (3, (2, 4), 4)],
)  # fmt: skip
def test_bucket_for(rows: int, buckets: tuple[int, ...], padded: int) -> None:
    assert bucket_for(rows, buckets) == padded


def test_bucket_and_residency_settings() -> None:
    auto = Settings(max_batch_size=100)
    assert auto.resolved_batch_buckets(on_gpu=False) == ()
    assert auto.resolved_batch_buckets(on_gpu=True) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert auto.resolved_state_residency(on_gpu=True) == "device"
    assert auto.resolved_state_residency(on_gpu=False) == "host"
    explicit = Settings(batch_buckets=" 32, 8,1", state_residency="device")
    assert explicit.resolved_batch_buckets(on_gpu=False) == (1, 8, 32)
    assert explicit.resolved_state_residency(on_gpu=False) == "device"
    assert Settings(batch_buckets="none").resolved_batch_buckets(on_gpu=True) == ()
    for wrong in ("0,4", "a,b", ","):
        with pytest.raises(ValueError, match="batch_buckets"):
            Settings(batch_buckets=wrong)


@pytest.mark.parametrize("buckets", [(), (4, 16)])
def test_device_batches_with_padding_equal_host_batches_and_offline_runs(
    tiny_repository: Path, buckets: tuple[int, ...]
) -> None:
    """compute_batch over a real LSTM: mixed chunk lengths (segments that take and put rows),
    padded to buckets or not; the device path gives the host path's outputs and states, and each
    row's outputs are the offline run's."""
    model = "tiny_lstm"
    spec, runtime = open_model(tiny_repository / model / "1", Settings(intra_op_threads=1))
    reference = OfflineReference(tiny_repository, model)
    rng = np.random.default_rng(7)
    lengths = [3, 1, 5, 3, 2, 5, 1]
    inputs = [rng.standard_normal((n, 3)).astype(np.float32) for n in lengths]
    host, device = (
        SessionStore(
            state_count=2,
            layers=spec.num_layers,
            hidden=spec.hidden_size,
            max_sessions=16,
            residency=residency,
        )
        for residency in ("host", "device")
    )
    for store in (host, device):
        for _ in lengths:
            store.create()
    slots = np.arange(len(lengths))
    called_rows: list[int] = []

    def device_call(x: np.ndarray, states: list[Any]) -> tuple[np.ndarray, list[Any]]:
        called_rows.append(x.shape[0])
        return runtime.run_bound(x, states)

    outcomes = [
        compute_batch(call, model, inputs, store.gather(slots), store.bank.rows, buckets)
        for call, store in ((runtime.run, host), (device_call, device))
    ]
    for outcome in outcomes:
        assert outcome.error is None and all(outcome.finished)
        for x, y in zip(inputs, outcome.outputs, strict=True):
            np.testing.assert_allclose(y, reference(x), atol=1e-6)
    for a, b in zip(outcomes[0].states, host_copy(device.bank, outcomes[1].states), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # segments of 7, 5 and 2 rows (lengths >= 1, >= 2, >= 3 ...), padded to the buckets or not
    assert [rows for rows, _ in outcomes[1].calls] == [7, 5, 4, 2]
    assert called_rows == ([16, 16, 4, 4] if buckets else [7, 5, 4, 2])


def test_generated_state_graphs_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/generate_state_ops.py", "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_check_script_runs_on_the_cpu_provider() -> None:
    """scripts/gpu_check.py's own smoke test: exactness of both residencies on the CPU provider
    for the bundled LSTM and the synthetic hidden-512 one, and its table."""
    result = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--providers", "cpu", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for model in ("adding_lstm", "synthetic_lstm512"):
        for residency in ("host", "device"):
            assert f"cpu      {model:18} {residency:6} 16 sessions: max diff" in result.stdout
            assert f"| cpu | {model} | {residency} | 8 |" in result.stdout
    assert "FAILED" not in result.stdout


def test_gpu_providers_compute_float32_exactly_on_the_chosen_device() -> None:
    """CUDA must not round float32 products to TF32 (outputs ~1e-3 off the offline run)."""
    chosen = with_options([TENSORRT, CUDA, CPU], device_id=2)
    assert chosen == [
        (TENSORRT, {"device_id": "2"}),
        (CUDA, {"device_id": "2", "use_tf32": "0"}),
        CPU,
    ]
    assert Settings(gpu_device_id=1).gpu_device_id == 1
