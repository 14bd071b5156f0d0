"""CUDA graphs of decode steps: the forward pass and the LM head.

A decode step of a few hundred tokens launches hundreds of small kernels (a handful per layer);
on the GPU their launch cost exceeds their run time. At start-up each step is captured once per
batch size in ``sizes`` (largest first, all sharing one memory pool); a decode-only step of
``n`` sequences replays the smallest graph of at least ``n`` rows. Rows past ``n`` are padding:
context length 0 (attention writes zeros) and cache slot -1 (nothing is written). Other steps
(prefill chunks, or more sequences than the largest graph) run eagerly.

The captured launches read the step's inputs from the runner's staging buffers
(``StepInputBuilder``: token ids, positions, slots and context lengths, at the offsets
``token_views``/``seq_lens_view`` give for the graph's size) and the block table from a buffer of
their own, ``max_blocks`` wide, into which ``replay`` copies the step's narrower table. The
attention backend sized its launches from the capture's host-side metadata, which holds the
longest context the engine allows, so one graph serves every context length. The output is the
float32 logits of every row.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from engine.attention import AttentionBackend, AttentionMetadata
from engine.step_inputs import StepInputBuilder, StepInputs, seq_lens_view, token_views

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
        inputs: StepInputBuilder,
        sizes: list[int],
        max_model_len: int,
        block_size: int,
        progress: bool = True,
    ) -> None:
        self.sizes = sorted(set(sizes))
        self.max_batch = self.sizes[-1]
        device = kv.device
        n = self.max_batch
        self.block_tables = torch.zeros(n, inputs.max_blocks_per_seq, dtype=torch.int32, device=device)
        query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        input_ids, positions, slots = token_views(inputs.buf64, n)
        for t in (input_ids, positions, seq_lens_view(inputs.buf32, n)):
            t.zero_()
        slots.fill_(-1)
        pool = None
        bar = tqdm(sorted(self.sizes, reverse=True), desc="capturing CUDA graphs", unit="graph",
                   disable=not progress, leave=False)
        for bs in bar:
            input_ids, positions, slots = token_views(inputs.buf64, bs)
            slots.fill_(-1)  # warm-up and capture write nothing into the cache
            meta = AttentionMetadata(
                num_decodes=bs, query_start_loc=query_start_loc[:bs + 1], seq_lens=seq_lens_view(inputs.buf32, bs),
                block_tables=self.block_tables[:bs], slot_mapping=slots, query_lens_host=[1] * bs,
                seq_lens_host=[max_model_len] * bs, block_size=block_size,
            )
            args = (input_ids, positions, kv, meta, attn)
            model.compute_logits(model(*args))  # compiles the kernels for this shape outside the capture
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = model.compute_logits(model(*args))
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(device)

    def size_for(self, num_seqs: int) -> int | None:
        """The graph a decode-only step of ``num_seqs`` sequences replays (None: run eagerly)."""
        if not 0 < num_seqs <= self.max_batch:
            return None
        return next(s for s in self.sizes if s >= num_seqs)

    def replay(self, step: StepInputs) -> torch.Tensor:
        """The float32 logits ``[n, vocab]`` of a decode-only step built with ``pad_to=size_for(n)``
        (a view of the graph's output, valid until the next replay)."""
        n = step.meta.num_seqs
        assert step.padded_to == self.size_for(n)
        table = step.meta.block_tables
        self.block_tables[:n, :table.shape[1]].copy_(table)
        self.graphs[step.padded_to].replay()
        return self.outputs[step.padded_to][:n]


def capture_decode_graphs(
    model: torch.nn.Module, kv: torch.Tensor, attn: AttentionBackend, inputs: StepInputBuilder, max_num_seqs: int,
    max_model_len: int, block_size: int, enforce_eager: bool, progress: bool = True,
) -> DecodeGraphs | None:
    """Graphs for this engine's decode steps, or None where they do not apply (no CUDA, eager
    mode, or an attention backend whose launches read host-side lengths)."""
    if enforce_eager or kv.device.type != "cuda" or not getattr(attn, "supports_cuda_graphs", False):
        return None
    return DecodeGraphs(model, kv, attn, inputs, graph_sizes(max_num_seqs), max_model_len, block_size, progress)
