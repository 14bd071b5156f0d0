"""Admission control under a burst: past the bound on queued requests, the router answers at
once with 429 ``overloaded`` and ``Retry-After`` (HTTP) or RESOURCE_EXHAUSTED with
``retry-after`` metadata (KServe gRPC); admitted requests get their full answer, and nothing is
left queued or held afterwards."""

from __future__ import annotations

import json
import struct
import threading
import uuid

import grpc
import pytest
import tritonclient.grpc.service_pb2 as kpb
import tritonclient.grpc.service_pb2_grpc as kpb_grpc
from hardening_lib import assert_error_body, post, start_router, stop_router, wait_nothing_leaked, wait_serves

from deploy.local_cluster import LocalCluster

pytestmark = pytest.mark.timeout(180)
BURST = 24
PROMPT = list(range(100, 1600))  # 1500 tokens: prefilled remotely, a few sim steps each


def test_burst_past_the_queue_bound_gets_429_with_retry_after(sim_cluster: LocalCluster) -> None:
    router = start_router(sim_cluster, max_queued_requests=3)
    try:
        url = router.ready["http"]
        wait_serves(url)
        model = sim_cluster.router["model"]
        results: list[tuple[int, dict, bytes]] = []
        start = threading.Barrier(BURST)

        def one(i: int) -> None:
            start.wait()
            body = {"model": model, "prompt": [*PROMPT, i], "max_tokens": 16, "ignore_eos": True, "stream": i % 2 == 0}
            results.append(post(f"{url}/v1/completions", body, timeout_s=60))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(status for status, _, _ in results)
        rejected = [(h, raw) for status, h, raw in results if status == 429]
        print(f"burst of {BURST}: {statuses.count(200)} x 200, {len(rejected)} x 429")
        assert set(statuses) <= {200, 429} and rejected and statuses.count(200) >= 3, statuses
        for headers, raw in rejected:
            assert_error_body(raw, 429, code="overloaded")
            assert 1 <= int({k.lower(): v for k, v in headers.items()}["retry-after"]) <= 30
        for status, _, raw in results:  # the admitted ones: whole answers
            if status == 200 and raw.startswith(b"{"):
                assert json.loads(raw)["usage"]["completion_tokens"] == 16
            elif status == 200:
                assert raw.rstrip().endswith(b"data: [DONE]") and b'"error"' not in raw

        # KServe over gRPC: the same bound, RESOURCE_EXHAUSTED with retry-after metadata
        codes: list[tuple[grpc.StatusCode, dict]] = []
        start = threading.Barrier(BURST)

        def infer(i: int) -> None:
            text = " ".join(str(t) for t in PROMPT[:700]).encode() + f" {i}".encode()
            req = kpb.ModelInferRequest(model_name=model, id=uuid.uuid4().hex)
            req.inputs.append(kpb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1]))
            req.raw_input_contents.append(struct.pack("<I", len(text)) + text)
            with grpc.insecure_channel(router.ready["grpc"]) as channel:
                start.wait()
                try:
                    kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=60)
                    codes.append((grpc.StatusCode.OK, {}))
                except grpc.RpcError as e:
                    codes.append((e.code(), dict(e.trailing_metadata() or ())))

        threads = [threading.Thread(target=infer, args=(i,)) for i in range(BURST)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        exhausted = [md for code, md in codes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert {code for code, _ in codes} <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert exhausted and all(1 <= int(md["retry-after"]) <= 30 for md in exhausted), codes
        wait_nothing_leaked(sim_cluster)
    finally:
        stop_router(router)
