"""Bad requests get a 4xx with an OpenAI-style error body, and change nothing else: the cluster
answers the next normal request exactly as before, with every worker idle in between."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from serving_testlib import describe, greedy_completion, is_idle, live, model, worker_load

from deploy.local_cluster import LocalCluster

pytestmark = pytest.mark.timeout(300)

MODEL = "SmolLM2-135M-Instruct"
MSGS = [{"role": "user", "content": "hi"}]
JSON = {"content-type": "application/json"}
MAX_BODY_BYTES = 4 << 20  # ClusterConfig.max_body_bytes' default


def _chunked(total: int) -> Iterator[bytes]:
    """A body sent without Content-Length (chunked), larger than the limit."""
    yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
    for _ in range(total // 65536 + 1):
        yield b"a" * 65536
    yield b'"}'


# (id, path, body: dict for JSON / bytes or iterator for raw, expected status, expected param, expected code)
CASES: list[tuple[str, str, Any, int, str | None, str | None]] = [
    ("malformed-json", "/v1/completions", b'{"model": "x", "prompt": ', 400, None, "invalid_json"),
    ("malformed-json-chat", "/v1/chat/completions", b"{not json}", 400, None, "invalid_json"),
    ("not-an-object", "/v1/completions", b"[1, 2, 3]", 400, None, None),
    ("missing-prompt", "/v1/completions", {"model": MODEL}, 400, "prompt", None),
    ("empty-prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt", None),
    ("token-out-of-vocab", "/v1/completions", {"model": MODEL, "prompt": [1, 2, 10**9]}, 400, "prompt", None),
    ("no-messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", None),
    ("bad-role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role", None),
    ("unknown-model", "/v1/completions", {"model": "gpt-99", "prompt": "hi"}, 404, "model", "model_not_found"),
    ("unknown-model-chat", "/v1/chat/completions", {"model": "gpt-99", "messages": MSGS}, 404, "model",
     "model_not_found"),
    ("prompt-too-long", "/v1/completions", {"model": MODEL, "prompt": "hi " * 9000}, 400, "prompt",
     "context_length_exceeded"),
    ("prompt-plus-max-tokens-too-long", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 9000},
     400, "max_tokens", "context_length_exceeded"),
    ("chat-too-long", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 9000}]},
     400, "messages", "context_length_exceeded"),
    ("temperature-negative", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400,
     "temperature", None),
    ("top-p-2", "/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 2}, 400, "top_p", None),
    ("n-0", "/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n", None),
    ("max-tokens-negative", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400,
     "max_tokens", None),
    ("max-completion-tokens-0", "/v1/chat/completions", {"model": MODEL, "messages": MSGS,
                                                          "max_completion_tokens": 0}, 400,
     "max_completion_tokens", None),
    ("logprobs-21", "/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 21}, 400, "logprobs", None),
    ("top-logprobs-21", "/v1/chat/completions", {"model": MODEL, "messages": MSGS, "logprobs": True,
                                                  "top_logprobs": 21}, 400, "top_logprobs", None),
    ("presence-penalty-5", "/v1/chat/completions", {"model": MODEL, "messages": MSGS, "presence_penalty": 5}, 400,
     "presence_penalty", None),
    ("temperature-not-a-number", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400,
     "temperature", None),
    ("empty-stop-string", "/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [""]}, 400, "stop", None),
    ("stream-with-bad-params", "/v1/chat/completions", {"model": MODEL, "messages": MSGS, "stream": True,
                                                         "top_p": 0}, 400, "top_p", None),
    ("unsupported-logit-bias", "/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"1": 5}}, 400,
     "logit_bias", "unsupported_parameter"),
    ("oversized-body", "/v1/completions", b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}', 413, None,
     "body_too_large"),
    ("oversized-chunked-body", "/v1/completions", "chunked", 413, None, "body_too_large"),
]


@pytest.fixture(scope="module")
def baseline(disagg_cluster: LocalCluster) -> str:
    return greedy_completion(disagg_cluster, "The capital of France is", max_tokens=8).choices[0].text


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_request_gets_4xx_and_disturbs_nothing(disagg_cluster: LocalCluster, baseline: str, path: str,
                                                   body: Any, status: int, param: str | None,
                                                   code: str | None) -> None:
    assert model(disagg_cluster) == MODEL
    url = disagg_cluster.http_url + path
    if isinstance(body, dict):
        resp = requests.post(url, json=body, timeout=30)
    else:
        resp = requests.post(url, data=_chunked(MAX_BODY_BYTES) if body == "chunked" else body, headers=JSON,
                             timeout=30)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert (error["param"], error["code"]) == (param, code), error

    # nothing else disturbed: the workers are idle and a normal request gets the same answer
    for worker in live(disagg_cluster, "prefill") + live(disagg_cluster, "decode"):
        load = worker_load(worker)
        assert is_idle(load), (worker.name, describe(load))
    assert greedy_completion(disagg_cluster, "The capital of France is", max_tokens=8).choices[0].text == baseline


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                                        ("DELETE", "/v1/models", 405)])
def test_unknown_routes_get_openai_errors(disagg_cluster: LocalCluster, method: str, path: str, status: int) -> None:
    resp = requests.request(method, disagg_cluster.http_url + path, timeout=10)
    assert resp.status_code == status
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
