"""Disaggregated equals aggregated on the remote path, for what users send: greedy and seeded
sampling, penalties, min_tokens, logprobs with top alternatives, streamed and not, through the
OpenAI API (completions and chat).

Every request here is prefilled on the prefill worker and its KV pulled by the decode worker:
prompts are fresh (a unique tag: nothing cached anywhere) and longer than the clusters'
max_local_prefill_tokens, and each test checks the router's route counters and the decode
worker's pulled blocks (``Handoffs``). Pair: ``disagg_cluster`` / ``agg_cluster`` (float32), one
CPU thread per worker. (n > 1 is prefilled where it decodes: the router never hands it off.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from serving_testlib import LONG_PROMPTS, NIXL, Handoffs, client, fresh, model

from deploy.local_cluster import LocalCluster
from engine.gguf_file import GGUFFile
from engine.loader import default_model_path
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


@pytest.fixture(params=["float32"])
def pair(request: pytest.FixtureRequest, disagg_cluster: LocalCluster, agg_cluster: LocalCluster) -> Pair:
    return Pair(disagg_cluster, agg_cluster, "float32", 1e-4)


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
    handoffs = Handoffs(pair.disagg, TRANSPORT)
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
    handoffs = Handoffs(pair.disagg, TRANSPORT)
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
