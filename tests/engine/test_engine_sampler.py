"""Sampling: seeded reproducibility, the support of top-k / top-p / min-p, penalties, stop
strings and tokens, incremental detokenization of multi-byte characters, and bad parameters
refused with a clear error while the engine stays usable."""

from __future__ import annotations

import math

import pytest
import torch
from engine_testlib import make_tiny_llm, random_prompts

from engine.llm import LLM
from engine.request import Request
from engine.sampler import Sampler
from protocol.outputs import FinishReason
from protocol.sampling import SamplingParams
from text.detokenizer import IncrementalDetokenizer
from text.tokenizer import TextTokenizer

CPU = torch.device("cpu")
PROBS = torch.tensor([0.35, 0.25, 0.15, 0.10, 0.06, 0.05, 0.03, 0.01])
NUM_DRAWS = 4000


def request(rid: str, prompt: list[int] | None = None, output: list[int] = (), **params) -> Request:
    r = Request(rid, list(prompt or [1, 2, 3]), SamplingParams(**params))
    for t in output:
        r.append_token(t)
    return r


def draw(num: int = NUM_DRAWS, probs: torch.Tensor = PROBS, **params) -> torch.Tensor:
    """``num`` independent samples from one crafted distribution (one batch of ``num`` rows)."""
    sampler = Sampler(CPU, seed=0)
    logits = probs.log().expand(num, -1).contiguous()
    tokens = sampler(logits, [request(f"r{i}", **params) for i in range(num)])
    return torch.tensor([t.token_id for t in tokens])


def assert_distribution(samples: torch.Tensor, expected: dict[int, float]) -> None:
    """Only the expected ids appear, each with its expected frequency (within 5 sigma)."""
    assert set(samples.tolist()) == set(expected)
    n = len(samples)
    for token_id, p in expected.items():
        freq = float((samples == token_id).float().mean())
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (token_id, freq, p)


def renormalized(ids: list[int], probs: torch.Tensor = PROBS) -> dict[int, float]:
    total = float(probs[ids].sum())
    return {i: float(probs[i]) / total for i in ids}


# ---- support and distribution -----------------------------------------------------------------
def test_plain_sampling_follows_the_distribution() -> None:
    assert_distribution(draw(temperature=1.0), renormalized(list(range(8))))


def test_temperature_sharpens() -> None:
    sharp = PROBS ** 2  # temperature 0.5 squares the probabilities
    assert_distribution(draw(temperature=0.5), renormalized(list(range(8)), sharp / sharp.sum()))


@pytest.mark.parametrize(("params", "allowed"), [
    (dict(top_k=3), [0, 1, 2]),
    (dict(top_k=1, temperature=1.0), [0]),
    (dict(top_p=0.5), [0, 1]),  # mass before each: 0, .35, .60: keep while < .5
    (dict(top_p=0.7), [0, 1, 2]),
    (dict(top_p=0.01), [0]),  # the top token always stays
    (dict(min_p=0.5), [0, 1]),  # threshold .175
    (dict(min_p=0.3), [0, 1, 2]),  # threshold .105
    (dict(top_k=4, top_p=0.8), [0, 1, 2]),  # top-p over the top-k renormalized: 0, .41, .71, .88
    (dict(top_k=6, min_p=0.2), [0, 1, 2, 3]),  # threshold .07
])
def test_truncation_restricts_the_support(params: dict, allowed: list[int]) -> None:
    assert_distribution(draw(**params), renormalized(allowed))


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 5.5]])
    tokens = Sampler(CPU)(logits, [request("a", temperature=0.0), request("b", temperature=0.0)])
    assert [t.token_id for t in tokens] == [1, 3]


# ---- seeds ---------------------------------------------------------------------------------------
def test_seeded_sampler_reproducible_in_any_batch() -> None:
    gen = torch.Generator().manual_seed(5)
    steps = [torch.randn(4, 100, generator=gen) for _ in range(12)]

    def run(sampler_seed: int, seed: int, batch_others: bool) -> list[int]:
        sampler = Sampler(CPU, seed=sampler_seed)
        target = request("target", seed=seed)
        if batch_others:  # somewhere else in the batch, among unseeded and other-seeded rows
            batch = [request("x"), request("y", seed=seed + 1), target, request("z", temperature=0.0)]
            row = 2
        else:
            batch, row = [target], 0
        out = []
        for logits in steps:
            rows = logits if batch_others else logits[2:3]
            out.append(sampler(rows, batch)[row].token_id)
        return out

    alone = run(0, 42, False)
    assert run(0, 42, False) == alone
    assert run(123, 42, True) == alone  # another global seed, another batch: same tokens
    assert run(0, 43, False) != alone


def test_unseeded_sampler_follows_the_engine_seed() -> None:
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))

    def run(seed: int) -> list[int]:
        sampler = Sampler(CPU, seed=seed)
        return [sampler(logits, [request("r")])[0].token_id for _ in range(10)]

    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.fixture(scope="module")
def tiny(tiny_llama_path: str) -> LLM:
    return make_tiny_llm(tiny_llama_path)


def test_seeded_generation_reproducible_alone_batched_and_in_n(tiny: LLM) -> None:
    p, q, s = random_prompts([12, 30, 7], seed=21)
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=42)

    def gen(prompts: list, plist: list) -> list[list[int]]:
        return [c.token_ids for r in tiny.generate(prompts, plist) for c in r.outputs]

    (alone,) = gen([p], [params])
    assert gen([p], [params]) == [alone]
    others = [SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, max_tokens=20, ignore_eos=True, seed=7)]
    batched = gen([q, p, s], [others[0], params, others[1]])
    assert batched[1] == alone
    # n > 1: sequence i uses seed + i
    (seed43,) = gen([p], [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=43)])
    assert seed43 != alone
    n2 = gen([p], [SamplingParams(n=2, temperature=1.0, max_tokens=16, ignore_eos=True, seed=42)])
    assert n2 == [alone, seed43]


# ---- penalties -----------------------------------------------------------------------------------
RAW = [2.0, -1.0, 0.5, 3.0, -2.0, 0.0]


@pytest.mark.parametrize(("params", "expected"), [
    # over prompt (0, 1) and output (3, 3, 4): positive logits divided, negative multiplied
    (dict(repetition_penalty=2.0), [1.0, -2.0, 0.5, 1.5, -4.0, 0.0]),
    # over the output only: count 2 for token 3, 1 for token 4
    (dict(presence_penalty=0.5), [2.0, -1.0, 0.5, 2.5, -2.5, 0.0]),
    (dict(frequency_penalty=0.25), [2.0, -1.0, 0.5, 2.5, -2.25, 0.0]),
    (dict(frequency_penalty=-0.5), [2.0, -1.0, 0.5, 4.0, -1.5, 0.0]),
    (dict(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
     [1.0, -2.0, 0.5, 0.5, -4.75, 0.0]),
])
def test_penalties_change_logits_as_specified(params: dict, expected: list[float]) -> None:
    r = request("r", prompt=[0, 1], output=[3, 3, 4], **params)
    plain = request("plain", prompt=[0, 1], output=[3, 3, 4])
    logits = torch.tensor([RAW, RAW])
    out = Sampler._apply_penalties(logits.clone(), [r, plain])
    assert out[0].tolist() == pytest.approx(expected)
    assert out[1].tolist() == RAW  # a request without penalties is untouched


def test_penalty_flips_greedy_but_logprobs_stay_raw() -> None:
    logits = torch.tensor([RAW])
    plain = Sampler(CPU)(logits, [request("a", output=[3], temperature=0.0, logprobs=1)])[0]
    assert plain.token_id == 3
    penalized = Sampler(CPU)(logits, [request("b", output=[3], temperature=0.0, presence_penalty=1.5,
                                              logprobs=1)])[0]
    assert penalized.token_id == 0
    raw = torch.log_softmax(logits[0], dim=-1)
    assert penalized.logprob is not None
    assert penalized.logprob.logprob == pytest.approx(float(raw[0]))
    assert penalized.logprob.top == pytest.approx({3: float(raw[3])})


# ---- detokenization and stop strings -------------------------------------------------------------
MULTIBYTE = "Héllo wörld 你好世界 🙂🎉 naïve café — 日本語のテキスト"


def stream(tok: TextTokenizer, ids: list[int], stop: tuple[str, ...] = (), include: bool = False
           ) -> tuple[list[str], str | None, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, stop, include)
    deltas, hit = [], None
    for token_id in ids:
        hit = detok.add(token_id)
        if hit is not None:
            break
        deltas.append(detok.delta(False))
    deltas.append(detok.delta(True))
    return deltas, hit, detok


def test_incremental_detokenization_never_splits_a_character(smollm_tokenizer: TextTokenizer) -> None:
    tok = smollm_tokenizer
    ids = tok.encode(MULTIBYTE)
    assert any("\ufffd" in tok.token_text(i) for i in ids)  # some tokens are partial characters
    for stop in ((), ("never there",)):  # with a stop string, text is held back, then flushed
        deltas, hit, _ = stream(tok, ids, stop)
        assert hit is None
        assert "".join(deltas) == tok.decode(ids) == MULTIBYTE
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stop", ["世界", "ld 你", "🎉", " caf", "テキスト"])
def test_stop_string_cuts_exactly(smollm_tokenizer: TextTokenizer, stop: str, include: bool) -> None:
    tok = smollm_tokenizer
    deltas, hit, detok = stream(tok, tok.encode(MULTIBYTE), (stop, "never there"), include)
    at = MULTIBYTE.index(stop)
    expected = MULTIBYTE[:at + len(stop)] if include else MULTIBYTE[:at]
    assert hit == stop
    assert detok.text == expected
    assert "".join(deltas) == expected
    assert not any("\ufffd" in d for d in deltas)


def test_stop_strings_and_tokens_in_the_engine(smollm: LLM) -> None:
    prompt = "The three primary colors are"
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    (base,) = smollm.generate([prompt], greedy)
    full = base.outputs[0].text
    ids = base.outputs[0].token_ids
    tok = smollm.tokenizer
    assert tok is not None
    # A stop string across a token boundary: the end of token 5 and the start of token 6.
    boundary = len(tok.decode(ids[:6]))
    stop = full[boundary - 2:boundary + 2]
    assert full.index(stop) == boundary - 2 and len(stop.strip()) >= 2
    for include in (False, True):
        (res,) = smollm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                          stop=[stop], include_stop_str_in_output=include))
        c = res.outputs[0]
        assert c.text == (full[:boundary + 2] if include else full[:boundary - 2])
        assert (c.finish_reason, c.stop_reason) == (FinishReason.STOP, stop)
        assert c.token_ids == ids[:7]  # generation stopped on the token that completed it
    # A stop token: generation ends on it.
    (res,) = smollm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                      stop_token_ids=[ids[9]]))
    c = res.outputs[0]
    assert c.token_ids == ids[:ids.index(ids[9]) + 1]
    assert (c.finish_reason, c.stop_reason) == (FinishReason.STOP, ids[9])
    assert not smollm.engine.has_unfinished()


# ---- bad parameters ---------------------------------------------------------------------------
@pytest.mark.parametrize(("params", "name"), [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(n=0), "n"),
    (dict(logprobs=-1), "logprobs"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(stop=[""]), "stop"),
])
def test_bad_sampling_params(params: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams(**params)


def test_bad_requests_leave_the_engine_usable(tiny: LLM) -> None:
    engine = tiny.engine
    bm = engine.block_manager
    (good,) = random_prompts([20], seed=99)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    (before,) = tiny.generate([good], greedy)
    assert engine.max_model_len == 256
    (too_long, exactly_context) = random_prompts([300, 256], seed=98)
    for bad, match in ((too_long, "300 tokens.*context is 256"), (exactly_context, "256 tokens"),
                       ([], "empty"), ([5, 512], r"\[0, 512\)"), ([-1], r"\[0, 512\)")):
        with pytest.raises(ValueError, match=match):
            tiny.generate([good, bad], greedy)  # the good one, queued first, is withdrawn too
        assert not engine.has_unfinished()
        assert bm.num_free_blocks == bm.num_blocks
    with pytest.raises(ValueError, match="tokenizer"):
        tiny.generate([good], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="tokenizer"):
        tiny.generate("text needs a tokenizer")
    with pytest.raises(ValueError, match="one SamplingParams per prompt"):
        tiny.generate([good, good], [greedy])
    engine.add_request("dup", good, greedy)
    with pytest.raises(ValueError, match="duplicate"):
        engine.add_request("dup", good, greedy)
    engine.abort("dup")
    assert not engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks
    (after,) = tiny.generate([good], greedy)
    assert after.outputs[0].token_ids == before.outputs[0].token_ids
    # The longest prompt that fits generates up to the context.
    (longest,) = random_prompts([255], seed=97)
    (res,) = tiny.generate([longest], greedy)
    assert len(res.outputs[0].token_ids) == 1 and res.outputs[0].finish_reason is FinishReason.LENGTH
