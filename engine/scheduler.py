"""Continuous batching: ``schedule()`` returns a plan, the runner executes it, and
``update_from_output()`` applies the sampled tokens.

Every step fills a token budget: running requests first (decodes and unfinished prefill
chunks, in admission order), then waiting requests (FCFS or priority), whose prompts are
chunked to fit when chunked prefill is on. When a running request cannot get a block, the
latest-admitted (or lowest-priority) running request is preempted: its blocks are freed and
it is recomputed later (its full blocks usually come back from the prefix cache).

Asynchronous scheduling (``LLMEngine`` with ``async_scheduling``): step N+1 is planned and
launched before step N's sampled tokens reach the host. ``on_launch(N)`` counts N's tokens as
computed and its sampled tokens as in flight (``Request.num_inflight_tokens``); ``schedule()``
plans a decode of each in-flight token (the runner takes its id from N's tokens on the device),
except where that token is certain to finish the request (``max_tokens``, the context length, a
prefill-only request). ``update_from_output(N)`` then appends the tokens; a request that turns out
finished (EOS, a stop token or string) is finished as in a synchronous step, and the row step N+1
computed for it is dropped when its result comes (its blocks are freed at once: every later use of
them on the device is queued after that row).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.plan import SampledTokens, ScheduledRequest, SchedulerOutput
from engine.request import Request, RequestStatus
from protocol.outputs import FinishReason


@dataclass
class SchedulerStats:
    num_prompt_tokens: int = 0  # prompt tokens of requests admitted for the first time
    num_cached_tokens: int = 0  # of those, served from the prefix cache
    num_preemptions: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self._pending_copies: list[tuple[int, int]] = []
        # Finished prefill-only requests whose blocks stay pinned until unpinned (KV handles).
        self.pinned: dict[str, Request] = {}
        # Requests whose prompt KV is being pulled from another worker into their blocks.
        self.pulling: dict[str, Request] = {}
        # Prefilled requests landed (out of ``pulling``) whose first decode is not planned yet (SchedulerOutput.joined).
        self.joining: set[str] = set()

    # ---- queue management ---------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def has_work(self) -> bool:
        """Whether a step would compute anything (requests waiting on a pull do not count)."""
        return bool(self.waiting or self.running)

    @property
    def num_queued_prefill_tokens(self) -> int:
        """Prompt tokens not yet computed, over waiting and running requests."""
        return sum(r.num_tokens - r.num_computed_tokens for r in (*self.waiting, *self.running)
                   if r.num_tokens - r.num_computed_tokens > 1)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        for child in request.children:
            self.requests[child.request_id] = child
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request wherever it is; its blocks are freed. Unknown ids are ignored."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, FinishReason.ABORT)
        return request

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Finish a request for a reason found above the scheduler (a stop string)."""
        self._finish(request, reason)

    @property
    def num_pinned_blocks(self) -> int:
        return sum(len(self.block_manager.block_table(rid)) for rid in self.pinned)

    def unpin(self, request_id: str) -> bool:
        """Release a prefill-only request's pinned blocks (its KV handle is done or expired)."""
        request = self.pinned.pop(request_id, None)
        if request is None:
            return False
        self.block_manager.free(request_id)
        return True

    def add_prefilled(self, request: Request) -> list[int] | None:
        """Admit a request whose prompt KV was computed elsewhere; ``request.token_ids`` is the
        prompt plus the first token sampled there. Reuses the local prefix cache and allocates
        blocks for the rest of the prompt. Returns the indices of the prompt blocks that must
        be pulled into this request's table, or None when there is no room: the request was
        then queued to recompute its prompt locally."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        bm = self.block_manager
        self.requests[request.request_id] = request
        # Every whole prompt block may come from the cache (the first token, known or not, is the
        # one left uncovered; its value does not matter to the match).
        cached = bm.match_prefix([*request.prompt_token_ids, 0])
        num_prompt = request.num_prompt_tokens
        if len(self.running) >= self.config.max_num_seqs or bm.allocate(request.request_id, num_prompt, cached) is None:
            self.waiting.append(request)
            return None
        request.num_cached_tokens = len(cached) * bm.block_size
        self.stats.num_prompt_tokens += num_prompt
        self.stats.num_cached_tokens += request.num_cached_tokens
        self.pulling[request.request_id] = request
        return list(range(len(cached), -(-num_prompt // bm.block_size)))

    def kv_ready(self, request_id: str, ok: bool, first_token: int | None = None) -> None:
        """The pull for ``add_prefilled`` ended. On success the request decodes from its first
        token (``first_token`` when it was admitted without one); on failure it recomputes its
        prompt here. Blocks of a request aborted during the pull are freed only now, when no
        transfer can write into them any more."""
        request = self.pulling.pop(request_id, None)
        if request is None:
            return
        if request.is_finished:
            self.block_manager.free(request_id)
            return
        if first_token is not None and not request.num_output_tokens:
            request.append_token(first_token)
        if not request.num_output_tokens:
            raise ValueError(f"request {request_id!r} landed without its first token")
        if ok:
            request.num_computed_tokens = request.num_prompt_tokens
            self.block_manager.commit(request_id, request.token_ids, request.num_computed_tokens)
            if request.scheduled_time is None:
                request.scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self.joining.add(request_id)
        else:
            self.block_manager.free(request_id)
            request.num_computed_tokens = 0
            self.waiting.append(request)

    # ---- planning ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        bm = self.block_manager
        budget = cfg.max_num_batched_tokens
        # Prompt tokens (chunks of running prompts, new prompts): capped while prefilled requests join.
        prefill_budget = cfg.joining_prefill_tokens if (
            cfg.joining_prefill_tokens and cfg.enable_chunked_prefill and (self.pulling or self.joining)) else budget
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_inflight_tokens and self._finishes_on_inflight(request):
                i += 1  # its last token is being sampled: nothing more to compute
                continue
            num_new = request.num_tokens + request.num_inflight_tokens - request.num_computed_tokens
            if num_new > budget and not cfg.enable_chunked_prefill and request.num_computed_tokens == 0:
                i += 1
                continue
            num_new = min(num_new, budget)
            if num_new > 1:  # a prompt's chunk
                if prefill_budget <= 0:
                    i += 1
                    continue
                num_new = min(num_new, prefill_budget)
            while bm.allocate(request.request_id, request.num_computed_tokens + num_new) is None:
                victim = self._pick_victim()
                if self.running.index(victim) < i:
                    i -= 1
                self.running.remove(victim)
                for k, s in enumerate(scheduled):
                    if s.request is victim:
                        budget += s.num_new_tokens
                        del scheduled[k]
                        break
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, num_new, self._samples(request, num_new)))
                budget -= num_new
                if num_new > 1:
                    prefill_budget -= num_new
                i += 1

        if not preempted:
            while self.waiting and min(budget, prefill_budget) > 0 and len(self.running) < cfg.max_num_seqs:
                request = self._next_waiting()
                cached = bm.match_prefix(request.token_ids)
                num_cached = len(cached) * bm.block_size
                num_new = request.num_tokens - num_cached
                if num_new > min(budget, prefill_budget):
                    if not cfg.enable_chunked_prefill:
                        break
                    num_new = min(budget, prefill_budget)
                if bm.allocate(request.request_id, num_cached + num_new, cached) is None:
                    break
                self._start(request, num_cached)
                scheduled.append(ScheduledRequest(request, num_new, self._samples(request, num_new)))
                budget -= num_new
                prefill_budget -= num_new

        joined = [s.request.request_id for s in scheduled if s.request.request_id in self.joining]
        self.joining.difference_update(joined)
        sample_rows: list[tuple[Request, int]] = []
        for k, s in enumerate(scheduled):
            if s.sample:
                sample_rows.append((s.request, k))
                if s.request.num_output_tokens + s.request.num_inflight_tokens == 0:
                    sample_rows.extend((child, k) for child in s.request.children)
        copies, self._pending_copies = self._pending_copies, []
        return SchedulerOutput(scheduled, sample_rows, copies, preempted, joined=joined)

    def _start(self, request: Request, num_cached: int) -> None:
        """A waiting request runs from its ``num_cached`` cached prompt tokens (blocks allocated)."""
        self.waiting.remove(request)
        if request.scheduled_time is None:
            request.scheduled_time = time.monotonic()
        if request.num_preemptions == 0:
            request.num_cached_tokens = num_cached
            self.stats.num_prompt_tokens += request.num_prompt_tokens
            self.stats.num_cached_tokens += num_cached
        request.num_computed_tokens = num_cached
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def on_launch(self, output: SchedulerOutput) -> None:
        """The step's forward pass is queued on the device: count its tokens as computed and its
        sampled tokens as in flight. Full blocks of known tokens become findable now (any later
        reader of them is queued after this step)."""
        if output.launched:
            return
        output.launched = True
        bm = self.block_manager
        for s in output.scheduled:
            request = s.request
            if request.is_finished:
                continue
            request.num_computed_tokens += s.num_new_tokens
            s.num_computed_after = request.num_computed_tokens
            bm.commit(request.request_id, request.token_ids, min(request.num_computed_tokens, request.num_tokens))
        for request, _ in output.sample_rows:
            request.num_inflight_tokens += 1

    def update_from_output(self, output: SchedulerOutput, sampled: SampledTokens) -> list[Request]:
        """Append the step's sampled tokens, each request's in order until one finishes it
        (counting the step's tokens as computed first, if ``on_launch`` did not). Returns the
        requests that got new tokens (finished ones included, with ``finish_reason`` set)."""
        self.on_launch(output)
        bm = self.block_manager
        updated: list[Request] = []
        for s in output.scheduled:
            request = s.request
            if request.status is RequestStatus.RUNNING:  # not finished, nor preempted since
                bm.commit(request.request_id, request.token_ids, min(s.num_computed_after, request.num_tokens))
        for request, _ in output.sample_rows:
            request.num_inflight_tokens -= 1
        # Fork n > 1 children before any token is appended: their parent may finish on this
        # very token (max_tokens=1, EOS) and free the blocks they share.
        to_update: list[Request] = []
        for request, _ in output.sample_rows:
            if request.is_finished:
                continue
            if request.parent is not None and request.status is RequestStatus.WAITING:
                # Without a block for its private tail it was queued to prefill by itself; its
                # first token stands (it is recomputed like a preempted request's).
                self._fork(request)
            to_update.append(request)
        for request in to_update:
            for token in sampled[request.request_id]:
                request.append_token(token.token_id)
                if token.logprob is not None:
                    request.logprobs.append(token.logprob)
                reason = request.check_stop_token()
                if reason is not None or request.prefill_only:
                    self._finish(request, reason)  # None: handed off to the decode tier
                    break
            updated.append(request)
        for s in output.scheduled:
            if s.sample:
                s.request.children = []  # forked, or queued to prefill alone
        return updated

    # ---- internals -----------------------------------------------------------------------
    def _samples(self, request: Request, num_new: int) -> bool:
        return request.num_computed_tokens + num_new == request.num_tokens + request.num_inflight_tokens

    @staticmethod
    def _finishes_on_inflight(request: Request) -> bool:
        """Whether the request's in-flight token is certainly its last (EOS and stops aside)."""
        return request.prefill_only or request.num_tokens + request.num_inflight_tokens >= request.max_total_tokens

    def _next_waiting(self) -> Request:
        if self.config.policy == "priority":
            return min(self.waiting, key=lambda r: (r.priority, r.arrival_time))
        return self.waiting[0]

    def _pick_victim(self) -> Request:
        # Never a request whose in-flight token finishes it: its blocks are freed on that token
        # anyway (and a prefill-only request's stay pinned for its KV handle).
        running = [r for r in self.running if not (r.num_inflight_tokens and self._finishes_on_inflight(r))]
        if self.config.policy == "priority":
            return max(running, key=lambda r: (r.priority, r.arrival_time))
        return running[-1]

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(request)

    def _fork(self, child: Request) -> bool:
        """Share the parent's prompt blocks with an n > 1 child that sampled from its row."""
        parent = child.parent
        assert parent is not None
        copies = None
        if self.block_manager.has_request(parent.request_id):  # not preempted since its prefill
            copies = self.block_manager.fork(parent.request_id, child.request_id, parent.num_prompt_tokens)
        if copies is None:
            # Out of blocks: the child prefills by itself later (its prefix is cached).
            child.parent = None
            self.waiting.append(child)
            return False
        self._pending_copies.extend(copies)
        child.parent = None
        child.num_computed_tokens = parent.num_prompt_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        child.status = RequestStatus.RUNNING
        self.running.append(child)
        return True

    def _finish(self, request: Request, reason: FinishReason | None) -> None:
        if request.is_finished:
            return
        self.joining.discard(request.request_id)
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request.prefill_only and reason is None:
            self.pinned[request.request_id] = request
        elif request.request_id not in self.pulling:  # a pull may still write into its blocks
            self.block_manager.free(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.requests.pop(request.request_id, None)
        if reason is FinishReason.ABORT:
            for child in request.children:
                if child.status is RequestStatus.WAITING:
                    self._finish(child, reason)
        elif request.children and request.num_output_tokens == 0:
            # Parent done before forking (cannot happen today); let children prefill alone.
            for child in request.children:
                child.parent = None
                self.waiting.append(child)
        request.children = []
