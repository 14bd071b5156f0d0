"""Switching a worker's tier in place.

:class:`SwitchableServicer` serves either tier from one process: it holds both tiers' servicers
over the one engine and KV transport, answers the current tier's rpcs (the other tier's new
requests get UNAVAILABLE: the router retries them elsewhere), and on ``SwitchRole`` deregisters
from the old tier and registers in the new one. The weights, the KV cache and its prefix cache
stay; requests in flight in the old tier finish on the same engine, and a prefill worker's held
KV handles can still be pushed or unpinned after it became a decode worker (``PushKV``,
``Unpin`` and ``Abort`` always reach the prefill servicer, which owns the holds).

Parking (the launcher's warm pool): ``SwitchRole`` to no tier (``WORKER_ROLE_UNSPECIFIED``) on a
drained, idle worker gives its device back and keeps the process and the model
(``LLMEngine.park``: the weights in pinned host memory, the KV cache freed); it serves no tier
and holds no GPU. ``SwitchRole`` to a tier then takes the device back (``LLMEngine.unpark``) and
registers it there: a start in seconds, without loading the weights again.

A KV transport that registered the GPU cache by address (NIXL, CUDA IPC) follows it: parking
``release``s it first (awaited pushes fail, peers that mapped the cache let go, the memory is
deregistered), unparking ``register``s the cache at its new address and publishes the new
``transport_metadata`` (one ``epoch`` more) in etcd before the routers see the worker again; peers
load it on their next transfer with it and refuse older metadata (``kv_transfer``). A transport that
cannot re-register (``reregister_refusal``: nccl) keeps the worker from parking.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc

from runtime.discovery import register
from runtime.pb import tandem_worker_pb2 as pb
from worker.server import ROLE_SWITCH, WorkerIdentity, WorkerServicer

log = logging.getLogger("tandem.worker")

ROLE_FROM_PB = {pb.WORKER_ROLE_PREFILL: "prefill", pb.WORKER_ROLE_DECODE: "decode"}
ROLE_TO_PB = {v: k for k, v in ROLE_FROM_PB.items()}


class SwitchableServicer(WorkerServicer):
    """Both tiers' rpcs over one engine; the current tier is ``identity.role``."""

    def __init__(self, identity: WorkerIdentity, engine: Any, transport: Any,
                 tiers: Mapping[str, WorkerServicer]) -> None:
        super().__init__(identity, engine, transport)
        if set(tiers) != {"prefill", "decode"}:
            raise ValueError(f"a switchable worker needs a prefill and a decode servicer, got {sorted(tiers)}")
        self.tiers = dict(tiers)
        self.num_inflight = {"prefill": 0, "decode": 0}  # rpcs in flight per tier
        self.previous_role = ""
        self.num_switches = 0
        self.parked = False  # parked: drained, deregistered, its device given back (SwitchRole to no tier)

    @classmethod
    def build(cls, identity: WorkerIdentity, engine: Any, transport: Any,
              classes: Mapping[str, type[WorkerServicer]]) -> SwitchableServicer:
        tiers = {r: c(dataclasses.replace(identity, role=r), engine, transport) for r, c in classes.items()}
        return cls(identity, engine, transport, tiers)

    def configure(self, cfg: Any) -> None:
        super().configure(cfg)
        for tier in self.tiers.values():
            tier.configure(cfg)

    async def run_background(self) -> None:
        await asyncio.gather(*(tier.run_background() for tier in self.tiers.values()))

    def state(self) -> str:
        """serving, draining (parked too: deregistered, it serves nothing), or switching (serving
        its tier; the previous tier's requests still finishing)."""
        if not self.accepting():
            return "draining"
        if self.previous_role and (self.num_inflight[self.previous_role] or
                                   (self.previous_role == "prefill" and len(self.tiers["prefill"].held))):
            return "switching"
        return "serving"

    def _idle(self) -> bool:
        return all(tier._idle() for tier in self.tiers.values())

    # ---- the tiers' rpcs ---------------------------------------------------------------------------
    async def _check(self, role: str, context: grpc.aio.ServicerContext) -> None:
        if not self.accepting():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining")
        if self.identity.role != role:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker serves the {self.identity.role} tier now")

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        await self._check("prefill", context)
        self.num_inflight["prefill"] += 1
        try:
            return await self.tiers["prefill"].Prefill(request, context)
        finally:
            self.num_inflight["prefill"] -= 1

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        await self._check("decode", context)
        self.num_inflight["decode"] += 1
        try:
            async for msg in self.tiers["decode"].Generate(request, context):
                yield msg
        finally:
            self.num_inflight["decode"] -= 1

    async def PushKV(self, request: pb.PushKVRequest, context: grpc.aio.ServicerContext) -> pb.PushKVResponse:
        return await self.tiers["prefill"].PushKV(request, context)

    async def Unpin(self, request: pb.UnpinRequest, context: grpc.aio.ServicerContext) -> pb.UnpinResponse:
        return await self.tiers["prefill"].Unpin(request, context)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        return await self.tiers["prefill"].Abort(request, context)  # held handles, then the engine

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        for tier in self.tiers.values():
            tier.status = pb.WORKER_STATUS_DRAINING
        return await super().Drain(request, context)

    # ---- the switch ----------------------------------------------------------------------------------
    async def SwitchRole(self, request: pb.SwitchRoleRequest, context: grpc.aio.ServicerContext
                         ) -> pb.SwitchRoleResponse:
        start = time.perf_counter()
        if request.role == pb.WORKER_ROLE_UNSPECIFIED:
            return await self._park(context)
        role = ROLE_FROM_PB.get(request.role)
        if role is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "role must be prefill, decode or none (park)")
        if self.parked:
            return await self._unpark(role, context)
        if not self.accepting() or self.membership is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "worker is draining or not registered yet")
        previous = self.identity.role
        if role != previous:
            # From here on the old tier's new calls get UNAVAILABLE; then the routers learn it.
            self.identity = dataclasses.replace(self.identity, role=role)
            share = getattr(getattr(self.engine, "engine", None), "gpu_share", None)
            if share is not None:
                share.role = role  # a prefill worker yields to the decode worker on its GPU: the tier decides
            self.previous_role = previous
            self.num_switches += 1
            await self.membership.move(role)
            ROLE_SWITCH.observe(time.perf_counter() - start)
        return pb.SwitchRoleResponse(previous_role=ROLE_TO_PB[previous], role=ROLE_TO_PB[role],
                                     num_inflight=self.num_inflight[previous] if role != previous else 0,
                                     switch_ms=(time.perf_counter() - start) * 1000)

    # ---- parking -------------------------------------------------------------------------------------
    async def _park(self, context: grpc.aio.ServicerContext) -> pb.SwitchRoleResponse:
        """A drained worker with nothing left gives its device back; it stays deregistered."""
        start = time.perf_counter()
        if self.accepting() or not self._idle():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "only a drained worker with nothing in flight parks: Drain it first")
        refused = self._cannot_park()
        if refused:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, refused)
        if not self.parked:
            follows = self._transport_follows_cache()
            if follows:
                await asyncio.to_thread(self.transport.release)
            try:
                await self.engine.call(lambda e: e.park())
            except BaseException:
                if follows:
                    await self._register_cache()
                raise
            self.parked = True
        return pb.SwitchRoleResponse(previous_role=ROLE_TO_PB[self.identity.role], role=pb.WORKER_ROLE_UNSPECIFIED,
                                     switch_ms=(time.perf_counter() - start) * 1000)

    def _cannot_park(self) -> str:
        """Why this worker cannot park, or "": unparked, a GPU KV cache comes back at a new address,
        which its transport must register again (``KVTransport.reregister_refusal``: nccl cannot). On
        the CPU the address stays (``ModelRunner.park``)."""
        if not self._transport_follows_cache() or self.transport.can_reregister:
            return ""
        return (f"the {self.transport.transport_name} transport registered this worker's GPU KV cache and cannot "
                f"register it again at the new address it gets unparked ({self.transport.reregister_refusal}): "
                "stop it instead")

    def _transport_follows_cache(self) -> bool:
        """Whether parking moves the cache under the transport: a GPU cache (its address changes)."""
        return self.transport is not None and self.transport.kv.device.type == "cuda"

    async def _register_cache(self) -> None:
        """Register the (moved) cache with the transport again and publish its new metadata in the
        registration the routers and peers read (``WorkerInfo.transport_metadata``)."""
        kv = await self.engine.call(lambda e: e.kv_cache)
        await asyncio.to_thread(self.transport.register, kv)
        if self.membership is not None:
            self.membership.info = dataclasses.replace(self.membership.info,
                                                       transport_metadata=self.transport.metadata())

    async def _unpark(self, role: str, context: grpc.aio.ServicerContext) -> pb.SwitchRoleResponse:
        """Take the device back and register in ``role``: the tier's routers send it requests again."""
        start = time.perf_counter()
        if self.membership is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "worker is not registered yet")
        engine_s = await self.engine.call(lambda e: e.unpark())
        t0 = time.perf_counter()
        if self._transport_follows_cache():
            await self._register_cache()
        parts = getattr(getattr(getattr(self.engine, "engine", None), "runner", None), "unpark_s", {})
        log.info("unparked: engine %.2f s (%s), KV transport registered again %.2f s", engine_s,
                 ", ".join(f"{k} {v:.2f}" for k, v in parts.items()), time.perf_counter() - t0)
        self.identity = dataclasses.replace(self.identity, role=role)
        share = getattr(getattr(self.engine, "engine", None), "gpu_share", None)
        if share is not None:
            share.role = role
        self.previous_role = ""
        for tier in (self, *self.tiers.values()):
            tier.status = pb.WORKER_STATUS_SERVING
        self.parked = False
        if self.membership.info.role == role:
            await register(self.membership.plane, self.membership.info)  # its load key was kept
        else:
            await self.membership.move(role)
        return pb.SwitchRoleResponse(previous_role=pb.WORKER_ROLE_UNSPECIFIED, role=ROLE_TO_PB[role],
                                     switch_ms=(time.perf_counter() - start) * 1000)
