"""Chained block hashes: a block's hash covers its tokens and, through its parent's hash, every
token before it. The same in every process and on every host, so a router can name the blocks
a worker caches without asking it."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

NONE_HASH = 0  # the parent hash of a prompt's first block


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """64-bit chained hash of one full block; identical in every process and on every host."""
    h = hashlib.blake2b(parent_hash.to_bytes(8, "little"), digest_size=8)
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def hash_blocks(token_ids: Sequence[int], block_size: int, parent_hash: int = NONE_HASH) -> list[int]:
    """Chained hashes of every full block of ``token_ids``."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start:start + block_size])
        hashes.append(parent_hash)
    return hashes


def prompt_hashes(prompt_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the prompt blocks a worker can take from its prefix cache: every full
    block but one that would leave no token to compute (the block manager's ``match_prefix`` rule)."""
    usable = (len(prompt_ids) - 1) // block_size if prompt_ids else 0
    return hash_blocks(prompt_ids[:usable * block_size], block_size)
