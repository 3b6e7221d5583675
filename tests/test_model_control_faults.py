"""Model control when things go wrong: a control call whose client goes away part-way, files
that cannot be read, a load that fails in an unexpected way, a shutdown while a version loads, a
version that comes back while its ids live elsewhere, and a released version's memory.

Real servers on port 0; the faults are made deterministic with events (a load held in its
thread, the snapshots' lock held), never with sleeps.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import shutil
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import onnx
import pytest

import service.model_loading
from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.errors import Unavailable
from service.runtime import ProviderUnavailable
from service.server import RnnServer
from service.settings import Settings
from tests.grpc_helpers import (
    channel,
    expect_code,
    hold_batches,
    infer_output,
    infer_request,
    kserve,
    native,
    output_of,
    serving,
    step_request,
)
from tests.test_model_control import (
    GRU,
    LSTM,
    add_version,
    control,
    index_of,
    inputs,
    offline,
    ready,
    repository,
    versions,
)

__all__ = ["versions"]  # the fixture, shared with test_model_control

REAL_OPEN_MODEL = service.model_loading.open_model


def failing_load(
    monkeypatch: pytest.MonkeyPatch, label: str, error: BaseException
) -> Callable[[], None]:
    """Make the load of version ``label`` raise ``error`` (as it would in its worker thread);
    returns what undoes it (the operator's fix)."""
    failing = {"on": True}

    def open_model(directory: Path, *args: Any, **kwargs: Any) -> Any:
        if failing["on"] and f"{directory.parent.name}/{directory.name}" == label:
            raise error
        return REAL_OPEN_MODEL(directory, *args, **kwargs)

    monkeypatch.setattr(service.model_loading, "open_model", open_model)
    return lambda: failing.update(on=False)


def held_load(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Hold every load in its thread until ``go_on`` is set; ``loading`` is set once one is."""
    loading, go_on = threading.Event(), threading.Event()

    def open_model(directory: Path, *args: Any, **kwargs: Any) -> Any:
        loading.set()
        go_on.wait()
        return REAL_OPEN_MODEL(directory, *args, **kwargs)

    monkeypatch.setattr(service.model_loading, "open_model", open_model)
    return loading, go_on


def refusal_lines(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not serving" in r.getMessage()]


# ----- a control call whose caller goes away ------------------------------------------------


async def test_an_unload_whose_caller_goes_away_still_releases_the_version_completely(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """Regression: an unload cancelled part-way (its client's deadline, a disconnect) forgot the
    version but never cleared its snapshot nor closed its batcher: a later load brought back a
    session that had been closed, and at shutdown the leaked batcher marked the version loaded
    again not ready."""
    root = repository(versions, tmp_path, tiny_lstm=["1"], tiny_gru=["1"])
    durable = {"snapshot_backend": "directory", "snapshot_dir": tmp_path / "snapshots"}
    settings = make_settings(model_repository=root, model_control="explicit", **durable)
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        ns, ks = native(ch), kserve(ch)
        await ns.CreateSession(pb.CreateSessionRequest(model=LSTM, session_id="s"))
        await ns.Step(step_request(LSTM, "s", inputs(1, 3)))
        durability = srv.engine.durability
        assert durability is not None and await durability.snapshot(force=True) == 1
        await ns.CloseSession(pb.CloseSessionRequest(model=LSTM, session_id="s"))
        loop_task = srv.engine.model(LSTM, "1").batcher._task

        forgetting = asyncio.Event()
        forget = durability.forget

        async def entered_forget(model: Any) -> None:
            forgetting.set()
            await forget(model)

        durability.forget = entered_forget  # type: ignore[method-assign]
        async with durability._lock:  # a snapshot is being written (a slow disk, Redis)
            unload = asyncio.create_task(srv.engine.control.unload_model(LSTM))
            await forgetting.wait()  # the release waits for the snapshots' turn
            unload.cancel()  # what gRPC does to the handler when its client goes away
            with pytest.raises(asyncio.CancelledError):
                await unload
        await srv.engine.control.settled()

        assert srv.engine.registry.find(LSTM, "1") is None and loop_task.done()
        await ks.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=LSTM))
        assert len(srv.engine.model(LSTM, "1").store) == 0  # the closed session stays closed
        await expect_code(
            grpc.StatusCode.NOT_FOUND,
            ns.GetSession(pb.GetSessionRequest(model=LSTM, session_id="s")),
        )
        # A batcher that is not the one of the version served now never marks it not ready.
        failed: list[Any] = []
        srv.engine.model_failed = failed.append
        stale = SimpleNamespace(spec=srv.engine.model(LSTM, "1").spec)
        srv.engine._batcher_failed(stale)  # type: ignore[arg-type]
        assert failed == [] and await ready(ks, LSTM, "1")
        sample = srv.metrics.registry.get_sample_value
        assert sample("rnnserve_model_ready", {"model": LSTM, "version": "1"}) == 1


async def test_a_load_whose_caller_goes_away_still_serves_the_version(
    versions: Path,
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = repository(versions, tmp_path, tiny_lstm=["1"])
    settings = make_settings(model_repository=root, model_control="explicit")
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        add_version(versions, root, LSTM, "2")
        loading, go_on = held_load(monkeypatch)
        call = kserve(ch).RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=LSTM))
        await asyncio.to_thread(loading.wait)
        load = asyncio.create_task(srv.engine.control.load_model(LSTM))  # a second caller
        load.cancel()
        with pytest.raises(asyncio.CancelledError):
            await load
        call.cancel()  # and the first one goes away too
        go_on.set()
        await srv.engine.control.settled()
        assert srv.engine.versions(LSTM) == ["1", "2"] and await ready(kserve(ch), LSTM, "2")


# ----- shutdown while a version loads --------------------------------------------------------


async def test_shutdown_does_not_wait_for_a_load_under_way(
    versions: Path,
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A load can take minutes (a TensorRT engine build): shutdown abandons it, and the load
    answers UNAVAILABLE, instead of draining and writing the final snapshot only after it."""
    root = repository(versions, tmp_path, tiny_lstm=["1"])
    settings = make_settings(model_repository=root, model_control="explicit")
    server = RnnServer(settings)
    await server.start()
    loading, go_on = held_load(monkeypatch)
    stopped = False
    try:
        add_version(versions, root, LSTM, "2")
        load = asyncio.create_task(server.engine.control.load_model(LSTM))
        await asyncio.to_thread(loading.wait)
        await asyncio.wait_for(server.stop(), timeout=60)  # a bound, should it wait: no timer
        stopped = True
        assert not go_on.is_set()  # stopped while the load is still held in its thread
        with pytest.raises(Unavailable, match="shutting down"):
            await load
        assert server.engine.registry.find(LSTM, "2") is None
    finally:
        go_on.set()
        if not stopped:
            await server.stop()


# ----- files that cannot be read, loads that fail ------------------------------------------


async def test_an_unreadable_serving_json_refuses_its_model_only(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings], caplog: Any
) -> None:
    """Regression: a serving.json the server cannot read (a folder of that name; no permission)
    stopped the start of the whole server, and failed every poll for every model."""
    root = repository(versions, tmp_path, tiny_lstm=["1"], tiny_gru=["1"])
    (root / LSTM / "serving.json").mkdir()
    settings = make_settings(model_repository=root, **control(model_control="poll"))
    with caplog.at_level(logging.ERROR, logger="service"):
        async with serving(settings) as srv, channel(srv.grpc_port) as ch:
            assert srv.engine.versions(GRU) == ["1"] and srv.engine.versions(LSTM) == []
            listed = await native(ch).ListModels(pb.ListModelsRequest())
            assert [(r.name, r.version) for r in listed.refused] == [(LSTM, "")]
            assert "cannot read" in listed.refused[0].reason
            assert "check its permissions" in listed.refused[0].reason
            # While serving: the other models follow the repository.
            add_version(versions, root, GRU, "1", as_version="2")
            await srv.engine.control.poll_repository()
            assert srv.engine.versions(GRU) == ["1", "2"]
            # Fixed: the next poll serves it.
            (root / LSTM / "serving.json").rmdir()
            await srv.engine.control.poll_repository()
            assert srv.engine.versions(LSTM) == ["1"]
            assert not (await native(ch).ListModels(pb.ListModelsRequest())).refused
    lines = refusal_lines(caplog)
    assert len(lines) == 1 and "serving.json" in lines[0] and "\n" not in lines[0]


async def test_a_version_failing_unexpectedly_is_refused_alone_and_the_poll_goes_on(
    versions: Path,
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: Any,
) -> None:
    """Regression: a load that raised anything but the expected errors (an out-of-memory while
    making its state bank) failed the whole poll: the other new versions were not served, and
    nothing said which version failed."""
    root = repository(versions, tmp_path, tiny_lstm=["1"], tiny_gru=["1"])
    settings = make_settings(model_repository=root, **control(model_control="poll"))
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        add_version(versions, root, LSTM, "2")
        add_version(versions, root, GRU, "1", as_version="2")
        failing_load(monkeypatch, f"{LSTM}/2", RuntimeError("CUDA failure 2:\nout of memory"))
        with caplog.at_level(logging.ERROR, logger="service"):
            await srv.engine.control.poll_repository()
            await srv.engine.control.poll_repository()  # not tried again: nothing changed
        assert srv.engine.versions(GRU) == ["1", "2"] and srv.engine.versions(LSTM) == ["1"]
        lines = refusal_lines(caplog)
        assert lines == [
            f"not serving: model {LSTM}/2: failed to load (RuntimeError: CUDA failure 2: out of "
            "memory)"
        ]
        state, reason = index_of(await kserve(ch).RepositoryIndex(kpb.RepositoryIndexRequest()))[
            (LSTM, "2")
        ]
        assert state == "UNAVAILABLE" and "RuntimeError" in reason


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(13, "Permission denied", "model.onnx"),
        ProviderUnavailable("execution provider cuda is not available here"),
    ],
    ids=["unreadable", "provider-missing"],
)
async def test_a_version_refused_for_unreadable_files_or_a_missing_provider_is_retried(
    versions: Path,
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
) -> None:
    """Regression: fixing permissions (chmod) or installing the provider changes none of the
    version's files, and the poll tried a refused version again only once they changed."""
    root = repository(versions, tmp_path, tiny_lstm=["1"])
    settings = make_settings(model_repository=root, **control(model_control="poll"))
    async with serving(settings) as srv:
        add_version(versions, root, LSTM, "2")
        fixed = failing_load(monkeypatch, f"{LSTM}/2", error)
        await srv.engine.control.poll_repository()
        assert srv.engine.versions(LSTM) == ["1"] and f"{LSTM}/2" in srv.engine.registry.refused
        fixed()  # the operator's fix; the files are the same
        await srv.engine.control.poll_repository()
        assert srv.engine.versions(LSTM) == ["1", "2"] and not srv.engine.registry.refused


# ----- a version that comes back ------------------------------------------------------------


async def test_a_version_that_comes_back_restores_no_id_that_lives_on_another_version(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """Its snapshot holds an older history of an id restarted on another version meanwhile:
    that copy is dropped, so a request naming no version reaches only the live one."""
    root = repository(versions, tmp_path, tiny_lstm=["1", "2"])
    x = inputs(4, 7)
    durable = {"snapshot_backend": "directory", "snapshot_dir": tmp_path / "snapshots"}
    settings = make_settings(model_repository=root, **durable, **control(model_control="poll"))
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        ns = native(ch)
        await ns.CreateSession(pb.CreateSessionRequest(model=LSTM, version="1", session_id="s"))
        await ns.Step(step_request(LSTM, "s", inputs(5, 4)))
    shutil.move(root / LSTM / "1", tmp_path / "aside")  # 1 leaves while the server is down
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        ns = native(ch)
        await ns.CreateSession(pb.CreateSessionRequest(model=LSTM, session_id="s"))  # on 2
        parts = [output_of(await ns.Step(step_request(LSTM, "s", x[:3])))]
        shutil.move(tmp_path / "aside", root / LSTM / "1")
        await srv.engine.control.poll_repository()
        assert srv.engine.versions(LSTM) == ["1", "2"]
        assert srv.engine.model(LSTM, "1").store.find("s") is None
        rest = await ns.Step(step_request(LSTM, "s", x[3:]))
        assert rest.steps == 7
        np.testing.assert_allclose(np.concatenate([*parts, output_of(rest)]),
                                   offline(root, LSTM, "2", x), atol=1e-5)  # fmt: skip


# ----- KServe: a sequence is read and answered in its own version's tensor names -----------


def with_output_named(source: Path, target: Path, name: str) -> None:
    """Copy version folder ``source`` to ``target`` with its output ``y`` renamed ``name`` (in
    the graph, and declared in model.json's signature)."""
    shutil.copytree(source, target)
    model = onnx.load(str(target / "model.onnx"))
    for node in model.graph.node:
        node.output[:] = [name if o == "y" else o for o in node.output]
    for output in model.graph.output:
        if output.name == "y":
            output.name = name
    onnx.save(model, str(target / "model.onnx"))
    meta = json.loads((target / "model.json").read_text())
    layers, hidden = meta["num_layers"], meta["hidden_size"]
    for key in ("sha256", "inputs", "outputs"):  # the file changed; the names are declared below
        meta.pop(key, None)
    meta["signature"] = {
        "inputs": [{"name": "x", "shape": [meta["input_size"]]}],
        "outputs": [{"name": name, "shape": [meta["output_size"]]}],
        "states": [
            {"input": "h0", "output": "hn", "shape": [layers, hidden]},
            {"input": "c0", "output": "cn", "shape": [layers, hidden]},
        ],
    }
    (target / "model.json").write_text(json.dumps(meta))


async def test_a_kserve_sequence_is_read_and_answered_in_its_own_versions_tensor_names(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """Regression: a request of a sequence living on version 1 was parsed and answered with
    the newest version's tensor names (refused, or its output named as version 2's)."""
    root = repository(versions, tmp_path, tiny_lstm=["1"])
    x = inputs(6, 8)
    settings = make_settings(model_repository=root, **control(model_control="poll"))
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        ks = kserve(ch)
        parts = [await ks.ModelInfer(infer_request(LSTM, 5, x[:3], start=True))]
        with_output_named(versions / LSTM / "2", root / LSTM / "2", "out")
        await srv.engine.control.poll_repository()
        assert srv.engine.versions(LSTM) == ["1", "2"]
        asking_for_y = infer_request(LSTM, 5, x[3:6])
        asking_for_y.outputs.add(name="y")
        parts.append(await ks.ModelInfer(asking_for_y))
        parts.append(await ks.ModelInfer(infer_request(LSTM, 5, x[6:], end=True)))
        assert [(p.model_version, [o.name for o in p.outputs]) for p in parts] == [("1", ["y"])] * 3
        np.testing.assert_allclose(np.concatenate([infer_output(p) for p in parts]),
                                   offline(root, LSTM, "1", x), atol=1e-5)  # fmt: skip
        # A new sequence goes to version 2, in its names; v1's name is refused there.
        fresh = await ks.ModelInfer(infer_request(LSTM, 6, x, start=True))
        assert (fresh.model_version, [o.name for o in fresh.outputs]) == ("2", ["out"])
        wrong = infer_request(LSTM, 6, x[:1])
        wrong.outputs.add(name="y")
        details = await expect_code(grpc.StatusCode.INVALID_ARGUMENT, ks.ModelInfer(wrong))
        assert f"model {LSTM}/2 has output(s) 'out'" in details


async def test_a_start_on_another_version_while_the_old_copy_computes_moves_the_sequence(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """A START naming version 1 ends the id's copy on version 2 even while that copy has a chunk
    computing (it closes once the chunk is applied): the sequence's next requests, naming no
    version, go to version 1, not to the copy that is closing."""
    root = repository(versions, tmp_path, tiny_lstm=["1", "2"])
    x = inputs(11, 5)
    async with serving(make_settings(model_repository=root)) as srv, channel(srv.grpc_port) as ch:
        ks = kserve(ch)
        computing, go_on = hold_batches(srv.engine.model(LSTM, "2").batcher.runner)
        stale = asyncio.ensure_future(ks.ModelInfer(infer_request(LSTM, 9, x[:4], start=True)))
        await computing.wait()  # version 2's copy of sequence 9 has a chunk computing
        on_1 = infer_request(LSTM, 9, x[:2], start=True)
        on_1.model_version = "1"
        parts = [await ks.ModelInfer(on_1)]
        following = ks.ModelInfer(infer_request(LSTM, 9, x[2:], end=True))
        parts.append(await asyncio.wait_for(following, timeout=60))  # on 2 it would wait there
        assert [p.model_version for p in parts] == ["1", "1"]
        np.testing.assert_allclose(np.concatenate([infer_output(p) for p in parts]),
                                   offline(root, LSTM, "1", x), atol=1e-5)  # fmt: skip
        go_on.set()
        assert (await stale).model_version == "2"  # applied, then its copy closed
        assert srv.engine.model(LSTM, "2").store.find("9") is None


# ----- a released version's memory ---------------------------------------------------------


async def test_a_released_version_is_freed_even_with_the_start_up_objects_frozen(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """The real entry point freezes what start-up made (gc.freeze): a version loaded then and
    released later must still free its onnxruntime session and state bank, whatever cycle its
    closed batcher stays in."""
    root = repository(versions, tmp_path, tiny_lstm=["1"], tiny_gru=["1"])
    server = RnnServer(make_settings(model_repository=root, model_control="explicit"))
    await server.start(freeze_start_up_objects=True)
    try:
        handle = server.engine.model(LSTM, "1")
        alive = {"runtime": weakref.ref(handle.runtime), "store": weakref.ref(handle.store),
                 "bank": weakref.ref(handle.store.bank),
                 "runner": weakref.ref(handle.batcher.runner)}  # fmt: skip
        del handle
        await server.engine.control.unload_model(LSTM)
        assert server.engine.registry.find(LSTM, "1") is None  # no session: released at once
        gc.collect()
        assert [name for name, ref in alive.items() if ref() is not None] == []
    finally:
        gc.unfreeze()
        await server.stop()


# ----- hidden folders -------------------------------------------------------------------------


async def test_a_folder_being_copied_in_under_a_dot_name_is_never_a_version(
    versions: Path, tmp_path: Path, make_settings: Callable[..., Settings], caplog: Any
) -> None:
    root = repository(versions, tmp_path, tiny_lstm=["1"])
    partial = root / LSTM / ".2.incoming"  # the copy has its model.onnx, not yet its model.json
    partial.mkdir()
    shutil.copy(versions / LSTM / "2" / "model.onnx", partial / "model.onnx")
    hidden = root / ".trash" / "1"
    shutil.copytree(versions / GRU / "1", hidden)
    settings = make_settings(model_repository=root, **control(model_control="poll"))
    with caplog.at_level(logging.ERROR, logger="service"):
        async with serving(settings) as srv, channel(srv.grpc_port) as ch:
            await srv.engine.control.poll_repository()
            assert srv.engine.versions(LSTM) == ["1"] and not srv.engine.registry.refused
            assert srv.engine.registry.names() == [LSTM]
            index = index_of(await kserve(ch).RepositoryIndex(kpb.RepositoryIndexRequest()))
            assert set(index) == {(LSTM, "1")}
            shutil.copy(versions / LSTM / "2" / "model.json", partial / "model.json")
            partial.rename(root / LSTM / "2")  # complete: renamed into place
            await srv.engine.control.poll_repository()
            assert srv.engine.versions(LSTM) == ["1", "2"]
    assert refusal_lines(caplog) == []
