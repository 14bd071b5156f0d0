"""The decode tier: ``Generate`` streams a request's tokens. With a KV handle it allocates
blocks, reuses its own cached prefix and gets only the missing prompt blocks from the prefill
worker (``handoff.KVHandoff``: pushed by it, or pulled by us, whichever the transports measured
faster), and decodes from the first token; its other requests keep stepping meanwhile. Without a
handle (or when the transfer fails) it prefills locally: no request is lost to a transfer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from decode_worker.handoff import KVHandoff
from decode_worker.wire import check_handle
from runtime import settings, trace
from runtime.convert import output_to_pb, sampling_from_pb
from runtime.pb import tandem_worker_pb2 as pb
from worker.server import WorkerServicer, main, observe_output


class DecodeServicer(WorkerServicer):
    def configure(self, cfg: settings.ClusterConfig) -> None:
        super().configure(cfg)
        self.handoff = KVHandoff(self.transport, self.identity.block_size, cfg.kv_pull_timeout_s,
                                 cfg.kv_transfer_mode)

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
        if request.HasField("kv_handle") and sampling.n == 1:
            handle = request.kv_handle
            stream = self.engine.generate_prefilled(
                rid, prompt, handle.first_token_ids[0], sampling,
                lambda indices, local: self.handoff.fetch(handle, indices, local, stats), request.priority)
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
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


if __name__ == "__main__":
    main("decode", DecodeServicer)
