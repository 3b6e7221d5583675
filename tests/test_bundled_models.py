"""The committed models: each is in the repository, loads under the service's contract checks, and
still meets its task's criterion on a fresh held-out set (judged through onnxruntime)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.repository import check_contract, read_spec
from service.runtime import ModelRuntime
from training.pipeline import check_bundled_model
from training.recipes import EXPERIMENTS

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = sorted(e.bundle_as for e in EXPERIMENTS if e.bundle_as)
FRESH_SEED = 31_337


def test_the_repository_holds_exactly_the_bundled_models() -> None:
    present = sorted(p.parent.parent.name for p in (ROOT / "models").glob("*/*/model.onnx"))
    assert present == BUNDLED


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_meets_its_criterion_on_fresh_data(name: str) -> None:
    version_dir = ROOT / "models" / name / "1"
    spec = read_spec(version_dir)
    check_contract(spec, ModelRuntime(spec.onnx_path))
    evaluation, metadata = check_bundled_model(version_dir, FRESH_SEED)
    assert metadata["metrics"]["solved"], f"{name} was exported unsolved"
    assert evaluation.solved, f"{name}: {evaluation.as_dict()}"
    recorded = metadata["metrics"]["test"]
    # Fresh data, same distribution: the error stays of the recorded order.
    assert evaluation.mse <= 3 * recorded["mse"] + 1e-4, (evaluation.mse, recorded["mse"])
    assert metadata["verification"]["streaming_max_abs_diff"] <= 1e-5
