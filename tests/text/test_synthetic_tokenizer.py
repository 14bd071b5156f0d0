"""The synthetic tokenizer of ``dummy:`` models: every id of the model's vocabulary detokenizes,
any text encodes (byte by byte), and the worker's registration carries it to the router with no
files (``TokenizerSource`` SYNTHETIC, the vocabulary size)."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.loader import tokenizer_source
from protocol.model_card import ModelCard, TokenizerKind, TokenizerSource
from runtime.discovery import WorkerInfo
from text.detokenizer import IncrementalDetokenizer
from text.source import load_tokenizer
from text.synthetic import synthetic_tokenizer


def test_every_id_decodes_and_text_round_trips() -> None:
    tok = synthetic_tokenizer(1000)
    assert tok.vocab_size == 1000
    text = "héllo, wörld: 42 ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([300, 999]) == " t300 t999"
    detok = IncrementalDetokenizer(tok, stop=[" t301"], include_stop=False)
    assert detok.add(300) is None and detok.add(301) == " t301"
    assert detok.delta(True) == " t300"
    with pytest.raises(ValueError, match="256"):
        synthetic_tokenizer(100)


def test_a_dummy_model_registers_its_synthetic_tokenizer() -> None:
    source = tokenizer_source(EngineConfig(model="dummy:llama-3.1-8b"))
    assert source == TokenizerSource(TokenizerKind.SYNTHETIC, "128256")
    info = WorkerInfo("d0", "decode", "127.0.0.1:1", ModelCard("llama-3.1-8b", 4096, source), 16)
    back = WorkerInfo.from_pb(info.to_pb())
    assert back.model.tokenizer == source
    tok = load_tokenizer(back.model.tokenizer)
    assert tok.vocab_size == 128256 and tok.decode([128255]) == " t128255"
