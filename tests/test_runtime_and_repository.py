"""Execution-provider choice (tested on CPU) and the model contract checks at load."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from service.errors import ModelContractError
from service.repository import check_contract, discover, read_spec
from service.runtime import (
    CPU,
    CUDA,
    TENSORRT,
    ModelRuntime,
    ProviderUnavailable,
    resolve_providers,
)


def test_cpu_is_the_default_chain() -> None:
    assert resolve_providers("cpu", [CPU], fallback=False) == [CPU]


def test_gpu_providers_are_used_when_present() -> None:
    assert resolve_providers("cuda", [TENSORRT, CUDA, CPU], fallback=False) == [CUDA, CPU]
    assert resolve_providers("tensorrt", [TENSORRT, CUDA, CPU], fallback=False) == [
        TENSORRT,
        CUDA,
        CPU,
    ]


def test_missing_gpu_provider_fails_clearly_without_fallback() -> None:
    with pytest.raises(ProviderUnavailable, match=r"CUDAExecutionProvider.*onnxruntime-gpu"):
        resolve_providers("cuda", [CPU], fallback=False)


def test_missing_gpu_provider_falls_back_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert resolve_providers("tensorrt", [CPU], fallback=True) == [CPU]
    assert "falling back to CPUExecutionProvider" in caplog.text


def test_runtime_on_this_machine_refuses_cuda_or_falls_back(tiny_repository: Path) -> None:
    path = tiny_repository / "tiny_gru" / "1" / "model.onnx"
    import onnxruntime as ort

    if CUDA in ort.get_available_providers():
        pytest.fail(
            "this test expects a CPU-only onnxruntime; the GPU path is covered by resolve_providers"
        )
    with pytest.raises(ProviderUnavailable):
        ModelRuntime(path, provider="cuda")
    assert ModelRuntime(path, provider="cuda", fallback=True).providers == [CPU]


def copy_model(tiny_repository: Path, tmp_path: Path, name: str = "tiny_lstm") -> Path:
    target = tmp_path / name / "1"
    shutil.copytree(tiny_repository / name / "1", target)
    return target


def test_bundled_contract_is_accepted(tiny_repository: Path) -> None:
    for directory in discover(tiny_repository):
        spec = read_spec(directory)
        check_contract(spec, ModelRuntime(spec.onnx_path))


def test_missing_metadata_is_named(tiny_repository: Path, tmp_path: Path) -> None:
    target = copy_model(tiny_repository, tmp_path)
    (target / "model.json").unlink()
    with pytest.raises(ModelContractError, match=r"tiny_lstm/1: missing model\.json"):
        read_spec(target)


def test_changed_file_is_caught_by_its_hash(tiny_repository: Path, tmp_path: Path) -> None:
    target = copy_model(tiny_repository, tmp_path)
    with (target / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelContractError, match="sha256"):
        read_spec(target)


def test_metadata_that_disagrees_with_the_graph(tiny_repository: Path, tmp_path: Path) -> None:
    target = copy_model(tiny_repository, tmp_path)
    meta = json.loads((target / "model.json").read_text())
    meta["hidden_size"] = 99
    (target / "model.json").write_text(json.dumps(meta))
    spec = read_spec(target)
    with pytest.raises(
        ModelContractError,
        match=r"tiny_lstm/1 breaks the ONNX contract: .*h0 axis 2 is 8, expected 99",
    ):
        check_contract(spec, ModelRuntime(spec.onnx_path))


def test_renamed_state_input_is_caught(tiny_repository: Path, tmp_path: Path) -> None:
    target = copy_model(tiny_repository, tmp_path)
    model = onnx.load(str(target / "model.onnx"))
    for node in model.graph.node:
        node.input[:] = ["state" if i == "c0" else i for i in node.input]
    model.graph.input[2].name = "state"
    onnx.save(model, str(target / "model.onnx"))
    meta = json.loads((target / "model.json").read_text())
    meta.pop("sha256")
    (target / "model.json").write_text(json.dumps(meta))
    spec = read_spec(target)
    with pytest.raises(
        ModelContractError,
        match=r"inputs are \['h0', 'state', 'x'\], expected \['x', 'h0', 'c0'\]",
    ):
        check_contract(spec, ModelRuntime(spec.onnx_path))


def test_empty_or_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(ModelContractError, match="does not exist"):
        discover(tmp_path / "nope")
    assert discover(tmp_path) == []


def test_measured_call_cost_is_positive_and_grows_with_the_batch(tiny_repository: Path) -> None:
    spec = read_spec(discover(tiny_repository)[0])
    runtime = ModelRuntime(spec.onnx_path, intra_op_threads=1)
    runtime.bind(spec.tensors)
    cost = runtime.measure_cost(spec.tensors, max_rows=64)
    assert cost.fixed_s > 0 and cost.per_row_s >= 0
    assert cost.estimate_s(64, 1) >= cost.estimate_s(1, 1) > 0
    assert cost.estimate_s(1, 4) == pytest.approx(4 * cost.estimate_s(1, 1))


def test_the_single_thread_twin_computes_the_same_outputs(tiny_repository: Path) -> None:
    spec = read_spec(discover(tiny_repository)[0])
    runtime = ModelRuntime(spec.onnx_path, intra_op_threads=2, single_thread_twin=True)
    assert runtime.single_thread_session is not runtime.session
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, spec.input_size)).astype(np.float32)
    states = [
        rng.standard_normal((spec.num_layers, 3, spec.hidden_size)).astype(np.float32)
        for _ in spec.state_inputs
    ]
    pooled, one_thread = runtime.run(x, states), runtime.run(x, states, single_thread=True)
    np.testing.assert_allclose(pooled[0], one_thread[0], rtol=1e-6, atol=1e-7)
    for a, b in zip(pooled[1], one_thread[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    already_single = ModelRuntime(spec.onnx_path, intra_op_threads=1, single_thread_twin=True)
    assert already_single.single_thread_session is already_single.session  # no second copy
