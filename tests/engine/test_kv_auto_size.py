"""The KV cache's default size (``kv_cache_gib`` 0): 1 GiB on the CPU, from the device's memory on
a GPU (tests/gpu/test_gpu_memory.py runs that one); ``tandem serve``'s workers sharing one GPU
split 0.9 of it; a given size still wins."""

from __future__ import annotations

import shutil

import torch

from deploy.local_cluster import LocalCluster
from engine.config import PRESETS, CacheConfig, ModelArch, SchedulerConfig
from engine.memory import auto_kv_bytes, working_reserve
from runtime.settings import ClusterConfig
from worker.server import engine_config


def test_default_worker_cache_is_one_gib_on_the_cpu() -> None:
    econfig = engine_config(ClusterConfig(model="dummy:smollm2-135m"))
    assert econfig.cache.memory_bytes == 0 and econfig.cache.gpu_memory_fraction == 0.9
    arch = ModelArch.from_hf(PRESETS["smollm2-135m"])
    assert auto_kv_bytes(torch.device("cpu"), econfig.cache, arch, econfig.scheduler, 2) == 1 << 30
    assert econfig.cache.resolve_num_blocks(1 << 20) == 1024  # without a device's answer: 1 GiB too
    assert CacheConfig(memory_bytes=0).resolve_num_blocks(1 << 20, lambda: 5 << 20) == 5
    given = engine_config(ClusterConfig(kv_cache_gib=0.5, gpu_memory_fraction=0.4))
    assert given.cache.memory_bytes == 1 << 29 and given.cache.gpu_memory_fraction == 0.4
    assert given.cache.resolve_num_blocks(1 << 20, lambda: 5 << 20) == 512
    packed = engine_config(ClusterConfig(device="cuda", num_gpus_per_worker=0.5))  # two workers Ray puts on one GPU
    assert packed.cache.gpu_memory_fraction == 0.45
    assert engine_config(ClusterConfig(device="cuda", num_gpus_per_worker=2)).cache.gpu_memory_fraction == 0.9


def test_local_cluster_splits_one_gpu_between_its_workers() -> None:
    def fraction(num_prefill: int, num_decode: int, **kw: object) -> float:
        cluster = LocalCluster(ClusterConfig(device="cuda", **kw), num_prefill, num_decode)
        shutil.rmtree(cluster._tmp)
        return cluster.cfg.gpu_memory_fraction

    assert fraction(1, 1) == 0.45
    assert fraction(2, 1) == 0.3
    assert fraction(0, 1) == 0.0  # alone: the worker's own default (0.9)
    assert fraction(1, 1, gpu_memory_fraction=0.2) == 0.2


def test_working_reserve_of_llama_8b_by_hand() -> None:
    arch = ModelArch.from_hf(PRESETS["llama-3.1-8b"])
    # a token through a layer: (4 x 4096 residual/norm + (32 + 2 x 8) x 128 q/k/v + 3 x 14336 MLP) x 2 bytes
    per_token = (4 * 4096 + 48 * 128 + 3 * 14336) * 2
    activations = 2 * 2048 * per_token  # two of them alive, at the 2048-token budget
    logits = 2 * 256 * 128256 * 4  # float32 logits of 256 rows, twice
    assert working_reserve(arch, SchedulerConfig(), 2, 0) == activations + logits == 799_539_200
    assert working_reserve(arch, SchedulerConfig(), 2, 100 << 30) == 799_539_200 + (5 << 30)
