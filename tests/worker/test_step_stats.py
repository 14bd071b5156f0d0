"""A worker's step summary (``worker.step_stats.StepWindow``): the engine's totals differenced
between two samples, hand-computed."""

from __future__ import annotations

from protocol.load import EngineLoad
from runtime.pb import tandem_control_pb2 as cpb
from runtime.pb import tandem_worker_pb2 as wpb
from worker.step_stats import StepWindow


def test_a_window_is_the_difference_of_the_engines_totals() -> None:
    loads = [EngineLoad(num_steps=10, step_time_s=1.0, num_step_prefill_tokens=500, num_step_decode_tokens=40,
                        num_step_kv_tokens=4000, num_prompt_tokens=500, num_cached_tokens=100),
             EngineLoad(num_steps=30, step_time_s=1.8, num_step_prefill_tokens=700, num_step_decode_tokens=200,
                        num_step_kv_tokens=24000, num_prompt_tokens=700, num_cached_tokens=150, num_running=8,
                        num_waiting=1, num_pulling=2, num_active_blocks=50, kv_usage=0.25)]
    clock = iter([0.0, 2.0, 3.0])
    role = ["decode"]
    window = StepWindow("d0", 16, lambda: loads[0], lambda: role[0], lambda: "switching", lambda: next(clock))
    loads.pop(0)
    msg = window.sample()
    assert (msg.worker_id, msg.role, msg.state) == ("d0", wpb.WORKER_ROLE_DECODE, cpb.WorkerStepStats.STATE_SWITCHING)
    assert (msg.window_s, msg.num_steps, msg.num_running, msg.num_waiting) == (2.0, 20, 8, 3)
    assert msg.num_active_kv_tokens == 50 * 16 and abs(msg.kv_usage - 0.25) < 1e-9
    assert abs(msg.step_s - 0.04) < 1e-9  # 0.8 s over 20 steps
    assert (msg.step_prefill_tokens, msg.step_decode_tokens, msg.step_kv_tokens) == (10.0, 8.0, 1000.0)
    assert (msg.tokens_per_s, msg.decode_tokens_per_s) == (180.0, 80.0)
    assert (msg.num_prompt_tokens, msg.num_cached_tokens) == (200, 50)
    role[0] = "prefill"
    idle = window.sample()  # no step since: no means, the tier it serves now
    assert idle.num_steps == 0 and not idle.HasField("step_s") and idle.role == wpb.WORKER_ROLE_PREFILL
