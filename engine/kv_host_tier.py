"""The host tier's tensor side: its storage, and the copies the block manager decides
(``engine.block_manager``: which device block goes to which host slot on eviction, which slot comes
back into which device block on a prefix hit).

The storage is laid out as the device cache (``ModelRunner.kv``) less its first dimension:
``[num_slots, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]``, so a block is one
contiguous byte range on both sides and a copy is one ``copy_`` of ``bytes_per_block`` (a run of
consecutive blocks into consecutive slots: one copy of the run).

On CUDA it is page-locked host memory (:func:`host_buffer`) and the copies run on a copy stream of
their own (:attr:`HostKVTier.stream`), in their order, overlapping the step running on the compute
stream. Two waits keep the block manager's order (an offload reads a block after the last step that
wrote it; a load lands before the first step that reads it; a device block reused after its
offload is written only after): the copies wait for the compute stream's work queued so far only
when a launched step touches one of their blocks (``run(after_compute=True)``: the engine knows
which blocks its launched steps touch), and the compute stream's later work (the next step) always
waits for the copies' event. Host slots are only read by loads on the same copy stream, after
every offload queued before them. ``side_stream = False`` queues them on the compute stream
instead (the order of the stream alone; a benchmark compares both). On the CPU it is anonymous
memory (pages taken as slots are first written) and the copies are plain memcpys, done when
``run`` returns.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class HostTierCounts:
    """What a worker publishes of its host tier (``runtime.metric_catalog``'s ``tandem_worker_host_kv_*``;
    all 0 where it is off)."""

    num_slots: int = 0
    num_used: int = 0
    num_loaded: int = 0  # blocks copied back into the device cache (prefix hits)
    num_offloaded: int = 0  # evicted device blocks copied in
    bytes_per_block: int = 0


class HostKVTier:
    def __init__(self, kv: torch.Tensor, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError("the host tier needs at least one slot")
        self.kv = kv  # the device cache: read at every copy (a parked GPU runner gets new storage)
        self.num_slots = num_slots
        shape = (num_slots, *kv.shape[1:])
        self.host = host_buffer(shape, kv.dtype, pin=kv.device.type == "cuda")
        self.num_offloaded = self.num_loaded = 0  # blocks copied each way
        self.num_batches = self.num_waited = 0  # batches queued; those that waited for the compute stream
        self.bytes_per_block = self.host[0].numel() * self.host.element_size()
        # CUDA: the copies' own stream (see the module's doc); False: the compute stream.
        self.stream = torch.cuda.Stream(kv.device) if kv.device.type == "cuda" else None
        self.side_stream = True

    @property
    def nbytes(self) -> int:
        return self.host.numel() * self.host.element_size()

    def run(self, copies: Sequence[HostCopy], after_compute: bool = False) -> torch.cuda.Event | None:
        """Queue ``copies`` in their order. ``after_compute``: they must wait for the compute
        stream's work queued so far (a launched step touches one of their blocks). The compute
        stream's work queued after this call waits for them. Returns an event recorded behind them
        (on CUDA; None when there is nothing to wait for: none queued, or done already on the CPU).
        A KV transfer (outside the streams) into a block just offloaded must wait for it first."""
        if not copies:
            return None
        self.num_batches += 1
        self.num_waited += after_compute
        if self.stream is None:
            self._copy(copies)
            return None
        compute = torch.cuda.current_stream(self.kv.device)
        if not self.side_stream:
            self._copy(copies)
            event = torch.cuda.Event()
            event.record(compute)
            return event
        if after_compute:
            self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            self._copy(copies)
        event = torch.cuda.Event()
        event.record(self.stream)
        compute.wait_event(event)  # the next step reads the loads and writes the blocks offloaded
        return event

    def synchronize(self) -> None:
        """Return once every copy queued has run (before the device cache's storage is freed)."""
        if self.stream is not None:
            self.stream.synchronize()

    def _copy(self, copies: Sequence[HostCopy]) -> None:
        for offload, block, slot, n in _spans(copies):
            if offload:
                self.host[slot:slot + n].copy_(self.kv[block:block + n], non_blocking=True)
                self.num_offloaded += n
            else:
                self.kv[block:block + n].copy_(self.host[slot:slot + n], non_blocking=True)
                self.num_loaded += n


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
