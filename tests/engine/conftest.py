"""Fixtures for the engine tests: tiny random HF models saved once per session, and the
SmolLM2 GGUF (engine and tokenizer) loaded once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere

from collections.abc import Callable
from pathlib import Path

import pytest
from engine_testlib import TinyModel, build_tiny

from engine.llm import LLM
from engine.loader import default_model_path
from text.tokenizer import TextTokenizer


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TinyModel]:
    """``tiny_model(name)``: a tiny random HF model of one of ``TINY_CONFIGS``, saved once."""
    built: dict[str, TinyModel] = {}

    def get(name: str) -> TinyModel:
        if name not in built:
            built[name] = build_tiny(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_llama_path(tiny_model: Callable[[str], TinyModel]) -> str:
    return str(tiny_model("llama").path)


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def smollm(smollm_path: Path) -> LLM:
    """SmolLM2-135M-Instruct (GGUF) in float32, shared by the whole session: a test that uses
    it must leave no request behind."""
    return LLM(str(smollm_path), dtype="float32", num_blocks=128, progress=False)


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_path: Path) -> TextTokenizer:
    from engine.gguf_file import GGUFFile

    return TextTokenizer.from_gguf(GGUFFile(smollm_path).metadata)
