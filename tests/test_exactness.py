"""The promise: streaming through the server gives exactly the offline full-sequence outputs,
whatever else shares the batch and however the stream is chunked.

200 concurrent sessions over both APIs (native stream, native unary, KServe unary, KServe stream),
LSTM and GRU, random chunk lengths 1..16, interleaved by the event loop in a seeded random order;
with the state in host arrays, and on the device (state_residency=device: onnxruntime arrays moved
by the companion graphs; on this CPU provider, CPU OrtValues), with and without padding to batch
buckets, computed on the event loop and in the worker thread.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.api.native_messages import to_tensor
from tests.chunking import chunk_spans
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

SESSIONS_PER_KIND = 50
KINDS = ("native_stream", "native_unary", "kserve_unary", "kserve_stream")


def plan(seed: int) -> list[tuple[str, str, np.ndarray, list[int]]]:
    """(kind, model, inputs, chunk lengths) for every session."""
    rng = np.random.default_rng(seed)
    sessions = []
    for kind in KINDS:
        for i in range(SESSIONS_PER_KIND):
            model = "tiny_lstm" if i % 2 == 0 else "tiny_gru"
            steps = int(rng.integers(20, 60))
            chunks: list[int] = []
            while sum(chunks) < steps:
                chunks.append(min(int(rng.integers(1, 17)), steps - sum(chunks)))
            sessions.append(
                (kind, model, rng.standard_normal((steps, 3)).astype(np.float32), chunks)
            )
    return sessions


CONFIGURATIONS = {
    "host": {},
    "device": {"state_residency": "device"},
    "device-buckets-worker": {
        "state_residency": "device",
        "batch_buckets": "1,4,16,64",
        "inline_compute_below_s": 0.0,
    },
    "host-buckets": {"batch_buckets": "1,4,16,64"},
}


@pytest.mark.parametrize("configuration", CONFIGURATIONS)
async def test_200_concurrent_sessions_match_offline_runs(
    make_settings: Any, configuration: str
) -> None:
    shuffle = random.Random(11)
    settings = make_settings(
        max_queue_delay_s=0.002, max_batch_size=64, **CONFIGURATIONS[configuration]
    )
    async with serving(settings) as server:
        for handle in server.engine.handles():
            assert handle.store.bank.residency == settings.resolved_state_residency(False)
        async with channel(server.grpc_port) as ch:
            nat, ks = native(ch), kserve(ch)

            async def yield_randomly() -> None:
                for _ in range(shuffle.randint(0, 3)):
                    await asyncio.sleep(0)

            async def native_stream(
                model: str, x: np.ndarray, chunks: list[int]
            ) -> list[np.ndarray]:
                call = nat.Stream()
                await call.write(pb.StreamRequest(open=pb.CreateSessionRequest(model=model)))
                await call.read()
                outputs = []
                for a, b in chunk_spans(chunks):
                    await yield_randomly()
                    await call.write(pb.StreamRequest(chunk=pb.Chunk(input=to_tensor(x[a:b]))))
                    reply = await call.read()
                    assert reply.output.steps == b
                    outputs.append(output_of(reply.output))
                await call.write(pb.StreamRequest(close=pb.Close()))
                assert (await call.read()).ended.steps == len(x)
                await call.done_writing()
                return outputs

            async def native_unary(
                model: str, x: np.ndarray, chunks: list[int]
            ) -> list[np.ndarray]:
                sid = (await nat.CreateSession(pb.CreateSessionRequest(model=model))).session_id
                outputs = []
                for i, (a, b) in enumerate(chunk_spans(chunks)):
                    await yield_randomly()
                    reply = await nat.Step(
                        step_request(model, sid, x[a:b], end=i == len(chunks) - 1)
                    )
                    outputs.append(output_of(reply))
                return outputs

            async def kserve_unary(
                model: str, x: np.ndarray, chunks: list[int], sid: int
            ) -> list[np.ndarray]:
                outputs = []
                for i, (a, b) in enumerate(chunk_spans(chunks)):
                    await yield_randomly()
                    request = infer_request(
                        model, sid, x[a:b], start=i == 0, end=i == len(chunks) - 1, raw=i % 2 == 0
                    )
                    outputs.append(infer_output(await ks.ModelInfer(request)))
                return outputs

            async def kserve_stream(
                model: str, x: np.ndarray, chunks: list[int], sid: int
            ) -> list[np.ndarray]:
                async def requests() -> AsyncIterator[kpb.ModelInferRequest]:
                    for i, (a, b) in enumerate(chunk_spans(chunks)):
                        await yield_randomly()
                        yield infer_request(
                            model,
                            f"s{sid}",
                            x[a:b],
                            start=i == 0,
                            end=i == len(chunks) - 1,
                            request_id=str(i),
                        )

                replies = [r async for r in ks.ModelStreamInfer(requests())]
                assert all(r.error_message == "" for r in replies), [
                    r.error_message for r in replies
                ]
                return [
                    infer_output(r.infer_response)
                    for r in sorted(replies, key=lambda r: int(r.infer_response.id))
                ]

            sessions = plan(seed=5)
            runs = []
            for n, (kind, model, x, chunks) in enumerate(sessions):
                if kind == "native_stream":
                    runs.append(native_stream(model, x, chunks))
                elif kind == "native_unary":
                    runs.append(native_unary(model, x, chunks))
                elif kind == "kserve_unary":
                    runs.append(kserve_unary(model, x, chunks, 1000 + n))
                else:
                    runs.append(kserve_stream(model, x, chunks, n))
            results = await asyncio.gather(*runs)

        references = {
            m: OfflineReference(server.settings.model_repository, m)
            for m in ("tiny_lstm", "tiny_gru")
        }
        for (kind, model, x, chunks), outputs in zip(sessions, results, strict=True):
            streamed = np.concatenate(outputs)
            np.testing.assert_allclose(
                streamed, references[model](x), atol=1e-5, err_msg=f"{kind} {model} {chunks}"
            )

        registry = server.metrics.registry
        for model in ("tiny_lstm", "tiny_gru"):
            labels = {"model": model, "version": "1"}
            calls = registry.get_sample_value("rnnserve_batch_size_count", labels)
            up_to_4 = registry.get_sample_value(
                "rnnserve_batch_size_bucket", {**labels, "le": "4.0"}
            )
            assert calls and up_to_4 is not None
            assert calls - up_to_4 > 0, f"{model}: no model call held more than 4 sessions"
            assert registry.get_sample_value("rnnserve_active_sessions", labels) == 0
