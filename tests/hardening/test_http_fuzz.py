"""schemathesis against the router's own OpenAPI schema (``/openapi.json``), over real HTTP to a
running sim cluster: every operation, bodies that fit the schema and bodies that break it. Every
answer must be a 2xx or a 4xx with an OpenAI-style error body (the schema declares it: "4XX" ->
``ErrorResponse``), never a 5xx, never a hang (a 30 s client timeout); an SSE stream's frames
are JSON and carry no error event. Afterwards the cluster serves and every worker is idle with
its blocks free.

Two of schemathesis's phases, bounded so that they cost seconds:
- coverage: every deterministic case of each operation (a field at a time at the boundaries the
  schema declares, wrong types, missing fields, undeclared methods), completions included, chat
  not (the sim cluster's dummy model has no chat template: every chat body stops there with a 400;
  completions reach the sampling checks both share);
- fuzzing: ``TANDEM_HTTP_FUZZ_EXAMPLES`` random cases per operation and mode (default 20; the
  issue's "few thousand" is e.g. 400), mostly made to name the served model and to carry few
  fields (``_tame``), so that they reach the sampling checks, not only the model lookup.
Token budgets (``max_tokens``, ``max_completion_tokens``, ``min_tokens``) are cut to 4 and ``n`` to
2 when they are valid but larger, and an empty prompt becomes "hi" (a 400 before any other
check): the fuzz looks for bad answers, not long generations; out-of-range values go through.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import pytest
import requests
import schemathesis
from hardening_lib import completion, wait_nothing_leaked
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from deploy.local_cluster import LocalCluster

pytestmark = pytest.mark.timeout(240)
EXAMPLES = int(os.environ.get("TANDEM_HTTP_FUZZ_EXAMPLES", "20"))
BUDGETS = ("max_tokens", "max_completion_tokens", "min_tokens")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          unsupported_method]


def _tame(body: Any, model: str, fields: set[str], data: st.DataObject) -> Any:
    """A generated body in one of three shapes (drawn): as generated; naming the served model; or
    that with a plain prompt and at most two of the generated values of the schema's ``fields``
    (one bad field in a body of twenty hides the others behind its 400: few fields reach the
    checks past it). Token budgets are cut to 4 in every shape."""
    if not isinstance(body, dict):
        return body
    shape = data.draw(st.sampled_from(("few fields", "served model", "as generated")), label="shape")
    body = dict(body)
    if shape != "as generated" and isinstance(body.get("model"), str):
        body["model"] = model
    if shape == "few fields":
        optional = sorted(k for k in body if k in fields and k not in ("model", "prompt", "messages"))
        keep = data.draw(st.sets(st.sampled_from(optional), max_size=2), label="keep") if optional else set()
        body = {k: v for k, v in body.items() if k in ("model", "messages") or k in keep}
        if "messages" not in body:
            body["prompt"] = "hi"
    return _small(body)


def _small(body: Any) -> Any:
    """Valid but large token budgets and ``n`` cut down; an empty prompt made "hi"."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for name in BUDGETS:
        value = body.get(name)
        if type(value) is int and 4 < value < 1 << 32:
            body[name] = 4
    if type(body.get("n")) is int and 2 < body["n"] <= 128:
        body["n"] = 2
    if body.get("prompt") == "":
        body["prompt"] = "hi"
    return body


def _check_stream(response: schemathesis.Response) -> None:
    """An SSE answer: JSON frames then [DONE]; an error after a 200 would be a failure in disguise."""
    if not any(v.startswith("text/event-stream") for v in response.headers.get("content-type", [])):
        return
    frames = [f for f in response.text.split("\n\n") if f.strip()]
    assert frames and frames[-1] == "data: [DONE]", frames[-3:]
    for frame in frames[:-1]:
        assert frame.startswith("data: "), frame
        event = json.loads(frame[6:])
        assert "error" not in event, event


def _fuzz(op: schemathesis.APIOperation, mode: GenerationMode, url: str, model: str, session: requests.Session,
          statuses: collections.Counter[str]) -> None:
    """``EXAMPLES`` generated cases of one operation, each sent and checked."""
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    body_schema = next(iter(op.definition.raw.get("requestBody", {}).get("content", {}).values()), {}).get("schema", {})
    ref = body_schema.get("$ref", "").rsplit("/", 1)[-1]
    fields = set(op.schema.raw_schema.get("components", {}).get("schemas", {}).get(ref, {}).get("properties", {}))

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode), data=st.data())
    def fuzz(case: schemathesis.Case, data: st.DataObject) -> None:
        if op.method.upper() == "POST":
            case.body = _tame(case.body, model, fields, data)
        response = case.call(base_url=url, session=session, timeout=30)
        statuses[f"fuzz {op.label} {mode.value} {response.status_code}"] += 1
        case.validate_response(response, checks=checks)
        _check_stream(response)

    try:
        fuzz()
    except Unsatisfiable:  # an operation with nothing to break (no body, no parameters)
        assert mode is GenerationMode.NEGATIVE and op.method.upper() == "GET", op.label


def _cover(schema: schemathesis.BaseSchema, op: schemathesis.APIOperation, url: str, model: str,
           session: requests.Session, statuses: collections.Counter[str]) -> None:
    """Every coverage case of one operation, in both modes, naming the served model."""
    config = schema.config.generation_for(operation=op)
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
        for case in schema.iter_coverage_cases(op, generation_modes=[mode], generation_config=config):
            if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                case.body = _small({**case.body, "model": model})
            response = case.call(base_url=url, session=session, timeout=30)
            statuses[f"coverage {op.label} {mode.value} {response.status_code}"] += 1
            case.validate_response(response, checks=checks)
            _check_stream(response)


def test_schemathesis_finds_no_server_error(sim_cluster: LocalCluster) -> None:
    url, model = sim_cluster.http_url, sim_cluster.router["model"]
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions", "GET /health"}
    statuses: collections.Counter[str] = collections.Counter()
    with requests.Session() as session:
        for op in operations:
            if op.label != "POST /v1/chat/completions":
                _cover(schema, op, url, model, session, statuses)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _fuzz(op, mode, url, model, session, statuses)
    print("schemathesis answers:", dict(sorted(statuses.items())))
    # the cases reached past the model lookup: some generations were answered, some were refused
    assert any("POST /v1/completions" in k and k.endswith(" 200") for k in statuses), statuses
    assert any("POST /v1/completions" in k and k.endswith(" 400") for k in statuses), statuses
    assert completion(sim_cluster)[0] == 200
    wait_nothing_leaked(sim_cluster)
