"""A user's own nn.LSTM / nn.GRU / nn.RNN and head, exported by ``export_recurrent`` and by
``python -m training export-module``: the server's load checks pass, the model streams through the
server exactly as torch runs it (an LSTM with proj_size too), and what the contract cannot serve is
refused in one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.model_check import open_model
from service.repository import REQUIRED_METADATA, read_spec
from service.settings import Settings
from service.signature import describe
from tests.grpc_helpers import channel, native, output_of, serving, step_request
from tests.user_models import CharLM, FrameClassifier, frame_classifier, gru_regressor
from training.__main__ import main as training_main
from training.export import (
    CHUNK_STEPS,
    MODULE_SOURCE,
    TOLERANCE,
    USER_SOURCE,
    ExportVerificationError,
    UnsupportedModuleError,
)
from training.export_any import export_module, features, state
from training.export_command import FACTORY_FORMS
from training.export_module import ProjectedLSTM, export_recurrent, quiet_projections

ROOT = Path(__file__).resolve().parent.parent
Modules = tuple[nn.Module, nn.Module | None]


def plain_rnn() -> Modules:
    """A 2-layer tanh RNN, time-major (PyTorch's default), no head."""
    return nn.RNN(input_size=3, hidden_size=6, num_layers=2), None


def projected_lstm() -> Modules:
    """A 2-layer LSTM with proj_size (h of 4, c of 12), time-major, and a linear head."""
    return nn.LSTM(input_size=5, hidden_size=12, num_layers=2, proj_size=4), nn.Linear(4, 3)


# (a) 2-layer LSTM, batch-first, linear head; (b) time-major GRU, nn.Sequential head; (c) RNN alone;
# (d) 2-layer LSTM with proj_size, time-major, linear head.
FACTORIES: dict[str, tuple[Callable[[], Modules], str]] = {
    "frames": (frame_classifier, "lstm"),
    "sensors": (gru_regressor, "gru"),
    "plain": (plain_rnn, "rnn"),
    "projected": (projected_lstm, "lstm"),
}
CHUNKS = [1, 3, 7, 2, 5, 1, 4]  # 23 steps in mixed chunk lengths


def build(factory: Callable[[], Modules], seed: int) -> Modules:
    """The factory's modules with weights drawn from ``seed``, the global generator left alone."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory()


@pytest.fixture(scope="module")
def user_repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Modules]]:
    root = tmp_path_factory.mktemp("user_models")
    modules = {}
    for seed, (name, (factory, _)) in enumerate(FACTORIES.items()):
        rnn, head = modules[name] = build(factory, seed)
        export_recurrent(rnn, head, repository=root, name=name, metadata={"task": "custom"})
    return root, modules


def torch_outputs(rnn: nn.Module, head: nn.Module | None, x: np.ndarray) -> np.ndarray:
    """The user's modules over the whole sequence from zero state, in their own layout."""
    batch_first = bool(rnn.batch_first)
    with torch.no_grad(), quiet_projections():
        inputs = torch.from_numpy(x)[None] if batch_first else torch.from_numpy(x)[:, None]
        out, _ = rnn(inputs)
        y = out if head is None else head(out)
    return (y[0] if batch_first else y[:, 0]).numpy()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_export_passes_the_server_check_and_records_itself(
    name: str,
    user_repository: tuple[Path, dict[str, Modules]],
    make_settings: Callable[..., Settings],
) -> None:
    root, _ = user_repository
    spec, _ = open_model(root / name / "1", make_settings(model_repository=root))
    meta = json.loads((root / name / "1" / "model.json").read_text())
    assert spec.cell == FACTORIES[name][1] and meta["sha256"] == spec.sha256
    for key in (*REQUIRED_METADATA, "inputs", "outputs", "torch_version", "onnx_version", "opset"):
        assert key in meta, key
    assert meta["source"]["exported_from"] == USER_SOURCE and meta["task"] == "custom"
    verification = meta["verification"]
    assert list(verification["chunkings"]) == [str(n) for n in CHUNK_STEPS]
    assert max(verification["chunkings"].values()) <= TOLERANCE
    assert verification["full_sequence_max_abs_diff"] <= TOLERANCE
    assert meta["torch_version"] == torch.__version__
    assert "signature" not in meta or name == "projected"  # the default convention describes it


def test_a_projected_lstm_declares_its_state_shapes(
    user_repository: tuple[Path, dict[str, Modules]],
) -> None:
    """h of [layers, proj_size] and c of [layers, hidden_size], in model.json's signature exactly
    as the server reads it; and `rnnserve check` passes on it."""
    root, _ = user_repository
    directory = root / "projected" / "1"
    meta = json.loads((directory / "model.json").read_text())
    assert (meta["hidden_size"], meta["proj_size"], meta["num_layers"]) == (12, 4, 2)
    assert (meta["input_size"], meta["output_size"]) == (5, 3)
    tensors = read_spec(directory).tensors
    assert describe(tensors) == meta["signature"]
    assert [(s.input, s.output, s.shape, s.batch_axis) for s in tensors.states] == [
        ("h0", "hn", (2, 4), 1),
        ("c0", "cn", (2, 12), 1),
    ]
    assert (tensors.input.name, tensors.input.shape) == ("x", (5,))
    assert (tensors.output.name, tensors.output.shape) == ("y", (3,))
    check = subprocess.run(
        [sys.executable, "-m", "service.cli", "check", str(directory)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "1 of 1 model(s) pass" in check.stdout


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_the_projected_lstm_equivalent_equals_torchs(batch_first: bool, bias: bool) -> None:
    """The fused-LSTM form torch can export computes what nn.LSTM(proj_size=...) does, from any
    state, in either layout, with or without biases."""
    torch.manual_seed(4)
    lstm = nn.LSTM(3, 10, num_layers=3, proj_size=6, bias=bias, batch_first=batch_first).eval()
    x = torch.randn((2, 9, 3) if batch_first else (9, 2, 3))
    state = (torch.randn(3, 2, 6), torch.randn(3, 2, 10))
    with torch.no_grad(), quiet_projections():
        want_y, (want_h, want_c) = lstm(x, state)
        got_y, (got_h, got_c) = ProjectedLSTM(lstm)(x, state)
    for got, want in ((got_y, want_y), (got_h, want_h), (got_c, want_c)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("residency", ["host", "device"])
@pytest.mark.parametrize("name", list(FACTORIES))
async def test_served_in_mixed_chunks_equals_torch(
    name: str,
    residency: str,
    user_repository: tuple[Path, dict[str, Modules]],
    make_settings: Callable[..., Settings],
) -> None:
    root, modules = user_repository
    rnn, head = modules[name]
    x = np.random.default_rng(5).standard_normal((sum(CHUNKS), rnn.input_size)).astype(np.float32)
    outputs, start = [], 0
    async with (
        serving(make_settings(model_repository=root, state_residency=residency)) as server,
        channel(server.grpc_port) as ch,
    ):
        stub = native(ch)
        session = await stub.CreateSession(pb.CreateSessionRequest(model=name))
        for steps in CHUNKS:
            chunk = x[start : start + steps]
            outputs.append(
                output_of(await stub.Step(step_request(name, session.session_id, chunk)))
            )
            start += steps
    expected = torch_outputs(rnn, head, x)
    np.testing.assert_allclose(np.concatenate(outputs), expected, atol=1e-5, rtol=0)


class Pool(nn.Module):
    def forward(self, out: torch.Tensor) -> torch.Tensor:
        return out.mean(dim=1)


class Swap(nn.Module):
    def forward(self, out: torch.Tensor) -> torch.Tensor:
        return out.transpose(0, 1)


class ClassIds(nn.Module):
    def forward(self, out: torch.Tensor) -> torch.Tensor:
        return out.argmax(dim=-1, keepdim=True)


class RunningSum(nn.Module):
    """Keeps the axes but mixes time steps: only the chunked verification can tell."""

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        return out.cumsum(dim=1)


class FixedSizes(nn.Module):
    """Bakes the tracing example's sizes into the graph."""

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        return out.reshape(int(out.shape[0]), int(out.shape[1]), -1)


REFUSED: dict[str, tuple[Callable[[], Modules], str]] = {
    "bidirectional": (
        lambda: (nn.GRU(3, 4, batch_first=True, bidirectional=True), None),
        "bidirectional rnn cannot stream",
    ),
    "pooling head": (
        lambda: (nn.LSTM(3, 4, batch_first=True), Pool()),
        r"into \[2, 4\], but the contract needs the batch and time axes unchanged",
    ),
    "axis-swapping head": (
        lambda: (nn.GRU(3, 4), Swap()),
        r"\[5, 2, 4\] \[time, batch, hidden\] into \[2, 5, 4\]",
    ),
    "float64 weights": (lambda: (nn.GRU(3, 4).double(), None), "float64 weights .* .float()"),
    "class-id head": (lambda: (nn.RNN(3, 4), ClassIds()), "returns int64 .* float32"),
    "embedding inside the rnn": (
        lambda: (nn.Sequential(nn.Embedding(10, 3), nn.LSTM(3, 4)), None),
        r"token ids \(int64\) passes its embedding as embedding",
    ),
    "not a recurrent layer": (lambda: (nn.Linear(3, 4), None), "nn.LSTM, nn.GRU or nn.RNN"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_the_contract_cannot_serve_is_refused_in_one_line(case: str, tmp_path: Path) -> None:
    factory, message = REFUSED[case]
    rnn, head = build(factory, 0)
    with pytest.raises(UnsupportedModuleError, match=message) as info:
        export_recurrent(rnn, head, repository=tmp_path, name="m")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m").exists()


BAD_EMBEDDINGS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "vectors of another size": (
        lambda: nn.Embedding(10, 5),
        "vectors of 5 but the rnn takes input_size=3",
    ),
    "not an embedding": (lambda: nn.Linear(10, 3), "embedding must be an nn.Embedding"),
    "max_norm": (lambda: nn.Embedding(10, 3, max_norm=1.0), "max_norm=None"),
    "float64 weights": (lambda: nn.Embedding(10, 3).double(), "embedding has float64 weights"),
}


@pytest.mark.parametrize("case", list(BAD_EMBEDDINGS))
def test_an_embedding_the_graph_cannot_take_is_refused_in_one_line(
    case: str, tmp_path: Path
) -> None:
    factory, message = BAD_EMBEDDINGS[case]
    with pytest.raises(UnsupportedModuleError, match=message) as info:
        export_recurrent(nn.GRU(3, 4), embedding=factory(), repository=tmp_path, name="m")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m").exists()


def test_token_ids_through_an_embedding_with_a_padding_id(tmp_path: Path) -> None:
    """The graph takes int64 ids [batch, time] (time-major layer: transposed inside), model.json
    declares them with their range, and onnxruntime equals torch on ids including the padding id."""
    embedding, rnn, head = build(lambda: (nn.Embedding(12, 3, padding_idx=0), nn.GRU(3, 5),
                                          nn.Linear(5, 12)), 2)  # fmt: skip
    meta = export_recurrent(rnn, head, embedding=embedding, repository=tmp_path, name="ids")
    assert meta["signature"]["inputs"] == [
        {"name": "x", "dtype": "int64", "shape": [], "layout": "BT", "range": [0, 12]}
    ]
    assert meta["embedding"] == {"num_embeddings": 12, "embedding_dim": 3, "padding_idx": 0}
    assert describe(read_spec(tmp_path / "ids" / "1").tensors) == meta["signature"]
    ids = np.array([[0, 3, 11, 0, 7], [5, 0, 0, 1, 2]], np.int64)
    session = ort.InferenceSession(str(tmp_path / "ids" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    (y,) = session.run(["y"], {"x": ids, "h0": np.zeros((1, 2, 5), np.float32)})
    with torch.no_grad():
        want = head(rnn(embedding(torch.from_numpy(ids).T))[0]).transpose(0, 1)
    np.testing.assert_allclose(y, want.numpy(), atol=1e-5, rtol=0)


# ----- any module: export_module ----------------------------------------------------------------
class StateFirst(nn.Module):
    """A GRU cell's state kept as [batch, hidden] (batch_axis 0): forward(x, state) -> (y, state)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, hn = self.rnn(x, h.unsqueeze(0))
        return self.head(out), hn.squeeze(0)


def test_any_module_exports_with_its_own_state_shape_and_initial_value(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    module = build(StateFirst, 3)
    meta = export_module(
        module, inputs=[("x", 3)], outputs=[features("y", 2)],
        states=[state("h", "h_next", [4], batch_axis=0, initial=0.5)],
        repository=tmp_path, name="first", metadata={"task": "custom"},
    )  # fmt: skip
    assert meta["signature"]["states"] == [
        {"input": "h", "output": "h_next", "shape": [4], "batch_axis": 0, "initial": 0.5}
    ]
    assert meta["inputs"] == ["x", "h"] and meta["outputs"] == ["y", "h_next"]
    assert meta["source"]["exported_from"] == MODULE_SOURCE and meta["task"] == "custom"
    assert max(meta["verification"]["chunkings"].values()) <= TOLERANCE
    spec, _ = open_model(tmp_path / "first" / "1", make_settings(model_repository=tmp_path))
    assert describe(spec.tensors) == meta["signature"]


class Returns(nn.Module):
    """forward(x, h0, c0) of an LSTM, returning what ``give`` makes of (y, h, c)."""

    def __init__(self, give: Callable[..., object]) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.give = give

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> object:
        y, (h, c) = self.rnn(x, (h0, c0))
        return self.give(y, h, c)


def steps_in_python(y: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A Python loop over the time steps: the trace unrolls it at 5 steps."""
    return torch.stack([y[:, t] * 2 for t in range(y.shape[1])], dim=1), h, c


LSTM_STATES = [("h0", "hn", (1, 4)), ("c0", "cn", (1, 4))]
MODULE_REFUSED: dict[str, tuple[Callable[..., object], dict[str, Any], str]] = {
    "too few values": (lambda y, h, c: (y, h), {}, r"returns 2 value\(s\) but 3 are declared"),
    "no feature axis": (lambda y, h, c: (y.sum(-1), h, c), {}, r"shape \[2, 5\] .*unsqueeze"),
    "class ids": (lambda y, h, c: (y.argmax(-1, keepdim=True), h, c), {}, "y is int64"),
    "state of another shape": (lambda y, h, c: (y, h[:, :, :2], c), {}, r"new state hn is float32 \[1, 2, 2\]"),
    "size as declared": (lambda y, h, c: (y, h, c), {"outputs": [features("y", 3)]}, "declared with 3 .* returns 4"),
    "a name twice": (lambda y, h, c: (y, h, c), {"outputs": ["hn"]}, r"names \['hn'\] more than once"),
    "forward's arguments": (lambda y, h, c: (y, h, c), {"states": LSTM_STATES[:1]}, r"fails on inputs and states x \[2, 5, 3\], h0"),
    "unknown spec": (lambda y, h, c: (y, h, c), {"inputs": [42]}, r"inputs\[0\] must be features"),
    "time-major declared": (lambda y, h, c: (y, h, c),
                            {"inputs": [{"name": "x", "shape": [3], "layout": "TB"}]}, "batch-major"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MODULE_REFUSED))
def test_a_module_that_does_not_keep_its_declaration_is_refused_in_one_line(
    case: str, tmp_path: Path
) -> None:
    give, overrides, message = MODULE_REFUSED[case]
    declared: dict[str, Any] = {"inputs": [("x", 3)], "outputs": ["y"], "states": LSTM_STATES}
    with pytest.raises(UnsupportedModuleError, match=message) as info:
        export_module(Returns(give), **{**declared, **overrides}, repository=tmp_path, name="m")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("give", "message"),
    [
        (steps_in_python, r"fixed an axis: .* Python loop over the time steps is unrolled"),
        (lambda y, h, c: (y.cumsum(1), h, c), "chunks do not: something mixes time steps"),
    ],
)
def test_a_module_that_does_not_stream_fails_verification_and_writes_nothing(
    give: Callable[..., object], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ExportVerificationError, match=message) as info:
        export_module(Returns(give), inputs=[("x", 3)], outputs=["y"], states=LSTM_STATES,
                      repository=tmp_path, name="m")  # fmt: skip
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m").exists()


class ProjectedInside(nn.Module):
    """An nn.LSTM with proj_size inside a module of its own: torch's exporter refuses it."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 8, proj_size=4, batch_first=True)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> object:
        y, (h, c) = self.rnn(x, (h, c))
        return y, h, c


def test_what_the_exporter_cannot_export_is_refused_in_one_line_and_quietly(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    states = [("h0", "hn", (1, 4)), ("c0", "cn", (1, 8))]
    with quiet_projections(), pytest.raises(UnsupportedModuleError) as info:
        export_module(ProjectedInside(), inputs=[("x", 3)], outputs=["y"], states=states,
                      repository=tmp_path, name="m")  # fmt: skip
    assert str(info.value) == (
        "model m/1: torch.onnx.export (TorchScript, opset 17) cannot export the module: "
        "Unsupported: ONNX export of operator LSTM, LSTMs with projections; for an nn.LSTM with "
        "proj_size use export_recurrent, or put training.export_module.ProjectedLSTM(lstm) in its "
        "place"
    )
    assert "graph" not in capfd.readouterr().out  # torch's log of its IR graph is dropped
    assert not (tmp_path / "m").exists()


def test_the_command_loads_an_embeddings_weights(tmp_path: Path) -> None:
    """--state-dict of a model whose layers are embedding, rnn and head (CharLM): the graph
    answers as that model."""
    model = build(CharLM, 4).eval()
    torch.save(model.state_dict(), tmp_path / "chars.pt")
    argv = ["export-module", "--factory", "tests.user_models:char_lm", "--state-dict",
            str(tmp_path / "chars.pt"), "--repository", str(tmp_path), "--name", "chars"]  # fmt: skip
    assert training_main(argv) == 0
    ids = np.random.default_rng(1).integers(0, 96, (2, 7))
    session = ort.InferenceSession(str(tmp_path / "chars" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    zeros = np.zeros((2, 2, 512), np.float32)
    (y,) = session.run(["y"], {"x": ids, "h0": zeros, "c0": zeros})
    with torch.no_grad():
        np.testing.assert_allclose(y, model(torch.from_numpy(ids)).numpy(), atol=1e-5, rtol=0)


def four_modules() -> tuple[nn.Module, ...]:
    return nn.Embedding(3, 2), nn.GRU(2, 3), nn.Linear(3, 1), nn.Identity()


def unknown_keys() -> dict[str, object]:
    return {"module": nn.GRU(2, 3), "inputs": [], "outputs": [], "states": [], "layout": "BT"}


@pytest.mark.parametrize(
    ("head", "message"),
    [(RunningSum(), "chunks do not: something mixes time steps"), (FixedSizes(), "fixed")],
)
def test_a_graph_that_does_not_stream_fails_verification_and_writes_nothing(
    head: nn.Module, message: str, tmp_path: Path
) -> None:
    rnn, _ = build(lambda: (nn.LSTM(3, 4, batch_first=True), None), 0)
    with pytest.raises(ExportVerificationError, match=message):
        export_recurrent(rnn, head, repository=tmp_path, name="m")
    assert not (tmp_path / "m").exists()


def test_the_command_refuses_a_bad_factory_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["export-module", "--repository", str(tmp_path), "--name", "m", "--factory"]
    assert training_main([*argv, "tests.user_models:missing"]) == 1
    assert training_main([*argv, "tests.no_such_module:f"]) == 1
    assert training_main([*argv, "tests.user_models"]) == 1
    assert training_main([*argv, "tests.test_export_module:four_modules"]) == 1
    assert training_main([*argv, "tests.test_export_module:unknown_keys"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "python -m training export-module: tests.user_models has no function 'missing'",
        "python -m training export-module: cannot import tests.no_such_module (No module named "
        "'tests.no_such_module'); run from the folder that holds it or add that folder to "
        "PYTHONPATH",
        "python -m training export-module: --factory must be package.module:function, got "
        "'tests.user_models'",
        f"python -m training export-module: tests.test_export_module:four_modules returned tuple; "
        f"it must return {FACTORY_FORMS}",
        "python -m training export-module: tests.test_export_module:unknown_keys returned a dict "
        f"with unknown keys ['layout']; it must return {FACTORY_FORMS}",
    ]
    assert not (tmp_path / "m").exists()


def documented_example() -> tuple[str, str]:
    """The python and bash blocks of docs/TRAINING.md's "Your own model"."""
    section = (ROOT / "docs" / "TRAINING.md").read_text().split("## Your own model")[1]
    python_block, bash_block = re.findall(r"```(?:python|bash)\n(.*?)\n```", section, re.S)[:2]
    return python_block, bash_block


def test_the_documented_example_runs_and_rnnserve_check_accepts_it(tmp_path: Path) -> None:
    """The command as a user runs it, in a subprocess, with the factory of tests/user_models.py
    (which is the documented my_models.py, word for word)."""
    python_block, bash_block = documented_example()
    assert python_block + "\n" == (ROOT / "tests" / "user_models.py").read_text()
    (tmp_path / "my_models.py").write_text(python_block + "\n")
    lines = bash_block.splitlines()
    commands = [line for line in lines if not line.startswith("rnnserve serve ")]
    assert len(commands) == len(lines) - 1
    script = 'python() { "$PY" "$@"; }\nrnnserve() { "$PY" -m service.cli "$@"; }\n'
    run = subprocess.run(
        ["bash", "-ec", script + "\n".join(commands)],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PY": sys.executable, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 of 4 model(s) pass" in run.stdout
    assert run.stdout.count("next: rnnserve check my_repository") == 4
    assert "in=token ids [0, 96) out=96" in run.stdout
    assert "in tokens (ids [0, 20)), features [2]; out logits [20], value [1]" in run.stdout
    meta = json.loads((tmp_path / "my_repository" / "frames" / "1" / "model.json").read_text())
    assert meta["source"]["factory"] == "my_models:frame_classifier"
    chars = json.loads((tmp_path / "my_repository" / "chars" / "1" / "model.json").read_text())
    assert chars["signature"]["inputs"] == [
        {"name": "x", "dtype": "int64", "shape": [], "layout": "BT", "range": [0, 96]}
    ]
    # The weights came from frames.pt: the graph answers as FrameClassifier loaded from it.
    model = FrameClassifier()
    model.load_state_dict(torch.load(tmp_path / "frames.pt", weights_only=True))
    x = np.random.default_rng(3).standard_normal((2, 9, 40)).astype(np.float32)
    session = ort.InferenceSession(
        str(tmp_path / "my_repository" / "frames" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    zeros = np.zeros((2, 2, 64), np.float32)
    (y,) = session.run(["y"], {"x": x, "h0": zeros, "c0": zeros})
    with torch.no_grad():
        np.testing.assert_allclose(y, model(torch.from_numpy(x)).numpy(), atol=1e-5, rtol=0)
