"""The transport limit: a gRPC server with rnnserve's messages and settings that computes nothing.

It answers every native chunk and every KServe stream request at once with zeros of the right shape,
so a load against it measures what Python gRPC itself costs per message on this machine.

Two flavours answer identically: ``asyncio`` (``grpc.aio``, what ``rnnserve serve`` is built on and
what the benchmark compares against) and ``threads`` (the synchronous ``grpc.server`` over a thread
pool, one thread per open stream), kept so the choice of ``grpc.aio`` can be re-measured
(docs/PERFORMANCE.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import grpc
import numpy as np

from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service._proto.rnnserve.v1 import streaming_pb2_grpc as pb_grpc

Flavour = Literal["asyncio", "threads"]


class NativeReplies:
    """The replies of one native stream, in order: ``answer`` gives each request's reply and
    whether the stream ends with it (the reply to a close)."""

    def __init__(self, outputs: int) -> None:
        self.outputs = outputs
        self.steps = 0

    def answer(self, request: pb.StreamRequest) -> tuple[pb.StreamResponse, bool]:
        kind = request.WhichOneof("kind")
        if kind == "open":
            info = pb.SessionInfo(session_id="noop", model=request.open.model)
            return pb.StreamResponse(opened=info), False
        if kind == "chunk":
            length = int(request.chunk.input.shape[0])
            self.steps += length
            zeros = np.zeros((length, self.outputs), "<f4").tobytes()
            output = pb.StepResponse(
                session_id="noop",
                output=pb.Tensor(shape=[length, self.outputs], data=zeros),
                steps=self.steps,
            )
            return pb.StreamResponse(output=output), False
        ended = pb.SessionEnded(session_id="noop", reason=pb.END_REASON_CLOSED, steps=self.steps)
        return pb.StreamResponse(ended=ended), True


def kserve_reply(request: kpb.ModelInferRequest, outputs: int) -> kpb.ModelStreamInferResponse:
    length = int(request.inputs[0].shape[1])
    zeros = np.zeros((1, length, outputs), "<f4").tobytes()
    response = kpb.ModelInferResponse(
        model_name=request.model_name, id=request.id, raw_output_contents=[zeros]
    )
    response.outputs.add(name="y", datatype="FP32", shape=[1, length, outputs])
    return kpb.ModelStreamInferResponse(infer_response=response)


class NoopNative(pb_grpc.StreamingInferenceServicer):
    def __init__(self, outputs: int) -> None:
        self.outputs = outputs

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        replies = NativeReplies(self.outputs)
        async for request in request_iterator:
            reply, last = replies.answer(request)
            yield reply
            if last:
                return


class NoopKServe(kpb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, outputs: int) -> None:
        self.outputs = outputs

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[kpb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        async for request in request_iterator:
            yield kserve_reply(request, self.outputs)


class ThreadedNoopNative(pb_grpc.StreamingInferenceServicer):
    def __init__(self, outputs: int) -> None:
        self.outputs = outputs

    def Stream(
        self, request_iterator: Iterable[pb.StreamRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.StreamResponse]:
        replies = NativeReplies(self.outputs)
        for request in request_iterator:
            reply, last = replies.answer(request)
            yield reply
            if last:
                return


class ThreadedNoopKServe(kpb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, outputs: int) -> None:
        self.outputs = outputs

    def ModelStreamInfer(
        self, request_iterator: Iterable[kpb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[kpb.ModelStreamInferResponse]:
        for request in request_iterator:
            yield kserve_reply(request, self.outputs)


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


async def start_noop_server(
    host: str, outputs: int, max_message_bytes: int = 16 * 1024 * 1024
) -> tuple[grpc.aio.Server, int]:
    """Start the asyncio no-op server on ``host`` and a free port; returns the server and the
    port."""
    server = grpc.aio.server(options=_options(max_message_bytes))
    pb_grpc.add_StreamingInferenceServicer_to_server(NoopNative(outputs), server)
    kpb_grpc.add_GRPCInferenceServiceServicer_to_server(NoopKServe(outputs), server)
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    return server, port


def start_threaded_noop_server(
    host: str, outputs: int, threads: int, max_message_bytes: int = 16 * 1024 * 1024
) -> tuple[grpc.Server, int]:
    """Start the thread-pool no-op server. Concurrency: a synchronous gRPC server holds one pool
    thread per open stream for the stream's life, so ``threads`` caps the concurrent streams; the
    rest wait (``maximum_concurrent_rpcs`` is left unset, as a naive deployment would)."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="noop"),
        options=_options(max_message_bytes),
    )
    pb_grpc.add_StreamingInferenceServicer_to_server(ThreadedNoopNative(outputs), server)
    kpb_grpc.add_GRPCInferenceServiceServicer_to_server(ThreadedNoopKServe(outputs), server)
    port = server.add_insecure_port(f"{host}:0")
    server.start()
    return server, port


def main() -> None:
    """``python -m bench.noop_server --outputs N --port-file F``: serve until SIGTERM."""
    import argparse
    import asyncio
    import json
    import signal
    import sys
    import threading
    from pathlib import Path

    from service.event_loop import run as run_event_loop
    from service.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--outputs", type=int, required=True, help="output features per step")
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--flavour", choices=("asyncio", "threads"), default="asyncio")
    parser.add_argument(
        "--threads",
        type=int,
        default=1100,
        help="threads flavour: pool size, i.e. the most streams served at once (default covers "
        "the benchmark's 1,024 sessions)",
    )
    parser.add_argument("--event-loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument(
        "--gil-switch-interval-s",
        type=float,
        default=Settings.model_fields["gil_switch_interval_s"].default,
        help="as the server's setting of that name (same default)",
    )
    args = parser.parse_args()

    if args.flavour == "threads":
        sys.setswitchinterval(args.gil_switch_interval_s)
        server, port = start_threaded_noop_server(args.host, args.outputs, args.threads)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        args.port_file.write_text(json.dumps({"grpc_port": port}))
        print("serving", flush=True)
        stop.wait()
        server.stop(grace=0.5).wait()
        return

    async def serve() -> None:
        server, port = await start_noop_server(args.host, args.outputs)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        args.port_file.write_text(json.dumps({"grpc_port": port}))
        print("serving", flush=True)
        await stop.wait()
        await server.stop(grace=0.5)

    run_event_loop(serve(), args.event_loop, args.gil_switch_interval_s)


if __name__ == "__main__":
    main()
