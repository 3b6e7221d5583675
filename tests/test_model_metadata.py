"""Metadata a client can use: KServe ModelMetadata (read with tritonclient, unmodified), the
ModelConfig's implicit-state declarations, native GetModel's tensors, states, labels and vocabulary,
and what ``rnnserve models`` prints of them. All of it must agree with what the server really
takes, returns and keeps."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.api.native_messages import to_tensor
from service.cli import main
from service.cli_client import repository_lines
from service.errors import ModelContractError
from service.repository import read_spec
from service.server import RnnServer
from service.settings import Settings
from tests.grpc_helpers import channel, infer_request, kserve, native, serving
from tests.test_demos import server_in_thread

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["up", "down"]  # tiny_lstm has 2 outputs
VOCABULARY = [" ", "\n", *"abcdefghijklmnopqrstuvwxyz", "<unk>"]  # 29 tokens

# tritonclient registers its own ``inference`` protobuf package, which cannot share a process with
# the server's (tests/tritonclient_probe.py): it runs in a subprocess and prints JSON.
TRITON_METADATA = """
import json, sys
import tritonclient.grpc as grpcclient
client = grpcclient.InferenceServerClient(url=sys.argv[1])
print(json.dumps({
    model: {
        "metadata": client.get_model_metadata(model, as_json=True),
        "config": client.get_model_config(model, as_json=True)["config"],
    }
    for model in sys.argv[2:]
}))
client.close()
"""


def edit_model_json(directory: Path, **changes: Any) -> None:
    path = directory / "model.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture(scope="module")
def labelled_repository(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models, tiny_lstm's model.json with labels and a vocabulary (tiny_gru without)."""
    root = tmp_path_factory.mktemp("labelled")
    shutil.copytree(tiny_repository, root, dirs_exist_ok=True)
    edit_model_json(root / "tiny_lstm" / "1", labels=LABELS, vocabulary=VOCABULARY)
    return root


@pytest.fixture
async def server(
    make_settings: Callable[..., Settings], labelled_repository: Path
) -> AsyncIterator[RnnServer]:
    async with serving(make_settings(model_repository=labelled_repository)) as srv:
        yield srv


async def test_tritonclient_reads_every_input_output_and_state(server: RnnServer) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", TRITON_METADATA, f"127.0.0.1:{server.grpc_port}", "tiny_lstm",
        "tiny_gru", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, stderr.decode()
    seen = json.loads(stdout)
    # As Triton reports a model with max_batch_size > 0: the batch dimension first (int64 values
    # are JSON strings in tritonclient's as_json).
    lstm = seen["tiny_lstm"]["metadata"]
    assert (lstm["name"], lstm["versions"], lstm["platform"]) == (
        "tiny_lstm", ["1"], "onnxruntime_onnx",
    )  # fmt: skip
    assert lstm["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "-1", "3"]}]
    assert lstm["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "-1", "2"]}]

    config = seen["tiny_lstm"]["config"]
    assert config["max_batch_size"] == server.settings.max_batch_size
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": ["-1", "3"]}]
    assert config["output"] == [{"name": "y", "data_type": "TYPE_FP32", "dims": ["-1", "2"]}]
    batching = config["sequence_batching"]
    assert "oldest" in batching and "control_input" not in batching  # no control tensors
    zeros = {"data_type": "TYPE_FP32", "dims": ["2", "8"], "zero_data": True}  # [layers, hidden]
    assert batching["state"] == [
        {"input_name": "h0", "output_name": "hn", "data_type": "TYPE_FP32", "dims": ["2", "8"],
         "initial_state": [{**zeros, "name": "h0 zeros"}]},
        {"input_name": "c0", "output_name": "cn", "data_type": "TYPE_FP32", "dims": ["2", "8"],
         "initial_state": [{**zeros, "name": "c0 zeros"}]},
    ]  # fmt: skip

    gru = seen["tiny_gru"]
    assert gru["metadata"]["inputs"][0]["shape"] == ["-1", "-1", "3"]
    assert [(s["input_name"], s["output_name"], s["dims"]) for s in gru["config"]["sequence_batching"]["state"]] == [
        ("h0", "hn", ["1", "8"])
    ]  # fmt: skip


async def test_metadata_describes_what_the_server_takes_and_returns(server: RnnServer) -> None:
    """A client that builds its request from ModelMetadata is served, and the reply's output is
    what the metadata says."""
    async with channel(server.grpc_port) as ch:
        stub = kserve(ch)
        meta = await stub.ModelMetadata(kpb.ModelMetadataRequest(name="tiny_gru"))
        (x,) = meta.inputs
        (y,) = meta.outputs
        steps = 4
        chunk = np.random.default_rng(7).standard_normal((steps, x.shape[2])).astype(np.float32)
        reply = await stub.ModelInfer(infer_request("tiny_gru", 3, chunk, start=True, end=True))
        (out,) = reply.outputs
        assert (out.name, out.datatype, len(out.shape)) == (y.name, y.datatype, len(y.shape))
        assert list(out.shape) == [1, steps, y.shape[2]]  # y.shape: [-1, -1, outputs]


async def test_get_model_lists_tensors_states_labels_and_vocabulary(server: RnnServer) -> None:
    async with channel(server.grpc_port) as ch:
        stub = native(ch)
        info = await stub.GetModel(pb.GetModelRequest(model="tiny_lstm"))
        assert [(t.name, t.datatype, list(t.shape)) for t in info.inputs] == [
            ("x", "FP32", [-1, 3])
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in info.outputs] == [
            ("y", "FP32", [-1, 2])
        ]
        assert [
            (s.input_name, s.output_name, s.datatype, list(s.shape), s.initial) for s in info.states
        ] == [("h0", "hn", "FP32", [2, 8], "zeros"), ("c0", "cn", "FP32", [2, 8], "zeros")]
        assert list(info.labels) == LABELS and list(info.vocabulary) == VOCABULARY
        # The fields older clients read still say the same.
        assert info.input == info.inputs[0] and info.output == info.outputs[0]
        assert [(t.name, list(t.shape)) for t in info.state] == [("h0", [2, 8]), ("c0", [2, 8])]
        assert json.loads(info.metadata_json)["labels"] == LABELS

        listed = {m.name: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
        assert listed["tiny_lstm"] == info
        gru = listed["tiny_gru"]  # its model.json has neither
        assert not gru.labels and not gru.vocabulary
        assert [(s.input_name, s.output_name, list(s.shape)) for s in gru.states] == [
            ("h0", "hn", [1, 8])
        ]


async def test_declared_state_shapes_are_the_sessions_own(server: RnnServer) -> None:
    """A session's state comes back in the declared shapes, and a state of those shapes is
    accepted to start a session from."""
    async with channel(server.grpc_port) as ch:
        stub = native(ch)
        for model in ("tiny_lstm", "tiny_gru"):
            info = await stub.GetModel(pb.GetModelRequest(model=model))
            shapes = [list(s.shape) for s in info.states]
            initial = [to_tensor(np.full(shape, 0.5, np.float32)) for shape in shapes]
            opened = await stub.CreateSession(
                pb.CreateSessionRequest(model=model, initial_state=initial)
            )
            got = await stub.GetSession(
                pb.GetSessionRequest(model=model, session_id=opened.session_id, include_state=True)
            )
            assert [list(t.shape) for t in got.state] == shapes
            assert [t.data for t in got.state] == [t.data for t in initial]


async def test_rnnserve_models_shows_tensors_states_and_a_short_vocabulary(
    server: RnnServer,
) -> None:
    async with channel(server.grpc_port) as ch:
        repository = await native(ch).ListModels(pb.ListModelsRequest())
    lines = repository_lines(repository)
    lstm = lines[lines.index(next(line for line in lines if line.startswith("tiny_lstm/1\t"))) :]
    assert lstm[:6] == [
        "tiny_lstm/1\tlstm\tlayers=2 hidden=8\tin=3 out=2\tsynthetic",
        "  inputs:  x FP32 [steps, 3]",
        "  outputs: y FP32 [steps, 2]",
        "  state:   h0 -> hn FP32 [2, 8], c0 -> cn FP32 [2, 8] (from zeros)",
        "  labels:  2 classes: 'up', 'down'",
        "  vocabulary: 29 tokens: ' ', '\\n', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', "
        "... (19 more)",
    ]
    gru = lines[lines.index(next(line for line in lines if line.startswith("tiny_gru/1\t"))) :]
    assert gru[1:4] == [
        "  inputs:  x FP32 [steps, 3]",
        "  outputs: y FP32 [steps, 2]",
        "  state:   h0 -> hn FP32 [1, 8] (from zeros)",
    ]
    assert all(len(line) <= 120 for line in lines)


def test_a_long_label_or_token_is_cut_short() -> None:
    info = pb.ModelInfo(
        name="m", version="1", labels=["x" * 200, "ok"], vocabulary=[str(i) for i in range(50_000)]
    )
    lines = repository_lines(pb.ListModelsResponse(models=[info]))
    assert lines[-2] == f"  labels:  2 classes: '{'x' * 24}'..., 'ok'"
    assert lines[-1].startswith("  vocabulary: 50000 tokens: '0', '1', ")
    assert lines[-1].endswith("'9', ... (49990 more)")


def test_a_refused_version_and_a_refused_serving_json_print_clearly() -> None:
    """A version refused prints as ``name/version``; a model refused for its serving.json has no
    version (none was tried) and prints as ``name (serving.json)``, never ``name/``."""
    version = "model tiny_gru/2: model.json is not valid JSON"
    model = "model tiny_lstm: models/tiny_lstm/serving.json: max_batch_size 0: input should be ..."
    repository = pb.ListModelsResponse(
        refused=[
            pb.RefusedModel(name="tiny_gru", version="2", reason=version),
            pb.RefusedModel(name="tiny_lstm", version="", reason=model),
        ]
    )
    assert repository_lines(repository) == [
        f"tiny_gru/2\tNOT SERVED: {version}",
        f"tiny_lstm (serving.json)\tNOT SERVED: {model}",
    ]


def test_rnnserve_models_prints_them(
    labelled_repository: Path,
    make_settings: Callable[..., Settings],
    capsys: pytest.CaptureFixture[str],
) -> None:
    with server_in_thread(make_settings(model_repository=labelled_repository)) as srv:
        assert main(["models", "--target", f"127.0.0.1:{srv.grpc_port}"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "  labels:  2 classes: 'up', 'down'" in printed


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"labels": ["a", "b", "c"]}, "labels names 3 classes but output_size is 2"),
        ({"labels": "up,down"}, "labels must be a list of strings"),
        ({"vocabulary": ["a", 1]}, "vocabulary must be a list of strings"),
    ],
)
def test_wrong_labels_or_vocabulary_refuse_the_model_in_one_line(
    tiny_repository: Path, tmp_path: Path, changes: dict[str, Any], problem: str
) -> None:
    directory = tmp_path / "tiny_lstm" / "1"
    shutil.copytree(tiny_repository / "tiny_lstm" / "1", directory)
    edit_model_json(directory, **changes)
    with pytest.raises(ModelContractError) as refused:
        read_spec(directory)
    message = str(refused.value)
    assert message.startswith("model tiny_lstm/1: ") and problem in message
    assert "\n" not in message
