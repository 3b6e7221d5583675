"""tritonclient, unmodified, against the KServe v2 / Triton sequence API: ``infer`` with
sequence_id/start/end and ``start_stream``/``async_stream_infer`` give the native API's outputs."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service.server import RnnServer
from tests.chunking import chunk_spans
from tests.grpc_helpers import channel, native, output_of, step_request

PROBE = Path(__file__).with_name("tritonclient_probe.py")
ROOT = Path(__file__).resolve().parent.parent


async def native_outputs(
    server: RnnServer, model: str, x: np.ndarray, chunks: list[int]
) -> np.ndarray:
    async with channel(server.grpc_port) as ch:
        stub = native(ch)
        sid = (await stub.CreateSession(pb.CreateSessionRequest(model=model))).session_id
        parts = [
            output_of(await stub.Step(step_request(model, sid, x[a:b])))
            for a, b in chunk_spans(chunks)
        ]
        return np.concatenate(parts)


async def test_tritonclient_infer_and_stream_match_native_api(
    server: RnnServer, tmp_path: Path
) -> None:
    rng = np.random.default_rng(21)
    sequences: list[tuple[np.ndarray, list[int]]] = []
    for _ in range(4):
        chunks = [int(c) for c in rng.integers(1, 8, size=int(rng.integers(2, 6)))]
        sequences.append((rng.standard_normal((sum(chunks), 3)).astype(np.float32), chunks))
    inputs: dict[str, Any] = {}
    for i, (x, chunks) in enumerate(sequences):
        inputs[f"x_{i}"] = x
        inputs[f"chunks_{i}"] = np.array(chunks)
    np.savez(tmp_path / "in.npz", **inputs)
    for model in ("tiny_lstm", "tiny_gru"):
        out = tmp_path / f"{model}.npz"
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(PROBE), f"127.0.0.1:{server.grpc_port}", model, str(tmp_path / "in.npz"), str(out),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        stdout, _ = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode == 0, stdout.decode()
        results = np.load(out)
        for i, (x, chunks) in enumerate(sequences):
            expected = await native_outputs(server, model, x, chunks)
            np.testing.assert_allclose(results[f"infer_{i}"], expected, atol=1e-6)
            np.testing.assert_allclose(results[f"stream_{i}"], expected, atol=1e-6)
        metadata = json.loads(str(results["metadata"]))
        assert metadata["config"]["config"]["sequence_batching"]
        assert "sequence" in metadata["server"]["extensions"]
