"""Copying many blocks between two KV tensors at once: the data path of the cuda_ipc transport.

``copy_runs(src, dst, runs)`` copies ``runs`` of (src block, dst block, num blocks). A few runs move as
one ``copy_`` each (a device-to-device memcpy at copy-engine speed); many runs (scattered blocks)
move in ONE Triton kernel launch that gathers every block pair, not one launch per block. Both
tensors have the engine layout ``[num_blocks, ...]`` with equal block sizes; they may live in two
processes' memory (one of them opened through CUDA IPC).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

MAX_COPY_CALLS = 8  # up to this many runs: one copy_ each (unless KERNEL_ALWAYS); more: the gather kernel
KERNEL_ALWAYS = False  # the gather kernel for every CUDA copy, contiguous runs too
# (words of 8 bytes per program, words per inner step, warps): see ``bench/kv_transfer.py --probe``
KERNEL_CONFIG = (16384, 2048, 4)


@functools.cache
def _kernel() -> Any:
    """The Triton gather kernel, or None where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def copy_blocks_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, words_per_block, CHUNK: tl.constexpr,
                           BLOCK: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
        pair = tl.program_id(0)
        base = tl.program_id(1) * CHUNK
        src_block = tl.load(src_ids_ptr + pair).to(tl.int64)
        dst_block = tl.load(dst_ids_ptr + pair).to(tl.int64)
        src = src_ptr + src_block * words_per_block + base
        dst = dst_ptr + dst_block * words_per_block + base
        for step in range(0, CHUNK, BLOCK):
            offs = step + tl.arange(0, BLOCK)
            if EVEN:  # the chunks tile the block exactly: no mask, full-width vector loads
                tl.store(dst + offs, tl.load(src + offs))
            else:
                mask = base + offs < words_per_block
                tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)

    return copy_blocks_kernel


def _words(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [num_blocks, words] of int64 (or bytes when a block is not a whole number of words)."""
    flat = t.reshape(t.shape[0], -1).view(torch.uint8)
    return flat.view(torch.int64) if flat.shape[1] % 8 == 0 else flat


def copy_runs(
    src: torch.Tensor, dst: torch.Tensor, runs: Sequence[tuple[int, int, int]], use_kernel: bool | None = None
) -> int:
    """Copy (src start, dst start, num blocks) ``runs`` from ``src`` into ``dst`` on the current stream;
    returns the number of copy operations launched (runs, or 1 for the gather kernel).

    ``use_kernel``: None picks (the kernel for more than ``MAX_COPY_CALLS`` runs on CUDA tensors);
    True forces it (a CPU test under ``TRITON_INTERPRET=1``), False forbids it.
    """
    if not runs:
        return 0
    if use_kernel is None:
        use_kernel = src.is_cuda and dst.is_cuda and (KERNEL_ALWAYS or len(runs) > MAX_COPY_CALLS)
    kernel = _kernel() if use_kernel else None
    if kernel is None:
        for src_start, dst_start, n in runs:
            dst[dst_start : dst_start + n].copy_(src[src_start : src_start + n], non_blocking=True)
        return len(runs)
    src_ids = [s + i for s, _, n in runs for i in range(n)]
    dst_ids = [d + i for _, d, n in runs for i in range(n)]
    ids = torch.tensor([src_ids, dst_ids], dtype=torch.int32)
    if dst.is_cuda:  # pinned, so the upload is asynchronous (the caching host allocator keeps it alive)
        ids = ids.pin_memory().to(dst.device, non_blocking=True)
    launch(kernel, _words(src), _words(dst), ids[0], ids[1], KERNEL_CONFIG)
    return 1


def launch(
    kernel: Any, src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor,
    config: tuple[int, int, int],
) -> None:  # fmt: skip
    """One gather launch over ``[num_blocks, words]`` views (``_words``) and int32 block id pairs."""
    chunk, block, warps = config
    words_per_block = src.shape[1]
    chunk = min(chunk, max(block, 1 << (words_per_block - 1).bit_length()))  # small blocks: one chunk each
    grid = (src_ids.numel(), -(-words_per_block // chunk))
    even = words_per_block % chunk == 0
    kernel[grid](src, dst, src_ids, dst_ids, words_per_block, CHUNK=chunk, BLOCK=block, EVEN=even, num_warps=warps)
