"""The router process's weight: import time, memory after start, and the full-GC pause.

For each source tree (this one, and with ``--baseline DIR`` another checkout of tandem, measured
in the same run, alternating tree by tree round by round):

- import: ``import router.server`` in a fresh interpreter (``PYTHONPATH`` = the tree): seconds,
  whether ``torch`` got imported, how many modules, how many objects the GC tracks after it;
- start: one aggregated cluster of that tree on a shared etcd (its own namespace): one decode
  worker (``--engine sim``: real block manager, scheduler and gRPC service, no forward pass) and
  a router started through a probe that turns ``gc.freeze()`` into a no-op. Once the router's
  ``/health`` answers 200 the probe reads the router's RSS ("after start"), sends one completion,
  reads the RSS again, then times ``gc.collect()`` (a full collection: what stalls the event loop,
  and every request in flight, when the start-up heap is not frozen), counts the objects the
  collector tracks, and times it again after ``gc.freeze()`` (what the router itself does).

    python bench/router_process.py                              # this tree
    python bench/router_process.py --baseline /tmp/tandem-base  # and a baseline tree, with ratios

Prints medians over ``--repeats`` rounds and new/baseline ratios; writes JSON (``--json``) and,
where matplotlib is installed, a PNG next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
_PROBE = "ROUTER_PROBE "
_READY = "TANDEM_READY "


# ---- inside the probed router process ---------------------------------------------------------------
def _rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _get(url: str, timeout_s: float = 5.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, None
    except OSError:
        return 0, None


def _timed_collections(num_gc: int) -> list[float]:
    import gc

    gc.collect()
    pauses = []
    for _ in range(num_gc):
        t = time.perf_counter()
        gc.collect()
        pauses.append((time.perf_counter() - t) * 1000)
    return pauses


def _probe(http: str, num_gc: int, freeze: Callable[[], None]) -> None:
    """Runs in a thread of the router process: waits for readiness, then measures."""
    import gc

    t0 = time.monotonic()
    while _get(f"{http}/health")[0] != 200:
        time.sleep(0.05)
    models = []
    while not models:
        models = (_get(f"{http}/v1/models")[1] or {}).get("data", [])
        time.sleep(0.05)
    ready_s = time.monotonic() - t0
    rss_ready = _rss_mb()
    body = json.dumps({"model": models[0]["id"], "prompt": "The capital of France is", "max_tokens": 4,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"{http}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        ok = resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] > 0
    rss_served = _rss_mb()
    pauses = _timed_collections(num_gc)
    num_objects = len(gc.get_objects())
    freeze()  # then as a router that freezes its start-up heap
    frozen = _timed_collections(num_gc)
    out = {"ready_s": ready_s, "rss_ready_mb": rss_ready, "rss_served_mb": rss_served, "completion_ok": ok,
           "gc_full_ms": statistics.median(pauses), "gc_full_ms_all": pauses, "gc_objects": num_objects,
           "gc_full_frozen_ms": statistics.median(frozen), "torch_imported": "torch" in sys.modules,
           "num_modules": len(sys.modules)}
    print(_PROBE + json.dumps(out), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def probe_main(http: str, num_gc: int, router_argv: list[str]) -> None:
    """Run the router (``router.server.main``, as ``python -m router`` does) with a probe thread."""
    import gc

    freeze = gc.freeze
    gc.freeze = lambda: None  # measured as if the router did not freeze its start-up heap (then frozen)
    threading.Thread(target=_probe, args=(http, num_gc, freeze), daemon=True).start()
    sys.argv = ["router", *router_argv]
    import router.server

    router.server.main()


# ---- the driver ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Tree:
    label: str
    path: Path

    def env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=str(self.path), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")


def measure_import(tree: Tree) -> dict[str, Any]:
    code = ("import gc, json, sys, time; t = time.perf_counter(); import router.server; "
            "import_s = time.perf_counter() - t; gc.collect(); "
            "print(json.dumps({'import_s': import_s, 'torch': 'torch' in sys.modules, "
            "'num_modules': len(sys.modules), 'gc_objects': len(gc.get_objects())}))")
    out = subprocess.run([sys.executable, "-c", code], env=tree.env(), cwd=tree.path, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_line(proc: subprocess.Popen, prefix: str, timeout_s: float, tail: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            del tail[:-30]
            if line.startswith(prefix) and not done.is_set():
                found.update(json.loads(line[len(prefix):]))
                done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(timeout_s) or not found:
        raise RuntimeError(f"no {prefix.strip()} line within {timeout_s:.0f} s; last output:\n" + "\n".join(tail))
    return found


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def measure_start(tree: Tree, etcd: str, round_no: int, num_gc: int, tmp: Path) -> dict[str, Any]:
    """One cluster of ``tree`` (sim decode worker + probed router) on the shared etcd."""
    ns = f"bench-{tree.label}-{round_no}"
    port, grpc_port = _free_port(), _free_port()
    cfg = {"namespace": ns, "etcd_endpoints": [etcd], "mode": "aggregated", "engine": "sim", "port": port,
           "grpc_port": grpc_port, "metrics_port": 0, "lease_ttl_s": 3, "kv_cache_gib": 0.25,
           "log_level": "WARNING"}
    path = tmp / f"{ns}.json"
    path.write_text(json.dumps(cfg))
    procs: list[subprocess.Popen] = []
    tail: list[str] = []
    try:
        worker = subprocess.Popen([sys.executable, "-m", "decode_worker", "--config", str(path), "--worker-id",
                                   f"decode-{round_no}"], env=tree.env(), cwd=tree.path, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        procs.append(worker)
        _wait_line(worker, _READY, 300, [])
        t0 = time.monotonic()
        router = subprocess.Popen([sys.executable, str(HERE), "--probe", f"http://127.0.0.1:{port}",
                                   "--probe-gc", str(num_gc), "--", "--config", str(path)],
                                  env=tree.env(), cwd=tree.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        procs.append(router)
        result = _wait_line(router, _PROBE, 300, tail)
        result["start_to_ready_s"] = time.monotonic() - t0
        router.wait(30)
        return result
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in rows)


ROWS = (  # (key, label, unit)
    ("import_s", "import router.server", "s"),
    ("num_modules_import", "modules after the import", ""),
    ("gc_objects_import", "GC-tracked objects after the import", ""),
    ("start_to_ready_s", "spawn to /health 200", "s"),
    ("rss_ready_mb", "RSS after start", "MB"),
    ("rss_served_mb", "RSS after one completion", "MB"),
    ("gc_objects", "GC-tracked objects after start", ""),
    ("gc_full_ms", "full gc.collect() (no freeze)", "ms"),
    ("gc_full_frozen_ms", "full gc.collect() (start-up frozen)", "ms"),
)


def summarize(per_tree: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, float]]:
    out = {}
    for label, parts in per_tree.items():
        imports, starts = parts["import"], parts["start"]
        out[label] = {"import_s": _median(imports, "import_s"), "num_modules_import": _median(imports, "num_modules"),
                      "gc_objects_import": _median(imports, "gc_objects"),
                      "torch_imported": any(r["torch"] for r in imports)}
        for key in ("start_to_ready_s", "rss_ready_mb", "rss_served_mb", "gc_objects", "gc_full_ms",
                    "gc_full_frozen_ms"):
            out[label][key] = _median(starts, key)
    return out


def print_table(summary: dict[str, dict[str, float]], repeats: tuple[int, int]) -> None:
    labels = list(summary)
    width = max(len(r[1]) for r in ROWS) + 6
    head = f"{'':<{width}}" + "".join(f"{label:>14}" for label in labels)
    if len(labels) == 2:
        head += f"{labels[0] + '/' + labels[1]:>22}"
    print(f"\nrouter process (medians; {repeats[0]} import runs, {repeats[1]} start runs per tree, alternating)")
    print(head + "\n" + "-" * len(head))
    for key, name, unit in ROWS:
        line = f"{name + (f' ({unit})' if unit else ''):<{width}}"
        values = [summary[label][key] for label in labels]
        line += "".join(f"{v:>14.4g}" if v < 100 else f"{v:>14.0f}" for v in values)
        if len(values) == 2 and values[1]:
            line += f"{values[0] / values[1]:>22.3g}"
        print(line)
    print("torch imported by the router: " + ", ".join(f"{label}: {summary[label]['torch_imported']}"
                                                      for label in labels))


def plot(summary: dict[str, dict[str, float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = [("import_s", "import router.server (s)"), ("gc_objects_import", "GC objects after import"),
            ("rss_ready_mb", "RSS after start (MB)"), ("gc_full_ms", "full GC, no freeze (ms)"),
            ("gc_full_frozen_ms", "full GC, start-up frozen (ms)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2))
    for ax, (key, title) in zip(axes, keys):
        labels = list(summary)
        ax.bar(labels, [summary[label][key] for label in labels], color=["tab:blue", "tab:gray"][:len(labels)])
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


def run(args: argparse.Namespace) -> int:
    trees = [Tree("this", REPO)]
    if args.baseline:
        trees.append(Tree("baseline", Path(args.baseline).resolve()))
    per_tree: dict[str, dict[str, list[dict[str, Any]]]] = {t.label: {"import": [], "start": []} for t in trees}
    for i in range(args.import_repeats):
        for tree in trees if i % 2 == 0 else trees[::-1]:
            per_tree[tree.label]["import"].append(measure_import(tree))
    sys.path.insert(0, str(REPO))
    from runtime.etcd_server import EtcdServer

    with EtcdServer() as etcd, tempfile.TemporaryDirectory(prefix="tandem-router-bench-") as tmp:
        for i in range(args.repeats):
            for tree in trees if i % 2 == 0 else trees[::-1]:
                result = measure_start(tree, etcd.endpoint, i, args.gc_repeats, Path(tmp))
                print(f"[{tree.label} #{i}] ready {result['start_to_ready_s']:.2f} s, RSS {result['rss_ready_mb']:.0f} "
                      f"MB, full GC {result['gc_full_ms']:.1f} ms over {result['gc_objects']} objects",
                      file=sys.stderr, flush=True)
                per_tree[tree.label]["start"].append(result)
    summary = summarize(per_tree)
    print_table(summary, (args.import_repeats, args.repeats))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "runs": per_tree}, indent=1))
        print(f"results written to {args.json}")
        plot(summary, Path(args.json).with_suffix(".png"))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--probe":  # inside the router process: --probe URL --probe-gc N -- ROUTER ARGS
        sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]  # bench/engine.py shadows engine
        sep = argv.index("--")
        probe_main(argv[1], int(argv[3]), argv[sep + 1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default=None, help="another tandem checkout to measure alongside this one")
    p.add_argument("--import-repeats", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3, help="router starts per tree")
    p.add_argument("--gc-repeats", type=int, default=5, help="timed full collections per router")
    p.add_argument("--json", default=None)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
