"""The scheduler with a block manager and no model: token budget, decodes before prefills,
chunked prefill, FCFS and priority order, preemption victims, abort at any point."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.plan import SampledToken, SchedulerOutput
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler
from protocol.outputs import FinishReason
from protocol.sampling import SamplingParams

BS = 4


def make(num_blocks: int = 64, prefix_caching: bool = True, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, BS, prefix_caching))


def req(rid: str, num_prompt: int, max_tokens: int = 8, priority: int = 0, arrival: float = 0.0) -> Request:
    base = 1000 * (sum(map(ord, rid)) % 50)  # distinct prompts: no accidental prefix hits
    return Request(rid, list(range(base, base + num_prompt)),
                   SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                   priority=priority, arrival_time=arrival)


def plan(out: SchedulerOutput) -> list[tuple[str, int, bool]]:
    return [(s.request.request_id, s.num_new_tokens, s.sample) for s in out.scheduled]


def step(sched: Scheduler, token: int = 7) -> SchedulerOutput:
    """schedule -> (a model would run here) -> update with ``token`` sampled for every row."""
    out = sched.schedule()
    assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
    sched.update_from_output(out, {r.request_id: [SampledToken(token)] for r, _ in out.sample_rows})
    return out


def drain(sched: Scheduler, max_steps: int = 200) -> list[str]:
    """Step until nothing is left; returns request ids in the order they finished."""
    finished: list[str] = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return finished
        out = sched.schedule()
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        updated = sched.update_from_output(out, {r.request_id: [SampledToken(7)] for r, _ in out.sample_rows})
        finished += [r.request_id for r in updated if r.is_finished]
    raise AssertionError("the scheduler did not drain")


def assert_all_free(sched: Scheduler) -> None:
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.ref_counts == [0] * bm.num_blocks
    assert not sched.running and not sched.waiting and not sched.has_unfinished()


def test_budget_chunking_and_decodes_first() -> None:
    sched = make(max_num_batched_tokens=16)
    for r in (req("a", 10), req("b", 10), req("c", 30)):
        sched.add_request(r)
    assert plan(step(sched)) == [("a", 10, True), ("b", 6, False)]
    # running first (a's decode, b's last chunk), then c's first chunk in what is left
    assert plan(step(sched)) == [("a", 1, True), ("b", 4, True), ("c", 11, False)]
    assert plan(step(sched)) == [("a", 1, True), ("b", 1, True), ("c", 14, False)]
    assert plan(step(sched)) == [("a", 1, True), ("b", 1, True), ("c", 5, True)]
    a, b, c = (sched.requests[r] for r in "abc")
    assert (a.num_output_tokens, b.num_output_tokens, c.num_output_tokens) == (4, 3, 1)
    assert (a.num_computed_tokens, b.num_computed_tokens, c.num_computed_tokens) == (13, 12, 30)
    assert plan(step(sched)) == [("a", 1, True), ("b", 1, True), ("c", 1, True)]
    drain(sched)
    assert_all_free(sched)


def test_new_prefill_waits_behind_decodes() -> None:
    sched = make(max_num_batched_tokens=16)
    sched.add_request(req("a", 5))
    sched.add_request(req("b", 5))
    step(sched)
    sched.add_request(req("c", 40))
    out = step(sched)
    assert plan(out) == [("a", 1, True), ("b", 1, True), ("c", 14, False)]
    assert [r.request_id for r, _ in out.sample_rows] == ["a", "b"]


def test_without_chunking_a_prompt_waits_for_a_whole_budget() -> None:
    sched = make(max_num_batched_tokens=16, enable_chunked_prefill=False)
    sched.add_request(req("a", 10))
    sched.add_request(req("b", 10))
    assert plan(step(sched)) == [("a", 10, True)]
    assert plan(step(sched)) == [("a", 1, True), ("b", 10, True)]
    drain(sched)
    assert_all_free(sched)


def test_max_num_seqs() -> None:
    sched = make(max_num_seqs=2)
    for rid in "abc":
        sched.add_request(req(rid, 4, max_tokens=3))
    assert [s[0] for s in plan(step(sched))] == ["a", "b"]
    assert [s[0] for s in plan(step(sched))] == ["a", "b"]
    assert drain(sched) == ["a", "b", "c"]


@pytest.mark.parametrize(("policy", "expected"),
                         [("fcfs", ["a", "b", "c", "d"]), ("priority", ["b", "d", "c", "a"])])
def test_admission_order(policy: str, expected: list[str]) -> None:
    sched = make(max_num_seqs=1, policy=policy)
    # priority: lower first, then earlier arrival
    for rid, prio, arrival in (("a", 2, 0.0), ("b", 0, 1.0), ("c", 1, 2.0), ("d", 0, 3.0)):
        sched.add_request(req(rid, 4, max_tokens=1, priority=prio, arrival=arrival))
    assert drain(sched) == expected


def three_full_requests(policy: str, priorities: tuple[int, int, int]) -> Scheduler:
    """Three 8-token prompts fill all 6 blocks of 4; their first decode needs a 7th block."""
    sched = make(num_blocks=6, policy=policy)
    for i, rid in enumerate("abc"):
        sched.add_request(req(rid, 8, priority=priorities[i], arrival=float(i)))
    admitted = "abc" if policy == "fcfs" else "bca"  # priority: 0 (b), 1 (c), 5 (a)
    assert plan(step(sched)) == [(rid, 8, True) for rid in admitted]
    assert sched.block_manager.num_free_blocks == 0
    return sched


def test_preemption_fcfs_picks_the_latest() -> None:
    sched = three_full_requests("fcfs", (0, 0, 0))
    out = step(sched)
    assert [r.request_id for r in out.preempted] == ["c"]
    assert plan(out) == [("a", 1, True), ("b", 1, True)]
    c = sched.requests["c"]
    assert c.status is RequestStatus.WAITING and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert c.num_output_tokens == 1  # kept: it is recomputed with the prompt
    assert not sched.block_manager.has_request("c")
    assert sched.waiting[0] is c
    assert sched.stats.num_preemptions == 1
    drain(sched)
    assert_all_free(sched)
    assert c.num_output_tokens == 8 and c.finish_reason is FinishReason.LENGTH


def test_preemption_priority_picks_the_lowest_priority() -> None:
    # a has the largest value (lowest priority): it is preempted, though it arrived first.
    sched = three_full_requests("priority", (5, 0, 1))
    out = step(sched)
    assert [r.request_id for r in out.preempted] == ["a"]
    assert plan(out) == [("b", 1, True), ("c", 1, True)]
    assert sched.requests["a"].status is RequestStatus.WAITING
    drain(sched)
    assert_all_free(sched)


def test_preemption_priority_victim_may_be_the_request_itself() -> None:
    sched = make(num_blocks=6, policy="priority")
    sched.add_request(req("low", 7, priority=5, arrival=0.0))
    step(sched)  # low runs alone first: 2 blocks, 8 tokens
    sched.add_request(req("b", 8, arrival=1.0))
    sched.add_request(req("c", 8, arrival=2.0))
    assert plan(step(sched)) == [("low", 1, True), ("b", 8, True), ("c", 8, True)]
    # low is first in line for a new block and has the lowest priority: it makes room itself.
    out = step(sched)
    assert [r.request_id for r in out.preempted] == ["low"]
    assert plan(out) == [("b", 1, True), ("c", 1, True)]
    drain(sched)
    assert_all_free(sched)


def test_preemption_returns_budget_of_an_already_scheduled_victim() -> None:
    # a (prompt 3) and b (prompt 13) decode; b needs a new block with none free: c, scheduled
    # earlier in the same step, is the latest admitted and is preempted, giving back its tokens.
    sched = make(num_blocks=6, max_num_batched_tokens=64)
    sched.add_request(req("a", 3, arrival=0.0))
    sched.add_request(req("b", 12, arrival=1.0))
    sched.add_request(req("c", 8, arrival=2.0))
    step(sched)  # a: 1 block, b: 3 blocks (13 tokens next), c: 2 blocks
    assert sched.block_manager.num_free_blocks == 0
    out = step(sched)
    assert [r.request_id for r in out.preempted] == ["c"]
    assert [s[0] for s in plan(out)] == ["a", "b"]
    assert out.num_batched_tokens == 2
    drain(sched)
    assert_all_free(sched)


def test_abort_at_any_point_frees_everything() -> None:
    sched = make(num_blocks=12, max_num_batched_tokens=16)
    for r in (req("decoding", 6), req("chunked", 30), req("waiting", 4)):
        sched.add_request(r)
    step(sched)  # decoding: prefilled; chunked: 10 of 30 computed; waiting: not admitted
    bm = sched.block_manager
    assert sched.requests["chunked"].num_computed_tokens == 10
    assert sched.requests["waiting"].status is RequestStatus.WAITING
    assert bm.block_table("chunked") and bm.block_table("decoding")

    waiting = sched.abort("waiting")
    assert waiting is not None and waiting.finish_reason is FinishReason.ABORT
    assert waiting not in sched.waiting
    chunked = sched.abort("chunked")
    assert chunked is not None and not bm.has_request("chunked")
    assert sched.abort("chunked") is None  # unknown now: ignored
    assert sched.abort("never-added") is None

    # Abort between schedule() and update_from_output(): the result for it is dropped.
    out = sched.schedule()
    assert plan(out) == [("decoding", 1, True)]
    sched.abort("decoding")
    assert sched.update_from_output(out, {"decoding": [SampledToken(7)]}) == []
    assert sched.requests == {}
    assert_all_free(sched)


def test_abort_preempted_request() -> None:
    sched = three_full_requests("fcfs", (0, 0, 0))
    step(sched)
    c = sched.abort("c")  # preempted, back in the waiting queue, no blocks
    assert c is not None and c.is_finished
    for rid in ("a", "b"):
        sched.abort(rid)
    assert_all_free(sched)


def test_abort_parent_of_n_before_fork() -> None:
    sched = make(num_blocks=12, max_num_batched_tokens=8)
    parent = req("p", 20)
    children = [Request(f"p#{i}", parent.prompt_token_ids, parent.sampling, parent=parent) for i in (1, 2)]
    parent.children.extend(children)
    sched.add_request(parent)
    assert set(sched.requests) == {"p", "p#1", "p#2"}
    step(sched)  # 8 of 20 prompt tokens
    sched.abort("p")
    assert sched.requests == {}
    assert all(r.finish_reason is FinishReason.ABORT for r in (parent, *children))
    assert_all_free(sched)


def test_n_children_fork_from_parent_row() -> None:
    sched = make(num_blocks=12)
    parent = req("p", 10, max_tokens=3)
    children = [Request(f"p#{i}", parent.prompt_token_ids, parent.sampling, parent=parent) for i in (1, 2)]
    parent.children.extend(children)
    sched.add_request(parent)
    out = sched.schedule()
    assert plan(out) == [("p", 10, True)]
    assert [(r.request_id, k) for r, k in out.sample_rows] == [("p", 0), ("p#1", 0), ("p#2", 0)]
    sched.update_from_output(out, {"p": [SampledToken(5)], "p#1": [SampledToken(6)], "p#2": [SampledToken(7)]})
    bm = sched.block_manager
    assert bm.block_table("p") == [0, 1, 2]
    assert bm.block_table("p#1") == [0, 1, 3] and bm.block_table("p#2") == [0, 1, 4]
    assert bm.ref_counts[:5] == [3, 3, 1, 1, 1]
    assert [c.output_token_ids for c in (parent, *children)] == [[5], [6], [7]]
    out = sched.schedule()
    assert out.block_copies == [(2, 3), (2, 4)]  # the partial prompt block, before the forward pass
    assert plan(out) == [("p", 1, True), ("p#1", 1, True), ("p#2", 1, True)]
    sched.update_from_output(out, {rid: [SampledToken(8)] for rid in ("p", "p#1", "p#2")})
    drain(sched)
    assert_all_free(sched)


def test_duplicate_request_id() -> None:
    sched = make()
    sched.add_request(req("a", 4))
    with pytest.raises(ValueError, match="duplicate"):
        sched.add_request(req("a", 4))


def test_a_step_may_sample_several_tokens_per_request() -> None:
    """The seam speculative decoding needs: the tokens a step sampled for a request are appended
    in order, up to the first that finishes it (the rest are dropped)."""
    sched = make()
    sched.add_request(req("a", 6, max_tokens=3))
    eos = Request("b", list(range(500, 506)), SamplingParams(temperature=0.0, max_tokens=8), eos_token_ids=(2,))
    sched.add_request(eos)
    out = sched.schedule()
    updated = sched.update_from_output(out, {"a": [SampledToken(t) for t in (11, 12)],
                                             "b": [SampledToken(t) for t in (21, 2, 23)]})
    a = next(r for r in updated if r.request_id == "a")
    assert a.output_token_ids == [11, 12] and not a.is_finished
    assert eos.output_token_ids == [21, 2] and eos.finish_reason is FinishReason.STOP  # 23 came after EOS
    out = sched.schedule()
    (updated_a,) = sched.update_from_output(out, {"a": [SampledToken(t) for t in (13, 14, 15)]})
    assert updated_a.output_token_ids == [11, 12, 13] and updated_a.finish_reason is FinishReason.LENGTH
    assert_all_free(sched)


def test_prompt_chunks_are_capped_while_prefilled_requests_join() -> None:
    """``joining_prefill_tokens``: while a prefilled request's KV is on its way (pulling) or landed
    and not yet decoded (joining), a step computes at most that many prompt tokens; decodes are not
    capped; the landed request's first decode is reported in ``joined`` once; then full chunks again."""
    sched = make(max_num_batched_tokens=32, joining_prefill_tokens=8)
    sched.add_request(req("local", 60))
    assert plan(step(sched)) == [("local", 32, False)]  # nothing joining: the whole budget
    handed = req("handed", 10)
    handed.append_token(5)  # its first token, sampled where it was prefilled
    assert sched.add_prefilled(handed) is not None
    out = step(sched)
    assert plan(out) == [("local", 8, False)] and out.joined == []  # its KV is on its way
    sched.kv_ready("handed", True)
    out = step(sched)
    assert plan(out) == [("local", 8, False), ("handed", 1, True)] and out.joined == ["handed"]
    assert plan(step(sched)) == [("local", 12, True), ("handed", 1, True)]  # joined: full chunks again
    drain(sched)
    assert_all_free(sched)
