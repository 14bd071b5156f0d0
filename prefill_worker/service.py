"""The prefill tier: computes a prompt's KV, samples the first token, and holds the prompt's
blocks (``held.HeldBlocks``) until the decode worker has them: it asks us to write them into its
own blocks (``PushKV``), or reads them itself and then ``Unpin``s them. The router's ``Unpin``,
``Abort`` and the hold's lease end a hold too. A ``PushKV`` with ``wait_for_prefill`` (a handle
the router sent ahead to the decode worker) may come before its prompt's prefill has ended, or
even arrived: it waits for that (``Prefills``), then pushes at once and answers with the first
token."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass, field

import grpc

from kv_transfer import TransferError
from prefill_worker.held import HeldBlocks
from protocol.sampling import SamplingParams
from runtime import settings, trace
from runtime.convert import output_to_pb, sampling_from_pb
from runtime.pb import tandem_worker_pb2 as pb
from worker.server import WorkerServicer, main, observe_output

log = logging.getLogger("tandem.prefill")


class PrefillServicer(WorkerServicer):
    def configure(self, cfg: settings.ClusterConfig) -> None:
        super().configure(cfg)
        self.held = HeldBlocks(self.engine, cfg.kv_lease_s)
        self._pushes: set[asyncio.Task] = set()
        self._faults = PushFaults.from_env()
        self.prefills = Prefills(cfg.kv_lease_s)

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        try:
            if not self.accepting():
                await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
            sampling = sampling_from_pb(request.sampling)
            if sampling.n != 1:
                raise ValueError("the prefill tier takes n = 1 (n > 1 is served by the decode tier)")
        except ValueError as e:
            self.prefills.refuse(request.request_id)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except BaseException:
            self.prefills.refuse(request.request_id)
            raise
        rid = request.request_id
        trace.mark(rid, "p.recv")
        self.prefills.arrive(rid)
        try:
            response = await self._prefill(rid, request, sampling, context)
            trace.mark(rid, "p.ans")
            return response
        except asyncio.CancelledError:
            # The caller gave up. A prompt still computing is aborted by the engine stream; one
            # that finished (and kept its blocks) before we heard of it is released here.
            self.held.release(rid, "cancelled")
            raise
        finally:
            self.prefills.end(rid)  # held or not: a push waiting for it goes on

    async def _prefill(self, rid: str, request: pb.PrefillRequest, sampling: SamplingParams,
                       context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        arrival = time.monotonic()
        last = None
        table: list[int] = []
        try:
            async for out in self.engine.generate(rid, list(request.prompt_token_ids), sampling,
                                                  request.priority, prefill_only=True):
                last = out
                trace.mark(rid, "p.out")
                observe_output(out)
                if out.finished and out.finish_reason is None:
                    table = self.engine.take_handed_off(rid)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        assert last is not None and last.finished
        response = pb.PrefillResponse(
            outputs=[output_to_pb(last)],
            usage=pb.Usage(num_prompt_tokens=last.num_prompt_tokens, num_completion_tokens=last.num_output_tokens,
                           num_cached_tokens=last.num_cached_tokens),
            prefill_ms=(time.monotonic() - arrival) * 1000,
        )
        if last.finish_reason is None:  # handed off: the engine keeps the blocks, we hold them
            # The output reached us after the step that wrote the blocks finished on the device
            # (its sampled token was read back), so a transfer may read them from now on.
            self.held.hold(rid, table)
            self.prefills.first_tokens(rid, last.new_token_ids)
            ident = self.identity
            response.handle.CopyFrom(pb.KVHandle(
                request_id=rid, worker_id=ident.worker_id, worker_endpoint=ident.endpoint,
                transport_metadata=self.transport.metadata() if self.transport else b"",
                block_ids=table, num_tokens=last.num_prompt_tokens, first_token_ids=last.new_token_ids,
            ))
        return response

    async def PushKV(self, request: pb.PushKVRequest, context: grpc.aio.ServicerContext) -> pb.PushKVResponse:
        """Write a held handle's blocks into the caller's, then release them (landed or not)."""
        rid = request.request_id
        if self.transport is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker has no KV transport")
        if len(request.block_indices) != len(request.dst_block_ids) or request.timeout_ms <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "block_indices and dst_block_ids must be parallel, timeout_ms positive")
        if request.wait_for_prefill and not await self.prefills.wait_ended(rid, request.timeout_ms / 1000):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no prefill of request {rid!r} arrived in time")
        trace.mark(rid, "p.pushkv")
        blocks = self.held.take(rid)
        if blocks is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request {rid!r} holds no KV blocks here "
                                                           "(released, aborted, lease ended, or being pushed)")
        # The push runs in its own task: if our caller goes away, the write still ends (within its
        # timeout) before the blocks are released.
        task = asyncio.create_task(self._push(rid, blocks, request))
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)
        try:
            return await asyncio.shield(task)
        except IndexError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except TransferError as e:
            # ABORTED: the write is over (failed), nothing of ours touches the caller's blocks any more.
            await context.abort(grpc.StatusCode.ABORTED, f"push failed: {e}")

    async def _push(self, rid: str, blocks: list[int], request: pb.PushKVRequest) -> pb.PushKVResponse:
        try:
            first = self.prefills.first_token_ids(rid)
            src = [blocks[i] for i in request.block_indices]
            if not src:
                return pb.PushKVResponse(first_token_ids=first)
            assert self.transport is not None
            timeout_s = await self._faults.apply(rid, request.timeout_ms / 1000)
            result = await self.transport.push_async(request.transport_metadata, request.transfer_id, src,
                                                     list(request.dst_block_ids), timeout_s=timeout_s)
            trace.mark(rid, "p.pushed")
            return pb.PushKVResponse(push_ms=result.duration_s * 1000, num_blocks=result.num_blocks,
                                     first_token_ids=first)
        except TransferError as e:
            log.warning("request %s: push of %d blocks failed: %s", rid, len(request.block_indices), e)
            raise
        finally:
            self.held.end_push(rid)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        held = self.held.release(request.request_id, "aborted")  # a handle's key is its request's id
        self.prefills.refuse(request.request_id)  # a push waiting for a prefill that never came: NOT_FOUND
        response = await super().Abort(request, context)
        return pb.AbortResponse(aborted=response.aborted or held)

    async def Unpin(self, request: pb.UnpinRequest, context: grpc.aio.ServicerContext) -> pb.UnpinResponse:
        # Answered at once; the engine frees the blocks between its steps.
        return pb.UnpinResponse(unpinned=self.held.release(request.request_id, "unpinned"))

    async def run_background(self) -> None:
        """Free the blocks of holds nobody came for within their lease (and forget old prefills)."""
        await asyncio.gather(self.held.run(), self.prefills.run())

    def _idle(self) -> bool:
        return super()._idle() and not len(self.held)


@dataclass
class _Progress:
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    first_token_ids: list[int] = field(default_factory=list)
    ended_at: float = float("inf")  # monotonic


class Prefills:
    """Where each request's ``Prefill`` is, for pushes that wait for it (``wait_for_prefill``):
    not arrived, running, or ended (with its first tokens when it holds blocks). An ended one is
    remembered for a lease, so that a push arriving after its end is answered at once. A request
    id used again starts afresh."""

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self._progress: dict[str, _Progress] = {}

    def arrive(self, request_id: str) -> None:
        progress = self._progress.get(request_id)
        if progress is None or progress.ended.is_set():
            progress = self._progress[request_id] = _Progress()
        progress.arrived.set()

    def first_tokens(self, request_id: str, token_ids: list[int]) -> None:
        self._progress[request_id].first_token_ids = list(token_ids)

    def end(self, request_id: str) -> None:
        progress = self._progress.get(request_id)
        if progress is not None:
            progress.arrived.set()
            progress.ended.set()
            progress.ended_at = time.monotonic()

    def refuse(self, request_id: str) -> None:
        """The request's prefill will not run here (refused, aborted before it came)."""
        self._progress.setdefault(request_id, _Progress())
        self.end(request_id)

    def first_token_ids(self, request_id: str) -> list[int]:
        progress = self._progress.get(request_id)
        return progress.first_token_ids if progress is not None else []

    async def wait_ended(self, request_id: str, arrival_timeout_s: float) -> bool:
        """Wait until the request's prefill has ended; False when it did not arrive within
        ``arrival_timeout_s`` (once arrived, its end is waited for however long it queues)."""
        progress = self._progress.setdefault(request_id, _Progress())
        try:
            await asyncio.wait_for(progress.arrived.wait(), arrival_timeout_s)
        except TimeoutError:
            if not progress.arrived.is_set() and self._progress.get(request_id) is progress:
                del self._progress[request_id]
            return False
        await progress.ended.wait()
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.keep_s / 4))
            old = time.monotonic() - self.keep_s
            for rid in [rid for rid, p in self._progress.items() if p.ended_at < old]:
                del self._progress[rid]


class PushFaults:
    """Fault injection for tests, from ``TANDEM_FAULT_PUSH=<regex>=timeout`` (the push of a matching
    request id times out inside the transport, before it starts) or ``<regex>=delay:<seconds>`` (it
    starts that much later). Unset (always, outside tests): no effect."""

    FORCED_TIMEOUT_S = 1e-5

    def __init__(self, pattern: str = "", action: str = "") -> None:
        self.pattern = re.compile(pattern) if pattern else None
        self.action = action
        if action != "timeout" and not action.startswith("delay:") and pattern:
            raise ValueError(f"TANDEM_FAULT_PUSH: unknown action {action!r}")

    @classmethod
    def from_env(cls) -> PushFaults:
        spec = os.environ.get("TANDEM_FAULT_PUSH", "")
        if not spec:
            return cls()
        pattern, _, action = spec.rpartition("=")
        log.warning("fault injection on: pushes of requests matching %r: %s", pattern, action)
        return cls(pattern, action)

    async def apply(self, request_id: str, timeout_s: float) -> float:
        if self.pattern is None or not self.pattern.search(request_id):
            return timeout_s
        if self.action == "timeout":
            return self.FORCED_TIMEOUT_S
        await asyncio.sleep(float(self.action.split(":", 1)[1]))
        return timeout_s


if __name__ == "__main__":
    main("prefill", PrefillServicer)
