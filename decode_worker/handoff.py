"""How a decode worker gets a prefilled prompt's KV blocks from the prefill worker holding them.

Two ways, chosen per prefill worker by ``KVTransport.preferred_mode`` (the transports' measured
table; ``--kv-transfer-mode push|pull`` forces one):

- push: we ``expect`` a transfer into our blocks and ask the prefill worker to ``PushKV`` its
  blocks into them; it writes them, releases its own and answers. The blocks are ours once our
  transport's ``wait`` says they landed (a NIXL notification, the owner's done message), which
  may come before the RPC's answer.
- pull: we read its blocks over our transport, then ``Unpin`` them there; its answer says
  whether it still held them throughout (if not, what we read may be another prompt's KV).

A handle sent ahead (the router calls us while the prompt still prefills on the prefill worker)
is pushed only: ``fetch_ahead`` expects the transfer and calls ``PushKV`` with
``wait_for_prefill`` at once, so the prefill worker writes the blocks as soon as its prefill ends;
its answer brings the first token. Then a failure cannot recompute here (no first token): the
request is aborted and the router calls again with the whole handle.

Any other failure recomputes the prompt here. A destination block is never handed back to the engine
while a writer may still write into it: after a failed push we wait for the prefill worker's
answer (the write has ended), and when it cannot answer, for one more transfer timeout, unless
its process is gone (its port refuses connections: no writer is left).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from kv_transfer import KVTransport, TransferError
from runtime import metric_catalog as mc
from runtime import trace
from runtime.internal_grpc import PLAINTEXT, InternalGrpc
from runtime.pb import tandem_worker_pb2 as pb
from runtime.pb import tandem_worker_pb2_grpc as pb_grpc

log = logging.getLogger("tandem.decode")

# Transfer bytes and durations per transport are counted by kv_transfer on the side that starts
# the transfer (the prefill worker for a push); these are the decode worker's view of each handoff.
FALLBACKS = mc.HANDOFF_FALLBACKS.create()
HANDOFF_BLOCKS = mc.HANDOFF_BLOCKS.create()
HANDOFF_SECONDS = mc.HANDOFF_SECONDS.create()
AHEAD_LANDED = mc.HANDOFF_AHEAD_LANDED.create()

_OWNER_MARGIN_S = 0.1  # the owner's push timeout ends this much before our own wait's deadline
_RPC_GRACE_S = 1.0  # how long past the push timeout we wait for the owner's answer
_AHEAD_EXPECT_S = 24 * 3600.0  # a push sent ahead: no deadline of ours (see _receive_push)
_WRITER_DONE = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED, grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION}  # answers after which the owner writes nothing


class KVHandoff:
    """A decode worker's transfers of prompt blocks from prefill workers."""

    def __init__(self, transport: KVTransport | None, block_size: int, timeout_s: float, mode: str = "auto",
                 internal: InternalGrpc = PLAINTEXT) -> None:
        self.transport = transport
        self.internal = internal  # how channels to the prefill workers are made (mutual TLS or plaintext)
        self.block_size = block_size
        self.timeout_s = timeout_s
        self.mode = mode
        self._peers: dict[str, pb_grpc.WorkerServiceStub] = {}
        self._background: set[asyncio.Task] = set()

    async def fetch(self, handle: pb.KVHandle, indices: list[int], local: list[int], stats: pb.PullStats) -> bool:
        """Bring the handle's blocks at ``indices`` into our ``local`` blocks; whether they landed."""
        t0 = time.perf_counter()
        trace.mark(handle.request_id, "d.fetch")
        stats.num_reused_blocks = -(-handle.num_tokens // self.block_size) - len(indices)
        mode = "none"
        try:
            if not indices:
                self._later(self._unpin(handle))
                return True
            mode = self._mode(handle)
            stats.pushed = mode == "push"
            if mode == "push":
                await self._receive_push(handle, indices, local)
            else:
                await self._pull(handle, indices, local)
        except (TransferError, ValueError) as e:
            stats.recomputed = True
            FALLBACKS.inc()
            log.warning("request %s: recomputing its prefill locally: %s", handle.request_id, e)
            return False
        finally:
            stats.pull_ms = (time.perf_counter() - t0) * 1000
        trace.mark(handle.request_id, "d.landed")
        stats.num_pulled_blocks = len(indices)
        HANDOFF_BLOCKS.labels(mode).inc(len(indices))
        HANDOFF_SECONDS.labels(mode).observe(stats.pull_ms / 1000)
        return True

    def pushes(self, handle: pb.KVHandle) -> bool:
        """Whether blocks from the handle's worker come pushed (a handle sent ahead needs that)."""
        try:
            return self._mode(handle) == "push"
        except (TransferError, ValueError):
            return False

    async def fetch_ahead(self, handle: pb.KVHandle, indices: list[int], local: list[int],
                          stats: pb.PullStats) -> int | None:
        """For a handle sent ahead: have the prefill worker push the blocks at ``indices`` into
        our ``local`` blocks as soon as its prefill ends; its first token once they landed, None
        when anything failed (then nothing writes into ``local`` any more)."""
        trace.mark(handle.request_id, "d.fetch")
        stats.num_reused_blocks = -(-handle.num_tokens // self.block_size) - len(indices)
        stats.pushed = True
        try:
            answer = await self._receive_push(handle, indices, local, wait_for_prefill=True)
        except (TransferError, ValueError) as e:
            log.info("request %s: the handle sent ahead did not land: %s", handle.request_id, e)
            return None
        if answer is None or not answer.first_token_ids:
            log.warning("request %s: the prefill worker pushed without a first token", handle.request_id)
            return None
        trace.mark(handle.request_id, "d.landed")
        # The wait included the prompt's prefill: the handoff is the write itself.
        stats.pull_ms = answer.push_ms
        stats.num_pulled_blocks = len(indices)
        HANDOFF_BLOCKS.labels("push").inc(len(indices))
        HANDOFF_SECONDS.labels("push").observe(answer.push_ms / 1000)
        AHEAD_LANDED.inc()
        return answer.first_token_ids[0]

    def _mode(self, handle: pb.KVHandle) -> str:
        if self.transport is None:
            raise TransferError("this worker has no KV transport")
        if self.mode != "auto":
            return self.mode
        return self.transport.preferred_mode(handle.transport_metadata)

    async def _pull(self, handle: pb.KVHandle, indices: list[int], local: list[int]) -> None:
        assert self.transport is not None
        remote = [handle.block_ids[i] for i in indices]
        try:
            await self.transport.pull_async(handle.transport_metadata, remote, local, timeout_s=self.timeout_s)
        except TransferError:
            self._later(self._unpin(handle))
            raise
        if not await self._unpin(handle):
            raise TransferError("the prefill worker no longer held the blocks (lease ended, or aborted)")

    async def _receive_push(self, handle: pb.KVHandle, indices: list[int], local: list[int],
                            wait_for_prefill: bool = False) -> pb.PushKVResponse | None:
        """The push into ``local``; the owner's answer, always when it is needed (a handle sent
        ahead: we wait for it even after the blocks landed), else None when they landed first."""
        assert self.transport is not None
        # Sent ahead, the push starts only when the prompt's prefill (and its queue) ends there:
        # nothing bounds that but the prefill's own end, so our wait for the landing has no
        # deadline of its own; the owner's write still gives up after timeout_ms once it starts,
        # and its answer (or its failure) ends our wait.
        expect_s = _AHEAD_EXPECT_S if wait_for_prefill else self.timeout_s
        # Sent ahead, nothing lands before the owner answers: the transport need not look until then.
        transfer_id = self.transport.expect(local, timeout_s=expect_s, ahead=wait_for_prefill) if local else ""
        request = pb.PushKVRequest(request_id=handle.request_id, transport_metadata=self.transport.metadata(),
                                   transfer_id=transfer_id, block_indices=indices, dst_block_ids=local,
                                   timeout_ms=max(self.timeout_s - _OWNER_MARGIN_S, 0.01) * 1000,
                                   wait_for_prefill=wait_for_prefill)
        rpc = asyncio.ensure_future(self._stub(handle.worker_endpoint).PushKV(
            request, timeout=None if wait_for_prefill else self.timeout_s + _RPC_GRACE_S))
        if not local:
            try:
                return await rpc
            except grpc.aio.AioRpcError as e:
                raise TransferError(f"the prefill worker did not answer: {_describe(e)}") from None
        landed = asyncio.ensure_future(self.transport.wait_async(transfer_id))
        if wait_for_prefill:  # the answer brings the first token: wait for it whatever lands first
            try:
                await asyncio.wait({rpc})
            except asyncio.CancelledError:
                # Our caller gave the handle sent ahead up (the router's deadline past the prefill's
                # answer, or its prefill worker failed over): stop asking, but the owner may still
                # write into ``local``, so keep it from the engine as after a failed push.
                written = landed.done() and not landed.cancelled() and landed.exception() is None
                rpc.cancel()
                self.transport.cancel(transfer_id)
                await asyncio.gather(rpc, landed, return_exceptions=True)
                if not written:  # landed: the write is over, nothing more can land
                    await self._after_failed_push(handle.worker_endpoint, TransferError("push given up"))
                raise TransferError("the handle sent ahead was given up before its push answered") from None
        else:
            await asyncio.wait({rpc, landed}, return_when=asyncio.FIRST_COMPLETED)
        if landed.done() and landed.exception() is None and not rpc.done():
            self._later(rpc)  # the owner's answer is not needed any more
            return None
        if rpc.done():  # the owner answered
            error = rpc.exception()
            if error is None:
                self.transport.hurry(transfer_id)
                await landed  # the write ended; its notification is on its way (or it failed)
                return rpc.result()
            self.transport.cancel(transfer_id)
            await asyncio.gather(landed, return_exceptions=True)
            await self._after_failed_push(handle.worker_endpoint, error)
            raise TransferError(f"the prefill worker did not push: {_describe(error)}")
        error = landed.exception()
        await asyncio.gather(rpc, return_exceptions=True)  # the write's end, or its deadline
        await self._after_failed_push(handle.worker_endpoint, rpc.exception())
        raise TransferError(f"push did not land: {error}")

    async def _after_failed_push(self, endpoint: str, error: BaseException | None) -> None:
        """Unless the owner said its write is over, or its process is gone, keep our blocks away
        from the engine for one more transfer timeout: a one-sided write may still land in them."""
        if error is None or (isinstance(error, grpc.aio.AioRpcError) and error.code() in _WRITER_DONE):
            return
        if await _process_gone(endpoint):
            log.info("the prefill worker at %s is gone (%s): no write of it can land", endpoint, _describe(error))
            return
        log.warning("a prefill worker did not answer a failed push (%s): holding its blocks %.1f s more",
                    _describe(error), self.timeout_s)
        await asyncio.sleep(self.timeout_s)

    async def _unpin(self, handle: pb.KVHandle) -> bool:
        """Release the handle's blocks on the prefill worker; whether it still held them."""
        try:
            reply = await self._stub(handle.worker_endpoint).Unpin(pb.UnpinRequest(request_id=handle.request_id),
                                                                   timeout=2.0)
            return reply.unpinned
        except grpc.aio.AioRpcError as e:
            log.info("unpin of %s on %s failed: %s", handle.request_id, handle.worker_endpoint, e.code().name)
            return False

    def _stub(self, endpoint: str) -> pb_grpc.WorkerServiceStub:
        stub = self._peers.get(endpoint)
        if stub is None:
            stub = self._peers[endpoint] = pb_grpc.WorkerServiceStub(self.internal.channel(endpoint))
        return stub

    def _later(self, awaitable: object) -> None:
        """Let ``awaitable`` finish in the background (its errors are logged at debug level)."""
        task = asyncio.ensure_future(awaitable)  # type: ignore[arg-type]
        self._background.add(task)

        def done(t: asyncio.Task) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.debug("background KV handoff call failed: %s", _describe(t.exception()))

        task.add_done_callback(done)


async def _process_gone(endpoint: str, timeout_s: float = 2.0) -> bool:
    """Whether nothing listens on ``endpoint`` any more (the connection is refused: the worker's
    process ended). A live process's kernel accepts the connection however busy the process is;
    an unreachable host (a timeout) is not taken as gone."""
    host, _, port = endpoint.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
    except ConnectionRefusedError:
        return True
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    return False


def _describe(error: BaseException | None) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return repr(error)
