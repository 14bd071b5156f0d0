"""A step's model inputs, built on the host with numpy and sent to the device in two copies.

The scheduler hands the runner Python objects (requests, block-table lists); a step needs flat
arrays: token ids, positions, cache slots, context lengths, query offsets, a padded block table
and the rows to sample. One pass over the batch reads each request's few scalars; the rest is
vectorized. Block tables are mirrored in a host array, one row per request, and only their new
entries are copied in: while the block manager keeps a request's table (the same list object),
the table only grows by appending, so a mirror holding as many entries, the last one equal, is
current. A new list (the request was preempted and re-admitted, or is new) gets a fresh row.

On CUDA the arrays go into pinned staging buffers and reach the device in two non-blocking
copies (one int64, one int32). Two staging sets alternate, each guarded by an event, so building
step N+1 never overwrites what step N's copy has not read yet; the device buffers are reused in
stream order. The device tensors handed out are views into those buffers, valid until the next
step's copy: a decode-only CUDA graph captures the views of ``token_views``/``seq_lens_view`` and
is replayed after ``build(..., pad_to=graph size)`` filled them.

In-flight decodes (asynchronous scheduling: the token a row computes was sampled by the step
still running, and the host does not know it) get id 0 on the host; ``fill`` names their rows
and where the previous step's device tensor holds their tokens, and one gather on the device,
queued after the copies, writes those ids in.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.plan import ScheduledRequest


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [rows] int64 (rows: the step's tokens, or pad_to)
    positions: torch.Tensor  # [rows] int64
    meta: AttentionMetadata  # block_tables: [num_seqs, width] (width: the longest table the step reads)
    sample_index: torch.Tensor | None  # [num_samples] int64 token rows to sample from; None: every row, in order
    num_tokens: int
    padded_to: int | None = None  # the rows' count, where padded for a CUDA graph


SMALL_BATCH = 8  # decode-only steps of at most this many sequences skip numpy (CUDA)
_UNKNOWN = (0,)  # the host's stand-in for an in-flight token's id

# (batch rows, rows of ``tokens`` holding their ids, tokens [k] int64 on the device)
Fill = tuple[list[int], list[int], torch.Tensor]


class _Mirror:
    __slots__ = ("last", "num", "row", "source")

    def __init__(self, source: list[int], row: int) -> None:
        self.source, self.row, self.num, self.last = source, row, 0, -1


def _align(n: int, elems: int) -> int:
    """``n`` rounded up to a multiple of ``elems``: every segment of a staging buffer starts on
    16 bytes, since Triton compiles a kernel anew for each alignment class of its pointers."""
    return -(-n // elems) * elems


def token_views(buf64: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, positions, slot_mapping) of a step of ``rows`` tokens, views of the int64 buffer."""
    r = _align(rows, 2)
    return buf64[:rows], buf64[r:r + rows], buf64[2 * r:2 * r + rows]


def seq_lens_view(buf32: torch.Tensor, num_seqs: int) -> torch.Tensor:
    return buf32[:num_seqs]


class StepInputBuilder:
    def __init__(self, device: torch.device, block_size: int, max_tokens: int, max_seqs: int,
                 max_blocks_per_seq: int) -> None:
        self.device = device
        self.block_size = block_size
        self.max_seqs = max_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self._mirrors: dict[str, _Mirror] = {}
        self._free_rows: list[int] = []
        self._table = np.zeros((0, 16), dtype=np.int32)
        self.cuda = device.type == "cuda"
        if self.cuda:
            # Fixed sizes (CUDA graphs hold views): every token's id, position and slot, the
            # sampled rows; context lengths, query offsets, and a table of max_seqs full rows.
            self._cap64 = 4 * _align(max_tokens, 2) + 2 * max_seqs
            self._cap32 = _align(max_seqs, 4) + _align(max_seqs + 1, 4) + max_seqs * max_blocks_per_seq
            self._host64 = [torch.empty(self._cap64, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._host32 = [torch.empty(self._cap32, dtype=torch.int32, pin_memory=True) for _ in range(2)]
            self._events: list[torch.cuda.Event | None] = [None, None]
            self._flip = 0
            self.buf64 = torch.zeros(self._cap64, dtype=torch.int64, device=device)
            self.buf32 = torch.zeros(self._cap32, dtype=torch.int32, device=device)

    # ---- block-table mirrors -------------------------------------------------------------------
    def _rows(self, requests: list, block_tables: dict[str, list[int]]) -> list[int]:
        mirrors = self._mirrors
        rows = []
        for r in requests:
            table = block_tables[r.request_id]
            m = mirrors.get(r.request_id)
            n = len(table)
            if m is None or m.source is not table or n < m.num or (m.num and table[m.num - 1] != m.last):
                m = self._assign(r.request_id, table)
            if n > m.num:
                if n > self._table.shape[1]:
                    grow = max(n, 2 * self._table.shape[1])
                    self._table = np.pad(self._table, ((0, 0), (0, grow - self._table.shape[1])))
                self._table[m.row, m.num:n] = table[m.num:n]
                m.num, m.last = n, table[n - 1]
            rows.append(m.row)
        if len(mirrors) > 2 * self.max_seqs + 16:  # forget requests that left the batch
            keep = {r.request_id for r in requests}
            for rid in [rid for rid in mirrors if rid not in keep]:
                self._free_rows.append(mirrors.pop(rid).row)
        return rows

    def _assign(self, request_id: str, table: list[int]) -> _Mirror:
        old = self._mirrors.pop(request_id, None)
        if old is not None:
            self._free_rows.append(old.row)
        if not self._free_rows:
            have = self._table.shape[0]
            grow = max(16, have)
            self._table = np.concatenate([self._table, np.zeros((grow, self._table.shape[1]), np.int32)])
            self._free_rows.extend(range(have + grow - 1, have - 1, -1))
        row = self._free_rows.pop()
        self._table[row] = 0
        m = self._mirrors[request_id] = _Mirror(table, row)
        return m

    # ---- one step -------------------------------------------------------------------------------
    def build(
        self,
        batch: list[ScheduledRequest],  # decodes (one new token) first
        block_tables: dict[str, list[int]],
        sample_seqs: list[int],  # positions in ``batch`` whose last new token is sampled, in order
        pad_to: int | None = None,  # decode-only CUDA graph steps: pad the rows to the graph's size
        fill: Fill | None = None,  # in-flight decodes: their ids come from the device
    ) -> StepInputs:
        n = len(batch)
        if self.cuda and n <= SMALL_BATCH and all(s.num_new_tokens == 1 for s in batch):
            return self._build_small_decode(batch, block_tables, sample_seqs, pad_to, fill)
        bs = self.block_size
        requests = [s.request for s in batch]
        num_new = np.array([s.num_new_tokens for s in batch], dtype=np.int64)
        start_host = [r.num_computed_tokens for r in requests]
        start = np.array(start_host, dtype=np.int64)
        end = start + num_new
        total = int(num_new.sum())
        mirror_rows = self._rows(requests, block_tables)
        width = int((end.max() + bs - 1) // bs)
        table = self._table[mirror_rows, :width]  # [n, width]
        query_start = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start[1:])
        if total == n:  # one new token a sequence
            if fill is None:
                ids = np.array([r.token_ids[p] for r, p in zip(requests, start_host)], dtype=np.int64)
            else:
                ids = np.array([r.token_ids[p] if p < len(r.token_ids) else 0 for r, p in zip(requests, start_host)],
                               dtype=np.int64)
            positions = start
            seq_of_token = np.arange(n)
        else:
            end_host = end.tolist()
            ids = np.fromiter(chain.from_iterable(r.token_ids[a:b] or _UNKNOWN
                                                  for r, a, b in zip(requests, start_host, end_host)),
                              dtype=np.int64, count=total)
            seq_of_token = np.repeat(np.arange(n), num_new)
            positions = np.arange(total, dtype=np.int64) + np.repeat(start - query_start[:-1], num_new)
        slots = table[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        num_decodes = int(np.count_nonzero(num_new == 1))
        sample = np.asarray(sample_seqs, dtype=np.int64)
        identity = len(sample) == total == n and bool((sample == seq_of_token).all())
        sample_rows = None if identity else query_start[sample + 1] - 1
        seq_lens_host = end.tolist()
        query_lens_host = num_new.tolist()
        if not self.cuda:
            t = torch.from_numpy
            meta = AttentionMetadata(
                num_decodes=num_decodes, query_start_loc=t(query_start.astype(np.int32)),
                seq_lens=t(end.astype(np.int32)), block_tables=t(np.ascontiguousarray(table)),
                slot_mapping=t(slots), query_lens_host=query_lens_host, seq_lens_host=seq_lens_host,
                block_size=bs)
            input_ids = t(ids)
            if fill is not None:
                rows, src, tokens = fill
                input_ids[rows] = tokens[src].to(input_ids.dtype)
            return StepInputs(input_ids, t(positions), meta, None if sample_rows is None else t(sample_rows), total)
        return self._upload(ids, positions, slots, sample_rows, end, query_start, table.reshape(-1), width,
                            num_decodes, query_lens_host, seq_lens_host, pad_to, fill)

    def _build_small_decode(self, batch: list[ScheduledRequest], block_tables: dict[str, list[int]],
                            sample_seqs: list[int], pad_to: int | None, fill: Fill | None) -> StepInputs:
        """A few decodes (batch 1, say): plain Python beats numpy's per-call cost."""
        bs = self.block_size
        n = len(batch)
        positions = [s.request.num_computed_tokens for s in batch]
        if fill is None:
            ids = [s.request.token_ids[p] for s, p in zip(batch, positions)]
        else:
            ids = [s.request.token_ids[p] if p < len(s.request.token_ids) else 0 for s, p in zip(batch, positions)]
        tables = [block_tables[s.request.request_id] for s in batch]
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]
        seq_lens = [p + 1 for p in positions]
        width = (max(seq_lens) + bs - 1) // bs
        flat: list[int] = []
        for t in tables:
            row = t[:width]
            flat += row
            if len(row) < width:
                flat += [0] * (width - len(row))
        sample_rows = None if sample_seqs == list(range(n)) else sample_seqs
        return self._upload(ids, positions, slots, sample_rows, seq_lens, list(range(n + 1)), flat, width, n,
                            [1] * n, seq_lens, pad_to, fill)

    def _upload(self, ids, positions, slots, sample_rows, seq_lens, query_start, table, width, num_decodes,
                query_lens_host, seq_lens_host, pad_to, fill) -> StepInputs:
        """Lay the step out in a pinned staging set and queue its two copies (and the gather of
        in-flight ids). ``table`` is the ``[n, width]`` block table, flattened; rows past the
        step's tokens (padding) get token 0, position 0, slot -1 and context length 0."""
        n, total = len(seq_lens), len(ids)
        rows = pad_to or total
        seqs = pad_to or n
        num_samples = 0 if sample_rows is None else len(sample_rows)
        num_fill = 0 if fill is None else len(fill[0])
        r = _align(rows, 2)  # int64 segments: ids, positions, slots, sampled rows, fill rows and sources
        ns = 3 * r + num_samples
        n64 = ns + 2 * num_fill
        qs = _align(seqs, 4)  # int32 segments: context lengths, query offsets, block table
        bt = _align(qs + n + 1, 4)
        n32 = bt + n * width
        assert n64 <= self._cap64 and n32 <= self._cap32, "step larger than the staging buffers"
        k = self._flip
        self._flip ^= 1
        if self._events[k] is not None:
            self._events[k].synchronize()  # that set's last copy has run (it has, unless the GPU is 2 steps behind)
        h64, h32 = self._host64[k].numpy(), self._host32[k].numpy()
        h64[:total], h64[r:r + total], h64[2 * r:2 * r + total] = ids, positions, slots
        if rows > total:
            h64[total:rows] = 0
            h64[r + total:r + rows] = 0
            h64[2 * r + total:2 * r + rows] = -1
        if num_samples:
            h64[3 * r:ns] = sample_rows
        if num_fill:
            h64[ns:ns + num_fill], h64[ns + num_fill:n64] = fill[0], fill[1]
        h32[:n] = seq_lens
        if seqs > n:
            h32[n:seqs] = 0
        h32[qs:qs + n + 1] = query_start
        h32[bt:n32] = table
        self.buf64[:n64].copy_(self._host64[k][:n64], non_blocking=True)
        self.buf32[:n32].copy_(self._host32[k][:n32], non_blocking=True)
        event = self._events[k] = self._events[k] or torch.cuda.Event()
        event.record()
        input_ids, pos, slot_mapping = token_views(self.buf64, rows)
        if num_fill:
            dst, src = self.buf64[ns:ns + num_fill], self.buf64[ns + num_fill:n64]
            input_ids.index_copy_(0, dst, fill[2].index_select(0, src))
        meta = AttentionMetadata(
            num_decodes=num_decodes,
            query_start_loc=self.buf32[qs:qs + n + 1],
            seq_lens=seq_lens_view(self.buf32, seqs),
            block_tables=self.buf32[bt:n32].view(n, width),
            slot_mapping=slot_mapping,
            query_lens_host=query_lens_host,
            seq_lens_host=seq_lens_host,
            block_size=self.block_size,
        )
        sample_index = self.buf64[3 * r:ns] if num_samples else None
        return StepInputs(input_ids, pos, meta, sample_index, total, pad_to)
