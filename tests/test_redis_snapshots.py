"""The Redis snapshot backend against a real redis-server this test starts on loopback (and stops)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from tests.grpc_helpers import channel, expect_code, native, output_of, serving, step_request
from tests.redis_server import redis_server

MODEL = "tiny_gru"


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path) as url:
        yield url


async def test_sessions_survive_a_restart_through_redis(make_settings: Any, redis_url: str) -> None:
    settings = make_settings(snapshot_backend="redis", snapshot_redis_url=redis_url)
    x = np.random.default_rng(3).standard_normal((6, 3)).astype(np.float32)
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = native(ch)
        await stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="r"))
        first = output_of(await stub.Step(step_request(MODEL, "r", x[:4])))
        saved = await stub.GetSession(
            pb.GetSessionRequest(model=MODEL, session_id="r", include_state=True)
        )
    assert redis.Redis.from_url(redis_url).exists(f"rnnserve:snapshot:{MODEL}/1")
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        stub = native(ch)
        restored = await stub.GetSession(
            pb.GetSessionRequest(model=MODEL, session_id="r", include_state=True)
        )
        assert restored.steps == 4 and restored.state[0].data == saved.state[0].data
        second = output_of(await stub.Step(step_request(MODEL, "r", x[4:])))
    # The same session streamed without a restart gives the same outputs.
    async with serving(make_settings()) as srv, channel(srv.grpc_port) as ch:
        stub = native(ch)
        await stub.CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="r"))
        uninterrupted = output_of(await stub.Step(step_request(MODEL, "r", x)))
    np.testing.assert_array_equal(np.concatenate([first, second]), uninterrupted)


async def test_a_corrupt_redis_snapshot_is_set_aside(make_settings: Any, redis_url: str) -> None:
    settings = make_settings(snapshot_backend="redis", snapshot_redis_url=redis_url)
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        await native(ch).CreateSession(pb.CreateSessionRequest(model=MODEL, session_id="r"))
    client = redis.Redis.from_url(redis_url)
    key = f"rnnserve:snapshot:{MODEL}/1"
    blob = client.get(key)
    assert isinstance(blob, bytes)
    client.set(key, blob[:-2])
    async with serving(settings) as srv, channel(srv.grpc_port) as ch:
        await expect_code(grpc.StatusCode.NOT_FOUND, native(ch).GetSession(
            pb.GetSessionRequest(model=MODEL, session_id="r")))  # fmt: skip
    assert client.keys(f"{key}:corrupt-*")
