"""The KV cache layout both sides of a transfer agree on, and block-run merging.

Engine contract: a worker holds ONE contiguous tensor
``kv[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``, so block ``b`` (all layers,
K and V) is the byte range ``[b * bytes_per_block, (b + 1) * bytes_per_block)`` of that tensor.
Two workers can exchange blocks when everything but ``num_blocks`` matches.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class KVLayout:
    """Shape, dtype and (optional) model of a worker's KV tensor; ``num_blocks`` may differ per worker."""

    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # a key of _DTYPES, e.g. "bfloat16"
    model: str = ""  # free-form model id; checked only when both sides set it

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"unsupported KV dtype {self.dtype!r}; expected one of {sorted(_DTYPES)}")
        for name in ("num_blocks", "num_layers", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_tensor(cls, kv: torch.Tensor, model: str = "") -> KVLayout:
        """The layout of an engine KV tensor; raises ``ValueError`` when it breaks the contract."""
        if kv.dim() != 6 or kv.shape[2] != 2:
            raise ValueError(
                "kv must have shape [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], "
                f"got {tuple(kv.shape)}"
            )
        if not kv.is_contiguous():
            raise ValueError("kv must be contiguous: a block must be one byte range")
        dtype = str(kv.dtype).removeprefix("torch.")
        num_blocks, num_layers, _, block_size, num_kv_heads, head_dim = kv.shape
        return cls(num_blocks, num_layers, block_size, num_kv_heads, head_dim, dtype, model)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        n = self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim
        return n * self.torch_dtype.itemsize

    def mismatches(self, other: KVLayout) -> list[str]:
        """Human-readable differences that forbid exchanging blocks (empty when compatible)."""
        out = []
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name} {mine} != {theirs}")
        if self.model and other.model and self.model != other.model:
            out.append(f"model {self.model!r} != {other.model!r}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVLayout:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class BlockRun(NamedTuple):
    """``num_blocks`` consecutive blocks from ``remote_start`` on the peer into ``local_start`` here
    (a push: from ``local_start`` here into ``remote_start`` on the peer). A tuple: made per block."""

    remote_start: int
    local_start: int
    num_blocks: int


def merge_runs(remote_block_ids: Sequence[int], local_block_ids: Sequence[int]) -> list[BlockRun]:
    """Merge (remote, local) block pairs into runs that are contiguous on both sides at once.

    Pairs are ordered by local block id first (each local block is written once, so the order of
    copies does not matter), then a pair extends the current run when both its ids are the next ones.
    The caller validates the ids (see ``check_block_ids``).
    """
    pairs = sorted(zip(local_block_ids, remote_block_ids))
    runs: list[BlockRun] = []
    if not pairs:
        return runs
    local_start, remote_start = pairs[0]
    n = 1
    for local, remote in itertools.islice(pairs, 1, None):  # plain ints here: this runs per block
        if local == local_start + n and remote == remote_start + n:
            n += 1
            continue
        runs.append(BlockRun(remote_start, local_start, n))
        local_start, remote_start, n = local, remote, 1
    runs.append(BlockRun(remote_start, local_start, n))
    return runs


def check_block_ids(
    remote_block_ids: Sequence[int],
    local_block_ids: Sequence[int],
    num_remote: int,
    num_local: int,
    sides: tuple[str, str] = ("remote", "local"),
) -> None:
    """Raise ``ValueError`` on a bad request: unequal lengths, out-of-range ids, or a destination id
    (the second list: ``local`` for a pull) that repeats. ``sides`` names the two lists in messages
    (a push passes its source ids first and its destination ids second: ``("local", "remote")``).
    """
    src, dst = sides
    if len(remote_block_ids) != len(local_block_ids):
        raise ValueError(f"{len(remote_block_ids)} {src} block ids but {len(local_block_ids)} {dst} block ids")
    for ids, limit, side in ((remote_block_ids, num_remote, src), (local_block_ids, num_local, dst)):
        bad = [b for b in ids if not 0 <= b < limit]
        if bad:
            raise ValueError(f"{side} block ids out of range [0, {limit}): {bad[:8]}")
    if len(set(local_block_ids)) != len(local_block_ids):
        raise ValueError(f"{dst} block ids repeat: a {dst} block can receive only one block")
