"""Issue #17's six model kinds, exported by training/export_module.py and training/export_any.py
(the ONNX LSTM op of another toolchain declared in model.json instead), checked by `rnnserve
check`, and streamed through the server in mixed chunkings through the native API and through
tritonclient: every output equals torch's to 1e-5.

1. frames: a 2-layer LSTM speech-frame classifier with a linear head (batch-first);
2. sensors: a time-major GRU regressor;
3. chars: a character-level language model: int64 token ids, an embedding, a 2-layer LSTM(512),
   logits over the vocabulary;
4. projected: a 2-layer time-major LSTM with proj_size and a linear head;
5. two_heads: any module (export_module): token ids and features in, class logits and a value out;
6. lstm_op: the bare ONNX LSTM op (X, initial_h, initial_c -> Y, Y_h, Y_c, time-major, Y of
   [time, 1, batch, hidden]) with the weights of a torch nn.LSTM, served by its declared signature.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.api.native_messages import to_tensor
from service.client import Client
from service.settings import Settings
from tests.chunking import chunk_spans
from tests.grpc_helpers import channel, native, output_of, serving
from tests.test_declared_signature import LSTM_OP_SIGNATURE, save
from tests.user_models import char_lm, frame_classifier, gru_regressor, two_heads
from training.export_any import export_module
from training.export_module import export_recurrent, quiet_projections

ROOT = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).with_name("tritonclient_models_probe.py")
CHUNKINGS = ([1, 3, 7, 2, 5, 1, 4], [6, 1, 1, 9, 2, 4])  # 23 steps each, in mixed chunk lengths
VOCABULARY = [chr(c) for c in range(32, 128)]  # the char model's 96 tokens


@dataclass
class Kind:
    """One exported model: its inputs (name, dtype, values per step or None for one id, ids'
    upper bound), its outputs by name, and torch running a whole sequence from zero state."""

    inputs: list[tuple[str, str, int | None, int]]
    outputs: list[str]
    torch_run: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]

    def sample(self, rng: np.random.Generator, steps: int) -> dict[str, np.ndarray]:
        return {
            name: rng.integers(0, high, steps, dtype=np.int64)
            if dtype == "int64"
            else rng.standard_normal((steps, size)).astype(np.float32)
            for name, dtype, size, high in self.inputs
        }

    def expected(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad(), quiet_projections():
            ran = self.torch_run({k: torch.from_numpy(v) for k, v in values.items()})
        return {name: y.numpy() for name, y in ran.items()}


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def recurrent_run(
    rnn: nn.Module, head: nn.Module | None, embedding: nn.Module | None = None
) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The user's modules over one sequence ``x`` [steps, ...], in their own layout."""
    batch_first = bool(rnn.batch_first)

    def run(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = values["x"][None] if batch_first else values["x"][:, None]
        if embedding is not None:
            x = embedding(x)
        out, _ = rnn(x)
        y = out if head is None else head(out)
        return {"y": y[0] if batch_first else y[:, 0]}

    return run


def lstm_op_graph(lstm: nn.LSTM) -> Any:
    """The ONNX LSTM op alone with ``lstm``'s weights: torch's gates (i, f, g, o) in the op's
    order (i, o, f, c)."""
    hidden, features = lstm.hidden_size, lstm.input_size
    order = [0, 3, 1, 2]

    def gates(name: str) -> np.ndarray:
        weight = getattr(lstm, name).detach().numpy()
        return np.concatenate([np.split(weight, 4)[k] for k in order])

    w = gates("weight_ih_l0")[None]
    r = gates("weight_hh_l0")[None]
    b = np.concatenate([gates("bias_ih_l0"), gates("bias_hh_l0")])[None]
    node = helper.make_node("LSTM", ["X", "W", "R", "B", "", "initial_h", "initial_c"],
                            ["Y", "Y_h", "Y_c"], hidden_size=hidden)  # fmt: skip
    state = [1, "batch", hidden]
    return helper.make_graph(
        [node], "lstm_op",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["time", "batch", features]),
         helper.make_tensor_value_info("initial_h", TensorProto.FLOAT, state),
         helper.make_tensor_value_info("initial_c", TensorProto.FLOAT, state)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["time", 1, "batch", hidden]),
         helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, state),
         helper.make_tensor_value_info("Y_c", TensorProto.FLOAT, state)],
        [numpy_helper.from_array(a.astype(np.float32), n) for a, n in ((w, "W"), (r, "R"), (b, "B"))],
    )  # fmt: skip


def export_six(root: Path) -> dict[str, Kind]:
    kinds: dict[str, Kind] = {}
    rnn, head = seeded(1, frame_classifier)
    export_recurrent(rnn, head, repository=root, name="frames")
    kinds["frames"] = Kind([("x", "float32", 40, 0)], ["y"], recurrent_run(rnn, head))

    rnn, head = seeded(2, gru_regressor)
    export_recurrent(rnn, head, repository=root, name="sensors")
    kinds["sensors"] = Kind([("x", "float32", 4, 0)], ["y"], recurrent_run(rnn, head))

    embedding, rnn, head = seeded(3, char_lm)
    assert (rnn.hidden_size, rnn.num_layers, embedding.num_embeddings) == (512, 2, 96)
    export_recurrent(rnn, head, embedding=embedding, repository=root, name="chars",
                     metadata={"vocabulary": VOCABULARY})  # fmt: skip
    kinds["chars"] = Kind([("x", "int64", None, 96)], ["y"], recurrent_run(rnn, head, embedding))

    rnn, head = seeded(4, lambda: (nn.LSTM(5, 12, num_layers=2, proj_size=4), nn.Linear(4, 3)))
    export_recurrent(rnn, head, repository=root, name="projected")
    kinds["projected"] = Kind([("x", "float32", 5, 0)], ["y"], recurrent_run(rnn, head))

    parts = seeded(5, two_heads)
    module = parts.pop("module")
    export_module(module, **parts, repository=root, name="two_heads")

    def run_two_heads(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        zeros = torch.zeros(1, 1, 32)
        logits, value, _, _ = module(values["tokens"][None], values["features"][None], zeros, zeros)
        return {"logits": logits[0], "value": value[0]}

    kinds["two_heads"] = Kind(
        [("tokens", "int64", None, 20), ("features", "float32", 2, 0)],
        ["logits", "value"],
        run_two_heads,
    )

    lstm = seeded(6, lambda: nn.LSTM(3, 5)).eval()  # time-major, as the op is
    save(root, "lstm_op", lstm_op_graph(lstm), LSTM_OP_SIGNATURE)
    kinds["lstm_op"] = Kind(
        [("X", "float32", 3, 0)], ["Y"], lambda v: {"Y": lstm(v["X"][:, None])[0][:, 0]}
    )
    return kinds


@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Kind]]:
    root = tmp_path_factory.mktemp("six_kinds")
    return root, export_six(root)


@pytest.fixture(scope="module")
def plans(
    six: tuple[Path, dict[str, Kind]],
) -> dict[str, list[tuple[str, dict[str, np.ndarray], list[int]]]]:
    """Per model: (key, inputs, chunk lengths) of two sequences."""
    _, kinds = six
    rng = np.random.default_rng(17)
    return {
        name: [
            (f"{name}-{k}", kind.sample(rng, sum(chunks)), list(chunks))
            for k, chunks in enumerate(CHUNKINGS)
        ]
        for name, kind in kinds.items()
    }


def assert_equal_to_torch(
    kind: Kind, values: dict[str, np.ndarray], got: dict[str, np.ndarray], how: str
) -> None:
    for name, want in kind.expected(values).items():
        assert got[name].shape == want.shape, (how, name)
        np.testing.assert_allclose(got[name], want, atol=1e-5, rtol=0, err_msg=f"{how}: {name}")


def test_rnnserve_check_passes_on_all_six(six: tuple[Path, dict[str, Kind]]) -> None:
    root, kinds = six
    check = subprocess.run(
        [sys.executable, "-m", "service.cli", "check", str(root)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{len(kinds)} of {len(kinds)} model(s) pass" in check.stdout
    chars = json.loads((root / "chars" / "1" / "model.json").read_text())
    assert chars["signature"]["inputs"] == [
        {"name": "x", "dtype": "int64", "shape": [], "layout": "BT", "range": [0, 96]}
    ]
    assert chars["embedding"] == {"num_embeddings": 96, "embedding_dim": 64, "padding_idx": None}
    heads = json.loads((root / "two_heads" / "1" / "model.json").read_text())["signature"]
    assert [(t["name"], t["dtype"], t["shape"]) for t in heads["inputs"]] == [
        ("tokens", "int64", []), ("features", "float32", [2]),
    ]  # fmt: skip
    assert [(t["name"], t["shape"]) for t in heads["outputs"]] == [("logits", [20]), ("value", [1])]


def client_streams(
    port: int, model: str, kind: Kind, runs: list[tuple[str, dict[str, np.ndarray], list[int]]]
) -> list[dict[str, np.ndarray]]:
    """The Python client (service.client), one session per sequence, chunk after chunk: the
    model's one input as it is (token ids as integers), several inputs by name; several outputs
    read by name from ``last_outputs``."""
    results = []
    with Client(f"127.0.0.1:{port}") as client:
        for _, values, chunks in runs:
            parts: dict[str, list[np.ndarray]] = {name: [] for name in kind.outputs}
            with client.open_session(model) as session:
                for a, b in chunk_spans(chunks):
                    if len(values) == 1:
                        y = session.step(next(iter(values.values()))[a:b])
                    else:
                        y = session.step({name: x[a:b] for name, x in values.items()})
                    for name in kind.outputs:
                        parts[name].append(session.last_outputs[name] if len(parts) > 1 else y)
            results.append({name: np.concatenate(p) for name, p in parts.items()})
    return results


async def stub_streams(
    port: int, model: str, kind: Kind, runs: list[tuple[str, dict[str, np.ndarray], list[int]]]
) -> list[dict[str, np.ndarray]]:
    """The raw native stubs: each chunk's inputs by name (StepRequest.inputs) or, for a model of
    one input, as the chunk's input; each output by name (StepResponse.outputs)."""
    results = []
    async with channel(port) as ch:
        stub = native(ch)
        for _, values, chunks in runs:
            sid = (await stub.CreateSession(pb.CreateSessionRequest(model=model))).session_id
            parts: dict[str, list[np.ndarray]] = {name: [] for name in kind.outputs}
            for a, b in chunk_spans(chunks):
                request = pb.StepRequest(model=model, session_id=sid)
                if len(values) == 1:
                    request.input.CopyFrom(to_tensor(next(iter(values.values()))[a:b]))
                else:
                    for name, x in values.items():
                        request.inputs[name].CopyFrom(to_tensor(x[a:b]))
                reply = await stub.Step(request)
                for name in kind.outputs:
                    tensor = reply.outputs[name] if len(kind.outputs) > 1 else reply.output
                    parts[name].append(output_of(pb.StepResponse(output=tensor)))
            results.append({name: np.concatenate(p) for name, p in parts.items()})
    return results


async def test_served_through_the_native_api_equals_torch(
    six: tuple[Path, dict[str, Kind]], plans: dict[str, Any], make_settings: Callable[..., Settings]
) -> None:
    """Every kind through the Python client (token ids as integers, several inputs by name,
    several outputs by name), and the raw stubs for the two with ids or several inputs."""
    root, kinds = six
    async with serving(make_settings(model_repository=root)) as server:
        port = server.grpc_port
        by_client = await asyncio.gather(
            *(
                asyncio.to_thread(client_streams, port, name, kinds[name], plans[name])
                for name in kinds
            )
        )
        by_stubs = {
            name: await stub_streams(port, name, kinds[name], plans[name])
            for name in ("chars", "two_heads")
        }
        with Client(f"127.0.0.1:{port}") as client:
            info = await asyncio.to_thread(client.model, "chars")
    for name, results in zip(kinds, by_client, strict=True):
        for (key, values, _), got in zip(plans[name], results, strict=True):
            assert_equal_to_torch(kinds[name], values, got, f"client {key}")
    for name, results in by_stubs.items():
        for (key, values, _), got in zip(plans[name], results, strict=True):
            assert_equal_to_torch(kinds[name], values, got, f"native {key}")
    assert list(info.vocabulary) == VOCABULARY


async def test_served_through_tritonclient_equals_torch(
    six: tuple[Path, dict[str, Kind]],
    plans: dict[str, Any],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """tritonclient, unmodified, in a subprocess: infer per chunk and one interleaved stream; ids
    as INT64, every input and output by name."""
    root, kinds = six
    plan = [
        {
            "model": name,
            "inputs": [
                [n, "INT64" if dtype == "int64" else "FP32"] for n, dtype, _, _ in kind.inputs
            ],
            "outputs": kind.outputs,
            "sequences": [{"key": key, "chunks": chunks} for key, _, chunks in plans[name]],
        }
        for name, kind in kinds.items()
    ]
    arrays = {
        f"{key}__{n}": x
        for runs in plans.values()
        for key, values, _ in runs
        for n, x in values.items()
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    np.savez(tmp_path / "in.npz", **arrays)
    async with serving(make_settings(model_repository=root)) as server:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(PROBE), f"127.0.0.1:{server.grpc_port}", str(tmp_path / "plan.json"),
            str(tmp_path / "in.npz"), str(tmp_path / "out.npz"),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        stdout, _ = await asyncio.wait_for(process.communicate(), timeout=180)
    assert process.returncode == 0, stdout.decode()
    results = np.load(tmp_path / "out.npz")
    for name, kind in kinds.items():
        for key, values, _ in plans[name]:
            for how in ("infer", "stream"):
                got = {o: results[f"{how}__{key}__{o}"] for o in kind.outputs}
                assert_equal_to_torch(kind, values, got, f"tritonclient {how} {key}")
