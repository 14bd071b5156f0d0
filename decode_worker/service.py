"""The decode tier: ``Generate`` streams a request's tokens. With a KV handle it allocates
blocks, reuses its own cached prefix and gets only the missing prompt blocks from the prefill
worker (``handoff.KVHandoff``: pushed by it, or pulled by us, whichever the transports measured
faster), and decodes from the first token; its other requests keep stepping meanwhile. Without a
handle (or when the transfer fails) it prefills locally: no request is lost to a transfer. A
handle sent ahead (no first token yet: the prompt still prefills) is pushed as soon as the
prefill ends (``KVHandoff.fetch_ahead``); if it cannot be, the call ends with ABORTED before any
output and the router calls again with the whole handle."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from decode_worker.handoff import KVHandoff
from decode_worker.wire import check_handle, sent_ahead
from engine.async_engine import HandoffAbortedError, Landing
from runtime import settings, trace
from runtime.convert import output_to_pb, sampling_from_pb
from runtime.internal_grpc import InternalGrpc
from runtime.pb import tandem_worker_pb2 as pb
from worker.server import WorkerServicer, main, observe_output


class DecodeServicer(WorkerServicer):
    def configure(self, cfg: settings.ClusterConfig) -> None:
        super().configure(cfg)
        self.handoff = KVHandoff(self.transport, self.identity.block_size, cfg.kv_pull_timeout_s,
                                 cfg.kv_transfer_mode, InternalGrpc.from_config(cfg))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        if not self.accepting():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
        try:
            sampling = sampling_from_pb(request.sampling)
            if request.HasField("kv_handle") and sampling.n == 1:
                check_handle(request.kv_handle, len(request.prompt_token_ids), self.identity.block_size)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rid = request.request_id
        trace.mark(rid, "d.recv")
        prompt = list(request.prompt_token_ids)
        stats = pb.PullStats()
        handle = request.kv_handle
        if request.HasField("kv_handle") and sent_ahead(handle):
            if sampling.n != 1 or not self.handoff.pushes(handle):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    "a handle sent ahead is taken pushed only, for n = 1")

            async def fetch_ahead(indices: list[int], local: list[int]) -> Landing:
                first = await self.handoff.fetch_ahead(handle, indices, local, stats)
                return Landing(first is not None, first)

            stream = self.engine.generate_prefilled(rid, prompt, None, sampling, fetch_ahead, request.priority)
        elif request.HasField("kv_handle") and sampling.n == 1:
            async def fetch(indices: list[int], local: list[int]) -> Landing:
                return Landing(await self.handoff.fetch(handle, indices, local, stats))

            stream = self.engine.generate_prefilled(rid, prompt, handle.first_token_ids[0], sampling, fetch,
                                                    request.priority)
        else:
            stream = self.engine.generate(rid, prompt, sampling, request.priority)
        first = True
        remaining = sampling.n
        completion = 0
        try:
            async for out in stream:
                observe_output(out)
                msg = pb.GenerateResponse(outputs=[output_to_pb(out)])
                if first and request.HasField("kv_handle"):
                    msg.pull.CopyFrom(stats)
                    trace.mark(rid, "d.msg1")
                first = False
                if out.finished:
                    remaining -= 1
                    completion += out.num_output_tokens
                    if remaining == 0:
                        msg.usage.CopyFrom(pb.Usage(num_prompt_tokens=out.num_prompt_tokens,
                                                    num_completion_tokens=completion,
                                                    num_cached_tokens=out.num_cached_tokens))
                yield msg
        except HandoffAbortedError as e:
            await context.abort(grpc.StatusCode.ABORTED, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


if __name__ == "__main__":
    main("decode", DecodeServicer)
