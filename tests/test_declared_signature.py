"""Models whose graphs follow another toolchain's conventions, served by declaring their tensors
in model.json's "signature" (docs/YOUR_MODEL.md), without editing the graphs:

- the bare ONNX LSTM op, time-major, with the op's own names (X, initial_h, initial_c -> Y, Y_h,
  Y_c) and its 4-D ``Y`` [time, directions, batch, hidden];
- a GRU whose state is [batch, hidden] (the batch axis first), with its own names and a non-zero
  initial state.

Each is streamed through the server in mixed chunks over both APIs, interleaved, and must equal
onnxruntime running the whole sequence on the graph directly. Wrong declarations are refused at
load in one line while the other models serve.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.api.native_messages import to_tensor
from service.repository import read_spec
from tests.chunking import chunk_spans
from tests.grpc_helpers import (
    channel,
    infer_output,
    infer_request,
    kserve,
    native,
    output_of,
    serving,
)

FEATURES, HIDDEN, GRU_HIDDEN, INITIAL = 3, 5, 4, 0.5
F32 = TensorProto.FLOAT


def save(root: Path, name: str, graph: Any, signature: dict[str, Any]) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    folder = root / name / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    (folder / "model.json").write_text(json.dumps({"signature": signature}))
    return folder


def weights(rng: np.random.Generator, name: str, *shape: int) -> Any:
    return numpy_helper.from_array(rng.uniform(-0.5, 0.5, shape).astype(np.float32), name)


def lstm_op_graph(rng: np.random.Generator) -> Any:
    """The ONNX LSTM op alone: X [T, B, F] -> Y [T, 1, B, H], Y_h and Y_c [1, B, H]."""
    node = helper.make_node("LSTM", ["X", "W", "R", "B", "", "initial_h", "initial_c"],
                            ["Y", "Y_h", "Y_c"], hidden_size=HIDDEN)  # fmt: skip
    inits = [weights(rng, "W", 1, 4 * HIDDEN, FEATURES), weights(rng, "R", 1, 4 * HIDDEN, HIDDEN),
             weights(rng, "B", 1, 8 * HIDDEN)]  # fmt: skip
    state = ["one", "batch", HIDDEN]
    return helper.make_graph(
        [node], "lstm_op",
        [helper.make_tensor_value_info("X", F32, ["time", "batch", FEATURES]),
         helper.make_tensor_value_info("initial_h", F32, [1, "batch", HIDDEN]),
         helper.make_tensor_value_info("initial_c", F32, [1, "batch", HIDDEN])],
        [helper.make_tensor_value_info("Y", F32, ["time", 1, "batch", HIDDEN]),
         helper.make_tensor_value_info("Y_h", F32, state),
         helper.make_tensor_value_info("Y_c", F32, state)],
        inits,
    )  # fmt: skip


LSTM_OP_SIGNATURE = {
    "inputs": [{"name": "X", "shape": [FEATURES], "layout": "TB"}],
    "outputs": [{"name": "Y", "shape": [HIDDEN], "layout": "T1B"}],
    "states": [
        {"input": "initial_h", "output": "Y_h", "shape": [1, HIDDEN]},
        {"input": "initial_c", "output": "Y_c", "shape": [1, HIDDEN]},
    ],
}


def gru_state_first_graph(rng: np.random.Generator) -> Any:
    """A batch-major GRU whose state is [batch, hidden]: features [B, T, F] and state [B, H] ->
    hidden [B, T, H] and state_out [B, H] (the ONNX GRU op inside is time-major)."""
    nodes = [
        helper.make_node("Transpose", ["features"], ["x_tm"], perm=[1, 0, 2]),
        helper.make_node("Unsqueeze", ["state", "axis0"], ["h0"]),  # [1, B, H]
        helper.make_node(
            "GRU", ["x_tm", "W", "R", "B", "", "h0"], ["Y", "Y_h"], hidden_size=GRU_HIDDEN
        ),
        helper.make_node("Squeeze", ["Y", "axis1"], ["y_tm"]),  # [T, 1, B, H] -> [T, B, H]
        helper.make_node("Transpose", ["y_tm"], ["hidden"], perm=[1, 0, 2]),
        helper.make_node("Squeeze", ["Y_h", "axis0"], ["state_out"]),  # [1, B, H] -> [B, H]
    ]
    inits = [
        weights(rng, "W", 1, 3 * GRU_HIDDEN, FEATURES),
        weights(rng, "R", 1, 3 * GRU_HIDDEN, GRU_HIDDEN),
        weights(rng, "B", 1, 6 * GRU_HIDDEN),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    return helper.make_graph(
        nodes, "gru_state_first",
        [helper.make_tensor_value_info("features", F32, ["batch", "time", FEATURES]),
         helper.make_tensor_value_info("state", F32, ["batch", GRU_HIDDEN])],
        [helper.make_tensor_value_info("hidden", F32, ["batch", "time", GRU_HIDDEN]),
         helper.make_tensor_value_info("state_out", F32, ["batch", GRU_HIDDEN])],
        inits,
    )  # fmt: skip


GRU_SIGNATURE = {
    "inputs": [{"name": "features", "shape": [FEATURES]}],
    "outputs": [{"name": "hidden", "shape": [GRU_HIDDEN]}],
    "states": [
        {
            "input": "state",
            "output": "state_out",
            "shape": [GRU_HIDDEN],
            "batch_axis": 0,
            "initial": INITIAL,
        }
    ],
}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(4)
    root = tmp_path_factory.mktemp("declared")
    save(root, "lstm_op", lstm_op_graph(rng), LSTM_OP_SIGNATURE)
    save(root, "gru_state_first", gru_state_first_graph(rng), GRU_SIGNATURE)
    return root


def offline(root: Path, name: str, x: np.ndarray) -> np.ndarray:
    """onnxruntime over the whole sequence ``x`` [steps, features], in the graph's own terms."""
    session = ort.InferenceSession(str(root / name / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    if name == "lstm_op":
        zeros = np.zeros((1, 1, HIDDEN), np.float32)
        (y,) = session.run(["Y"], {"X": x[:, None, :], "initial_h": zeros, "initial_c": zeros})
        return np.asarray(y[:, 0, 0, :])
    state = np.full((1, GRU_HIDDEN), INITIAL, np.float32)
    (hidden,) = session.run(["hidden"], {"features": x[None], "state": state})
    return np.asarray(hidden[0])


def test_the_declared_signature_reads_as_declared(repository: Path) -> None:
    spec = read_spec(repository / "lstm_op" / "1")
    sig = spec.tensors
    assert (sig.input.name, sig.input.layout, sig.output.name, sig.output.layout) == (
        "X", "TB", "Y", "T1B",
    )  # fmt: skip
    assert sig.state_inputs == ("initial_h", "initial_c")
    assert (spec.input_size, spec.output_size, spec.cell, spec.hidden_size) == (3, 5, "lstm", 5)
    gru = read_spec(repository / "gru_state_first" / "1").tensors.states[0]
    assert (gru.shape, gru.batch_axis, gru.pre, gru.post) == ((GRU_HIDDEN,), 0, 1, GRU_HIDDEN)


@pytest.mark.parametrize("residency", ["host", "device"])
async def test_declared_models_stream_exactly_over_both_apis(
    make_settings: Any, repository: Path, residency: str
) -> None:
    rng = np.random.default_rng(9)
    settings = make_settings(model_repository=repository, state_residency=residency,
                             max_queue_delay_s=0.002)  # fmt: skip
    plans = []
    for n in range(24):
        steps = int(rng.integers(8, 30))
        chunks: list[int] = []
        while sum(chunks) < steps:
            chunks.append(min(int(rng.integers(1, 7)), steps - sum(chunks)))
        name = "lstm_op" if n % 2 else "gru_state_first"
        x = rng.standard_normal((steps, FEATURES)).astype(np.float32)
        plans.append((n, name, x, chunks))
    async with serving(settings) as server, channel(server.grpc_port) as ch:
        nat, ks = native(ch), kserve(ch)

        async def native_stream(name: str, x: np.ndarray, chunks: list[int]) -> np.ndarray:
            call = nat.Stream()
            await call.write(pb.StreamRequest(open=pb.CreateSessionRequest(model=name)))
            await call.read()
            outputs = []
            for a, b in chunk_spans(chunks):
                await call.write(pb.StreamRequest(chunk=pb.Chunk(input=to_tensor(x[a:b]))))
                reply = await call.read()
                assert reply.output.steps == b, reply
                outputs.append(output_of(reply.output))
            await call.done_writing()
            return np.concatenate(outputs)

        async def kserve_unary(n: int, name: str, x: np.ndarray, chunks: list[int]) -> np.ndarray:
            outputs = []
            input_name = "X" if name == "lstm_op" else "features"
            for i, (a, b) in enumerate(chunk_spans(chunks)):
                request = infer_request(name, 500 + n, x[a:b], start=i == 0)
                request.inputs[0].name = input_name
                reply: kpb.ModelInferResponse = await ks.ModelInfer(request)
                assert reply.outputs[0].name == ("Y" if name == "lstm_op" else "hidden")
                outputs.append(infer_output(reply))
            return np.concatenate(outputs)

        runs = [native_stream(name, x, c) if n % 4 < 2 else kserve_unary(n, name, x, c)
                for n, name, x, c in plans]  # fmt: skip
        results = await asyncio.gather(*runs)
    for (_, name, x, chunks), streamed in zip(plans, results, strict=True):
        np.testing.assert_allclose(
            streamed, offline(repository, name, x), atol=1e-5, err_msg=f"{name} {chunks}"
        )


async def test_a_start_begins_again_from_the_declared_initial_state(
    make_settings: Any, repository: Path
) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, FEATURES)).astype(np.float32)
    settings = make_settings(model_repository=repository)
    async with serving(settings) as server, channel(server.grpc_port) as ch:
        ks = kserve(ch)

        async def sequence(values: np.ndarray, start: bool) -> np.ndarray:
            request = infer_request("gru_state_first", 7, values, start=start)
            request.inputs[0].name = "features"
            return infer_output(await ks.ModelInfer(request))

        await sequence(x, start=True)
        again = await sequence(x, start=True)  # restarts: from 0.5 again, not from zeros
    np.testing.assert_allclose(again, offline(repository, "gru_state_first", x), atol=1e-5)


@pytest.mark.parametrize(
    ("change", "phrases"),
    [
        (lambda s: s["inputs"][0].update(name="x"), ("inputs are", "'X'", "expected ['x'")),
        (lambda s: s["inputs"][0].update(layout="BT"), ("does not stream exactly",)),
        (lambda s: s["states"][0].update(shape=[1, 6]), ("initial_h axis 2 is 5, expected 6",)),
        (lambda s: s["outputs"].append({"name": "Y_h", "shape": [5]}),
         ("names ['Y_h'] more than once",)),
        (lambda s: s["states"][0].update(batch_axis=7), ("batch_axis must be 0..2",)),
        (lambda s: s["inputs"][0].update(dtype="int64", range=[0, 9], shape=[]),
         ("X has type tensor(float), expected tensor(int64)",)),
    ],
)  # fmt: skip
async def test_a_wrong_declaration_is_refused_in_one_line_and_the_others_serve(
    make_settings: Any, tmp_path: Path, change: Any, phrases: tuple[str, ...]
) -> None:
    rng = np.random.default_rng(4)
    signature = json.loads(json.dumps(LSTM_OP_SIGNATURE))
    change(signature)
    save(tmp_path, "lstm_op", lstm_op_graph(rng), signature)
    save(tmp_path, "gru_state_first", gru_state_first_graph(rng), GRU_SIGNATURE)
    async with serving(make_settings(model_repository=tmp_path)) as server:
        refused = server.engine.registry.refused
        assert list(refused) == ["lstm_op/1"], refused
        reason = refused["lstm_op/1"]
        assert "\n" not in reason and all(p in reason for p in phrases), reason
        assert server.engine.model("gru_state_first").ready


def test_the_guide_declares_what_is_served_here(repository: Path) -> None:
    """docs/YOUR_MODEL.md's model.json is the one this file serves, and `rnnserve check` passes
    on the repository of declared models."""
    guide = (Path(__file__).resolve().parent.parent / "docs" / "YOUR_MODEL.md").read_text()
    block = guide.split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(block) == {"signature": LSTM_OP_SIGNATURE}
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "check", str(repository)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   lstm_op/1" in result.stdout and "ok   gru_state_first/1" in result.stdout


# ----- token ids: an int64 input -------------------------------------------------------------
VOCABULARY = [chr(c) for c in range(32, 32 + 20)]  # 20 characters
EMBED, LM_HIDDEN = 6, 8
CHAR_LM_SIGNATURE = {
    "inputs": [{"name": "tokens", "dtype": "int64", "shape": [], "range": [0, len(VOCABULARY)]}],
    "outputs": [{"name": "logits", "shape": [len(VOCABULARY)]}],
    "states": [
        {"input": "h0", "output": "hn", "shape": [1, LM_HIDDEN]},
        {"input": "c0", "output": "cn", "shape": [1, LM_HIDDEN]},
    ],
}


def lstm_nodes(rng: np.random.Generator, source: str, width: int) -> tuple[list[Any], list[Any]]:
    """Nodes and weights of a time-major ONNX LSTM over batch-major ``source`` [B, T, width]
    (states h0/c0 -> hn/cn) whose output comes back batch-major as ``out`` [B, T, hidden]."""
    nodes = [
        helper.make_node("Transpose", [source], ["x_tm"], perm=[1, 0, 2]),
        helper.make_node(
            "LSTM",
            ["x_tm", "W", "R", "B", "", "h0", "c0"],
            ["Y", "hn", "cn"],
            hidden_size=LM_HIDDEN,
        ),
        helper.make_node("Squeeze", ["Y", "axis1"], ["y_tm"]),
        helper.make_node("Transpose", ["y_tm"], ["out"], perm=[1, 0, 2]),
    ]
    inits = [
        weights(rng, "W", 1, 4 * LM_HIDDEN, width),
        weights(rng, "R", 1, 4 * LM_HIDDEN, LM_HIDDEN),
        weights(rng, "B", 1, 8 * LM_HIDDEN),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    return nodes, inits


def char_lm_graph(rng: np.random.Generator) -> Any:
    """Token ids [B, T] -> embedding -> LSTM -> logits over the vocabulary [B, T, V]."""
    vocab = len(VOCABULARY)
    embedding = weights(rng, "embedding", vocab, EMBED)
    nodes, inits = lstm_nodes(rng, "embedded", EMBED)
    nodes = [helper.make_node("Gather", ["embedding", "tokens"], ["embedded"]), *nodes,
             helper.make_node("MatMul", ["out", "head"], ["logits"])]  # fmt: skip
    inits = [embedding, *inits, weights(rng, "head", LM_HIDDEN, vocab)]
    state = [1, "batch", LM_HIDDEN]
    return helper.make_graph(
        nodes, "char_lm",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"]),
         helper.make_tensor_value_info("h0", F32, state),
         helper.make_tensor_value_info("c0", F32, state)],
        [helper.make_tensor_value_info("logits", F32, ["batch", "time", vocab]),
         helper.make_tensor_value_info("hn", F32, state),
         helper.make_tensor_value_info("cn", F32, state)],
        inits,
    )  # fmt: skip


@pytest.fixture(scope="module")
def char_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("char_lm")
    folder = save(root, "char_lm", char_lm_graph(np.random.default_rng(6)), CHAR_LM_SIGNATURE)
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "vocabulary": VOCABULARY}))
    return root


def char_lm_offline(root: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(root / "char_lm" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    zeros = np.zeros((1, 1, LM_HIDDEN), np.float32)
    (logits,) = session.run(["logits"], {"tokens": ids[None], "h0": zeros, "c0": zeros})
    return np.asarray(logits[0])


def kserve_ids(sequence_id: int, ids: np.ndarray, start: bool, raw: bool) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name="char_lm")
    request.parameters["sequence_id"].int64_param = sequence_id
    request.parameters["sequence_start"].bool_param = start
    tensor = request.inputs.add(name="tokens", datatype="INT64", shape=[1, len(ids)])
    if raw:
        request.raw_input_contents.append(np.asarray(ids, "<i8").tobytes())
    else:
        tensor.contents.int64_contents.extend(int(i) for i in ids)
    return request


@pytest.mark.parametrize(
    "configuration",
    [{}, {"state_residency": "device", "batch_buckets": "1,4,16", "max_batch_size": 16}],
)
async def test_a_character_model_streams_token_ids_exactly(
    make_settings: Any, char_lm: Path, configuration: dict[str, Any]
) -> None:
    rng = np.random.default_rng(3)
    texts = [rng.integers(0, len(VOCABULARY), int(rng.integers(10, 25))) for _ in range(12)]
    settings = make_settings(model_repository=char_lm, max_queue_delay_s=0.002, **configuration)
    async with serving(settings) as server, channel(server.grpc_port) as ch:
        nat, ks = native(ch), kserve(ch)

        async def over_native(ids: np.ndarray) -> np.ndarray:
            call = nat.Stream()
            await call.write(pb.StreamRequest(open=pb.CreateSessionRequest(model="char_lm")))
            await call.read()
            outputs = []
            for a in range(0, len(ids), 4):
                await call.write(pb.StreamRequest(chunk=pb.Chunk(input=to_tensor(ids[a : a + 4]))))
                outputs.append(output_of((await call.read()).output))
            await call.done_writing()
            return np.concatenate(outputs)

        async def over_kserve(n: int, ids: np.ndarray) -> np.ndarray:
            outputs = []
            for i, a in enumerate(range(0, len(ids), 3)):
                request = kserve_ids(900 + n, ids[a : a + 3], start=i == 0, raw=i % 2 == 0)
                reply = await ks.ModelInfer(request)
                assert reply.outputs[0].name == "logits"
                outputs.append(infer_output(reply))
            return np.concatenate(outputs)

        runs = [over_native(t) if n % 2 else over_kserve(n, t) for n, t in enumerate(texts)]
        results = await asyncio.gather(*runs)
        model = await nat.GetModel(pb.GetModelRequest(model="char_lm"))
    for ids, streamed in zip(texts, results, strict=True):
        np.testing.assert_allclose(streamed, char_lm_offline(char_lm, ids), atol=1e-5)
    assert list(model.vocabulary) == VOCABULARY
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("tokens", "INT64", [-1])
    ]


async def test_token_ids_outside_the_vocabulary_or_of_the_wrong_type_are_refused_unapplied(
    make_settings: Any, char_lm: Path
) -> None:
    settings = make_settings(model_repository=char_lm)
    async with serving(settings) as server, channel(server.grpc_port) as ch:
        ks, nat = kserve(ch), native(ch)
        for n, ids in enumerate((np.array([3, 20]), np.array([-1]))):  # one sequence each
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ks.ModelInfer(kserve_ids(10 + n, ids, start=True, raw=n == 0))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "takes ids from 0 to 19" in (info.value.details() or "")
        floats = infer_request("char_lm", 7, np.zeros((2, 1), np.float32), start=True)
        floats.inputs[0].name = "tokens"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ks.ModelInfer(floats)
        assert "input 'tokens' must be INT64, got FP32" in (info.value.details() or "")
        sid = (await nat.CreateSession(pb.CreateSessionRequest(model="char_lm"))).session_id
        ok = await nat.Step(pb.StepRequest(model="char_lm", session_id=sid,
                                           input=to_tensor(np.array([1, 2]))))  # fmt: skip
        assert ok.steps == 2
        for wrong in (np.zeros((2,), np.float32), np.array([5, 99])):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await nat.Step(pb.StepRequest(model="char_lm", session_id=sid,
                                              input=to_tensor(wrong)))  # fmt: skip
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "takes ids from 0 to 19; the chunk holds 99" in (info.value.details() or "")
        session = await nat.GetSession(pb.GetSessionRequest(model="char_lm", session_id=sid))
        assert session.steps == 2  # neither was applied


# ----- several inputs and outputs ------------------------------------------------------------
TWO_HEADS_SIGNATURE = {
    "inputs": [
        {"name": "tokens", "dtype": "int64", "shape": [], "range": [0, len(VOCABULARY)]},
        {"name": "features", "shape": [2]},
    ],
    "outputs": [{"name": "logits", "shape": [len(VOCABULARY)]}, {"name": "value", "shape": [1]}],
    "states": CHAR_LM_SIGNATURE["states"],
}


def two_heads_graph(rng: np.random.Generator) -> Any:
    """Token ids [B, T] and features [B, T, 2] -> embedding ++ features -> LSTM -> logits
    [B, T, V] and a value [B, T, 1]."""
    vocab = len(VOCABULARY)
    embedding = weights(rng, "embedding", vocab, EMBED)
    nodes, inits = lstm_nodes(rng, "joined", EMBED + 2)
    nodes = [
        helper.make_node("Gather", ["embedding", "tokens"], ["embedded"]),
        helper.make_node("Concat", ["embedded", "features"], ["joined"], axis=2),
        *nodes,
        helper.make_node("MatMul", ["out", "head"], ["logits"]),
        helper.make_node("MatMul", ["out", "value_head"], ["value"]),
    ]
    inits = [embedding, *inits, weights(rng, "head", LM_HIDDEN, vocab),
             weights(rng, "value_head", LM_HIDDEN, 1)]  # fmt: skip
    state = [1, "batch", LM_HIDDEN]
    return helper.make_graph(
        nodes, "two_heads",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "time"]),
         helper.make_tensor_value_info("features", F32, ["batch", "time", 2]),
         helper.make_tensor_value_info("h0", F32, state),
         helper.make_tensor_value_info("c0", F32, state)],
        [helper.make_tensor_value_info("logits", F32, ["batch", "time", vocab]),
         helper.make_tensor_value_info("value", F32, ["batch", "time", 1]),
         helper.make_tensor_value_info("hn", F32, state),
         helper.make_tensor_value_info("cn", F32, state)],
        inits,
    )  # fmt: skip


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("two_heads")
    save(root, "two_heads", two_heads_graph(np.random.default_rng(8)), TWO_HEADS_SIGNATURE)
    return root


def two_heads_offline(root: Path, ids: np.ndarray, features: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(root / "two_heads" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    zeros = np.zeros((1, 1, LM_HIDDEN), np.float32)
    logits, value = session.run(
        ["logits", "value"],
        {"tokens": ids[None], "features": features[None], "h0": zeros, "c0": zeros},
    )
    return [np.asarray(logits[0]), np.asarray(value[0])]


@pytest.mark.parametrize("residency", ["host", "device"])
async def test_a_model_of_two_inputs_and_two_outputs_streams_exactly(
    make_settings: Any, two_heads: Path, residency: str
) -> None:
    rng = np.random.default_rng(12)
    plans = [
        (
            rng.integers(0, len(VOCABULARY), n),
            rng.standard_normal((n, 2)).astype(np.float32),
        )
        for n in rng.integers(6, 18, 10)
    ]
    settings = make_settings(model_repository=two_heads, state_residency=residency,
                             max_queue_delay_s=0.002)  # fmt: skip
    async with serving(settings) as server, channel(server.grpc_port) as ch:
        nat, ks = native(ch), kserve(ch)

        async def over_native(ids: np.ndarray, feats: np.ndarray) -> list[np.ndarray]:
            sid = (await nat.CreateSession(pb.CreateSessionRequest(model="two_heads"))).session_id
            logits, values = [], []
            for a in range(0, len(ids), 5):
                inputs = {"tokens": to_tensor(ids[a : a + 5]),
                          "features": to_tensor(feats[a : a + 5])}  # fmt: skip
                reply = await nat.Step(
                    pb.StepRequest(model="two_heads", session_id=sid, inputs=inputs)
                )
                packed = output_of(reply)
                logits.append(output_of_named(reply, "logits"))
                values.append(output_of_named(reply, "value"))
                np.testing.assert_array_equal(packed, np.hstack([logits[-1], values[-1]]))
            return [np.concatenate(logits), np.concatenate(values)]

        async def over_kserve(n: int, ids: np.ndarray, feats: np.ndarray) -> list[np.ndarray]:
            logits, values = [], []
            for i, a in enumerate(range(0, len(ids), 4)):
                request = kserve_ids(300 + n, ids[a : a + 4], start=i == 0, raw=False)
                request.model_name = "two_heads"
                part = feats[a : a + 4]
                tensor = request.inputs.add(name="features", datatype="FP32",
                                            shape=[1, *part.shape])  # fmt: skip
                tensor.contents.fp32_contents.extend(part.ravel().tolist())
                reply = await ks.ModelInfer(request)
                by_name = {o.name: k for k, o in enumerate(reply.outputs)}
                assert sorted(by_name) == ["logits", "value"]
                for name, into in (("logits", logits), ("value", values)):
                    raw = reply.raw_output_contents[by_name[name]]
                    shape = list(reply.outputs[by_name[name]].shape)
                    into.append(np.frombuffer(raw, "<f4").reshape(shape)[0])
            return [np.concatenate(logits), np.concatenate(values)]

        runs = [over_native(i, f) if n % 2 else over_kserve(n, i, f)
                for n, (i, f) in enumerate(plans)]  # fmt: skip
        results = await asyncio.gather(*runs)
        only_value = kserve_ids(999, plans[0][0][:3], start=True, raw=True)
        only_value.model_name = "two_heads"
        only_value.inputs.add(name="features", datatype="FP32", shape=[1, 3, 2])
        only_value.raw_input_contents.append(plans[0][1][:3].tobytes())
        only_value.outputs.add(name="value")
        reply = await ks.ModelInfer(only_value)
        assert [o.name for o in reply.outputs] == ["value"]
        metadata = await ks.ModelMetadata(kpb.ModelMetadataRequest(name="two_heads"))
    for (ids, feats), streamed in zip(plans, results, strict=True):
        for got, want in zip(streamed, two_heads_offline(two_heads, ids, feats), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)
    assert [(t.name, t.datatype) for t in metadata.inputs] == [
        ("tokens", "INT64"), ("features", "FP32"),
    ]  # fmt: skip
    assert [t.name for t in metadata.outputs] == ["logits", "value"]


def output_of_named(reply: pb.StepResponse, name: str) -> np.ndarray:
    tensor = reply.outputs[name]
    return np.frombuffer(tensor.data, "<f4").reshape(list(tensor.shape))


async def test_several_inputs_must_all_come_with_as_many_steps(
    make_settings: Any, two_heads: Path
) -> None:
    settings = make_settings(model_repository=two_heads)
    async with serving(settings) as server, channel(server.grpc_port) as ch:
        nat = native(ch)
        sid = (await nat.CreateSession(pb.CreateSessionRequest(model="two_heads"))).session_id
        cases = [
            ({"tokens": to_tensor(np.array([1, 2]))}, "takes inputs tokens, features; missing features"),
            ({"tokens": to_tensor(np.array([1, 2])),
              "features": to_tensor(np.zeros((3, 2), np.float32))}, "as many steps each"),
            (None, "takes 2 inputs, tokens, features: send each by name"),
        ]  # fmt: skip
        for inputs, phrase in cases:
            request = pb.StepRequest(model="two_heads", session_id=sid)
            if inputs is None:
                request.input.CopyFrom(to_tensor(np.array([1, 2])))
            else:
                for name, tensor in inputs.items():
                    request.inputs[name].CopyFrom(tensor)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await nat.Step(request)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert phrase in (info.value.details() or ""), info.value.details()


async def test_metadata_of_a_declared_model_names_its_own_tensors(
    make_settings: Any, repository: Path
) -> None:
    """ModelMetadata and ModelConfig use the declared names; a state starting from a declared
    value (not zeros) is declared without Triton's zero_data, GetModel says "declared"."""
    settings = make_settings(model_repository=repository)
    async with serving(settings) as server, channel(server.grpc_port) as ch:
        ks, nat = kserve(ch), native(ch)
        metadata = await ks.ModelMetadata(kpb.ModelMetadataRequest(name="lstm_op"))
        config = (await ks.ModelConfig(kpb.ModelConfigRequest(name="gru_state_first"))).config
        info = await nat.GetModel(pb.GetModelRequest(model="gru_state_first"))
    assert [(t.name, list(t.shape)) for t in metadata.inputs] == [("X", [-1, -1, FEATURES])]
    assert [(t.name, list(t.shape)) for t in metadata.outputs] == [("Y", [-1, -1, HIDDEN])]
    (state,) = config.sequence_batching.state
    assert (state.input_name, state.output_name, list(state.dims)) == (
        "state", "state_out", [GRU_HIDDEN],
    )  # fmt: skip
    assert list(state.initial_state) == []
    assert [(s.input_name, s.initial) for s in info.states] == [("state", "declared")]
