"""A stand-in KServe v2 gRPC server built on our stubs, for tests that drive it with stock
tritonclient from another process (the two cannot share one: see runtime/pb/__init__.py).

    PYTHONPATH=. python tests/proto/kserve_stream_server.py   # prints its port, serves until killed

Model "echo": its BYTES input "text_input" comes back one whitespace-separated word per
streamed response on output "text_output". Any other model name gets an in-stream error.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import grpc

from runtime.pb import kserve_inference_pb2 as pb
from runtime.pb import kserve_inference_pb2_grpc as pb_grpc

MODEL = "echo"


def _bytes_element(raw: bytes) -> bytes:
    """The first element of a raw BYTES tensor: a 4-byte little-endian length, then the bytes."""
    (size,) = struct.unpack_from("<I", raw)
    return raw[4:4 + size]


def _text_response(request: pb.ModelInferRequest, text: bytes, final: bool) -> pb.ModelStreamInferResponse:
    response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    if text:
        response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
        response.raw_output_contents.append(struct.pack("<I", len(text)) + text)
    response.parameters["triton_final_response"].bool_param = final
    return pb.ModelStreamInferResponse(infer_response=response)


class EchoServer(pb_grpc.GRPCInferenceServiceServicer):
    async def ServerLive(self, request: pb.ServerLiveRequest, context: object) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: object) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == MODEL)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: object) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            if request.model_name != MODEL:
                yield pb.ModelStreamInferResponse(error_message=f"unknown model {request.model_name!r}")
                continue
            words = _bytes_element(request.raw_input_contents[0]).split()
            empty_final = request.parameters["triton_enable_empty_final_response"].bool_param
            for i, word in enumerate(words):
                yield _text_response(request, word, final=not empty_final and i == len(words) - 1)
            if empty_final:
                yield _text_response(request, b"", final=True)


async def main() -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoServer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
