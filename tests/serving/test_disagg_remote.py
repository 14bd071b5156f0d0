"""Disaggregated equals aggregated on the remote path, for what users send: greedy and seeded
sampling, penalties, min_tokens, stop strings across token boundaries, logprobs (with top
alternatives, also checked against the engine run in this process), streamed and not, through the
OpenAI API (completions and chat) and KServe (stock tritonclient), in float32 and in bfloat16.

Every request here is prefilled on the prefill worker and its KV pulled by the decode worker:
prompts are fresh (a unique tag: nothing cached anywhere) and longer than the clusters'
max_local_prefill_tokens, and each test checks the router's route counters and the decode
worker's pulled blocks (``Handoffs``). Pairs: ``disagg_cluster`` / ``agg_cluster`` (float32, one
CPU thread per worker) and ``disagg_bf16_cluster`` / ``agg_bf16_cluster`` (bfloat16 on the CPU
kernels: one thread per disaggregated worker, two in the aggregated one). (n > 1 is prefilled
where it decodes: the router never hands it off.)"""

from __future__ import annotations

import itertools
import json
import queue
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from serving_testlib import LONG_PROMPTS, NIXL, Handoffs, client, fresh, model

from deploy.local_cluster import LocalCluster
from engine.gguf_file import GGUFFile
from engine.llm import LLM
from engine.loader import default_model_path
from protocol.sampling import SamplingParams
from text.tokenizer import TextTokenizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TRANSPORT = "nixl" if NIXL else "tcp"
IGNORE_EOS = {"ignore_eos": True}


@dataclass
class Pair:
    disagg: LocalCluster
    agg: LocalCluster
    dtype: str
    tol: float  # logprobs between the two clusters (the same arithmetic: equal but for float noise)
    transport: str  # the disaggregated cluster's


@pytest.fixture(params=["float32", "bfloat16"])
def pair(request: pytest.FixtureRequest, disagg_cluster: LocalCluster, agg_cluster: LocalCluster,
         disagg_bf16_cluster: LocalCluster, agg_bf16_cluster: LocalCluster) -> Pair:
    if request.param == "float32":
        return Pair(disagg_cluster, agg_cluster, "float32", 1e-4, TRANSPORT)
    return Pair(disagg_bf16_cluster, agg_bf16_cluster, "bfloat16", 1e-3, "tcp")


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.from_gguf(GGUFFile(default_model_path()).metadata)


# ---- one choice, however it came (streamed or not) ------------------------------------------------
@dataclass
class Choice:
    text: str = ""
    finish_reason: str | None = None
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[str, float]] = field(default_factory=list)

    def add_completion_logprobs(self, lp: Any) -> None:
        if lp is not None:
            self.tokens += lp.tokens
            self.logprobs += lp.token_logprobs
            self.top += lp.top_logprobs or [{} for _ in lp.tokens]

    def add_chat_logprobs(self, lp: Any) -> None:
        if lp is not None and lp.content:
            for t in lp.content:
                self.tokens.append(t.token)
                self.logprobs.append(t.logprob)
                self.top.append({a.token: a.logprob for a in t.top_logprobs})


def completion(cluster: LocalCluster, prompt: str, stream: bool, **kwargs: Any) -> tuple[dict[int, Choice], int]:
    """(choices by index, prompt tokens) of one completion request."""
    oai, name = client(cluster), model(cluster)
    out: dict[int, Choice] = {}
    if not stream:
        resp = oai.completions.create(model=name, prompt=prompt, **kwargs)
        for c in resp.choices:
            out[c.index] = Choice(c.text, c.finish_reason)
            out[c.index].add_completion_logprobs(c.logprobs)
        return out, resp.usage.prompt_tokens
    chunks = list(oai.completions.create(model=name, prompt=prompt, stream=True,
                                         stream_options={"include_usage": True}, **kwargs))
    for chunk in chunks:
        for c in chunk.choices:
            choice = out.setdefault(c.index, Choice())
            choice.text += c.text
            choice.finish_reason = c.finish_reason or choice.finish_reason
            choice.add_completion_logprobs(c.logprobs)
    return out, chunks[-1].usage.prompt_tokens


def chat(cluster: LocalCluster, messages: list[dict], stream: bool, **kwargs: Any) -> tuple[dict[int, Choice], int]:
    oai, name = client(cluster), model(cluster)
    out: dict[int, Choice] = {}
    if not stream:
        resp = oai.chat.completions.create(model=name, messages=messages, **kwargs)
        for c in resp.choices:
            out[c.index] = Choice(c.message.content, c.finish_reason)
            out[c.index].add_chat_logprobs(c.logprobs)
        return out, resp.usage.prompt_tokens
    chunks = list(oai.chat.completions.create(model=name, messages=messages, stream=True,
                                              stream_options={"include_usage": True}, **kwargs))
    for chunk in chunks:
        for c in chunk.choices:
            choice = out.setdefault(c.index, Choice())
            choice.text += c.delta.content or ""
            choice.finish_reason = c.finish_reason or choice.finish_reason
            choice.add_chat_logprobs(c.logprobs)
    return out, chunks[-1].usage.prompt_tokens


def assert_same(got: dict[int, Choice], want: dict[int, Choice], tol: float, label: str) -> None:
    assert sorted(got) == sorted(want), label
    for i, w in want.items():
        g = got[i]
        assert (g.text, g.finish_reason, g.tokens) == (w.text, w.finish_reason, w.tokens), (label, i)
        assert g.logprobs == pytest.approx(w.logprobs, abs=tol), (label, i)
        assert [t.keys() for t in g.top] == [t.keys() for t in w.top], (label, i)
        for gt, wt in zip(g.top, w.top):
            assert all(gt[k] == pytest.approx(wt[k], abs=tol) for k in wt), (label, i)


# ---- sampling -----------------------------------------------------------------------------------------
def cases(tokenizer: TextTokenizer) -> dict[str, dict[str, Any]]:
    stops = [tokenizer.encode(s)[-1] for s in (",", ".", " the", " and", " a")]
    return {
        "greedy": dict(temperature=0, max_tokens=16, logprobs=3, extra_body=IGNORE_EOS),
        "seeded": dict(temperature=0.9, top_p=0.95, seed=7, max_tokens=16, logprobs=2, extra_body=IGNORE_EOS),
        "penalties": dict(temperature=0.8, seed=11, max_tokens=16, presence_penalty=0.6, frequency_penalty=0.4,
                          extra_body={**IGNORE_EOS, "repetition_penalty": 1.2}),
        # EOS and common stop tokens held back until 12 tokens
        "min_tokens": dict(temperature=1.0, seed=3, max_tokens=24,
                           extra_body={"min_tokens": 12, "top_k": 50, "stop_token_ids": stops}),
    }


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completions_equal_aggregated(pair: Pair, tokenizer: TextTokenizer, stream: bool) -> None:
    handoffs = Handoffs(pair.disagg, pair.transport)
    lengths = []
    for k, (name, kwargs) in enumerate(cases(tokenizer).items()):
        prompt = fresh(LONG_PROMPTS[k % 2])
        want, _ = completion(pair.agg, prompt, stream, **kwargs)
        got, num_prompt = completion(pair.disagg, prompt, stream, **kwargs)
        assert_same(got, want, pair.tol, name)
        lengths.append(num_prompt)
        if name == "min_tokens":
            assert len(tokenizer.encode(want[0].text)) >= 12 or want[0].finish_reason == "length"
    handoffs.check(lengths)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_equals_aggregated(pair: Pair, stream: bool) -> None:
    handoffs = Handoffs(pair.disagg, pair.transport)
    lengths = []
    for kwargs in (dict(temperature=0, max_completion_tokens=14, logprobs=True, top_logprobs=3),
                   dict(temperature=0.9, seed=21, max_completion_tokens=14, logprobs=True, top_logprobs=1),
                   dict(temperature=1.0, seed=4, max_completion_tokens=10, presence_penalty=0.5)):
        messages = [{"role": "system", "content": fresh("You are a poet who answers in one short stanza.")},
                    {"role": "user", "content": "Write about the sea at night, and the lighthouse on the cliff."}]
        want, _ = chat(pair.agg, messages, stream, **kwargs)
        got, num_prompt = chat(pair.disagg, messages, stream, **kwargs)
        assert_same(got, want, pair.tol, repr(kwargs))
        assert all(c.text.strip() for c in want.values())
        lengths.append(num_prompt)
    handoffs.check(lengths)


# ---- stop strings -------------------------------------------------------------------------------------
def spanning_stop(tokens: list[str]) -> tuple[str, int]:
    """A stop string that starts inside one token and ends inside the next, first met there; and
    where in the text it starts."""
    text = "".join(tokens)
    pos = 0
    for a, b in itertools.pairwise(tokens):
        pos += len(a)
        if len(a) >= 2 and len(b) >= 2 and (a[-1] + b[:2]).strip():
            stop = a[-1] + b[:2]
            if text.index(stop) == pos - 1:
                return stop, pos - 1
    raise AssertionError(f"no two tokens of two characters or more in {tokens!r}")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_strings_across_token_boundaries(pair: Pair, stream: bool) -> None:
    """The stop string is cut from the aggregated output so that it straddles two tokens; the
    disaggregated output stops right before it (or right after it, include_stop_str_in_output)."""
    handoffs = Handoffs(pair.disagg, pair.transport)
    lengths = []
    for sampling in (dict(temperature=0), dict(temperature=0.8, seed=13)):
        for include in (False, True):
            prompt = fresh(LONG_PROMPTS[1])
            full, _ = completion(pair.agg, prompt, False, max_tokens=24, logprobs=0, extra_body=IGNORE_EOS,
                                 **sampling)
            stop, at = spanning_stop(full[0].tokens[1:])  # not on the first token: the decode worker's part
            at += len(full[0].tokens[0])
            extra = {**IGNORE_EOS, "include_stop_str_in_output": include}
            got, num_prompt = completion(pair.disagg, prompt, stream, max_tokens=24, stop=[stop, "@@@"],
                                         extra_body=extra, **sampling)
            want = full[0].text[:at + (len(stop) if include else 0)]
            assert (got[0].text, got[0].finish_reason) == (want, "stop"), (sampling, include, stop, full[0].text)
            lengths.append(num_prompt)
    handoffs.check(lengths)


# ---- logprobs against the engine ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines() -> dict[str, LLM]:
    return {}  # by dtype, loaded on first use


def test_logprobs_equal_the_engine(pair: Pair, engines: dict[str, LLM], tokenizer: TextTokenizer) -> None:
    """The served logprobs and top alternatives are the engine's, for the first token (drawn on the
    prefill worker) and the rest (on the decode worker), greedy and seeded."""
    handoffs = Handoffs(pair.disagg, pair.transport)
    lengths = []
    if pair.dtype not in engines:  # one thread, like the workers: the same arithmetic
        engines[pair.dtype] = LLM("default", dtype=pair.dtype, num_threads=1, kv_cache_bytes=64 << 20, progress=False)
    engine = engines[pair.dtype]
    for sampling in (dict(temperature=0.0), dict(temperature=1.0, top_k=30, seed=17)):
        prompt = fresh(LONG_PROMPTS[0])
        (ref,) = engine.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True, logprobs=5, **sampling))
        got, num_prompt = completion(pair.disagg, prompt, False, max_tokens=12, logprobs=5,
                                     extra_body={**IGNORE_EOS, **({"top_k": 30} if "top_k" in sampling else {})},
                                     **{k: v for k, v in sampling.items() if k != "top_k"})
        want = ref.outputs[0]
        assert got[0].tokens == [tokenizer.token_text(t) for t in want.token_ids], sampling
        assert got[0].logprobs == pytest.approx([lp.logprob for lp in want.logprobs], abs=pair.tol), sampling
        for top, lp in zip(got[0].top, want.logprobs):
            assert top == pytest.approx({tokenizer.token_text(t): v for t, v in lp.top.items()}, abs=pair.tol)
            assert len(top) == 5
        lengths.append(num_prompt)
    handoffs.check(lengths)


# ---- KServe -------------------------------------------------------------------------------------------
def _inputs(text: str, params: dict[str, Any]) -> list[grpcclient.InferInput]:
    prompt = grpcclient.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([text.encode()], dtype=object))
    sampling = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    sampling.set_data_from_numpy(np.array([json.dumps(params).encode()], dtype=object))
    flag = grpcclient.InferInput("exclude_input_in_output", [1], "BOOL")
    flag.set_data_from_numpy(np.array([True], dtype=bool))
    return [prompt, sampling, flag]


def kserve(cluster: LocalCluster, text: str, params: dict[str, Any], stream: bool) -> str:
    triton = grpcclient.InferenceServerClient(cluster.grpc_target)
    try:
        if not stream:
            return triton.infer(model(cluster), _inputs(text, params), client_timeout=120).as_numpy(
                "text_output")[0].decode()
        responses: queue.Queue = queue.Queue()
        triton.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            triton.async_stream_infer(model(cluster), _inputs(text, params), request_id="r",
                                      enable_empty_final_response=True)
            pieces = []
            while True:
                result, error = responses.get(timeout=120)
                assert error is None, error
                out = result.as_numpy("text_output")
                pieces += [x.decode() for x in out] if out is not None else []
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    assert len(pieces) > 1  # streamed piece by piece
                    return "".join(pieces)
        finally:
            triton.stop_stream()
    finally:
        triton.close()


@pytest.mark.parametrize("stream", [False, True], ids=["infer", "stream"])
def test_kserve_equals_aggregated(pair: Pair, tokenizer: TextTokenizer, stream: bool) -> None:
    handoffs = Handoffs(pair.disagg, pair.transport)
    lengths = []
    for params in ({"max_tokens": 16, "temperature": 0, "ignore_eos": True},
                   {"max_tokens": 16, "temperature": 0.9, "top_p": 0.9, "seed": 5, "ignore_eos": True},
                   {"max_tokens": 16, "temperature": 0.7, "seed": 8, "frequency_penalty": 0.5,
                    "repetition_penalty": 1.1, "ignore_eos": True}):
        prompt = fresh(LONG_PROMPTS[0])
        want = kserve(pair.agg, prompt, params, stream)
        assert kserve(pair.disagg, prompt, params, stream) == want, params
        lengths.append(len(tokenizer.encode(prompt)))
    handoffs.check(lengths)
