"""CUDA graphs of the model's forward pass for decode-only steps.

A decode step of a few hundred tokens launches hundreds of small kernels (a dozen per layer);
on the GPU their launch cost exceeds their run time. At start-up the forward pass is captured
once per batch size in ``sizes`` (largest first, all sharing one memory pool); a decode-only
step of ``n`` sequences replays the smallest graph of at least ``n`` rows. Rows past ``n`` are
padding: context length 0 (attention writes zeros) and cache slot -1 (nothing is written).
Other steps (prefill chunks, or more sequences than the largest graph) run eagerly.

The captured launches read everything through static tensors, which ``forward`` fills: token
ids, positions, context lengths, block tables and slots. The attention backend sized its
launches from the capture's host-side metadata, which holds the longest context the engine
allows, so one graph serves every context length.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from engine.attention import AttentionBackend, AttentionMetadata

DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def graph_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in DEFAULT_SIZES if s < max_num_seqs]
    return [*sizes, max_num_seqs] if max_num_seqs <= DEFAULT_SIZES[-1] else [*sizes, DEFAULT_SIZES[-1]]


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv: torch.Tensor,
        attn: AttentionBackend,
        sizes: list[int],
        max_model_len: int,
        block_size: int,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.kv = kv
        self.attn = attn
        self.sizes = sorted(set(sizes))
        self.max_batch = self.sizes[-1]
        self.block_size = block_size
        device = kv.device
        n = self.max_batch
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        bar = tqdm(sorted(self.sizes, reverse=True), desc="capturing CUDA graphs", unit="graph",
                   disable=not progress, leave=False)
        for bs in bar:
            meta = self._meta(bs, max_model_len)
            args = (self.input_ids[:bs], self.positions[:bs], kv, meta, attn)
            model(*args)  # compiles the kernels for this shape outside the capture
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = model(*args)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(device)

    def _meta(self, bs: int, max_model_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_decodes=bs,
            query_start_loc=self.query_start_loc[:bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slot_mapping[:bs],
            query_lens_host=[1] * bs,
            seq_lens_host=[max_model_len] * bs,
            block_size=self.block_size,
        )

    def covers(self, meta: AttentionMetadata) -> bool:
        return meta.num_decodes == meta.num_seqs <= self.max_batch and meta.num_seqs > 0

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The hidden states ``[n, hidden]`` of a decode-only step (a view of the graph's output,
        valid until the next replay)."""
        n = meta.num_seqs
        bs = next(s for s in self.sizes if s >= n)
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:bs].zero_()
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:bs].fill_(-1)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]


def capture_decode_graphs(
    model: torch.nn.Module, kv: torch.Tensor, attn: AttentionBackend, max_num_seqs: int, max_model_len: int,
    block_size: int, enforce_eager: bool, progress: bool = True,
) -> DecodeGraphs | None:
    """Graphs for this engine's decode steps, or None where they do not apply (no CUDA, eager
    mode, or an attention backend whose launches read host-side lengths)."""
    if enforce_eager or kv.device.type != "cuda" or not getattr(attn, "supports_cuda_graphs", False):
        return None
    return DecodeGraphs(model, kv, attn, graph_sizes(max_num_seqs), max_model_len, block_size, progress)
