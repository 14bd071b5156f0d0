"""Stock ``tritonclient.grpc`` against the router's KServe v2 gRPC API: token streaming
(ModelStreamInfer) and one-shot ModelInfer give the text of the OpenAI completion.

This process imports tritonclient.grpc, so it must never import router.kserve or
runtime.pb.kserve_inference_pb2 (both register the ``inference`` protobuf package)."""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from serving_testlib import LONG_PROMPTS, NIXL, SHORT_PROMPTS, Handoffs, fresh, greedy_completion, model
from tritonclient.utils import InferenceServerException

from deploy.local_cluster import LocalCluster
from engine.gguf_file import GGUFFile
from engine.loader import default_model_path
from text.tokenizer import TextTokenizer

pytestmark = pytest.mark.timeout(300)

GREEDY = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
TRANSPORT = "nixl" if NIXL else "tcp"


def _inputs(text: str, params: dict[str, Any], exclude_input: bool | None = None) -> list[grpcclient.InferInput]:
    prompt = grpcclient.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([text.encode()], dtype=object))
    sampling = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    sampling.set_data_from_numpy(np.array([json.dumps(params).encode()], dtype=object))
    inputs = [prompt, sampling]
    if exclude_input is not None:
        flag = grpcclient.InferInput("exclude_input_in_output", [1], "BOOL")
        flag.set_data_from_numpy(np.array([exclude_input], dtype=bool))
        inputs.append(flag)
    return inputs


@pytest.fixture
def triton(disagg_cluster: LocalCluster) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(disagg_cluster.grpc_target)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.from_gguf(GGUFFile(default_model_path()).metadata)


class Stream:
    """One ModelStreamInfer stream; responses land in a queue, read with a bounded wait."""

    def __init__(self, triton: grpcclient.InferenceServerClient, model_name: str) -> None:
        self.triton, self.model = triton, model_name
        self.responses: queue.Queue = queue.Queue()
        triton.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def generate(self, text: str, params: dict[str, Any], request_id: str) -> tuple[list[str], str | None]:
        """(text pieces, error message): reads until the final response or an error."""
        self.triton.async_stream_infer(self.model, _inputs(text, params), request_id=request_id,
                                       enable_empty_final_response=True)
        pieces: list[str] = []
        while True:
            result, error = self.responses.get(timeout=60)
            if error is not None:
                return pieces, error.message()
            response = result.get_response()
            assert response.id == request_id
            out = result.as_numpy("text_output")
            if out is not None:
                pieces += [x.decode() for x in out]
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return pieces, None

    def close(self) -> None:
        self.triton.stop_stream()


def test_server_and_model_are_ready(triton: grpcclient.InferenceServerClient, disagg_cluster: LocalCluster) -> None:
    name = model(disagg_cluster)
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(name)
    assert not triton.is_model_ready("no-such-model")
    meta = triton.get_model_metadata(name)
    assert meta.name == name and {i.name for i in meta.inputs} >= {"text_input", "sampling_parameters"}
    assert [o.name for o in meta.outputs] == ["text_output"]


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_streaming_generation_equals_openai_completion(triton: grpcclient.InferenceServerClient,
                                                       disagg_cluster: LocalCluster, tokenizer: TextTokenizer,
                                                       long: bool) -> None:
    """Long: the KServe request comes first with a fresh prompt, so it is the one prefilled on the
    prefill worker (checked); the OpenAI completion and the repeats find it cached on the decoder."""
    prompt = fresh(LONG_PROMPTS[0]) if long else SHORT_PROMPTS[0]
    handoffs = Handoffs(disagg_cluster, TRANSPORT)
    stream = Stream(triton, model(disagg_cluster))
    try:
        first, error = stream.generate(prompt, GREEDY, "req-1")
        assert error is None
        assert len(first) > 1  # streamed piece by piece, not in one go
        if long:
            handoffs.check([len(tokenizer.encode(prompt))])
        want = greedy_completion(disagg_cluster, prompt, max_tokens=24)
        assert "".join(first) == want.choices[0].text
        # an error for one request leaves the stream usable for the next
        pieces, error = stream.generate(prompt, {**GREEDY, "temperature": -1}, "req-bad")
        assert pieces == [] and "temperature" in error
        pieces, error = stream.generate(prompt, GREEDY, "req-2")
        assert error is None and pieces == first
    finally:
        stream.close()


def test_infer_equals_openai_completion(triton: grpcclient.InferenceServerClient, disagg_cluster: LocalCluster,
                                        tokenizer: TextTokenizer) -> None:
    """The first request (ModelInfer, fresh prompt) is prefilled on the prefill worker (checked)."""
    prompt = fresh(LONG_PROMPTS[1])
    name = model(disagg_cluster)
    handoffs = Handoffs(disagg_cluster, TRANSPORT)
    only_new = triton.infer(name, _inputs(prompt, GREEDY, exclude_input=True), client_timeout=60)
    handoffs.check([len(tokenizer.encode(prompt))])
    want = greedy_completion(disagg_cluster, prompt, max_tokens=24)
    assert only_new.as_numpy("text_output")[0].decode() == want.choices[0].text
    whole = triton.infer(name, _inputs(prompt, GREEDY), client_timeout=60)
    assert whole.as_numpy("text_output")[0].decode() == prompt + want.choices[0].text  # the input is echoed by default


def test_infer_errors(triton: grpcclient.InferenceServerClient, disagg_cluster: LocalCluster) -> None:
    with pytest.raises(InferenceServerException) as e:
        triton.infer("no-such-model", _inputs("hi", GREEDY), client_timeout=30)
    assert e.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        triton.infer(model(disagg_cluster), _inputs("hi", {"top_p": 2}), client_timeout=30)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "top_p" in e.value.message()
