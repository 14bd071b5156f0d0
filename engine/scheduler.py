"""Continuous batching: ``schedule()`` returns a plan, the runner executes it, and
``update_from_output()`` applies the sampled tokens.

Every step fills a token budget: running requests first (decodes and unfinished prefill
chunks, in admission order), then waiting requests (FCFS or priority), whose prompts are
chunked to fit when chunked prefill is on. When a running request cannot get a block, the
latest-admitted (or lowest-priority) running request is preempted: its blocks are freed and
it is recomputed later (its full blocks usually come back from the prefix cache).

A prompt handed off by another worker (``add_prefilled``) has its KV pulled into blocks here
whenever they fit, also with every seat taken: then it waits in ``waiting`` with its KV held
(``kv_waiting``) and takes a seat in its turn with a decode, no prefill. Only with no room for its KV
is it recomputed here. A KV-waiting request gives its blocks back (and will recompute) before a running
request is preempted, and to a waiting request ahead of it; pulls without a seat leave a reserve
of free blocks for the running requests' growth (``_kv_reserve``).

Prompts that share a prefix not cached yet: a waiting prompt whose next uncached blocks (at least
``SHARED_PREFIX_MIN_TOKENS`` tokens of them) are being computed by an earlier request, in this step
or a later chunk, is held back, keeping its seat, until those blocks are cached; it then takes them
from the prefix cache instead of computing them a second time beside the first. The requests
behind it go on meanwhile (SGLang's in-batch prefix caching deprioritizes such requests the same
way).

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

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.plan import SampledTokens, ScheduledRequest, SchedulerOutput
from engine.request import Request, RequestStatus
from protocol.hashing import hash_blocks
from protocol.outputs import FinishReason

# A waiting prompt is held back for blocks an earlier request is computing when at least this many
# of its next tokens are in them: fewer (a chat template's first block) are not worth a step's wait.
SHARED_PREFIX_MIN_TOKENS = 64


@dataclass
class SchedulerStats:
    num_prompt_tokens: int = 0  # prompt tokens of requests admitted for the first time
    num_cached_tokens: int = 0  # of those, served from the prefix cache
    num_preemptions: int = 0  # running requests preempted, and KV-waiting requests that gave their KV up
    num_kv_waiting: int = 0  # prefilled requests whose KV landed with every seat taken (kept, not recomputed)
    num_prefix_holds: int = 0  # a waiting prompt held back a step for a shared prefix being computed


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, share_prefixes: bool = True) -> None:
        self.config = config
        self.block_manager = block_manager
        # Hold back prompts whose next blocks an earlier request is computing (False: compute them
        # twice, as bench/shared_prefix.py's baseline does). Only with prefix caching.
        self.share_prefixes = share_prefixes
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
        # Prefilled requests whose KV landed with every seat taken: in ``waiting`` with their blocks
        # held, computed up to their first token; a seat costs them a decode. In landing order.
        self.kv_waiting: dict[str, Request] = {}

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
        be pulled into this request's table, or None when there is no room for its KV: the
        request was then queued to recompute its prompt locally. With every seat taken (by the
        running and the landing requests) its KV is pulled all the same when it fits beside
        :meth:`_kv_reserve`; it then waits for a seat with its KV held (``kv_waiting``)."""
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        bm = self.block_manager
        self.requests[request.request_id] = request
        # Every whole prompt block may come from the cache (the first token, known or not, is the
        # one left uncovered; its value does not matter to the match).
        cached = bm.match_prefix([*request.prompt_token_ids, 0])
        num_prompt = request.num_prompt_tokens
        seatless = len(self.running) + len(self.pulling) >= self.config.max_num_seqs
        reserve = self._kv_reserve() if seatless else 0
        if bm.allocate(request.request_id, num_prompt, cached, reserve) is None:
            self.waiting.append(request)
            return None
        request.num_cached_tokens = len(cached) * bm.block_size
        self.stats.num_prompt_tokens += num_prompt
        self.stats.num_cached_tokens += request.num_cached_tokens
        self.pulling[request.request_id] = request
        return list(range(len(cached), -(-num_prompt // bm.block_size)))

    def _kv_reserve(self) -> int:
        """Free blocks a pull without a seat leaves: one for the next block of each request that
        decodes here or will (running, landing, KV-waiting, this one), and 1% of the cache."""
        return len(self.running) + len(self.pulling) + len(self.kv_waiting) + 1 + self.block_manager.num_blocks // 100

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
            if len(self.running) < self.config.max_num_seqs and not self.kv_waiting:
                self._seat(request)
            else:  # every seat taken: it waits for one in turn, its KV held
                self.kv_waiting[request_id] = request
                self.waiting.append(request)
                self.stats.num_kv_waiting += 1
        else:
            self.block_manager.free(request_id)
            request.num_computed_tokens = 0
            self.waiting.append(request)

    # ---- planning ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        # Prompt tokens (chunks of running prompts, new prompts): capped while prefilled requests join.
        prefill_budget = cfg.joining_prefill_tokens if (
            cfg.joining_prefill_tokens and cfg.enable_chunked_prefill and (self.pulling or self.joining)) else budget
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        budget, prefill_budget = self._schedule_running(scheduled, preempted, budget, prefill_budget)
        if not preempted:
            self._schedule_waiting(scheduled, budget, prefill_budget)

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

    def _schedule_running(self, scheduled: list[ScheduledRequest], preempted: list[Request], budget: int,
                          prefill_budget: int) -> tuple[int, int]:
        """Plan the running requests in admission order (decodes, prompt chunks); a request without
        a block takes a KV-waiting request's, else preempts the latest running one. Returns the
        budgets left."""
        cfg = self.config
        bm = self.block_manager
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
                if self._drop_latest_kv_waiting():
                    continue  # a KV-waiting request's KV goes before a running request's
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
        return budget, prefill_budget

    def _schedule_waiting(self, scheduled: list[ScheduledRequest], budget: int, prefill_budget: int) -> None:
        """Admit waiting requests in turn (FCFS or priority) while seats, the budget and blocks
        last. A KV-waiting request takes its seat with a decode. A prompt whose next uncached blocks an
        earlier request is computing is held back (keeping its seat); those behind it go on."""
        cfg, bm = self.config, self.block_manager
        inflight = _BlocksInFlight(self) if self.share_prefixes and bm.enable_prefix_caching else None
        # As many as there are free seats: each takes one, or keeps it while held back.
        for request in self._waiting_order(cfg.max_num_seqs - len(self.running)):
            if budget <= 0:
                break
            if request.request_id in self.kv_waiting:
                if not self._allocate_waiting(request, request.num_tokens):
                    break
                self.waiting.remove(request)
                del self.kv_waiting[request.request_id]
                self._seat(request)
                scheduled.append(ScheduledRequest(request, 1, True))
                budget -= 1
                continue
            if prefill_budget <= 0:
                break
            cached = bm.match_prefix(request.token_ids)
            if inflight is not None and inflight.num_shared(request, len(cached)) * bm.block_size >= \
                    SHARED_PREFIX_MIN_TOKENS:
                self.stats.num_prefix_holds += 1
                continue
            num_cached = len(cached) * bm.block_size
            num_new = request.num_tokens - num_cached
            if num_new > min(budget, prefill_budget):
                if not cfg.enable_chunked_prefill:
                    break
                num_new = min(budget, prefill_budget)
            if not self._allocate_waiting(request, num_cached + num_new, cached):
                break
            self._start(request, num_cached)
            if inflight is not None:
                inflight.add(request)
            scheduled.append(ScheduledRequest(request, num_new, self._samples(request, num_new)))
            budget -= num_new
            prefill_budget -= num_new

    def _waiting_order(self, limit: int) -> list[Request]:
        """The first ``limit`` waiting requests in the order they are admitted."""
        if limit <= 0:
            return []
        if self.config.policy == "priority":
            return heapq.nsmallest(limit, self.waiting, key=lambda r: (r.priority, r.arrival_time))
        return list(itertools.islice(self.waiting, limit))

    def _allocate_waiting(self, request: Request, num_tokens: int, cached: list[int] | None = None) -> bool:
        """Blocks for a waiting request's next tokens; KV-waiting requests (all queued behind it: those
        ahead took their seat) give theirs up for it, the latest first. Whether it got them."""
        while self.block_manager.allocate(request.request_id, num_tokens, cached or ()) is None:
            if not self._drop_latest_kv_waiting(keep=request):
                return False
        return True

    def _drop_latest_kv_waiting(self, keep: Request | None = None) -> bool:
        """The last KV-waiting request in turn (but ``keep``) frees its blocks: it will recompute its
        prompt and first token in its turn, from the prefix cache while its blocks stay cached.
        Whether there was one."""
        kv_waiting = [r for r in self.kv_waiting.values() if r is not keep]
        if not kv_waiting:
            return False
        if self.config.policy == "priority":
            request = max(kv_waiting, key=lambda r: (r.priority, r.arrival_time))
        else:
            request = kv_waiting[-1]
        del self.kv_waiting[request.request_id]
        self.block_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1  # its prompt was counted in the stats when it was pulled
        self.stats.num_preemptions += 1
        return True

    def _seat(self, request: Request) -> None:
        """A prefilled request whose KV is here takes a seat: its next step decodes its first token."""
        if request.scheduled_time is None:
            request.scheduled_time = time.monotonic()
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self.joining.add(request.request_id)

    def prompt_hashes(self, request: Request) -> list[int]:
        """Chained hashes of the request's full prompt blocks (computed once)."""
        if request.prompt_block_hashes is None:
            request.prompt_block_hashes = hash_blocks(request.prompt_token_ids, self.block_manager.block_size)
        return request.prompt_block_hashes

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
        self.kv_waiting.pop(request.request_id, None)
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


class _BlocksInFlight:
    """The prompt blocks that running requests have yet to compute (and commit), as hashes: built
    when a waiting prompt first asks in a step (a lone prompt is never hashed), then kept up to
    date with the prompts the step admits."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.hashes: set[int] | None = None
        self.admitted: list[Request] = []

    def add(self, request: Request) -> None:
        """A prompt admitted this step (in ``running`` now), computing from its cached blocks on."""
        if self.hashes is not None:
            self.admitted.append(request)

    def num_shared(self, request: Request, num_cached_blocks: int) -> int:
        """How many of the request's prompt blocks after its cached ones are being computed (a
        chain: they stop at the first that is not)."""
        sched = self.scheduler
        bs = sched.block_manager.block_size
        if self.hashes is None:
            self.hashes = set()
            self.admitted = [r for r in sched.running if r.num_computed_tokens + bs <= r.num_prompt_tokens]
        for r in self.admitted:
            self.hashes.update(sched.prompt_hashes(r)[r.num_computed_tokens // bs:])
        self.admitted = []
        if not self.hashes:
            return 0
        hashes = sched.prompt_hashes(request)
        limit = min(len(hashes), (request.num_tokens - 1) // bs)  # match_prefix's
        k = num_cached_blocks
        while k < limit and hashes[k] in self.hashes:
            k += 1
        return k - num_cached_blocks
