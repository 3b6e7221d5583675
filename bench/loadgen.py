"""Load: N concurrent sessions, each sending a chunk and waiting for its reply.

Closed loop (the default): a session sends its next chunk as soon as the reply arrives. Open loop
(``rate_per_s``): the sessions together send ``rate_per_s`` chunks per second on a fixed schedule,
none before its time, and latency is measured from the *scheduled* send time, so a server that
falls behind is charged for the wait (no coordinated omission). A session still never has two
chunks in flight.

Sessions stream over the native API (one bidirectional stream per session) or the KServe v2 API
(one ModelStreamInfer stream per session, Triton sequence parameters). Every session first opens
its stream and has its first request answered; only when all have, the load begins. Latencies are
recorded after a warm-up that lasts until every session has been answered again, for a fixed
duration; every session then closes. Only loopback targets are allowed.

Opening every stream before the load begins matters with many sessions: grpc.aio's server accepts
one new call per round of its event loop, and a round grows with the streams already busy, so
streams opened while a thousand others stream wait seconds, and whole connections' worth of them
tens of seconds (docs/PERFORMANCE.md, "Capacity").
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

import grpc
import numpy as np

from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service._proto.rnnserve.v1 import streaming_pb2_grpc as pb_grpc

Api = Literal["native", "kserve"]
TIMER_ROUNDING_S = 0.0005  # uvloop rounds sleeps to the nearest millisecond
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Channels with equal arguments share one connection through gRPC's global subchannel pool;
    # a pool of its own gives every channel its own HTTP/2 connection.
    ("grpc.use_local_subchannel_pool", 1),
]


@dataclass(frozen=True)
class LoadConfig:
    target: str
    model: str
    features: int
    api: Api = "native"
    sessions: int = 16
    chunk_steps: int = 1
    duration_s: float = 5.0
    warmup_s: float = 1.0
    seed: int = 0
    channels: int = 4  # sessions are spread over this many HTTP/2 connections
    rate_per_s: float | None = None  # open loop: chunks per second over all sessions

    def schedule(self, index: int) -> _Schedule:
        return _Schedule(self, index)


class _Schedule:
    """When session ``index`` sends its chunks: as fast as replies come (closed loop) or on its
    share of an open-loop rate, staggered so the sessions do not send in bursts.

    An open-loop chunk is never sent before its scheduled time. uvloop (the load generator's
    loop) rounds every sleep to whole milliseconds of a clock it reads once per round, so a single
    ``asyncio.sleep`` often ends early: at 2,500 chunks/s over 256 sessions, 53% of the chunks
    went out early, by up to 1.4 ms, and their latencies, counted from the scheduled time, came
    out too short. Sleeping again until the time has come removes that; the cost is lateness
    (median about 0.7 ms), which the latencies count and ``p99_from_send_ms`` leaves out.
    """

    def __init__(self, cfg: LoadConfig, index: int) -> None:
        self.interval_s = cfg.sessions / cfg.rate_per_s if cfg.rate_per_s else 0.0
        self.next_s = time.perf_counter() + self.interval_s * index / max(cfg.sessions, 1)

    async def wait_turn(self) -> float:
        """Sleep until this session's next send; return the time latency is measured from."""
        if not self.interval_s:
            return time.perf_counter()
        scheduled = self.next_s
        self.next_s += self.interval_s
        # A deadline, not a condition another task sets, so no Event to wait on (ASYNC110).
        while (delay_s := scheduled - time.perf_counter()) > 0:  # noqa: ASYNC110
            # Half a millisecond more turns uvloop's rounding to the nearest millisecond into
            # rounding up, so the loop seldom needs a second sleep.
            await asyncio.sleep(delay_s + TIMER_ROUNDING_S)
        return scheduled


@dataclass
class LoadResult:
    config: LoadConfig
    latencies_s: np.ndarray  # from each request's due time: its scheduled one in an open loop
    # How late the load generator itself wrote each of those requests after its due time (open
    # loop; about zero in a closed one): CPU contention on the shared machine, not the server's.
    send_lags_s: np.ndarray
    measured_s: float
    errors: int
    answered: int = 0  # replies that arrived in the measured window
    error_samples: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        """Requests answered in the measured window (what throughput and CPU per request count)."""
        return self.answered

    def summary(self) -> dict[str, float]:
        """Throughput and latency percentiles. ``p99_ms`` and the others count from each
        request's due time; ``p99_from_send_ms`` from when the load generator began writing it,
        which leaves out the generator's own lateness (``send_lag_p99_ms``)."""
        lat = self.latencies_s
        return {
            "requests_per_s": self.requests / self.measured_s,
            "steps_per_s": self.requests * self.config.chunk_steps / self.measured_s,
            "p50_ms": percentile_ms(lat, 50),
            "p90_ms": percentile_ms(lat, 90),
            "p99_ms": percentile_ms(lat, 99),
            "p999_ms": percentile_ms(lat, 99.9),
            "max_ms": percentile_ms(lat, 100),
            "p99_from_send_ms": percentile_ms(lat - self.send_lags_s, 99),
            "send_lag_p99_ms": percentile_ms(self.send_lags_s, 99),
            "errors": float(self.errors),
        }


def percentile_ms(values_s: np.ndarray, q: float) -> float:
    """The ``q``-th percentile of ``values_s`` in milliseconds; NaN when there are none."""
    return float(np.percentile(values_s, q) * 1e3) if len(values_s) else float("nan")


def require_loopback(target: str) -> None:
    """Refuse any target that does not resolve to a loopback address."""
    host = target.rsplit(":", 1)[0].strip("[]")
    for info in socket.getaddrinfo(host, None):
        if not ipaddress.ip_address(info[4][0]).is_loopback:
            raise ValueError(
                f"bench targets loopback addresses only; {target} resolves to {info[4][0]}"
            )


class _Window:
    """Shared clock of a load's phases. Set-up: every session opens its stream and has its first
    request answered (:meth:`session_opened`), and waits in :meth:`all_opened` for the others.
    Warm-up: it begins once all are open, and lasts ``warmup_s`` *and* until every session has
    been answered again (:meth:`session_ready`). Then the measured window opens, and closes
    ``duration_s`` later.

    Waiting for every session keeps connection set-up and model warm-up out of the window on a
    slow or busy machine, where a fixed warm-up could end before the last session had connected
    (a short run then measured nothing). If some session has still not opened ``ready_timeout_s``
    after the load was created, warm-up begins anyway; if one has not been answered
    ``ready_timeout_s`` after warm-up, the window opens anyway: a load always ends.

    Throughput counts the replies that *arrive* in the window, whenever their requests were sent;
    latency is recorded for the requests *sent* in the window, whenever their replies arrive (each
    session waits for its last reply before it stops). Counting only requests both sent and
    answered inside the window would miss about one request per session at each edge: slow points
    would be undercounted badly (one whose replies take longer than the window would measure
    nothing), and their latencies cut off at the window's length. Requests sent during warm-up
    never enter the latencies, so a start-up backlog cannot either.

    Every method runs on the load's event loop; ``on_edge`` is called there with "start" and
    "end" as the window opens and closes.
    """

    def __init__(
        self,
        warmup_s: float,
        duration_s: float,
        sessions: int = 0,
        on_edge: Callable[[str], None] | None = None,
        ready_timeout_s: float = 30.0,
    ) -> None:
        self.duration_s = duration_s
        self.start = self.end = float("inf")
        self.answered = 0
        self.latencies: list[float] = []
        self.send_lags: list[float] = []
        self.errors = 0
        self.error_samples: list[str] = []
        self._warmup_s = warmup_s
        self._ready_timeout_s = ready_timeout_s
        self._unopened = set(range(sessions))
        self._all_opened = asyncio.Event()
        self._waiting_for = set(range(sessions))
        self._warm = False
        self._on_edge = on_edge
        self._edges_due = ["start", "end"]
        self._timers: list[asyncio.TimerHandle] = []
        if sessions:
            loop = asyncio.get_running_loop()
            self._timers.append(loop.call_later(ready_timeout_s, self._begin_warmup))

    def session_opened(self, index: int) -> None:
        """Session ``index`` has opened its stream and had its first reply, or has ended."""
        self._unopened.discard(index)
        if not self._unopened:
            self._begin_warmup()

    async def all_opened(self) -> None:
        """Wait until every session has opened (or set-up has timed out): the load begins."""
        await self._all_opened.wait()

    def _begin_warmup(self) -> None:
        if self._all_opened.is_set():
            return
        self._all_opened.set()
        loop = asyncio.get_running_loop()
        self._timers += [
            loop.call_later(self._warmup_s, self._warmed_up),
            loop.call_later(self._warmup_s + self._ready_timeout_s, self._open),
        ]

    def session_ready(self, index: int) -> None:
        """Session ``index`` has had a reply since the load began, or has ended without one."""
        self._waiting_for.discard(index)
        if self._warm and not self._waiting_for:
            self._open()

    def _warmed_up(self) -> None:
        self._warm = True
        if not self._waiting_for:
            self._open()

    def _open(self) -> None:
        if self.start != float("inf"):
            return
        self.start = time.perf_counter()
        self.end = self.start + self.duration_s
        self._reach("start")
        self._timers.append(
            asyncio.get_running_loop().call_later(self.duration_s, self._reach, "end")
        )

    def _reach(self, edge: str) -> None:
        if edge in self._edges_due:
            self._edges_due.remove(edge)
            if self._on_edge is not None:
                self._on_edge(edge)

    def close(self) -> None:
        """Every session has ended: stop the timers and report the edges not yet reached (all
        sessions failed early), in order, so a caller reading counters at the edges gets both."""
        for timer in self._timers:
            timer.cancel()
        for edge in list(self._edges_due):
            self._reach(edge)

    def record(self, due: float, written: float, received: float) -> None:
        """One reply: the request was due at ``due`` (its scheduled time in an open loop), the load
        generator began writing it at ``written``, and the reply arrived at ``received``."""
        if self.start <= received <= self.end:
            self.answered += 1
        if self.start <= due <= self.end:
            self.latencies.append(received - due)
            self.send_lags.append(written - due)

    def fail(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(message)

    @property
    def running(self) -> bool:
        return time.perf_counter() < self.end


async def _native_session(
    stub: pb_grpc.StreamingInferenceStub, cfg: LoadConfig, x: bytes, window: _Window, index: int
) -> None:
    call = stub.Stream()
    await call.write(pb.StreamRequest(open=pb.CreateSessionRequest(model=cfg.model)))
    await call.read()
    window.session_opened(index)
    await window.all_opened()
    chunk = pb.StreamRequest(
        chunk=pb.Chunk(input=pb.Tensor(shape=[cfg.chunk_steps, cfg.features], data=x))
    )
    schedule = cfg.schedule(index)
    while window.running:
        due = await schedule.wait_turn()
        written = time.perf_counter()
        await call.write(chunk)
        reply = await call.read()
        if reply == grpc.aio.EOF or reply.WhichOneof("kind") != "output":
            window.fail("stream ended")
            return
        window.record(due, written, time.perf_counter())
        window.session_ready(index)
    await call.write(pb.StreamRequest(close=pb.Close()))
    await call.read()
    await call.done_writing()


async def _kserve_session(
    stub: kpb_grpc.GRPCInferenceServiceStub,
    cfg: LoadConfig,
    x: bytes,
    window: _Window,
    sequence_id: int,
) -> None:
    requests: asyncio.Queue[kpb.ModelInferRequest | None] = asyncio.Queue()

    async def outgoing() -> AsyncIterator[kpb.ModelInferRequest]:
        while (request := await requests.get()) is not None:
            yield request

    def request(start: bool, end: bool) -> kpb.ModelInferRequest:
        r = kpb.ModelInferRequest(model_name=cfg.model, raw_input_contents=[x])
        r.inputs.add(name="x", datatype="FP32", shape=[1, cfg.chunk_steps, cfg.features])
        r.parameters["sequence_id"].int64_param = sequence_id
        if start:
            r.parameters["sequence_start"].bool_param = True
        if end:
            r.parameters["sequence_end"].bool_param = True
        return r

    call = stub.ModelStreamInfer(outgoing())
    replies = call.__aiter__()
    await requests.put(request(True, False))  # the sequence's START, answered before the load
    opening = await replies.__anext__()
    window.session_opened(sequence_id - 1)
    if opening.error_message:
        window.fail(opening.error_message)
        await requests.put(None)
        return
    await window.all_opened()
    schedule = cfg.schedule(sequence_id - 1)
    while window.running:
        due = await schedule.wait_turn()
        written = time.perf_counter()
        await requests.put(request(False, False))
        reply = await replies.__anext__()
        if reply.error_message:
            window.fail(reply.error_message)
            break
        window.record(due, written, time.perf_counter())
        window.session_ready(sequence_id - 1)
    await requests.put(request(False, True))
    await replies.__anext__()
    await requests.put(None)


async def run_load(
    cfg: LoadConfig, on_window_edge: Callable[[str], None] | None = None
) -> LoadResult:
    """Drive ``cfg.sessions`` sessions (closed or open loop) through warm-up and the measured
    window (see :class:`_Window`); return what the window measured.

    ``on_window_edge`` is called with "start" and "end" as the measured window opens and closes
    (on this loop), so a caller can read CPU counters over exactly the window the latencies cover.
    """
    require_loopback(cfg.target)
    rng = np.random.default_rng(cfg.seed)
    x = rng.standard_normal((cfg.chunk_steps, cfg.features)).astype("<f4").tobytes()
    channels = [
        grpc.aio.insecure_channel(cfg.target, options=CHANNEL_OPTIONS) for _ in range(cfg.channels)
    ]
    window = _Window(cfg.warmup_s, cfg.duration_s, cfg.sessions, on_window_edge)

    async def session(i: int) -> None:
        ch = channels[i % len(channels)]
        try:
            if cfg.api == "native":
                await _native_session(pb_grpc.StreamingInferenceStub(ch), cfg, x, window, i)
            else:
                await _kserve_session(kpb_grpc.GRPCInferenceServiceStub(ch), cfg, x, window, 1 + i)
        finally:  # one that failed before its first reply holds nobody up
            window.session_opened(i)
            window.session_ready(i)

    results = await asyncio.gather(*map(session, range(cfg.sessions)), return_exceptions=True)
    window.close()
    for outcome in results:
        if isinstance(outcome, BaseException):
            window.fail(f"{type(outcome).__name__}: {outcome}")
    for ch in channels:
        await ch.close()
    return LoadResult(
        config=cfg,
        latencies_s=np.array(window.latencies),
        send_lags_s=np.array(window.send_lags),
        answered=window.answered,
        measured_s=cfg.duration_s,
        errors=window.errors,
        error_samples=window.error_samples,
    )


def drive(cfg: LoadConfig, on_window_edge: Callable[[str], None] | None = None) -> LoadResult:
    """Run :func:`run_load` on its own event loop: uvloop when installed, as the server uses, so
    the load generator takes as little of the shared CPU as it can (same for every variant)."""
    from service.event_loop import run_to_result

    return run_to_result(run_load(cfg, on_window_edge), "auto")


def main() -> None:
    """``python -m bench.loadgen --target HOST:PORT --model M --features F ...``: one load,
    its summary printed as JSON. Prints ``measuring`` (flushed) as the measured window opens, so a
    parent process can do something while the load runs at full speed."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--target", required=True, help="a loopback host:port")
    parser.add_argument("--model", required=True)
    parser.add_argument("--features", type=int, required=True, help="input features per step")
    parser.add_argument("--api", choices=("native", "kserve"), default="native")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--chunk-steps", type=int, default=1)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument(
        "--rate-per-s", type=float, default=None, help="open loop (default: closed)"
    )
    args = parser.parse_args()
    cfg = LoadConfig(
        target=args.target,
        model=args.model,
        features=args.features,
        api=args.api,
        sessions=args.sessions,
        chunk_steps=args.chunk_steps,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        rate_per_s=args.rate_per_s,
    )

    def announce(edge: str) -> None:
        if edge == "start":
            print("measuring", flush=True)

    result = drive(cfg, announce)
    json.dump(result.summary(), sys.stdout)
    print(flush=True)


if __name__ == "__main__":
    main()
