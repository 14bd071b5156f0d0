"""The ``sim`` engine backend: fitted profiles, the step-time model, modeled time honored,
deterministic tokens (the same on every path: cached prefix, disaggregated), and the same
KV events and capacity as the real engine would have."""

from __future__ import annotations

import json
import time

import pytest

from engine.config import CacheConfig, EngineConfig, bytes_per_block
from engine.llm_engine import LLMEngine
from engine.loader import read_arch
from engine.sim import COEFFICIENTS, PROFILE_DIR, SimProfile, sim_token
from protocol.sampling import SamplingParams

MODEL = "dummy:smollm2-135m"  # the default model's shape, no weights to load
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def sim(profile: SimProfile | None = None, **cache: object) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=MODEL, backend="sim", cache=CacheConfig(block_size=4, **cache)),
                       progress=False)
    if profile is not None:
        engine.runner.profile = profile
    return engine


def fast_profile(**coefficients: float) -> SimProfile:
    return SimProfile("test", **{k: coefficients.get(k, 0.0) for k in COEFFICIENTS})


def run(engine: LLMEngine, rid: str, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    engine.add_request(rid, prompt, params)
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() if out.request_id == rid for t in out.new_token_ids]
    return tokens


def test_shipped_profiles_are_fitted_and_valid() -> None:
    paths = sorted(PROFILE_DIR.glob("*.json"))
    assert {p.stem for p in paths} >= {"h200-llama-3.1-8b", "cpu-smollm2-135m"}
    for path in paths:
        profile = SimProfile.load(path.stem)
        assert profile.name == path.stem
        assert profile.fit["r2"] > 0.8 and len(profile.fit["samples"]) == profile.fit["num_samples"]
        assert profile.fitted_on["model"] and profile.fitted_on["device"]
        # Monotone in the work: more new tokens, more context, more sequences -> slower.
        assert profile.step_time_s([(2048, 0)], []) > profile.step_time_s([(512, 0)], []) > 0
        assert profile.step_time_s([(512, 4096)], []) >= profile.step_time_s([(512, 0)], [])
        assert profile.step_time_s([], [1024] * 32) > profile.step_time_s([], [1024])
    assert SimProfile.load("").name == "h200-llama-3.1-8b"
    with pytest.raises(ValueError, match="no sim profile"):
        SimProfile.load("no-such-gpu")


def test_step_time_model(tmp_path) -> None:
    p = SimProfile("t", step_s=0.01, prefill_min_s=0.005, prefill_token_s=1e-4, prefill_attention_s=1e-7,
                   decode_seq_s=1e-3, decode_kv_token_s=1e-6)
    assert p.step_time_s([], []) == 0.0
    # 100 new after 50 cached: linear part 100e-4 + 1e-7 * 100 * (50 + 50) = 0.011 > the floor
    assert p.step_time_s([(100, 50)], []) == pytest.approx(0.01 + 0.011)
    assert p.step_time_s([(10, 0)], []) == pytest.approx(0.01 + 0.005)  # the floor
    assert p.step_time_s([(100, 50)], [200, 300]) == pytest.approx(0.01 + 0.011 + 2e-3 + 500e-6)
    p.save(tmp_path / "t.json")
    assert SimProfile.load(str(tmp_path / "t.json")) == p
    with pytest.raises(ValueError, match=">= 0"):
        SimProfile("bad", **{**{k: 0.0 for k in COEFFICIENTS}, "step_s": -1.0})
    assert "samples" not in json.loads((tmp_path / "t.json").read_text())["fit"]


def test_capacity_is_the_real_models() -> None:
    engine = sim(memory_bytes=64 << 20)
    arch = read_arch(EngineConfig(model=MODEL))
    assert engine.runner.num_blocks == (64 << 20) // bytes_per_block(arch, 4, 2)  # bfloat16
    assert engine.runner.kv.shape == (engine.runner.num_blocks, 1, 2, 4, 1, 1)


def test_modeled_time_is_waited() -> None:
    engine = sim(fast_profile(step_s=0.02), num_blocks=64)
    t0 = time.perf_counter()
    run(engine, "a", list(range(100, 120)), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    elapsed = time.perf_counter() - t0
    assert engine.runner.num_steps == 5 and engine.runner.modeled_s == pytest.approx(0.1)
    assert elapsed >= 0.1


def test_tokens_are_deterministic_on_every_path() -> None:
    prompt = list(range(200, 237))
    # The sim's rule, written out here rather than taken from engine/sim.py: after token t at index
    # i-1 comes (t * 1103515245 + i * 12345 + 7) mod vocab (49152), moved past EOS (2; not met here).
    seq = list(prompt)
    for _ in range(6):
        seq.append((seq[-1] * 1103515245 + len(seq) * 12345 + 7) % 49152)
    expected = [1216, 44605, 7855, 11122, 46258, 5419]
    assert seq[len(prompt):] == expected
    a = sim(fast_profile(), num_blocks=64)
    assert (a.arch.vocab_size, a.eos_token_ids) == (49152, (2,))
    assert run(a, "a", prompt) == expected
    assert run(a, "b", prompt) == expected  # its prefix cached now
    assert a.block_manager.num_cached_blocks > 0
    assert run(sim(fast_profile(), num_blocks=64), "c", prompt) == expected  # another worker

    # Disaggregated: prefill-only on one engine, then decode from its first token on another.
    p, d = sim(fast_profile(), num_blocks=64), sim(fast_profile(), num_blocks=64)
    first = run(p, "r", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    p.add_request("r2", prompt, GREEDY, prefill_only=True)
    out = []
    while p.has_unfinished():
        out += p.step()
    first_token = out[-1].new_token_ids[0]
    assert first_token == first[0]
    indices = d.add_prefilled("r2", prompt, first_token, GREEDY)
    assert indices is not None
    d.kv_ready("r2", True)
    rest: list[int] = []
    while d.has_unfinished():
        rest += [t for o in d.step() for t in o.new_token_ids]
    assert [first_token, *rest] == expected


def test_sim_tokens_avoid_eos() -> None:
    assert all(sim_token(t, 5, 7, (0, 1, 2)) not in (0, 1, 2) for t in range(50))
