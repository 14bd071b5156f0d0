"""tandem's CPU kernels for bfloat16 models (``engine/csrc``), and their Python face.

Why: torch's CPU path is slow where it matters (its flash attention runs a 1024-token prompt at
a fifth of the machine's bf16 rate) and its bf16 results change with the batch around a row:
oneDNN picks other kernels for one row than for several, and the attention of a prompt chunked
over two steps differs from the attention of the whole prompt. Here every result is a fixed
function of the row's own inputs: a GEMM output is one thread's dot product over K in order; an
attention row walks its keys in tiles at fixed absolute positions; norms and rotary are per row.
So a token's logits are the same bits whatever the thread count, the batch, the chunking or the
worker that computed its prompt (aggregated or disaggregated).

The extension comes from ``pip install`` (``setup.py``); where it is missing or stale (a source
change since, a worktree on ``PYTHONPATH``) it is built once into ``~/.cache/tandem``. Every
function takes torch tensors and checks what the C++ side relies on (dtype, layout, sizes).
``TANDEM_CPU_KERNELS=0`` turns the kernels off (the torch path runs), and
``TANDEM_CPU_KERNELS_ISA=avx512bf16|avx2|generic`` picks a lower ISA tier (the tiers give the
same bits on a CPU with native bf16; tests use this to check the portable code).
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from engine import kernel_build

log = logging.getLogger(__name__)

EPI_BF16, EPI_F32, EPI_SILU_MUL = 0, 1, 2
BLOCK_COLS = 32  # output columns per packed weight block

_module: ModuleType | None = None
_tried = False


def _import() -> ModuleType | None:
    digest = kernel_build.source_hash()
    try:
        from engine import _cpu_kernels as built  # type: ignore[attr-defined]

        if digest == built.SOURCE_HASH:
            return built
        log.info("the installed CPU kernels are stale (sources changed since): building them")
    except ImportError:
        pass
    path = kernel_build.build_cached()
    spec = importlib.util.spec_from_file_location(f"engine.{kernel_build.MODULE}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def turned_off() -> bool:
    """Whether ``TANDEM_CPU_KERNELS=0`` turns the kernels off."""
    return os.environ.get("TANDEM_CPU_KERNELS", "1") == "0"


def load() -> ModuleType | None:
    """The extension (built on first use if needed), or None where it is off or cannot be built."""
    global _module, _tried
    if not _tried:
        _tried = True
        if not turned_off():
            try:
                _module = _import()
            except (RuntimeError, OSError) as e:
                log.warning("CPU kernels unavailable, the engine runs its torch path on the CPU: %s", e)
            if _module is not None and (isa := os.environ.get("TANDEM_CPU_KERNELS_ISA")):
                _module.set_tier(isa)
    return _module


def _k() -> ModuleType:
    mod = load()
    if mod is None:
        raise RuntimeError("the CPU kernels are not available")
    return mod


def supports(device: torch.device, dtype: torch.dtype, head_dim: int, hidden_size: int,
             intermediate_size: int) -> bool:
    """Whether a model of this shape runs on the kernels: bfloat16 on the CPU, even matmul
    depths, a head dim that is a multiple of 8, and the extension loads."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and head_dim % 8 == 0 and hidden_size % 2 == 0
            and intermediate_size % 2 == 0 and load() is not None)


def isa() -> str:
    return _k().tier()


def _check(t: torch.Tensor, name: str, dtype: torch.dtype, dim: int) -> None:
    if t.dtype != dtype or t.dim() != dim or not t.is_cpu or t.stride(-1) != 1:
        raise ValueError(f"{name}: want a CPU {dtype} tensor of {dim} dims with unit last stride, got "
                         f"{t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}")


@dataclass
class PackedWeight:
    """A linear layer's weight ``[N, K]`` reordered for the GEMM, with its bias in float32.

    ``silu_mul``: the weight is a fused gate/up projection (gate rows, then up rows) and the
    layer's output is ``silu(gate) * up`` (``N / 2`` columns), computed in the GEMM's epilogue.
    """

    packed: torch.Tensor  # [N_pad / 32, K / 2, 32, 2] bfloat16
    bias: torch.Tensor | None  # [N] float32
    in_features: int
    out_features: int  # columns of the output
    epilogue: int

    @classmethod
    def pack(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, silu_mul: bool = False,
             out_float32: bool = False) -> PackedWeight:
        _check(weight, "weight", torch.bfloat16, 2)
        n, k = weight.shape
        if k % 2:
            raise ValueError(f"the kernels' matmul needs an even depth, got {k}")
        w = weight.detach()
        if silu_mul:
            if bias is not None or n % 2:
                raise ValueError("a fused gate/up weight has an even row count and no bias")
            half = n // 2
            pad = -half % 16
            gate, up = w[:half], w[half:]
            if pad:
                zeros = w.new_zeros(pad, k)
                gate, up = torch.cat([gate, zeros]), torch.cat([up, zeros])
            # Blocks of 32 rows: 16 gate rows, then the 16 up rows of the same columns.
            w = torch.stack([gate.view(-1, 16, k), up.view(-1, 16, k)], dim=1).reshape(-1, k)
            out, epi = half, EPI_SILU_MUL
        else:
            pad = -n % BLOCK_COLS
            if pad:
                w = torch.cat([w, w.new_zeros(pad, k)])
            out, epi = n, EPI_F32 if out_float32 else EPI_BF16
        packed = w.reshape(-1, BLOCK_COLS, k // 2, 2).permute(0, 2, 1, 3).contiguous()
        b = bias.detach().float().contiguous() if bias is not None else None
        return cls(packed, b, k, out, epi)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` (bfloat16, rows may be strided) through the layer."""
        _check(x, "x", torch.bfloat16, 2)
        m, k = x.shape
        if k != self.in_features:
            raise ValueError(f"x has {k} features, the layer takes {self.in_features}")
        out = torch.empty(m, self.out_features, dtype=torch.float32 if self.epilogue == EPI_F32 else torch.bfloat16)
        if m:
            _k().gemm(x.data_ptr(), x.stride(0), m, k, self.packed.data_ptr(), self.packed.shape[0],
                      self.out_features, 0 if self.bias is None else self.bias.data_ptr(), self.epilogue,
                      out.data_ptr(), out.stride(0), torch.get_num_threads())
        return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)``, or ``(norm(x), x)`` without a residual; bfloat16
    ``[M, D]`` in the arithmetic of Hugging Face's LlamaRMSNorm."""
    _check(x, "x", torch.bfloat16, 2)
    _check(weight, "weight", torch.bfloat16, 1)
    m, d = x.shape
    if weight.shape[0] != d:
        raise ValueError(f"norm weight of {weight.shape[0]} for rows of {d}")
    out = torch.empty(m, d, dtype=torch.bfloat16)
    res_out, res_ptr, res_ld = x, 0, 0
    if residual is not None:
        _check(residual, "residual", torch.bfloat16, 2)
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} for x {tuple(x.shape)}")
        res_out, res_ptr, res_ld = torch.empty(m, d, dtype=torch.bfloat16), residual.data_ptr(), residual.stride(0)
    if m:
        _k().rms_norm(x.data_ptr(), x.stride(0), res_ptr, res_ld, res_out.data_ptr() if residual is not None else 0,
                      d, weight.data_ptr(), out.data_ptr(), d, m, d, eps, torch.get_num_threads())
    return out, res_out


def _cache_layout(kv_layer: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(address, block_size, block stride, V offset, token stride, KV heads) of one layer's cache
    view ``[num_blocks, 2, block_size, kv_heads, head_dim]``."""
    if kv_layer.dtype != torch.bfloat16 or kv_layer.dim() != 5 or not kv_layer.is_cpu:
        raise ValueError(f"a layer's KV cache: want a CPU bfloat16 [blocks, 2, block, heads, dim] view, got "
                         f"{kv_layer.dtype} {tuple(kv_layer.shape)}")
    _, _, bs, kvh, hd = kv_layer.shape
    s = kv_layer.stride()
    if s[4] != 1 or s[3] != hd:
        raise ValueError(f"a layer's KV cache must hold each token's heads contiguously, not strides {s}")
    return kv_layer.data_ptr(), bs, s[0], s[1], s[2], kvh


def rotary_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotary on ``q [T, H, hd]`` and ``k [T, kvh, hd]`` (views of one ``[T, *]`` projection
    output; ``cos``/``sin`` ``[T, 1, hd]`` bfloat16), rotated K and V into the cache at
    ``slot_mapping``; returns the rotated q, contiguous."""
    t, h, hd = q.shape
    kvh = k.shape[1]
    if not ((t == 1 or q.stride(0) == k.stride(0) == v.stride(0))
            and q.stride(1) == k.stride(1) == v.stride(1) == hd and q.stride(2) == k.stride(2) == v.stride(2) == 1):
        raise ValueError("q, k and v must be views of one [T, *] tensor with contiguous heads")
    for name, x in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin)):
        _check(x, name, torch.bfloat16, 3)
    if k.shape != v.shape or k.shape[0] != t or cos.shape != (t, 1, hd) or sin.shape != cos.shape:
        raise ValueError(f"shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} cos {tuple(cos.shape)}")
    cos, sin = cos.contiguous(), sin.contiguous()
    addr, bs, block_stride, v_offset, token_stride, cache_kvh = _cache_layout(kv_layer)
    if cache_kvh != kvh or kv_layer.shape[-1] != hd:
        raise ValueError(f"k of {kvh} heads of {hd} for a cache of {tuple(kv_layer.shape)}")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (t,) or not slot_mapping.is_contiguous():
        raise ValueError("slot_mapping: want a contiguous int64 [T]")
    q_out = torch.empty(t, h, hd, dtype=torch.bfloat16)
    if t:
        _k().rotary_cache_write(q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), t, h, kvh, hd, cos.data_ptr(),
                                sin.data_ptr(), hd, q_out.data_ptr(), addr, bs, block_stride, v_offset, token_stride,
                                slot_mapping.data_ptr(), torch.get_num_threads())
    return q_out


def check_tables(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                 block_size: int, num_tokens: int, num_blocks: int) -> None:
    """What :func:`attention` reads of a step's sequences, checked once per step: int32 host
    tensors of the right sizes, and block tables that cover every sequence with blocks that exist."""
    n = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    for name, x, shape in (("query_start_loc", query_start_loc, (n + 1,)), ("seq_lens", seq_lens, (n,))):
        if x.dtype != torch.int32 or tuple(x.shape) != shape or not x.is_contiguous() or x.device.type != "cpu":
            raise ValueError(f"{name}: want a contiguous CPU int32 {shape}, got {x.dtype} {tuple(x.shape)}")
    if (block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] < n
            or block_tables.stride(1) != 1):
        raise ValueError(f"block_tables: want int32 [seqs, width] rows, got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    qlens = [b - a for a, b in itertools.pairwise(starts)]
    if starts[0] != 0 or starts[-1] != num_tokens or min(qlens, default=1) < 1:
        raise ValueError(f"query_start_loc {starts} for {num_tokens} tokens")
    if n == 0:
        return
    need = [-(-s // block_size) for s in lens]
    if min(s - q for s, q in zip(lens, qlens)) < 0 or max(need) > block_tables.shape[1]:
        raise ValueError(f"seq_lens {lens} beyond the block tables' {block_tables.shape[1]} blocks")
    used = torch.cat([block_tables[i, :k] for i, k in enumerate(need)])
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
        raise ValueError(f"block tables name blocks outside 0..{num_blocks - 1}")


def attention(q: torch.Tensor, kv_layer: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
              block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of ``q [T, H, hd]`` (rotary applied, contiguous) over the cache, which
    already holds the step's K/V, for the step's sequences (any mix of decodes and chunks: new
    tokens ``query_start_loc[i]:query_start_loc[i + 1]`` of sequence i, ``seq_lens[i]`` tokens in
    all); the tables as :func:`check_tables` checked them for this step."""
    _check(q, "q", torch.bfloat16, 3)
    if not q.is_contiguous():
        raise ValueError("q must be contiguous")
    t, h, hd = q.shape
    addr, bs, block_stride, v_offset, token_stride, kvh = _cache_layout(kv_layer)
    if h % kvh or kv_layer.shape[-1] != hd:
        raise ValueError(f"q of {h} heads of {hd} for a cache of {tuple(kv_layer.shape)}")
    out = torch.empty_like(q)
    if t:
        _k().attention(q.data_ptr(), out.data_ptr(), h, kvh, hd, addr, bs, block_stride, v_offset, token_stride,
                       query_start_loc.data_ptr(), seq_lens.data_ptr(), block_tables.data_ptr(),
                       block_tables.stride(0), seq_lens.shape[0], scale, torch.get_num_threads())
    return out
