"""Model control: versions load and unload while the server serves (a poll of the repository, or
KServe RepositoryModelLoad / RepositoryModelUnload, which tritonclient calls), a version policy
and per-model settings in ``<model>/serving.json``, and sessions that stay on their version until
they end, exactly, whatever happens to it meanwhile.

Real servers on port 0. Nothing waits by sleeping: a poll is triggered by calling it, the poll
timer's own test drives the timer (:class:`Ticks`), and what the server does by itself (a
release once a version's last session ends) is awaited with ``ModelControl.settled()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.errors import ModelContractError
from service.server import RnnServer
from service.settings import Settings
from tests.grpc_helpers import (
    channel,
    expect_code,
    infer_output,
    infer_request,
    kserve,
    native,
    output_of,
    serving,
    step_request,
)
from tests.models_for_tests import TINY_MODELS

ROOT = Path(__file__).resolve().parent.parent
LSTM, GRU = "tiny_lstm", "tiny_gru"


@pytest.fixture(scope="module")
def versions(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of the tiny models with a second version of tiny_lstm, other weights (seed
    7): every test copies the folders it needs from here."""
    from training.synthetic import export_random_model

    root = tmp_path_factory.mktemp("versions")
    shutil.copytree(tiny_repository, root, dirs_exist_ok=True)
    cell, inputs, hidden, outputs, layers = TINY_MODELS[LSTM]
    export_random_model(root, LSTM, cell=cell, input_size=inputs, hidden_size=hidden,
                        output_size=outputs, num_layers=layers, seed=7, version="2")  # fmt: skip
    return root


def repository(source: Path, tmp_path: Path, **models: list[str]) -> Path:
    """A repository in ``tmp_path`` holding ``models`` (name -> versions) copied from
    ``source``."""
    root = tmp_path / "models"
    for name, numbers in models.items():
        for version in numbers:
            add_version(source, root, name, version)
    return root


def add_version(source: Path, root: Path, name: str, version: str, as_version: str = "") -> None:
    """Copy ``source``'s version into ``root`` (as ``as_version``), in the way an operator
    should: into a temporary folder, then renamed into place (a poll never sees half a copy)."""
    target = root / name / (as_version or version)
    temporary = root / name / f".{target.name}.incoming"
    shutil.copytree(source / name / version, temporary)
    temporary.rename(target)


def write_serving(root: Path, name: str, config: Any) -> None:
    path = root / name / "serving.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))


def offline(root: Path, name: str, version: str, x: np.ndarray) -> np.ndarray:
    """The whole sequence through onnxruntime from zero state: what any chunking must give."""
    session = ort.InferenceSession(
        str(root / name / version / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    cell, _, hidden, _, layers = TINY_MODELS[name]
    feeds = {"x": x[None].astype(np.float32)}
    for state in ["h0", "c0"][: 2 if cell == "lstm" else 1]:
        feeds[state] = np.zeros((layers, 1, hidden), np.float32)
    y: np.ndarray = session.run(["y"], feeds)[0][0]
    return y


def inputs(seed: int, steps: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((steps, 3)).astype(np.float32)


class Ticks:
    """The poll's timer, driven by the test: each sleep the poll asks for waits until
    :meth:`tick` lets it end."""

    def __init__(self) -> None:
        self.asked: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()

    async def sleep(self, seconds: float) -> None:
        elapsed = asyncio.get_running_loop().create_future()
        await self.asked.put((seconds, elapsed))
        await elapsed

    async def tick(self) -> float:
        """End the poll's sleep, then wait until it sleeps again (its poll done); returns the
        interval it asked for."""
        seconds, elapsed = await self.asked.get()
        elapsed.set_result(None)
        _, following = await self.asked.get()
        await self.asked.put((seconds, following))  # the next tick ends that one
        return seconds


@contextlib.asynccontextmanager
async def serving_with(settings: Settings, ticks: Ticks) -> AsyncIterator[RnnServer]:
    """A started server whose poll sleeps on ``ticks``."""
    server = RnnServer(settings)
    server.engine.control.sleep = ticks.sleep
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def index_of(reply: kpb.RepositoryIndexResponse) -> dict[tuple[str, str], tuple[str, str]]:
    return {(m.name, m.version): (m.state, m.reason) for m in reply.models}


async def ready(stub: Any, name: str, version: str = "") -> bool:
    reply = await stub.ModelReady(kpb.ModelReadyRequest(name=name, version=version))
    return bool(reply.ready)


def control(**overrides: Any) -> dict[str, Any]:
    return {"model_poll_interval_s": 3600.0, **overrides}  # polls are triggered by the tests


# ----- new versions while serving ------------------------------------------------------------


async def test_a_new_version_is_served_after_a_poll_and_sessions_stay_on_theirs(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    root = repository(versions, tmp_path, tiny_lstm=["1"], tiny_gru=["1"])
    x = inputs(1, 9)
    settings = make_settings(model_repository=root, **control(model_control="poll"))
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        ks, ns = kserve(ch), native(ch)
        first = await ks.ModelInfer(infer_request(LSTM, 11, x[:4], start=True))
        await ns.CreateSession(pb.CreateSessionRequest(model=LSTM, session_id="n"))
        await ns.Step(step_request(LSTM, "n", x[:5]))
        assert not await ready(ks, LSTM, "2")

        add_version(versions, root, LSTM, "2")
        await srv.engine.control.poll_repository()

        assert await ready(ks, LSTM, "2") and await ready(ks, LSTM, "1")  # policy: all
        assert srv.engine.versions(LSTM) == ["1", "2"]
        # The sequence and the native session started on 1 go on there, naming no version.
        second = await ks.ModelInfer(infer_request(LSTM, 11, x[4:], end=True))
        assert (first.model_version, second.model_version) == ("1", "1")
        np.testing.assert_allclose(
            np.concatenate([infer_output(first), infer_output(second)]),
            offline(root, LSTM, "1", x),
            atol=1e-5,
        )
        rest = await ns.Step(step_request(LSTM, "n", x[5:]))
        assert rest.steps == 9
        # A new sequence goes to the newest version, and computes with its weights.
        fresh = await ks.ModelInfer(infer_request(LSTM, 12, x, start=True, end=True))
        assert fresh.model_version == "2"
        np.testing.assert_allclose(infer_output(fresh), offline(root, LSTM, "2", x), atol=1e-5)
        metadata = await ks.ModelMetadata(kpb.ModelMetadataRequest(name=LSTM))
        assert list(metadata.versions) == ["1", "2"]


async def test_a_poll_serves_a_new_model_and_releases_one_removed(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    root = repository(versions, tmp_path, tiny_lstm=["1"])
    settings = make_settings(model_repository=root, **control(model_control="poll"))
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        ks = kserve(ch)
        add_version(versions, root, GRU, "1")
        await srv.engine.control.poll_repository()
        assert await ready(ks, GRU)
        reply = await ks.ModelInfer(infer_request(GRU, 5, inputs(5, 3), start=True, end=True))
        assert reply.model_version == "1"
        shutil.rmtree(root / GRU)
        await srv.engine.control.poll_repository()
        assert srv.engine.registry.find(GRU, "1") is None and not await ready(ks, GRU)
        listed = await native(ch).ListModels(pb.ListModelsRequest())
        assert [m.name for m in listed.models] == [LSTM]


async def test_the_poll_timer_serves_a_new_version_by_itself(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    root = repository(versions, tmp_path, tiny_lstm=["1"])
    settings = make_settings(model_repository=root, model_control="poll", model_poll_interval_s=7)
    ticks = Ticks()
    async with serving_with(settings, ticks) as srv, channel(srv.grpc_port) as ch:
        assert await ticks.tick() == 7  # a poll with nothing new
        assert srv.engine.versions(LSTM) == ["1"]
        add_version(versions, root, LSTM, "2")
        assert srv.engine.versions(LSTM) == ["1"]  # nothing until the timer fires
        assert await ticks.tick() == 7
        assert srv.engine.versions(LSTM) == ["1", "2"]
        assert await ready(kserve(ch), LSTM, "2")
        health = health_pb2_grpc.HealthStub(ch)
        check = health_pb2.HealthCheckRequest(service=f"model/{LSTM}/2")
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING


# ----- removing a version: its live sessions go on, exactly, until they end -------------------


async def test_a_removed_version_serves_its_live_sessions_exactly_until_they_end(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    root = repository(versions, tmp_path, tiny_lstm=["1"])
    x = inputs(2, 12)
    settings = make_settings(model_repository=root, **control(model_control="poll"))
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        ks, ns = kserve(ch), native(ch)
        parts = [await ks.ModelInfer(infer_request(LSTM, 21, x[:3], start=True))]
        await ns.CreateSession(pb.CreateSessionRequest(model=LSTM, session_id="kept"))
        native_parts = [output_of(await ns.Step(step_request(LSTM, "kept", x[:6])))]

        add_version(versions, root, LSTM, "2")
        shutil.rmtree(root / LSTM / "1")  # version 1 leaves the repository
        await srv.engine.control.poll_repository()

        # New sessions on 1 are refused, saying why and where to go; 2 takes them.
        refused = pb.CreateSessionRequest(model=LSTM, version="1", session_id="new")
        details = await expect_code(grpc.StatusCode.FAILED_PRECONDITION, ns.CreateSession(refused))
        assert "tiny_lstm/1 takes no new sessions: its folder was removed from the repository" in (
            details
        )
        assert "open new ones on version 2" in details
        start_on_1 = infer_request(LSTM, 22, x[:2], start=True)
        start_on_1.model_version = "1"
        await expect_code(grpc.StatusCode.FAILED_PRECONDITION, ks.ModelInfer(start_on_1))
        assert not await ready(ks, LSTM, "1") and await ready(ks, LSTM, "2")
        index = index_of(await ks.RepositoryIndex(kpb.RepositoryIndexRequest()))
        state, reason = index[(LSTM, "1")]
        assert state == "UNLOADING" and "serving its 2 live session(s)" in reason
        assert index[(LSTM, "2")] == ("READY", "")

        # The live ones go on there, naming no version, to the last step.
        parts.append(await ks.ModelInfer(infer_request(LSTM, 21, x[3:8])))
        native_parts.append(output_of(await ns.Step(step_request(LSTM, "kept", x[6:]))))
        assert srv.engine.registry.find(LSTM, "1") is not None  # a session still lives
        parts.append(await ks.ModelInfer(infer_request(LSTM, 21, x[8:], end=True)))
        assert {p.model_version for p in parts} == {"1"}
        expected = offline(versions, LSTM, "1", x)
        np.testing.assert_allclose(np.concatenate([infer_output(p) for p in parts]), expected,
                                   atol=1e-5)  # fmt: skip
        np.testing.assert_allclose(np.concatenate(native_parts), expected, atol=1e-5)

        # Once the last one ends, the version is released: nothing of it is left.
        await ns.CloseSession(pb.CloseSessionRequest(model=LSTM, session_id="kept"))
        await srv.engine.control.settled()
        assert srv.engine.registry.find(LSTM, "1") is None
        gone = pb.GetSessionRequest(model=LSTM, version="1", session_id="kept")
        details = await expect_code(grpc.StatusCode.NOT_FOUND, ns.GetSession(gone))
        assert "has no version '1'" in details
        index = index_of(await ks.RepositoryIndex(kpb.RepositoryIndexRequest()))
        assert (LSTM, "1") not in index
        exposition = srv.metrics.registry.collect()
        ready_series = [
            s for f in exposition if f.name == "rnnserve_model_ready" for s in f.samples
        ]
        assert {s.labels["version"] for s in ready_series if s.labels["model"] == LSTM} == {"2"}


async def test_a_start_naming_a_version_restarts_the_id_on_the_whole_model(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """Regression: a START naming version 1 left the same id live on version 2, and the
    sequence's next requests (naming no version, as Triton clients send them) were computed on
    that stale copy: other weights, another history. A START restarts the id on the model."""
    root = repository(versions, tmp_path, tiny_lstm=["1", "2"])
    x = inputs(10, 6)
    async with serving(make_settings(model_repository=root)) as srv, channel(srv.grpc_port) as ch:
        ks, ns = kserve(ch), native(ch)
        await ks.ModelInfer(infer_request(LSTM, 7, x[:4], start=True))  # on 2, then abandoned
        on_1 = infer_request(LSTM, 7, x[:2], start=True)
        on_1.model_version = "1"
        parts = [await ks.ModelInfer(on_1)]
        assert srv.engine.model(LSTM, "2").store.find("7") is None
        parts.append(await ks.ModelInfer(infer_request(LSTM, 7, x[2:4])))
        parts.append(await ks.ModelInfer(infer_request(LSTM, 7, x[4:], end=True)))
        assert [p.model_version for p in parts] == ["1", "1", "1"]
        assert parts[-1].parameters["sequence_steps"].int64_param == 6
        np.testing.assert_allclose(np.concatenate([infer_output(p) for p in parts]),
                                   offline(root, LSTM, "1", x), atol=1e-5)  # fmt: skip

        # A START naming version 2 of an id live on 1 (restarted there) ends it on 1 likewise.
        on_1 = infer_request(LSTM, 8, x[:3], start=True)
        on_1.model_version = "1"
        await ks.ModelInfer(on_1)
        on_2 = infer_request(LSTM, 8, x[:3], start=True)
        on_2.model_version = "2"
        again = [await ks.ModelInfer(on_2), await ks.ModelInfer(infer_request(LSTM, 8, x[3:]))]
        assert [p.model_version for p in again] == ["2", "2"]
        assert srv.engine.model(LSTM, "1").store.find("8") is None
        np.testing.assert_allclose(np.concatenate([infer_output(p) for p in again]),
                                   offline(root, LSTM, "2", x), atol=1e-5)  # fmt: skip

        # Native sessions: ids are scoped to the model, so an id live on one version cannot be
        # opened on another (a request naming no version could reach either).
        await ns.CreateSession(pb.CreateSessionRequest(model=LSTM, version="1", session_id="n"))
        details = await expect_code(
            grpc.StatusCode.ALREADY_EXISTS,
            ns.CreateSession(pb.CreateSessionRequest(model=LSTM, session_id="n")),
        )
        assert f"session 'n' already exists, on version 1 of model '{LSTM}'" in details


async def test_a_start_naming_no_version_moves_a_sequence_off_a_retired_version(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """Triton clients reuse sequence ids: a START for an id that lives on a retired version
    begins it on the newest and ends it there, so the retired version is released."""
    root = repository(versions, tmp_path, tiny_lstm=["1"])
    x = inputs(3, 4)
    settings = make_settings(model_repository=root, **control(model_control="poll"))
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        ks = kserve(ch)
        await ks.ModelInfer(infer_request(LSTM, 31, x, start=True))
        add_version(versions, root, LSTM, "2")
        shutil.rmtree(root / LSTM / "1")
        await srv.engine.control.poll_repository()
        assert srv.engine.registry.find(LSTM, "1") is not None
        again = await ks.ModelInfer(infer_request(LSTM, 31, x, start=True))
        assert again.model_version == "2" and again.parameters["sequence_steps"].int64_param == 4
        await srv.engine.control.settled()
        assert srv.engine.registry.find(LSTM, "1") is None


# ----- version policy ----------------------------------------------------------------------


async def test_the_version_policy_chooses_the_versions_served(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    root = repository(versions, tmp_path, tiny_gru=["1"])
    for number in ("2", "3"):
        add_version(versions, root, GRU, "1", as_version=number)
    write_serving(root, GRU, {"version_policy": {"latest": 2}})
    settings = make_settings(model_repository=root, **control(model_control="poll"))
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        ks = kserve(ch)
        assert srv.engine.versions(GRU) == ["2", "3"]
        index = index_of(await ks.RepositoryIndex(kpb.RepositoryIndexRequest()))
        assert index[(GRU, "1")] == (
            "UNAVAILABLE", "not loaded: outside the version policy (latest 2) of its serving.json"
        )  # fmt: skip
        ready_only = index_of(await ks.RepositoryIndex(kpb.RepositoryIndexRequest(ready=True)))
        assert set(ready_only) == {(GRU, "2"), (GRU, "3")}

        # Triton's own form of the policy, changed while serving: 2 goes (it had no session).
        write_serving(root, GRU, {"version_policy": {"specific": {"versions": [1, 3]}}})
        await srv.engine.control.poll_repository()
        assert srv.engine.versions(GRU) == ["1", "3"]
        assert srv.engine.registry.find(GRU, "2") is None  # released at once: no session

        write_serving(root, GRU, {"version_policy": "all"})
        await srv.engine.control.poll_repository()
        assert srv.engine.versions(GRU) == ["1", "2", "3"]


async def test_a_refused_new_version_never_takes_the_old_one_down(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings], caplog: Any
) -> None:
    root = repository(versions, tmp_path, tiny_lstm=["1"])
    write_serving(root, LSTM, {"version_policy": {"latest": 1}})
    settings = make_settings(model_repository=root, **control(model_control="poll"))
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        ks = kserve(ch)
        broken = root / LSTM / "2"
        shutil.copytree(versions / LSTM / "2", broken)
        (broken / "model.json").write_text("{not json")
        with caplog.at_level(logging.ERROR, logger="service"):
            await srv.engine.control.poll_repository()
            await srv.engine.control.poll_repository()  # unchanged: not tried, not logged again
        lines = [r.getMessage() for r in caplog.records if "not serving" in r.getMessage()]
        assert len(lines) == 1 and "tiny_lstm/2" in lines[0] and "not valid JSON" in lines[0]
        assert srv.engine.versions(LSTM) == ["1"] and await ready(ks, LSTM, "1")
        assert not await ready(ks, LSTM, "2")
        state, reason = index_of(await ks.RepositoryIndex(kpb.RepositoryIndexRequest()))[
            (LSTM, "2")
        ]
        assert state == "UNAVAILABLE" and "not valid JSON" in reason
        listed = await native(ch).ListModels(pb.ListModelsRequest())
        assert [(r.name, r.version) for r in listed.refused] == [(LSTM, "2")]

        # Fixed: the next poll serves it, and the policy (latest 1) then retires 1.
        shutil.copy(versions / LSTM / "2" / "model.json", broken / "model.json")
        await srv.engine.control.poll_repository()
        assert srv.engine.versions(LSTM) == ["2"]
        assert srv.engine.registry.find(LSTM, "1") is None
        assert not (await native(ch).ListModels(pb.ListModelsRequest())).refused


# ----- per-model settings ------------------------------------------------------------------


async def test_per_model_settings_take_effect_where_they_are_used(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    root = repository(versions, tmp_path, tiny_lstm=["1"], tiny_gru=["1"])
    own = {"max_batch_size": 2, "max_chunk_steps": 4, "intra_op_threads": 2,
           "inter_op_threads": 1, "max_sessions": 50, "execution_provider": "cpu",
           "max_queue_delay_s": 0.05}  # fmt: skip
    write_serving(root, LSTM, own)
    async with (
        serving(make_settings(model_repository=root, max_chunk_steps=64)) as srv,
        channel(srv.grpc_port) as ch,
    ):
        ks, ns = kserve(ch), native(ch)
        lstm, gru = srv.engine.model(LSTM), srv.engine.model(GRU)
        assert lstm.batcher.max_batch_size == 2 and gru.batcher.max_batch_size == 128
        assert lstm.store.max_sessions == 50 and gru.store.max_sessions == 10_000
        options = lstm.runtime.session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
        assert gru.runtime.session.get_session_options().intra_op_num_threads == 1
        config = await ks.ModelConfig(kpb.ModelConfigRequest(name=LSTM))
        assert config.config.max_batch_size == 2
        assert config.config.sequence_batching.oldest.max_candidate_sequences == 50

        # max_chunk_steps: 4 on tiny_lstm, the server's 64 on tiny_gru.
        x = inputs(4, 5)
        details = await expect_code(
            grpc.StatusCode.INVALID_ARGUMENT, ks.ModelInfer(infer_request(LSTM, 41, x, start=True))
        )
        assert "chunk of 5 steps exceeds the limit of 4" in details
        await ks.ModelInfer(infer_request(GRU, 41, x, start=True))

        # max_batch_size 2: six sessions' chunks, sent at once, run in batches of at most 2.
        for i in range(6):
            await ns.CreateSession(pb.CreateSessionRequest(model=LSTM, session_id=f"s{i}"))
        replies = await asyncio.gather(
            *(ns.Step(step_request(LSTM, f"s{i}", x[:2])) for i in range(6))
        )
        assert [r.steps for r in replies] == [2] * 6
        sample = srv.metrics.registry.get_sample_value
        labels = {"model": LSTM, "version": "1"}
        batches = sample("rnnserve_batch_size_count", labels)
        assert batches is not None and batches >= 3
        assert sample("rnnserve_batch_size_bucket", {**labels, "le": "2.0"}) == batches
        assert sample("rnnserve_batch_size_sum", labels) == 6


def test_a_model_of_its_own_max_batch_size_pads_no_batch_beyond_it() -> None:
    server = Settings(max_batch_size=128, batch_buckets="1,8,32,128")
    assert server.for_model({}) is server
    assert server.for_model({"max_batch_size": 16}).resolved_batch_buckets(True) == (1, 8, 16)
    assert server.for_model({"max_batch_size": 8}).resolved_batch_buckets(True) == (1, 8)
    assert Settings().for_model({"max_batch_size": 6}).resolved_batch_buckets(True) == (1, 2, 4, 6)


# ----- serving.json that is wrong ----------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{", "is not valid JSON"),
        ({"max_batch_size": 0}, "max_batch_size 0: input should be greater than or equal to 1"),
        ({"max_batch_sise": 4}, "unknown key 'max_batch_sise'"),
        ({"execution_provider": "gpu"}, "execution_provider 'gpu'"),
        ({"version_policy": {"latest": 0}}, "latest needs a whole number of versions above 0"),
        ({"version_policy": "newest"}, 'version_policy must be "all"'),
        # json.loads reads Infinity: a timer that never fires would hang the model's chunks.
        ('{"max_queue_delay_s": Infinity}', "max_queue_delay_s inf: input should be a finite"),
        ('{"max_queue_delay_s": NaN}', "max_queue_delay_s nan: input should be a finite"),
        ({"max_queue_delay_s": 5}, "input should be less than or equal to 1"),
        ({"intra_op_threads": 100000}, "intra_op_threads 100000: input should be less than"),
    ],
)
async def test_a_bad_serving_json_refuses_its_model_in_one_line_and_others_serve(
    versions: Path,
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    caplog: Any,
    content: Any,
    problem: str,
) -> None:
    root = repository(versions, tmp_path, tiny_lstm=["1"], tiny_gru=["1"])
    write_serving(root, LSTM, content)
    with caplog.at_level(logging.ERROR, logger="service"):
        async with (
            serving(make_settings(model_repository=root)) as srv,
            channel(srv.grpc_port) as ch,
        ):
            ks = kserve(ch)
            assert srv.engine.versions(GRU) == ["1"] and srv.engine.versions(LSTM) == []
            assert await ready(ks, GRU) and not await ready(ks, LSTM)
            listed = await native(ch).ListModels(pb.ListModelsRequest())
            assert [(r.name, r.version) for r in listed.refused] == [(LSTM, "")]
            assert problem in listed.refused[0].reason
            index = index_of(await ks.RepositoryIndex(kpb.RepositoryIndexRequest()))
            assert index[(LSTM, "")][0] == "UNAVAILABLE"
            await ks.ModelInfer(infer_request(GRU, 1, inputs(5, 2), start=True, end=True))
    lines = [r.getMessage() for r in caplog.records if "not serving" in r.getMessage()]
    assert len(lines) == 1 and "serving.json" in lines[0] and problem in lines[0]
    assert "\n" not in lines[0]
    check = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service.cli", "check", str(root)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert check.returncode == 1
    fails = [line for line in check.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and "serving.json" in fails[0] and problem in fails[0]
    assert "ok   tiny_gru/1" in check.stdout


async def test_a_serving_json_broken_while_serving_keeps_what_serves(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings], caplog: Any
) -> None:
    root = repository(versions, tmp_path, tiny_lstm=["1"])
    settings = make_settings(model_repository=root, **control(model_control="poll"))
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        write_serving(root, LSTM, {"version_policy": {"latest": "two"}})
        add_version(versions, root, LSTM, "2")
        with caplog.at_level(logging.ERROR, logger="service"):
            await srv.engine.control.poll_repository()
            await srv.engine.control.poll_repository()
        lines = [r.getMessage() for r in caplog.records if "not serving" in r.getMessage()]
        assert len(lines) == 1 and "serving.json" in lines[0]
        assert srv.engine.versions(LSTM) == ["1"]  # nothing changes until it reads again
        assert await ready(kserve(ch), LSTM, "1")
        write_serving(root, LSTM, {"version_policy": {"latest": 2}})
        await srv.engine.control.poll_repository()
        assert srv.engine.versions(LSTM) == ["1", "2"]
        assert not (await native(ch).ListModels(pb.ListModelsRequest())).refused


# ----- explicit control: KServe RepositoryModelLoad / Unload --------------------------------


async def test_unload_keeps_live_sessions_and_load_serves_the_version_again(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    root = repository(versions, tmp_path, tiny_lstm=["1"], tiny_gru=["1"])
    x = inputs(6, 8)
    settings = make_settings(model_repository=root, model_control="explicit")
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        ks = kserve(ch)
        parts = [await ks.ModelInfer(infer_request(LSTM, 61, x[:3], start=True))]
        add_version(versions, root, LSTM, "2")  # explicit: nothing happens until a load
        assert srv.engine.versions(LSTM) == ["1"]

        await ks.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=LSTM))
        assert srv.engine.versions(LSTM) == [] and not await ready(ks, LSTM)
        details = await expect_code(
            grpc.StatusCode.FAILED_PRECONDITION,
            ks.ModelInfer(infer_request(LSTM, 62, x, start=True)),
        )
        assert "takes no new sessions: it was unloaded (RepositoryModelUnload)" in details
        parts.append(await ks.ModelInfer(infer_request(LSTM, 61, x[3:6])))  # goes on

        await ks.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=LSTM))
        assert srv.engine.versions(LSTM) == ["1", "2"]  # 1 serves again, 2 is new
        parts.append(await ks.ModelInfer(infer_request(LSTM, 61, x[6:], end=True)))
        assert {p.model_version for p in parts} == {"1"}
        np.testing.assert_allclose(
            np.concatenate([infer_output(p) for p in parts]), offline(root, LSTM, "1", x),
            atol=1e-5,
        )  # fmt: skip

        details = await expect_code(
            grpc.StatusCode.NOT_FOUND,
            ks.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="nope")),
        )
        assert "'nope' is not in the model repository" in details
        for name in ("nope", "..", "../models/tiny_gru"):
            unload = kpb.RepositoryModelUnloadRequest(model_name=name)
            await expect_code(grpc.StatusCode.NOT_FOUND, ks.RepositoryModelUnload(unload))


TRITON_CONTROL = """
import json, sys
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
client = grpcclient.InferenceServerClient(url=sys.argv[1])
out = []
for action, *args in json.loads(sys.argv[2]):
    try:
        if action == "index":
            value = client.get_model_repository_index(as_json=True).get("models", [])
        elif action == "load":
            value = client.load_model(*args)
        elif action == "load_config":
            value = client.load_model(args[0], config="{}")
        elif action == "unload":
            value = client.unload_model(*args)
        elif action == "ready":
            value = client.is_model_ready(*args)
        out.append({"ok": value})
    except InferenceServerException as error:
        out.append({"error": error.message(), "status": error.status()})
print(json.dumps(out))
client.close()
"""


async def tritonclient(server: RnnServer, *actions: list[str]) -> list[dict[str, Any]]:
    """Run ``actions`` with the unmodified tritonclient (in a subprocess: its ``inference``
    protobuf package cannot share a process with the server's)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", TRITON_CONTROL, f"127.0.0.1:{server.grpc_port}",
        json.dumps(actions), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, stderr.decode()
    results: list[dict[str, Any]] = json.loads(stdout)
    return results


def entries(index: list[dict[str, str]]) -> dict[tuple[str, str], tuple[str, str]]:
    return {
        (e["name"], e.get("version", "")): (e.get("state", ""), e.get("reason", "")) for e in index
    }


async def test_tritonclient_loads_unloads_and_reads_the_index(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    root = repository(versions, tmp_path, tiny_lstm=["1"], tiny_gru=["1"])
    settings = make_settings(model_repository=root, model_control="explicit")
    async with serving(settings) as srv:
        add_version(versions, root, LSTM, "2")
        before, loaded, ready_2, after, unloaded, gru_ready, gru_index, config, unknown = (
            await tritonclient(
                srv, ["index"], ["load", LSTM], ["ready", LSTM, "2"], ["index"],
                ["unload", GRU], ["ready", GRU], ["index"], ["load_config", LSTM], ["load", "nope"],
            )
        )  # fmt: skip
        assert entries(before["ok"]) == {
            (LSTM, "1"): ("READY", ""),
            (LSTM, "2"): ("UNAVAILABLE", "not loaded; RepositoryModelLoad loads it"),
            (GRU, "1"): ("READY", ""),
        }
        assert loaded == {"ok": None} and ready_2 == {"ok": True}
        assert entries(after["ok"])[(LSTM, "2")] == ("READY", "")
        assert unloaded == {"ok": None} and gru_ready == {"ok": False}
        assert entries(gru_index["ok"])[(GRU, "1")] == (
            "UNAVAILABLE", "unloaded (RepositoryModelUnload)"
        )  # fmt: skip
        assert srv.engine.registry.find(GRU, "1") is None  # no session: released at once
        assert "parameter 'config' is not supported" in config["error"]
        assert config["status"] == "StatusCode.INVALID_ARGUMENT"
        assert unknown["status"] == "StatusCode.NOT_FOUND"
        (reloaded,) = await tritonclient(srv, ["load", GRU])
        assert reloaded == {"ok": None} and srv.engine.versions(GRU) == ["1"]


@pytest.mark.parametrize("mode", ["none", "poll"])
async def test_without_explicit_control_load_and_unload_answer_as_triton(
    mode: str, make_settings: Callable[..., Settings], tiny_repository: Path
) -> None:
    async with serving(make_settings(**control(model_control=mode))) as srv:
        load, unload, index = await tritonclient(srv, ["load", LSTM], ["unload", LSTM], ["index"])
        for answer in (load, unload):
            assert answer["status"] == "StatusCode.UNAVAILABLE"
            assert answer["error"].startswith("explicit model load / unload is not allowed")
        assert mode == "none" or "if polling is enabled" in load["error"]
        assert entries(index["ok"])[(LSTM, "1")] == ("READY", "")
        assert srv.engine.versions(LSTM) == ["1"]
        # A client's mistake, not a fault of the server: counted as FAILED_PRECONDITION, never
        # as UNAVAILABLE (which pages: RnnserveServerErrors).
        sample = srv.metrics.registry.get_sample_value
        labels = {"api": "kserve", "model": LSTM}
        assert sample("rnnserve_failures_total", {**labels, "code": "FAILED_PRECONDITION"}) == 2
        assert sample("rnnserve_failures_total", {**labels, "code": "UNAVAILABLE"}) is None


async def test_a_version_policy_selecting_no_version_refuses_its_model_in_one_line(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings], caplog: Any
) -> None:
    """Regression: the model was dropped without a word, and a server of that model alone
    failed to start with an empty message."""
    root = repository(versions, tmp_path, tiny_lstm=["1"])
    write_serving(root, LSTM, {"version_policy": {"specific": ["2"]}})
    problem = "the version policy (versions 2) of"
    with pytest.raises(ModelContractError, match=r"selects none of its versions \(1\)"):
        async with serving(make_settings(model_repository=root)):
            pass
    add_version(versions, root, GRU, "1")
    settings = make_settings(model_repository=root, **control(model_control="poll"))
    with caplog.at_level(logging.ERROR, logger="service"):
        async with serving(settings) as srv, channel(srv.grpc_port) as ch:
            assert srv.engine.versions(GRU) == ["1"] and srv.engine.versions(LSTM) == []
            listed = await native(ch).ListModels(pb.ListModelsRequest())
            assert [(r.name, r.version) for r in listed.refused] == [(LSTM, "")]
            assert problem in listed.refused[0].reason
            # While serving: the versions loaded serve on until the policy selects one.
            write_serving(root, LSTM, "{}")
            await srv.engine.control.poll_repository()
            assert srv.engine.versions(LSTM) == ["1"]
            write_serving(root, LSTM, {"version_policy": {"specific": ["3"]}})
            await srv.engine.control.poll_repository()
            await srv.engine.control.poll_repository()
            assert srv.engine.versions(LSTM) == ["1"]
    lines = [r.getMessage() for r in caplog.records if "not serving" in r.getMessage()]
    assert [line.split(" of ")[0] for line in lines] == [
        f"not serving: model {LSTM}: the version policy (versions 2)",
        f"not serving: model {LSTM}: the version policy (versions 3)",
    ]
    assert all("selects none of its versions (1)" in line for line in lines)
    settings = make_settings(model_repository=root, model_control="explicit")
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:  # a load says why
        load = kpb.RepositoryModelLoadRequest(model_name=LSTM)
        details = await expect_code(
            grpc.StatusCode.FAILED_PRECONDITION, kserve(ch).RepositoryModelLoad(load)
        )
        assert f"failed to load '{LSTM}': model {LSTM}: the version policy (versions 3)" in details


@pytest.mark.parametrize(
    ("setting", "value", "problem"),
    [
        ("max_queue_delay_s", "inf", "finite number"),
        ("max_queue_delay_s", "nan", "finite number"),
        ("max_queue_delay_s", "2", "less than or equal to 1"),
        ("drain_timeout_s", "Infinity", "finite number"),
        ("ttl_check_interval_s", "inf", "finite number"),
        ("snapshot_when_idle_s", "inf", "finite number"),
        ("session_ttl_s", "inf", "finite number"),
        ("model_poll_interval_s", "inf", "finite number"),
        ("max_message_bytes", str(2**31), "less than or equal to 2147483647"),
    ],
)
def test_server_settings_are_finite_and_bounded(setting: str, value: str, problem: str) -> None:
    """The flags and environment variables have the same holes as serving.json had: an
    infinite batching delay, drain or timer interval hangs what waits for it."""
    with pytest.raises(ValidationError, match=problem):
        Settings(**{setting: value})


# ----- a version that comes back gets its sessions back from its snapshot -------------------


async def test_a_version_that_comes_back_restores_its_sessions_from_the_snapshot(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    root = repository(versions, tmp_path, tiny_lstm=["1", "2"])
    x = inputs(8, 10)
    durable = {"snapshot_backend": "directory", "snapshot_dir": tmp_path / "snapshots"}
    settings = make_settings(model_repository=root, **durable, **control(model_control="poll"))
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        ns = native(ch)
        created = pb.CreateSessionRequest(model=LSTM, version="1", session_id="back")
        await ns.CreateSession(created)
        first = output_of(await ns.Step(step_request(LSTM, "back", x[:6])))
    # While the server is down, version 1 leaves the repository; it starts without it.
    shutil.move(root / LSTM / "1", tmp_path / "aside")
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        ns = native(ch)
        assert srv.engine.versions(LSTM) == ["2"]
        await expect_code(grpc.StatusCode.NOT_FOUND, ns.Step(step_request(LSTM, "back", x[6:])))
        shutil.move(tmp_path / "aside", root / LSTM / "1")
        await srv.engine.control.poll_repository()
        assert srv.engine.versions(LSTM) == ["1", "2"]
        rest = await ns.Step(step_request(LSTM, "back", x[6:]))
        assert rest.steps == 10
        found = srv.engine.registry.holding(LSTM, "back", "")
        assert found is not None and found[0].spec.version == "1"
        np.testing.assert_allclose(np.concatenate([first, output_of(rest)]),
                                   offline(root, LSTM, "1", x), atol=1e-5)  # fmt: skip


async def test_a_released_version_brings_back_none_of_its_ended_sessions(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """A version released after its sessions ended clears its snapshot: loaded again, it has
    none of them (an older snapshot would bring back sessions that were closed)."""
    root = repository(versions, tmp_path, tiny_lstm=["1", "2"])
    durable = {"snapshot_backend": "directory", "snapshot_dir": tmp_path / "snapshots"}
    settings = make_settings(model_repository=root, **durable, model_control="explicit")
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        ns, ks = native(ch), kserve(ch)
        await ns.CreateSession(pb.CreateSessionRequest(model=LSTM, version="1", session_id="s"))
        await ns.Step(step_request(LSTM, "s", inputs(9, 3)))
        assert await srv.engine.durability.snapshot(force=True) == 1  # type: ignore[union-attr]
        await ks.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=LSTM))
        await ns.CloseSession(pb.CloseSessionRequest(model=LSTM, session_id="s"))
        await srv.engine.control.settled()
        assert srv.engine.registry.find(LSTM, "1") is None
        await ks.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=LSTM))
        assert len(srv.engine.model(LSTM, "1").store) == 0


def test_rnnserve_check_fails_a_policy_that_selects_no_version(
    versions: Path, tmp_path: Path
) -> None:
    root = repository(versions, tmp_path, tiny_lstm=["1"], tiny_gru=["1"])
    write_serving(root, LSTM, {"version_policy": {"specific": ["7"]}})
    check = subprocess.run(
        [sys.executable, "-m", "service.cli", "check", str(root)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert check.returncode == 1
    fails = [line for line in check.stdout.splitlines() if line.startswith("FAIL")]
    assert fails == [
        f"FAIL model {LSTM}: its version_policy (versions 7) selects none of its versions (1); "
        "fix serving.json or add the version"
    ]
    assert "ok   tiny_gru/1" in check.stdout
