"""KV block transfer bandwidth between two processes: each transport, pushed and pulled, against a
``copy_`` of the same bytes measured in the same run (alternating, one of each per repeat).

This process is the initiator; a spawned peer process holds the other KV tensor. pull: we READ the
peer's blocks into ours. push: the peer ``expect``s, we WRITE our blocks into its blocks, the peer's
``wait`` returns (its own latency, expect to landed, is reported as ``dest_ms``). Every transfer's
blocks are checked (first and last value of each). ``loopback`` runs in-process. GB = 1e9 bytes.

    python bench/kv_transfer.py                                # CPU DRAM: loopback, tcp, nixl, nccl (gloo)
    python bench/kv_transfer.py --device cuda --out /tmp/kv    # one GPU, two processes: cuda_ipc, nixl, tcp
    python bench/kv_transfer.py --device cuda --transports cuda_ipc --scatter   # one gather kernel
    python bench/kv_transfer.py --device cuda --write-table kv_transfer/default_table.json

``--device cuda`` uses Llama-3.1-8B's KV block (32 layers, 8 KV heads, head dim 128, block 16, bf16:
2 MiB a block); CPU mode a 512 KiB block. ``--write-table`` merges the medians at ``--table-size-mib``
into the selection table for this run's locality (``same_gpu`` on one GPU, ``cpu`` in host memory).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("UCX_NET_DEVICES", "lo")  # keep NIXL/UCX on loopback

import torch

from kv_transfer import KVLayout, KVTransport, TransferError, make_transport, nixl_available

START_TIMEOUT_S = 120.0
TIMEOUT_S = 60.0


def bench_layout(num_blocks: int, device: str) -> KVLayout:
    if device == "cpu":
        return KVLayout(num_blocks, num_layers=16, block_size=16, num_kv_heads=8, head_dim=64, dtype="float16")
    return KVLayout(num_blocks, num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16")


def fill_value(block: int, side: int) -> float:
    """Block ``block`` of side 0 (the peer) or 1 (us): small integers, exact in fp16 and bf16."""
    return float(block % 100 + 100 * side + 1)


def filled_kv(layout: KVLayout, device: str, side: int) -> torch.Tensor:
    kv = torch.empty((layout.num_blocks, *layout.block_shape), dtype=layout.torch_dtype, device=device)
    for b in range(layout.num_blocks):
        kv[b].fill_(fill_value(b, side))
    return kv


def refill(kv: torch.Tensor, ids: list[int], side: int) -> None:
    """Put ``side``'s own fill back into blocks ``ids`` (a push overwrote them)."""
    values = torch.tensor([fill_value(b, side) for b in ids], dtype=kv.dtype, device=kv.device)
    kv[ids] = values.view(-1, *([1] * (kv.dim() - 1))).expand(len(ids), *kv.shape[1:])


def check_blocks(kv: torch.Tensor, src_ids: list[int], dst_ids: list[int], side: int) -> bool:
    """``kv[dst]`` holds the fill of ``src`` of ``side`` (first and last value of each block)."""
    dst = torch.tensor(dst_ids, device=kv.device)
    flat = kv.index_select(0, dst).reshape(len(dst_ids), -1)
    want = torch.tensor([fill_value(s, side) for s in src_ids], dtype=kv.dtype, device=kv.device)
    return bool(torch.equal(flat[:, 0], want) and torch.equal(flat[:, -1], want))


def transport_opts(name: str, store_addr: tuple[str, int] | None, is_master: bool) -> dict[str, Any]:
    if name != "nccl":
        return {}
    import torch.distributed as dist

    assert store_addr is not None
    host, port = store_addr
    timeout = datetime.timedelta(seconds=60)
    return {"store": dist.TCPStore(host, port, None, is_master, timeout=timeout, wait_for_workers=False)}


def _peer(name: str, num_blocks: int, device: str, store_addr: Any, conn: Connection) -> None:
    """Child process: serve a filled KV tensor; answer expect/result requests until told to stop."""
    with make_transport(name, **transport_opts(name, store_addr, False)) as peer:
        peer.register(filled_kv(bench_layout(num_blocks, device), device, side=0))
        conn.send(peer.metadata())
        outcomes: dict[str, Any] = {}

        def wait(transfer_id: str, src: list[int], dst: list[int]) -> None:
            try:
                result = peer.wait(transfer_id)
                ok = check_blocks(peer.kv, src, dst, side=1)
                refill(peer.kv, dst, side=0)  # before answering: the next transfer may read them
                if peer.kv.is_cuda:
                    torch.cuda.synchronize()
                outcomes[transfer_id] = (result.duration_s, ok)
            except TransferError as e:
                outcomes[transfer_id] = (None, str(e))

        while True:
            if not conn.poll(1.0):
                if os.getppid() == 1:
                    return
                continue
            msg = conn.recv()
            if msg[0] == "stop":
                return
            if msg[0] == "expect":
                _, src, dst = msg
                peer.kv[dst] = 0
                if peer.kv.is_cuda:
                    torch.cuda.synchronize()  # zeroed before the other process writes
                transfer_id = peer.expect(dst, timeout_s=TIMEOUT_S)
                threading.Thread(target=wait, args=(transfer_id, src, dst), daemon=True).start()
                conn.send(transfer_id)
            elif msg[0] == "result":
                while msg[1] not in outcomes:
                    time.sleep(1e-4)
                conn.send(outcomes.pop(msg[1]))


def block_ids(num: int, scatter: bool) -> tuple[list[int], list[int]]:
    """(peer ids, our ids). Scatter: every other peer block, so each block is its own run."""
    return ([2 * i for i in range(num)] if scatter else list(range(num))), list(range(num))


class CopyBaseline:
    """``dst.copy_(src)`` of the same bytes in this process: the rate a transfer is compared with."""

    def __init__(self, max_bytes: int, device: str) -> None:
        self.src = torch.ones(max_bytes, dtype=torch.uint8, device=device)
        self.dst = torch.empty(max_bytes, dtype=torch.uint8, device=device)
        self.cuda = device != "cpu"

    def seconds(self, nbytes: int) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.dst[:nbytes].copy_(self.src[:nbytes])
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def measure(
    us: KVTransport, md: bytes, conn: Connection | None, owner: KVTransport | None, mode: str,
    src: list[int], dst: list[int],
) -> tuple[float, float | None]:  # fmt: skip
    """One transfer: (seconds as the initiator saw it, the destination's seconds for a push)."""
    if mode == "pull":
        us.kv[dst] = 0
        if us.kv.is_cuda:
            torch.cuda.synchronize()  # zeroed before another process (nixl, tcp) writes
        result = us.pull(md, src, dst, timeout_s=TIMEOUT_S)  # src: peer ids, dst: ours
        if not check_blocks(us.kv, src, dst, side=0):
            raise SystemExit(f"{us.transport_name} pull: wrong values")
        return result.duration_s, None
    # push our blocks dst(ours) into the peer's blocks src(peer ids)
    if owner is not None:  # loopback: the peer lives here
        owner.kv[src] = 0
        transfer_id = owner.expect(src, timeout_s=TIMEOUT_S)
        result = us.push(md, transfer_id, dst, src, timeout_s=TIMEOUT_S)
        landed = owner.wait(transfer_id)
        if not check_blocks(owner.kv, dst, src, side=1):
            raise SystemExit("loopback push: wrong values")
        refill(owner.kv, src, side=0)
        return result.duration_s, landed.duration_s
    assert conn is not None
    conn.send(("expect", dst, src))
    transfer_id = conn.recv()
    result = us.push(md, transfer_id, dst, src, timeout_s=TIMEOUT_S)
    conn.send(("result", transfer_id))
    dest_s, ok = conn.recv()
    if ok is not True:
        raise SystemExit(f"{us.transport_name} push: destination says {ok}")
    return result.duration_s, dest_s


def run_sizes(ctx: dict[str, Any], name: str, mode: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    us, md, conn, owner, baseline = ctx["us"], ctx["md"], ctx["conn"], ctx["owner"], ctx["baseline"]
    bpb = us.layout.bytes_per_block
    rows = []
    for size in args.sizes:
        num = max(1, size * 2**20 // bpb)
        src, dst = block_ids(num, args.scatter)
        nbytes = num * bpb
        measure(us, md, conn, owner, mode, src, dst)  # warm-up: connections, mappings, first touch
        times, dest_times, copies = [], [], []
        for _ in range(args.repeats):
            copies.append(baseline.seconds(nbytes))
            seconds, dest_s = measure(us, md, conn, owner, mode, src, dst)
            times.append(seconds)
            if dest_s is not None:
                dest_times.append(dest_s)
        row = {
            "transport": name,
            "mode": mode,
            "size_mib": size,
            "num_blocks": num,
            "gb_per_s": nbytes / statistics.median(times) / 1e9,
            "gb_per_s_best": nbytes / min(times) / 1e9,
            "ms": statistics.median(times) * 1e3,
            "dest_ms": statistics.median(dest_times) * 1e3 if dest_times else None,
            "copy_gb_per_s": nbytes / statistics.median(copies) / 1e9,
        }
        row["vs_copy"] = row["gb_per_s"] / row["copy_gb_per_s"]
        rows.append(row)
        dest = f"  dest {row['dest_ms']:8.3f} ms" if row["dest_ms"] is not None else ""
        print(
            f"{name:<9} {mode:<4} {size:>5} MiB {num:>4} blocks  {row['gb_per_s']:9.2f} GB/s "
            f"(best {row['gb_per_s_best']:9.2f})  {row['ms']:9.3f} ms{dest}   copy_ {row['copy_gb_per_s']:9.2f} GB/s"
            f"  ratio {row['vs_copy']:.3f}",
            flush=True,
        )
    return rows


def bench_transport(name: str, args: argparse.Namespace, baseline: CopyBaseline) -> list[dict[str, Any]]:
    device = args.device
    max_blocks = max(1, max(args.sizes) * 2**20 // bench_layout(1, device).bytes_per_block)
    peer_blocks = 2 * max_blocks if args.scatter else max_blocks
    store_addr = None
    if name == "nccl":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            store_addr = ("127.0.0.1", s.getsockname()[1])
    with make_transport(name, **transport_opts(name, store_addr, True)) as us:
        us.register(filled_kv(bench_layout(max_blocks, device), device, side=1))
        ctx: dict[str, Any] = {"us": us, "conn": None, "owner": None, "baseline": baseline}
        if name == "loopback":
            with make_transport("loopback") as owner:
                owner.register(filled_kv(bench_layout(peer_blocks, device), device, side=0))
                ctx.update(md=owner.metadata(), owner=owner)
                return [row for mode in args.modes for row in run_sizes(ctx, name, mode, args)]
        mpctx = mp.get_context("spawn")
        parent, child = mpctx.Pipe()
        proc = mpctx.Process(target=_peer, args=(name, peer_blocks, device, store_addr, child), daemon=True)
        proc.start()
        try:
            if not parent.poll(START_TIMEOUT_S):
                raise SystemExit(f"{name}: peer process did not start within {START_TIMEOUT_S} s")
            ctx.update(md=parent.recv(), conn=parent)
            return [row for mode in args.modes for row in run_sizes(ctx, name, mode, args)]
        finally:
            parent.send(("stop",))
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)


PROBE_CONFIGS = [(16384, 2048, 4), (16384, 4096, 8), (65536, 8192, 8), (8192, 1024, 4), (32768, 4096, 4)]


def gpu_ms(fn: Any, repeats: int) -> float:
    """Median GPU time of ``fn`` (CUDA events), after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def probe(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Where a cuda_ipc transfer's time goes: GPU time (events, no Python) of one 1 GiB copy between
    local memory and the peer's memory mapped through CUDA IPC, by memcpy (``copy_``), an elementwise
    kernel, and the gather kernel in several configurations."""
    from kv_transfer import PeerMetadata, gather
    from kv_transfer.cuda_ipc import CudaIpcTransport

    num = 2**30 // bench_layout(1, "cuda").bytes_per_block
    mpctx = mp.get_context("spawn")
    parent, child = mpctx.Pipe()
    proc = mpctx.Process(target=_peer, args=("cuda_ipc", num, "cuda", None, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(START_TIMEOUT_S):
            raise SystemExit("probe: peer process did not start")
        peer = PeerMetadata.decode(parent.recv())
        src = filled_kv(bench_layout(num, "cuda"), "cuda", side=1)
        opener = CudaIpcTransport()  # asks the peer for its handle (it exports one per peer that maps it)
        opener.register(src)
        mapped = opener._acquire(peer).kv
        dst = torch.empty_like(src)
        words = {"local": gather._words(src), "dst": gather._words(dst), "mapped": gather._words(mapped)}
        ids = torch.arange(num, dtype=torch.int32, device="cuda")
        kernel = gather._kernel()
        cases: dict[str, Any] = {
            "copy_ local->local": lambda: dst.copy_(src),
            "copy_ mapped->local": lambda: dst.copy_(mapped),
            "copy_ local->mapped": lambda: mapped.copy_(src),
            "elementwise local->local": lambda: torch.bitwise_or(words["local"], 0, out=words["dst"]),
            "elementwise mapped->local": lambda: torch.bitwise_or(words["mapped"], 0, out=words["dst"]),
        }
        for config in PROBE_CONFIGS:
            for label, a, b in (("local->local", "local", "dst"), ("mapped->local", "mapped", "dst"),
                                ("local->mapped", "local", "mapped")):  # fmt: skip
                cases[f"gather {config} {label}"] = lambda a=a, b=b, config=config: gather.launch(
                    kernel, words[a], words[b], ids, ids, config
                )
        rows = []
        for label, fn in cases.items():
            ms = gpu_ms(fn, args.repeats)
            rows.append({"case": label, "ms": ms, "gb_per_s": 2**30 / ms / 1e6})
            print(f"probe {label:<44} {ms:8.3f} ms  {2**30 / ms / 1e6:9.1f} GB/s", flush=True)
        return rows
    finally:
        parent.send(("stop",))
        proc.join(timeout=30)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(f"{row['transport']} {row['mode']}", []).append(row)
    for label, pts in sorted(series.items()):
        ax.plot([p["size_mib"] for p in pts], [p["gb_per_s"] for p in pts], marker="o", label=label)
    copies: dict[int, list[float]] = {}
    for row in rows:
        copies.setdefault(row["size_mib"], []).append(row["copy_gb_per_s"])
    sizes = sorted(copies)
    ax.plot(sizes, [statistics.median(copies[s]) for s in sizes], "k--", label="copy_ (same process)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("transfer size (MiB)")
    ax.set_ylabel("GB/s (median)")
    ax.set_title(title, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_table(path: Path, rows: list[dict[str, Any]], args: argparse.Namespace, device_name: str) -> None:
    """Merge this run's medians at ``--table-size-mib`` into the selection table at ``path`` (the
    transports measured now replace their entries for this locality; the others stay)."""
    from kv_transfer import selection

    locality = "cpu" if args.device == "cpu" else "same_gpu"
    table = selection.load_table(path) if path.exists() else {"localities": {}}
    rates: dict[str, dict[str, float]] = dict(table["localities"].get(locality, {}).get("gb_per_s", {}))
    for row in rows:  # this run's transports replace their earlier figures; the others stay
        if row["size_mib"] == args.table_size_mib and row["transport"] != "loopback":
            rates[row["transport"]] = {}
    for row in rows:
        if row["size_mib"] == args.table_size_mib and row["transport"] != "loopback":
            rates[row["transport"]][row["mode"]] = round(row["gb_per_s"], 2)
    serving = table["localities"].get(locality, {}).get("serving")  # bench/serve.py's: kept
    table["localities"][locality] = {
        "source": f"bench/kv_transfer.py --device {args.device}, {device_name}, {datetime.date.today()}",
        "size_mib": args.table_size_mib,
        "gb_per_s": rates,
        **({"serving": serving} if serving else {}),
    }
    path.write_text(json.dumps(selection.check_table(table), indent=2) + "\n")
    print(f"# wrote {locality} ({args.table_size_mib} MiB) into {path}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="where both KV tensors live: cpu or cuda")
    p.add_argument("--transports", help="comma-separated (default: all that run on this device here)")
    p.add_argument("--modes", default="push,pull")
    p.add_argument("--sizes-mib", help="comma-separated (default cpu 1,16,128; cuda 16,64,256,512,1024)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scatter", action="store_true", help="non-contiguous peer blocks (one run each)")
    p.add_argument("--out", type=Path, help="directory for kv_transfer_<device>.json and .png")
    p.add_argument("--write-table", type=Path, help="merge the results into this selection table")
    p.add_argument("--table-size-mib", type=int, help="the size whose rates go in the table (default 128/256)")
    p.add_argument(
        "--gather",
        choices=["auto", "kernel"],
        default="auto",
        help="cuda_ipc copies: copy_ for a few runs (auto) or the gather kernel always",
    )
    p.add_argument("--probe", action="store_true", help="cuda: GPU time of 1 GiB copies to/from mapped memory")
    args = p.parse_args()
    if args.gather == "kernel":
        from kv_transfer import gather

        gather.KERNEL_ALWAYS = True
    cuda = args.device != "cpu"
    nixl = ["nixl"] if nixl_available() else []
    default = ["cuda_ipc", *nixl, "tcp"] if cuda else ["loopback", "tcp", *nixl, "nccl"]
    transports = args.transports.split(",") if args.transports else default
    args.sizes = [int(s) for s in (args.sizes_mib or ("16,64,256,512,1024" if cuda else "1,16,128")).split(",")]
    args.modes = args.modes.split(",")
    args.table_size_mib = args.table_size_mib or (256 if cuda else 128)
    device_name = torch.cuda.get_device_name() if cuda else f"{os.cpu_count()} CPUs"
    header = (
        f"# torch {torch.__version__}, {device_name}, device {args.device}, "
        f"{'scatter' if args.scatter else 'contiguous'} blocks, gather {args.gather}, {args.repeats} repeats, "
        "median GB/s (1e9 B/s)"
    )
    print(header, flush=True)
    if args.probe:
        rows = probe(args)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "kv_ipc_probe.json").write_text(json.dumps({"header": header, "results": rows}, indent=2))
        return
    baseline = CopyBaseline(max(args.sizes) * 2**20, args.device)
    rows = [row for name in transports for row in bench_transport(name, args, baseline)]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        suffix = ("_scatter" if args.scatter else "") + ("_kernel" if args.gather == "kernel" else "")
        stem = f"kv_transfer_{args.device}{suffix}"
        meta = {"header": header, "device": args.device, "device_name": device_name, "argv": sys.argv[1:]}
        (args.out / f"{stem}.json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
        plot(rows, args.out / f"{stem}.png", header.removeprefix("# "))
        print(f"# wrote {args.out / stem}.json and .png", flush=True)
    if args.write_table:
        write_table(args.write_table, rows, args, device_name)


if __name__ == "__main__":
    main()
