"""The KV cache's size when nobody gives one (``CacheConfig.memory_bytes`` 0).

On the CPU: 1 GiB (``AUTO_KV_BYTES_CPU``). On a GPU the cache takes what the process's share of the
device leaves once the weights are loaded: ``gpu_memory_fraction`` of the device's memory, less what
this process already holds, less a working reserve (one step's activations at the scheduler's token
budget, the sampler's logits for every running sequence, and 5% of the share for the decode CUDA
graphs and the allocator's fragmentation), and never more than the device has free less the same
reserve (another process on the GPU keeps its memory).
"""

from __future__ import annotations

import torch

from engine.config import AUTO_KV_BYTES_CPU, CacheConfig, ModelArch, SchedulerConfig

GRAPHS_AND_FRAGMENTATION = 0.05  # of the process's share of the GPU


def working_reserve(arch: ModelArch, sched: SchedulerConfig, itemsize: int, share_bytes: float) -> int:
    """Bytes a step needs beside the weights and the KV cache, at most: the activations of
    ``max_num_batched_tokens`` tokens through one layer (QKV, attention out, the MLP's gate and up
    and their product, the residual stream, a few alive at once), the float32 logits of
    ``max_num_seqs`` rows twice (the sampler's copies), and a share for graphs and fragmentation."""
    tokens = max(sched.max_num_batched_tokens, sched.max_num_seqs)
    qkv = (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim
    per_token = (4 * arch.hidden_size + qkv + 3 * arch.intermediate_size) * itemsize
    activations = 2 * tokens * per_token
    logits = 2 * sched.max_num_seqs * arch.vocab_size * 4
    return int(activations + logits + GRAPHS_AND_FRAGMENTATION * share_bytes)


def auto_kv_bytes(device: torch.device, cache: CacheConfig, arch: ModelArch, sched: SchedulerConfig,
                  itemsize: int) -> int:
    """The KV cache's bytes on ``device`` (see the module's docstring); raises ValueError with what
    it found when nothing is left for it."""
    if device.type != "cuda":
        return AUTO_KV_BYTES_CPU
    free, total = torch.cuda.mem_get_info(device)
    share = cache.gpu_memory_fraction * total
    held = torch.cuda.memory_reserved(device)
    reserve = working_reserve(arch, sched, itemsize, share)
    budget = int(min(share - held, free) - reserve)
    if budget <= 0:
        gib = 1 << 30
        raise ValueError(
            f"no GPU memory left for the KV cache: this process may use {share / gib:.1f} GiB "
            f"(gpu_memory_fraction {cache.gpu_memory_fraction} of {total / gib:.1f} GiB), holds {held / gib:.1f} GiB "
            f"(weights), needs {reserve / gib:.1f} GiB for a step, and the device has {free / gib:.1f} GiB free; "
            "raise gpu_memory_fraction, lower max_num_batched_tokens or max_num_seqs, or give kv_cache_gib")
    return budget
