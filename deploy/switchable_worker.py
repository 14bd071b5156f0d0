"""A worker process that serves either tier and switches between them in place (``SwitchRole``,
``worker.roles``): what the launchers start, so the planner can move a worker to the other tier
without a restart. ``python -m deploy.switchable_worker --role decode`` takes every flag of
``python -m decode_worker``; the single-tier entry points stay.

It lives on the top floor because it is the one place both tiers' servicers meet.
"""

from __future__ import annotations

import sys

from decode_worker.service import DecodeServicer
from prefill_worker.service import PrefillServicer
from worker.roles import SwitchableServicer
from worker.server import WorkerIdentity, WorkerServicer, main

TIERS: dict[str, type[WorkerServicer]] = {"prefill": PrefillServicer, "decode": DecodeServicer}


def switchable(identity: WorkerIdentity, engine: object, transport: object) -> SwitchableServicer:
    return SwitchableServicer.build(identity, engine, transport, TIERS)


def run(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "--role" or argv[1] not in TIERS:
        raise SystemExit("usage: python -m deploy.switchable_worker --role prefill|decode [worker flags]")
    sys.argv = [sys.argv[0], *argv[2:]]
    main(argv[1], switchable)


if __name__ == "__main__":
    run(sys.argv[1:])
