"""The engine on one GPU against the hardware's limits and against transformers, in one process.

Model: dummy weights of Llama-3.1-8B's shape in bfloat16 (hidden 4096, 32 layers, 32 heads,
8 KV heads, FFN 14336, vocab 128256).

1. Ceilings, measured here: HBM copy bandwidth (a device-to-device copy, bytes read + written)
   and the bf16 matmul rate (8192^3, random data).
2. Decode steps at batch 1/32/128/256 and contexts 512..4096 (those whose KV fits): the time
   of one engine step (``ModelRunner.execute``: host preparation, CUDA-graph replay of the
   forward pass and LM head, sampling), of the forward pass and LM head alone, and of the host
   preparation alone; the bytes a step must read (weights + the batch's KV) per second as a
   fraction of the copy bandwidth.
3. One 4096-token prefill step: model FLOPs (2 x linear params x tokens, plus causal attention)
   per second as a fraction of the matmul rate.
4. The same generate workload through tandem (``LLM.generate``) and transformers ``generate``:
   batch 1 and 64, 512 random prompt tokens, 128 new tokens (greedy, ignore EOS). Tandem: the
   median of ``--repeats`` runs, with the asynchronous step (the default on CUDA) and with the
   synchronous one; transformers: the median of as many runs after a warm-up on the same shapes;
   the ratio is the asynchronous engine's over transformers'.
5. The attention kernels alone (decode bandwidth, prefill TFLOP/s), for diagnosis.
6. Where the largest generate batch's time goes (an extra, instrumented run, not a timed one),
   for each engine step: per step kind (holding a prefill chunk, or decodes only), the GPU's
   time per step (CUDA events), the host's phases per step call, and the time the GPU waited
   for the host.

    python bench/gpu.py                 # everything (a few minutes)
    python bench/gpu.py --skip-hf --json results.json   # + results_decode.png, results_generate.png
    python bench/gpu.py --decode-only --batches 1,256 --contexts 512   # the decode step's HBM fraction
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from engine.config import PRESETS
from engine.llm import LLM
from engine.plan import ScheduledRequest, SchedulerOutput
from engine.request import Request
from protocol.sampling import SamplingParams

MODEL = "llama-3.1-8b"
GREEDY = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cuda_time_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median time of ``fn`` over ``iters`` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time_ms(fn) -> float:
    """Median time of ``fn`` replayed from a CUDA graph (launch cost left out)."""
    import triton

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=100)


def wall_time_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median wall time of ``fn`` (which must synchronize itself)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---- 1. ceilings -----------------------------------------------------------------------------
def copy_bandwidth() -> float:
    """Bytes/s of a 4 GiB device-to-device copy, counting bytes read and written."""
    n = 4 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * n / (ms / 1e3)


def matmul_rate() -> float:
    """FLOP/s of a bf16 8192^3 matmul on random data."""
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = cuda_time_ms(lambda: a @ b, warmup=3, iters=10)
    return 2 * n ** 3 / (ms / 1e3)


# ---- synthetic steps at the runner level ----------------------------------------------------
class Steps:
    """Builds scheduler outputs for the runner directly: ``batch`` sequences of ``context`` cached
    tokens, each on its own blocks."""

    def __init__(self, llm: LLM) -> None:
        self.runner = llm.engine.runner
        self.block_size = self.runner.block_size
        self.num_blocks = self.runner.num_blocks
        self.vocab = llm.engine.arch.vocab_size

    def fits(self, batch: int, tokens: int) -> bool:
        return batch * -(-tokens // self.block_size) <= self.num_blocks

    def make(self, batch: int, context: int, new_tokens: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        per_seq = -(-(context + new_tokens) // self.block_size)
        perm = torch.randperm(self.num_blocks, generator=g)[: batch * per_seq].tolist()
        scheduled, rows, tables = [], [], {}
        for i in range(batch):
            ids = torch.randint(0, self.vocab, (context + new_tokens,), generator=g).tolist()
            r = Request(f"b{i}", ids, GREEDY)
            r.num_computed_tokens = context
            scheduled.append(ScheduledRequest(r, new_tokens, sample=True))
            rows.append((r, i))
            tables[r.request_id] = perm[i * per_seq:(i + 1) * per_seq]
        return SchedulerOutput(scheduled, rows, []), tables

    def step(self, output: SchedulerOutput, tables: dict) -> None:
        self.runner.execute(output, tables)  # returns sampled tokens on the host: synchronized

    def prepare_ms(self, output: SchedulerOutput, tables: dict) -> float:
        """Host time to build the step's inputs and queue their copies (the runner's ``prepare``)."""
        return wall_time_ms(lambda: self.runner.prepare(output, tables), warmup=2, iters=10)

    def forward_ms(self, output: SchedulerOutput, tables: dict) -> float:
        """The forward pass and the LM head (graph replay for decode steps), CUDA-event timed."""
        runner = self.runner
        step = runner.prepare(output, tables)
        return cuda_time_ms(lambda: runner.compute_logits(step), iters=20 if step.padded_to else 5)


def weight_bytes(llm: LLM) -> int:
    """Bytes of weights a decode step reads: every parameter but the embedding table."""
    model = llm.engine.runner.model
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)


def kv_bytes_per_token(llm: LLM) -> int:
    a = llm.engine.arch
    return 2 * a.num_layers * a.num_kv_heads * a.head_dim * llm.engine.runner.dtype.itemsize


def prefill_flops(llm: LLM, tokens: int) -> float:
    a = llm.engine.arch
    linear = a.num_layers * (a.hidden_size * (a.q_size + 2 * a.kv_size) + a.q_size * a.hidden_size
                             + 3 * a.hidden_size * a.intermediate_size)
    attn = 4 * a.num_heads * a.head_dim * a.num_layers * tokens * (tokens + 1) / 2  # QK^T and PV, causal
    lm_head = 2 * a.hidden_size * a.vocab_size  # the one sampled row
    return 2 * linear * tokens + attn + lm_head


# ---- 4. generate ----------------------------------------------------------------------------
def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def generate_tandem(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.engine.reset_prefix_cache()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = llm.generate(prompts, params)
    torch.cuda.synchronize()  # nothing the engine launched is left out
    dt = time.perf_counter() - t0
    assert all(len(r.outputs[0].token_ids) == new_tokens for r in out)
    return len(prompts) * new_tokens / dt


def generate_hf(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens
    return len(prompts) * new_tokens / dt


def load_hf():
    import transformers

    cfg = dict(PRESETS[MODEL])
    config = transformers.LlamaConfig(**cfg)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.eval()


# ---- 6. breakdown ---------------------------------------------------------------------------
PHASES = ("schedule", "prepare", "forward", "sample", "wait", "update")


def generate_breakdown(llm: LLM, prompts: list[list[int]], new_tokens: int) -> list[tuple[str, str]]:
    """One generate run, instrumented (not a timed one): each ``engine.step`` call is classified by
    what it scheduled (a prefill chunk in it, or decodes only). Host phases, timed with
    perf_counter: schedule, prepare (the step's inputs), forward (launching the forward pass, or
    replaying its graph), sample (launching the sampler), wait (for a step's tokens on the host),
    update (the scheduler's); the rest is detokenization and outputs. The GPU time of a step is
    the time between CUDA events recorded before and after its launch: the GPU's work on it,
    plus any wait for the host inside the launch (an eager step's kernel launches). The run's wall
    time less the steps' GPU time is the time the GPU waited for the host between steps."""
    from engine import model_runner

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    kinds: list[str] = []
    phases: list[dict] = []
    spans: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
    acc: dict = {}
    sched, runner = engine.scheduler, engine.runner

    def timed(fn, key: str):
        def call(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0
        return call

    def classify(out) -> str:
        return "prefill" if any(s.num_new_tokens > 1 for s in out.scheduled) else "decode"

    schedule = timed(sched.schedule, "schedule")

    def schedule_and_classify():
        out = schedule()
        kinds.append(classify(out))
        return out

    launch = runner.launch

    def launch_with_events(output, tables, prev=None):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        handle = launch(output, tables, prev)
        end.record()
        if not output.is_empty:
            spans.append((classify(output), start, end))
        return handle

    step = engine.step

    def timed_step():
        acc.clear()
        n = len(kinds)
        t0 = time.perf_counter()
        out = step()
        phases.append(dict(acc, wall=time.perf_counter() - t0, kind=kinds[n] if len(kinds) > n else "empty"))
        return out

    patches = [(sched, "schedule", schedule_and_classify),
               (runner, "prepare", timed(runner.prepare, "prepare")),
               (runner, "compute_logits", timed(runner.compute_logits, "forward")),
               (runner.sampler, "sample", timed(runner.sampler.sample, "sample")),
               (sched, "update_from_output", timed(sched.update_from_output, "update")),
               (runner, "launch", launch_with_events), (engine, "step", timed_step)]
    orig_wait = model_runner.StepHandle.wait
    for obj, name, fn in patches:
        setattr(obj, name, fn)
    model_runner.StepHandle.wait = timed(orig_wait, "wait")
    engine.reset_prefix_cache()
    torch.cuda.synchronize()
    try:
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        torch.cuda.synchronize()
        total_s = time.perf_counter() - t0
    finally:
        for obj, name, _ in patches:
            del obj.__dict__[name]
        model_runner.StepHandle.wait = orig_wait
    gpu = {"prefill": 0.0, "decode": 0.0}
    for kind, start, end in spans:
        gpu[kind] += start.elapsed_time(end) / 1e3
    gpu_s = sum(gpu.values())
    rows = [("  instrumented run", f"wall {total_s:6.3f} s  GPU {gpu_s:6.3f} s  GPU waiting for the host "
                                   f"{total_s - gpu_s:6.3f} s ({(total_s - gpu_s) / total_s:4.0%})")]
    for kind in ("prefill", "decode"):
        sel = [p for p in phases if p["kind"] == kind]
        n = sum(1 for k, _, _ in spans if k == kind)
        if not sel or not n:
            continue
        wall = sum(p["wall"] for p in sel)
        host = {name: sum(p.get(name, 0.0) for p in sel) for name in PHASES}
        parts = "  ".join(f"{k} {v * 1e3 / len(sel):.2f}" for k, v in host.items())
        rows.append((f"  {kind}: {n} steps, {len(sel)} step calls",
                     f"GPU {gpu[kind] * 1e3 / n:7.2f} ms/step; step call wall {wall * 1e3 / len(sel):7.2f} ms"))
        rows.append((f"  {kind} step call host phases (ms)", f"{parts}  rest "
                                                             f"{(wall - sum(host.values())) * 1e3 / len(sel):.2f}"))
    return rows


# ---- 5. kernels -----------------------------------------------------------------------------
def kernel_bench(llm: LLM, bw: float, rate: float) -> list[tuple[str, str]]:
    from engine.attention import AttentionMetadata
    from engine.attention.triton_decode import decode_attention, num_splits_for
    from engine.attention.triton_prefill import prefill_attention

    runner = llm.engine.runner
    a = llm.engine.arch
    kv_layer = runner.kv[:, 0]
    bs = runner.block_size
    out_rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, ctx in ((1, 4096), (32, 2048), (128, 2048), (256, 1024)):
        per_seq = -(-ctx // bs)
        if batch * per_seq > runner.num_blocks:
            continue
        tables = torch.randperm(runner.num_blocks, device="cuda")[: batch * per_seq].view(batch, per_seq).int()
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, a.num_heads, a.head_dim, dtype=runner.dtype, device="cuda")
        splits = num_splits_for(batch, a.num_kv_heads, ctx, sms)
        ms = graph_time_ms(lambda q=q, s=seq_lens, t=tables, n=splits: decode_attention(q, kv_layer, s, t, 0.088, n))
        nbytes = batch * ctx * a.num_kv_heads * a.head_dim * 2 * runner.dtype.itemsize
        speed = nbytes / (ms / 1e3)
        out_rows.append((f"decode kernel b={batch} ctx={ctx} (1 layer, {splits} splits)",
                         f"{ms * 1e3:7.1f} us  {speed / 1e12:5.2f} TB/s = {speed / bw:4.0%} of HBM copy"))
    tokens = 4096
    per_seq = tokens // bs
    table = torch.randperm(runner.num_blocks, device="cuda")[:per_seq].view(1, per_seq).int()
    meta = AttentionMetadata(
        num_decodes=0, query_start_loc=torch.tensor([0, tokens], dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor([tokens], dtype=torch.int32, device="cuda"), block_tables=table,
        slot_mapping=torch.zeros(tokens, dtype=torch.int64, device="cuda"), query_lens_host=[tokens],
        seq_lens_host=[tokens], block_size=bs)
    q = torch.randn(tokens, a.num_heads, a.head_dim, dtype=runner.dtype, device="cuda")
    out = torch.empty_like(q)
    ms = graph_time_ms(lambda: prefill_attention(q, kv_layer, meta.query_start_loc, meta.seq_lens, table, 0, 1,
                                                 tokens, 0.088, out))
    speed = 4 * a.num_heads * a.head_dim * tokens * (tokens + 1) / 2 / (ms / 1e3)
    out_rows.append((f"prefill kernel {tokens} tokens (1 layer, causal)",
                     f"{ms * 1e3:7.1f} us  {speed / 1e12:5.0f} TFLOP/s = {speed / rate:4.0%} of matmul rate"))
    return out_rows


def decode_row(batch: int, context: int, step_ms: float, forward_ms: float, prepare_ms: float, nbytes: int,
               bw: float) -> dict:
    """One decode step's entry of the JSON's ``decode`` (what ``bench/plots.py`` draws)."""
    return dict(batch=batch, context=context, step_ms=step_ms, forward_ms=forward_ms, prepare_ms=prepare_ms,
                bytes=nbytes, hbm_fraction=nbytes / (step_ms / 1e3) / bw,
                forward_hbm_fraction=nbytes / (forward_ms / 1e3) / bw)


def generate_row(batch: int, tandem_tok_s: float, transformers_tok_s: float | None) -> dict:
    """One batch's entry of the JSON's ``generate``."""
    return dict(batch=batch, tandem_tok_s=tandem_tok_s, transformers_tok_s=transformers_tok_s)


def bench_tandem(args: argparse.Namespace, bw: float, rate: float, rows: list, results: dict,
                 gen_batches: list[int]) -> dict[int, float]:
    """Sections 2-5 on tandem; returns generate tok/s by batch. The engine is freed on return."""
    log("loading tandem (dummy Llama-3.1-8B, bf16) and capturing CUDA graphs...")
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    weights = 16_100_000_000
    kv_budget = int(free - weights - 8e9)  # activations, graph pools, logits
    t0 = time.perf_counter()
    llm = LLM(f"dummy:{MODEL}", device="cuda", dtype="bfloat16", kv_cache_bytes=kv_budget, max_num_seqs=256,
              max_num_batched_tokens=max(8192, args.prefill_tokens), progress=True)
    load_s = time.perf_counter() - t0
    runner = llm.engine.runner
    runner.kv.normal_()  # never time on zeros
    rows.append(("engine start (weights + KV + graph capture)",
                 f"{load_s:.1f} s; KV cache {runner.num_blocks * runner.block_size} tokens"))
    wbytes = weight_bytes(llm)
    kvtok = kv_bytes_per_token(llm)
    steps = Steps(llm)

    log("decode steps...")
    decode = []
    for batch in (int(b) for b in args.batches.split(",")):
        for ctx in (int(c) for c in args.contexts.split(",")):
            if not steps.fits(batch, ctx + 1):
                rows.append((f"decode b={batch:<3} ctx={ctx:<4}", "KV does not fit: skipped"))
                continue
            output, tables = steps.make(batch, ctx, 1, seed=batch * 7 + ctx)
            step_ms = wall_time_ms(lambda o=output, t=tables: steps.step(o, t))
            fwd_ms = steps.forward_ms(output, tables)
            prep_ms = steps.prepare_ms(output, tables)
            decode.append(decode_row(batch, ctx, step_ms, fwd_ms, prep_ms, wbytes + batch * (ctx + 1) * kvtok, bw))
            frac = decode[-1]["hbm_fraction"]
            rows.append((f"decode b={batch:<3} ctx={ctx:<4}",
                         f"step {step_ms:6.2f} ms ({frac:4.0%} of HBM)  forward+head {fwd_ms:6.2f} ms "
                         f"({decode[-1]['forward_hbm_fraction']:4.0%})  host prep {prep_ms:5.2f} ms  "
                         f"{batch * 1e3 / step_ms:6.0f} tok/s"))
            log(f"  {rows[-1]}")
    results["decode"] = decode
    if args.decode_only:
        return {}

    log("prefill...")
    n = args.prefill_tokens
    output, tables = steps.make(1, 0, n, seed=1)
    pre_ms = wall_time_ms(lambda: steps.step(output, tables), warmup=2, iters=5)
    flops = prefill_flops(llm, n)
    mfu = flops / (pre_ms / 1e3) / rate
    results["prefill"] = dict(tokens=n, ms=pre_ms, flops=flops, matmul_fraction=mfu)
    rows.append((f"prefill {n} tokens", f"{pre_ms:7.1f} ms  {flops / (pre_ms / 1e3) / 1e12:5.0f} TFLOP/s "
                                        f"= {mfu:4.0%} of matmul rate"))
    log(f"  {rows[-1]}")

    log("kernels...")
    rows += kernel_bench(llm, bw, rate)

    log("generate through tandem...")
    vocab = llm.engine.arch.vocab_size
    # Warm-up, with steps of every kind the timed runs take (prefill alone, decodes alone, and
    # decodes beside prefill chunks), so no kernel compiles inside them on a cold Triton cache.
    engine = llm.engine
    modes = {"async": True, "sync": False}  # async scheduling: the engine's default on CUDA
    assert engine.async_scheduling
    for on in modes.values():
        engine.async_scheduling = on
        generate_tandem(llm, make_prompts(3, 3000, vocab, seed=0), 8)
    by_mode: dict[str, dict[int, float]] = {}
    for mode, on in modes.items():
        engine.async_scheduling = on
        by_mode[mode] = {b: statistics.median(
            generate_tandem(llm, make_prompts(b, args.prompt_len, vocab, seed=b), args.new_tokens)
            for _ in range(args.repeats)) for b in gen_batches}
    for b in gen_batches:
        a, s = by_mode["async"][b], by_mode["sync"][b]
        rows.append((f"tandem generate batch {b}: sync vs async step",
                     f"sync {s:8.1f} tok/s  async {a:8.1f} tok/s  ({a / s - 1:+.1%}); median of {args.repeats}"))
    results["generate_modes"] = by_mode
    log("where generate time goes...")
    b = max(gen_batches)
    for mode, on in modes.items():
        engine.async_scheduling = on
        rows.append((f"generate batch {b} breakdown, {mode} step",
                     f"(timed runs: {b * args.new_tokens / by_mode[mode][b]:6.3f} s)"))
        rows += generate_breakdown(llm, make_prompts(b, args.prompt_len, vocab, seed=b), args.new_tokens)
    engine.async_scheduling = True
    return by_mode["async"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,32,128,256")
    ap.add_argument("--contexts", default="512,1024,2048,4096")
    ap.add_argument("--prefill-tokens", type=int, default=4096)
    ap.add_argument("--gen-batches", default="1,64")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed tandem generate runs (the median is shown)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here, and their PNGs beside "
                    "(bench/plots.py; `python bench/plots.py FILE` redraws them on any machine)")
    ap.add_argument("--decode-only", action="store_true", help="sections 1-2 only (ceilings, decode steps)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench/gpu.py needs a CUDA GPU"
    props = torch.cuda.get_device_properties(0)
    results: dict = {"device": props.name, "torch": torch.__version__}
    rows: list[tuple[str, str]] = [("device", f"{props.name}, {props.multi_processor_count} SMs, "
                                              f"{props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")]

    log("ceilings...")
    bw, rate = copy_bandwidth(), matmul_rate()
    results.update(hbm_copy_bytes_per_s=bw, bf16_matmul_flops=rate)
    rows += [("HBM copy bandwidth (read + write)", f"{bw / 1e12:.2f} TB/s"),
             ("bf16 matmul 8192^3", f"{rate / 1e12:.0f} TFLOP/s")]

    gen_batches = [int(b) for b in args.gen_batches.split(",")]
    ours = bench_tandem(args, bw, rate, rows, results, gen_batches)
    if args.decode_only:
        gen_batches, args.skip_hf = [], True
    gc.collect()
    torch.cuda.empty_cache()
    vocab = PRESETS[MODEL]["vocab_size"]
    theirs: dict[int, float] = {}
    if not args.skip_hf:
        log("generate through transformers...")
        hf = load_hf()
        # The same treatment as tandem's: a warm-up on the timed shapes, then the median of
        # --repeats runs. (Not alternated with tandem's runs: each engine takes the GPU's memory.)
        for b in gen_batches:
            generate_hf(hf, make_prompts(b, args.prompt_len, vocab, seed=b), 8)
        theirs = {b: statistics.median(generate_hf(hf, make_prompts(b, args.prompt_len, vocab, seed=b),
                                                   args.new_tokens) for _ in range(args.repeats))
                  for b in gen_batches}
        del hf
    results["generate"] = [generate_row(b, ours[b], theirs.get(b)) for b in gen_batches]
    for b in gen_batches:
        ref = theirs.get(b)
        ratio = f"  ratio {ours[b] / ref:5.1f}x" if ref else ""
        ref_s = f"  transformers {ref:8.1f} tok/s" if ref else ""
        rows.append((f"generate batch {b} ({args.prompt_len} in, {args.new_tokens} out)",
                     f"tandem {ours[b]:8.1f} tok/s{ref_s}{ratio}"))

    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.json:
        from bench import plots

        Path(args.json).write_text(json.dumps(results, indent=2))
        for path in plots.gpu_figures(results, Path(args.json).with_suffix("")):
            print(f"figure: {path}")


if __name__ == "__main__":
    main()
