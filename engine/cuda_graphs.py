"""CUDA graphs of decode steps: the forward pass and the LM head.

A decode step of a few hundred tokens launches hundreds of small kernels (a handful per layer);
on the GPU their launch cost exceeds their run time. At start-up each step is captured once per
batch size in ``sizes`` (largest first, all sharing one memory pool); a decode-only step of
``n`` sequences replays the smallest graph of at least ``n`` rows. Rows past ``n`` are padding:
context length 0 (attention writes zeros) and cache slot -1 (nothing is written). Other steps
(prefill chunks, or more sequences than the largest graph) run eagerly. Sizes may also be captured lazily, on
the first step that needs one (``capture``: what an unparked engine does).

The captured launches read the step's inputs from the runner's staging buffers
(``StepInputBuilder``: token ids, positions, slots and context lengths, at the offsets
``token_views``/``seq_lens_view`` give for the graph's size) and the block table from a buffer of
their own, ``max_blocks`` wide, into which ``replay`` copies the step's narrower table. The
attention backend sized its launches from the capture's host-side metadata, which holds the
longest context the engine allows, so one graph serves every context length. The output is the
float32 logits of every row.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm import tqdm

from engine.attention import AttentionBackend, AttentionMetadata
from engine.step_inputs import StepInputBuilder, StepInputs, seq_lens_view, token_views

DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def graph_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in DEFAULT_SIZES if s < max_num_seqs]
    return [*sizes, max_num_seqs] if max_num_seqs <= DEFAULT_SIZES[-1] else [*sizes, DEFAULT_SIZES[-1]]


class DecodeGraphs:
    """``capture``: the sizes to capture now (None: all); each other size is captured on the first
    step that needs it (``size_for``), before that step's inputs are written. A parked engine
    captures at unpark only the sizes it replayed before (``used``) and leaves the rest to their
    first use: most of a wake was capturing graphs that the next minutes may never need."""

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
        capture: Iterable[int] | None = None,
    ) -> None:
        self.sizes = sorted(set(sizes))
        self.max_batch = self.sizes[-1]
        self._model, self._kv, self._attn, self._inputs = model, kv, attn, inputs
        self._max_model_len, self._block_size = max_model_len, block_size
        device = kv.device
        n = self.max_batch
        self.block_tables = torch.zeros(n, inputs.max_blocks_per_seq, dtype=torch.int32, device=device)
        self._query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.used: set[int] = set()  # sizes replayed
        self.num_lazy = 0  # sizes captured on first use
        self._pool = None
        input_ids, positions, slots = token_views(inputs.buf64, n)
        for t in (input_ids, positions, seq_lens_view(inputs.buf32, n)):
            t.zero_()
        slots.fill_(-1)
        now = self.sizes if capture is None else sorted(set(capture) & set(self.sizes))
        bar = tqdm(sorted(now, reverse=True), desc="capturing CUDA graphs", unit="graph",
                   disable=not progress, leave=False)
        for bs in bar:  # largest first: the smaller ones reuse its memory
            self._capture(bs)
        torch.cuda.synchronize(device)

    def _capture(self, bs: int) -> None:
        """Capture the step of ``bs`` rows (its rows' inputs zeroed, its slots -1: nothing written)."""
        model, inputs = self._model, self._inputs
        input_ids, positions, slots = token_views(inputs.buf64, bs)
        seq_lens = seq_lens_view(inputs.buf32, bs)
        for t in (input_ids, positions, seq_lens):
            t.zero_()
        slots.fill_(-1)  # warm-up and capture write nothing into the cache
        meta = AttentionMetadata(
            num_decodes=bs, query_start_loc=self._query_start_loc[:bs + 1], seq_lens=seq_lens,
            block_tables=self.block_tables[:bs], slot_mapping=slots, query_lens_host=[1] * bs,
            seq_lens_host=[self._max_model_len] * bs, block_size=self._block_size,
        )
        args = (input_ids, positions, self._kv, meta, self._attn)
        model.compute_logits(model(*args))  # compiles the kernels for this shape outside the capture
        torch.cuda.synchronize(self._kv.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a KV transfer on another thread (its own stream) may call CUDA meanwhile
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self.outputs[bs] = model.compute_logits(model(*args))
        self._pool = graph.pool()
        self.graphs[bs] = graph

    def size_for(self, num_seqs: int) -> int | None:
        """The graph a decode-only step of ``num_seqs`` sequences replays (None: run eagerly)."""
        if not 0 < num_seqs <= self.max_batch:
            return None
        size = next(s for s in self.sizes if s >= num_seqs)
        if size not in self.graphs:  # before the step writes its inputs (the capture uses those rows)
            self._capture(size)
            self.num_lazy += 1
        return size

    def replay(self, step: StepInputs) -> torch.Tensor:
        """The float32 logits ``[n, vocab]`` of a decode-only step built with ``pad_to=size_for(n)``
        (a view of the graph's output, valid until the next replay)."""
        n = step.meta.num_seqs
        assert step.padded_to == self.size_for(n)
        table = step.meta.block_tables
        self.block_tables[:n, :table.shape[1]].copy_(table)
        self.used.add(step.padded_to)
        self.graphs[step.padded_to].replay()
        return self.outputs[step.padded_to][:n]


def capture_decode_graphs(
    model: torch.nn.Module, kv: torch.Tensor, attn: AttentionBackend, inputs: StepInputBuilder, max_num_seqs: int,
    max_model_len: int, block_size: int, enforce_eager: bool, progress: bool = True,
    capture: Iterable[int] | None = None,
) -> DecodeGraphs | None:
    """Graphs for this engine's decode steps, or None where they do not apply (no CUDA, eager
    mode, or an attention backend whose launches read host-side lengths). ``capture``: the sizes
    captured now (None: all); the others on first use."""
    if enforce_eager or kv.device.type != "cuda" or not getattr(attn, "supports_cuda_graphs", False):
        return None
    return DecodeGraphs(model, kv, attn, inputs, graph_sizes(max_num_seqs), max_model_len, block_size, progress,
                        capture)
