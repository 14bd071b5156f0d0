"""The saturation spill's ITL rule (``router.policy.spill_breaks_itl``): a prompt the prefill tier has no room
for goes to a decode worker only where its chunks slow no decoding request. Used by the replay's
``--spill-idle-only`` (``bench/planner_sim.py``); the real router does not read it yet."""

from router.policy import spill_breaks_itl


def test_a_long_prompt_breaks_the_itl_of_a_decoding_worker_only() -> None:
    # max_local_prefill_tokens 64: a decode worker prefills up to 64 tokens in any case
    assert spill_breaks_itl(25_000, 64, decoding=True)
    assert spill_breaks_itl(65, 64, decoding=True)  # one token over what it prefills anyway
    assert not spill_breaks_itl(25_000, 64, decoding=False)  # idle: nothing waits for its steps
    assert not spill_breaks_itl(64, 64, decoding=True)  # within what it prefills anyway
    assert not spill_breaks_itl(0, 64, decoding=True)
