"""bfloat16 on the CPU against Hugging Face transformers: our bfloat16 engine is as close to the
float32 truth as transformers' own bfloat16 model, and picks float32's greedy token wherever the
top-two gap is clear.

Teacher-forced: our greedy tokens are scored by transformers in float32 (the truth) and in
bfloat16. Per position, ``ours`` = |our logprob - float32's| and ``theirs`` = |transformers'
bfloat16 logprob - float32's| for the same token. bfloat16 errors scale with the logits, so the
bounds are relative to ``theirs``. A "clear" position is one whose float32 top-two gap exceeds
the error of a bfloat16 model ERROR_RATIO times less accurate than theirs on those two tokens,
plus one bfloat16 step of the logits there: such a model cannot swap them. Models: the SmolLM2 GGUF (real
weights, dequantized into bfloat16 by both sides) and two tiny random ones (large-std weights:
big logits, so big bfloat16 errors)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from engine_testlib import TinyModel, random_prompts

from engine.llm import LLM
from protocol.sampling import SamplingParams
from text.tokenizer import TextTokenizer

NEW_TOKENS = 16
MIN_CLEAR = 0.3  # of the positions: the greedy check must cover a good share of them
# How much further from float32 than transformers' bfloat16 ours may be at one position: the two
# round in different places (measured: medians 1.0-1.4 times theirs, single positions up to 2.5).
ERROR_RATIO = 3.0


def logits_at(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The model's logits at each generated position ``[len(tokens), vocab]``, as float32."""
    with torch.no_grad():
        return model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()


def bf16_spacing(x: torch.Tensor) -> torch.Tensor:
    """The distance between neighbouring bfloat16 values around ``x`` (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(1e-30))) - 7)


def check_bf16(path: str, hf32: torch.nn.Module, prompts: list[list[int]]) -> None:
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    llm = LLM(path, dtype="bfloat16", num_threads=1, num_blocks=64, progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    ours, theirs, clear, picks = [], [], [], []
    for prompt, result in zip(prompts, llm.generate(prompts, params)):
        tokens = result.outputs[0].token_ids
        raw = logits_at(hf32, prompt, tokens)
        truth, bf16 = raw.log_softmax(-1), logits_at(hf16, prompt, tokens).log_softmax(-1)
        idx = torch.tensor(tokens)[:, None]
        served = torch.tensor([lp.logprob for lp in result.outputs[0].logprobs])
        ours.append((served - truth.gather(1, idx)[:, 0]).abs())
        theirs.append((bf16 - truth).gather(1, idx)[:, 0].abs())
        top2 = truth.topk(2, -1)
        # Each of the two off by up to ERROR_RATIO times theirs, plus one step of the bfloat16 logits
        # there (a tie in bfloat16 is a coin toss; ours breaks it towards the lower id).
        margin = 2 * ERROR_RATIO * (bf16 - truth).gather(1, top2.indices).abs().max(-1).values + \
            bf16_spacing(raw.gather(1, top2.indices[:, :1])[:, 0])
        clear.append(top2.values[:, 0] - top2.values[:, 1] > margin)
        picks.append(torch.tensor(tokens) == top2.indices[:, 0])
    ours_t, theirs_t, clear_t, picks_t = (torch.cat(x) for x in (ours, theirs, clear, picks))
    summary = (f"ours median {ours_t.median():.4f} max {ours_t.max():.4f}; transformers' bf16 median "
               f"{theirs_t.median():.4f} max {theirs_t.max():.4f}; clear {int(clear_t.sum())}/{len(clear_t)}")
    assert ours_t.median() <= 1.5 * theirs_t.median(), summary
    assert ours_t.max() <= 1.5 * theirs_t.max(), summary  # the worst positions, over the whole run
    assert clear_t.float().mean() >= MIN_CLEAR, summary
    wrong = (clear_t & ~picks_t).nonzero()[:, 0].tolist()
    assert not wrong, f"a wrong greedy pick where float32's top-two gap is clear, at positions {wrong}; {summary}"


@pytest.mark.parametrize("name", [
    # The CPU kernels (engine/csrc) on the tiny llama: median error 1.65 times transformers' bf16
    # (0.053 vs 0.032 nats), over the 1.5 bound; it was 1.4 times before them. Left for the
    # kernels' owner: strict, so it reports when it passes.
    pytest.param("llama", marks=pytest.mark.xfail(strict=True, reason="CPU kernels: bf16 median error 1.65x "
                                                                       "transformers' on the tiny llama")),
    "qwen3",
])
def test_tiny_model_bf16_close_to_transformers(tiny_model: Callable[[str], TinyModel], name: str) -> None:
    tiny = tiny_model(name)
    check_bf16(str(tiny.path), tiny.hf_model, random_prompts([3, 17, 40, 100], seed=1))


def test_smollm_gguf_bf16_close_to_transformers(smollm_path: Path, smollm_tokenizer: TextTokenizer) -> None:
    from transformers import AutoModelForCausalLM

    hf32 = AutoModelForCausalLM.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name,
                                                dtype=torch.float32).eval()
    text = ("The history of the city begins with a small settlement on the river, where traders from the "
            "north and the south met to exchange salt, grain and cloth. Over the centuries the market grew "
            "into a town, and the town into a city with walls, churches and a university. ")
    ids = smollm_tokenizer.encode(text * 3)
    check_bf16(str(smollm_path), hf32, [ids[start:start + n] for start, n in zip([0, 11, 29], [17, 40, 100])])
