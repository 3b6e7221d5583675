"""What anyone who reaches the ports can make the server hold stays bounded: health Watch streams,
metrics connections, and how long a Redis that went away can hold a snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server

from service.metrics_http import MetricsHttpServer
from service.server import RnnServer
from service.settings import Settings
from service.snapshots import RedisSnapshots
from tests.grpc_helpers import channel, serving

HALF_A_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # the blank line never comes
SOCKET_TIMEOUT_S = 10.0  # a bound on every wait below, never reached when the code is right


# ----- health Watch -------------------------------------------------------------------------
def watcher_released(server: RnnServer, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """An event set each time one of the server's Watch streams has freed its place."""
    released = asyncio.Event()
    health = server._health
    release = health._release

    def spy(service: str) -> None:
        release(service)
        released.set()

    monkeypatch.setattr(health, "_release", spy)
    return released


def sample(server: RnnServer, name: str) -> float | None:
    return server.metrics.registry.get_sample_value(name)


async def test_health_watch_streams_are_bounded_and_a_finished_one_frees_its_place(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(make_settings(max_health_watchers=3)) as server:
        released = watcher_released(server, monkeypatch)
        async with channel(server.grpc_port) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            request = health_pb2.HealthCheckRequest(service="")
            watches = [health.Watch(request) for _ in range(3)]
            for watch in watches:
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            assert sample(server, "rnnserve_health_watchers") == 3

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health.Watch(request).read()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_health_watchers" in str(refused.value.details())
            assert sample(server, "rnnserve_health_watch_refused_total") == 1
            # Check stays unbounded: probes keep working while every Watch place is taken.
            reply = await health.Check(request)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

            watches.pop().cancel()
            await asyncio.wait_for(released.wait(), SOCKET_TIMEOUT_S)
            assert sample(server, "rnnserve_health_watchers") == 2
            admitted = health.Watch(request)
            assert (await admitted.read()).status == health_pb2.HealthCheckResponse.SERVING
            assert sample(server, "rnnserve_health_watch_refused_total") == 1
            for watch in [*watches, admitted]:
                watch.cancel()


async def test_the_other_watchers_still_hear_of_changes_when_one_leaves(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpc's own Watch forgot a service's watchers when any one of them left."""
    async with serving(make_settings()) as server:
        released = watcher_released(server, monkeypatch)
        async with channel(server.grpc_port) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            request = health_pb2.HealthCheckRequest(service="")
            leaving, staying = health.Watch(request), health.Watch(request)
            for watch in (leaving, staying):
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            leaving.cancel()
            await asyncio.wait_for(released.wait(), SOCKET_TIMEOUT_S)
            await server._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            reply = await asyncio.wait_for(staying.read(), SOCKET_TIMEOUT_S)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            staying.cancel()


# ----- metrics endpoint ---------------------------------------------------------------------
@contextlib.contextmanager
def half_open_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that each send half a request and then wait."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S)
            sockets.append(s)
            s.sendall(HALF_A_REQUEST)
        yield sockets
    finally:
        for s in sockets:
            s.close()


def closed_by_the_server(s: socket.socket) -> bool:
    """Read until the server closes the connection (True), or the bounded timeout (False)."""
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def get(port: int, headers: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers or {})
    with urllib.request.urlopen(request, timeout=SOCKET_TIMEOUT_S) as response:
        return response.read(), dict(response.headers)


def half_open_clients_cost_no_threads(port: int, count: int) -> tuple[int, int, bytes]:
    """Threads before and after ``count`` half-open connections and one scrape behind them (the
    server accepts in order, so every half-open one has been accepted once the scrape is
    answered); then checks that the server closes each half-open one by itself."""
    threads_before = threading.active_count()
    with half_open_connections(port, count) as sockets:
        body, _ = get(port)
        threads_with_them = threading.active_count()
        assert all(closed_by_the_server(s) for s in sockets)
    return threads_before, threads_with_them, body


async def test_half_open_metrics_connections_hold_no_threads_and_are_closed(
    make_settings: Callable[..., Settings],
) -> None:
    async with serving(make_settings(metrics_request_timeout_s=0.5)) as server:
        before, during, body = await asyncio.to_thread(
            half_open_clients_cost_no_threads, server.metrics_port, 50
        )
        assert during <= before + 2, (before, during)  # slack for unrelated pool threads
        assert b"rnnserve_steps_total" in body or b"rnnserve_active_sessions" in body


def a_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("things", "Things counted.", registry=registry).inc(3)
    return registry


def test_the_exposition_is_what_prometheus_clients_own_server_gives() -> None:
    registry = a_registry()
    theirs, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    ours = MetricsHttpServer(registry, "127.0.0.1", 0, request_timeout_s=SOCKET_TIMEOUT_S)
    try:
        for headers in (
            {},
            {"Accept-Encoding": "gzip"},
            {"Accept": "application/openmetrics-text; version=1.0.0"},
        ):
            body, got = get(ours.port, headers)
            expected_body, expected = get(theirs.server_port, headers)
            assert body == expected_body, headers
            for name in ("Content-Type", "Content-Encoding"):
                assert got.get(name) == expected.get(name), (name, headers)
        body, _ = get(ours.port, {"Accept-Encoding": "gzip"})
        assert gzip.decompress(body) == generate_latest(registry)
    finally:
        ours.stop()
        theirs.shutdown()
        theirs.server_close()
        thread.join(SOCKET_TIMEOUT_S)


def test_one_connection_too_many_closes_the_oldest_and_scrapes_still_answer() -> None:
    server = MetricsHttpServer(
        a_registry(), "127.0.0.1", 0, request_timeout_s=60.0, max_connections=4
    )
    try:
        with half_open_connections(server.port, 4) as sockets:
            body, _ = get(server.port)  # the fifth connection pushes the first out
            assert b"things_total 3.0" in body
            assert closed_by_the_server(sockets[0])
    finally:
        server.stop()


def test_a_stopped_server_closes_its_port_and_ends_its_thread() -> None:
    threads_before = threading.active_count()
    server = MetricsHttpServer(a_registry(), "127.0.0.1", 0, request_timeout_s=SOCKET_TIMEOUT_S)
    with half_open_connections(server.port, 3) as sockets:
        get(server.port)
        server.stop()
        assert all(closed_by_the_server(s) for s in sockets)
    assert threading.active_count() == threads_before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT_S).close()


def test_a_request_head_that_is_not_http_gets_400() -> None:
    server = MetricsHttpServer(a_registry(), "127.0.0.1", 0, request_timeout_s=SOCKET_TIMEOUT_S)
    try:
        with socket.create_connection(("127.0.0.1", server.port), SOCKET_TIMEOUT_S) as s:
            s.sendall(b"hello\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.0 400 ")
    finally:
        server.stop()


# ----- Redis going away ---------------------------------------------------------------------
def test_a_silent_redis_fails_a_snapshot_within_the_timeout_without_the_password() -> None:
    """A Redis that accepts connections but never answers (hung, or the network dropped)."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"redis://:secret-password@127.0.0.1:{silent.getsockname()[1]}/0"
        backend = RedisSnapshots(url, timeout_s=0.2)
        try:
            calls: list[Callable[[], Any]] = [
                lambda: backend.read("m/1"),
                lambda: backend.write("m/1", b"blob"),
                lambda: backend.quarantine("m/1"),
            ]
            for call in calls:
                started = time.monotonic()
                with pytest.raises(ConnectionError) as info:
                    call()
                assert time.monotonic() - started < SOCKET_TIMEOUT_S
                message = str(info.value)
                assert f"redis://127.0.0.1:{silent.getsockname()[1]}/0" in message
                assert "secret-password" not in message
        finally:
            backend.client.close()
