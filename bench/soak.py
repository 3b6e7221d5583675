"""A bounded soak: sessions constantly created, streamed, abandoned and closed over both APIs
against a server this script starts on loopback; memory and session count are sampled throughout.

    python -m bench.soak --duration-s 600 --out soak-results

Phases: a warm-up load (a tenth of the duration), then quiet until every abandoned session has
timed out (the baseline: server RSS with no sessions after everything has been allocated once), then
the main load, then quiet again (the end). The report compares end with baseline: RSS and live
sessions must come back. Writes soak.json, soak.md and soak.png; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.capacity import rss_bytes
from bench.harness import ServerProcess, scrape, start_server
from bench.loadgen import require_loopback
from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service._proto.rnnserve.v1 import streaming_pb2_grpc as pb_grpc
from service.event_loop import run_to_result
from service.repository import read_spec
from service.settings import BUNDLED_MODELS

logger = logging.getLogger(__name__)


@dataclass
class Tally:
    started: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def begin(self, kind: str) -> None:
        self.started[kind] = self.started.get(kind, 0) + 1

    def fail(self, error: BaseException) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{type(error).__name__}: {error}")


async def _native_life(stub: pb_grpc.StreamingInferenceStub, model: str, features: int,
                       rng: random.Random, tally: Tally) -> None:  # fmt: skip
    abandon = rng.random() < 0.4
    tally.begin("native_abandoned" if abandon else "native_closed")
    call = stub.Stream()
    await call.write(pb.StreamRequest(open=pb.CreateSessionRequest(model=model)))
    await call.read()
    for _ in range(rng.randint(1, 40)):
        steps = rng.randint(1, 8)
        x = np.full((steps, features), rng.uniform(-1, 1), np.float32)
        await call.write(
            pb.StreamRequest(
                chunk=pb.Chunk(input=pb.Tensor(shape=[steps, features], data=x.tobytes()))
            )
        )
        await call.read()
        tally.chunks += 1
    if abandon:
        call.cancel()  # gone without a word: the idle timeout must clean up
        return
    await call.write(pb.StreamRequest(close=pb.Close()))
    await call.read()
    await call.done_writing()


async def _kserve_life(stub: kpb_grpc.GRPCInferenceServiceStub, model: str, features: int,
                       rng: random.Random, tally: Tally, sequence_id: int) -> None:  # fmt: skip
    abandon = rng.random() < 0.4
    tally.begin("kserve_abandoned" if abandon else "kserve_closed")
    chunks = rng.randint(1, 40)
    for i in range(chunks):
        steps = rng.randint(1, 8)
        request = kpb.ModelInferRequest(model_name=model)
        request.inputs.add(name="x", datatype="FP32", shape=[1, steps, features])
        request.raw_input_contents.append(np.zeros((steps, features), np.float32).tobytes())
        request.parameters["sequence_id"].int64_param = sequence_id
        request.parameters["sequence_start"].bool_param = i == 0
        request.parameters["sequence_end"].bool_param = i == chunks - 1 and not abandon
        await stub.ModelInfer(request, timeout=30)
        tally.chunks += 1


async def _workload(target: str, models: list[tuple[str, int]], workers: int, seconds: float,
                    seed: int, tally: Tally) -> None:  # fmt: skip
    require_loopback(target)
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        native = pb_grpc.StreamingInferenceStub(channel)
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)

        async def worker(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            sequence = 1 + index * 10_000_000
            while time.monotonic() < deadline:
                model, features = rng.choice(models)
                try:
                    if rng.random() < 0.5:
                        await _native_life(native, model, features, rng, tally)
                    else:
                        sequence += 1
                        await _kserve_life(kserve, model, features, rng, tally, sequence)
                except grpc.RpcError as error:
                    tally.fail(error)

        await asyncio.gather(*(worker(i) for i in range(workers)))


def _live_sessions(server: ServerProcess) -> float:
    assert server.metrics_port is not None
    return sum(
        v
        for k, v in scrape(server.metrics_port).items()
        if k.startswith("rnnserve_active_sessions{")
    )


def _quiet(
    server: ServerProcess, limit_s: float, samples: list[dict[str, float]], t0: float
) -> float:
    """Wait (bounded) until no session is live; returns the seconds it took."""
    started = time.monotonic()
    while _live_sessions(server) > 0 and time.monotonic() - started < limit_s:
        samples.append(_sample(server, t0))
        time.sleep(0.5)  # a script polling a server, not a test
    return time.monotonic() - started


def _sample(server: ServerProcess, t0: float) -> dict[str, float]:
    return {"t_s": time.monotonic() - t0, "rss_mb": rss_bytes(server.process.pid) / 2**20,
            "sessions": _live_sessions(server)}  # fmt: skip


def run_soak(
    duration_s: float, workers: int, ttl_s: float, repository: Path, seed: int = 0
) -> dict[str, Any]:
    models = [
        (d.name, read_spec(d / "1").input_size)
        for d in sorted(repository.iterdir())
        if (d / "1").is_dir()
    ]
    server = start_server(repository, session_ttl_s=ttl_s, ttl_check_interval_s=0.5)
    t0 = time.monotonic()
    samples: list[dict[str, float]] = [_sample(server, t0)]
    tally = Tally()
    try:
        warmup_s = duration_s / 10

        async def load(seconds: float) -> None:
            sampler = asyncio.create_task(_sampling(server, t0, samples))
            try:
                await _workload(server.target, models, workers, seconds, seed, tally)
            finally:
                sampler.cancel()

        logger.info("warm-up load for %.0f s", warmup_s)
        run_to_result(load(warmup_s), "auto")
        _quiet(server, ttl_s * 3 + 10, samples, t0)
        baseline = _sample(server, t0)
        samples.append(baseline)
        logger.info("baseline %s; main load for %.0f s", baseline, duration_s - warmup_s)
        run_to_result(load(duration_s - warmup_s), "auto")
        logger.info(
            "load done: %d sessions started, %d chunks", sum(tally.started.values()), tally.chunks
        )
        drained_s = _quiet(server, ttl_s * 3 + 10, samples, t0)
        end = _sample(server, t0)
        logger.info("end %s", end)
        samples.append(end)
    finally:
        server.stop()
    return {
        "duration_s": duration_s, "workers": workers, "session_ttl_s": ttl_s, "models": [m for m, _ in models],
        "sessions_started": tally.started, "chunks": tally.chunks, "errors": tally.errors,
        "error_samples": tally.error_samples, "baseline": baseline, "end": end,
        "rss_growth_mb": end["rss_mb"] - baseline["rss_mb"], "cleanup_s": drained_s, "samples": samples,
    }  # fmt: skip


async def _sampling(server: ServerProcess, t0: float, samples: list[dict[str, float]]) -> None:
    while True:
        samples.append(await asyncio.to_thread(_sample, server, t0))
        await asyncio.sleep(1.0)


def write_report(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    started = sum(result["sessions_started"].values())
    lines = [
        f"Soak: {result['duration_s']:.0f} s, {result['workers']} workers, session TTL {result['session_ttl_s']} s, "
        f"models {', '.join(result['models'])}.", "",
        "| figure | value |", "|---|---|",
        f"| sessions started | {started:,} ({', '.join(f'{k} {v:,}' for k, v in sorted(result['sessions_started'].items()))}) |",
        f"| chunks answered | {result['chunks']:,} |",
        f"| errors | {result['errors']} |",
        f"| live sessions: baseline / end | {result['baseline']['sessions']:.0f} / {result['end']['sessions']:.0f} |",
        f"| server RSS MB: start / baseline / end | {result['samples'][0]['rss_mb']:.1f} / {result['baseline']['rss_mb']:.1f} / {result['end']['rss_mb']:.1f} |",
        f"| RSS growth baseline to end | {result['rss_growth_mb']:+.1f} MB |",
        f"| time for abandoned sessions to time out after the load | {result['cleanup_s']:.1f} s |",
    ]  # fmt: skip
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    paths = [out / "soak.json", out / "soak.md"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        t = [s["t_s"] for s in result["samples"]]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot(t, [s["rss_mb"] for s in result["samples"]], color="tab:blue")
        ax.set_xlabel("seconds")
        ax.set_ylabel("server RSS (MB)", color="tab:blue")
        other = ax.twinx()
        other.plot(t, [s["sessions"] for s in result["samples"]], color="tab:orange")
        other.set_ylabel("live sessions", color="tab:orange")
        fig.tight_layout()
        fig.savefig(out / "soak.png", dpi=110)
        plt.close(fig)
        paths.append(out / "soak.png")
    except ImportError:
        logger.warning("matplotlib is not installed: no plot")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration-s", type=float, default=600.0, help="load seconds in all")
    parser.add_argument("--workers", type=int, default=32, help="concurrent session lifecycles")
    parser.add_argument("--session-ttl-s", type=float, default=5.0, help="server idle timeout")
    parser.add_argument("--model-repository", type=Path, default=BUNDLED_MODELS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("soak-results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run_soak(
        args.duration_s, args.workers, args.session_ttl_s, args.model_repository, args.seed
    )
    for path in write_report(result, args.out):
        print(path)


if __name__ == "__main__":
    main()
