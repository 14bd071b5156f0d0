"""Block owner for the cross-process tests: registers KV tensors filled with a known pattern.

Run as a script (never imported by pytest as a test): prints one ``METADATA <dtype> <hex>`` line per
dtype, then ``READY``, and serves until stdin closes (the test ends, or dies) or ``--max-life-s``.
"""

from __future__ import annotations

import argparse
import select
import sys
import time

import torch

from kv_transfer import KVLayout, make_transport


def block_pattern(layout: KVLayout, block_id: int) -> torch.Tensor:
    """Block ``block_id``'s values: small multiples of 1/8, exact in bf16, fp16 and fp32."""
    n = 1
    for d in layout.block_shape:
        n *= d
    values = ((torch.arange(n, dtype=torch.int64) * 7 + block_id * 131) % 256 - 128).to(torch.float32) / 8
    return values.reshape(layout.block_shape).to(layout.torch_dtype)


def filled_kv(layout: KVLayout) -> torch.Tensor:
    kv = torch.empty((layout.num_blocks, *layout.block_shape), dtype=layout.torch_dtype)
    for b in range(layout.num_blocks):
        kv[b] = block_pattern(layout, b)
    return kv


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
    p.add_argument("--max-life-s", type=float, default=120.0)
    args = p.parse_args()
    transports = []
    for dtype in args.dtypes.split(","):
        layout = KVLayout(args.num_blocks, args.num_layers, args.block_size, args.num_kv_heads, args.head_dim, dtype)
        transport = make_transport(args.transport)
        transport.register(filled_kv(layout).to(args.device))
        transports.append(transport)
        print(f"METADATA {dtype} {transport.metadata().hex()}", flush=True)
    print("READY", flush=True)
    end = time.monotonic() + args.max_life_s
    while time.monotonic() < end:
        readable, _, _ = select.select([sys.stdin], [], [], 0.5)
        if readable:
            break  # a line or EOF: the test is done with us
    for transport in transports:
        transport.close()


if __name__ == "__main__":
    main()
