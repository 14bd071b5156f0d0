"""A synthetic tokenizer for models without one (``dummy:`` presets): byte-level, with exactly the
model's vocabulary. Ids 0-255 are the 256 bytes (so any text encodes, byte by byte); every other
id ``i`` decodes to the text `` t<i>`` (so any id the model samples detokenizes). No files, no
special tokens, no chat template: the router serves completions of token ids or text with it."""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from text.tokenizer import TextTokenizer

MIN_VOCAB_SIZE = 256


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte value (what byte-level BPE vocabularies spell)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@functools.lru_cache(maxsize=4)
def synthetic_tokenizer(vocab_size: int) -> TextTokenizer:
    """The synthetic tokenizer of ``vocab_size`` ids (>= 256). ValueError below that."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"a synthetic tokenizer needs an int vocabulary size >= {MIN_VOCAB_SIZE}, got {vocab_size!r}")
    byte_chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(byte_chars)}
    for i in range(MIN_VOCAB_SIZE, vocab_size):
        vocab["".join(byte_chars[b] for b in f" t{i}".encode())] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return TextTokenizer(tok, None, (), None, False)
