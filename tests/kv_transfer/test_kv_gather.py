"""The gather kernel of the cuda_ipc transport, run by Triton's interpreter on the CPU (the GPU
runs it for real in tests/gpu/test_gpu_kv_transfer.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kv_helpers import REPO_ROOT

from kv_transfer.gather import copy_runs

pytest.importorskip("triton")

CHECK = """
import torch
from kv_transfer.gather import copy_runs
torch.manual_seed(0)
# 512-byte blocks (masked), 16 KiB blocks (chunks tile them: unmasked), 30-byte blocks (bytes, not words)
for shape, dtype in [((40, 2, 2, 4, 2, 8), torch.bfloat16), ((40, 2, 2, 16, 2, 64), torch.bfloat16),
                     ((40, 1, 2, 3, 1, 5), torch.float16)]:
    src = torch.randn(shape).to(dtype)
    dst = torch.zeros((50, *shape[1:]), dtype=dtype)
    runs = [(0, 10, 3), (5, 0, 1), (20, 30, 10), (39, 49, 1), (13, 41, 2)]
    assert copy_runs(src, dst, runs, use_kernel=True) == 1
    want = torch.zeros_like(dst)
    for s, d, n in runs:
        want[d : d + n] = src[s : s + n]
    assert torch.equal(want, dst), "gather kernel"
print("OK")
"""


def test_gather_kernel_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-3000:]


def test_copy_runs_without_the_kernel() -> None:
    src = torch.arange(10 * 6, dtype=torch.float32).reshape(10, 1, 2, 1, 1, 3)
    dst = torch.zeros(12, 1, 2, 1, 1, 3)
    assert copy_runs(src, dst, [(0, 11, 1), (4, 2, 3)]) == 2  # CPU tensors: one copy_ per run
    assert torch.equal(dst[11], src[0]) and torch.equal(dst[2:5], src[4:7])
    assert not dst[[0, 1, 5, 6, 7, 8, 9, 10]].any()
