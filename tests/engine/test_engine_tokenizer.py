"""Our tokenizer built from the SmolLM2 GGUF's metadata against transformers' own GGUF
tokenizer: the same ids, the same text back, the same chat template rendering."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from text.tokenizer import TextTokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\n\nnew lines  ",
    "I'm sure they'll've done it; we'd",
    # SmolLM2's pre-tokenizer ("smollm") splits digits one by one
    "Prices: 12345 and 3.14159, year 2024",
    "def f(x):\n    return x**2  # square\n",
    "Héllo wörld 你好世界 🙂🎉 naïve café",
    "emoji👍🏽 and ZWJ 👨‍👩‍👧",
    "Ünïcödé ΑΒΓ абв العربية",
    "<|im_start|>user\nhi<|im_end|>\n",  # special tokens written in the text are matched
    "The quick brown fox jumps over the lazy dog. " * 3,
]

CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye 🙂"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


def test_special_ids(smollm_tokenizer: TextTokenizer, hf_tokenizer: Any) -> None:
    tok = smollm_tokenizer
    assert tok.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert tok.eos_token_ids == (hf_tokenizer.eos_token_id,) == (2,)
    assert tok.vocab_size == len(hf_tokenizer) == 49152
    assert not tok.add_bos_token


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_like_transformers(smollm_tokenizer: TextTokenizer, hf_tokenizer: Any,
                                         text: str) -> None:
    ids = smollm_tokenizer.encode(text)
    assert ids == hf_tokenizer(text).input_ids
    raw = hf_tokenizer(text, add_special_tokens=False).input_ids
    assert smollm_tokenizer.encode(text, add_special_tokens=False) == raw
    for skip in (False, True):
        assert smollm_tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
            ids, skip_special_tokens=skip)
    assert smollm_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_digits_are_split_one_by_one(smollm_tokenizer: TextTokenizer) -> None:
    ids = smollm_tokenizer.encode("2024")
    assert [smollm_tokenizer.token_text(i) for i in ids] == ["2", "0", "2", "4"]


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_like_transformers(smollm_tokenizer: TextTokenizer, hf_tokenizer: Any,
                                        messages: list[dict[str, Any]], add_generation_prompt: bool) -> None:
    text = smollm_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt)
    ids = smollm_tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    ref = hf_tokenizer.apply_chat_template(messages, tokenize=True,
                                           add_generation_prompt=add_generation_prompt)
    ref_ids = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert ids == list(ref_ids)
    if add_generation_prompt:
        assert text.endswith("<|im_start|>assistant\n")
    if messages[0]["role"] != "system":  # SmolLM2's template writes its default system prompt
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_template_errors_are_value_errors() -> None:
    from tokenizers import Tokenizer, models

    plain = TextTokenizer(Tokenizer(models.BPE()), None, [], None, False)
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])
    strict = TextTokenizer(Tokenizer(models.BPE()), None, [],
                           "{{ raise_exception('only user messages') }}", False)
    with pytest.raises(ValueError, match="only user messages"):
        strict.apply_chat_template([{"role": "system", "content": "x"}])


def test_llm_chat_prompt_is_the_rendered_template(smollm: Any, hf_tokenizer: Any) -> None:
    from protocol.sampling import SamplingParams

    res = smollm.chat(CHATS[1], SamplingParams(temperature=0.0, max_tokens=4))
    ref = hf_tokenizer.apply_chat_template(CHATS[1], tokenize=True, add_generation_prompt=True)
    assert res.prompt_token_ids == list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    assert 1 <= len(res.outputs[0].token_ids) <= 4
