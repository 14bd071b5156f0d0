"""The ``sim`` engine backend: a timing model stands in for the forward pass.

Everything above the runner is the real engine: the block manager (prefix caching, KV
events), the scheduler (continuous batching, chunked prefill, preemption), KV handles, pulls
and their bookkeeping in the workers, and every metric. Only :class:`SimRunner.execute`
differs: it sleeps for the step time a :class:`SimProfile` predicts and returns deterministic
tokens. So one CPU machine can run dozens of workers, and routing or planning can be tested
at a scale no laptop could compute.

Step time (seconds) of a batch holding prefill chunks ``(new, cached)`` and decodes whose
sequences hold ``kv`` tokens::

    step_s + max(prefill_min_s, prefill_token_s * sum(new) + prefill_attention_s * sum(new * (cached + new / 2)))
           + decode_seq_s * num_decodes + decode_kv_token_s * sum(kv)

the prefill term only when the step prefills. ``prefill_min_s``: a prefill too small to fill the
device still takes this long (on a GPU: an eager step, no CUDA graph, kernels not saturated).

The coefficients are fitted by least squares to steps timed on a real engine
(``bench/fit_sim.py``) and stored in ``engine/sim_profiles/<name>.json``.

Tokens: the next token is a fixed function of the last token and its position (never an EOS
id), so a greedy request gets the same tokens whichever worker or path serves it, and
disaggregated output equals aggregated output. The KV tensor is a stub of one element per
token slot (the transports move it as they would real blocks); nothing reads it.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.config import EngineConfig, ModelArch, bytes_per_block
from engine.loader import TORCH_DTYPES
from engine.plan import SampledToken, SampledTokens, SchedulerOutput
from engine.request import Request
from protocol.outputs import TokenLogprob

PROFILE_DIR = Path(__file__).with_name("sim_profiles")
COEFFICIENTS = ("step_s", "prefill_min_s", "prefill_token_s", "prefill_attention_s", "decode_seq_s",
                "decode_kv_token_s")
DEFAULT_PROFILE = "h200-llama-3.1-8b"


@dataclass(frozen=True)
class SimProfile:
    """Fitted step-time coefficients (seconds) and where they come from."""

    name: str
    step_s: float
    prefill_min_s: float
    prefill_token_s: float
    prefill_attention_s: float
    decode_seq_s: float
    decode_kv_token_s: float
    fitted_on: dict[str, Any] = field(default_factory=dict)  # model, device, dtype, threads, date
    fit: dict[str, Any] = field(default_factory=dict)  # samples, R^2, errors

    def __post_init__(self) -> None:
        for name in COEFFICIENTS:
            if not getattr(self, name) >= 0:
                raise ValueError(f"sim profile {self.name!r}: {name} must be >= 0, got {getattr(self, name)}")

    def step_time_s(self, prefills: list[tuple[int, int]], decode_kv_tokens: list[int]) -> float:
        """Predicted time of one step: ``prefills`` as ``(new, cached)`` tokens per chunk; one
        entry per decoding sequence in ``decode_kv_tokens`` (its KV length)."""
        if not prefills and not decode_kv_tokens:
            return 0.0
        new = sum(n for n, _ in prefills)
        attention = sum(n * (c + n / 2) for n, c in prefills)
        prefill = max(self.prefill_min_s, self.prefill_token_s * new + self.prefill_attention_s * attention) \
            if prefills else 0.0
        return (self.step_s + prefill + self.decode_seq_s * len(decode_kv_tokens)
                + self.decode_kv_token_s * sum(decode_kv_tokens))

    @classmethod
    def load(cls, name_or_path: str = "") -> SimProfile:
        """A profile by name (a file in ``engine/sim_profiles``) or path; empty: the default."""
        path = Path(name_or_path or DEFAULT_PROFILE)
        if path.suffix != ".json":
            path = PROFILE_DIR / f"{path.name}.json"
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            known = sorted(p.stem for p in PROFILE_DIR.glob("*.json"))
            raise ValueError(f"no sim profile {name_or_path!r} ({e.strerror}); known: {known}") from None
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")


def sim_token(last_token: int, position: int, vocab_size: int, eos_token_ids: tuple[int, ...] = ()) -> int:
    """The sim's deterministic next token after ``last_token`` at ``position``."""
    token = (last_token * 1103515245 + position * 12345 + 7) % vocab_size
    while token in eos_token_ids:
        token = (token + 1) % vocab_size
    return token


class _Done:
    """A sim step, already run: the ``StepHandle`` interface the engine reads."""

    def __init__(self, sampled: SampledTokens) -> None:
        self.sampled = sampled

    def wait(self) -> None:
        pass

    def done(self) -> bool:
        return True

    def result(self) -> SampledTokens:
        return self.sampled


class SimRunner:
    """Drop-in for :class:`engine.model_runner.ModelRunner`: same capacity, no model."""

    def __init__(self, config: EngineConfig, arch: ModelArch, max_model_len: int,
                 eos_token_ids: tuple[int, ...] = (), profile: SimProfile | None = None) -> None:
        self.config = config
        self.arch = arch
        self.profile = profile or SimProfile.load(config.sim_profile)
        self.block_size = config.cache.block_size
        self.dtype = TORCH_DTYPES[config.dtype]
        # As many blocks as the real model's KV would get from the same budget.
        self.num_blocks = config.cache.resolve_num_blocks(bytes_per_block(arch, self.block_size, self.dtype.itemsize))
        # [num_blocks, num_layers=1, 2, block_size, num_kv_heads=1, head_dim=1]: the layout
        # contract of kv_transfer, one element per token slot.
        self.kv = torch.zeros(self.num_blocks, 1, 2, self.block_size, 1, 1, dtype=self.dtype)
        self.eos_token_ids = tuple(dict.fromkeys((*eos_token_ids, *arch.eos_token_ids)))  # never sampled
        self.num_steps = 0
        self.modeled_s = 0.0  # sum of predicted step times

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            self.kv[[d for _, d in copies]] = self.kv[[s for s, _ in copies]]

    def execute(self, output: SchedulerOutput, block_tables: dict[str, list[int]]) -> SampledTokens:
        t0 = time.perf_counter()
        self.copy_blocks(output.block_copies)
        if output.is_empty:
            return {}
        prefills: list[tuple[int, int]] = []
        decodes: list[int] = []
        for s in output.scheduled:
            computed = s.request.num_computed_tokens
            if s.num_new_tokens == 1 and computed > 0:
                decodes.append(computed + 1)
            else:
                prefills.append((s.num_new_tokens, computed))
        step_s = self.profile.step_time_s(prefills, decodes)
        self.num_steps += 1
        self.modeled_s += step_s
        sampled = {r.request_id: [self._sample(r, k, output)] for r, k in output.sample_rows}
        remaining = step_s - (time.perf_counter() - t0)
        if remaining > 0:
            time.sleep(remaining)
        return sampled

    def launch(self, output: SchedulerOutput, block_tables: dict[str, list[int]], prev: object = None
               ) -> _Done | None:
        """``execute``, done by the time it returns (the engine runs the sim synchronously)."""
        sampled = self.execute(output, block_tables)
        return None if output.is_empty else _Done(sampled)

    def _sample(self, request: Request, row: int, output: SchedulerOutput) -> SampledToken:
        # An n > 1 child samples from its parent's row: same position, its own index offsets it.
        parent = output.scheduled[row].request
        position = parent.num_computed_tokens + output.scheduled[row].num_new_tokens
        salt = 0 if request is parent else zlib.crc32(request.request_id.encode()) & 0xFFFF
        token = sim_token(parent.token_ids[position - 1] + salt, position, self.arch.vocab_size, self.eos_token_ids)
        logprob = None
        if request.sampling.logprobs is not None:
            logprob = TokenLogprob(token, 0.0, {token: 0.0} if request.sampling.logprobs else {})
        return SampledToken(token, logprob)
