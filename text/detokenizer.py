"""Incremental detokenization: token ids in, text deltas out, with stop strings matched on the
text. The one place tokens become text (the router when serving, the offline ``LLM`` in
process): workers are token-in/token-out."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import decoders

from text.tokenizer import TextTokenizer


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that never split a multi-byte character,
    finds stop strings, and holds back text that may still become one (so a streamed stop
    string never reaches the client)."""

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str], include_stop: bool,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self._stream = decoders.DecodeStream(skip_special_tokens=skip_special_tokens)
        self.text = ""
        self._emitted = 0
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token_id: int) -> str | None:
        """Feed one token; returns the matched stop string if the text now contains one (the
        text is cut there), else None."""
        piece = self._stream.step(self.tokenizer.tokenizer, token_id)
        if not piece:
            return None
        start = max(0, len(self.text) - self._hold)
        self.text += piece
        hits = [(at, s) for s in self.stop if (at := self.text.find(s, start)) >= 0]
        if not hits:
            return None
        at, s = min(hits)
        self.text = self.text[:at + len(s)] if self.include_stop else self.text[:at]
        return s

    def delta(self, finished: bool) -> str:
        """New text since the last call; while running, keeps back what could start a stop string."""
        end = len(self.text) if finished or not self._hold else max(self._emitted, len(self.text) - self._hold)
        out = self.text[self._emitted:end]
        self._emitted = end
        return out
