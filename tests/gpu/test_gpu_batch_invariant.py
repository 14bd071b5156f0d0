"""The batch-invariant mode (``EngineConfig.batch_invariant``) on the GPU, bfloat16: greedy requests
run alone and then among other requests that arrive and leave (decode batches of 1 to ~40, CUDA
graphs with padding rows, mixed prefill + decode steps, prompts prefilled whole or in chunks the
load decides) give the same token ids and the same logprobs, bit for bit. Without the mode the same
schedule gives other tokens or logprobs (cuBLAS tiles by the batch, the one-row GEMV, the decode
kernel's split count): the comparison can fail.

A dummy SmolLM2-135M (random weights, 30 layers): flat logits, so near-ties are everywhere and a
changed bit shows up in the logprobs at once, usually in the tokens too."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("triton")

from engine.llm import LLM
from protocol.sampling import SamplingParams

MODEL = "dummy:smollm2-135m"
VOCAB = 49152
PROBES = (("short", 23, 40), ("mid", 190, 32), ("long", 700, 24))  # name, prompt tokens, new tokens
NUM_BACKGROUND = 36
Answer = tuple[list[int], list[float], list[dict[int, float]]]  # tokens, logprobs, top-2 alternatives


def _engine(batch_invariant: bool, budget: int) -> LLM:
    return LLM(MODEL, device="cuda", dtype="bfloat16", kv_cache_bytes=1 << 30, max_num_seqs=48,
               max_num_batched_tokens=budget, max_model_len=2048, batch_invariant=batch_invariant, progress=False)


def _run(llm: LLM, schedule: list[tuple[int, str, list[int], int]]) -> dict[str, Answer]:
    """Requests ``(arrival step, id, prompt, new tokens)`` added when the engine has made that many
    steps; every answer, greedy with top-2 logprobs."""
    engine = llm.engine
    pending = sorted(schedule, key=lambda r: r[0])
    got: dict[str, Answer] = {rid: ([], [], []) for _, rid, _, _ in schedule}
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, rid, prompt, n = pending.pop(0)
            engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                                           logprobs=2))
        for out in engine.step():
            tokens, logprobs, tops = got[out.request_id]
            tokens += out.new_token_ids
            logprobs += [lp.logprob for lp in out.new_logprobs]
            tops += [dict(lp.top) for lp in out.new_logprobs]
        step += 1
    return got


def _probes() -> list[tuple[str, list[int], int]]:
    rng = random.Random(5)
    return [(name, [rng.randrange(3, VOCAB) for _ in range(length)], n) for name, length, n in PROBES]


def _loaded_schedule(probes: list[tuple[str, list[int], int]], seed: int) -> list[tuple[int, str, list[int], int]]:
    """The probes arriving at different moments among background requests of every length that
    arrive and finish all along (batch sizes rise and fall through the CUDA graphs' sizes)."""
    rng = random.Random(seed)
    schedule = [(rng.randrange(0, 12), f"bg{i}", [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 400))],
                 rng.randrange(1, 60)) for i in range(NUM_BACKGROUND)]
    schedule += [(3 + 9 * k, name, prompt, n) for k, (name, prompt, n) in enumerate(probes)]
    return schedule


def _alone_and_loaded(llm: LLM, seed: int) -> tuple[dict[str, Answer], dict[str, Answer]]:
    probes = _probes()
    alone = {name: _run(llm, [(0, name, prompt, n)])[name] for name, prompt, n in probes}
    loaded = _run(llm, _loaded_schedule(probes, seed))
    return alone, {name: loaded[name] for name, _, _ in probes}


@pytest.fixture(scope="module", params=[2048, 48], ids=["whole-prefill", "chunked-prefill"])
def budget(request: pytest.FixtureRequest) -> Iterator[int]:
    yield request.param


def test_greedy_answers_are_the_same_alone_and_under_load(budget: int) -> None:
    """In the mode: bit-identical tokens, logprobs and top-2 alternatives, whole prompts (a step
    budget of 2048) and prompts cut into chunks by the load (a budget of 48: a probe's chunks have
    other sizes alone than beside decodes)."""
    llm = _engine(True, budget)
    assert llm.engine.runner.graphs is not None  # decode steps replay padded CUDA graphs
    for seed in (1, 2):
        alone, loaded = _alone_and_loaded(llm, seed)
        for name in alone:
            assert loaded[name][0] == alone[name][0], f"{name}: tokens differ under load (seed {seed})"
            assert loaded[name][1] == alone[name][1], f"{name}: logprobs differ under load (seed {seed})"
            assert loaded[name][2] == alone[name][2], f"{name}: top-2 differ under load (seed {seed})"


def test_without_the_mode_the_same_schedule_differs() -> None:
    """The control: the engine's default kernels give other bits under load for the same schedule,
    so the test above would see a batch-dependent kernel."""
    llm = _engine(False, 2048)
    alone, loaded = _alone_and_loaded(llm, 1)
    differ = [name for name in alone if loaded[name][:2] != alone[name][:2]]
    assert differ, "no probe changed under load without the mode: the mode's test could not fail here"
    print(f"\nwithout the mode, under load: {differ} differ from alone")


def test_the_mode_stays_within_bfloat16_noise_of_the_default_kernels() -> None:
    """The mode is a different order of the same sums: in bfloat16 its logprobs stay within
    bfloat16's noise of the default kernels' (first token of each probe: same prompt, no history)."""
    probes = _probes()
    firsts = {}
    for mode in (False, True):
        llm = _engine(mode, 2048)
        firsts[mode] = {name: _run(llm, [(0, name, prompt, 1)])[name] for name, prompt, _ in probes}
        del llm
        torch.cuda.empty_cache()
    for name in firsts[True]:
        a, b = firsts[False][name][2][0], firsts[True][name][2][0]
        common = set(a) & set(b)
        assert common, (a, b)
        assert max(abs(a[t] - b[t]) for t in common) < 0.1, (name, a, b)
