"""The router's request flow (docs/architecture.md, "A request's life"), independent of the
client protocol: the OpenAI HTTP API and the KServe gRPC API both call :meth:`RequestFlow.generate`
with token ids and sampling parameters and get token deltas back. Text is not handled here
(``router.text_generation`` turns the deltas into text and matches stop strings).

One request: plan (the prompt's block hashes, a decode worker by cost, a prefill worker when the
prompt is prefilled remotely; no I/O), waiting for a prefix still on its way to the worker that
would compute the prompt (:meth:`RequestFlow._route`), then the remote prefill
(:meth:`RequestFlow._prefill`), then the decode with retries (:meth:`RequestFlow._decode`).

Failure handling: a prefill worker that fails makes the request prefill on its decode worker;
a decode worker that fails before it streamed anything is retried on another one; one that
fails mid-stream ends the request with :class:`WorkerFailedError` (the client gets a clean
error). Closing the delta stream (a client disconnect) cancels the worker calls, which abort
the request there and free its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import grpc

from protocol.outputs import FinishReason, StopReason, TokenLogprob
from protocol.sampling import SamplingParams
from router import auth, policy
from router.admission import Admission, AdmissionLimits
from router.errors import InvalidRequestError, NoWorkersError, WorkerFailedError
from router.inflight import Ticket, inflight_to_pb, sum_peers
from router.metrics import (
    DECISION_SECONDS,
    FIRST_TOKENS_HELD,
    KV_AHEAD_GIVEN_UP,
    KV_INDEXED_BLOCKS,
    KV_OVERLAP_BLOCKS,
    PEER_INFLIGHT,
    ROUTE_DECISIONS,
)
from router.request_window import HANDOFFS
from router.tier_index import Landing, TierIndex
from router.watchdog import Patience, Watch, WorkerHungError, watched_call, watched_stream
from router.worker_pool import WorkerPool
from runtime import keys, trace
from runtime.convert import FINISH_FROM_PB, sampling_to_pb
from runtime.etcd import ControlPlane
from runtime.internal_grpc import InternalGrpc
from runtime.pb import tandem_control_pb2 as cpb
from runtime.pb import tandem_worker_pb2 as pb
from runtime.settings import ClusterConfig

log = logging.getLogger("tandem.router")

# How a decode worker ends a call with a handle sent ahead that it refused (it would pull from that
# prefill worker) or that did not land, before any output: then it is called again with the whole handle.
_AHEAD_FAILED = {grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION}
# Past the prefill's answer a call sent ahead has kv_pull_timeout_s (the bound a decode worker puts
# on a whole handle's transfer) plus this for its first message (the push's answer, admission, one
# step); then it is given up and the same worker is called with the whole handle.
_AHEAD_FIRST_GRACE_S = 2.0


@dataclass
class Delta:
    """New tokens of one of the request's sequences."""

    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: FinishReason | None
    stop_reason: StopReason = None


@dataclass
class Usage:
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class Route:
    decode_worker: str = ""
    prefill_worker: str = ""  # empty: prefilled on the decode worker
    recomputed: bool = False  # the KV pull failed and the decode worker prefilled itself
    num_retries: int = 0
    overlap_blocks: int = 0  # leading prompt blocks the worker that prefills holds (per the KV index)
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoutePlan:
    """Where a request goes, decided before any call: its decode worker and, when the prompt is
    prefilled remotely, its prefill worker."""

    hashes: list[int]  # the prompt's chained block hashes (the decode tier's block size)
    decode: policy.Decision
    prefill: policy.Decision | None
    prefill_hashes: list[int] = field(default_factory=list)  # the prefill tier's, when prefilled remotely


@dataclass
class _Call:
    """One request on its way through the workers."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    priority: int
    route: Route
    plan: RoutePlan
    ticket: Ticket  # the request's share of its decode worker's in-flight load
    first: pb.PrefillResponse | None = None  # the remote prefill's answer
    first_at: float = 0.0  # when it came (perf_counter): the start of the first-to-second-token gap
    handle: pb.KVHandle | None = None  # held on a prefill worker until a decode worker has its blocks
    streamed: bool = False  # a decode worker sent tokens: no retry elsewhere
    # The planned decode worker's Generate, called before the first token went out to the client
    # (with the handle sent ahead: while the prompt still prefilled).
    early: grpc.aio.UnaryStreamCall | None = None
    ahead: bool = False  # ``early`` carries a handle sent ahead
    # The prompt on its way into its decode worker's cache, and into its prefill worker's.
    decode_landing: Landing | None = None
    prefill_landing: Landing | None = None


def delta_from_pb(out: pb.SequenceOutput) -> Delta:
    logprobs = [TokenLogprob(t, lp.logprob, {x.token_id: x.logprob for x in lp.top})
                for t, lp in zip(out.token_ids, out.logprobs)]
    stop = out.stop_token_id if out.HasField("stop_token_id") else None
    return Delta(out.index, list(out.token_ids), logprobs, FINISH_FROM_PB[out.finish_reason], stop)


def usage_from_pb(u: pb.Usage) -> Usage:
    return Usage(u.num_prompt_tokens, u.num_completion_tokens, u.num_cached_tokens)


class RequestFlow:
    """Routes requests to the two tiers' :class:`WorkerPool` and streams their tokens back."""

    def __init__(self, cfg: ClusterConfig, plane: ControlPlane) -> None:
        self.cfg = cfg
        self.plane = plane
        internal = InternalGrpc.from_config(cfg)
        self.decode = WorkerPool(plane, "decode", internal)
        self.prefill = WorkerPool(plane, "prefill", internal)
        self.pools = {"decode": self.decode, "prefill": self.prefill}
        self.rng = random.Random()
        self.prefill_queue_limit_tokens = 8 * max(cfg.max_num_batched_tokens, 1)
        self._suffix_remote = cfg.suffix_prefill_remote()  # policy.suffix_goes_remote
        self.router_id = f"router-{uuid.uuid4().hex[:8]}"
        self.tiers = {role: TierIndex(role, cfg.block_size, cfg.kv_events, cfg.kv_index_ttl_s, internal)
                      for role in self.pools}
        self._turns = {"decode": 0, "prefill": 0}  # round_robin
        self._sharing: asyncio.Task | None = None
        self.admission = Admission(AdmissionLimits(cfg.max_queued_requests, cfg.max_queued_tokens))
        # (decode, prefill) worker pairs whose decode worker refused a handle sent ahead (it pulls
        # from that prefill worker): they get the whole handle only.
        self._no_ahead: set[tuple[str, str]] = set()
        # The first-to-second-token gap of handoffs, as seen (first_token_hold: policy.first_token_hold_s).
        self.handoff_gap = policy.HandoffGap()
        # The decode tier's time per token, as seen (first_token_hold: a long answer's mean ITL).
        self.token_interval = policy.TokenInterval()

    async def start(self) -> None:
        for pool in self.pools.values():
            await pool.start()
            pool.listeners.append(lambda _event, pool=pool: self._follow(pool))
            self._follow(pool)
            KV_INDEXED_BLOCKS.labels(pool.role).set_function(lambda pool=pool: self.tiers[pool.role].num_indexed_blocks)
        self._sharing = asyncio.create_task(self._share_inflight())

    async def stop(self) -> None:
        if self._sharing is not None:
            self._sharing.cancel()
        for tier in self.tiers.values():
            await tier.stop()
        for pool in self.pools.values():
            await pool.stop()

    async def generate(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                       priority: int = 0, route: Route | None = None) -> AsyncIterator[Delta | Usage]:
        """Stream the request's deltas, then one :class:`Usage`. Stop strings are the caller's
        business: it closes the stream when it sees one (that aborts the request upstream)."""
        t0 = time.perf_counter()
        trace.mark(request_id, "r.plan")
        plan, landing = self._route(prompt_ids, sampling.n)
        DECISION_SECONDS.observe(time.perf_counter() - t0)
        if landing is not None:
            plan = await self._after_landing(request_id, prompt_ids, sampling.n, landing, t0)
        # Queued on the tier that computes the prompt until the first token: past the bound, a 429.
        permit = self.admission.admit("decode" if plan.prefill is None else "prefill", len(prompt_ids))
        auth.charge_tokens(len(prompt_ids))
        # The request counts on its decode worker from the decision on, not from the call: while
        # its prompt prefills remotely the worker is already bound to it, and the decisions taken
        # meanwhile must see that (a burst would otherwise all pick the same idle-looking worker).
        to_compute = 0 if plan.prefill is not None else self._decode_prefill_tokens(prompt_ids, plan.decode)
        ticket = self.decode.open(plan.decode.worker_id, to_compute, len(prompt_ids))
        call = _Call(request_id, prompt_ids, sampling, priority, route or Route(), plan, ticket)
        call.route.overlap_blocks = (plan.prefill or plan.decode).overlap_blocks
        self._expect(call)
        try:
            first: Delta | None = None
            if plan.prefill is not None:
                self._send_handle_ahead(call, plan.prefill.worker_id)
                call.first = await self._prefill(call, plan.prefill)
                self._prefilled(call)
                if call.first is None and call.early is not None:  # P failed: D prefills, called anew
                    call.early.cancel()
                    call.early = None
            ROUTE_DECISIONS.labels(path="remote" if call.first is not None else "local").inc()
            if call.first is not None:
                call.first_at = time.perf_counter()
                call.route.timings_ms["prefill"] = (call.first_at - t0) * 1000
                trace.mark(request_id, "r.prefill_ans")
                if call.first.HasField("handle"):  # from now on unpinned if nobody pulls it
                    call.handle = call.first.handle
                first = delta_from_pb(call.first.outputs[0])
                if call.early is not None and call.early.done() and await call.early.code() != grpc.StatusCode.OK:
                    self._refused_ahead(call, await call.early.code())
                    call.early = None  # the handle sent ahead was refused (or the worker failed): call anew
                if first.finish_reason is None and call.handle is not None and call.early is None:
                    await self._call_decode_early(call)
                permit.release()
                if first.finish_reason is not None or call.handle is None:
                    trace.mark(request_id, "r.first_yield")
                    yield first
                    yield usage_from_pb(call.first.usage)
                    return
            stream = self._decode(call) if first is None else self._first_then_decode(call, first, t0)
            async with contextlib.aclosing(stream) as items:  # closed with this one, at once
                marked = not trace.enabled
                async for item in items:
                    if item is first:  # the prefill's token: its prompt was charged, the token is not
                        yield item
                        continue
                    if not marked:
                        trace.mark(request_id, "r.second_yield")
                        marked = True
                    if isinstance(item, Delta):
                        permit.release()
                        auth.charge_tokens(len(item.token_ids))
                    yield item
        finally:
            permit.release()
            if call.early is not None:  # never read: the client went away at the first token
                call.early.cancel()
            call.ticket.close()
            for landing, role in ((call.decode_landing, "decode"), (call.prefill_landing, "prefill")):
                if landing is not None:  # not there (a failure, the client gone): no more in flight
                    self.tiers[role].land(landing, ok=False)
            if call.handle is not None and not call.streamed:
                # Nobody will pull: give the prefill worker its blocks back now, not at lease end.
                asyncio.get_running_loop().create_task(self.prefill.unpin(call.handle))

    # ---- routing (no I/O) ----------------------------------------------------------------------
    def _plan(self, prompt_ids: list[int], n: int, in_flight: bool = True) -> RoutePlan:
        """The prompt's block hashes; the decode worker D by cost; then a remote prefill only if
        the tokens D would still compute exceed max_local_prefill_tokens and the prefill tier is not
        saturated (n > 1 prefills where it decodes), or it would compute them beside decodes that a
        prefill worker spares (:meth:`_suffix_plan`); P by cost. A saturated tier spills the prompt onto
        D, with ``spill_only_to_idle_decode`` only onto a D it does not slow (:meth:`_spill_targets`).
        ``in_flight``: blocks on their way to a worker count as held there."""
        decode_ids = self.decode.ids()
        if not decode_ids:
            raise NoWorkersError("no decode worker is available")
        decode_tier = self.tiers["decode"]
        hashes = decode_tier.hashes(prompt_ids)
        prefill_ids = self.prefill.ids() if self.cfg.mode == "disaggregated" and n == 1 else []
        max_local = self._max_local(prefill_ids)
        if max_local is None and prefill_ids and self.cfg.spill_only_to_idle_decode:
            decode_ids, max_local = self._spill_targets(prompt_ids, hashes, decode_ids, prefill_ids, in_flight)
        decode = self._choose(self.decode, prompt_ids, hashes, decode_ids, max_local, in_flight)
        assert decode is not None
        if decode.local_prefill:
            return self._suffix_plan(prompt_ids, hashes, decode, prefill_ids, max_local, in_flight)
        prefill_hashes = self._prefill_hashes(prompt_ids, hashes)
        prefill = self._choose(self.prefill, prompt_ids, prefill_hashes, prefill_ids, None, in_flight)
        return RoutePlan(hashes, decode, prefill, prefill_hashes)

    def _suffix_plan(self, prompt_ids: list[int], hashes: list[int], decode: policy.Decision,
                     prefill_ids: list[str], max_local: int | None, in_flight: bool) -> RoutePlan:
        """A prompt the decode worker would finish itself: prefilled remotely instead where
        ``policy.suffix_goes_remote`` says so (``suffix_prefill``), else locally."""
        local_plan = RoutePlan(hashes, decode, None)
        if max_local is None or not self._suffix_remote:
            return local_plan  # no usable prefill tier (or every prompt stays local)
        decode_tier, prefill_tier = self.tiers["decode"], self.tiers["prefill"]
        d = decode.worker_id
        d_load = self.decode.loads([d], decode_tier.block_size)
        local = policy.kv_costs(len(prompt_ids), {d: decode.overlap_blocks}, d_load, decode_tier.block_size,
                                self.cfg.prefill_load_scale)[0]
        prefill_hashes = self._prefill_hashes(prompt_ids, hashes)
        prefill = self._choose(self.prefill, prompt_ids, prefill_hashes, prefill_ids, None, in_flight)
        if prefill is None:
            return local_plan
        remote = policy.kv_costs(len(prompt_ids), prefill_tier.overlaps(prefill_hashes, in_flight),
                                 self.prefill.loads([prefill.worker_id], prefill_tier.block_size),
                                 prefill_tier.block_size, self.cfg.prefill_load_scale)[0]
        if not policy.suffix_goes_remote(local, remote, d_load[0].num_inflight > 0):
            return local_plan
        return RoutePlan(hashes, replace(decode, local_prefill=False), prefill, prefill_hashes)

    def _max_local(self, prefill_ids: list[str]) -> int | None:
        """The most prompt tokens a decode worker computes itself: None (all) without a usable prefill tier."""
        if prefill_ids and not policy.prefill_saturated(self.prefill.loads(prefill_ids),
                                                        self.prefill_queue_limit_tokens):
            return self.cfg.max_local_prefill_tokens
        return None

    def _spill_targets(self, prompt_ids: list[int], hashes: list[int], decode_ids: list[str], prefill_ids: list[str],
                       in_flight: bool) -> tuple[list[str], int | None]:
        """The prefill tier is saturated (``spill_only_to_idle_decode``): the decode workers to choose among and
        the max_local_prefill_tokens to choose them with (``policy.spill_plan``): those the prompt may spill
        onto, prefilling it whatever its length, or, where each would stall requests decoding there, all of
        them, the prompt then queued on the prefill tier (unless that is far behind: any, whatever its length)."""
        tier = self.tiers["decode"]
        overlaps = tier.overlaps(hashes, in_flight)
        num_blocks = policy.blocks(len(prompt_ids), tier.block_size)
        to_compute = {w: len(prompt_ids) - min(overlaps.get(w, 0), num_blocks) * tier.block_size for w in decode_ids}
        loads, max_local = policy.spill_plan(self.decode.loads(decode_ids, tier.block_size), to_compute,
                                             self.cfg.max_local_prefill_tokens, self.prefill.loads(prefill_ids),
                                             self.prefill_queue_limit_tokens)
        return [w.worker_id for w in loads], max_local

    def _prefill_hashes(self, prompt_ids: list[int], hashes: list[int]) -> list[int]:
        prefill_tier = self.tiers["prefill"]
        return hashes if prefill_tier.block_size == self.tiers["decode"].block_size else \
            prefill_tier.hashes(prompt_ids)

    # ---- prompts on their way (no I/O but the wait) --------------------------------------------
    def _route(self, prompt_ids: list[int], n: int, in_flight: bool = True) -> tuple[RoutePlan, Landing | None]:
        """The plan, and the handoff it must wait for (:meth:`_awaited`): one still on its way to the
        worker that would compute this prompt, bringing blocks the plan counts as held there (sent
        now, the request would compute them again). The request follows that prefix to its prefill
        worker instead when that is sooner (``policy.follows_prefill``)."""
        plan = self._plan(prompt_ids, n, in_flight)
        landing = self._awaited(plan) if in_flight else None
        if landing is not None and landing.prefill_worker and plan.prefill is None:
            follow = self._follow_plan(prompt_ids, plan, landing)
            if follow is not None:
                plan = follow
                landing = self._awaited(plan)
        return plan, landing

    def _awaited(self, plan: RoutePlan) -> Landing | None:
        """The handoff still on its way to the worker that computes the plan's prompt that brings
        blocks it is counted on to hold. A prefix that worker is computing itself is not waited for:
        its step makes the blocks findable when it launches, and a request queued behind it finds them."""
        if plan.prefill is not None:
            tier, decision, hashes = self.tiers["prefill"], plan.prefill, plan.prefill_hashes
        else:
            tier, decision, hashes = self.tiers["decode"], plan.decode, plan.hashes
        n = decision.overlap_blocks
        if n == 0 or not tier.in_flight.index.holds(decision.worker_id, hashes[n - 1]):
            return None  # the overlap's last block is held there, and so is the run up to it
        landing, shared = tier.handoff_on(decision.worker_id, hashes)
        if landing is None or min(shared, n) <= tier.resident_overlap(decision.worker_id, hashes):
            return None
        return landing

    def _follow_plan(self, prompt_ids: list[int], plan: RoutePlan, landing: Landing) -> RoutePlan | None:
        """The plan that prefills on the prefill worker ``landing`` comes from, when cheaper than waiting."""
        worker = landing.prefill_worker
        if self.cfg.mode != "disaggregated" or self._max_local(self.prefill.ids()) is None or \
                worker not in self.prefill.ids():
            return None
        decode_tier, prefill_tier = self.tiers["decode"], self.tiers["prefill"]
        d = plan.decode.worker_id
        local = policy.kv_costs(len(prompt_ids), {d: plan.decode.overlap_blocks},
                                self.decode.loads([d], decode_tier.block_size), decode_tier.block_size,
                                self.cfg.prefill_load_scale)[0]
        prefill_hashes = self._prefill_hashes(prompt_ids, plan.hashes)
        remote = policy.kv_costs(len(prompt_ids), prefill_tier.overlaps(prefill_hashes),
                                 self.prefill.loads([worker], prefill_tier.block_size), prefill_tier.block_size,
                                 self.cfg.prefill_load_scale)[0]
        if not policy.follows_prefill(landing.blocks_left, local, remote):
            return None
        decode = policy.Decision(d, decode_tier.resident_overlap(d, plan.hashes), False, plan.decode.cost)
        prefill = policy.Decision(remote.worker_id, remote.overlap_blocks, True, remote.cost)
        return RoutePlan(plan.hashes, decode, prefill, prefill_hashes)

    async def _after_landing(self, request_id: str, prompt_ids: list[int], n: int, landing: Landing,
                             t0: float) -> RoutePlan:
        """Wait for ``landing`` (and whatever the plan then counts on) and plan again; past the
        TTFT target, plan on what the workers hold now."""
        deadline = t0 + self.cfg.ttft_slo_ms / 1000
        while landing is not None:
            trace.mark(request_id, "r.landing_wait")
            try:
                await asyncio.wait_for(landing.arrived.wait(), deadline - time.perf_counter())
            except TimeoutError:
                break
            plan, landing = self._route(prompt_ids, n)
        if landing is not None:
            plan, _ = self._route(prompt_ids, n, in_flight=False)
        trace.mark(request_id, "r.landed")
        return plan

    def _expect(self, call: _Call) -> None:
        """The request's prompt is on its way into its workers' caches from now on."""
        plan, n = call.plan, len(call.prompt_ids)
        decode_bs = self.tiers["decode"].block_size
        KV_OVERLAP_BLOCKS.labels("decode").observe(plan.decode.overlap_blocks)
        if plan.prefill is not None:
            KV_OVERLAP_BLOCKS.labels("prefill").observe(plan.prefill.overlap_blocks)
        if plan.prefill is None:
            left = policy.blocks(n, decode_bs) - plan.decode.overlap_blocks
            call.decode_landing = self.tiers["decode"].expect(plan.decode.worker_id, plan.hashes, left)
            return
        prefill_tier = self.tiers["prefill"]
        left = policy.blocks(n, prefill_tier.block_size) - plan.prefill.overlap_blocks
        call.prefill_landing = prefill_tier.expect(plan.prefill.worker_id, plan.prefill_hashes, left)
        call.decode_landing = self.tiers["decode"].expect(plan.decode.worker_id, plan.hashes, left,
                                                          plan.prefill.worker_id)

    def _prefilled(self, call: _Call) -> None:
        """The remote prefill answered (its prompt is computed and moves on to the decode worker), or
        failed (the decode worker computes it)."""
        if call.prefill_landing is not None:
            self.tiers["prefill"].land(call.prefill_landing, ok=call.first is not None)
        landing = call.decode_landing
        if landing is not None and not landing.done:
            if call.first is not None:
                landing.blocks_left = 0
            else:
                landing.prefill_worker = ""
                landing.blocks_left = policy.blocks(len(call.prompt_ids), self.tiers["decode"].block_size) - \
                    self.tiers["decode"].resident_overlap(landing.worker_id, landing.hashes)

    def _decode_prefill_tokens(self, prompt_ids: list[int], decision: policy.Decision) -> int:
        """Prompt tokens the decode worker computes when it prefills the prompt itself."""
        return len(prompt_ids) - decision.overlap_blocks * self.tiers["decode"].block_size

    def _choose(self, pool: WorkerPool, prompt_ids: list[int], hashes: list[int], ids: list[str],
                max_local_prefill_tokens: int | None, in_flight: bool = True) -> policy.Decision | None:
        """One tier's worker by the configured policy (``in_flight``: blocks on their way to a
        worker count as held there)."""
        tier = self.tiers[pool.role]
        turn = self._turns[pool.role]
        self._turns[pool.role] = turn + 1
        decision = policy.choose(
            self.cfg.routing_policy, len(prompt_ids), tier.overlaps(hashes, in_flight),
            pool.loads(ids, tier.block_size), tier.block_size, prefill_load_scale=self.cfg.prefill_load_scale,
            temperature=self.cfg.router_temperature, max_local_prefill_tokens=max_local_prefill_tokens, turn=turn,
            rng=self.rng)
        return decision

    def _follow(self, pool: WorkerPool) -> None:
        """The tier's workers changed: follow their KV events (block size from their registration)."""
        members = pool.members()
        self.tiers[pool.role] = self.tiers[pool.role].adopt(members)
        self.tiers[pool.role].sync(members)

    # ---- worker calls ----------------------------------------------------------------------------
    async def _prefill(self, call: _Call, decision: policy.Decision) -> pb.PrefillResponse | None:
        """Prefill on the chosen prefill worker; None (prefill on the decode worker) if it fails."""
        worker = decision.worker_id
        call.route.prefill_worker = worker
        req = pb.PrefillRequest(request_id=call.request_id, prompt_token_ids=call.prompt_ids,
                                sampling=sampling_to_pb(call.sampling), priority=call.priority)
        to_compute = len(call.prompt_ids) - decision.overlap_blocks * self.tiers["prefill"].block_size
        try:
            with self.prefill.track(worker, to_compute, len(call.prompt_ids)):
                return await watched_call(self.prefill.stub(worker).Prefill(req), self._watch(self.prefill, worker))
        except asyncio.CancelledError:
            # The client left. The worker aborts the cancelled call, but its answer (a pinned
            # KV handle) may already be on the way: abort it there too rather than wait for its lease.
            asyncio.get_running_loop().create_task(self.prefill.abort(worker, call.request_id))
            raise
        except (grpc.aio.AioRpcError, WorkerHungError) as e:
            if isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequestError(e.details()) from None
            if call.early is not None:  # a push waiting there for this prefill gives up at once
                asyncio.get_running_loop().create_task(self.prefill.abort(worker, call.request_id))
            hung = isinstance(e, WorkerHungError)
            self.prefill.suspect(worker, self._suspect_s if hung else None)
            log.warning("request %s: prefill worker %s failed (%s); prefilling on the decode tier",
                        call.request_id, worker, e if hung else e.code().name)
            call.route.prefill_worker = ""
            return None

    async def _decode(self, call: _Call) -> AsyncIterator[Delta | Usage]:
        """Decode on the planned worker; a worker that fails before streaming anything is
        replaced by the next best of the others (as long as there is one)."""
        request = self._generate_request(call)
        tried: set[str] = set()
        decision: policy.Decision | None = call.plan.decode
        while True:
            if decision is None:  # a retry: the next best of the others
                # -1: with a handle the decode worker computes no prompt token; without, all it lacks
                decision = self._choose(self.decode, call.prompt_ids, call.plan.hashes,
                                        self.decode.ids(exclude=tried), -1 if call.handle is not None else None)
            if decision is None:
                raise (WorkerFailedError if tried else NoWorkersError)("no decode worker is available")
            tried.add(decision.worker_id)
            call.route.decode_worker = decision.worker_id
            call.route.num_retries = len(tried) - 1
            self._bind(call, decision)
            try:
                async with contextlib.aclosing(self._stream(call, decision.worker_id, request)) as items:
                    async for item in items:
                        yield item
                return
            except (grpc.aio.AioRpcError, WorkerFailedError) as e:
                # WorkerFailedError: hung (the watchdog), gone from etcd between the plan and the
                # call, or a stream ended without its usage
                rpc = isinstance(e, grpc.aio.AioRpcError)
                hung = isinstance(e, WorkerHungError)
                if rpc and e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidRequestError(e.details()) from None
                if rpc and e.code() == grpc.StatusCode.CANCELLED:
                    raise
                why = f"{e.code().name} {e.details()}" if rpc else str(e)
                self.decode.suspect(decision.worker_id, self._suspect_s if hung else None)
                log.warning("request %s: decode worker %s failed: %s", call.request_id, decision.worker_id, why)
                if call.streamed:
                    raise WorkerFailedError(f"decode worker {decision.worker_id} failed mid-stream: "
                                            f"{e.code().name if rpc else 'hung' if hung else e}") from None
            decision = None

    async def _first_then_decode(self, call: _Call, first: Delta, t0: float) -> AsyncIterator[Delta | Usage]:
        """The prefill's first token, then the decode worker's stream. The first token is sent at
        once, or held (``policy.first_token_hold_s``) until the decode worker's first message and
        sent with it, or alone when the hold runs out first (the TTFT target)."""
        decoded = self._decode(call)
        pending: asyncio.Future | None = None
        try:
            missing = len(call.prompt_ids) - call.plan.decode.overlap_blocks * self.tiers["decode"].block_size
            hold_s = policy.first_token_hold_s(
                self.cfg.first_token_hold, self.handoff_gap.high(missing), self.cfg.itl_slo_ms / 1000,
                self.cfg.ttft_slo_ms / 1000 - (time.perf_counter() - t0), call.sampling.max_tokens,
                self.token_interval.predict(), self.handoff_gap.predict(missing))
            if hold_s > 0:
                trace.mark(call.request_id, "r.hold")
                pending = asyncio.ensure_future(anext(decoded, None))  # D's first message, read meanwhile
                done, _ = await asyncio.wait({pending}, timeout=hold_s)
                FIRST_TOKENS_HELD.labels(reason="with_decode" if done else "deadline").inc()
            trace.mark(call.request_id, "r.first_yield")
            yield first
            if pending is not None:
                item, pending = await pending, None  # D's failure surfaces here, after the first token, as unheld
                if item is None:
                    return
                yield item
            async for item in decoded:
                yield item
        finally:
            if pending is not None:  # the client left while D's first message was awaited
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending
            await decoded.aclose()

    def _send_handle_ahead(self, call: _Call, prefill_worker: str) -> None:
        """Call the planned decode worker while the prompt prefills, with a handle sent ahead (the
        prefill worker's address and transport, no blocks nor first token yet): it allocates the
        blocks and asks the prefill worker to push into them as soon as the prefill ends, whose
        answer brings it the first token. Not when the cluster pulls (that needs the blocks' ids)."""
        info = self.prefill.members().get(prefill_worker)
        if self.cfg.kv_transfer_mode == "pull" or info is None or \
                (call.plan.decode.worker_id, prefill_worker) in self._no_ahead:
            return
        ahead = pb.KVHandle(request_id=call.request_id, worker_id=prefill_worker, worker_endpoint=info.endpoint,
                            transport_metadata=info.transport_metadata, num_tokens=len(call.prompt_ids))
        request = self._generate_request(call)
        request.kv_handle.CopyFrom(ahead)
        with contextlib.suppress(WorkerFailedError):  # gone: _decode finds out as before
            call.early = self.decode.stub(call.plan.decode.worker_id).Generate(request)
            call.ahead = True
            trace.mark(call.request_id, "r.decode_call")

    async def _call_decode_early(self, call: _Call) -> None:
        """Call the planned decode worker before the first token goes out to the client: its KV
        handoff overlaps that token's way through this process. ``_stream`` reads the call."""
        with contextlib.suppress(WorkerFailedError):  # gone: _decode finds out as before
            call.early = self.decode.stub(call.plan.decode.worker_id).Generate(self._generate_request(call))
            call.ahead = False
            trace.mark(call.request_id, "r.decode_call")
            await asyncio.sleep(0)  # the call's request goes out now, not after the first token's write

    @staticmethod
    def _generate_request(call: _Call) -> pb.GenerateRequest:
        request = pb.GenerateRequest(request_id=call.request_id, prompt_token_ids=call.prompt_ids,
                                     sampling=sampling_to_pb(call.sampling), priority=call.priority)
        if call.handle is not None:
            request.kv_handle.CopyFrom(call.handle)
        return request

    def _bind(self, call: _Call, decision: policy.Decision) -> None:
        """Count the request on the decode worker about to serve it: a retry elsewhere, or one
        that now computes the prompt itself (the remote prefill failed), takes a new ticket."""
        to_compute = 0 if call.handle is not None else self._decode_prefill_tokens(call.prompt_ids, decision)
        if call.ticket.worker_id != decision.worker_id or call.ticket.prefill_tokens != to_compute:
            call.ticket.close()
            call.ticket = self.decode.open(decision.worker_id, to_compute, len(call.prompt_ids))
        landing = call.decode_landing
        if landing is not None and landing.worker_id != decision.worker_id:  # a retry: on its way there now
            tier = self.tiers["decode"]
            tier.land(landing, ok=False)
            call.decode_landing = tier.expect(decision.worker_id, call.plan.hashes,
                                              policy.blocks(to_compute, tier.block_size))

    async def _stream(self, call: _Call, worker: str, request: pb.GenerateRequest) -> AsyncIterator[Delta | Usage]:
        """One Generate call: its deltas, then the usage (the remote prefill's first token counted)."""
        stream, call.early = call.early, None
        if stream is None or worker != call.plan.decode.worker_id:  # not called early, or a retry
            if stream is not None:
                stream.cancel()
            stream, call.ahead = None, False
        if call.ahead:
            # Read (and so watched) only from here, once P's Prefill has answered: the call sent
            # ahead is silent for the whole prefill by design, not hung.
            # Its first message must come within the bound D puts on a whole handle's transfer
            # (plus a grace): D has no deadline of its own on it (the wait includes the prefill).
            call.ahead = False
            deadline_s = self.cfg.kv_pull_timeout_s + _AHEAD_FIRST_GRACE_S
            try:
                async with contextlib.aclosing(self._read(call, worker, stream)) as items:
                    first = await asyncio.wait_for(anext(items, None), deadline_s)
                    if first is not None:
                        yield first
                        async for item in items:
                            yield item
                return
            except TimeoutError:
                # Given up (cancelled: D stops waiting for the push and keeps the blocks while P
                # may still write into them); the whole handle recomputes if the push cannot land.
                KV_AHEAD_GIVEN_UP.inc()
                log.warning("request %s: the handle sent ahead to %s sent nothing %.1f s after the prefill; "
                            "calling it with the whole handle", call.request_id, worker, deadline_s)
                stream = None
            except grpc.aio.AioRpcError as e:
                if e.code() not in _AHEAD_FAILED or call.streamed:
                    raise
                # The handle sent ahead was refused, or did not land (no room, a failed push, a
                # failed prefill): nothing of it is left there; the same worker again, whole.
                self._refused_ahead(call, e.code())
                log.info("request %s: the handle sent ahead to %s did not land: %s", call.request_id, worker,
                         e.details())
                stream = None
        if stream is None:
            trace.mark(call.request_id, "r.decode_call")
            stream = self.decode.stub(worker).Generate(request)
        async with contextlib.aclosing(self._read(call, worker, stream)) as items:
            async for item in items:
                yield item

    def _refused_ahead(self, call: _Call, code: grpc.StatusCode) -> None:
        if code == grpc.StatusCode.FAILED_PRECONDITION and call.plan.prefill is not None:  # it pulls from P
            self._no_ahead.add((call.plan.decode.worker_id, call.plan.prefill.worker_id))

    async def _read(self, call: _Call, worker: str, stream: grpc.aio.UnaryStreamCall
                    ) -> AsyncIterator[Delta | Usage]:
        last_at = 0.0  # when the stream's last message with tokens came
        try:
            messages = watched_stream(stream, self._watch(self.decode, worker))
            async with contextlib.aclosing(messages):
                async for msg in messages:
                    if not call.streamed:
                        trace.mark(call.request_id, "r.msg1")
                    if msg.HasField("pull"):
                        call.route.recomputed = msg.pull.recomputed
                        if not msg.pull.recomputed and msg.pull.num_pulled_blocks:
                            HANDOFFS.add(msg.pull.pull_ms / 1000)
                        if not msg.pull.recomputed and call.first_at:
                            self.handoff_gap.observe(msg.pull.num_pulled_blocks * self.tiers["decode"].block_size,
                                                     msg.pull.pull_ms / 1000, time.perf_counter() - call.first_at)
                    if msg.outputs and call.decode_landing is not None and not call.decode_landing.done:
                        self.tiers["decode"].land(call.decode_landing, ok=True)  # it holds the prompt now
                    if msg.outputs and msg.outputs[0].token_ids:
                        now = time.perf_counter()
                        if last_at:
                            self.token_interval.observe(now - last_at, len(msg.outputs[0].token_ids))
                        last_at = now
                    for out in msg.outputs:
                        call.streamed = True
                        call.ticket.prefilled()
                        call.ticket.grow(len(out.token_ids))
                        yield delta_from_pb(out)
                    if msg.HasField("usage"):
                        usage = usage_from_pb(msg.usage)
                        if call.first is not None:  # the first token and the cache hit were the prefill worker's
                            usage.num_completion_tokens += call.first.usage.num_completion_tokens
                            usage.num_cached_tokens = call.first.usage.num_cached_tokens
                        call.handle = None
                        yield usage
                        return
            raise WorkerFailedError(f"decode worker {worker} ended the stream early")
        finally:
            stream.cancel()

    def _watch(self, pool: WorkerPool, worker: str) -> Watch:
        timeout_s = self.cfg.worker_probe_timeout_s
        return Watch(lambda: pool.probe(worker, timeout_s, pool.endpoint(worker)), pool.liveness(worker),
                     Patience(self.cfg.worker_silence_s, timeout_s), f"{pool.role} worker {worker}")

    @property
    def _suspect_s(self) -> float:
        """How long a hung worker is skipped: until its lease (it cannot renew it) is surely gone."""
        return float(self.cfg.lease_ttl_s) + self.cfg.worker_silence_s

    # ---- peers -----------------------------------------------------------------------------------
    async def _share_inflight(self) -> None:
        """Publish this router's in-flight load per worker; read the other replicas'."""
        ns = self.plane.namespace
        while True:
            try:
                mine = inflight_to_pb(self.router_id, {role: pool.inflight for role, pool in self.pools.items()})
                await self.plane.put_message(keys.router_inflight_key(ns, self.router_id), mine)
                published = await self.plane.get_messages(keys.metrics_prefix(ns, keys.ROUTER_INFLIGHT),
                                                           cpb.RouterInflight)
                peers = sum_peers(published, self.router_id)
                for role, pool in self.pools.items():
                    pool.peer_inflight = peers.get(role, {})
                    PEER_INFLIGHT.labels(role=role).set(
                        sum(e.num_requests for e in pool.peer_inflight.values()))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # etcd hiccup: keep the last known peers
                log.debug("in-flight sharing failed: %r", e)
            await asyncio.sleep(self.cfg.metrics_interval_s)
