"""What a decode worker checks of a ``GenerateRequest``'s KV handle before it acts on it: a
malformed handle is the caller's error (INVALID_ARGUMENT), never an exception inside the
engine or the transfer. A well-formed handle naming blocks the prefill worker does not hold
fails its transfer, and the prompt is recomputed (``decode_worker.handoff``)."""

from __future__ import annotations

from runtime.pb import tandem_worker_pb2 as pb


def check_handle(handle: pb.KVHandle, num_prompt_tokens: int, block_size: int) -> None:
    """ValueError naming what is wrong with ``handle`` for a prompt of ``num_prompt_tokens``."""
    if not handle.request_id:
        raise ValueError("kv_handle.request_id is empty")
    if not handle.first_token_ids:
        raise ValueError("kv_handle.first_token_ids is empty: the prefill worker's first token is missing")
    if handle.num_tokens != num_prompt_tokens:
        raise ValueError(f"kv_handle.num_tokens is {handle.num_tokens}, the prompt has {num_prompt_tokens} tokens")
    want = -(-handle.num_tokens // block_size)
    if len(handle.block_ids) != want:
        raise ValueError(f"kv_handle has {len(handle.block_ids)} block ids; {handle.num_tokens} tokens take {want} "
                         f"blocks of {block_size}")
    host, sep, port = handle.worker_endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"kv_handle.worker_endpoint {handle.worker_endpoint!r} is not host:port")
