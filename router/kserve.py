"""The KServe v2 / Open Inference Protocol gRPC API (``inference.GRPCInferenceService``), in
the shape Triton's LLM backends use, so stock ``tritonclient[grpc]`` works:

inputs   ``text_input`` (BYTES [1], required), ``stream`` (BOOL [1]), ``sampling_parameters``
         (BYTES [1], a JSON object of OpenAI/vLLM sampling fields), ``exclude_input_in_output``
         (BOOL [1]); sampling fields may also come as request ``parameters``.
outputs  ``text_output`` (BYTES [1]): the new text of each streamed response, or the whole
         text (prompt included unless ``exclude_input_in_output``) for ``ModelInfer``.

``ModelStreamInfer`` streams one response per new piece of text; the last one carries the
parameter ``triton_final_response = true``. Errors in the stream come as ``error_message``.
These stubs register the ``inference`` proto package: never import this module in a process
that also imports ``tritonclient.grpc``.
"""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from protocol.sampling import SamplingParams
from router import request_params
from router.errors import (
    InvalidRequestError,
    ModelNotReadyError,
    NoWorkersError,
    OverloadedError,
    RequestError,
    UnknownModelError,
    WorkerFailedError,
)
from router.models import ModelCatalog, ServedModel
from router.request_flow import RequestFlow
from router.text_generation import Generation
from runtime.pb import kserve_inference_pb2 as pb
from runtime.pb import kserve_inference_pb2_grpc as pb_grpc

# The sampling fields a request may carry (n is OpenAI's: one text_output per request here).
_SAMPLING_FIELDS = sorted(set(request_params.SAMPLING_FIELDS) - {"n", "logprobs"})


class KServeError(RequestError):
    pass


def _decode_input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> list[Any]:
    """An input's elements, from its raw contents when the request has them. Malformed contents
    (a length prefix running past the end, a size that is not a whole number of elements) are a
    KServeError (INVALID_ARGUMENT), never a partial read."""
    dt = tensor.datatype
    if raw is not None:
        if dt == "BYTES":
            out, pos = [], 0
            while pos < len(raw):
                if pos + 4 > len(raw):
                    raise KServeError(f"input {tensor.name!r}: raw contents end inside a length prefix")
                (n,) = struct.unpack_from("<I", raw, pos)
                if pos + 4 + n > len(raw):
                    raise KServeError(f"input {tensor.name!r}: an element of {n} bytes runs past the raw contents")
                out.append(raw[pos + 4:pos + 4 + n])
                pos += 4 + n
            return out
        if dt == "BOOL":
            return [b != 0 for b in raw]
        fmt = {"INT32": "i", "INT64": "q", "UINT32": "I", "FP32": "f", "FP64": "d"}.get(dt)
        if fmt is None:
            raise KServeError(f"input {tensor.name!r}: datatype {dt} is not supported")
        size = struct.calcsize(fmt)
        if len(raw) % size:
            raise KServeError(f"input {tensor.name!r}: {len(raw)} bytes of raw contents are not whole {dt} elements")
        return list(struct.unpack(f"<{len(raw) // size}{fmt}", raw))
    c = tensor.contents
    return list(c.bytes_contents or c.bool_contents or c.int_contents or c.int64_contents or c.uint_contents
                or c.fp32_contents or c.fp64_contents)


def _first(inputs: dict[str, list[Any]], name: str, default: Any) -> Any:
    """The first element of an optional input; ``default`` when absent or empty."""
    values = inputs.get(name)
    return values[0] if values else default


def _text(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, bytes):
        raise KServeError(f"input {name!r} must be BYTES (UTF-8 text), got {type(value).__name__}")
    try:
        return value.decode()
    except UnicodeDecodeError as e:
        raise KServeError(f"input {name!r} is not valid UTF-8: {e}") from None


def _param(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def parse_request(req: pb.ModelInferRequest, catalog: ModelCatalog, streaming: bool
                  ) -> tuple[ServedModel, list[int], SamplingParams, bool, str]:
    """(model, prompt ids, sampling, include the input in the output, prompt text); a RequestError
    (KServeError, UnknownModelError) if bad."""
    model = catalog.resolve(req.model_name)
    inputs: dict[str, list[Any]] = {}
    for i, tensor in enumerate(req.inputs):
        raw = req.raw_input_contents[i] if i < len(req.raw_input_contents) else None
        inputs[tensor.name] = _decode_input(tensor, raw)
    if not inputs.get("text_input"):
        raise KServeError("the request needs a BYTES input 'text_input'")
    text = _text(inputs["text_input"][0], "text_input")
    fields = _sampling_fields(req, inputs)
    fields.setdefault("max_tokens", 16)
    fields.setdefault("temperature", 0.0)
    prompt_ids = model.tokenizer.encode(text)
    if not prompt_ids:
        raise KServeError("text_input is empty")
    sampling = request_params.prepare(model, prompt_ids, fields, prompt_param="text_input")
    exclude = _first(inputs, "exclude_input_in_output", streaming)
    return model, prompt_ids, sampling, not bool(exclude), text


def _sampling_fields(req: pb.ModelInferRequest, inputs: dict[str, list[Any]]) -> dict[str, Any]:
    """Sampling fields from, in increasing priority, the request's parameters, the JSON of its
    ``sampling_parameters`` input, and inputs of their own name."""
    fields: dict[str, Any] = {name: _param(value) for name, value in req.parameters.items() if name in _SAMPLING_FIELDS}
    raw = _first(inputs, "sampling_parameters", None)
    if raw is not None:
        try:
            extra = json.loads(_text(raw, "sampling_parameters"))
        except (ValueError, RecursionError) as e:
            raise KServeError(f"sampling_parameters is not valid JSON: {e}") from None
        if not isinstance(extra, dict):
            raise KServeError("sampling_parameters must be a JSON object")
        unknown = sorted(set(extra) - set(_SAMPLING_FIELDS))
        if unknown:
            raise KServeError(f"unknown sampling parameters: {unknown}")
        fields.update(extra)
    for name in _SAMPLING_FIELDS:
        if inputs.get(name):
            fields[name] = inputs[name][0]
    return fields


def _text_response(req: pb.ModelInferRequest, model: ServedModel, text: str, final: bool | None
                   ) -> pb.ModelInferResponse:
    data = text.encode()
    resp = pb.ModelInferResponse(model_name=model.name, model_version="1", id=req.id)
    resp.outputs.append(pb.ModelInferResponse.InferOutputTensor(name="text_output", datatype="BYTES", shape=[1]))
    resp.raw_output_contents.append(struct.pack("<I", len(data)) + data)
    if final is not None:
        resp.parameters["triton_final_response"].bool_param = final
    return resp


def _status(e: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, UnknownModelError):
        return grpc.StatusCode.NOT_FOUND, str(e)
    if isinstance(e, RequestError | InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, NoWorkersError | ModelNotReadyError):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, WorkerFailedError):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    if isinstance(e, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e} (retry after {e.retry_after_s} s)"
    return grpc.StatusCode.INTERNAL, f"internal error: {e!r}"


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Server and model readiness follow the model catalog: ready once ``/v1/models`` lists the model."""

    def __init__(self, flow: RequestFlow, catalog: ModelCatalog) -> None:
        self.flow, self.catalog = flow, catalog

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.catalog.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=any(m.name == request.name for m in self.catalog.listed()))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="tandem", version="0.1.0", extensions=["streaming"])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ModelMetadataResponse:
        if not any(m.name == request.name for m in self.catalog.listed()):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        t = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=["1"], platform="tandem",
            inputs=[t(name="text_input", datatype="BYTES", shape=[1]), t(name="stream", datatype="BOOL", shape=[1]),
                    t(name="sampling_parameters", datatype="BYTES", shape=[1]),
                    t(name="exclude_input_in_output", datatype="BOOL", shape=[1])],
            outputs=[t(name="text_output", datatype="BYTES", shape=[-1])])

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        try:
            model, prompt_ids, sampling, include_input, text = parse_request(request, self.catalog, False)
            gen = Generation(self.flow, model, prompt_ids, sampling, request_id=request.id or None)
            async for _ in gen.stream():
                pass
        except Exception as e:
            code, message = _status(e)
            trailing = (("retry-after", str(e.retry_after_s)),) if isinstance(e, OverloadedError) else ()
            await context.abort(code, message, trailing_metadata=trailing)
        out = "".join(c.text for c in gen.choices)
        return _text_response(request, model, (text if include_input else "") + out, None)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently; their responses interleave (matched by id)."""
        queue: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def read() -> None:
            async for req in request_iterator:
                task = asyncio.create_task(self._stream_one(req, queue))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            await queue.put(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _stream_one(self, req: pb.ModelInferRequest, queue: asyncio.Queue) -> None:
        """One request of a stream: its text pieces, or its error, onto the stream's queue."""
        try:
            model, prompt_ids, sampling, _, _ = parse_request(req, self.catalog, True)
            gen = Generation(self.flow, model, prompt_ids, sampling,
                             request_id=f"{req.id or 'kserve'}-{uuid.uuid4().hex[:8]}")
            async for d in gen.stream():
                if d.text or d.finish_reason is not None:
                    resp = _text_response(req, model, d.text, d.finish_reason is not None)
                    await queue.put(pb.ModelStreamInferResponse(infer_response=resp))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            _, message = _status(e)
            await queue.put(pb.ModelStreamInferResponse(error_message=message,
                                                        infer_response=pb.ModelInferResponse(id=req.id)))


def add_kserve(server: grpc.aio.Server, flow: RequestFlow, catalog: ModelCatalog) -> None:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(flow, catalog), server)
