"""KV block transfer bandwidth: each transport, a few request sizes, owner and puller in two processes.

The owner process registers a KV tensor of ``--num-blocks`` blocks (512 KiB each: 16 layers, block
size 16, 8 KV heads, head dim 64, fp16) and serves it; this process pulls ``size / 512 KiB`` blocks
``--repeats`` times per size after one warm-up pull, checks the values, and prints GiB/s (median and
best) with one progress line per size. ``loopback`` runs in-process (a memcpy baseline).

    python bench/kv_transfer.py                              # loopback, tcp, nixl (if installed)
    python bench/kv_transfer.py --transports tcp --sizes-mib 1,16,128 --scatter
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("UCX_NET_DEVICES", "lo")  # keep NIXL/UCX on loopback

import torch

from kv_transfer import KVLayout, KVTransport, make_transport, merge_runs, nixl_available

START_TIMEOUT_S = 60.0


def bench_layout(num_blocks: int) -> KVLayout:
    return KVLayout(num_blocks, num_layers=16, block_size=16, num_kv_heads=8, head_dim=64, dtype="float16")


def filled_kv(layout: KVLayout, device: str) -> torch.Tensor:
    """Block b holds the value b everywhere (exact in fp16 below 2048 blocks)."""
    kv = torch.empty((layout.num_blocks, *layout.block_shape), dtype=layout.torch_dtype, device=device)
    for b in range(layout.num_blocks):
        kv[b].fill_(b)
    return kv


def _owner(transport: str, num_blocks: int, device: str, conn: Connection) -> None:
    """Child process: serve a filled KV tensor until the parent says stop (or goes away)."""
    with make_transport(transport) as owner:
        owner.register(filled_kv(bench_layout(num_blocks), device))
        conn.send(owner.metadata())
        while not conn.poll(1.0):
            if os.getppid() == 1:
                return
        conn.recv()


def block_ids(num: int, scatter: bool) -> tuple[list[int], list[int]]:
    """Contiguous: one run. Scatter: remote every other block, so every block is its own descriptor."""
    if scatter:
        return [2 * i for i in range(num)], list(range(num))
    return list(range(num)), list(range(num))


def run_sizes(puller: KVTransport, md: bytes, sizes_mib: list[int], repeats: int, scatter: bool, label: str) -> None:
    bpb = puller.layout.bytes_per_block
    for size in sizes_mib:
        num = max(1, size * 2**20 // bpb)
        remote, local = block_ids(num, scatter)
        puller.kv.zero_()
        puller.pull(md, remote, local, timeout_s=30.0)  # warm-up: connections, first-touch
        results = [puller.pull(md, remote, local, timeout_s=30.0) for _ in range(repeats)]
        for r, loc in zip(remote, local):
            if puller.kv[loc].flatten()[0].item() != r or puller.kv[loc].flatten()[-1].item() != r:
                raise SystemExit(f"{label}: block {r} -> {loc} has wrong values")
        rates = [res.gib_per_s for res in results]
        median_ms = statistics.median(res.duration_s for res in results) * 1000
        print(
            f"{label:<22} {size:>5} MiB {num:>5} blocks {len(merge_runs(remote, local)):>5} runs  "
            f"median {statistics.median(rates):6.2f} GiB/s  best {max(rates):6.2f} GiB/s  {median_ms:8.2f} ms",
            flush=True,
        )


def bench_transport(transport: str, sizes_mib: list[int], repeats: int, scatter: bool, device: str) -> None:
    max_blocks = max(1, max(sizes_mib) * 2**20 // bench_layout(1).bytes_per_block)
    remote_blocks = 2 * max_blocks if scatter else max_blocks
    label = f"{transport}{' (in-process)' if transport == 'loopback' else ''}{'' if device == 'cpu' else ' ' + device}"
    with make_transport(transport) as puller:
        puller.register(torch.zeros((max_blocks, *bench_layout(1).block_shape), dtype=torch.float16, device=device))
        if transport == "loopback":
            with make_transport("loopback") as owner:
                owner.register(filled_kv(bench_layout(remote_blocks), device))
                run_sizes(puller, owner.metadata(), sizes_mib, repeats, scatter, label)
            return
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_owner, args=(transport, remote_blocks, device, child), daemon=True)
        proc.start()
        try:
            if not parent.poll(START_TIMEOUT_S):
                raise SystemExit(f"{transport}: owner process did not start within {START_TIMEOUT_S} s")
            run_sizes(puller, parent.recv(), sizes_mib, repeats, scatter, label)
        finally:
            parent.send("stop")
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)


def main() -> None:
    default = ["loopback", "tcp", *(["nixl"] if nixl_available() else [])]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transports", default=",".join(default))
    p.add_argument("--sizes-mib", default="1,16,128")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scatter", action="store_true", help="non-contiguous remote blocks (one run each)")
    p.add_argument("--device", default="cpu", help="where both KV tensors live: cpu or cuda")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    print(
        f"# torch {torch.__version__}, {os.cpu_count()} CPUs, device {args.device}, "
        f"{'scatter' if args.scatter else 'contiguous'} blocks",
        flush=True,
    )
    for transport in args.transports.split(","):
        bench_transport(transport, sizes, args.repeats, args.scatter, args.device)


if __name__ == "__main__":
    main()
