"""The Triton attention kernels on the CPU, under Triton's interpreter (small shapes).

``TRITON_INTERPRET=1`` must be set before triton is imported, so each check runs in a fresh
interpreter process: the random paged-layout cases of ``tests/gpu/kernel_cases.py``, and greedy
generation of a tiny model with the Triton backend and the one-row fused linear kernels against
the torch backend (chunked prefill mixed with decodes, prefix caching).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

TINY = dict(
    architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False,
)

ENGINE_CHECK = """
import sys
sys.path.insert(0, "tests/gpu")
from kernel_cases import patch_interpreter_bf16_dot
patch_interpreter_bf16_dot()
from engine.llm import LLM
from protocol.sampling import SamplingParams

config = sys.argv[1]
prompts = [[(7 * i + 3) % 256 for i in range(n)] for n in (3, 21, 40)]
prompts.append(prompts[2][:33] + [5, 6])  # shares a cached prefix with the third prompt
prompts.append([9, 8, 7])  # generated alone below: batch-1 decode steps
params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)
import engine.model as model
from engine import triton_gemv


def one_row(x, weight, prologue="none"):  # the fused one-row linear kernels, on the CPU too, for every weight
    return triton_gemv if x.numel() == x.shape[-1] else None


outs = {}
for backend in ("torch", "triton"):
    if backend == "triton":
        model._gemv_for = one_row
    llm = LLM(config, load_format="dummy", dtype="float32", block_size=4, num_blocks=64,
              max_num_batched_tokens=24, attention_backend=backend, progress=False)
    outs[backend] = llm.generate(prompts[:4], params) + llm.generate(prompts[4:], params)
for a, b in zip(outs["torch"], outs["triton"]):
    ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
    assert ta == tb, (ta, tb)
    for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
        assert abs(la.logprob - lb.logprob) < 1e-4, (la, lb)
assert outs["triton"][3].num_cached_tokens > 0
print("OK")
"""


def _run(args: list[str]) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_kernels_match_torch_reference() -> None:
    _run(["tests/gpu/kernel_cases.py"])


def test_engine_greedy_matches_torch_backend(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    _run(["-c", ENGINE_CHECK, str(config)])
