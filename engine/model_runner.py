"""Executes a :class:`SchedulerOutput`: builds the flattened batch, runs the model over the
paged cache, samples. Owns the model, the KV cache tensor and the sampler."""

from __future__ import annotations

import numpy as np
import torch

from engine.attention import AttentionMetadata, make_backend
from engine.config import EngineConfig, ModelArch, bytes_per_block
from engine.cuda_graphs import capture_decode_graphs
from engine.loader import TORCH_DTYPES, build_model
from engine.request import Request
from engine.sampler import Sampler
from engine.scheduler import SampledToken, ScheduledRequest, SchedulerOutput


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
        self.graphs = capture_decode_graphs(self.model, self.kv, self.attn, config.scheduler.max_num_seqs,
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
        # Decodes first: attention backends take them as one batch.
        order = sorted(range(len(output.scheduled)), key=lambda k: output.scheduled[k].num_new_tokens != 1)
        batch = [output.scheduled[k] for k in order]
        input_ids, positions, meta, last_index = self._prepare(batch, block_tables)
        if self.graphs is not None and self.graphs.covers(meta):
            hidden = self.graphs.forward(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, self.kv, meta, self.attn)
        if not output.sample_rows:
            return {}
        where = {k: pos for pos, k in enumerate(order)}
        rows = self._to_device([last_index[where[k]] for _, k in output.sample_rows], torch.long)
        logits = self.model.compute_logits(hidden[rows])
        requests: list[Request] = [r for r, _ in output.sample_rows]
        sampled = self.sampler(logits, requests)
        return {r.request_id: s for r, s in zip(requests, sampled)}

    def _prepare(
        self, batch: list[ScheduledRequest], block_tables: dict[str, list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        query_lens: list[int] = []
        tables: list[list[int]] = []
        num_decodes = 0
        for s in batch:
            r = s.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            table = block_tables[r.request_id]
            ids.extend(r.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + s.num_new_tokens)
            query_lens.append(s.num_new_tokens)
            seq_lens.append(end)
            tables.append(table[: -(-end // bs)])
            num_decodes += s.num_new_tokens == 1 and num_decodes == len(query_lens) - 1
        padded = np.zeros((len(tables), max(len(t) for t in tables)), dtype=np.int32)
        for i, t in enumerate(tables):
            padded[i, :len(t)] = t
        meta = AttentionMetadata(
            num_decodes=num_decodes,
            query_start_loc=self._to_device(query_start, torch.int32),
            seq_lens=self._to_device(seq_lens, torch.int32),
            block_tables=torch.from_numpy(padded).to(self.device, non_blocking=True),
            slot_mapping=self._to_device(slots, torch.int64),
            query_lens_host=query_lens,
            seq_lens_host=seq_lens,
            block_size=bs,
        )
        last_index = [q - 1 for q in query_start[1:]]
        return self._to_device(ids, torch.long), self._to_device(positions, torch.long), meta, last_index

    def _to_device(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Host values on the device without waiting for the GPU's queue (a copy from pageable
        memory is staged before it returns, so the host list may go at once)."""
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)
