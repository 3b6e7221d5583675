"""Drive a server with the unmodified tritonclient library; run as a subprocess by the tests.

tritonclient registers its own copy of the ``inference`` protobuf package, which cannot share a
process with the server's. Usage:

    python tests/tritonclient_probe.py URL MODEL INPUTS.npz OUTPUTS.npz

INPUTS.npz holds ``x_<i>`` [steps, features] arrays and ``chunks_<i>`` chunk lengths, one per
sequence. OUTPUTS.npz receives ``infer_<i>`` (one ModelInfer per chunk with sequence_id/start/end)
and ``stream_<i>`` (all sequences interleaved on one ModelStreamInfer stream), plus ``metadata``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from chunking import chunk_spans  # tests/ is on sys.path when run as a script
from stream_replies import StreamReplies


def make_input(x: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("x", [1, *x.shape], "FP32")
    tensor.set_data_from_numpy(x[None].astype(np.float32))
    return tensor


def main(url: str, model: str, inputs_path: str, outputs_path: str) -> None:
    data = np.load(inputs_path)
    count = len([k for k in data.files if k.startswith("x_")])
    client = grpcclient.InferenceServerClient(url=url)
    results: dict[str, Any] = {}
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
    metadata = client.get_model_metadata(model, as_json=True)
    config = client.get_model_config(model, as_json=True)
    server = client.get_server_metadata(as_json=True)

    for i in range(count):
        x, chunks = data[f"x_{i}"], data[f"chunks_{i}"]
        parts = []
        for n, (a, b) in enumerate(chunk_spans(chunks.tolist())):
            result = client.infer(
                model,
                [make_input(x[a:b])],
                outputs=[grpcclient.InferRequestedOutput("y")],
                sequence_id=500 + i,
                sequence_start=n == 0,
                sequence_end=n == len(chunks) - 1,
            )
            parts.append(result.as_numpy("y")[0])
        results[f"infer_{i}"] = np.concatenate(parts)

    stream = StreamReplies(lambda result: result.as_numpy("y")[0])
    expected = sum(len(data[f"chunks_{i}"]) for i in range(count))

    client.start_stream(callback=stream.callback)
    plans = [chunk_spans(data[f"chunks_{i}"].tolist()) for i in range(count)]
    for n in range(max(len(p) for p in plans)):  # interleave the sequences on one stream
        for i, plan in enumerate(plans):
            if n < len(plan):
                a, b = plan[n]
                client.async_stream_infer(
                    model,
                    [make_input(data[f"x_{i}"][a:b])],
                    request_id=f"{i}:{n}",
                    sequence_id=f"stream-{i}",
                    sequence_start=n == 0,
                    sequence_end=n == len(plan) - 1,
                )
    stream.wait(expected, timeout_s=60)
    client.stop_stream()
    if stream.errors:
        raise SystemExit(f"stream errors: {stream.errors}")
    for i, plan in enumerate(plans):
        results[f"stream_{i}"] = np.concatenate(
            [stream.replies[f"{i}:{n}"] for n in range(len(plan))]
        )
    results["metadata"] = np.array(
        json.dumps({"model": metadata, "config": config, "server": server})
    )
    np.savez(outputs_path, **results)
    client.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
