"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3) over a flattened batch.

Inputs are ``T`` tokens of several sequences laid end to end (no padding); attention reads
and writes the paged KV cache through an :class:`AttentionBackend`. Q/K/V and gate/up
projections are fused into one matmul each; weights are loaded from HF names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from engine import cpu_kernels
from engine.attention import AttentionBackend, AttentionMetadata
from engine.config import ModelArch, RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    # On the CPU, whatever the ambient device: under the meta device (engine.loader builds the
    # model there) these ops would import torch._dynamo, seconds of a worker's start.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type != "llama3":
        return inv_freq
    # Llama 3.1: leave high frequencies, divide low ones by factor, interpolate between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """Rotate-half rotary embedding with a precomputed cos/sin table ``[max_pos, head_dim]``,
    computed on the CPU (move the module to its device)."""

    def __init__(self, arch: ModelArch, max_positions: int) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, signed: bool = True) -> CosSin:
        """cos and sin for each token, ``[T, 1, head_dim]``, computed once per step; with ``sin``
        negated on its first half where the step applies rotary itself (:func:`rotate`) on the
        CPU (``signed``: the attention backend does not)."""
        cos, sin = self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)
        if positions.is_cuda or not signed:
            return cos, sin, None
        half = sin.shape[-1] // 2
        return cos, sin, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


CosSin = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # cos, sin, sin with its first half negated


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` in four ops instead of seven, bit for bit: rotate-half is a roll by
    half the head with the first half's sign moved into ``sin`` (``(-a) * b == a * (-b)``)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def _triton_ops() -> ModuleType:
    """The fused GPU kernels (one launch where torch takes several); imported on first CUDA use."""
    from engine import triton_ops

    return triton_ops


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate, up]`` (the fused gate/up projection's output)."""
    if x.is_cuda:
        return _triton_ops().silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _gemv_for(x: torch.Tensor, layer: nn.Linear, prologue: str = "none") -> ModuleType | None:
    """The one-row fused linear kernels (``triton_gemv``) where they take ``x``: a batch-1 decode
    step on the GPU. None elsewhere (the CPU, larger steps, the batch-invariant mode)."""
    if not x.is_cuda or getattr(layer, "batch_invariant", False):
        return None
    from engine import triton_gemv

    return triton_gemv if triton_gemv.supports(x, layer.weight, prologue) else None


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The batch-invariant mode's linear (:mod:`engine.triton_matmul`); imported on first use."""
    from engine import triton_matmul

    return triton_matmul.matmul(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` that runs on the CPU kernels' GEMM once :func:`use_cpu_kernels` packed its
    weight (``cpu``; the plain weight is then freed), or on the batch-invariant matmul once
    :func:`use_batch_invariant` set ``batch_invariant``."""

    cpu: cpu_kernels.PackedWeight | None = None
    batch_invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu is not None:
            return self.cpu(x)
        if self.batch_invariant:
            return _matmul(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_batch_invariant(model: LlamaModel) -> None:
    """Put a CUDA model's projections and LM head on the batch-invariant matmul (no one-row
    GEMV, no cuBLAS): each row's result then has the same bits whatever rows share its step
    (``EngineConfig.batch_invariant``; the attention backend's part is ``TritonAttention``'s)."""
    for layer in model.layers:
        for lin in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
            lin.batch_invariant = True
    model.batch_invariant = True


def use_cpu_kernels(model: LlamaModel) -> bool:
    """Move a CPU bfloat16 model onto the CPU kernels (:mod:`engine.cpu_kernels`): projection and
    LM-head weights packed for the GEMM (the plain copies freed; the embedding table stays, for
    lookups), the gate/up projection with silu(gate) * up in its epilogue, the residual norms on
    the norm kernel. Call after the weights are loaded; the model can no longer load weights
    afterwards. Returns False, changing nothing, where the kernels do not take this model."""
    a = model.arch
    weight = model.embed_tokens.weight
    if not cpu_kernels.supports(weight.device, weight.dtype, a.head_dim, a.hidden_size, a.intermediate_size):
        return False
    empty = nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)
    head = model.lm_head.weight if model.lm_head is not None else weight
    model.lm_head_cpu = cpu_kernels.PackedWeight.pack(head, out_float32=True)
    if model.lm_head is not None:
        model.lm_head.weight = empty
    for layer in model.layers:
        for lin in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
            lin.cpu = cpu_kernels.PackedWeight.pack(lin.weight, lin.bias, silu_mul=lin is layer.gate_up_proj)
            lin.weight = empty
        layer.input_norm.cpu = layer.post_attn_norm.cpu = True
    model.norm.cpu = True
    return True


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; a batch-1 decode step takes one Triton kernel on the GPU."""
    if (g := _gemv_for(x, layer)) is not None:
        return g.gemv(x, layer.weight, layer.bias)
    return layer.forward(x)


def norm_linear(
    norm: RMSNorm, layer: nn.Linear, x: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer(norm(x + residual)), x + residual)``, or ``(layer(norm(x)), x)`` without a residual;
    a batch-1 decode step takes one kernel on the GPU where it can (the norm fused into the matmul)."""
    if (g := _gemv_for(x, layer, "rms_norm")) is not None:
        if residual is None:
            return g.gemv(x, layer.weight, layer.bias, g.RMS_NORM, norm.weight, norm.eps), x
        return g.gemv(x, layer.weight, layer.bias, g.RMS_NORM, norm.weight, norm.eps, residual)
    if residual is None:
        return layer.forward(norm(x)), x
    h, residual = norm(x, residual)
    return layer.forward(h), residual


def act_linear(layer: nn.Linear, gate_up: torch.Tensor) -> torch.Tensor:
    """``layer(silu_and_mul(gate_up))``; one kernel on the GPU for a batch-1 decode step where it can."""
    if (g := _gemv_for(gate_up, layer, "silu_mul")) is not None:
        return g.gemv(gate_up, layer.weight, layer.bias, g.SILU_MUL)
    return layer.forward(silu_and_mul(gate_up))


class RMSNorm(nn.Module):
    cpu = False  # on the CPU kernels (set by use_cpu_kernels): 2-D bfloat16 rows only

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``; with ``residual``, ``(norm(x + residual), x + residual)`` (fused on the GPU)."""
        if x.is_cuda:
            return _triton_ops().rms_norm(x, self.weight, self.eps, residual)
        if self.cpu:
            out, res = cpu_kernels.rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, res)
        if residual is not None:
            residual = x + residual
            return self.forward(residual), residual
        # Same arithmetic as HF (normalize in float32, cast back, then scale), the normalization
        # in one op.
        return self.weight * torch.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int) -> None:
        super().__init__()
        self.arch = arch
        self.layer_idx = layer_idx
        h = arch.hidden_size
        self.input_norm = RMSNorm(h, arch.rms_norm_eps)
        self.qkv_proj = Linear(h, arch.q_size + 2 * arch.kv_size, bias=arch.attention_bias)
        self.o_proj = Linear(arch.q_size, h, bias=False)
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
        self.post_attn_norm = RMSNorm(h, arch.rms_norm_eps)
        self.gate_up_proj = Linear(h, 2 * arch.intermediate_size, bias=False)
        self.down_proj = Linear(arch.intermediate_size, h, bias=False)
        self.scale = arch.head_dim ** -0.5

    def forward(
        self,
        x: torch.Tensor,  # the previous layer's output (the embeddings for the first layer)
        residual: torch.Tensor | None,  # the residual stream before x is added (None: first layer)
        cos_sin: CosSin,
        attn: AttentionBackend,
        kv: torch.Tensor,
        meta: AttentionMetadata,
        keep: torch.Tensor | None = None,  # rows to compute past the attention (None: all)
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (this layer's output, the residual stream before it)
        a = self.arch
        t = x.shape[0]
        qkv, residual = norm_linear(self.input_norm, self.qkv_proj, x, residual)
        fused = getattr(attn, "forward_with_rotary", None)  # rotary fused with the cache write
        cos, sin, sin_signed = cos_sin
        v = qkv[:, a.q_size + a.kv_size:].view(t, a.num_kv_heads, a.head_dim)
        if fused is None and sin_signed is not None and not a.qk_norm:
            # q and k rotated together: one rotary over all their heads.
            qk = rotate(qkv[:, :a.q_size + a.kv_size].view(t, a.num_heads + a.num_kv_heads, a.head_dim), cos,
                        sin_signed)
            q, k = qk[:, :a.num_heads], qk[:, a.num_heads:]
            o = attn.forward(q, k, v, kv[:, self.layer_idx], meta, self.scale)
        else:
            q = qkv[:, :a.q_size].view(t, a.num_heads, a.head_dim)
            k = qkv[:, a.q_size:a.q_size + a.kv_size].view(t, a.num_kv_heads, a.head_dim)
            if a.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            if fused is not None:
                o = fused(q, k, v, cos, sin, kv[:, self.layer_idx], meta, self.scale)
            elif sin_signed is not None:
                o = attn.forward(rotate(q, cos, sin_signed), rotate(k, cos, sin_signed), v, kv[:, self.layer_idx],
                                 meta, self.scale)
            else:
                o = attn.forward(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, kv[:, self.layer_idx],
                                 meta, self.scale)
        o = o.reshape(t, a.q_size)
        if keep is not None:  # every row's K/V is in the cache; only these rows go on
            o, residual = o[keep], residual[keep]
        o = linear(self.o_proj, o)
        if self.gate_up_proj.cpu is not None:  # the kernels' GEMM applies silu(gate) * up itself
            h, residual = self.post_attn_norm(o, residual)
            return self.down_proj(self.gate_up_proj(h)), residual
        gate_up, residual = norm_linear(self.post_attn_norm, self.gate_up_proj, o, residual)
        return act_linear(self.down_proj, gate_up), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, max_positions: int) -> None:
        super().__init__()
        self.arch = arch
        # Built on the meta device and loaded (engine.loader): given its weight, the embedding
        # skips its random init, which on the meta device imports torch._dynamo (seconds).
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size,
                                         _weight=torch.empty(arch.vocab_size, arch.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.rotary = Rotary(arch, max_positions)
        if arch.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.lm_head_cpu: cpu_kernels.PackedWeight | None = None  # set by use_cpu_kernels
        self.batch_invariant = False  # set by use_batch_invariant: the LM head on the batch-invariant matmul

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv: torch.Tensor,  # the whole paged cache
        meta: AttentionMetadata,
        attn: AttentionBackend,
        rows: torch.Tensor | None = None,  # the rows of the output wanted (None: all)
        before_layer: Callable[[int], None] | None = None,  # called with i before layer i is launched
    ) -> torch.Tensor:  # [T, hidden], or [len(rows), hidden]
        x = self.embed_tokens(input_ids)
        cos_sin = self.rotary(positions, x.dtype, signed=not hasattr(attn, "forward_with_rotary"))
        residual = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if before_layer is not None:
                before_layer(i)
            # The last layer's MLP (most of its work) runs only for the rows wanted.
            x, residual = layer(x, residual, cos_sin, attn, kv, meta, rows if i == last else None)
        return x + residual

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on the rows to sample from; float32 logits (on the CPU kernels,
        straight from the GEMM's float32 accumulators)."""
        if self.lm_head_cpu is not None:
            return self.lm_head_cpu(self.norm(hidden))
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.batch_invariant:
            return _matmul(self.norm(hidden), weight).float()
        return F.linear(self.norm(hidden), weight).float()

    # ---- weights ---------------------------------------------------------------------------
    _LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    _SHARDS = {
        "self_attn.q_proj": ("qkv_proj", 0), "self_attn.k_proj": ("qkv_proj", 1),
        "self_attn.v_proj": ("qkv_proj", 2), "mlp.gate_proj": ("gate_up_proj", 0),
        "mlp.up_proj": ("gate_up_proj", 1),
    }
    _RENAMES = {
        "self_attn.o_proj": "o_proj", "mlp.down_proj": "down_proj", "input_layernorm": "input_norm",
        "post_attention_layernorm": "post_attn_norm", "self_attn.q_norm": "q_norm",
        "self_attn.k_norm": "k_norm",
    }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the fused parameters. Every parameter must be set."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        a = self.arch
        shard_sizes = {"qkv_proj": [a.q_size, a.kv_size, a.kv_size],
                       "gate_up_proj": [a.intermediate_size, a.intermediate_size]}
        for name, tensor in weights:
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints store the copy anyway
            if "rotary_emb" in name:
                continue
            m = self._LAYER.match(name)
            if m is None:
                target = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight",
                          "lm_head.weight": "lm_head.weight"}.get(name)
                if target is None:
                    raise ValueError(f"unexpected weight {name!r}")
                self._copy(params[target], tensor, name)
                loaded.add(target)
                continue
            layer, rest = m.group(1), m.group(2)
            module, suffix = rest.rsplit(".", 1)
            if module in self._SHARDS:
                fused, idx = self._SHARDS[module]
                target = f"layers.{layer}.{fused}.{suffix}"
                sizes = shard_sizes[fused]
                start = sum(sizes[:idx])
                self._copy(params[target].data.narrow(0, start, sizes[idx]), tensor, name)
                loaded.add(f"{target}#{idx}")
            elif module in self._RENAMES:
                target = f"layers.{layer}.{self._RENAMES[module]}.{suffix}"
                self._copy(params[target], tensor, name)
                loaded.add(target)
            else:
                raise ValueError(f"unexpected weight {name!r}")
        missing = []
        for pname in params:
            fused = pname.split(".")[-2]
            n = len(shard_sizes.get(fused, [])) if fused in shard_sizes else 0
            if n:
                missing += [f"{pname}#{i}" for i in range(n) if f"{pname}#{i}" not in loaded]
            elif pname not in loaded:
                missing.append(pname)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:4]}")

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"weight {name}: shape {tuple(src.shape)} does not match the model's {tuple(dst.shape)}")
        with torch.no_grad():
            dst.copy_(src)
