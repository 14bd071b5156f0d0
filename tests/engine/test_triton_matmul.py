"""The batch-invariant mode's pieces that run without a GPU: the setting's way from the cluster
settings to the engine config, its validation, and ``engine/triton_matmul.py`` under Triton's
interpreter (tile edges in M, N and K, bias, float32 and bfloat16) against ``F.linear``. The
bit-for-bit invariance is a GPU property: ``tests/gpu/test_gpu_batch_invariant.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import EngineConfig
from runtime import settings
from worker.server import engine_config

ROOT = Path(__file__).resolve().parents[2]

MATMUL_CHECK = """
import sys
sys.path.insert(0, "tests/gpu")
from kernel_cases import patch_interpreter_bf16_dot
patch_interpreter_bf16_dot()
import torch
import torch.nn.functional as F
from engine import triton_matmul

g = torch.Generator().manual_seed(0)
# (M, N, K): one row; rows past a tile; N past a 64-wide tile; K past a 64-wide tile
for m, n, k in [(1, 40, 96), (70, 64, 64), (3, 130, 200), (65, 33, 70)]:
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x = torch.randn(m, k, generator=g).to(dtype)
        w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        ref = F.linear(x.float(), w.float(), b.float())
        got = triton_matmul.matmul(x, w, b)
        assert got.dtype == dtype and got.shape == (m, n), (got.dtype, got.shape)
        err = (got.float() - ref).abs().max().item()
        assert err < tol * max(1.0, ref.abs().max().item()), (m, n, k, dtype, err)
        three = triton_matmul.matmul(x.view(1, m, k), w)  # leading dims kept, no bias
        assert three.shape == (1, m, n)
        assert (three[0].float() - F.linear(x.float(), w.float())).abs().max().item() < tol * 10
print("OK")
"""


def test_the_setting_reaches_the_engine_config() -> None:
    assert engine_config(settings.ClusterConfig(batch_invariant=True)).batch_invariant
    assert engine_config(settings.ClusterConfig(batch_invariant=True), role="prefill").batch_invariant
    assert not engine_config(settings.ClusterConfig()).batch_invariant
    with pytest.raises(ValueError, match="batch_invariant"):
        settings.ClusterConfig(batch_invariant=True, dtype="float32")


def test_the_mode_needs_the_triton_attention_and_16_bits() -> None:
    EngineConfig(batch_invariant=True, attention_backend="triton")
    EngineConfig(batch_invariant=True, dtype="float16")
    with pytest.raises(ValueError, match="batch_invariant needs the triton attention"):
        EngineConfig(batch_invariant=True, attention_backend="torch")
    with pytest.raises(ValueError, match="float32 is not batch-invariant"):
        EngineConfig(batch_invariant=True, dtype="float32")


def test_matmul_matches_linear_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", MATMUL_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
