"""A sequence's queue wait and prefill time ride on its first output with tokens
(``RequestOutput.queue_wait_s``/``prefill_s``: what the workers' histograms observe), measured on
the engine's clock: a request queued behind another waits for it; a prefill takes its steps."""

from __future__ import annotations

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.sim import COEFFICIENTS, SimProfile
from protocol.sampling import SamplingParams

STEP_S = 0.02


def test_queue_wait_and_prefill_time_on_the_first_output() -> None:
    engine = LLMEngine(EngineConfig(model="dummy:smollm2-135m", backend="sim", cache=CacheConfig(block_size=4),
                                    scheduler=SchedulerConfig(max_num_seqs=1)), progress=False)
    engine.runner.profile = SimProfile("test", **{k: STEP_S if k == "step_s" else 0.0 for k in COEFFICIENTS})
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    engine.add_request("first", list(range(100, 140)), params)
    engine.add_request("second", list(range(200, 240)), params)  # waits: one sequence at a time
    outputs: dict[str, list] = {"first": [], "second": []}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    for rid, outs in outputs.items():
        with_tokens = [o for o in outs if o.new_token_ids]
        first, rest = with_tokens[0], with_tokens[1:]
        assert first.queue_wait_s is not None and first.prefill_s is not None, rid
        assert all(o.queue_wait_s is None and o.prefill_s is None for o in rest), rid
        assert first.prefill_s >= STEP_S * 0.9, (rid, first.prefill_s)  # its one prefill step
    assert outputs["first"][0].queue_wait_s < STEP_S
    # the second waited for the first's 5 steps
    assert outputs["second"][0].queue_wait_s >= 5 * STEP_S * 0.9, outputs["second"][0].queue_wait_s
