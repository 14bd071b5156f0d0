"""The engine loop: token ids in, token deltas out. One ``step()`` = schedule, execute, update.
Used by the offline API (``engine.llm``, which adds text) and by the workers (token-in/token-out:
text and stop strings are the router's).

With asynchronous scheduling (``EngineConfig.async_scheduling``, on by default on CUDA) a step
overlaps the host's work with the device's: ``step()`` plans and launches step N+1 first (its
in-flight decodes read their input ids from step N's sampled tokens on the device), then waits
for step N's tokens and applies them (scheduler update, stop checks, outputs),
while the device runs N+1. So ``step()`` returns the outputs of the step launched by the call
before it. Outputs are token for token those of the synchronous engine: a request found finished
at step N (EOS, a stop token or string) gets no token from the row N+1 computed for it, and
nothing is planned for a token certain to be the last. Where a launch needs step N's tokens on
the host (repetition/presence/frequency penalties of a request sampled at N), step N is applied
first: that step runs synchronously. A pull into this engine's blocks (``add_prefilled``) first
waits for the launched step: a freed block may still take its write.

Everything outside ``engine/`` goes through this class's public methods (and ``AsyncEngine``);
its scheduler, block manager and runner are its own."""

from __future__ import annotations

import atexit
import os
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from engine import gpu_share
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.cpu_share import CpuShare
from engine.gpu_share import GpuShare
from engine.kv_host_tier import HostKVTier, HostTierCounts
from engine.kv_prefault import KVPrefaulter
from engine.loader import load_tokenizer, model_name, read_arch, tokenizer_source
from engine.model_runner import ModelRunner, StepHandle
from engine.plan import SchedulerOutput
from engine.request import Request
from engine.scheduler import Scheduler
from protocol.kv_events import KVEvent
from protocol.load import EngineLoad
from protocol.model_card import ModelCard
from protocol.outputs import FinishReason, RequestOutput, StopReason
from protocol.sampling import SamplingParams
from runtime import trace


@dataclass
class _Tracked:
    request: Request
    group_id: str
    index: int
    num_sent: int = 0
    logprobs_sent: int = 0
    times_sent: bool = False  # its queue wait and prefill time went out (on its first output with tokens)


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.arch = read_arch(config)
        self.tokenizer = load_tokenizer(config)  # for its EOS ids (and the offline API's text)
        max_len = min(self.arch.max_position_embeddings, config.max_model_len or 1 << 30)
        eos = self.tokenizer.eos_token_ids if self.tokenizer else ()
        self.eos_token_ids = tuple(dict.fromkeys((*eos, *self.arch.eos_token_ids)))
        if config.backend == "sim":
            from engine.sim import SimRunner

            self.runner = SimRunner(config, self.arch, max_len, eos_token_ids=self.eos_token_ids)
        else:
            self.runner = ModelRunner(config, self.arch, max_len, progress=progress)
        # The host tier (CacheConfig.host_memory_bytes): the block manager decides, the tier copies
        # (_run_host_copies). Only where a model runs (the sim holds no KV).
        self.host_tier: HostKVTier | None = None
        if isinstance(self.runner, ModelRunner) and config.cache.resolve_num_host_blocks(self.runner.bytes_per_block):
            self.host_tier = HostKVTier(self.runner.kv,
                                        config.cache.resolve_num_host_blocks(self.runner.bytes_per_block))
        # What a KV transfer into blocks just offloaded waits for (CUDA: the copies are queued): the
        # blocks offloaded by copies not known to have run, and an event behind them.
        self._offloading: tuple[set[int], torch.cuda.Event] | None = None
        self.block_manager = BlockManager(self.runner.num_blocks, config.cache.block_size,
                                          config.cache.enable_prefix_caching,
                                          self.host_tier.num_slots if self.host_tier is not None else 0)
        self.kv_prefaulter: KVPrefaulter | None = None
        self._start_prefaulter()
        # A lone request must always fit in the cache, so the context is capped by it too.
        self.max_model_len = min(max_len, self.runner.num_blocks * config.cache.block_size)
        if not config.scheduler.enable_chunked_prefill:
            # Unchunked, a prompt (or a preempted sequence's recompute) must fit one step's budget.
            self.max_model_len = min(self.max_model_len, config.scheduler.max_num_batched_tokens)
        # Holding a prompt back for a prefix being computed pays on the CPU, where prefill compute
        # dominates a step; on a GPU the held step cost more TTFT than the prefix saved
        # (bench/shared_prefix.py on an H200, Llama-3.1-8B shapes: TTFT mean 1.29x, tok/s 0.99x).
        on_cpu = not isinstance(self.runner, ModelRunner) or self.runner.device.type == "cpu"
        self.scheduler = Scheduler(config.scheduler, self.block_manager, share_prefixes=on_cpu)
        self._tracked: dict[str, _Tracked] = {}
        self._groups: dict[str, list[str]] = {}
        self.num_steps = 0
        self.num_parks = self.num_unparks = 0  # park() and unpark() calls that did something
        # the step totals of ``load()`` (see protocol.load.EngineLoad)
        self.step_totals = [0.0, 0, 0, 0]  # wall s, prefill tokens, decode rows, their KV tokens
        # May be switched between steps (a benchmark compares both in one process).
        self.async_scheduling = config.use_async_scheduling
        # Steps launched whose tokens the host has not applied yet, oldest first (one between
        # steps with asynchronous scheduling, two while step() waits for the older), each with
        # every block it reads or writes: its requests' tables as they were at launch (the block
        # manager's lists: a later free drops them, never empties them), and when it was launched.
        self._launched: list[tuple[SchedulerOutput, StepHandle, list[list[int]], float]] = []
        # The device's pace, for planning a step late enough that prefilled requests whose blocks
        # land meanwhile join it (``join_deadline``): when the host saw the last step done, and,
        # over decode-only steps, how long one took that ran right after another and the host's
        # time to plan and launch one (EMAs).
        self._done_at = 0.0
        self._decode_step_s = 0.0
        self._decode_plan_s = 0.0
        # Called with a launched step's ``wait`` when the engine is about to block on the device;
        # AsyncEngine lets handoff admissions in meanwhile (engine state is consistent then).
        self.device_wait: Callable[[Callable[[], None]], None] | None = None
        self._traced: set[str] = set()  # prefilled requests whose first decode is traced (runtime.trace)
        # Where another worker shares this GPU (engine.gpu_share): a decode engine holds the GPU for
        # the step that carries a handed-off request's first decode (``SchedulerOutput.joined``),
        # until that step (``_held``) is applied; a prefill engine's forwards yield to it.
        self._held: StepHandle | None = None
        self.use_gpu_share(GpuShare.for_device(config.device, config.gpu_share)
                           if config.gpu_share and config.backend == "torch" else None)
        # Where this process shares the machine's cores with other workers (engine.cpu_share): it
        # says whether it has work, and its prefill steps take the others' cores while they have none.
        self.cpu_share: CpuShare | None = None
        if config.cpu_share_dir and isinstance(self.runner, ModelRunner) and self.runner.device.type == "cpu":
            self.cpu_share = self.runner.cpu_share = CpuShare(config.cpu_share_dir)
            atexit.register(self.cpu_share.close)

    def _start_prefaulter(self) -> None:
        """On the CPU: fault the cache's next blocks in on idle time (engine.kv_prefault)."""
        if isinstance(self.runner, ModelRunner) and self.runner.device.type == "cpu":
            manager = weakref.ref(self.block_manager)
            self.kv_prefaulter = KVPrefaulter(self.runner.kv, lambda: getattr(manager(), "frontier", 0)).start()

    def use_gpu_share(self, share: GpuShare | None) -> None:
        """Play ``share.role`` towards the other worker on this GPU (None: none). Between steps."""
        if self._held is not None and self.gpu_share is not None:
            self.gpu_share.release()
        self.gpu_share = self.runner.gpu_share = share
        self._held = None

    # ---- requests ------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams | None = None,
        priority: int = 0,
        prefill_only: bool = False,
    ) -> None:
        """Queue a request of token ids. Bad input raises ValueError and changes nothing.

        ``prefill_only`` (prefill tier): the request stops after its first token and its
        blocks stay pinned until :meth:`unpin`; its last output has ``finish_reason`` None
        unless it genuinely finished (EOS, max_tokens=1)."""
        sampling = sampling or SamplingParams()
        if prefill_only and sampling.n != 1:
            raise ValueError("prefill-only requests take n = 1")
        prompt_ids = self._validate(request_id, prompt_ids, sampling)
        ids = [request_id] if sampling.n == 1 else [f"{request_id}#{i}" for i in range(sampling.n)]
        requests = []
        for i, rid in enumerate(ids):
            params = sampling
            if sampling.n > 1:
                seed = None if sampling.seed is None else sampling.seed + i
                params = replace(sampling, n=1, seed=seed)
            requests.append(Request(rid, prompt_ids, params, self.eos_token_ids, self.max_model_len, priority,
                                    prefill_only=prefill_only))
        parent = requests[0]
        for child in requests[1:]:
            child.parent = parent
            parent.children.append(child)
        self.scheduler.add_request(parent)
        self._groups[request_id] = ids
        for i, r in enumerate(requests):
            self._tracked[r.request_id] = _Tracked(r, request_id, i)

    def add_prefilled(self, request_id: str, prompt_ids: list[int], first_token: int | None,
                      sampling: SamplingParams, priority: int = 0) -> list[int] | None:
        """Admit a request whose prompt was prefilled on another worker, which sampled
        ``first_token`` (None: it is still prefilling there; :meth:`kv_ready` then brings the token,
        and the caller never lets such a request recompute: no room here, or a failed transfer,
        it aborts the request). Returns the indices of prompt blocks to transfer into
        :meth:`block_table` (then call :meth:`kv_ready`), or None when the prompt will be
        recomputed here instead. A transfer into those blocks must first wait for
        :meth:`launched_step_waiter` of them: a step launched before may still write into a block
        it freed."""
        if sampling.n != 1:
            raise ValueError("a prefilled request takes n = 1")
        prompt_ids = self._validate(request_id, prompt_ids, sampling)
        if first_token is not None and not 0 <= first_token < self.arch.vocab_size:  # None: sent ahead
            raise ValueError(f"the first token {first_token} is not in [0, {self.arch.vocab_size})")
        request = Request(request_id, prompt_ids, sampling, self.eos_token_ids, self.max_model_len, priority)
        if first_token is not None:
            request.append_token(first_token)
        self._groups[request_id] = [request_id]
        tracked = self._tracked[request_id] = _Tracked(request, request_id, 0)
        tracked.num_sent = 1  # the first token already went out from the prefill tier
        blocks = self.scheduler.add_prefilled(request)
        # Blocks evicted for this request are offloaded now: the transfer then overwrites them.
        self._run_host_copies()
        return blocks

    def kv_ready(self, request_id: str, ok: bool, first_token: int | None = None) -> None:
        """The transfer for :meth:`add_prefilled` ended (``first_token``: the prefill worker's, for
        a request admitted without it)."""
        self.scheduler.kv_ready(request_id, ok, first_token)
        if trace.enabled:
            trace.mark(request_id, "d.ready")
            self._traced.add(request_id)

    def unpin(self, request_id: str) -> bool:
        return self.scheduler.unpin(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._launched)

    def launched_step_waiter(self, block_ids: Sequence[int] | None = None) -> Callable[[], None] | None:
        """A callable that returns once every step launched now has run on the device (any thread
        may call it, so a KV transfer waits for it without stopping the engine's loop); None when
        nothing is to be waited for: no step is launched or, given ``block_ids``, no launched
        step touches any of them (the usual case: the blocks its requests free go to the back
        of the free queue)."""
        waits: list[Callable[[], None]] = []
        if self._offloading is not None:
            offloaded, event = self._offloading
            if event.query():
                self._offloading = None
            elif block_ids is None or not offloaded.isdisjoint(block_ids):
                waits.append(event.synchronize)  # on the copy stream: not behind the launched steps
        if self._launched and (block_ids is None or self._launched_touch(block_ids)):
            waits.append(self._launched[-1][1].wait)  # the device runs the steps in order
        if len(waits) < 2:
            return waits[0] if waits else None

        def wait_both() -> None:
            for wait in waits:
                wait()
        return wait_both

    def _launched_touch(self, block_ids: Sequence[int]) -> bool:
        wanted = set(block_ids)
        for output, _, tables, _ in self._launched:
            if any(not wanted.isdisjoint(table) for table in tables) or \
                    any(src in wanted or dst in wanted for src, dst in output.block_copies):
                return True
        return False

    def join_deadline(self) -> float | None:
        """Until when (``time.perf_counter``) planning the next step may wait for prefilled
        requests whose blocks are on their way, so that those landing by then (``kv_ready``) join
        it rather than the step after: with asynchronous scheduling, while a decode-only step runs
        on the device and a transfer into this engine is in flight. The deadline leaves the host twice
        its usual planning time (and 0.5 ms) before the running step is expected to end, so the
        device does not wait for the host. None: plan now."""
        if not (self.async_scheduling and self.scheduler.pulling and self._launched and self._decode_step_s
                and _decode_only(self._launched[-1][0])):
            return None  # a step that prefills takes long anyway (and its length is hard to foresee)
        return self._done_at + self._decode_step_s - 2 * self._decode_plan_s - 5e-4

    def device_busy(self) -> bool:
        """Whether the device is still running a launched step."""
        return bool(self._launched) and not self._launched[-1][1].done()

    def wait_for_device(self) -> None:
        """Until the device has run every launched step (its tokens stay to be applied)."""
        if self._launched:
            self._launched[-1][1].wait()

    def _validate(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams) -> list[int]:
        if self.parked:
            raise RuntimeError("the engine is parked: unpark() it before adding requests")
        if request_id in self._groups or request_id in self.scheduler.pinned:
            raise ValueError(f"duplicate request id {request_id!r}")
        if isinstance(prompt_ids, str):
            raise ValueError("the engine takes token ids: text is encoded above it (engine.llm.LLM, the router)")
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if any(t < 0 or t >= self.arch.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.arch.vocab_size})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.max_model_len} "
                f"tokens and at least one must be left to generate"
            )
        if sampling.stop:
            raise ValueError("stop strings are matched on text, above the engine (engine.llm.LLM, the router)")
        return prompt_ids

    def abort(self, request_id: str) -> None:
        """Abort a request (all n of its sequences); its blocks are freed at once."""
        for rid in self._groups.pop(request_id, []):
            self.scheduler.abort(rid)
            self._tracked.pop(rid, None)

    def stop_sequence(self, request_id: str, index: int, stop_reason: StopReason) -> None:
        """Finish one of a request's sequences for a reason found above the engine (a stop
        string in its text); its blocks are freed at once. Unknown or finished ones are ignored."""
        group = self._groups.get(request_id, [])
        tracked = self._tracked.get(group[index]) if index < len(group) else None
        if tracked is None or tracked.request.is_finished:
            return
        tracked.request.stop_reason = stop_reason
        self.scheduler.finish(tracked.request, FinishReason.STOP)
        self._forget(tracked)

    def has_request(self, request_id: str) -> bool:
        """Whether the request is queued, running, or (prefill tier) holds pinned blocks."""
        return request_id in self._groups or request_id in self.scheduler.pinned

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def model_card(self, name: str = "") -> ModelCard:
        """What a worker registers: the model's name (``name``, or the one derived from the model
        path), this engine's context length and where its tokenizer is."""
        return ModelCard(name or model_name(self.config), self.max_model_len, tokenizer_source(self.config))

    def load(self) -> EngineLoad:
        """The queues and the KV cache now (what the worker publishes)."""
        sched, bm = self.scheduler, self.block_manager
        return EngineLoad(
            num_waiting=len(sched.waiting), num_running=len(sched.running), num_pulling=len(sched.pulling),
            num_queued_prefill_tokens=sched.num_queued_prefill_tokens,
            num_active_blocks=sum(len(bm.block_table(r.request_id)) for r in sched.running),
            num_free_blocks=bm.num_free_blocks, num_total_blocks=bm.num_blocks,
            num_pinned_blocks=sched.num_pinned_blocks, kv_usage=bm.usage,
            num_prompt_tokens=sched.stats.num_prompt_tokens, num_cached_tokens=sched.stats.num_cached_tokens,
            num_steps=self.num_steps, step_time_s=self.step_totals[0], num_step_prefill_tokens=self.step_totals[1],
            num_step_decode_tokens=self.step_totals[2], num_step_kv_tokens=self.step_totals[3],
        )

    # ---- KV cache ------------------------------------------------------------------------
    def block_table(self, request_id: str) -> list[int]:
        """The request's KV blocks, in order (a copy)."""
        return list(self.block_manager.block_table(request_id))

    @property
    def kv_cache(self) -> torch.Tensor:
        """The whole paged KV tensor (what a KV transport registers)."""
        return self.runner.kv

    @property
    def num_kv_blocks(self) -> int:
        return self.block_manager.num_blocks

    @property
    def next_kv_event_id(self) -> int:
        return self.block_manager.next_event_id

    def kv_snapshot(self) -> tuple[list[tuple[int, int]], int]:
        """Every cached block as ``(hash, parent hash)`` and the id of the next KV event."""
        return self.block_manager.snapshot()

    def kv_host_snapshot(self) -> list[tuple[int, int]]:
        """Every block the host tier holds as ``(hash, parent hash)`` (with :meth:`kv_snapshot`, in
        the same engine call, the whole cache as of its next event id)."""
        return self.block_manager.host_snapshot()

    def host_tier_counts(self) -> HostTierCounts:
        """The host tier's size, fill and copies so far (all 0 without one). Any thread may read it."""
        tier = self.host_tier
        if tier is None:
            return HostTierCounts()
        return HostTierCounts(tier.num_slots, self.block_manager.num_host_cached_blocks, tier.num_loaded,
                              tier.num_offloaded, tier.bytes_per_block)

    def take_kv_events(self) -> list[KVEvent]:
        return self.block_manager.take_events()

    def reset_prefix_cache(self) -> None:
        """Forget every cached block, on the device and in the host tier (``AllBlocksCleared``):
        what anything that changes what a block's hash stands for (new weights) must call."""
        self.block_manager.reset_prefix_cache()

    # ---- parking (the launcher's warm pool) ------------------------------------------------
    @property
    def parked(self) -> bool:
        return self.num_parks > self.num_unparks

    def park(self) -> float:
        """Give the device back and keep the model, while nothing is held (no request queued,
        running, pulling or pinned; nothing launched): the runner's weights go to pinned host
        memory, its KV cache and CUDA graphs are freed (``ModelRunner.park``; on the CPU the cache's
        pages go back); the device's prefix cache is forgotten (its blocks' contents are gone: the
        routers' indexes hear ``BlockRemoved(device)`` for each, or ``AllBlocksCleared`` when the host
        tier holds nothing). The host tier stays, contents and index (``BlockManager.forget_device``):
        host memory is not what parking frees, and the weights that made its blocks come back
        unchanged, so a woken worker loads them back on a hit. The sim runner holds no device: only
        the prefix cache goes. Requests are refused until :meth:`unpark`. Returns the seconds it took."""
        if self.parked:
            return 0.0
        if self.has_unfinished() or self._launched or self.scheduler.pulling or self.scheduler.pinned:
            raise RuntimeError("only an idle engine parks: requests are queued, running, pulling or pinned")
        start = time.perf_counter()
        self._run_host_copies()  # anything decided (none when idle) runs before the cache goes
        if self.host_tier is not None:
            self.host_tier.synchronize()  # the copy stream reads and writes the cache being freed
        self._offloading = None
        self.block_manager.forget_device()
        if self.kv_prefaulter is not None:  # else it may map its window again once the pages went back
            self.kv_prefaulter.stop()
            self.kv_prefaulter.join()
            self.kv_prefaulter = None
        if isinstance(self.runner, ModelRunner):
            self.runner.park()
        self.num_parks += 1
        return time.perf_counter() - start

    def unpark(self) -> float:
        """Take the device back (``ModelRunner.unpark``: the weights from pinned host memory, the
        KV cache re-allocated, the decode graphs captured again); requests are admitted again.
        Returns the seconds it took."""
        if not self.parked:
            return 0.0
        start = time.perf_counter()
        if isinstance(self.runner, ModelRunner):
            self.runner.unpark()
        self._start_prefaulter()
        self.num_unparks += 1
        return time.perf_counter() - start

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        if self.cpu_share is not None:
            self.cpu_share.set_busy(True)
        try:
            return self._step()
        finally:
            self.step_totals[0] += time.perf_counter() - start
            if self.cpu_share is not None:
                self.cpu_share.set_busy(self.has_work())

    def _count_step(self, output: SchedulerOutput) -> None:
        """Add a scheduled step's tokens to the totals: a row past its prompt is a decode row."""
        totals = self.step_totals
        for s in output.scheduled:
            r = s.request
            if r.num_computed_tokens >= r.num_prompt_tokens and s.num_new_tokens == 1:
                totals[2] += 1
                totals[3] += r.num_computed_tokens + 1
            else:
                totals[1] += s.num_new_tokens

    def _step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        if self._launched and (not self.async_scheduling or self._needs_host_tokens(self._launched[-1][0])):
            outputs += self._apply_oldest()
        t0 = time.perf_counter()
        output = self.scheduler.schedule()
        self._run_host_copies()  # the step reads the blocks loaded for it
        self._count_step(output)
        tables = {s.request.request_id: self.block_manager.block_table(s.request.request_id)
                  for s in output.scheduled}
        prev = self._launched[-1][1] if self._launched else None
        hold = self._hold_gpu(output)
        handle = self.runner.launch(output, tables, prev)
        if hold and handle is None:
            self.gpu_share.release()  # nothing launched after all
        elif hold:
            self._held = handle
        self.scheduler.on_launch(output)
        self.num_steps += 1
        if self._traced:
            for s in output.scheduled:
                if s.request.request_id in self._traced:
                    trace.mark(s.request.request_id, "d.launch1")
        if handle is None:
            outputs += self._apply_oldest() if self._launched else []
            return outputs + self._apply(output, None)
        launched_at = time.perf_counter()
        if _decode_only(output):
            self._decode_plan_s = _ema(self._decode_plan_s, launched_at - t0)
        self._launched.append((output, handle, list(tables.values()), launched_at))
        if len(self._launched) > 1:  # the device runs the new step meanwhile
            outputs += self._apply_oldest()
        if not self.async_scheduling:
            outputs += self._apply_oldest()
        return outputs

    def _run_host_copies(self) -> None:
        """Queue the host tier's copies the block manager decided (before anything else touches
        those blocks). On CUDA they run on the tier's copy stream, overlapping the step running now
        unless it (or another launched step) touches one of their blocks; the next step waits for
        them (``HostKVTier.run``). Offloads keep a wait for a KV transfer into their blocks
        (``launched_step_waiter``) until they have run."""
        copies = self.block_manager.take_host_copies()
        if not copies:
            return
        assert self.host_tier is not None, "host copies without a host tier"
        after = bool(self._launched) and self._launched_touch([c.block_id for c in copies])
        event = self.host_tier.run(copies, after_compute=after)
        if event is None:
            return  # done (the CPU)
        offloaded = {c.block_id for c in copies if c.offload}
        if self._offloading is not None and not self._offloading[1].query():
            offloaded |= self._offloading[0]  # the new event is behind those copies too
        self._offloading = (offloaded, event) if offloaded else None

    def _apply_oldest(self) -> list[RequestOutput]:
        """Wait for the oldest launched step (through ``device_wait``: it counts as launched
        meanwhile) and apply it."""
        output, handle, _, launched_at = self._launched[0]
        if self.device_wait is not None:
            self.device_wait(handle.wait)
        else:
            handle.wait()
        now = time.perf_counter()
        if self._held is not None and self._held is handle:
            self._held = None
            self.gpu_share.release()
        if launched_at < self._done_at and _decode_only(output):  # it ran right after the step before
            self._decode_step_s = _ema(self._decode_step_s, now - self._done_at)
        self._done_at = now
        self._launched.pop(0)
        return self._apply(output, handle)

    def _hold_gpu(self, output: SchedulerOutput) -> bool:
        """Decode engine sharing its GPU: announce the step about to launch; hold the GPU for it
        when it carries a handed-off request's first decode. Whether it did."""
        share = self.gpu_share
        if share is None or share.role != "decode":
            return False
        share.beat()
        if not output.joined:
            return False
        if not _decode_only(output):
            return False  # it prefills too: long anyway, and holding it would stall the prefill worker long
        # This step and the one still running ahead of it (asynchronous scheduling), with room.
        share.hold(min(2 * (self._decode_step_s or 0.01) + 0.002, gpu_share.MAX_WAIT_S))
        return True

    @staticmethod
    def _needs_host_tokens(output: SchedulerOutput) -> bool:
        """Whether planning the next step needs this step's tokens on the host: the sampler's
        penalties read every token of a request."""
        return any(r.sampling.has_penalties for r, _ in output.sample_rows)

    def _apply(self, output: SchedulerOutput, handle: StepHandle | None) -> list[RequestOutput]:
        """Wait for a launched step's tokens and apply them: scheduler update, outputs."""
        sampled = handle.result() if handle is not None else {}
        updated = self.scheduler.update_from_output(output, sampled)
        if self._traced:
            for request in updated:
                if request.request_id in self._traced:
                    trace.mark(request.request_id, "d.out1")
                    self._traced.discard(request.request_id)
        return [self._output(tracked) for request in updated
                if (tracked := self._tracked.get(request.request_id)) is not None]

    def _output(self, t: _Tracked) -> RequestOutput:
        r = t.request
        new_ids = r.output_token_ids[t.num_sent:]
        first = bool(new_ids) and not t.times_sent and r.scheduled_time is not None
        t.times_sent = t.times_sent or first
        t.num_sent = r.num_output_tokens
        new_logprobs = r.logprobs[t.logprobs_sent:]
        t.logprobs_sent = len(r.logprobs)
        if r.is_finished:
            self._forget(t)
        return RequestOutput(
            request_id=t.group_id, index=t.index, new_token_ids=new_ids, new_logprobs=new_logprobs,
            finished=r.is_finished, finish_reason=r.finish_reason, stop_reason=r.stop_reason,
            num_prompt_tokens=r.num_prompt_tokens, num_output_tokens=r.num_output_tokens,
            num_cached_tokens=r.num_cached_tokens,
            **(_first_output_times(r) if first else {}),
        )

    def _forget(self, t: _Tracked) -> None:
        """A finished sequence: drop its tracking (and its group once empty)."""
        self._tracked.pop(t.request.request_id, None)
        group = self._groups.get(t.group_id)
        if group is not None and all(rid not in self._tracked for rid in group):
            del self._groups[t.group_id]


def _decode_only(output: SchedulerOutput) -> bool:
    return all(s.num_new_tokens == 1 for s in output.scheduled)


def _ema(mean: float, x: float, weight: float = 0.2) -> float:
    return x if mean == 0.0 else (1 - weight) * mean + weight * x


def _first_output_times(r: Request) -> dict[str, float]:
    """A sequence's queue wait and prefill time, for its first output (RequestOutput)."""
    if r.scheduled_time is None:
        return {}
    times = {"queue_wait_s": max(0.0, r.scheduled_time - r.arrival_time)}
    if r.first_token_time is not None and r.first_token_time >= r.scheduled_time:
        times["prefill_s"] = r.first_token_time - r.scheduled_time
    return times


def default_num_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

