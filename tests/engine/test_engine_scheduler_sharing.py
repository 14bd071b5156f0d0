"""The scheduler (block manager, no model) where requests share: seats with prefilled requests
whose KV is pulled while every seat is taken (waiting for a seat with its KV, not recomputed),
and blocks with prompts that share a prefix an earlier prompt is still computing (held back a
step, then taken from the cache)."""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.plan import SampledToken, SchedulerOutput
from engine.request import Request, RequestStatus
from engine.scheduler import SHARED_PREFIX_MIN_TOKENS, Scheduler
from protocol.sampling import SamplingParams

BS = 4


def make(num_blocks: int = 64, share_prefixes: bool = True, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, BS), share_prefixes)


def req(rid: str, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))


def prompt(base: int, n: int) -> list[int]:
    return list(range(base, base + n))


def handed(rid: str, base: int, n: int, max_tokens: int = 4) -> Request:
    r = req(rid, prompt(base, n), max_tokens)
    r.append_token(5)  # its first token, sampled where it was prefilled
    return r


def plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]


def step(sched: Scheduler) -> SchedulerOutput:
    out = sched.schedule()
    sched.update_from_output(out, {r.request_id: [SampledToken(7)] for r, _ in out.sample_rows})
    return out


def drain(sched: Scheduler) -> None:
    for _ in range(100):
        if not sched.has_unfinished():
            bm = sched.block_manager
            assert bm.num_free_blocks == bm.num_blocks and not sched.kv_waiting and not sched.waiting
            return
        step(sched)
    raise AssertionError("the scheduler did not drain")


def seat_two(sched: Scheduler) -> None:
    for rid, base in (("a", 100), ("b", 200)):
        sched.add_request(req(rid, prompt(base, 6), max_tokens=6))
    step(sched)


def test_a_handoff_with_every_seat_taken_is_pulled_and_waits_for_a_seat_in_turn() -> None:
    sched = make(max_num_seqs=2)
    seat_two(sched)
    c = handed("c", 300, 10)
    assert sched.add_prefilled(c) == [0, 1, 2]  # pulled, not recomputed: every prompt block
    sched.kv_ready("c", True)
    assert sched.kv_waiting == {"c": c} and c.status is RequestStatus.WAITING and sched.stats.num_kv_waiting == 1
    sched.add_request(req("late", prompt(400, 6)))  # a local prompt queued after c landed
    assert sched.num_queued_prefill_tokens == 6  # late's; c has nothing to prefill
    while "c" in sched.kv_waiting:
        out = step(sched)
        assert "c" not in sched.kv_waiting or "late" not in [rid for rid, _ in plan(out)]  # c first
    assert plan(out) == [("c", 1), ("late", 6)] and out.joined == ["c"]  # its first decode, no prefill
    assert c.num_cached_tokens == 0 and c.output_token_ids[:2] == [5, 7]
    drain(sched)
    assert sched.stats.num_preemptions == 0


def test_a_kv_waiting_or_landing_request_aborted_frees_its_blocks() -> None:
    sched = make(max_num_seqs=2)
    seat_two(sched)
    sched.add_prefilled(handed("held", 300, 10))
    sched.kv_ready("held", True)
    sched.add_prefilled(handed("landing", 500, 10))
    used = sched.block_manager.num_used_blocks
    sched.abort("held")
    assert not sched.kv_waiting and sched.block_manager.num_used_blocks == used - 3
    sched.abort("landing")  # its pull may still write: its blocks wait for its kv_ready
    assert sched.block_manager.num_used_blocks == used - 3
    sched.kv_ready("landing", True)
    assert sched.block_manager.num_used_blocks == used - 6
    drain(sched)


def test_a_seatless_pull_leaves_the_running_requests_a_reserve() -> None:
    """20 blocks: a, b hold 2 each; a pull of 3 blocks without a seat must leave one per request
    decoding (a, b, KV-waiting c, d itself) and 1% (0): c fits, then d of 10 blocks does not (the seated
    pull of the same size would)."""
    sched = make(num_blocks=20, max_num_seqs=2)
    seat_two(sched)
    assert sched.add_prefilled(handed("c", 300, 10)) is not None
    sched.kv_ready("c", True)
    assert sched.block_manager.num_free_blocks == 13
    d = handed("d", 500, 40)  # 10 blocks: 13 - 10 < 4
    assert sched.add_prefilled(d) is None and d in sched.waiting  # recomputed in its turn
    drain(sched)


def test_a_running_request_takes_a_kv_waiting_requests_blocks_before_preempting() -> None:
    sched = make(num_blocks=7, max_num_seqs=1)
    sched.add_request(req("a", prompt(100, 7), max_tokens=12))  # 2 blocks, grows to 5
    step(sched)
    c = handed("c", 300, 11)  # 3 blocks: 7 - 2 - 3 leaves the reserve (a, c)
    assert sched.add_prefilled(c) is not None
    sched.kv_ready("c", True)
    while "c" in sched.kv_waiting:
        step(sched)
    assert sched.stats.num_preemptions == 1 and c.status is RequestStatus.WAITING  # gave its KV up
    assert not sched.block_manager.has_request("c") and c.num_computed_tokens == 0
    drain(sched)
    assert c.output_token_ids[0] == 5 and len(c.output_token_ids) == 4  # recomputed from its first token
    assert sched.stats.num_preemptions == 1  # a was never preempted


def test_a_waiting_prompt_ahead_takes_a_kv_waiting_requests_blocks() -> None:
    """FCFS for blocks too: a local prompt queued before the KV-waiting request gets its blocks, even
    with nothing running that could free any (no deadlock)."""
    sched = make(num_blocks=10, max_num_seqs=1)
    sched.add_request(req("a", prompt(100, 3), max_tokens=2))
    step(sched)
    sched.add_request(req("big", prompt(200, 30)))  # 8 blocks: waits behind a's seat
    assert sched.add_prefilled(handed("c", 300, 10)) is not None
    sched.kv_ready("c", True)
    assert list(sched.kv_waiting) == ["c"]
    drain(sched)  # big takes c's blocks (7 free); c recomputes after it
    assert sched.stats.num_preemptions == 1


def test_same_prefix_prompts_together_compute_the_prefix_once() -> None:
    shared = prompt(1000, 2 * SHARED_PREFIX_MIN_TOKENS)
    sched = make(num_blocks=256, max_num_batched_tokens=1024)
    for rid, suffix in (("a", 10), ("b", 20), ("c", 30)):
        sched.add_request(req(rid, shared + prompt(3000 + 100 * suffix, suffix)))
    sched.add_request(req("other", prompt(5000, 40)))  # distinct, behind b and c: not held back
    assert plan(step(sched)) == [("a", 138), ("other", 40)]
    assert plan(step(sched)) == [("a", 1), ("other", 1), ("b", 20), ("c", 30)]  # prefix from the cache
    assert sched.stats.num_cached_tokens == 2 * len(shared) and sched.stats.num_prefix_holds == 2
    drain(sched)

    baseline = make(num_blocks=256, max_num_batched_tokens=1024, share_prefixes=False)
    baseline.add_request(req("a", shared + prompt(4000, 10)))
    baseline.add_request(req("b", shared + prompt(5000, 20)))
    assert plan(step(baseline)) == [("a", 138), ("b", 148)]  # the prefix twice
    assert baseline.stats.num_cached_tokens == 0


def test_a_prompt_waits_for_the_last_chunk_of_a_long_shared_prefix() -> None:
    """b's shared blocks are in a's last chunk (a started two steps before): b waits a step rather
    than compute them itself with the budget left."""
    shared = prompt(1000, 288)
    sched = make(num_blocks=256, max_num_batched_tokens=100)
    sched.add_request(req("a", [*shared, 1, 2]))
    sched.add_request(req("b", [*shared, 3, 4, 5]))
    assert plan(step(sched)) == [("a", 100)]
    assert plan(step(sched)) == [("a", 100)]
    assert plan(step(sched)) == [("a", 90)] and sched.stats.num_prefix_holds == 1
    assert plan(step(sched)) == [("a", 1), ("b", 3)]
    drain(sched)


def test_a_short_shared_prefix_holds_nothing_back() -> None:
    """A few shared blocks (a chat template's) are not worth a step's wait: both prompts go in."""
    shared = prompt(1000, SHARED_PREFIX_MIN_TOKENS - BS)
    sched = make(num_blocks=256, max_num_batched_tokens=1024)
    sched.add_request(req("a", shared + prompt(3000, 30)))
    sched.add_request(req("b", shared + prompt(4000, 30)))
    assert [rid for rid, _ in plan(step(sched))] == ["a", "b"]
    assert sched.stats.num_prefix_holds == 0
    drain(sched)


def test_a_held_prompt_keeps_its_seat() -> None:
    shared = prompt(1000, 2 * SHARED_PREFIX_MIN_TOKENS)
    sched = make(num_blocks=256, max_num_batched_tokens=1024, max_num_seqs=2)
    sched.add_request(req("a", [*shared, 1]))
    sched.add_request(req("b", [*shared, 2]))
    sched.add_request(req("other", prompt(5000, 8)))  # no seat this step: b holds it
    assert plan(step(sched)) == [("a", 129)]
    assert plan(step(sched)) == [("a", 1), ("b", 1)]
    drain(sched)
