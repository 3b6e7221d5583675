"""Gate-bias initialisation, the pinned forget gate, ONNX export parity and metadata, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from training.export import ExportVerificationError, export_model, verify_onnx
from training.models import KEEP_BIAS, ModelConfig, RecurrentNet
from training.tasks import make_task
from training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent


def config(cell: str, **kw: object) -> ModelConfig:
    return ModelConfig(cell=cell, input_size=2, output_size=1, hidden_size=6, **kw)


def test_keep_init_biases_lstm_forget_and_gru_update_gates() -> None:
    lstm = RecurrentNet(config("lstm")).rnn
    assert (lstm.bias_ih_l0[6:12] == KEEP_BIAS).all() and (lstm.bias_hh_l0[6:12] == 0).all()
    gru = RecurrentNet(config("gru")).rnn
    assert (gru.bias_ih_l0[6:12] == KEEP_BIAS).all() and (gru.bias_hh_l0[6:12] == 0).all()
    default = RecurrentNet(config("lstm", init="default")).rnn
    assert default.bias_ih_l0[6:12].abs().max() < 1.0


def test_gru_keep_init_keeps_the_state() -> None:
    torch.manual_seed(0)
    model = RecurrentNet(config("gru"))
    h0 = torch.randn(1, 4, 6)
    _, (h1,) = model(torch.randn(4, 1, 2), (h0,))
    assert torch.allclose(h1, h0, atol=0.05)  # z ~ sigmoid(5): the state barely moves


def test_lstm_without_forget_gate_stays_pinned_through_training() -> None:
    torch.manual_seed(0)
    model = RecurrentNet(config("lstm", forget_gate=False))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(5):
        y, _ = model(torch.randn(3, 7, 2))
        optimizer.zero_grad()
        y.pow(2).sum().backward()
        optimizer.step()
    rnn = model.rnn
    assert (rnn.weight_ih_l0[6:12] == 0).all() and (rnn.weight_hh_l0[6:12] == 0).all()
    assert torch.sigmoid(rnn.bias_ih_l0[6:12] + rnn.bias_hh_l0[6:12]).eq(1.0).all()
    # With f == 1 the cell state only accumulates: c_t - c_{t-1} = i * g.
    x = torch.randn(1, 5, 2)
    state = model.zero_state(1)
    cells = []
    for t in range(5):
        _, state = model(x[:, t : t + 1], state)
        cells.append(state[1])
    with pytest.raises(ValueError, match="LSTM only"):
        RecurrentNet(config("gru", forget_gate=False))


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_export_follows_the_contract_and_verifies(cell: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = RecurrentNet(
        ModelConfig(cell=cell, input_size=3, output_size=2, hidden_size=5, num_layers=2)
    )
    meta = export_model(
        model, tmp_path / "m" / "3", name="m", task="adding", output_kind="regression",
        task_config={"length": 100}, metrics={"mse": 0.1}, training={"steps": 1},
    )  # fmt: skip
    graph = onnx.load(str(tmp_path / "m" / "3" / "model.onnx")).graph
    states = ["h", "c"] if cell == "lstm" else ["h"]
    assert [i.name for i in graph.input] == ["x", *[f"{s}0" for s in states]]
    assert [o.name for o in graph.output] == ["y", *[f"{s}n" for s in states]]
    assert {"RNN": "rnn", "LSTM": "lstm", "GRU": "gru"}[
        next(n.op_type for n in graph.node if n.op_type in ("RNN", "LSTM", "GRU"))
    ] == cell
    x_dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert x_dims[:2] == ["batch", "time"] and x_dims[2] == 3
    written = json.loads((tmp_path / "m" / "3" / "model.json").read_text())
    assert written == meta
    for key in ("cell", "num_layers", "hidden_size", "input_size", "output_size", "task", "output_kind",
                "metrics", "training", "torch_version", "onnx_version", "sha256", "opset"):  # fmt: skip
        assert key in written, key
    assert written["version"] == "3" and written["opset"] >= 17
    assert written["verification"]["streaming_max_abs_diff"] <= 1e-5


def test_verification_catches_a_graph_that_differs(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = RecurrentNet(config("gru"))
    export_model(
        model,
        tmp_path / "g" / "1",
        name="g",
        task="t",
        output_kind="regression",
        task_config={},
        metrics={},
        training={},
    )
    with torch.no_grad():
        model.head.bias += 0.01  # the PyTorch model moves on; the exported graph does not
    with pytest.raises(ExportVerificationError, match="differs from PyTorch"):
        verify_onnx(model, tmp_path / "g" / "1" / "model.onnx")


def test_training_loop_runs_and_records(tmp_path: Path) -> None:
    task = make_task("adding", length=20, test_sequences=64)
    model_config = ModelConfig(cell="lstm", input_size=2, output_size=1, hidden_size=4)
    _, result = train(
        task,
        model_config,
        TrainConfig(batch_size=8, max_steps=6, eval_every=3),
        tmp_path,
        progress=False,
    )
    assert result.steps == 6 and result.sequences_seen == 48 and len(result.curve) == 2
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["test"]["total"] == 64 and (tmp_path / "checkpoint.pt").exists()


def test_stream_task_training_carries_state(tmp_path: Path) -> None:
    task = make_task("timer", scale=10, chunk_length=20, test_lanes=2, test_steps=200)
    model_config = ModelConfig(cell="gru", input_size=2, output_size=1, hidden_size=4)
    _, result = train(
        task,
        model_config,
        TrainConfig(batch_size=4, max_steps=4, eval_every=2, early_stop=False),
        None,
        progress=False,
    )
    assert result.steps == 4 and result.test["total"] > 0


def test_cli_help_and_a_tiny_training_run(tmp_path: Path) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "training", "train", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        help_text.returncode == 0
        and "--no-forget-gate" in help_text.stdout
        and "wall-time budget" in help_text.stdout
    )
    run = subprocess.run(
        [sys.executable, "-m", "training", "train", "--task", "temporal_order", "--cell", "gru", "--hidden-size", "4",
         "--max-steps", "2", "--eval-every", "1", "--batch-size", "4", "--out", str(tmp_path / "run"),
         "--export-as", "tiny", "--repository", str(tmp_path / "models")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    meta = json.loads((tmp_path / "models" / "tiny" / "1" / "model.json").read_text())
    assert meta["task"] == "temporal_order" and meta["output_kind"] == "class_logits"
    assert np.isfinite(meta["verification"]["full_sequence_max_abs_diff"])
