"""The `openai` package against the disaggregated cluster: chat and completions, streamed and not,
usage, n, stop strings, seeds, logprobs, max_(completion_)tokens."""

from __future__ import annotations

import math

import openai
import pytest
from serving_testlib import LONG_PROMPTS, SHORT_PROMPTS, client, fresh, greedy_completion, model

from deploy.local_cluster import LocalCluster

pytestmark = pytest.mark.timeout(300)

CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three colors."}]


@pytest.fixture(params=["short", "long"])
def prompt(request: pytest.FixtureRequest) -> str:
    """Short: prefilled on the decode worker. Long: fresh for each test, so the test's first request
    with it is prefilled on the prefill worker (the decode worker has it cached from then on)."""
    return SHORT_PROMPTS[0] if request.param == "short" else fresh(LONG_PROMPTS[0])


def test_models_lists_the_served_model(disagg_cluster: LocalCluster) -> None:
    models = client(disagg_cluster).models.list().data
    assert [m.id for m in models] == [model(disagg_cluster)] == ["SmolLM2-135M-Instruct"]


def test_chat_completion(disagg_cluster: LocalCluster, agg_cluster: LocalCluster) -> None:
    resp = client(disagg_cluster).chat.completions.create(model=model(disagg_cluster), messages=CHAT,
                                                          max_completion_tokens=12, temperature=0)
    ref = client(agg_cluster).chat.completions.create(model=model(agg_cluster), messages=CHAT,
                                                      max_completion_tokens=12, temperature=0)
    assert (resp.choices[0].message.content, resp.choices[0].finish_reason) == \
        (ref.choices[0].message.content, ref.choices[0].finish_reason)
    assert resp.object == "chat.completion" and resp.model == model(disagg_cluster)
    (choice,) = resp.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = resp.usage
    assert usage.prompt_tokens > 10  # the chat template wraps the messages
    assert 1 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_equals_non_stream_and_reports_usage(disagg_cluster: LocalCluster) -> None:
    oai, name = client(disagg_cluster), model(disagg_cluster)
    whole = oai.chat.completions.create(model=name, messages=CHAT, max_completion_tokens=16, temperature=0)
    chunks = list(oai.chat.completions.create(model=name, messages=CHAT, max_completion_tokens=16, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    # include_usage: one last chunk without choices, with the usage of the whole request
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_stream_equals_non_stream(disagg_cluster: LocalCluster, prompt: str) -> None:
    oai, name = client(disagg_cluster), model(disagg_cluster)
    whole = oai.completions.create(model=name, prompt=prompt, max_tokens=20, temperature=0)
    chunks = list(oai.completions.create(model=name, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert whole.object == "text_completion"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == []
    usage = chunks[-1].usage  # (the second request finds the prompt in the prefix cache)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_usage_counts_prompt_and_completion_tokens(disagg_cluster: LocalCluster, prompt: str) -> None:
    resp = greedy_completion(disagg_cluster, prompt, max_tokens=7)
    ids = [101, 102, 103] * 7  # token ids given as the prompt: their count is known
    by_ids = greedy_completion(disagg_cluster, ids, max_tokens=3)
    assert resp.usage.completion_tokens == 7 == len(resp.choices[0].logprobs.tokens)
    assert resp.choices[0].finish_reason == "length"
    assert by_ids.usage.prompt_tokens == len(ids) and by_ids.usage.completion_tokens == 3
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 7
    assert (resp.usage.prompt_tokens > 16) == (prompt != SHORT_PROMPTS[0])


@pytest.mark.parametrize("n", [1, 2], ids=["remote-prefill", "local-prefill"])  # n > 1 prefills on the decoder
def test_usage_reports_cached_prompt_tokens(disagg_cluster: LocalCluster, n: int) -> None:
    oai, name = client(disagg_cluster), model(disagg_cluster)
    prompt = fresh(LONG_PROMPTS[1])  # not yet cached anywhere
    first, again = (oai.completions.create(model=name, prompt=prompt, n=n, max_tokens=2, temperature=0)
                    for _ in range(2))
    full_blocks = first.usage.prompt_tokens // 16
    assert full_blocks >= 2
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # the prompt's full blocks come from the prefix cache (at least one token is always computed)
    assert again.usage.prompt_tokens_details.cached_tokens >= (full_blocks - 1) * 16
    assert again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens


def test_max_completion_tokens_caps_the_output(disagg_cluster: LocalCluster) -> None:
    oai, name = client(disagg_cluster), model(disagg_cluster)
    for kwargs in ({"max_completion_tokens": 5}, {"max_tokens": 5}, {"max_completion_tokens": 5, "max_tokens": 50}):
        resp = oai.chat.completions.create(model=name, messages=CHAT, temperature=0,
                                           extra_body={"ignore_eos": True}, **kwargs)
        assert resp.usage.completion_tokens == 5, kwargs
        assert resp.choices[0].finish_reason == "length", kwargs


def test_n_choices(disagg_cluster: LocalCluster) -> None:
    oai, name = client(disagg_cluster), model(disagg_cluster)
    resp = oai.completions.create(model=name, prompt=LONG_PROMPTS[0], n=3, max_tokens=8, temperature=1.0, seed=7,
                                  logprobs=0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert all(len(c.logprobs.tokens) == 8 and c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 24
    assert len({c.text for c in resp.choices}) > 1  # seeded per sequence: seed, seed + 1, ...

    # greedy n > 1: every sequence is the n = 1 greedy one
    greedy = oai.chat.completions.create(model=name, messages=CHAT, n=2, max_completion_tokens=8, temperature=0)
    one = oai.chat.completions.create(model=name, messages=CHAT, max_completion_tokens=8, temperature=0)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert [c.message.content for c in greedy.choices] == [one.choices[0].message.content] * 2
    assert [c.finish_reason for c in greedy.choices] == [one.choices[0].finish_reason] * 2


def test_n_choices_streamed(disagg_cluster: LocalCluster) -> None:
    oai, name = client(disagg_cluster), model(disagg_cluster)
    kwargs = dict(model=name, messages=CHAT, n=2, max_completion_tokens=6, temperature=0.9, seed=11,
                  extra_body={"ignore_eos": True})
    whole = oai.chat.completions.create(**kwargs)
    chunks = list(oai.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 12 == whole.usage.completion_tokens


def test_stop_strings(disagg_cluster: LocalCluster, prompt: str) -> None:
    oai, name = client(disagg_cluster), model(disagg_cluster)
    full = greedy_completion(disagg_cluster, prompt, max_tokens=24).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]  # mid-output, usually not on a token boundary
    assert stop.strip(), full
    expected = full[:full.index(stop)]
    for stream in (False, True):
        resp = oai.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "@@@"],
                                      stream=stream, extra_body={"ignore_eos": True})
        if stream:
            chunks = [c for c in resp if c.choices]
            text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = resp.choices[0].text, resp.choices[0].finish_reason
        assert (text, finish) == (expected, "stop"), (stream, stop, full)
    kept = oai.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                  extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == expected + stop
    assert kept.usage.completion_tokens < 24


def test_seed_reproduces_sampling(disagg_cluster: LocalCluster, prompt: str) -> None:
    """Long: the first request is prefilled remotely, the repeat locally (its prompt cached on the
    decode worker): the seed gives the same text either way."""
    oai, name = client(disagg_cluster), model(disagg_cluster)

    def sample(seed: int) -> str:
        return oai.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=1.0, top_p=0.95,
                                      seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert {sample(s) for s in (1, 2, 3)} != {first}


def test_completion_logprobs(disagg_cluster: LocalCluster) -> None:
    resp = client(disagg_cluster).completions.create(model=model(disagg_cluster), prompt=LONG_PROMPTS[1],
                                                     max_tokens=10, temperature=0, logprobs=3,
                                                     extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(10)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and math.isfinite(logprob)
        assert 1 <= len(top) <= 3
        # greedy: the sampled token is the most likely one
        assert top[token] == pytest.approx(logprob, abs=1e-5) and logprob == pytest.approx(max(top.values()), abs=1e-5)


def test_chat_logprobs(disagg_cluster: LocalCluster) -> None:
    resp = client(disagg_cluster).chat.completions.create(model=model(disagg_cluster), messages=CHAT,
                                                          max_completion_tokens=6, temperature=0, logprobs=True,
                                                          top_logprobs=2)
    choice = resp.choices[0]
    content = choice.logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2 and bytes(t.bytes).decode() == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
    none = client(disagg_cluster).chat.completions.create(model=model(disagg_cluster), messages=CHAT,
                                                          max_completion_tokens=3, temperature=0)
    assert none.choices[0].logprobs is None


def test_openai_errors_are_typed(disagg_cluster: LocalCluster) -> None:
    oai = client(disagg_cluster)
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=model(disagg_cluster), messages=CHAT, temperature=-1, stream=True)
    assert e.value.body["param"] == "temperature"
