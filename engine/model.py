"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3) over a flattened batch.

Inputs are ``T`` tokens of several sequences laid end to end (no padding); attention reads
and writes the paged KV cache through an :class:`AttentionBackend`. Q/K/V and gate/up
projections are fused into one matmul each; weights are loaded from HF names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionBackend, AttentionMetadata
from engine.config import ModelArch, RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
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
    """Rotate-half rotary embedding with a precomputed cos/sin table ``[max_pos, head_dim]``."""

    def __init__(self, arch: ModelArch, max_positions: int) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> CosSin:
        """cos and sin for each token, ``[T, 1, head_dim]``, computed once per step; with ``sin``
        negated on its first half where the step applies rotary itself (:func:`rotate`)."""
        cos, sin = self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)
        if positions.is_cuda:
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


def _gemv_for(x: torch.Tensor, weight: torch.Tensor, prologue: str = "none") -> ModuleType | None:
    """The one-row fused linear kernels (``triton_gemv``) where they take ``x``: a batch-1 decode
    step on the GPU. None elsewhere (the CPU, larger steps)."""
    if not x.is_cuda:
        return None
    from engine import triton_gemv

    return triton_gemv if triton_gemv.supports(x, weight, prologue) else None


class Linear(nn.Linear):
    """``nn.Linear`` whose weight can be reordered once into oneDNN's blocked layout for the CPU
    (:func:`prepack_for_cpu`): bfloat16 matmuls of a few rows then run about twice as fast as
    ``F.linear`` on the plain weight, with bit-identical results."""

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _prepack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)


def _prepack_is_exact(layer: Linear) -> bool:
    """Whether oneDNN's blocked-layout matmul gives ``F.linear``'s results bit for bit on this
    CPU (it does where both take the same bf16 kernels; a CPU without native bf16 may not)."""
    gen = torch.Generator().manual_seed(0)
    packed = _prepack(layer.weight)
    for rows in (1, 5, 300):
        x = torch.randn(rows, layer.in_features, generator=gen).to(layer.weight.dtype)
        ref = F.linear(x, layer.weight, layer.bias)
        if not torch.equal(torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], ""), ref):
            return False
    return True


def prepack_for_cpu(model: LlamaModel) -> bool:
    """Reorder a CPU bfloat16 model's projection and LM-head weights for oneDNN, freeing the
    plain copies (the embedding table stays: lookups need it). Call after the weights are
    loaded; the model can no longer load weights afterwards. Returns False, changing nothing,
    where oneDNN cannot take them or would change the results (another dtype; a CPU whose
    oneDNN kernels differ from ``F.linear``'s)."""
    weight = model.embed_tokens.weight
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        head = _prepack(model.lm_head.weight if model.lm_head is not None else weight)
        exact = _prepack_is_exact(model.layers[0].qkv_proj) if len(model.layers) else True
    except RuntimeError:
        return False
    if not exact:
        return False
    model.lm_head_packed = head
    if model.lm_head is not None:
        model.lm_head.weight = nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)
    for module in model.modules():
        if isinstance(module, Linear) and module is not model.lm_head:
            module.packed = _prepack(module.weight)
            module.weight = nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)
    return True


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; a batch-1 decode step takes one Triton kernel on the GPU."""
    if (g := _gemv_for(x, layer.weight)) is not None:
        return g.gemv(x, layer.weight, layer.bias)
    return layer.forward(x)


def norm_linear(
    norm: RMSNorm, layer: nn.Linear, x: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer(norm(x + residual)), x + residual)``, or ``(layer(norm(x)), x)`` without a residual;
    a batch-1 decode step takes one kernel on the GPU where it can (the norm fused into the matmul)."""
    if (g := _gemv_for(x, layer.weight, "rms_norm")) is not None:
        if residual is None:
            return g.gemv(x, layer.weight, layer.bias, g.RMS_NORM, norm.weight, norm.eps), x
        return g.gemv(x, layer.weight, layer.bias, g.RMS_NORM, norm.weight, norm.eps, residual)
    if residual is None:
        return layer.forward(norm(x)), x
    h, residual = norm(x, residual)
    return layer.forward(h), residual


def act_linear(layer: nn.Linear, gate_up: torch.Tensor) -> torch.Tensor:
    """``layer(silu_and_mul(gate_up))``; one kernel on the GPU for a batch-1 decode step where it can."""
    if (g := _gemv_for(gate_up, layer.weight, "silu_mul")) is not None:
        return g.gemv(gate_up, layer.weight, layer.bias, g.SILU_MUL)
    return layer.forward(silu_and_mul(gate_up))


class RMSNorm(nn.Module):
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
        o = linear(self.o_proj, o.reshape(t, a.q_size))
        gate_up, residual = norm_linear(self.post_attn_norm, self.gate_up_proj, o, residual)
        return act_linear(self.down_proj, gate_up), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, max_positions: int) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.rotary = Rotary(arch, max_positions)
        if arch.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.lm_head_packed: torch.Tensor | None = None  # set by prepack_for_cpu

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv: torch.Tensor,  # the whole paged cache
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:  # [T, hidden]
        x = self.embed_tokens(input_ids)
        cos_sin = self.rotary(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos_sin, attn, kv, meta)
        return x + residual

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on the rows to sample from; float32 logits."""
        if self.lm_head_packed is not None:
            return torch.ops.mkldnn._linear_pointwise(self.norm(hidden), self.lm_head_packed, None, "none", [],
                                                      "").float()
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
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
