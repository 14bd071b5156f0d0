"""The prefill worker's view of where each request's ``Prefill`` is (``prefill_worker.service.Prefills``),
for a push sent ahead (``PushKV`` with ``wait_for_prefill``): it waits for the prefill to arrive
and to end, however long it runs; it is answered at once after the end; a prefill that never
arrives, or one refused or aborted, ends the wait; a request id used again starts afresh."""

from __future__ import annotations

import asyncio

from prefill_worker.service import Prefills


def test_a_push_sent_ahead_waits_for_its_prefill_to_arrive_and_end() -> None:
    async def main() -> None:
        prefills = Prefills(keep_s=30.0)
        waiting = asyncio.ensure_future(prefills.wait_ended("r1", 5.0))
        await asyncio.sleep(0.02)
        assert not waiting.done()  # not arrived
        prefills.arrive("r1")
        await asyncio.sleep(0.02)
        assert not waiting.done()  # arrived, still prefilling: no deadline now
        prefills.first_tokens("r1", [7])
        prefills.end("r1")
        assert await waiting and prefills.first_token_ids("r1") == [7]
        assert await asyncio.wait_for(prefills.wait_ended("r1", 5.0), 0.5)  # ended: at once

        assert not await prefills.wait_ended("never", 0.05)  # no prefill arrived in time

        aborted = asyncio.ensure_future(prefills.wait_ended("r2", 5.0))
        await asyncio.sleep(0.02)
        prefills.refuse("r2")  # Abort before its Prefill came (or the Prefill was refused)
        assert await aborted and prefills.first_token_ids("r2") == []

        prefills.arrive("r1")  # the id again: a new prefill, waited for anew
        again = asyncio.ensure_future(prefills.wait_ended("r1", 5.0))
        await asyncio.sleep(0.02)
        assert not again.done() and prefills.first_token_ids("r1") == []
        prefills.end("r1")
        assert await again

    asyncio.run(main())
