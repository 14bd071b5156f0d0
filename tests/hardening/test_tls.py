"""TLS on the router's listeners: HTTPS and gRPC over TLS with a server certificate (clients
verify it against its CA; plaintext clients get nothing), and mutual TLS (a client without a
certificate of the client CA is refused on both)."""

from __future__ import annotations

import json
import ssl
import struct
import uuid
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc.service_pb2 as kpb
import tritonclient.grpc.service_pb2_grpc as kpb_grpc
import trustme
from hardening_lib import get, post, start_router, stop_router, wait_serves

from deploy.local_cluster import LocalCluster

pytestmark = pytest.mark.timeout(120)


def _infer(channel: grpc.Channel, model: str) -> bytes:
    req = kpb.ModelInferRequest(model_name=model, id=uuid.uuid4().hex)
    req.inputs.append(kpb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1]))
    req.raw_input_contents.append(struct.pack("<I", 2) + b"hi")
    return kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=30).raw_output_contents[0]


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_router_serves_https_and_grpc_over_tls(sim_cluster: LocalCluster, tmp_path: Path, mutual: bool) -> None:
    ca, client_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = client_ca.issue_cert("tandem-client@example.org")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key", "client_ca", "client")}
    ca.cert_pem.write_to_path(paths["ca"])
    server.cert_chain_pems[0].write_to_path(paths["cert"])
    server.private_key_pem.write_to_path(paths["key"])
    client_ca.cert_pem.write_to_path(paths["client_ca"])
    client.private_key_and_cert_chain_pem.write_to_path(paths["client"])
    router = start_router(sim_cluster, tls_cert_file=str(paths["cert"]), tls_key_file=str(paths["key"]),
                          tls_client_ca_file=str(paths["client_ca"]) if mutual else None)
    try:
        url, target, model = router.ready["http"], router.ready["grpc"], sim_cluster.router["model"]
        assert url.startswith("https://")
        context = ssl.create_default_context(cafile=str(paths["ca"]))
        if mutual:
            client.configure_cert(context)
        wait_serves(url, context=context)
        status, _, raw = post(f"{url}/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 3},
                              context=context)
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 3
        plain = url.replace("https://", "http://")
        with pytest.raises(OSError):  # plaintext HTTP on the TLS port: no answer
            get(f"{plain}/health", timeout_s=5)
        with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):  # a client that does not trust the CA
            get(f"{url}/health", context=ssl.create_default_context(), timeout_s=5)

        key_and_chain = (client.private_key_pem.bytes(), client.cert_chain_pems[0].bytes()) if mutual else (None, None)
        creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes(), private_key=key_and_chain[0],
                                             certificate_chain=key_and_chain[1])
        with grpc.secure_channel(target, creds) as channel:
            assert len(_infer(channel, model)) > 4
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as info:
            _infer(channel, model)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        if mutual:  # TLS without a client certificate: refused on both listeners
            no_cert = ssl.create_default_context(cafile=str(paths["ca"]))
            with pytest.raises(OSError):
                get(f"{url}/health", context=no_cert, timeout_s=5)
            bare = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
            with grpc.secure_channel(target, bare) as channel, pytest.raises(grpc.RpcError):
                _infer(channel, model)
    finally:
        stop_router(router)
