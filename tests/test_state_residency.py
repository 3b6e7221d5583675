"""State banks (host numpy arrays vs device OrtValues), batch buckets and padding.

The device bank runs here over CPU OrtValues with the same companion graphs and IOBinding calls
as on a GPU, so its logic is proven on every machine; scripts/gpu_check.py repeats the checks on
a CUDA device.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from service.batch_compute import bucket_for, compute_batch
from service.batcher import Batcher
from service.chunks import PendingChunk, StepResult
from service.errors import InternalError
from service.metrics import Metrics
from service.model_check import open_model
from service.model_loading import state_residency
from service.runtime import (
    CPU,
    CUDA,
    TENSORRT,
    ModelRuntime,
    keep_float32_exact,
    tensorrt_profile,
    with_options,
)
from service.session import EndReason, Session
from service.session_store import SessionStore
from service.settings import Settings
from service.signature import default_signature
from service.state_bank import CPU_DEVICE, DeviceStateBank, HostStateBank, StateBank
from tests.models_for_tests import OfflineReference

if TYPE_CHECKING:
    from service.repository import ModelSpec

ROOT = Path(__file__).resolve().parent.parent
LAYERS, HIDDEN = 2, 5


def banks(capacity: int = 4, fill: float = 0.0) -> tuple[HostStateBank, DeviceStateBank]:
    fills = [np.full((LAYERS, HIDDEN), fill, np.float32)] * 2
    return (
        HostStateBank(fills=fills, capacity=capacity),
        DeviceStateBank(fills=fills, capacity=capacity, device=CPU_DEVICE),
    )


def host_copy(bank: StateBank, states: list[Any]) -> list[np.ndarray]:
    return [s if isinstance(s, np.ndarray) else s.numpy() for s in states]


def test_host_and_device_banks_agree_through_every_operation() -> None:
    """A seeded run of writes, gathers (with restarting rows), scatters and growth: both banks
    hold the same bits after every step, and growing keeps every slot."""
    rng = np.random.default_rng(3)
    host, device = banks(fill=0.5)  # sessions start from 0.5 (a declared initial state)
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
        restarted = [int(r) for r in np.flatnonzero(rng.random(len(slots)) < 0.3)]
        gathered = [host_copy(b, b.gather(slots, restarted)) for b in (host, device)]
        for a, b in zip(*gathered, strict=True):
            assert a.shape == (LAYERS, len(slots), HIDDEN)
            np.testing.assert_array_equal(a, b)
            assert (a[:, restarted, :] == 0.5).all()
        updates = [rng.standard_normal((LAYERS, len(slots), HIDDEN)).astype(np.float32)] * 2
        host.scatter(slots, updates)
        device.scatter(slots, [_on_device(device, u) for u in updates])
        everything = list(range(capacity))
        for a, b in zip(host.read(everything), device.read(everything), strict=True):
            np.testing.assert_array_equal(a, b)
    assert host.capacity == device.capacity == 16
    assert host.nbytes == device.nbytes == 2 * LAYERS * 16 * HIDDEN * 4


def _on_device(bank: DeviceStateBank, array: np.ndarray) -> Any:
    return bank.graphs.on_device(array)


def test_device_scatter_writes_in_place() -> None:
    """A scatter must not copy the bank (O(sessions) per batch): the array stays the same buffer."""
    _, device = banks(capacity=1024)
    before = [a.data_ptr() for a in device.arrays]
    device.scatter(np.array([3, 700]), device.gather(np.array([5, 6])))
    assert [a.data_ptr() for a in device.arrays] == before


def test_restarting_rows_start_from_the_initial_state_even_after_nonfinite_states() -> None:
    """A START's row selects the initial state (Where), it does not multiply: NaN * 0 is NaN."""
    host, device = banks(fill=0.25)
    nan = [np.full((LAYERS, HIDDEN), np.nan, np.float32)] * 2
    for bank in (host, device):
        bank.write(1, nan)
        gathered = host_copy(bank, bank.gather(np.array([1, 1]), restarted=[0]))
        assert (gathered[0][:, 0, :] == 0.25).all() and np.isnan(gathered[0][:, 1, :]).all()


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
    for wrong in ("0,4", "a,b", ",", "1,999"):  # 999 > max_batch_size
        with pytest.raises(ValueError, match="batch_buckets"):
            Settings(batch_buckets=wrong)
    assert Settings(batch_buckets=" ").batch_buckets == "auto"


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


async def test_a_state_write_failing_part_way_ends_its_sessions_never_continues_them(
    tiny_repository: Path,
) -> None:
    """On a device the state tensors are written one after another: if the second write fails
    (a device error), a session would hold new h with old c. Its chunk is answered INTERNAL, the
    session ends (reason failed) instead of going on from that state; other sessions are fine."""
    spec, runtime = open_model(tiny_repository / "tiny_lstm" / "1", Settings(intra_op_threads=1))
    store = SessionStore(states=spec.tensors.states, max_sessions=8, residency="device")
    ended: list[tuple[str, EndReason]] = []
    store.on_end = lambda session, reason: ended.append((session.session_id, reason))
    batcher, _, metrics = make_batcher(spec, runtime, store)
    a, b = store.create("a"), store.create("b")
    x = np.ones((2, spec.input_size), np.float32)
    first = await submit_chunk(batcher, a, x)
    assert first.steps == 2
    graphs = store.bank.graphs  # type: ignore[attr-defined]
    writes = 0
    real_write = graphs.write_rows

    def second_write_fails(*args: Any) -> None:
        nonlocal writes
        writes += 1
        if writes == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        real_write(*args)

    graphs.write_rows = second_write_fails
    with pytest.raises(InternalError, match="could not store the new state of session 'a'"):
        await submit_chunk(batcher, a, x)
    graphs.write_rows = real_write
    assert ended == [("a", EndReason.FAILED)] and store.find("a") is None
    assert (await submit_chunk(batcher, b, x)).steps == 2  # another session goes on
    labels = {"model": spec.name, "version": spec.version}
    assert metrics.registry.get_sample_value("rnnserve_batch_failures_total", labels) == 1
    await batcher.close()


def make_batcher(
    spec: ModelSpec, runtime: ModelRuntime, store: SessionStore
) -> tuple[Batcher, SessionStore, Metrics]:
    metrics = Metrics()
    batcher = Batcher(spec=spec, runtime=runtime, store=store, metrics=metrics, max_batch_size=8,
                      max_queue_delay_s=0.0, max_queue_chunks=100,
                      max_waiting_per_session=4)  # fmt: skip
    return batcher, store, metrics


def submit_chunk(batcher: Batcher, session: Session, x: np.ndarray) -> asyncio.Future[StepResult]:
    """Hand one chunk to the batcher as the engine does; the future of its result."""
    future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
    latency = Metrics().request_latency.labels("m", "1", "test")
    batcher.submit(PendingChunk(session, x, future, time.perf_counter(), latency, None))
    return future


def test_gpu_math_stays_float32_unless_the_operator_says_otherwise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """cuDNN's RNN kernels and TensorRT use TF32 unless NVIDIA_TF32_OVERRIDE=0 is set before CUDA
    starts: the runtime sets it for the GPU providers, and keeps (and warns about) a user's own."""
    environ: dict[str, str] = {}
    keep_float32_exact(environ)
    assert environ == {"NVIDIA_TF32_OVERRIDE": "0"}
    mine = {"NVIDIA_TF32_OVERRIDE": "1"}
    keep_float32_exact(mine)
    assert mine == {"NVIDIA_TF32_OVERRIDE": "1"} and "may use TF32" in caplog.text


def test_tensorrt_gets_one_profile_spanning_every_batch_and_chunk_length() -> None:
    signature = default_signature("lstm", layers=2, hidden=8, inputs=3, outputs=1)
    profile = tensorrt_profile(signature, max_rows=64, max_steps=100)
    assert profile == {
        "trt_profile_min_shapes": "x:1x1x3,h0:2x1x8,c0:2x1x8",
        "trt_profile_opt_shapes": "x:64x1x3,h0:2x64x8,c0:2x64x8",
        "trt_profile_max_shapes": "x:64x100x3,h0:2x64x8,c0:2x64x8",
    }
    chosen = with_options([TENSORRT, CUDA, CPU], 0, profile)
    assert chosen[0] == (TENSORRT, {"device_id": "0", **profile})


def test_a_runtime_overriding_only_run_keeps_its_state_on_the_host(tiny_repository: Path) -> None:
    """Its device path would bypass the override (the zero-model server overrides both)."""

    class Doubling(ModelRuntime):
        def run(self, x: Any, states: Any, single_thread: bool = False) -> Any:
            y, new = super().run(x, states, single_thread)
            return 2 * y, new

    settings = Settings(state_residency="device", intra_op_threads=1)
    spec, runtime = open_model(tiny_repository / "tiny_gru" / "1", settings, Doubling)
    assert not runtime.runs_device_state
    assert state_residency(settings, runtime, spec) == "host"
    _, plain = open_model(tiny_repository / "tiny_gru" / "1", settings)
    assert plain.runs_device_state and state_residency(settings, plain, spec) == "device"
