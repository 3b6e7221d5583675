"""A model is served exactly or refused at load with one line, and one bad model never stops the
others (issue #17, its dangerous cases): graphs that declare their tensors in another order are
bound by name; a time-major graph and a graph with a fixed time axis are refused by behaviour."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.errors import ModelContractError
from service.model_check import open_model
from service.settings import Settings
from tests.grpc_helpers import (
    channel,
    infer_output,
    infer_request,
    kserve,
    native,
    output_of,
    serving,
    step_request,
)
from tests.models_for_tests import OfflineReference

MODEL = "tiny_lstm"  # inputs x, h0, c0; outputs y, hn, cn


def edited_copy(repository: Path, root: Path, name: str, edit: Any) -> Path:
    """``MODEL`` copied to ``root/name/1`` with its graph changed by ``edit(graph)``; model.json
    keeps its declared names (and drops the sha256 of the old file)."""
    target = root / name / "1"
    shutil.copytree(repository / MODEL / "1", target)
    model = onnx.load(str(target / "model.onnx"))
    edit(model.graph)
    onnx.save(model, str(target / "model.onnx"))
    meta = json.loads((target / "model.json").read_text())
    meta.pop("sha256", None)
    (target / "model.json").write_text(json.dumps(meta))
    return target


def reorder(entries: Any, order: list[str]) -> None:
    by_name = {e.name: e for e in entries}
    kept = [by_name[n] for n in order]
    copies = [type(e)() for e in kept]
    for copy, entry in zip(copies, kept, strict=True):
        copy.CopyFrom(entry)
    del entries[:]
    entries.extend(copies)


def inputs_reordered(graph: Any) -> None:
    reorder(graph.input, ["x", "c0", "h0"])


def outputs_reordered(graph: Any) -> None:
    reorder(graph.output, ["hn", "cn", "y"])


def time_major(graph: Any) -> None:
    """The graph takes x as [time, batch, features] (transposed in the graph): names unchanged."""
    for node in graph.node:
        node.input[:] = ["x_batch_major" if n == "x" else n for n in node.input]
    graph.node.insert(
        0, onnx.helper.make_node("Transpose", ["x"], ["x_batch_major"], perm=[1, 0, 2])
    )


def fixed_time_axis(graph: Any) -> None:
    """x's time axis fixed to 3 steps in the declared shape (what a dynamo export may do)."""
    x = next(i for i in graph.input if i.name == "x")
    x.type.tensor_type.shape.dim[1].ClearField("dim_param")
    x.type.tensor_type.shape.dim[1].dim_value = 3


def settings_for(repository: Path) -> Settings:
    return Settings(model_repository=repository, intra_op_threads=1, snapshot_backend="none")


@pytest.mark.parametrize("edit", [inputs_reordered, outputs_reordered])
async def test_tensors_declared_in_another_order_are_bound_by_name_and_served_exactly(
    edit: Any, tiny_repository: Path, tmp_path: Path, make_settings: Any
) -> None:
    edited_copy(tiny_repository, tmp_path / "models", "reordered", edit)
    x = np.random.default_rng(3).standard_normal((9, 3)).astype(np.float32)
    reference = OfflineReference(tiny_repository, MODEL)(x)
    settings = make_settings(model_repository=tmp_path / "models")
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = native(ch)
        await stub.CreateSession(pb.CreateSessionRequest(model="reordered", session_id="s"))
        outputs = [
            output_of(await stub.Step(step_request("reordered", "s", x[a:b])))
            for a, b in ((0, 1), (1, 5), (5, 9))
        ]
    np.testing.assert_allclose(np.concatenate(outputs), reference, atol=1e-5)


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (time_major, "does not stream exactly"),
        (fixed_time_axis, "fixed to 3 in the graph, must be dynamic"),
    ],
)
def test_graphs_that_cannot_stream_exactly_are_refused_in_one_line(
    edit: Any, phrase: str, tiny_repository: Path, tmp_path: Path
) -> None:
    version = edited_copy(tiny_repository, tmp_path / "models", "bad", edit)
    with pytest.raises(ModelContractError, match=phrase) as refused:
        open_model(version, settings_for(tmp_path / "models"))
    assert "\n" not in str(refused.value) and "model bad/1" in str(refused.value)


async def test_one_bad_model_is_refused_and_the_others_serve(
    tiny_repository: Path, tmp_path: Path, make_settings: Any
) -> None:
    repository = tmp_path / "models"
    shutil.copytree(tiny_repository, repository)
    edited_copy(tiny_repository, repository, "broken", time_major)
    settings = make_settings(model_repository=repository)
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        listed = await native(ch).ListModels(pb.ListModelsRequest())
        assert sorted(m.name for m in listed.models) == ["tiny_gru", "tiny_lstm"]
        (refused,) = listed.refused
        assert (refused.name, refused.version) == ("broken", "1")
        assert "does not stream exactly" in refused.reason
        ready = await kserve(ch).ModelReady(kpb.ModelReadyRequest(name="broken"))
        assert not ready.ready
        health = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="model/broken/1")
        )
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert (
            srv.metrics.registry.get_sample_value(
                "rnnserve_model_ready", {"model": "broken", "version": "1"}
            )
            == 0.0
        )
        await native(ch).CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="s"))
        reply = await native(ch).Step(step_request(MODEL, "s", np.ones((1, 3), np.float32)))
        assert reply.steps == 1  # the good models serve


def rnnserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_rnnserve_check_names_each_failing_model_and_exits_1(
    tiny_repository: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "models"
    shutil.copytree(tiny_repository, repository)
    edited_copy(tiny_repository, repository, "broken", time_major)
    result = rnnserve("check", str(repository))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["FAIL", "ok", "ok"]
    assert lines[0].startswith("FAIL model broken/1 does not stream exactly")
    assert lines[-1] == "2 of 3 model(s) pass" and "Traceback" not in result.stderr
    one = rnnserve("check", str(repository / MODEL / "1"))
    assert one.returncode == 0 and one.stdout.strip().endswith("1 of 1 model(s) pass")


def test_rnnserve_check_passes_the_bundled_models() -> None:
    result = rnnserve("check", str(Path(__file__).resolve().parent.parent / "models"))
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip().endswith("7 of 7 model(s) pass")


async def test_a_session_stays_on_the_version_it_started_on(
    tiny_repository: Path, tmp_path: Path, make_settings: Any
) -> None:
    """Requests that name no version go to the newest, except for a session that lives on an
    older one (Triton sequences included): it goes on there, exactly, instead of being unknown."""
    repository = tmp_path / "models"
    shutil.copytree(tiny_repository, repository)
    shutil.copytree(repository / MODEL / "1", repository / MODEL / "2")  # a newer version
    x = np.random.default_rng(4).standard_normal((6, 3)).astype(np.float32)
    reference = OfflineReference(tiny_repository, MODEL)(x)
    async with (
        serving(make_settings(model_repository=repository)) as srv,
        channel(srv.grpc_port) as ch,
    ):
        stub = kserve(ch)
        first = infer_request(MODEL, 31, x[:3], start=True)
        first.model_version = "1"
        started = await stub.ModelInfer(first)
        assert started.model_version == "1"
        going_on = await stub.ModelInfer(infer_request(MODEL, 31, x[3:], end=True))  # no version
        assert going_on.model_version == "1"
        outputs = [infer_output(started), infer_output(going_on)]
        await native(ch).CreateSession(
            pb.CreateSessionRequest(model=MODEL, version="1", session_id="n")
        )
        reply = await native(ch).Step(step_request(MODEL, "n", x[:2]))  # no version
        assert reply.steps == 2
        assert srv.engine.model(MODEL).spec.version == "2"  # the newest is 2 all along
    np.testing.assert_allclose(np.concatenate(outputs), reference, atol=1e-5)
