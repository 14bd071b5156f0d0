"""Executes a :class:`SchedulerOutput`: builds the flattened batch (``StepInputBuilder``), runs
the model over the paged cache (a CUDA graph for decode steps), samples. Owns the model, the KV
cache tensor, the input staging buffers and the sampler.

``launch`` queues a step and returns a :class:`StepHandle` at once: the sampled tokens stay on
the device and are copied to pinned host memory behind the step, with an event. A step launched
before the last one's tokens were read (asynchronous scheduling) takes the input ids of its
in-flight decodes (rows whose token the host does not know yet) from that step's device tensor.
``execute`` is ``launch`` then wait: the synchronous step."""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable

import torch

from engine.attention import make_backend
from engine.config import EngineConfig, ModelArch, bytes_per_block
from engine.cpu_share import CpuShare
from engine.cuda_graphs import capture_decode_graphs
from engine.gpu_share import GpuShare
from engine.loader import TORCH_DTYPES, build_model
from engine.memory import auto_kv_bytes
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


def kv_cache_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed cache. On the CPU, anonymous memory the kernel zeroes page by page as blocks are
    first written: ``torch.zeros`` would touch every page up front (seconds per GiB at a worker's
    start, on a virtual machine's page faults)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    if numel == 0:
        return torch.zeros(shape, dtype=dtype)
    buffer = mmap.mmap(-1, numel * dtype.itemsize)  # the tensor keeps it alive
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
        self.graphs = capture_decode_graphs(self.model, self.kv, self.attn, self.inputs, sched.max_num_seqs,
                                            max_model_len, self.block_size, config.enforce_eager, progress)

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
        if threads:
            decode_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
            shared = self.config.num_prefill_threads or decode_threads
            if self.cpu_share is not None and threads > shared:  # the other workers' cores: until they have work
                self._layer_gate = self.cpu_share.gate(shared)
        try:
            logits = self.compute_logits(step, bool(output.sample_rows))
        finally:
            self._layer_gate = None
            if threads:
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
