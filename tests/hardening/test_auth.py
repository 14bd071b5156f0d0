"""API keys on both APIs, public paths, and per-key rate limits (requests and tokens per
minute), on a router replica started with keys."""

from __future__ import annotations

import json
import struct
import uuid

import grpc
import pytest
import tritonclient.grpc.service_pb2 as kpb
import tritonclient.grpc.service_pb2_grpc as kpb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hardening_lib import assert_error_body, get, post, start_router, stop_router, wait_serves

from deploy.local_cluster import LocalCluster

pytestmark = pytest.mark.timeout(120)


def _infer(target: str, model: str, metadata: tuple = ()) -> grpc.StatusCode:
    req = kpb.ModelInferRequest(model_name=model, id=uuid.uuid4().hex)
    req.inputs.append(kpb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1]))
    req.raw_input_contents.append(struct.pack("<I", 2) + b"hi")
    with grpc.insecure_channel(target) as channel:
        try:
            kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=30, metadata=metadata)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_api_keys_and_rate_limits(sim_cluster: LocalCluster) -> None:
    router = start_router(sim_cluster, api_keys=("key-a", "key-b", "key-c"), rate_limit_rpm=6, rate_limit_tpm=300)
    try:
        url, target, model = router.ready["http"], router.ready["grpc"], sim_cluster.router["model"]
        wait_serves(url)  # /health is public
        body = {"model": model, "prompt": "hi", "max_tokens": 4, "ignore_eos": True}

        # HTTP: no key, a wrong key, a key in the wrong scheme -> 401 before anything else
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic key-a"}):
            status, h, raw = post(f"{url}/v1/completions", body, headers=headers)
            assert status == 401 and h.get("www-authenticate", h.get("WWW-Authenticate")) == "Bearer", (headers, raw)
            assert_error_body(raw, status, code="invalid_api_key")
        assert get(f"{url}/v1/models")[0] == 401
        for path in ("/health", "/metrics", "/metrics/targets", "/dashboard", "/dashboard/data"):  # public paths
            assert get(f"{url}{path}")[0] == 200, path
        a = {"Authorization": "Bearer key-a"}
        status, _, raw = post(f"{url}/v1/completions", body, headers=a)
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 4
        assert json.loads(get(f"{url}/v1/models", headers=a)[2])["data"][0]["id"] == model

        # gRPC: authorization metadata; liveness, readiness and gRPC health stay open
        assert _infer(target, model) == grpc.StatusCode.UNAUTHENTICATED
        assert _infer(target, model, (("authorization", "Bearer nope"),)) == grpc.StatusCode.UNAUTHENTICATED
        assert _infer(target, model, (("authorization", "Bearer key-a"),)) == grpc.StatusCode.OK
        with grpc.insecure_channel(target) as channel:
            assert kpb_grpc.GRPCInferenceServiceStub(channel).ServerReady(kpb.ServerReadyRequest(), timeout=5).ready
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING

        # requests per minute: key-b's 7th in a minute is 429 rate_limited, over HTTP and gRPC;
        # key-a is not affected
        b = {"Authorization": "Bearer key-b"}
        statuses = [post(f"{url}/v1/completions", {**body, "max_tokens": 1}, headers=b)[0] for _ in range(6)]
        assert statuses == [200] * 6
        status, h, raw = post(f"{url}/v1/completions", body, headers=b)
        assert status == 429 and 1 <= int(h.get("retry-after", h.get("Retry-After"))) <= 60
        assert_error_body(raw, status, code="rate_limited")
        with grpc.insecure_channel(target) as channel:
            with pytest.raises(grpc.RpcError) as info:
                kpb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(
                    kpb.ServerMetadataRequest(), timeout=5, metadata=(("authorization", "key-b"),))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert 1 <= int(dict(info.value.trailing_metadata())["retry-after"]) <= 60
        assert post(f"{url}/v1/completions", body, headers=a)[0] == 200

        # tokens per minute: one request of ~300 tokens spends key-c's minute
        c = {"Authorization": "Bearer key-c"}
        status, _, raw = post(f"{url}/v1/completions", {**body, "prompt": list(range(100, 350)), "max_tokens": 60},
                              headers=c)
        assert status == 200 and json.loads(raw)["usage"]["total_tokens"] == 310
        status, _, raw = post(f"{url}/v1/completions", body, headers=c)
        assert status == 429 and "tokens" in assert_error_body(raw, status, code="rate_limited")["error"]["message"]
    finally:
        stop_router(router)
