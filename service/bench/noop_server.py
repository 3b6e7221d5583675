"""The transport limit: a gRPC server with rnnserve's messages and settings that computes nothing.

It answers every native chunk and every KServe stream request at once with zeros of the right shape,
so a load against it measures what Python gRPC itself costs per message on this machine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np

from service._proto.inference import grpc_service_pb2 as kpb
from service._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from service._proto.rnnserve.v1 import streaming_pb2 as pb
from service._proto.rnnserve.v1 import streaming_pb2_grpc as pb_grpc


class NoopNative(pb_grpc.StreamingInferenceServicer):
    def __init__(self, outputs: int) -> None:
        self.outputs = outputs

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        steps = 0
        async for request in request_iterator:
            kind = request.WhichOneof("kind")
            if kind == "open":
                yield pb.StreamResponse(
                    opened=pb.SessionInfo(session_id="noop", model=request.open.model)
                )
            elif kind == "chunk":
                length = int(request.chunk.input.shape[0])
                steps += length
                zeros = np.zeros((length, self.outputs), "<f4").tobytes()
                output = pb.StepResponse(
                    session_id="noop",
                    output=pb.Tensor(shape=[length, self.outputs], data=zeros),
                    steps=steps,
                )
                yield pb.StreamResponse(output=output)
            else:
                yield pb.StreamResponse(
                    ended=pb.SessionEnded(
                        session_id="noop", reason=pb.END_REASON_CLOSED, steps=steps
                    )
                )
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
            length = int(request.inputs[0].shape[1])
            zeros = np.zeros((1, length, self.outputs), "<f4").tobytes()
            response = kpb.ModelInferResponse(
                model_name=request.model_name, id=request.id, raw_output_contents=[zeros]
            )
            response.outputs.add(name="y", datatype="FP32", shape=[1, length, self.outputs])
            yield kpb.ModelStreamInferResponse(infer_response=response)


async def start_noop_server(
    host: str, outputs: int, max_message_bytes: int = 16 * 1024 * 1024
) -> tuple[grpc.aio.Server, int]:
    """Start the no-op server on ``host`` and a free port; returns the server and the port."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_StreamingInferenceServicer_to_server(NoopNative(outputs), server)
    kpb_grpc.add_GRPCInferenceServiceServicer_to_server(NoopKServe(outputs), server)
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    return server, port


def main() -> None:
    """``python -m service.bench.noop_server --outputs N --port-file F``: serve until SIGTERM."""
    import argparse
    import asyncio
    import json
    import signal
    from pathlib import Path

    from service.event_loop import run as run_event_loop
    from service.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--outputs", type=int, required=True, help="output features per step")
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--event-loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument(
        "--gil-switch-interval-s",
        type=float,
        default=Settings.model_fields["gil_switch_interval_s"].default,
        help="as the server's setting of that name (same default)",
    )
    args = parser.parse_args()

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
