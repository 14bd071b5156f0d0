"""proto/kserve_inference.proto is wire-compatible with stock tritonclient[grpc].

Never import runtime.pb.kserve_inference_pb2 in this (pytest's) process: tritonclient.grpc
registers the same `inference.*` symbols, and whichever comes second fails to import. The
schema is read from the generated module's source instead, and our server runs in a
subprocess.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
OUR_PB2 = REPO_ROOT / "runtime" / "pb" / "kserve_inference_pb2.py"
SERVER = Path(__file__).resolve().parent / "kserve_stream_server.py"
FieldProto = descriptor_pb2.FieldDescriptorProto


def _load_generate():  # proto/ is not a package (the name `proto` belongs to proto-plus)
    path = REPO_ROOT / "proto" / "generate.py"
    spec = importlib.util.spec_from_file_location("tandem_proto_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ours() -> descriptor_pb2.FileDescriptorProto:
    return _load_generate().embedded_descriptor(OUR_PB2)


def _messages(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.DescriptorProto]:
    found = {}
    todo = [(f".{fd.package}.{m.name}", m) for m in fd.message_type]
    while todo:
        name, message = todo.pop()
        found[name] = message
        todo += [(f"{name}.{nested.name}", nested) for nested in message.nested_type]
    return found


def _wire(message: descriptor_pb2.DescriptorProto) -> set[tuple]:
    """What decides a message's encoding and its generated API, field by field."""
    oneofs = [o.name for o in message.oneof_decl]
    return {(f.name, f.number, f.label, f.type, f.type_name,
             oneofs[f.oneof_index] if f.HasField("oneof_index") and not f.proto3_optional else None)
            for f in message.field} | {("map_entry", message.options.map_entry)}


def _methods(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, tuple]:
    return {f"/{fd.package}.{s.name}/{m.name}": (m.input_type, m.output_type, m.client_streaming,
                                                 m.server_streaming)
            for s in fd.service for m in s.method}


def test_published_names_and_numbers() -> None:
    """The parts tritonclient's streaming depends on, as published (no tritonclient needed)."""
    ours = _ours()
    assert ours.package == "inference"
    methods = _methods(ours)
    assert methods["/inference.GRPCInferenceService/ModelStreamInfer"] == (
        ".inference.ModelInferRequest", ".inference.ModelStreamInferResponse", True, True)
    assert set(methods) == {f"/inference.GRPCInferenceService/{name}" for name in (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelStreamInfer")}
    messages = _messages(ours)
    stream = {(f.name, f.number) for f in messages[".inference.ModelStreamInferResponse"].field}
    assert stream == {("error_message", 1), ("infer_response", 2)}
    request = {(f.name, f.number) for f in messages[".inference.ModelInferRequest"].field}
    assert request == {("model_name", 1), ("model_version", 2), ("id", 3), ("parameters", 4), ("inputs", 5),
                       ("outputs", 6), ("raw_input_contents", 7)}


def _tritonclient_descriptor() -> descriptor_pb2.FileDescriptorProto:
    spec = importlib.util.find_spec("tritonclient")  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tritonclient is not installed")
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "service_pb2.py"
    return _load_generate().embedded_descriptor(path)


def test_every_message_and_method_matches_tritonclient() -> None:
    theirs = _tritonclient_descriptor()
    ours = _ours()
    their_messages = _messages(theirs)
    for name, message in _messages(ours).items():
        assert name in their_messages, f"{name} is not in tritonclient's grpc_service.proto"
        assert _wire(message) == _wire(their_messages[name]), name
    their_methods = _methods(theirs)
    for path, signature in _methods(ours).items():
        assert their_methods.get(path) == signature, path


@pytest.fixture
def server_port():
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.Popen([sys.executable, str(SERVER)], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"server did not start: {proc.stderr.read()}")
        yield int(line)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_stock_tritonclient_streams_from_our_stubs(server_port: int) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    np = pytest.importorskip("numpy")
    from runtime.pb import tandem_worker_pb2  # the worker stubs do coexist with tritonclient

    assert tandem_worker_pb2.DESCRIPTOR.package == "tandem.worker.v1"
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{server_port}")
    try:
        assert client.is_server_live()
        assert client.is_model_ready("echo") and not client.is_model_ready("nope")
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))

        def send(model: str, text: str, request_id: str) -> None:
            tensor = grpcclient.InferInput("text_input", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
            client.async_stream_infer(model, [tensor], request_id=request_id,
                                      enable_empty_final_response=True)

        send("echo", "the capital of France", "r1")
        words = []
        while True:
            result, error = results.get(timeout=10)
            assert error is None, error
            response = result.get_response()
            assert response.id == "r1"
            if response.parameters["triton_final_response"].bool_param:
                assert result.as_numpy("text_output") is None  # the empty final response
                break
            words.append(result.as_numpy("text_output")[0].decode())
        assert words == ["the", "capital", "of", "France"]

        send("nope", "x", "r2")  # an error travels in the stream and leaves it open
        result, error = results.get(timeout=10)
        assert result is None and "unknown model 'nope'" in str(error)
        send("echo", "again", "r3")
        result, error = results.get(timeout=10)
        assert error is None and result.as_numpy("text_output")[0] == b"again"
        client.stop_stream()
    finally:
        client.close()
