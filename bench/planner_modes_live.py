"""The planner's three modes live, one after the other, each on its own ``tandem serve`` cluster
(sim-engine workers with the CPU timing model, the embedded etcd, serve's own planner acting
through serve's launcher) under the same phased open-loop load:

    prefill-heavy (long prompts, short answers) -> decode-heavy (short prompts, long answers) -> idle

    python bench/planner_modes_live.py --out-dir DIR                   # load, throughput, both
    python bench/planner_modes_live.py --modes both --lock /tmp/tandem-heavy.lock --out-dir DIR

Per mode: SLO attainment (TTFT; ITL: the request's p99 gap between streamed chunks; both), the
worker-seconds the cluster held (every worker process alive, starting and draining included,
sampled each second), the planner's scale actions (its etcd history), reversals (a tier's desired
count changing direction: oscillation), how long after the last request the cluster is back to
its minimums (desired and ready), and failed requests (an error or fewer tokens than asked).
Writes ``planner-modes-{mode}.json`` and ``.png`` (load; desired vs ready per tier; TTFT and ITL
per request against the targets) per mode and prints a comparison table. ``--lock``: each mode's
run holds this file's flock (the shared heavy-test lock), several modes in one hold only while
they fit in ``--hold-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import itertools
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "planner"
ROLES = ("prefill", "decode")
HELD = ("starting", "serving", "draining", "restarting")  # a worker in these states holds its GPU


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    rate: float  # requests per second (Poisson)
    isl: int  # mean prompt tokens (lognormal, cv 0.3)
    osl: int  # mean answer tokens


def phases(args: argparse.Namespace) -> list[Phase]:
    return [Phase("prefill-heavy", args.phase_s, args.prefill_rate, args.prefill_isl, args.prefill_osl),
            Phase("decode-heavy", args.phase_s, args.decode_rate, args.decode_isl, args.decode_osl),
            Phase("idle", args.idle_s, 0.0, 0, 0)]


@dataclass
class Request:
    t: float  # arrival, seconds from the load's start
    phase: str
    isl: int
    osl: int
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""

    @property
    def itl_p99_s(self) -> float | None:
        if not self.gaps_s:
            return None
        g = sorted(self.gaps_s)
        return g[min(len(g) - 1, math.ceil(0.99 * len(g)) - 1)]


def arrivals(ps: list[Phase], seed: int) -> list[Request]:
    rng = random.Random(seed)
    sigma = math.sqrt(math.log(1 + 0.3 ** 2))

    def draw(mean: int) -> int:
        return max(1, round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)))

    out, start = [], 0.0
    for p in ps:
        t = start
        while p.rate > 0:
            t += rng.expovariate(p.rate)
            if t >= start + p.seconds:
                break
            out.append(Request(t, p.name, draw(p.isl), max(2, draw(p.osl))))
        start += p.seconds
    return out


def send(client, model: str, req: Request, t0: float, seed: int) -> None:
    """One streamed completion at its arrival time (random token ids: no shared prefixes)."""
    rng = random.Random(seed)
    prompt = [rng.randrange(1000, 40000) for _ in range(req.isl)]
    time.sleep(max(0.0, t0 + req.t - time.monotonic()))
    start = last = time.monotonic()
    first = True
    try:
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=req.osl, stream=True,
                                           temperature=0, stream_options={"include_usage": True})
        for chunk in stream:
            now = time.monotonic()
            if chunk.usage is not None:
                req.tokens = chunk.usage.completion_tokens
            if not chunk.choices:
                continue
            if first:
                req.ttft_s, first = now - start, False
            else:
                req.gaps_s.append(now - last)
            last = now
        if req.tokens != req.osl:
            req.error = f"{req.tokens} of {req.osl} tokens"
    except Exception as e:  # a failed request is data here
        req.error = f"{type(e).__name__}: {str(e)[:160]}"


def _banner(proc: subprocess.Popen, timeout_s: float) -> dict[str, str]:
    """``tandem serve``'s addresses from its banner (the rest of its output is drained)."""
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout_s) or proc.poll() is not None:
        raise RuntimeError("tandem serve did not start:\n" + "".join(lines[-40:]))
    fields = {line.split()[0]: line.split() for line in lines if line.startswith("  ")}
    return {"http": fields["OpenAI"][2].removesuffix("/v1"), "etcd": fields["etcd"][1],
            "launcher": fields["launcher"][1]}


class Sampler:
    """Once a second: the router's ready workers per tier, the planner's desired counts (its
    decision key), and the worker processes alive (the launcher service's list)."""

    def __init__(self, http: str, launcher, cfg, t0: float) -> None:
        self.http, self.launcher, self.cfg, self.t0 = http, launcher, cfg, t0
        self.rows: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        from deploy.launcher import router_health
        from runtime import keys
        from runtime.etcd import ControlPlane
        from runtime.pb import tandem_control_pb2 as cpb

        async with ControlPlane.from_config(self.cfg) as plane:
            nxt = time.monotonic()
            while not self.stop.is_set():
                health = await asyncio.to_thread(router_health, self.http, 2.0)
                dec = await plane.get_message(keys.planner_decision_key(self.cfg.namespace), cpb.PlannerDecision)
                try:
                    services = await asyncio.to_thread(self.launcher.services)
                except Exception:  # the launcher is busy or gone: this second is not sampled
                    services = None
                row = {"t": time.monotonic() - self.t0,
                       "ready_prefill": health.get("prefill_workers", 0),
                       "ready_decode": health.get("decode_workers", 0),
                       "desired_prefill": dec.num_prefill if dec else None,
                       "desired_decode": dec.num_decode if dec else None}
                if services is not None:
                    row["workers"] = sum(1 for s in services if s.role in ROLES and s.state.value in HELD)
                self.rows.append(row)
                nxt += 1.0
                await asyncio.sleep(max(0.0, nxt - time.monotonic()))


def history(cfg) -> list:
    from runtime import keys
    from runtime.etcd import ControlPlane
    from runtime.pb import tandem_control_pb2 as cpb

    async def read() -> list:
        async with ControlPlane.from_config(cfg) as plane:
            got = await plane.get_messages(keys.planner_history_prefix(cfg.namespace), cpb.PlannerDecision)
        return [got[k] for k in sorted(got)]

    return asyncio.run(read())


KIND = {1: "start", 2: "drain", 3: "switch", 4: "abandon"}


def summarize(mode: str, reqs: list[Request], rows: list[dict], decisions: list, args: argparse.Namespace,
              load_end_s: float) -> dict:
    ttft_s, itl_s = args.ttft_ms / 1000, args.itl_ms / 1000
    ok_ttft = [r.error == "" and r.ttft_s is not None and r.ttft_s <= ttft_s for r in reqs]
    ok_itl = [r.error == "" and (r.itl_p99_s is None or r.itl_p99_s <= itl_s) for r in reqs]
    ok_mean = [r.error == "" and (not r.gaps_s or sum(r.gaps_s) / len(r.gaps_s) <= itl_s) for r in reqs]
    n = max(1, len(reqs))
    # worker-seconds: the processes alive each sampled second (a missing sample: the one before)
    worker_s, held = 0.0, 0
    for a, b in itertools.pairwise(rows):
        held = a.get("workers", held)
        worker_s += held * (b["t"] - a["t"])
    actions = {k: 0 for k in KIND.values()}
    # a reversal: a tier's desired count changes direction; a flap: one within args.flap_intervals
    # intervals of that tier's last change (2 -> 1 -> 2), not the answer to a new phase
    reversals, flaps, last_sign = 0, 0, {r: 0 for r in ROLES}
    last_t = {r: -math.inf for r in ROLES}
    counts = dict(zip(ROLES, args.initial))
    for dec in decisions:
        for a in dec.actions:
            actions[KIND[a.kind]] += 1
        moved = {"prefill": dec.num_prefill, "decode": dec.num_decode}
        t = dec.decided_at_unix_ms / 1000
        for r in ROLES:
            sign = (moved[r] > counts[r]) - (moved[r] < counts[r])
            if sign and last_sign[r] and sign != last_sign[r]:
                reversals += 1
                flaps += t - last_t[r] <= args.flap_intervals * args.interval_s
            if sign:
                last_sign[r], last_t[r] = sign, t
        counts = moved
    minimums = (1, 1)

    def at_min(row: dict, kind: str) -> bool:
        return (row.get(f"{kind}_prefill"), row.get(f"{kind}_decode")) == minimums

    back = {}
    for kind in ("desired", "ready"):
        t_back = None
        for row in rows:
            if row["t"] < load_end_s:
                continue
            if at_min(row, kind) and (kind != "ready" or row.get("workers", 2) == sum(minimums)):
                t_back = row["t"] if t_back is None else t_back
            else:
                t_back = None
        back[kind] = None if t_back is None else round(t_back - load_end_s, 1)
    per_phase = {}
    for ph in sorted({r.phase for r in reqs}):
        sel = [(r, a, b) for r, a, b in zip(reqs, ok_ttft, ok_itl) if r.phase == ph]
        per_phase[ph] = {"requests": len(sel), "ttft_ok": sum(a for _, a, _ in sel) / len(sel),
                         "itl_ok": sum(b for _, _, b in sel) / len(sel),
                         "both_ok": sum(a and b for _, a, b in sel) / len(sel)}
    errors: dict[str, int] = {}
    for r in reqs:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {"mode": mode, "requests": len(reqs), "failed": sum(1 for r in reqs if r.error), "errors": errors,
            "ttft_attainment": sum(ok_ttft) / n, "itl_attainment": sum(ok_itl) / n,
            "itl_mean_attainment": sum(ok_mean) / n,
            "attainment": sum(a and b for a, b in zip(ok_ttft, ok_itl)) / n, "per_phase": per_phase,
            "worker_seconds": round(worker_s, 1), "max_workers": max((r.get("workers", 0) for r in rows), default=0),
            "decisions": len(decisions), "actions": actions,
            "scale_actions": actions["start"] + actions["drain"] + actions["switch"], "reversals": reversals,
            "flaps": flaps,
            "back_to_minimums_s": back}


def run_mode(mode: str, args: argparse.Namespace, ps: list[Phase], log_dir: Path) -> dict:
    import openai

    from deploy.launcher_service import RemoteLauncher
    from runtime.settings import ClusterConfig

    cmd = [sys.executable, "-m", "deploy.cli", "serve", "--engine", "sim", "--sim-profile", args.profile,
           "--model", f"dummy:{args.model}", "--port", "0", "--grpc-port", "0",
           "--kv-cache-gib", str(args.kv_cache_gib),
           "--transport", "tcp", "--lease-ttl-s", "3", "--metrics-interval-s", "1", "--drain-timeout-s", "120",
           "--log-dir", str(log_dir), "--log-level", "WARNING",
           "--prefill-workers", str(args.initial[0]), "--decode-workers", str(args.initial[1]),
           "--planner-mode", mode, "--ttft-slo-ms", str(args.ttft_ms), "--itl-slo-ms", str(args.itl_ms),
           "--gpu-budget", str(args.budget), "--adjustment-interval-s", str(args.interval_s)]
    if mode != "load":
        cmd += ["--planner-profile", args.planner_profile]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    try:
        addr = _banner(proc, 180)
        cfg = ClusterConfig(etcd_endpoints=tuple(addr["etcd"].split(",")))
        launcher = RemoteLauncher(addr["launcher"], cfg)
        from deploy.launcher import router_health

        model = router_health(addr["http"])["model"]
        client = openai.OpenAI(base_url=f"{addr['http']}/v1", api_key="unused", max_retries=0, timeout=600)
        reqs = arrivals(ps, args.seed)
        t0 = time.monotonic() + 2.0
        sampler = Sampler(addr["http"], launcher, cfg, t0)
        sampler.thread.start()
        threads = [threading.Thread(target=send, args=(client, model, r, t0, i), daemon=True)
                   for i, r in enumerate(reqs)]
        for t in threads:
            t.start()
        total_s = sum(p.seconds for p in ps)
        time.sleep(max(0.0, t0 + total_s - time.monotonic()))
        for t in threads:  # requests still running past the idle phase: waited for, counted
            t.join(timeout=max(1.0, t0 + total_s + args.drain_s - time.monotonic()))
        load_end_s = max((r.t + (r.ttft_s or 0) + sum(r.gaps_s) for r in reqs), default=0.0)
        while time.monotonic() - t0 < load_end_s + args.after_s and time.monotonic() - t0 < total_s + args.drain_s:
            time.sleep(1.0)
        sampler.stop.set()
        sampler.thread.join(10)
        decisions = history(cfg)
        launcher.stop()
        out = summarize(mode, reqs, sampler.rows, decisions, args, load_end_s)
        out["last_request_done_s"] = round(load_end_s, 1)
        out["timeline"] = sampler.rows
        out["requests_detail"] = [asdict(r) | {"itl_p99_s": r.itl_p99_s, "gaps_s": None,
                                                 "first_gap_s": r.gaps_s[0] if r.gaps_s else None,
                                                 "itl_mean_s": sum(r.gaps_s) / len(r.gaps_s) if r.gaps_s else None}
                                 for r in reqs]
        out["history"] = [{"seq": d.seq, "t_unix_ms": d.decided_at_unix_ms,
                           "actions": [f"{KIND[a.kind]}:{a.role}:{a.worker_id}" for a in d.actions],
                           "reasons": [r.code + (f"[{r.role}]" if r.role else "")
                                       + ("" if not r.values else " " + json.dumps({k: round(v, 3) for k, v in
                                                                                  r.values.items()}))
                                       for r in d.reasons],
                           "num_prefill": d.num_prefill, "num_decode": d.num_decode} for d in decisions]
        out["serve_exit"] = proc.poll()
        return out
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def plot(result: dict, ps: list[Phase], args: argparse.Namespace, path: Path) -> None:
    from bench.plots import _save, plt

    rows, reqs = result["timeline"], result["requests_detail"]
    fig, axes = plt.subplots(5, 1, figsize=(10, 12), sharex=True)
    edges = [0.0]
    for p in ps:
        edges.append(edges[-1] + p.seconds)
    for ax in axes:
        for e in edges[1:-1]:
            ax.axvline(e, color="grey", linestyle=":", linewidth=1)
    width = 5.0
    bins = [k * width for k in range(int(edges[-1] // width) + 2)]
    rate = [sum(1 for r in reqs if b <= r["t"] < b + width) / width for b in bins]
    ptok = [sum(r["isl"] for r in reqs if b <= r["t"] < b + width) / width for b in bins]
    otok = [sum(r["osl"] for r in reqs if b <= r["t"] < b + width) / width for b in bins]
    axes[0].step(bins, rate, where="post", color="black", label="arrivals/s")
    axes[0].set_ylabel("arrivals / s")
    tw = axes[0].twinx()
    tw.step(bins, ptok, where="post", color="tab:blue", alpha=0.6, label="prompt tok/s")
    tw.step(bins, otok, where="post", color="tab:orange", alpha=0.6, label="answer tok/s")
    tw.set_ylabel("tokens / s")
    tw.legend(fontsize=8, loc="upper right")
    for i, p in enumerate(ps):
        axes[0].text(edges[i] + 1, 0.02, p.name, transform=axes[0].get_xaxis_transform(), fontsize=8)
    ts = [r["t"] for r in rows]
    for ax, role in zip(axes[1:3], ROLES):
        ax.step(ts, [r[f"desired_{role}"] if r[f"desired_{role}"] is not None else math.nan for r in rows],
                where="post", label="desired (planner)", color="tab:red")
        ax.step(ts, [r[f"ready_{role}"] for r in rows], where="post", label="ready (router)", color="tab:green",
                linestyle="--")
        ax.set_ylabel(f"{role} workers")
        ax.set_ylim(-0.2, args.budget + 0.5)
    axes[1].step(ts, [r.get("workers", math.nan) for r in rows], where="post", color="grey", alpha=0.5,
                 label="worker processes")
    axes[1].legend(fontsize=8, loc="upper right")
    for ax, key, target, label in ((axes[3], "ttft_s", args.ttft_ms, "TTFT"),
                                   (axes[4], "itl_p99_s", args.itl_ms, "ITL p99 (per request)")):
        ok = [(r["t"], r[key] * 1000) for r in reqs if r[key] is not None and not r["error"]]
        ax.scatter([x for x, _ in ok], [y for _, y in ok], s=6, c=["tab:blue" if y <= target else "tab:red"
                                                                  for _, y in ok])
        bad = [r["t"] for r in reqs if r["error"]]
        if bad:
            ax.scatter(bad, [target] * len(bad), marker="x", color="black", label="failed")
        ax.axhline(target, color="black", linewidth=1, label=f"target {target:g} ms")
        ax.set_ylabel(f"{label} ms")
        ax.set_yscale("log")
        ax.legend(fontsize=8, loc="upper right")
    axes[4].set_xlabel("seconds from the load's start")
    axes[0].set_title(f"planner {result['mode']} mode live: attainment {result['attainment']:.2f}, "
                      f"{result['worker_seconds']:.0f} worker-s, {result['scale_actions']} scale actions, "
                      f"{result['reversals']} reversals ({result['flaps']} flaps)")
    _save(fig, path)


def table(results: list[dict]) -> str:
    cols = ("mode", "reqs", "failed", "TTFT ok", "ITL p99 ok", "ITL mean ok", "both ok", "worker-s", "max workers",
            "actions st/dr/sw", "reversals (flaps)", "to minimums s (desired/ready)")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        a, back = r["actions"], r["back_to_minimums_s"]
        cells = (r["mode"], r["requests"], r["failed"], f"{r['ttft_attainment']:.2f}", f"{r['itl_attainment']:.2f}",
                 f"{r['itl_mean_attainment']:.2f}",
                 f"{r['attainment']:.2f}", f"{r['worker_seconds']:.0f}", r["max_workers"],
                 f"{r['scale_actions']} ({a['start']}/{a['drain']}/{a['switch']})", f"{r['reversals']} ({r['flaps']})",
                 f"{back['desired']} / {back['ready']}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


class Lock:
    """The shared heavy lock (``--lock``), held for as many modes in a row as fit in ``hold_s``."""

    def __init__(self, path: str | None, hold_s: float) -> None:
        self.path, self.hold_s = path, hold_s
        self.file = None
        self.since = 0.0

    def acquire(self, next_s: float) -> None:
        """Before a run of about ``next_s`` seconds: keep the lock if it fits, else wait for it anew."""
        if not self.path:
            return
        if self.file is not None and time.monotonic() - self.since + next_s > self.hold_s:
            self.release()
        if self.file is None:
            self.file = open(self.path, "a")  # noqa: SIM115 (held across calls)
            fcntl.flock(self.file, fcntl.LOCK_EX)
            self.since = time.monotonic()

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["load", "throughput", "both"],
                    choices=("load", "throughput", "both"))
    ap.add_argument("--profile", default="cpu-smollm2-135m", help="the sim workers' timing profile")
    ap.add_argument("--planner-profile", default="cpu-smollm2-135m", help="throughput mode's capacity profile")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--phase-s", type=float, default=45.0, help="each loaded phase's length")
    ap.add_argument("--idle-s", type=float, default=40.0)
    ap.add_argument("--prefill-rate", type=float, default=1.6)
    ap.add_argument("--prefill-isl", type=int, default=512)
    ap.add_argument("--prefill-osl", type=int, default=6)
    ap.add_argument("--decode-rate", type=float, default=1.2)
    ap.add_argument("--decode-isl", type=int, default=96)
    ap.add_argument("--decode-osl", type=int, default=160)
    ap.add_argument("--ttft-ms", type=float, default=2000.0)
    ap.add_argument("--itl-ms", type=float, default=100.0)
    ap.add_argument("--budget", type=int, default=4)
    ap.add_argument("--interval-s", type=float, default=3.0)
    ap.add_argument("--initial", type=int, nargs=2, default=(1, 1), metavar=("PREFILL", "DECODE"))
    ap.add_argument("--kv-cache-gib", type=float, default=0.5)
    ap.add_argument("--drain-s", type=float, default=60.0, help="most seconds past the phases to wait for requests")
    ap.add_argument("--after-s", type=float, default=25.0, help="seconds sampled after the last request finished")
    ap.add_argument("--flap-intervals", type=float, default=5.0,
                    help="a reversal within this many intervals of the tier's last change is a flap")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lock", default=None, help="flock this file around the modes' runs")
    ap.add_argument("--hold-s", type=float, default=360.0, help="most seconds one hold of --lock lasts")
    ap.add_argument("--out-dir", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    ps = phases(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print("== phases: " + ", ".join(f"{p.name} {p.seconds:g} s ({p.rate:g} req/s, ISL~{p.isl}, OSL~{p.osl})"
                                      for p in ps)
          + f"; TTFT <= {args.ttft_ms:g} ms, ITL <= {args.itl_ms:g} ms, budget {args.budget}, "
            f"every {args.interval_s:g} s, from {args.initial[0]}P+{args.initial[1]}D", flush=True)
    results = []
    lock = Lock(args.lock, args.hold_s)
    expected_s = sum(p.seconds for p in ps) + 60.0
    for mode in args.modes:
        log_dir = Path(tempfile.mkdtemp(prefix=f"planner-modes-{mode}-"))
        lock.acquire(expected_s)
        t = time.monotonic()
        try:
            r = run_mode(mode, args, ps, log_dir)
        except BaseException:
            lock.release()
            raise
        r["wall_s"] = round(time.monotonic() - t, 1)
        expected_s = 1.15 * r["wall_s"]
        r["log_dir"] = str(log_dir)
        r["args"] = vars(args)
        stem = out / f"planner-modes-{mode}"
        stem.with_suffix(".json").write_text(json.dumps(r, indent=1, default=str) + "\n")
        plot(r, ps, args, stem.with_suffix(".png"))
        results.append(r)
        print(f"{mode}: {r['wall_s']:.0f} s, attainment {r['attainment']:.2f}, failed {r['failed']} "
              f"{r['errors'] or ''}, actions {r['actions']}, back to minimums {r['back_to_minimums_s']}, "
              f"serve exit {r['serve_exit']}; wrote {stem}.json/.png", flush=True)
    lock.release()
    print(table(results))
    (out / "planner-modes-table.txt").write_text(table(results) + "\n")


if __name__ == "__main__":
    main()
