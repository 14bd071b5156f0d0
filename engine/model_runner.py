"""Executes a :class:`SchedulerOutput`: builds the flattened batch (``StepInputBuilder``), runs
the model over the paged cache (a CUDA graph for decode steps), samples. Owns the model, the KV
cache tensor, the input staging buffers and the sampler.

``launch`` queues a step and returns a :class:`StepHandle` at once: the sampled tokens stay on
the device and are copied to pinned host memory behind the step, with an event. A step launched
before the last one's tokens were read (asynchronous scheduling) takes the input ids of its
in-flight decodes (rows whose token the host does not know yet) from that step's device tensor.
``execute`` is ``launch`` then wait: the synchronous step."""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import time
from collections.abc import Callable

import torch

from engine.attention import make_backend
from engine.config import EngineConfig, ModelArch, bytes_per_block
from engine.cpu_share import CpuShare
from engine.cuda_graphs import capture_decode_graphs
from engine.gpu_share import GpuShare
from engine.loader import TORCH_DTYPES, build_model
from engine.memory import auto_kv_bytes
from engine.model import use_batch_invariant
from engine.plan import SampledTokens, SchedulerOutput
from engine.request import Request
from engine.sampler import SampleBatch, Sampler
from engine.step_inputs import StepInputBuilder, StepInputs

PREFILL_STEP_TOKENS = 64  # a step prefilling this many tokens runs on num_prefill_threads


class StepHandle:
    """A launched step. ``tokens``: its sampled token ids on the device, row ``index[request_id]``
    (the order of ``SchedulerOutput.sample_rows``); ``result()`` waits for them on the host."""

    def __init__(self, requests: list[Request], batch: SampleBatch | None, device: torch.device) -> None:
        self.requests = requests
        self.index = {r.request_id: k for k, r in enumerate(requests)}
        self.tokens = batch.token_ids if batch is not None else None
        self._host = None
        self._event = None
        if batch is not None:
            # Non-blocking copies into pinned memory, queued behind the sampling kernels.
            self._host = batch.with_tensors([None if t is None else t.to("cpu", non_blocking=True)
                                             for t in batch.tensors()])
        if device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self) -> None:
        """Until the device has run the whole step (its forward pass and sampling)."""
        if self._event is not None:
            self._event.synchronize()

    def done(self) -> bool:
        """Whether the device has run the whole step (without waiting)."""
        return self._event is None or self._event.query()

    def result(self) -> SampledTokens:
        self.wait()
        if self._host is None:
            return {}
        return {r.request_id: [t] for r, t in zip(self.requests, self._host.tolist())}


def release_pages(kv: torch.Tensor) -> int:
    """Give a CPU cache's pages back to the system (``madvise(MADV_DONTNEED)`` on its anonymous
    mapping, :func:`kv_cache_zeros`): the tensor and its address stay (a KV transport registered
    them), its contents read zero and take pages again as blocks are written. Bytes released."""
    nbytes = kv.numel() * kv.element_size()
    if nbytes == 0:
        return 0
    ptr = kv.data_ptr()
    page = mmap.PAGESIZE
    start, end = -(-ptr // page) * page, (ptr + nbytes) // page * page
    if end <= start:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.madvise(start, end - start, mmap.MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) on the KV cache failed")
    return end - start


def kv_cache_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed cache. On the CPU, anonymous memory the kernel zeroes page by page as blocks are
    first written: ``torch.zeros`` would touch every page up front (seconds per GiB at a worker's
    start, on a virtual machine's page faults)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    if numel == 0:
        return torch.zeros(shape, dtype=dtype)
    # Private: Python's default (MAP_SHARED) is shmem, which MADV_DONTNEED only unmaps (a parked
    # worker's pages came back with their old bytes, and its memory stayed claimed). 4 KiB pages:
    # where transparent huge pages are "always", a first write would map 2 MiB (several blocks) at
    # once, past the prefaulter's window (engine.kv_prefault).
    nbytes = numel * dtype.itemsize
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # the tensor keeps it alive
    with contextlib.suppress(AttributeError, OSError):  # no MADV_NOHUGEPAGE: no huge pages either
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)


class ModelRunner:
    def __init__(self, config: EngineConfig, arch: ModelArch, max_model_len: int, progress: bool = True) -> None:
        self.config = config
        self.arch = arch
        self.device = torch.device(config.device)
        self.dtype = TORCH_DTYPES[config.dtype]
        self.block_size = config.cache.block_size
        self.model = build_model(config, arch, max_model_len, progress=progress)
        self.attn = make_backend(config.attention_backend, self.device,
                                 cpu_kernels=self.model.lm_head_cpu is not None)
        if config.batch_invariant and self.device.type == "cuda":
            use_batch_invariant(self.model)
            self.attn.batch_invariant = True
        self.num_blocks = config.cache.resolve_num_blocks(self.bytes_per_block, lambda: auto_kv_bytes(
            self.device, config.cache, arch, config.scheduler, self.dtype.itemsize))
        # [num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]: one block of
        # every layer is contiguous, so a block moves between workers as one byte range.
        self.kv = kv_cache_zeros(
            (self.num_blocks, arch.num_layers, 2, self.block_size, arch.num_kv_heads, arch.head_dim),
            self.dtype, self.device)
        self.sampler = Sampler(self.device, config.seed)
        sched = config.scheduler
        self.inputs = StepInputBuilder(
            self.device, self.block_size, max_tokens=max(sched.max_num_batched_tokens, sched.max_num_seqs),
            max_seqs=sched.max_num_seqs,
            max_blocks_per_seq=min(-(-max_model_len // self.block_size), self.num_blocks))
        # Set by the engine where this process shares its GPU with another worker (engine.gpu_share):
        # a prefill worker's eager forwards then yield to the decode worker's held steps.
        self.gpu_share: GpuShare | None = None
        # Set by the engine where the workers of this machine share its cores (engine.cpu_share).
        self.cpu_share: CpuShare | None = None
        self._layer_gate: Callable[[int], None] | None = None  # a step on the idle workers' cores (CpuShare.gate)
        self.max_model_len = max_model_len
        self._host_weights: dict[int, torch.Tensor] | None = None  # parked: the weights' pinned copies
        # The pinned host buffers of the first park, kept for the next ones (pinning 15 GiB took
        # 7-12 s of a park; the copy itself 0.6 s): the weights' tensors in ``_device_tensors`` order.
        self._pinned: list[torch.Tensor] = []
        self._graph_sizes_used: set[int] = set()  # the decode graphs replayed before the last park
        self.unpark_s: dict[str, float] = {}  # the last unpark's parts: weights, kv, graphs (seconds)
        self.graphs = capture_decode_graphs(self.model, self.kv, self.attn, self.inputs, sched.max_num_seqs,
                                            max_model_len, self.block_size, config.enforce_eager, progress)

    # ---- parking (the launcher's warm pool) --------------------------------------------------
    @property
    def parked(self) -> bool:
        return self._host_weights is not None

    def park(self) -> None:
        """Give the device back, keeping the model: on a GPU the weights (every parameter and
        buffer) move to pinned host memory, the KV cache's storage and the CUDA graphs are freed
        and the allocator's cache emptied (the KV tensor object stays, empty); on the CPU the KV
        cache's pages go back to the system (:func:`release_pages`). The cache's contents are
        lost. Between steps only, with nothing launched."""
        if self.parked:
            return
        if self.device.type != "cuda":
            release_pages(self.kv)
            self._host_weights = {}
            return
        host: dict[int, torch.Tensor] = {}  # device data_ptr -> its pinned copy (tied weights: one)
        tensors = list(self._device_tensors())
        for _, _, t in tensors:
            if t.data_ptr() not in host:
                k = len(host)
                buf = self._pinned[k] if k < len(self._pinned) else None
                if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                    buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    self._pinned[k:k + 1] = [buf]
                host[t.data_ptr()] = buf.copy_(t, non_blocking=True)
        torch.cuda.synchronize(self.device)
        for module, name, t in tensors:
            _set_tensor(module, name, host[t.data_ptr()])
        self._host_weights = host
        if self.graphs is not None:
            self._graph_sizes_used = set(self.graphs.used)
        self.graphs = None
        self.kv.untyped_storage().resize_(0)
        torch.cuda.ipc_collect()  # an exported cache (CUDA IPC) whose peers let go of it is freed now
        torch.cuda.empty_cache()

    def unpark(self) -> None:
        """Take the device back: the KV cache re-allocated (zeroed), the weights copied back from
        pinned host memory (the buffers stay for the next park), the decode CUDA graphs of the sizes
        replayed before the park captured again (the others on their first use). The KV tensor is the same
        object; on a GPU its address is new (a transport that registered device memory registers
        it again)."""
        if not self.parked:
            return
        self._host_weights = None
        if self.device.type != "cuda":
            return
        t0 = time.perf_counter()
        device: dict[int, torch.Tensor] = {}
        for module, name, t in list(self._device_tensors()):
            if t.data_ptr() not in device:
                device[t.data_ptr()] = t.to(self.device, non_blocking=True)
            _set_tensor(module, name, device[t.data_ptr()])
        torch.cuda.synchronize(self.device)
        t1 = time.perf_counter()
        self.kv.untyped_storage().resize_(self.kv.numel() * self.kv.element_size())
        self.kv.zero_()
        torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        sched = self.config.scheduler
        # Only the sizes it replayed before the park now; the others on their first step.
        self.graphs = capture_decode_graphs(self.model, self.kv, self.attn, self.inputs, sched.max_num_seqs,
                                            self.max_model_len, self.block_size, self.config.enforce_eager, False,
                                            capture=self._graph_sizes_used)
        self.unpark_s = {"weights": t1 - t0, "kv": t2 - t1, "graphs": time.perf_counter() - t2}

    def _device_tensors(self) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
        """(module, name, tensor) of every parameter and buffer of the model."""
        out = []
        for module in self.model.modules():
            for name, t in [*module._parameters.items(), *module._buffers.items()]:
                if t is not None:
                    out.append((module, name, t))
        return out

    @property
    def bytes_per_block(self) -> int:
        return bytes_per_block(self.arch, self.block_size, self.dtype.itemsize)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:  # the ids reach the device without a sync (pageable memory is staged at once)
            src = torch.tensor([s for s, _ in copies]).to(self.device, non_blocking=True)
            dst = torch.tensor([d for _, d in copies]).to(self.device, non_blocking=True)
            self.kv[dst] = self.kv[src]

    def execute(self, output: SchedulerOutput, block_tables: dict[str, list[int]]) -> SampledTokens:
        """Run the step and return its sampled tokens on the host."""
        handle = self.launch(output, block_tables)
        return handle.result() if handle is not None else {}

    def launch(self, output: SchedulerOutput, block_tables: dict[str, list[int]],
               prev: StepHandle | None = None) -> StepHandle | None:
        """Queue the step on the device (None: an empty step). ``prev``: the step launched
        just before, whose tokens the host has not read; the in-flight decodes take theirs."""
        self.copy_blocks(output.block_copies)
        if output.is_empty:
            return None
        step = self.prepare(output, block_tables, prev)
        threads = self.step_threads(output)
        decode_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        self._layer_gate = self._share_gate(output, threads or decode_threads, decode_threads)
        try:
            logits = self.compute_logits(step, bool(output.sample_rows))
        finally:
            self._layer_gate = None
            if torch.get_num_threads() != decode_threads:
                torch.set_num_threads(decode_threads)
        requests: list[Request] = [r for r, _ in output.sample_rows]
        batch = self.sampler.sample(logits, requests) if logits is not None else None
        return StepHandle(requests, batch, self.device)

    def step_threads(self, output: SchedulerOutput) -> int | None:
        """The threads of this step where they differ from the engine's (on the CPU kernels, a step
        that prefills at least ``PREFILL_STEP_TOKENS`` tokens: ``num_idle_prefill_threads`` while
        the machine has room for them (``CpuShare.room_for``), else ``num_prefill_threads``); else None."""
        config = self.config
        if self.model.lm_head_cpu is None or not (config.num_prefill_threads or config.num_idle_prefill_threads):
            return None
        prefill = sum(s.num_new_tokens for s in output.scheduled if s.num_new_tokens > 1)
        if prefill < PREFILL_STEP_TOKENS:
            return None
        threads = config.num_prefill_threads
        if config.num_idle_prefill_threads and self.cpu_share is not None \
                and self.cpu_share.room_for(config.num_idle_prefill_threads):
            threads = config.num_idle_prefill_threads
        return threads if threads and threads != config.num_threads else None

    def _share_gate(self, output: SchedulerOutput, threads: int, decode_threads: int) -> Callable[[int], None] | None:
        """Called before each layer of a step that prefills on the kernels where the workers share the
        cores (``CpuShare.gate``): one on the idle workers' cores gives them back once another has
        work; one that found no room at its start takes them at a later layer once there is."""
        idle = self.config.num_idle_prefill_threads
        if self.cpu_share is None or not idle or self.model.lm_head_cpu is None:
            return None
        shared = self.config.num_prefill_threads or decode_threads
        if threads > shared:
            return self.cpu_share.gate(shared)
        if idle > threads and sum(s.num_new_tokens for s in output.scheduled if s.num_new_tokens > 1) \
                >= PREFILL_STEP_TOKENS:
            return self.cpu_share.gate(threads, take=idle)
        return None

    def prepare(self, output: SchedulerOutput, block_tables: dict[str, list[int]],
                prev: StepHandle | None = None) -> StepInputs:
        """The step's inputs on the device: decodes first (attention backends take them as one
        batch), padded to a CUDA graph's size where one will run it."""
        scheduled = output.scheduled
        nums = [s.num_new_tokens for s in scheduled]
        decodes = [k for k, n in enumerate(nums) if n == 1]
        if len(decodes) == len(nums):
            batch = scheduled
            sample_seqs = [k for _, k in output.sample_rows]
            pad_to = self.graphs.size_for(len(batch)) if self.graphs is not None else None
        else:
            order = decodes + [k for k, n in enumerate(nums) if n != 1]
            batch = [scheduled[k] for k in order]
            where = {k: pos for pos, k in enumerate(order)}
            sample_seqs = [where[k] for _, k in output.sample_rows]
            pad_to = None
        # In-flight decodes (their token is the one ``prev`` sampled): batch row -> prev's row.
        inflight = [(pos, s.request) for pos, s in enumerate(batch[:len(decodes)])
                    if s.request.num_computed_tokens == s.request.num_tokens]
        fill = None
        if inflight:
            assert prev is not None and prev.tokens is not None, "an in-flight token without its step"
            fill = ([pos for pos, _ in inflight], [prev.index[r.request_id] for _, r in inflight], prev.tokens)
        return self.inputs.build(batch, block_tables, sample_seqs, pad_to, fill)

    def compute_logits(self, step: StepInputs, sample: bool = True) -> torch.Tensor | None:
        """Float32 logits of the step's sampled rows (None with ``sample`` False: forward only)."""
        if step.padded_to is not None:
            logits = self.graphs.replay(step)
            if not sample:
                return None
            return logits if step.sample_index is None else logits[step.sample_index]
        gate = self.gpu_share.gate(self.device) if self.gpu_share is not None else self._layer_gate
        if not sample:
            self.model(step.input_ids, step.positions, self.kv, step.meta, self.attn, rows=step.input_ids[:0],
                       before_layer=gate)
            return None
        hidden = self.model(step.input_ids, step.positions, self.kv, step.meta, self.attn, rows=step.sample_index,
                            before_layer=gate)
        return self.model.compute_logits(hidden)


def _set_tensor(module: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    """Point a module's parameter or buffer ``name`` at ``t`` (the Parameter object stays)."""
    if name in module._parameters:
        module._parameters[name].data = t
    else:
        module._buffers[name] = t
