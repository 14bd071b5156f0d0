"""The prefill tier: computes a prompt's KV, samples the first token, and pins the prompt's
blocks under a KV handle with a lease until the decode worker has pulled them (``Unpin``) or
the lease ends (the blocks are then freed by the reaper)."""

from __future__ import annotations

import asyncio
import time

import grpc

from protocol.sampling import SamplingParams
from runtime import settings
from runtime.convert import output_to_pb, sampling_from_pb
from runtime.pb import tandem_worker_pb2 as pb
from worker.server import WorkerServicer, main


class PrefillServicer(WorkerServicer):
    def configure(self, cfg: settings.ClusterConfig) -> None:
        super().configure(cfg)
        self.lease_s = cfg.kv_lease_s
        self.leases: dict[str, float] = {}  # handle id (= request id) -> expiry, monotonic clock

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        if not self.accepting():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
        try:
            sampling = sampling_from_pb(request.sampling)
            if sampling.n != 1:
                raise ValueError("the prefill tier takes n = 1 (n > 1 is served by the decode tier)")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rid = request.request_id
        try:
            return await self._prefill(rid, request, sampling, context)
        except asyncio.CancelledError:
            # The caller gave up. A prompt still computing is aborted by the engine stream; one
            # that finished (and pinned its blocks) before we heard of it is unpinned here.
            self.leases.pop(rid, None)
            await asyncio.shield(self.engine.unpin(rid))
            raise

    async def _prefill(self, rid: str, request: pb.PrefillRequest, sampling: SamplingParams,
                       context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        arrival = time.monotonic()
        last = None
        try:
            async for out in self.engine.generate(rid, list(request.prompt_token_ids), sampling,
                                                  request.priority, prefill_only=True):
                last = out
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        assert last is not None and last.finished
        elapsed_ms = (time.monotonic() - arrival) * 1000
        response = pb.PrefillResponse(
            outputs=[output_to_pb(last)],
            usage=pb.Usage(num_prompt_tokens=last.num_prompt_tokens, num_completion_tokens=last.num_output_tokens,
                           num_cached_tokens=last.num_cached_tokens),
            prefill_ms=elapsed_ms,
        )
        if last.finish_reason is None:  # handed off: the blocks stay pinned under a handle
            self.leases[rid] = time.monotonic() + self.lease_s
            table = await self.engine.call(lambda e: e.block_table(rid))
            ident = self.identity
            response.handle.CopyFrom(pb.KVHandle(
                handle_id=rid, request_id=rid, worker_id=ident.worker_id, worker_endpoint=ident.endpoint,
                transport=self.transport.transport_name if self.transport else "",
                transport_metadata=self.transport.metadata() if self.transport else b"",
                block_size=ident.block_size, block_ids=table, num_tokens=last.num_prompt_tokens,
                first_token_ids=last.new_token_ids,
                lease_expires_unix_ms=int((time.time() + self.lease_s) * 1000),
            ))
        return response

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        self.leases.pop(request.request_id, None)  # a handle's id is its request's id
        return await super().Abort(request, context)

    async def Unpin(self, request: pb.UnpinRequest, context: grpc.aio.ServicerContext) -> pb.UnpinResponse:
        # Answer at once; the engine frees the blocks between its steps.
        known = self.leases.pop(request.handle_id, None) is not None
        handle_id = request.handle_id
        self.engine.post(lambda e: e.unpin(handle_id))
        return pb.UnpinResponse(unpinned=known)

    async def Pull(self, request: pb.PullRequest, context: grpc.aio.ServicerContext) -> pb.PullResponse:
        """Renew a handle's lease (read-style transports need nothing else from us)."""
        if request.handle_id not in self.leases:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no KV handle {request.handle_id!r} (expired or unpinned)")
        self.leases[request.handle_id] = time.monotonic() + self.lease_s
        return pb.PullResponse(lease_expires_unix_ms=int((time.time() + self.lease_s) * 1000))

    async def run_background(self) -> None:
        """Free the blocks of handles nobody unpinned before their lease ended."""
        while True:
            await asyncio.sleep(min(1.0, self.lease_s / 4))
            now = time.monotonic()
            for handle_id in [h for h, t in self.leases.items() if t < now]:
                del self.leases[handle_id]
                await self.engine.unpin(handle_id)

    def _idle(self) -> bool:
        return super()._idle() and not self.leases


if __name__ == "__main__":
    main("prefill", PrefillServicer)
