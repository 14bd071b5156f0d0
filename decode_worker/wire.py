"""What a decode worker checks of a ``GenerateRequest``'s KV handle before it acts on it: a
malformed handle is the caller's error (INVALID_ARGUMENT), never an exception inside the
engine or the transfer. A well-formed handle naming blocks the prefill worker does not hold
fails its transfer, and the prompt is recomputed (``decode_worker.handoff``).

Two forms are well-formed: the whole handle (the prefill worker's answer: its block ids and the
first token) and the handle sent ahead while the prompt still prefills (no block ids and no first
token yet: that absence is the marker; ``decode_worker.service``). Block ids without a first
token, or a first token without block ids, is neither."""

from __future__ import annotations

from runtime.pb import tandem_worker_pb2 as pb


def sent_ahead(handle: pb.KVHandle) -> bool:
    """Whether ``handle`` is a handle sent ahead (no first token yet)."""
    return not handle.first_token_ids


def check_handle(handle: pb.KVHandle, num_prompt_tokens: int, block_size: int) -> None:
    """ValueError naming what is wrong with ``handle`` for a prompt of ``num_prompt_tokens``."""
    if not handle.request_id:
        raise ValueError("kv_handle.request_id is empty")
    if handle.num_tokens != num_prompt_tokens:
        raise ValueError(f"kv_handle.num_tokens is {handle.num_tokens}, the prompt has {num_prompt_tokens} tokens")
    if sent_ahead(handle):
        if handle.block_ids:
            raise ValueError(f"kv_handle.first_token_ids is empty but it has {len(handle.block_ids)} block ids: "
                             "neither a whole handle nor one sent ahead (which has neither)")
    else:
        want = -(-handle.num_tokens // block_size)
        if len(handle.block_ids) != want:
            raise ValueError(f"kv_handle has {len(handle.block_ids)} block ids; {handle.num_tokens} tokens take "
                             f"{want} blocks of {block_size}")
    host, sep, port = handle.worker_endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"kv_handle.worker_endpoint {handle.worker_endpoint!r} is not host:port")
