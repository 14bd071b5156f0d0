"""The host tier's tensor side: its storage, and the copies the block manager decides
(``engine.block_manager``: which device block goes to which host slot on eviction, which slot comes
back into which device block on a prefix hit).

The storage is laid out as the device cache (``ModelRunner.kv``) less its first dimension:
``[num_slots, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]``, so a block is one
contiguous byte range on both sides and a copy is one ``copy_`` of ``bytes_per_block`` (a run of
consecutive blocks into consecutive slots: one copy of the run). On CUDA it is page-locked host
memory (:func:`host_buffer`) and the copies are queued on the current stream without waiting
(``non_blocking``): they run
after every step launched before them and before every step launched after, which is the
order the block manager's decisions assume (an offload reads a block after the last step that
wrote it; a load lands before the first step that reads it; a device block reused after its
offload is written only after). On the CPU it is anonymous memory (pages taken as slots are first
written) and the copies are plain memcpys, done when ``run`` returns.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import weakref
from collections.abc import Sequence

import torch

from engine.block_manager import HostCopy


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """Zeroed host memory of exactly ``shape``: anonymous memory, whose pages the kernel maps as slots
    are first written; with ``pin``, page-locked for the GPU's DMA by ``cudaHostRegister`` (all of it,
    at once: seconds per 10 GiB). Not ``torch.empty(pin_memory=True)``: torch's pinned allocator
    rounds a request up to a power of two (a 100 GiB tier would pin 128 GiB)."""
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # the tensor keeps it alive
    host = torch.frombuffer(buffer, dtype=dtype).view(shape)
    if pin:
        err = int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 0))
        if err:
            raise RuntimeError(f"cudaHostRegister of the {nbytes / (1 << 30):.1f} GiB host KV tier failed "
                               f"(cudaError {err}): lower host_kv_cache_gib, or raise the locked-memory limit")
        weakref.finalize(host, _unregister, host.data_ptr())
    return host


def _unregister(ptr: int) -> None:
    with contextlib.suppress(Exception):  # at exit CUDA may be gone already: nothing to do then
        torch.cuda.cudart().cudaHostUnregister(ptr)


class HostKVTier:
    def __init__(self, kv: torch.Tensor, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError("the host tier needs at least one slot")
        self.kv = kv  # the device cache: read at every copy (a parked GPU runner gets new storage)
        self.num_slots = num_slots
        shape = (num_slots, *kv.shape[1:])
        self.host = host_buffer(shape, kv.dtype, pin=kv.device.type == "cuda")
        self.num_offloaded = self.num_loaded = 0  # blocks copied each way

    @property
    def nbytes(self) -> int:
        return self.host.numel() * self.host.element_size()

    def run(self, copies: Sequence[HostCopy]) -> torch.cuda.Event | None:
        """Queue ``copies`` in their order. Returns an event recorded behind them (on CUDA; None
        when there is nothing to wait for: none queued, or done already on the CPU). A KV transfer
        (outside the stream) into a block just offloaded must wait for it first."""
        if not copies:
            return None
        for offload, block, slot, n in _spans(copies):
            if offload:
                self.host[slot:slot + n].copy_(self.kv[block:block + n], non_blocking=True)
                self.num_offloaded += n
            else:
                self.kv[block:block + n].copy_(self.host[slot:slot + n], non_blocking=True)
                self.num_loaded += n
        if self.kv.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event


def _spans(copies: Sequence[HostCopy]) -> list[tuple[bool, int, int, int]]:
    """``copies`` as runs ``(offload, first block, first slot, length)``: consecutive copies in the
    same direction whose blocks and slots both go up by one. Order kept."""
    spans: list[tuple[bool, int, int, int]] = []
    for c in copies:
        if spans:
            offload, block, slot, n = spans[-1]
            if offload == c.offload and c.block_id == block + n and c.slot == slot + n:
                spans[-1] = (offload, block, slot, n + 1)
                continue
        spans.append((c.offload, c.block_id, c.slot, 1))
    return spans
