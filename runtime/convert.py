"""Conversions between the worker protocol (``runtime.pb.tandem_worker_pb2``) and the shared
types (``protocol``). Messages are converted at the edge; nothing inside passes protobufs around.
Torch-free: the router converts with it too."""

from __future__ import annotations

from protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, Medium
from protocol.load import EngineLoad
from protocol.outputs import FinishReason, RequestOutput
from protocol.sampling import SamplingParams
from runtime.pb import tandem_worker_pb2 as pb

_FINISH_TO_PB = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}


def sampling_to_pb(p: SamplingParams) -> pb.SamplingParams:
    """The token-level part of ``p``: stop strings and the other text fields stay with the caller
    (the router matches them on its text); a worker never sees them."""
    msg = pb.SamplingParams(
        n=p.n, min_tokens=p.min_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
        min_p=p.min_p, repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
    )
    if p.max_tokens is not None:
        msg.max_tokens = p.max_tokens
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def sampling_from_pb(m: pb.SamplingParams) -> SamplingParams:
    """Raises ValueError (with the engine's message) on out-of-range values."""
    return SamplingParams(
        n=m.n if m.HasField("n") else 1,
        max_tokens=m.max_tokens if m.HasField("max_tokens") else None,
        min_tokens=m.min_tokens,
        temperature=m.temperature if m.HasField("temperature") else 1.0,
        top_p=m.top_p if m.HasField("top_p") else 1.0,
        top_k=m.top_k,
        min_p=m.min_p,
        seed=m.seed if m.HasField("seed") else None,
        repetition_penalty=m.repetition_penalty if m.HasField("repetition_penalty") else 1.0,
        presence_penalty=m.presence_penalty,
        frequency_penalty=m.frequency_penalty,
        stop_token_ids=tuple(m.stop_token_ids),
        ignore_eos=m.ignore_eos,
        logprobs=m.logprobs if m.HasField("logprobs") else None,
    )


def output_to_pb(out: RequestOutput) -> pb.SequenceOutput:
    msg = pb.SequenceOutput(index=out.index, token_ids=out.new_token_ids,
                            finish_reason=_FINISH_TO_PB[out.finish_reason])
    for lp in out.new_logprobs:
        msg.logprobs.append(pb.TokenLogprob(
            logprob=lp.logprob, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top.items()]))
    if isinstance(out.stop_reason, int):
        msg.stop_token_id = out.stop_reason
    return msg


def load_to_pb(load: EngineLoad) -> pb.Load:
    return pb.Load(
        num_waiting=load.num_waiting, num_running=load.num_running, num_pulling=load.num_pulling,
        num_queued_prefill_tokens=load.num_queued_prefill_tokens, num_active_blocks=load.num_active_blocks,
        num_total_blocks=load.num_total_blocks, num_free_blocks=load.num_free_blocks,
        num_pinned_blocks=load.num_pinned_blocks, kv_usage=load.kv_usage, num_prompt_tokens=load.num_prompt_tokens,
        num_cached_tokens=load.num_cached_tokens, num_steps=load.num_steps,
    )


def load_from_pb(m: pb.Load) -> EngineLoad:
    return EngineLoad(
        num_waiting=m.num_waiting, num_running=m.num_running, num_pulling=m.num_pulling,
        num_queued_prefill_tokens=m.num_queued_prefill_tokens, num_active_blocks=m.num_active_blocks,
        num_free_blocks=m.num_free_blocks, num_total_blocks=m.num_total_blocks,
        num_pinned_blocks=m.num_pinned_blocks, kv_usage=m.kv_usage, num_prompt_tokens=m.num_prompt_tokens,
        num_cached_tokens=m.num_cached_tokens, num_steps=m.num_steps,
    )


def event_to_pb(ev: KVEvent) -> pb.KVEvent:
    if isinstance(ev, BlockStored):
        return pb.KVEvent(event_id=ev.event_id, block_stored=pb.BlockStored(
            block_hash=ev.block_hash, parent_hash=ev.parent_hash, token_ids=list(ev.token_ids), medium=ev.medium))
    if isinstance(ev, BlockRemoved):
        return pb.KVEvent(event_id=ev.event_id, block_removed=pb.BlockRemoved(block_hash=ev.block_hash,
                                                                              medium=ev.medium))
    assert isinstance(ev, AllBlocksCleared)
    return pb.KVEvent(event_id=ev.event_id, all_blocks_cleared=pb.AllBlocksCleared())


def medium_from_pb(value: int) -> Medium:
    """A ``KVMedium``; a value this build does not know (a newer worker's) reads as the host: held,
    not a device hit."""
    return Medium(value) if value in Medium._value2member_map_ else Medium.HOST


def event_from_pb(msg: pb.KVEvent) -> KVEvent:
    which = msg.WhichOneof("event")
    if which == "block_stored":
        s = msg.block_stored
        return BlockStored(msg.event_id, s.block_hash, s.parent_hash, tuple(s.token_ids), medium_from_pb(s.medium))
    if which == "block_removed":
        return BlockRemoved(msg.event_id, msg.block_removed.block_hash, medium_from_pb(msg.block_removed.medium))
    if which == "all_blocks_cleared":
        return AllBlocksCleared(msg.event_id)
    raise ValueError(f"KV event {msg.event_id} carries no event")
