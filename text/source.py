"""Loading a tokenizer from where a model card says it is. The router needs the model's
tokenizer files at the path the worker registered (never its weights); a dummy model registers a
synthetic tokenizer (``text.synthetic``), which needs no files."""

from __future__ import annotations

from pathlib import Path

from protocol.model_card import TokenizerKind, TokenizerSource
from text.tokenizer import TextTokenizer


def load_tokenizer(source: TokenizerSource) -> TextTokenizer:
    if source.kind is TokenizerKind.SYNTHETIC:
        from text.synthetic import synthetic_tokenizer

        try:
            vocab_size = int(source.path)
        except ValueError:
            raise ValueError(f"a synthetic tokenizer source names its vocabulary size, got {source.path!r}") from None
        return synthetic_tokenizer(vocab_size)
    if source.kind is TokenizerKind.GGUF:
        from text.gguf import read_metadata

        return TextTokenizer.from_gguf(read_metadata(source.path))
    return TextTokenizer.from_dir(Path(source.path))
