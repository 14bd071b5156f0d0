"""Hostile input at every edge of a running cluster: out-of-range fields over HTTP (each a 400
naming the field), malformed KServe requests (INVALID_ARGUMENT, never INTERNAL), and malformed
or random worker RPCs (a client-error status, no crash). After each batch the cluster serves a
normal request and every worker is idle with its blocks free."""

from __future__ import annotations

import os
import struct
import uuid

import grpc
import pytest
import tritonclient.grpc.service_pb2 as kpb
import tritonclient.grpc.service_pb2_grpc as kpb_grpc
from hardening_lib import assert_error_body, completion, live, post, stub, wait_nothing_leaked
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.local_cluster import LocalCluster
from runtime.pb import tandem_worker_pb2 as wpb

pytestmark = pytest.mark.timeout(300)
EXAMPLES = int(os.environ.get("TANDEM_FUZZ_EXAMPLES", "60"))

# (id, body fields beside model and prompt, param)
HTTP_CASES = [
    ("issue-negative-stop-id", {"stop_token_ids": [-14120]}, "stop_token_ids"),
    ("stop-id-out-of-vocab", {"stop_token_ids": [10**6]}, "stop_token_ids"),
    ("stop-id-past-uint32", {"stop_token_ids": [1 << 33]}, "stop_token_ids"),
    ("seed-past-int64", {"seed": 10**30}, "seed"),
    ("max-tokens-past-uint32", {"max_tokens": 1 << 40}, "max_tokens"),
    ("top-k-past-int32", {"top_k": 1 << 31}, "top_k"),
    ("min-tokens-past-uint32", {"min_tokens": 1 << 33, "max_tokens": 4}, "min_tokens"),
    ("n-129", {"n": 129}, "n"),
    ("seventeen-stop-strings", {"stop": [f"s{i}" for i in range(17)]}, "stop"),
    ("huge-temperature", {"temperature": 1e308 * 10}, "temperature"),
]


@pytest.mark.parametrize(("fields", "param"), [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES])
def test_out_of_range_fields_are_400_naming_the_field(sim_cluster: LocalCluster, fields: dict, param: str) -> None:
    # (completions only: the sim cluster's dummy model has no chat template; the chat path shares
    # request_params.prepare, and tests/serving/test_bad_input.py covers it with the real model)
    for stream in (False, True):
        status, _, raw = post(f"{sim_cluster.http_url}/v1/completions",
                              {"model": sim_cluster.router["model"], "prompt": "hi", "stream": stream, **fields})
        assert status == 400, (stream, raw)
        assert_error_body(raw, status, param=param)


def test_too_many_sequences_in_one_request(sim_cluster: LocalCluster) -> None:
    status, _, raw = post(f"{sim_cluster.http_url}/v1/completions",
                          {"model": sim_cluster.router["model"], "prompt": ["a"] * 65, "n": 2})
    assert status == 400
    assert_error_body(raw, status, param="n")


# ---- KServe -------------------------------------------------------------------------------------
def _kserve_request(model: str, text: bytes | None = b"hi", raw: list[bytes] | None = None,
                    extra: list[kpb.ModelInferRequest.InferInputTensor] | None = None) -> kpb.ModelInferRequest:
    req = kpb.ModelInferRequest(model_name=model, id=uuid.uuid4().hex)
    if text is not None or raw is not None:
        req.inputs.append(kpb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1]))
    for tensor in extra or []:
        req.inputs.append(tensor)
    req.raw_input_contents.extend(raw if raw is not None else [struct.pack("<I", len(text)) + text])
    return req


def _tensor(name: str, datatype: str) -> kpb.ModelInferRequest.InferInputTensor:
    return kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=[1])


# (an empty optional input is taken as absent: answered normally; it was an IndexError -> INTERNAL)
OPTIONAL_EMPTY = [
    ("empty-optional-input", dict(extra=[_tensor("exclude_input_in_output", "BOOL")],
                                  raw=[struct.pack("<I", 2) + b"hi", b""])),
    ("empty-sampling-parameters", dict(extra=[_tensor("sampling_parameters", "BYTES")],
                                       raw=[struct.pack("<I", 2) + b"hi", b""])),
]
KSERVE_CASES = [
    ("bad-utf8", dict(text=b"\xff\xfe hi")),
    ("truncated-length-prefix", dict(raw=[b"\x05\x00"])),
    ("element-past-the-end", dict(raw=[struct.pack("<I", 100) + b"short"])),
    ("ragged-int-contents", dict(extra=[_tensor("max_tokens", "INT32")],
                                 raw=[struct.pack("<I", 2) + b"hi", b"\x01\x02"])),
    ("nested-json", dict(extra=[_tensor("sampling_parameters", "BYTES")],
                         raw=[struct.pack("<I", 2) + b"hi", struct.pack("<I", 40000) + b"[" * 40000])),
    ("negative-stop-id", dict(extra=[_tensor("sampling_parameters", "BYTES")],
                              raw=[struct.pack("<I", 2) + b"hi",
                                   struct.pack("<I", 29) + b'{"stop_token_ids": [-14120]} '])),
    ("text-input-as-ints", dict(text=None, extra=[_tensor("text_input", "INT32")], raw=[struct.pack("<i", 5)])),
]


@pytest.mark.parametrize("case", [c[1] for c in KSERVE_CASES], ids=[c[0] for c in KSERVE_CASES])
def test_malformed_kserve_requests_are_invalid_argument(sim_cluster: LocalCluster, case: dict) -> None:
    req = _kserve_request(sim_cluster.router["model"], **case)
    with grpc.insecure_channel(sim_cluster.grpc_target) as channel:
        stub_ = kpb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub_.ModelInfer(req, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        # the same request on the stream: an error_message for it, the stream goes on
        replies = list(stub_.ModelStreamInfer(iter([req]), timeout=30))
        assert len(replies) == 1 and replies[0].error_message, replies


@pytest.mark.parametrize("case", [c[1] for c in OPTIONAL_EMPTY], ids=[c[0] for c in OPTIONAL_EMPTY])
def test_empty_optional_kserve_inputs_are_absent(sim_cluster: LocalCluster, case: dict) -> None:
    with grpc.insecure_channel(sim_cluster.grpc_target) as channel:
        reply = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            _kserve_request(sim_cluster.router["model"], **case), timeout=30)
    assert reply.outputs[0].name == "text_output" and len(reply.raw_output_contents[0]) > 4


# ---- worker RPCs --------------------------------------------------------------------------------
_CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED,
                  grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS}
_FUZZED = ("Prefill", "Generate", "PushKV", "Unpin", "Abort", "KVSnapshot")  # never Drain: it drains for real


def _call(channel: grpc.Channel, method: str, payload: bytes, streaming: bool) -> grpc.StatusCode:
    path = f"/tandem.worker.v1.WorkerService/{method}"
    try:
        if streaming:
            for _ in channel.unary_stream(path)(payload, timeout=20):
                pass
        else:
            channel.unary_unary(path)(payload, timeout=20)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_random_bytes_to_worker_rpcs(sim_cluster: LocalCluster) -> None:
    rng = __import__("random").Random(15)
    for child in live(sim_cluster, "prefill") + live(sim_cluster, "decode"):
        with grpc.insecure_channel(child.ready["endpoint"]) as channel:
            for method in _FUZZED:
                for size in (1, 3, 17, 200, 5000):
                    payload = bytes(rng.randrange(256) for _ in range(size))
                    code = _call(channel, method, payload, streaming=method == "Generate")
                    assert code in _CLIENT_ERRORS | {grpc.StatusCode.OK}, (child.name, method, payload[:20], code)
    assert completion(sim_cluster)[0] == 200
    wait_nothing_leaked(sim_cluster)


_u32 = st.one_of(st.integers(0, 40), st.integers(0, (1 << 32) - 1))
_ids = st.lists(st.one_of(st.integers(0, 49151), _u32), min_size=0, max_size=40)


@st.composite
def _handles(draw: st.DrawFn) -> wpb.KVHandle:
    return wpb.KVHandle(request_id=draw(st.sampled_from(["", "r", uuid.uuid4().hex])),
                        worker_id=draw(st.text(max_size=8)),
                        worker_endpoint=draw(st.sampled_from(["", "nowhere", "127.0.0.1:1", "127.0.0.1:99999",
                                                              "PREFILL"])),
                        transport_metadata=draw(st.binary(max_size=64)),
                        block_ids=draw(st.lists(_u32, max_size=4)), num_tokens=draw(_u32),
                        first_token_ids=draw(st.lists(_u32, max_size=2)))


_sampling = st.builds(wpb.SamplingParams, max_tokens=st.integers(1, 4), n=st.integers(0, 3),
                      temperature=st.floats(-1, 3), top_k=st.integers(-3, 100), min_tokens=st.integers(0, 6),
                      stop_token_ids=st.lists(_u32, max_size=2), logprobs=st.integers(0, 30))


def test_malformed_worker_rpcs(sim_cluster: LocalCluster) -> None:
    """Structured garbage (wrong ranges, token ids out of the vocabulary, handles pointing
    nowhere or at the wrong blocks): a client-error status, or a normal answer (a handle naming
    blocks the prefill worker does not hold recomputes); never INTERNAL, and nothing held after."""
    (prefill,) = live(sim_cluster, "prefill")
    decode = live(sim_cluster, "decode")[0]
    seen: dict[str, set[str]] = {"Prefill": set(), "Generate": set()}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(ids=_ids, sampling=_sampling, handle=st.one_of(st.none(), _handles()))
    def one(ids: list[int], sampling: wpb.SamplingParams, handle: wpb.KVHandle | None) -> None:
        rid = uuid.uuid4().hex
        if handle is not None and handle.worker_endpoint == "PREFILL":
            handle.worker_endpoint = prefill.ready["endpoint"]
        with stub(prefill) as p:
            try:
                p.Prefill(wpb.PrefillRequest(request_id=rid, prompt_token_ids=ids, sampling=sampling), timeout=20)
                seen["Prefill"].add("OK")
                p.Unpin(wpb.UnpinRequest(request_id=rid), timeout=5)
            except grpc.RpcError as e:
                assert e.code() in _CLIENT_ERRORS, ("Prefill", ids, sampling, e.code(), e.details())
                seen["Prefill"].add(e.code().name)
        with stub(decode) as d:
            req = wpb.GenerateRequest(request_id=rid + "-d", prompt_token_ids=ids, sampling=sampling)
            if handle is not None:
                req.kv_handle.CopyFrom(handle)
            try:
                for _ in d.Generate(req, timeout=20):
                    pass
                seen["Generate"].add("OK")
            except grpc.RpcError as e:
                assert e.code() in _CLIENT_ERRORS, ("Generate", ids, sampling, handle, e.code(), e.details())
                seen["Generate"].add(e.code().name)

    one()
    print("worker RPC outcomes:", seen)
    assert {"OK", "INVALID_ARGUMENT"} <= seen["Generate"] and {"OK", "INVALID_ARGUMENT"} <= seen["Prefill"], seen
    assert completion(sim_cluster)[0] == 200
    wait_nothing_leaked(sim_cluster)


@pytest.mark.parametrize("block_ids", [[0, 1, 2], [7, 1 << 31, (1 << 32) - 1]], ids=["unheld", "out-of-range"])
def test_a_handle_naming_blocks_the_prefill_worker_lacks_recomputes(sim_cluster: LocalCluster,
                                                                     block_ids: list[int]) -> None:
    """A well-formed handle whose blocks the prefill worker does not hold (never prefilled there,
    or ids past its cache): the transfer fails and the decode worker prefills the prompt itself."""
    (prefill,) = live(sim_cluster, "prefill")
    ids = [(i * 7919) % 40000 + 100 for i in range(40)]
    handle = wpb.KVHandle(request_id=uuid.uuid4().hex, worker_id=prefill.name,
                          worker_endpoint=prefill.ready["endpoint"], block_ids=block_ids, num_tokens=len(ids),
                          first_token_ids=[5])
    req = wpb.GenerateRequest(request_id=handle.request_id, prompt_token_ids=ids, kv_handle=handle,
                              sampling=wpb.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    with stub(live(sim_cluster, "decode")[0]) as d:
        replies = list(d.Generate(req, timeout=30))
    assert replies[0].pull.recomputed and sum(len(o.token_ids) for r in replies for o in r.outputs) == 3
    wait_nothing_leaked(sim_cluster)
