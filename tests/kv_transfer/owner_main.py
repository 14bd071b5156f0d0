"""The peer process of the cross-process tests: registers KV tensors filled with a known pattern.

Run as a script (never imported by pytest as a test): prints one ``METADATA <dtype> <hex>`` line per
dtype, then ``READY``, and serves until stdin closes (the test ends, or dies) or ``--max-life-s``.
Meanwhile it runs commands from stdin, each on its own thread, answering on stdout:

    PUSH <dtype> <dest metadata hex> <transfer id> <src ids> <dst ids> <timeout s>
        -> PUSHED <transfer id> OK | PUSHED <transfer id> ERR <exception class>
    EXPECT <tag> <dtype> <dst ids> <timeout s>
        -> EXPECTED <tag> <transfer id>, later LANDED <tag> OK | LANDED <tag> ERR <exception class>
    CHECK <tag> <dtype> <src ids> <dst ids>      (our blocks dst hold the pattern of blocks src)
        -> CHECKED <tag> OK | CHECKED <tag> BAD
    CLOSE  -> closes every transport (transfers may be in flight), prints CLOSED, exits

Ids are comma-separated ("-" for none).
"""

from __future__ import annotations

import argparse
import datetime
import queue
import sys
import threading
import time
from typing import Any

import torch

from kv_transfer import KVLayout, KVTransport, TransferError, make_transport

_PRINT = threading.Lock()


def say(line: str) -> None:
    with _PRINT:
        print(line, flush=True)


def ids(text: str) -> list[int]:
    return [] if text == "-" else [int(x) for x in text.split(",")]


def _pattern(layout: KVLayout, block_id: int, base: torch.Tensor) -> torch.Tensor:
    values = ((base + block_id * 131) % 256 - 128).to(torch.float32) / 8
    return values.reshape(layout.block_shape).to(layout.torch_dtype)


def _base(layout: KVLayout) -> torch.Tensor:
    n = 1
    for d in layout.block_shape:
        n *= d
    return torch.arange(n, dtype=torch.int64) * 7


def block_pattern(layout: KVLayout, block_id: int) -> torch.Tensor:
    """Block ``block_id``'s values: small multiples of 1/8, exact in bf16, fp16 and fp32."""
    return _pattern(layout, block_id, _base(layout))


def filled_kv(layout: KVLayout) -> torch.Tensor:
    kv = torch.empty((layout.num_blocks, *layout.block_shape), dtype=layout.torch_dtype)
    base = _base(layout)
    for b in range(layout.num_blocks):
        kv[b] = _pattern(layout, b, base)
    return kv


def transport_opts(name: str, store: str | None) -> dict[str, Any]:
    if name != "nccl":
        return {}
    import torch.distributed as dist

    host, port = store.rsplit(":", 1) if store else ("", "0")
    timeout = datetime.timedelta(seconds=30)
    return {"store": dist.TCPStore(host, int(port), None, False, timeout=timeout)}


def run(command: list[str], transports: dict[str, KVTransport]) -> None:
    """One command (see the module docstring)."""
    op = command[0]
    if op == "PUSH":
        _, dtype, md, transfer_id, src, dst, timeout_s = command
        try:
            transports[dtype].push(bytes.fromhex(md), transfer_id, ids(src), ids(dst), float(timeout_s))
            say(f"PUSHED {transfer_id} OK")
        except TransferError as e:
            say(f"PUSHED {transfer_id} ERR {type(e).__name__}")
    elif op == "EXPECT":
        _, tag, dtype, dst, timeout_s = command
        transport = transports[dtype]
        transport.kv[ids(dst)] = 0
        if transport.kv.is_cuda:
            torch.cuda.synchronize()  # zeroed before another process writes them
        transfer_id = transport.expect(ids(dst), float(timeout_s))
        say(f"EXPECTED {tag} {transfer_id}")
        try:
            transport.wait(transfer_id)
            say(f"LANDED {tag} OK")
        except TransferError as e:
            say(f"LANDED {tag} ERR {type(e).__name__}")
    elif op == "CHECK":
        _, tag, dtype, src, dst = command
        transport = transports[dtype]
        ok = all(
            torch.equal(transport.kv[d].cpu(), block_pattern(transport.layout, s)) for s, d in zip(ids(src), ids(dst))
        )
        say(f"CHECKED {tag} {'OK' if ok else 'BAD'}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--transport", required=True)
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--num-blocks", type=int, default=32)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--store", help="host:port of a TCPStore (nccl)")
    p.add_argument("--max-life-s", type=float, default=120.0)
    args = p.parse_args()
    transports: dict[str, KVTransport] = {}
    for dtype in args.dtypes.split(","):
        layout = KVLayout(args.num_blocks, args.num_layers, args.block_size, args.num_kv_heads, args.head_dim, dtype)
        transport = make_transport(args.transport, **transport_opts(args.transport, args.store))
        transport.register(filled_kv(layout).to(args.device))
        transports[dtype] = transport
        say(f"METADATA {dtype} {transport.metadata().hex()}")
    say("READY")
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in sys.stdin] + [lines.put("")], daemon=True).start()
    workers: list[threading.Thread] = []
    end = time.monotonic() + args.max_life_s
    while time.monotonic() < end:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if not line:
            break  # EOF: the test is done with us
        command = line.split()
        if command == ["CLOSE"]:
            break
        worker = threading.Thread(target=run, args=(command, transports), daemon=True)
        worker.start()
        workers.append(worker)
    for transport in transports.values():  # with transfers possibly in flight
        transport.close()
    for worker in workers:  # every command answers (a push after close: TransportClosedError)
        worker.join(timeout=30)
    say("CLOSED")


if __name__ == "__main__":
    main()
