"""Faulting the CPU KV cache in ahead of use, on idle CPU time.

The CPU cache is anonymous memory that the kernel maps and zeroes page by page as blocks are first
written (``model_runner.kv_cache_zeros``: no seconds of zeroing at start, no memory claimed for
blocks never used). The price lands on the critical path: a prefill into fresh blocks takes one
minor fault per 4 KiB of K/V it writes (SmolLM2-135M: 5760 faults, 12-40 ms of system time per
1024-token prompt). :class:`KVPrefaulter` pays it earlier, on a nice-19 thread that runs only when
a core is otherwise idle: it keeps the pages of the blocks up to ``window_bytes`` past the block
manager's frontier (the blocks it will hand out next, in id order) mapped, with
``madvise(MADV_POPULATE_WRITE)``, which maps pages without changing their bytes (safe while the
engine writes the same blocks). Memory stays bounded by what was used plus the window.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from collections.abc import Callable

import torch

MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_CHUNK_BYTES = 2 << 20  # one madvise call: a few hundred microseconds of faulting
_POLL_S = 0.05


class KVPrefaulter:
    """Keeps ``kv``'s blocks ``[0, frontier() + window)`` faulted in; ``kv`` is ``[num_blocks, ...]``,
    each block contiguous. Holds only weak references: it ends when the cache is gone, when the
    whole cache is mapped, or on :meth:`stop`."""

    def __init__(self, kv: torch.Tensor, frontier: Callable[[], int], window_bytes: int = 64 << 20) -> None:
        self.num_blocks = kv.shape[0]
        self.block_bytes = kv[0].numel() * kv.element_size() if self.num_blocks else 0
        self.window_blocks = max(1, window_bytes // max(1, self.block_bytes))
        self.num_mapped_blocks = 0  # blocks [0, num_mapped_blocks) are faulted in
        self._kv = weakref.ref(kv)
        self._frontier = frontier
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-prefault", daemon=True)

    def start(self) -> KVPrefaulter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    def _run(self) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # idle cores only
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set() and self.num_mapped_blocks < self.num_blocks:
            kv = self._kv()
            if kv is None:
                return
            target = min(self.num_blocks, self._frontier() + self.window_blocks)
            if self._stop.is_set():  # stopped while it read the frontier (a park releases the pages next)
                return
            if self.num_mapped_blocks >= target:
                del kv
                self._stop.wait(_POLL_S)
                continue
            end_block = min(target, self.num_mapped_blocks + max(1, _CHUNK_BYTES // self.block_bytes))
            start = kv.data_ptr() + self.num_mapped_blocks * self.block_bytes
            end = kv.data_ptr() + end_block * self.block_bytes
            aligned = start - start % page
            # ctypes drops the GIL for the call: the engine thread runs meanwhile.
            if madvise(aligned, end - aligned, MADV_POPULATE_WRITE) != 0:
                return  # an older kernel: the cache faults in as it is written, as before
            del kv
            self.num_mapped_blocks = end_block
