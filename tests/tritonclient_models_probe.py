"""Stream models of several inputs and outputs through a server with the unmodified tritonclient
library; run as a subprocess by tests/test_export_models.py (tritonclient registers its own copy
of the ``inference`` protobuf package, which cannot share a process with the server's). Usage:

    python tests/tritonclient_models_probe.py URL PLAN.json INPUTS.npz OUTPUTS.npz

PLAN.json lists ``{"model", "inputs": [[name, datatype], ...], "outputs": [name, ...],
"sequences": [{"key", "chunks": [...]}, ...]}`` per model; INPUTS.npz holds ``<key>__<input>``
[steps, ...] arrays. OUTPUTS.npz receives ``infer__<key>__<output>`` (one ModelInfer per chunk
with sequence_id/start/end, every input by name, every output requested by name) and
``stream__<key>__<output>`` (every sequence of every model interleaved on one ModelStreamInfer
stream, string sequence ids).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from chunking import chunk_spans  # tests/ is on sys.path when run as a script
from stream_replies import StreamReplies


def make_inputs(
    names: list[list[str]], data: Any, key: str, a: int, b: int
) -> list[grpcclient.InferInput]:
    tensors = []
    for name, datatype in names:
        part = data[f"{key}__{name}"][a:b][None]
        tensor = grpcclient.InferInput(name, list(part.shape), datatype)
        tensor.set_data_from_numpy(part.astype(np.int64 if datatype == "INT64" else np.float32))
        tensors.append(tensor)
    return tensors


def main(url: str, plan_path: str, inputs_path: str, outputs_path: str) -> None:
    with open(plan_path) as handle:
        plan = json.load(handle)
    data = np.load(inputs_path)
    client = grpcclient.InferenceServerClient(url=url)
    results: dict[str, np.ndarray] = {}
    sequence_id = 700
    for model in plan:
        assert client.is_model_ready(model["model"]), model["model"]
        for sequence in model["sequences"]:
            sequence_id += 1
            spans = chunk_spans(sequence["chunks"])
            parts: dict[str, list[np.ndarray]] = {name: [] for name in model["outputs"]}
            for n, (a, b) in enumerate(spans):
                result = client.infer(
                    model["model"],
                    make_inputs(model["inputs"], data, sequence["key"], a, b),
                    outputs=[grpcclient.InferRequestedOutput(o) for o in model["outputs"]],
                    sequence_id=sequence_id,
                    sequence_start=n == 0,
                    sequence_end=n == len(spans) - 1,
                )
                for name in model["outputs"]:
                    parts[name].append(result.as_numpy(name)[0])
            for name, chunks in parts.items():
                results[f"infer__{sequence['key']}__{name}"] = np.concatenate(chunks)

    stream = StreamReplies()

    runs = [
        (model, sequence, chunk_spans(sequence["chunks"]))
        for model in plan
        for sequence in model["sequences"]
    ]
    client.start_stream(callback=stream.callback)
    expected = 0
    for n in range(max(len(spans) for _, _, spans in runs)):  # interleaved, round robin
        for model, sequence, spans in runs:
            if n < len(spans):
                a, b = spans[n]
                client.async_stream_infer(
                    model["model"],
                    make_inputs(model["inputs"], data, sequence["key"], a, b),
                    outputs=[grpcclient.InferRequestedOutput(o) for o in model["outputs"]],
                    request_id=f"{sequence['key']}:{n}",
                    sequence_id=f"stream-{sequence['key']}",
                    sequence_start=n == 0,
                    sequence_end=n == len(spans) - 1,
                )
                expected += 1
    stream.wait(expected, timeout_s=120)
    client.stop_stream()
    if stream.errors:
        raise SystemExit(f"stream errors: {stream.errors}")
    for model, sequence, spans in runs:
        for name in model["outputs"]:
            results[f"stream__{sequence['key']}__{name}"] = np.concatenate(
                [
                    stream.replies[f"{sequence['key']}:{n}"].as_numpy(name)[0]
                    for n in range(len(spans))
                ]
            )
    np.savez(outputs_path, **results)
    client.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
