"""The decode tier: ``Generate`` streams a request's tokens. With a KV handle it allocates
blocks, reuses its own cached prefix, pulls only the missing prompt blocks from the prefill
worker, unpins them there, and decodes from the first token. Without one (or when the pull
fails or the lease has ended) it prefills locally: no request is lost to a transfer failure."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from prometheus_client import Counter

from kv_transfer import TransferError
from runtime import settings
from runtime.convert import output_to_pb, sampling_from_pb
from runtime.pb import tandem_worker_pb2 as pb
from runtime.pb import tandem_worker_pb2_grpc as pb_grpc
from worker.server import WorkerServicer, main

log = logging.getLogger("tandem.decode")

# Transfer bytes and durations are counted by kv_transfer itself; this counts the fallbacks.
PULL_FALLBACKS = Counter("tandem_kv_pull_fallbacks_total",
                         "Requests whose KV pull failed or was refused, recomputed locally")


class DecodeServicer(WorkerServicer):
    def configure(self, cfg: settings.ClusterConfig) -> None:
        super().configure(cfg)
        self.pull_timeout_s = cfg.kv_pull_timeout_s
        self._peers: dict[str, pb_grpc.WorkerServiceStub] = {}
        self._unpins: set[asyncio.Task] = set()

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        if not self.accepting():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
        try:
            sampling = sampling_from_pb(request.sampling)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rid = request.request_id
        prompt = list(request.prompt_token_ids)
        stats = pb.PullStats()
        if request.HasField("kv_handle") and sampling.n == 1:
            handle = request.kv_handle
            stream = self.engine.generate_prefilled(
                rid, prompt, handle.first_token_ids[0], sampling,
                lambda indices, local: self._pull(handle, indices, local, stats), request.priority)
        else:
            stream = self.engine.generate(rid, prompt, sampling, request.priority)
        first = True
        remaining = sampling.n
        completion = 0
        try:
            async for out in stream:
                msg = pb.GenerateResponse(outputs=[output_to_pb(out)])
                if first and request.HasField("kv_handle"):
                    msg.pull.CopyFrom(stats)
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

    async def _pull(self, handle: pb.KVHandle, indices: list[int], local: list[int], stats: pb.PullStats) -> bool:
        """Pull the prompt blocks at ``indices`` of the handle into ``local``; then unpin."""
        t0 = time.perf_counter()
        ok = False
        reason = ""
        try:
            num_prompt_blocks = -(-handle.num_tokens // handle.block_size)
            stats.num_reused_blocks = num_prompt_blocks - len(indices)
            if self.transport is None or handle.transport != self.transport.transport_name:
                reason = f"transport mismatch ({handle.transport!r})"
            elif handle.block_size != self.identity.block_size:
                reason = f"block size mismatch ({handle.block_size} != {self.identity.block_size})"
            elif handle.lease_expires_unix_ms and handle.lease_expires_unix_ms < time.time() * 1000:
                reason = "lease expired"
            elif indices:
                remote = [handle.block_ids[i] for i in indices]
                await self.transport.pull_async(handle.transport_metadata, remote, local,
                                                timeout_s=self.pull_timeout_s)
                stats.num_pulled_blocks = len(indices)
                ok = True
            else:
                ok = True
        except TransferError as e:
            reason = f"transfer failed: {e}"
        finally:
            stats.pull_ms = (time.perf_counter() - t0) * 1000
            stats.recomputed = not ok
            # Off the critical path: the prefill worker answers between its engine steps.
            task = asyncio.create_task(self._unpin(handle))
            self._unpins.add(task)
            task.add_done_callback(self._unpins.discard)
        if not ok:
            PULL_FALLBACKS.inc()
            log.warning("request %s: recomputing its prefill locally: %s", handle.request_id, reason)
        return ok

    async def _unpin(self, handle: pb.KVHandle) -> None:
        """Tell the prefill worker we are done with the handle; best effort (its lease is the backstop)."""
        stub = self._peers.get(handle.worker_endpoint)
        if stub is None:
            channel = grpc.aio.insecure_channel(handle.worker_endpoint)
            stub = self._peers[handle.worker_endpoint] = pb_grpc.WorkerServiceStub(channel)
        try:
            await stub.Unpin(pb.UnpinRequest(handle_id=handle.handle_id), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            log.info("unpin of %s on %s failed: %s", handle.handle_id, handle.worker_endpoint, e.code().name)


if __name__ == "__main__":
    main("decode", DecodeServicer)
