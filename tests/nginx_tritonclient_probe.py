"""tritonclient, unmodified, through nginx: every request and stream of a sequence carries the
sequence id as the ``x-session-id`` header (``headers=``), so nginx's hash sends it to one replica.
Run as a subprocess by tests/test_nginx_routing.py (tritonclient registers its own copy of the
``inference`` protobuf package, which cannot share a process with the server's). Usage:

    python tests/nginx_tritonclient_probe.py URL MODEL INPUTS.npz OUTPUTS.npz FIRST LAST [all]

INPUTS.npz holds ``ids`` (sequence ids), ``x_<i>`` [steps, features] and ``chunks_<i>`` (chunk
lengths), one per sequence. Chunks FIRST..LAST-1 of every sequence go by ``infer`` (START with
chunk 0, END with the sequence's last chunk); OUTPUTS.npz receives their outputs as ``infer_<i>``.
With ``all``, every sequence also streams whole on its own ``ModelStreamInfer`` stream, opened
with its header (``stream_<i>``), and goes once by ``infer`` without the header: ``unrouted``
counts those that failed.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from chunking import chunk_spans  # tests/ is on sys.path when run as a script
from stream_replies import StreamReplies
from tritonclient.utils import InferenceServerException


def make_input(x: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("x", [1, *x.shape], "FP32")
    tensor.set_data_from_numpy(x[None].astype(np.float32))
    return tensor


def infer_chunks(
    client: grpcclient.InferenceServerClient, model: str, sequence_id: int, x: np.ndarray,
    spans: list[tuple[int, int]], first: int, last: int, headers: dict[str, str] | None,
) -> np.ndarray:  # fmt: skip
    parts = []
    for n in range(first, last):
        a, b = spans[n]
        result = client.infer(
            model,
            [make_input(x[a:b])],
            sequence_id=sequence_id,
            sequence_start=n == 0,
            sequence_end=n == len(spans) - 1,
            headers=headers,
        )
        parts.append(result.as_numpy("y")[0])
    return np.concatenate(parts)


def stream_whole(url: str, model: str, sequence_id: int, x: np.ndarray,
                 spans: list[tuple[int, int]]) -> np.ndarray:  # fmt: skip
    """One sequence on its own stream: the header is sent once, when the stream opens, and
    routes every request on it."""
    client = grpcclient.InferenceServerClient(url=url)
    stream = StreamReplies(lambda result: result.as_numpy("y")[0])

    client.start_stream(callback=stream.callback, headers={"x-session-id": str(sequence_id)})
    for n, (a, b) in enumerate(spans):
        client.async_stream_infer(
            model,
            [make_input(x[a:b])],
            request_id=str(n),
            sequence_id=sequence_id,
            sequence_start=n == 0,
            sequence_end=n == len(spans) - 1,
        )
    stream.wait(len(spans), timeout_s=60)
    client.stop_stream()
    client.close()
    if stream.errors or len(stream.replies) < len(spans):
        raise SystemExit(f"stream of sequence {sequence_id}: {stream.errors or 'replies missing'}")
    return np.concatenate([stream.replies[str(n)] for n in range(len(spans))])


def main(url: str, model: str, inputs_path: str, outputs_path: str, first: str, last: str,
         *extra: str) -> None:  # fmt: skip
    data = np.load(inputs_path)
    ids = [int(i) for i in data["ids"]]
    client = grpcclient.InferenceServerClient(url=url)
    results: dict[str, Any] = {}
    for i, sequence_id in enumerate(ids):
        x, spans = data[f"x_{i}"], chunk_spans(data[f"chunks_{i}"].tolist())
        stop = len(spans) if last == "end" else int(last)
        header = {"x-session-id": str(sequence_id)}
        results[f"infer_{i}"] = infer_chunks(client, model, sequence_id, x, spans, int(first),
                                             stop, header)  # fmt: skip
    if "all" in extra:
        unrouted = 0
        for i, sequence_id in enumerate(ids):
            x, spans = data[f"x_{i}"], chunk_spans(data[f"chunks_{i}"].tolist())
            results[f"stream_{i}"] = stream_whole(url, model, sequence_id + 1000, x, spans)
            try:  # without the header: nginx spreads the requests round robin
                infer_chunks(client, model, sequence_id + 2000, x, spans, 0, len(spans), None)
            except InferenceServerException:
                unrouted += 1
        results["unrouted"] = np.array(unrouted)
    client.close()
    np.savez(outputs_path, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
