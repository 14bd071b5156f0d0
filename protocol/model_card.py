"""The model a worker serves, as clients see it. Workers register it in etcd
(``runtime.discovery.WorkerInfo``); the router lists and serves models from what they register."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TokenizerKind(enum.StrEnum):
    GGUF = "gguf"  # the tokenizer in a GGUF file's metadata
    HF_DIR = "hf_dir"  # an HF model directory's tokenizer.json (and tokenizer_config.json, ...)
    SYNTHETIC = "synthetic"  # no files: text.synthetic's tokenizer; ``path`` is its vocabulary size


@dataclass(frozen=True)
class TokenizerSource:
    """Where a model's tokenizer lives, as a path on the worker's host (``text.source`` loads it);
    for ``SYNTHETIC`` (dummy models) ``path`` is the vocabulary size, in decimal."""

    kind: TokenizerKind
    path: str


@dataclass(frozen=True)
class ModelCard:
    """A model's name (what requests put in "model"), its context length (prompt plus generated
    tokens, at most) and where its tokenizer is (None: it has none)."""

    name: str
    max_model_len: int
    tokenizer: TokenizerSource | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a model card needs a name")
        if isinstance(self.max_model_len, bool) or not isinstance(self.max_model_len, int) or self.max_model_len < 2:
            raise ValueError(f"model {self.name}: max_model_len must be an int >= 2")
