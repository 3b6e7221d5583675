"""Durable sessions in-process: snapshot format and its integrity checks, restart with restore over
both APIs (state bit for bit, outputs as an uninterrupted run), sessions refused when the model
changed or the snapshot is corrupt."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.snapshots import (
    CorruptSnapshot,
    DirectorySnapshots,
    ModelSnapshot,
    SessionRecord,
    decode,
    encode,
)
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
from tests.models_for_tests import OfflineReference

MODEL = "tiny_lstm"


def sample_snapshot() -> ModelSnapshot:
    rng = np.random.default_rng(0)
    states = [rng.standard_normal((2, 3, 8)).astype(np.float32) for _ in range(2)]
    records = [
        SessionRecord("a", 5, "alice", rng.standard_normal((2, 2)).astype(np.float32)),
        SessionRecord("b", 0, "", None),
        SessionRecord("c", 9, "", rng.standard_normal((1, 2)).astype(np.float32)),
    ]
    return ModelSnapshot("m", "1", "ab" * 32, 1.5, records, states)


def test_snapshot_round_trips_bit_for_bit() -> None:
    original = sample_snapshot()
    restored = decode(encode(original))
    assert [(r.session_id, r.steps, r.owner) for r in restored.sessions] == [
        (r.session_id, r.steps, r.owner) for r in original.sessions
    ]
    for got, want in zip(restored.states, original.states, strict=True):
        assert got.tobytes() == want.tobytes()
    for got_r, want_r in zip(restored.sessions, original.sessions, strict=True):
        if want_r.last_output is None:
            assert got_r.last_output is None
        else:
            assert got_r.last_output is not None
            assert got_r.last_output.tobytes() == want_r.last_output.tobytes()


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-1],  # truncated payload
        lambda b: b[:30],  # truncated header
        lambda b: b[:-3] + bytes([b[-3] ^ 0xFF]) + b[-2:],  # one flipped byte
        lambda b: b"X" + b[1:],  # bad magic
        lambda b: b"",  # empty file
    ],
    ids=["truncated", "truncated-header", "flipped-byte", "bad-magic", "empty"],
)
def test_damaged_snapshots_are_detected(damage: Any) -> None:
    with pytest.raises(CorruptSnapshot):
        decode(damage(encode(sample_snapshot())))


def test_directory_backend_replaces_atomically_and_quarantines(tmp_path: Path) -> None:
    backend = DirectorySnapshots(tmp_path)
    backend.write("m/1", b"first")
    backend.write("m/1", b"second")
    assert backend.read("m/1") == b"second"
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1.snapshot"]  # no temporary left
    moved = backend.quarantine("m/1")
    assert backend.read("m/1") is None and Path(moved).read_bytes() == b"second"


async def stream_chunks(
    stub: Any, session_id: str, chunks: list[np.ndarray], open_: bool
) -> tuple[list[np.ndarray], pb.StepResponse | None]:
    call = stub.Stream()
    if open_:
        await call.write(
            pb.StreamRequest(open=pb.CreateSessionRequest(model=MODEL, session_id=session_id))
        )
    else:
        await call.write(
            pb.StreamRequest(attach=pb.GetSessionRequest(model=MODEL, session_id=session_id))
        )
    await call.read()
    outputs, last = [], None
    for x in chunks:
        await call.write(
            pb.StreamRequest(chunk=pb.Chunk(input=pb.Tensor(shape=list(x.shape), data=x.tobytes())))
        )
        last = (await call.read()).output
        outputs.append(output_of(last).copy())
    await call.done_writing()
    return outputs, last


@pytest.mark.parametrize(
    ("residency_before", "residency_after"),
    [("host", "host"), ("device", "device"), ("host", "device")],
)
async def test_sessions_survive_a_restart_exactly(
    make_settings: Any,
    tiny_repository: Path,
    tmp_path: Path,
    residency_before: str,
    residency_after: str,
) -> None:
    """Also with the state on the device (snapshots read it back to the host) and across a change
    of state_residency: snapshots hold host arrays either way."""
    settings = make_settings(
        snapshot_backend="directory",
        snapshot_dir=tmp_path / "state",
        state_residency=residency_before,
    )
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 3)).astype(np.float32)
    before, after = [x[:7], x[7:8], x[8:20]], [x[20:21], x[21:40]]
    reference = OfflineReference(tiny_repository, MODEL)(x)
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = native(ch)
        first, _ = await stream_chunks(stub, "native-1", before, open_=True)
        kstub = kserve(ch)
        k_first = [
            infer_output(await kstub.ModelInfer(infer_request(MODEL, 77, c, start=i == 0)))
            for i, c in enumerate(before)
        ]
        saved = await stub.GetSession(
            pb.GetSessionRequest(model=MODEL, session_id="native-1", include_state=True)
        )
    # stopped: the shutdown snapshot holds both sessions
    settings = settings.model_copy(update={"state_residency": residency_after})
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        assert srv.engine.model(MODEL).store.bank.residency == residency_after
        stub = native(ch)
        restored = await stub.GetSession(
            pb.GetSessionRequest(model=MODEL, session_id="native-1", include_state=True)
        )
        assert restored.steps == 20 and restored.durable_steps == 20
        for a, b in zip(saved.state, restored.state, strict=True):
            assert a.data == b.data  # bit for bit
        assert (
            output_of(pb.StepResponse(output=restored.last_output)).tobytes() == first[-1].tobytes()
        )
        second, last = await stream_chunks(stub, "native-1", after, open_=False)
        assert last is not None and last.steps == 40
        kstub = kserve(ch)
        k_second = [
            infer_output(
                await kstub.ModelInfer(infer_request(MODEL, 77, c, end=i == len(after) - 1))
            )
            for i, c in enumerate(after)
        ]
        restored_total = srv.metrics.registry.get_sample_value(
            "rnnserve_sessions_restored_total", {"model": MODEL, "version": "1"}
        )
        assert restored_total == 2.0
    np.testing.assert_allclose(np.concatenate(first + second), reference, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(k_first + k_second), reference, atol=1e-5)


async def test_a_snapshot_of_a_different_model_file_is_not_restored(
    make_settings: Any, tiny_repository: Path, tmp_path: Path
) -> None:
    settings = make_settings(snapshot_backend="directory", snapshot_dir=tmp_path / "state")
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        await native(ch).CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="s"))
    path = tmp_path / "state" / MODEL / "1.snapshot"
    snapshot = decode(path.read_bytes())
    other = ModelSnapshot(snapshot.model, snapshot.version, hashlib.sha256(b"other").hexdigest(),
                          snapshot.created_unix_s, snapshot.sessions, snapshot.states)  # fmt: skip
    path.write_bytes(encode(other))
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        await expect_code(grpc.StatusCode.NOT_FOUND, native(ch).GetSession(
            pb.GetSessionRequest(model=MODEL, session_id="s")))  # fmt: skip
        assert srv.engine.restore_report is not None
        assert "model_mismatch" in srv.engine.restore_report.rejected[f"{MODEL}/1"]
        rejected = srv.metrics.registry.get_sample_value(
            "rnnserve_snapshots_rejected_total",
            {"model": MODEL, "version": "1", "reason": "model_mismatch"},
        )
        assert rejected == 1.0
    assert list((tmp_path / "state" / MODEL).glob("1.snapshot.corrupt-*"))


async def test_a_corrupt_snapshot_is_reported_and_never_loaded(
    make_settings: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(snapshot_backend="directory", snapshot_dir=tmp_path / "state")
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = native(ch)
        await stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="s"))
        await stub.Step(step_request(MODEL, "s", np.ones((3, 3), np.float32)))
    path = tmp_path / "state" / MODEL / "1.snapshot"
    path.write_bytes(path.read_bytes()[:-4])  # a torn write that bypassed the atomic rename
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        await expect_code(grpc.StatusCode.NOT_FOUND, native(ch).GetSession(
            pb.GetSessionRequest(model=MODEL, session_id="s")))  # fmt: skip
        assert (
            srv.metrics.registry.get_sample_value(
                "rnnserve_snapshots_rejected_total",
                {"model": MODEL, "version": "1", "reason": "corrupt"},
            )
            == 1.0
        )
    assert any("not restored (corrupt" in r.getMessage() for r in caplog.records)
    assert list(path.parent.glob("1.snapshot.corrupt-*"))  # kept aside for inspection
    assert decode(path.read_bytes()).sessions == []  # the second server's own, empty, snapshot


async def test_periodic_snapshots_advance_durable_steps(make_settings: Any, tmp_path: Path) -> None:
    settings = make_settings(snapshot_backend="directory", snapshot_dir=tmp_path / "state",
                             snapshot_interval_s=0.0, snapshot_when_idle_s=0.0)  # fmt: skip
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = native(ch)
        await stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="s"))
        reply = await stub.Step(step_request(MODEL, "s", np.ones((3, 3), np.float32)))
        assert reply.durable_steps == 0
        assert srv.engine.durability is not None
        assert await srv.engine.durability.snapshot() == 1  # what the timer would do
        assert await srv.engine.durability.snapshot() == 0  # nothing changed since
        reply = await stub.Step(step_request(MODEL, "s", np.ones((2, 3), np.float32)))
        assert (reply.steps, reply.durable_steps) == (5, 3)
