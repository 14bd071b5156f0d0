"""Executes a :class:`SchedulerOutput`: builds the flattened batch (``StepInputBuilder``), runs
the model over the paged cache (a CUDA graph for decode steps), samples. Owns the model, the KV
cache tensor, the input staging buffers and the sampler."""

from __future__ import annotations

import torch

from engine.attention import make_backend
from engine.config import EngineConfig, ModelArch, bytes_per_block
from engine.cuda_graphs import capture_decode_graphs
from engine.loader import TORCH_DTYPES, build_model
from engine.request import Request
from engine.sampler import Sampler
from engine.scheduler import SampledToken, SchedulerOutput
from engine.step_inputs import StepInputBuilder, StepInputs


class ModelRunner:
    def __init__(self, config: EngineConfig, arch: ModelArch, max_model_len: int, progress: bool = True) -> None:
        self.config = config
        self.arch = arch
        self.device = torch.device(config.device)
        self.dtype = TORCH_DTYPES[config.dtype]
        self.block_size = config.cache.block_size
        self.model = build_model(config, arch, max_model_len, progress=progress)
        self.attn = make_backend(config.attention_backend, self.device)
        self.num_blocks = config.cache.resolve_num_blocks(self.bytes_per_block)
        # [num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]: one block of
        # every layer is contiguous, so a block moves between workers as one byte range.
        self.kv = torch.zeros(
            self.num_blocks, arch.num_layers, 2, self.block_size, arch.num_kv_heads, arch.head_dim,
            dtype=self.dtype, device=self.device,
        )
        self.sampler = Sampler(self.device, config.seed)
        sched = config.scheduler
        self.inputs = StepInputBuilder(
            self.device, self.block_size, max_tokens=max(sched.max_num_batched_tokens, sched.max_num_seqs),
            max_seqs=sched.max_num_seqs,
            max_blocks_per_seq=min(-(-max_model_len // self.block_size), self.num_blocks))
        self.graphs = capture_decode_graphs(self.model, self.kv, self.attn, self.inputs, sched.max_num_seqs,
                                            max_model_len, self.block_size, config.enforce_eager, progress)

    @property
    def bytes_per_block(self) -> int:
        return bytes_per_block(self.arch, self.block_size, self.dtype.itemsize)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.device)
            dst = torch.tensor([d for _, d in copies], device=self.device)
            self.kv[dst] = self.kv[src]

    def execute(self, output: SchedulerOutput, block_tables: dict[str, list[int]]) -> dict[str, SampledToken]:
        self.copy_blocks(output.block_copies)
        if output.is_empty:
            return {}
        step = self.prepare(output, block_tables)
        logits = self.compute_logits(step, bool(output.sample_rows))
        if logits is None:
            return {}
        requests: list[Request] = [r for r, _ in output.sample_rows]
        sampled = self.sampler(logits, requests)
        return {r.request_id: s for r, s in zip(requests, sampled)}

    def prepare(self, output: SchedulerOutput, block_tables: dict[str, list[int]]) -> StepInputs:
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
        return self.inputs.build(batch, block_tables, sample_seqs, pad_to)

    def compute_logits(self, step: StepInputs, sample: bool = True) -> torch.Tensor | None:
        """Float32 logits of the step's sampled rows (None with ``sample`` False: forward only)."""
        if step.padded_to is not None:
            logits = self.graphs.replay(step)
            if not sample:
                return None
            return logits if step.sample_index is None else logits[step.sample_index]
        hidden = self.model(step.input_ids, step.positions, self.kv, step.meta, self.attn)
        if not sample:
            return None
        if step.sample_index is not None:
            hidden = hidden[step.sample_index]
        return self.model.compute_logits(hidden)
