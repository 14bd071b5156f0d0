"""Load mode: is each tier over or comfortably under its SLO, from online regressions of step
time on the load the workers report (Dynamo's load planner, made to scale down safely).

- prefill: step time = a + b * prompt tokens in the step. A worker's predicted TTFT is the time
  to compute its queued prompt tokens plus one new prompt; its utilization is the prompt tokens
  it computes per second times the time per token of a full step.
- decode: step time = a + b * running sequences + c * their KV tokens, which is the ITL.

Up when a worker's prediction is over the SLO (for prefill: with a queue to shorten; for
decode: when one more worker would shorten the busiest worker's step, else ``itl-floor``: one
sequence alone over the target is not a load problem) or the tier is near saturation, or before
that when the routers' arrivals would saturate it (prefill: their prompt tokens over 0.9 of each
worker; decode, ``itl-rising``: the rate asked is over 0.9 of the workers' capacity at the ITL
target, :meth:`LoadModel.decode_capacity`). An
up goes straight to the tier's predicted need (:meth:`LoadModel.prefill_need`,
:meth:`LoadModel.decode_need`), several workers in one tick; when the tier's need is met already
the miss is one worker's backlog (``ttft-imbalance``, ``itl-imbalance``): nothing is added. Down (-1)
only when, with the tier's load spread over N-1 workers (times
today's imbalance between them), every worker stays under ``scale_down_margin`` x SLO, on
``scale_down_ticks`` ticks in a row. For decode the N-1 prediction is made at the batch each
worker would settle at (Little's law: a worker asked for more tokens per second runs a bigger,
slower batch), not at today's batch spread thinner: that is what keeps a 2 <-> 1 flap away. A tier
can *spare* a worker for the other tier when N-1 workers stay under the SLO itself.

Aggregated (one tier whose workers prefill and decode in the same steps): both regressions learn
from every step, since the inter-token latency users see there includes the prompt chunks their
steps carry and a prompt waits behind the decodes; the tier is judged on both targets
(:meth:`LoadModel.assess_aggregated`): up when either misses, down only when both would hold.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from planner.config import PlannerConfig
from planner.decision import Reason
from planner.observations import WorkerStep
from planner.profile import Profile
from planner.regression import StepRegression

SATURATED = 0.9  # utilization (prefill) or KV usage (decode) at which a tier scales up whatever the latency
_HELPS = 0.95  # a worker more must cut the predicted ITL by at least 5% to be started for it


@dataclass(frozen=True)
class TierLoad:
    role: str
    delta: int  # -1, 0, or up: the workers to add (the predicted need less the ready ones, at least 1)
    can_spare: bool  # N-1 workers would still meet the SLO
    reason: Reason


def _imbalance(values: list[float]) -> float:
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else 1.0


class LoadModel:
    def __init__(self, config: PlannerConfig, profile: Profile | None = None) -> None:
        self.config = config
        self.budget_tokens = profile.max_num_batched_tokens if profile else 2048
        self.max_num_seqs = profile.max_num_seqs if profile else 256
        prefill_prior = decode_prior = None
        if profile is not None:
            lo, hi = profile.prefill.isl[0], min(profile.prefill.isl[-1], profile.max_num_batched_tokens)
            t_lo, t_hi = profile.prefill_latency_s(lo), profile.prefill_latency_s(hi)
            b = max(0.0, (t_hi - t_lo) / max(hi - lo, 1))
            prefill_prior = (max(0.0, t_lo - b * lo), b)
            d = profile.decode
            b0, b1, c0, c1 = d.batch[0], d.batch[-1], d.context[0], d.context[-1]
            s00, s10, s11 = (profile.decode_step_s(b0, c0), profile.decode_step_s(b1, c0),
                             profile.decode_step_s(b1, c1))
            per_kv = max(0.0, (s11 - s10) / max(b1 * (c1 - c0), 1))
            per_seq = max(0.0, (s10 - s00) / max(b1 - b0, 1) - per_kv * c0)
            decode_prior = (max(0.0, s00 - per_seq * b0 - per_kv * b0 * c0), per_seq, per_kv)
        self.prefill = StepRegression(1, prefill_prior)
        self.decode = StepRegression(2, decode_prior)
        self._down_streak = {"prefill": 0, "decode": 0}

    # ---- learning --------------------------------------------------------------------------
    def observe(self, workers: list[WorkerStep]) -> None:
        """Feed the regressions with the ready workers' step summaries of this tick."""
        for w in workers:
            if w.num_steps <= 0:
                continue
            if self.config.aggregated:
                if w.step_prefill_tokens > 0:
                    self.prefill.observe((w.step_prefill_tokens,), w.step_s)
                self.decode.observe((w.step_decode_tokens, w.step_kv_tokens), w.step_s)
            elif w.role == "prefill":
                self.prefill.observe((w.step_prefill_tokens,), w.step_s)
            elif w.step_prefill_tokens == 0 or math.isnan(w.step_prefill_tokens):  # pure decode steps only
                self.decode.observe((w.step_decode_tokens, w.step_kv_tokens), w.step_s)

    def prefill_time_s(self, tokens: float) -> float:
        """Time for one worker to compute ``tokens`` prompt tokens in full steps."""
        steps = max(1, math.ceil(tokens / self.budget_tokens))
        a = self.prefill.predict((0.0,))
        return steps * a + (self.prefill.predict((tokens,)) - a)

    # ---- verdicts ----------------------------------------------------------------------------
    def assess(self, role: str, workers: list[WorkerStep], isl: float, rate: float = 0.0, osl: float = 0.0
               ) -> TierLoad:
        """``workers``: the tier's ready workers; ``isl``: new prompt tokens of a typical request;
        ``rate``, ``osl``: the routers' arrivals per second and mean answer tokens (an up sizes for
        them when they ask for more than the workers' own counters show)."""
        verdict = self.judge(role, workers, isl, rate, osl)
        streak = self._down_streak[role] = self._down_streak[role] + 1 if verdict.delta < 0 else 0
        if verdict.delta < 0 and streak < self.config.scale_down_ticks:
            verdict = TierLoad(role, 0, verdict.can_spare, Reason("load-low-waiting", role, verdict.reason.values))
        return verdict

    def reset_down_streak(self, role: str) -> None:
        """A tick that was not low after all (the tick's own rules said so): the down streak starts over."""
        self._down_streak[role] = 0

    def judge(self, role: str, workers: list[WorkerStep], isl: float, rate: float = 0.0, osl: float = 0.0
              ) -> TierLoad:
        """:meth:`assess` without the down streak: what the tier's load says now (it learns nothing)."""
        if role == "prefill":
            return self._assess_prefill(workers, isl, rate)
        return self._assess_decode(workers, rate * osl)

    def assess_aggregated(self, workers: list[WorkerStep], isl: float) -> tuple[TierLoad, list[Reason]]:
        """The one tier of an aggregated cluster (``workers``: its ready workers), against both
        targets: +1 when its TTFT or its ITL is over (or it saturates), -1 only when both would stay
        low with N-1 workers. The verdict and both judgements' reasons (role ``decode``: the tier)."""
        # as a prefill tier: its prompt tokens per second only (decode rows cost far less per token)
        prompts = [dataclasses.replace(w, role="prefill", tokens_per_s=max(0.0, w.tokens_per_s - w.decode_tokens_per_s)
                                       if not math.isnan(w.decode_tokens_per_s) else w.tokens_per_s)
                   for w in workers]
        ttft, itl = self.assess("prefill", prompts, isl), self.assess("decode", workers, isl)
        reasons = [dataclasses.replace(v.reason, role="decode") for v in (ttft, itl)]
        delta = max(ttft.delta, itl.delta)
        return TierLoad("decode", delta, ttft.can_spare and itl.can_spare, reasons[0 if ttft.delta == delta else 1]), \
            reasons

    def _assess_prefill(self, workers: list[WorkerStep], isl: float, rate: float = 0.0) -> TierLoad:
        cfg, n = self.config, len(workers)
        slo = cfg.ttft_slo_s
        if not n or math.isnan(self.prefill.predict((0.0,))):
            return TierLoad("prefill", 0, False, Reason("load-no-fit", "prefill"))
        isl = 0.0 if math.isnan(isl) else isl
        per_token = self.prefill_time_s(self.budget_tokens) / self.budget_tokens
        queued = [float(w.num_queued_prefill_tokens) for w in workers]
        util = [(0.0 if math.isnan(w.tokens_per_s) else w.tokens_per_s) * per_token for w in workers]
        ttft = max(self.prefill_time_s(q + isl) for q in queued)
        mean_util = sum(util) / n
        arriving = rate * isl * per_token / n  # the arrivals' utilization of each worker
        values = {"ttft_s": ttft, "utilization": mean_util, "workers": n}
        if mean_util > SATURATED or arriving > SATURATED or (ttft > slo and max(queued) > 0):
            need = self.prefill_need(workers, isl, rate)
            values |= {"need": float(need)}
            if need <= n:  # the tier's load fits it: one worker's backlog, which new prompts avoid
                return TierLoad("prefill", 0, False, Reason("ttft-imbalance", "prefill", values))
            return TierLoad("prefill", need - n, False, Reason("ttft-over-slo", "prefill", values))
        if n < 2:
            return TierLoad("prefill", 0, False, Reason("load-ok", "prefill", values))
        spread = sum(queued) / (n - 1) * _imbalance(queued)
        ttft_less = self.prefill_time_s(spread + isl)
        util_less = sum(util) / (n - 1)
        values |= {"ttft_s_n_minus_1": ttft_less, "utilization_n_minus_1": util_less}
        can_spare = ttft_less <= slo and util_less < SATURATED
        if ttft_less < cfg.scale_down_margin * slo and util_less < cfg.scale_down_margin:
            return TierLoad("prefill", -1, can_spare, Reason("load-low", "prefill", values))
        return TierLoad("prefill", 0, can_spare, Reason("load-ok", "prefill", values))

    def least(self, role: str, workers: list[WorkerStep], isl: float, rate: float, osl: float) -> int:
        """The fewest workers the tier's load needs (its need without today's count as a floor):
        what a low tier keeps when the other tier wants its GPUs."""
        isl, rate = (0.0 if math.isnan(x) else x for x in (isl, rate))
        if role == "prefill":
            return self.prefill_need(workers, isl, rate, keep=False)
        return self.decode_need(workers, rate * osl if math.isfinite(osl) else 0.0)

    def prefill_need(self, workers: list[WorkerStep], isl: float, rate: float = 0.0, keep: bool = True) -> int:
        """Prefill workers the tier needs, from its ready ``workers``' load: the prompt tokens they
        compute per second plus their queue drained within one interval, or ``rate`` prompts of
        ``isl`` new tokens per second if more (a saturated tier's computed tokens understate its
        demand; so does its queue when the router spills prompts to the decode tier), at
        ``max_utilization`` each, and enough workers that the queue spread over them plus one
        ``isl``-token prompt is computed within the TTFT target. Capped at the budget; at least
        today's workers unless ``keep`` is False."""
        cfg = self.config
        per_token = self.prefill_time_s(self.budget_tokens) / self.budget_tokens
        queued = sum(float(w.num_queued_prefill_tokens) for w in workers)
        computed = sum(0.0 if math.isnan(w.tokens_per_s) else w.tokens_per_s for w in workers)
        busy = max(computed + queued / cfg.adjustment_interval_s, rate * isl) * per_token  # GPU-s per s
        need = max(len(workers) if keep else cfg.min_prefill, math.ceil(busy / cfg.max_utilization - 1e-9), 1)
        while need < cfg.max_workers and self.prefill_time_s(queued / need + isl) > cfg.ttft_slo_s:
            need += 1
        return min(need, cfg.max_workers)

    def decode_need(self, workers: list[WorkerStep], demand: float = 0.0) -> int:
        """Decode workers the tier needs, from its ready ``workers``' load: the tokens per second
        they decode, scaled up by the requests waiting for a seat or KV (each will decode as fast as
        a running one), or ``demand`` tokens per second (arrivals x answer length) if more, at
        ``max_utilization`` of each worker's capacity at the ITL target (:meth:`decode_capacity`:
        the step time grows with the batch, so a worker near its capacity is near the target; the
        margin is in throughput, what a rising load eats while new workers start), and their KV
        (with the waiting prompts') under ``scale_down_margin`` of N workers' KV, their sequences
        under 0.9 of N workers' seats. Capped at the budget."""
        cfg = self.config
        running = sum(w.num_running for w in workers)
        waiting = sum(w.num_waiting for w in workers)
        usage = sum(w.kv_usage for w in workers)
        rate, context = self.decode_demand(workers, demand)
        # a worker's KV usage per sequence (the waiting ones counted at today's context)
        usage_per_seq = usage / running if running and usage > 0 else 0.0
        capacity = self.decode_capacity(context) * cfg.max_utilization
        need = max(1, math.ceil(rate / capacity - 1e-9) if capacity > 0 else cfg.max_workers)
        while need < cfg.max_workers and (
                usage_per_seq * (running + waiting) / need > cfg.scale_down_margin
                or (running + waiting) / need > self.max_num_seqs * SATURATED):
            need += 1
        return min(need, cfg.max_workers)

    def decode_capacity(self, context: float) -> float:
        """Tokens per second one worker decodes with its step at the ITL target, sequences of
        ``context`` KV tokens (the batch whose step is the target, at most ``max_num_seqs``)."""
        slo = self.config.itl_slo_s
        a = self.decode.predict((0.0, 0.0))
        per_seq = self.decode.predict((1.0, context)) - a
        if a >= slo:
            return 0.0
        n = min(float(self.max_num_seqs), (slo - a) / per_seq if per_seq > 0 else math.inf)
        return n / (a + n * per_seq)

    @staticmethod
    def decode_demand(workers: list[WorkerStep], demand: float = 0.0) -> tuple[float, float]:
        """(tokens per second the tier is asked to decode, the mean context of its sequences): the
        workers' decode rate scaled up by the requests waiting for a seat or KV (each will decode as
        fast as a running one), or ``demand`` (arrivals x answer length) if more."""
        running = sum(w.num_running for w in workers)
        waiting = sum(w.num_waiting for w in workers)
        rate = sum(0.0 if math.isnan(w.decode_tokens_per_s) else w.decode_tokens_per_s for w in workers)
        if running:
            rate *= (running + waiting) / running
        kv = sum(float(w.num_active_kv_tokens) for w in workers)
        return max(rate, 0.0 if math.isnan(demand) else demand), kv / running if running else 0.0

    def steady_itl_s(self, tokens_per_s: float, context: float) -> float:
        """ITL of a worker asked for ``tokens_per_s`` decode tokens of sequences of ``context`` KV
        tokens, at the steady batch n of Little's law: n = rate * step(n), step(n) = a + n * (b + c * context).
        Infinite when no batch keeps up."""
        a = self.decode.predict((0.0, 0.0))
        per_seq = self.decode.predict((1.0, context)) - a
        slack = 1.0 - tokens_per_s * per_seq
        if slack <= 0 or tokens_per_s * a / slack > self.max_num_seqs:
            return math.inf
        return a / slack

    def _assess_decode(self, workers: list[WorkerStep], demand: float = 0.0) -> TierLoad:
        cfg, n = self.config, len(workers)
        slo = cfg.itl_slo_s
        if not n or math.isnan(self.decode.predict((0.0, 0.0))):
            return TierLoad("decode", 0, False, Reason("load-no-fit", "decode"))
        running = [float(w.num_running) for w in workers]
        kv = [float(w.num_active_kv_tokens) for w in workers]
        usage = sum(w.kv_usage for w in workers) / n
        itl = max(self.decode.predict((r, k)) for r, k in zip(running, kv))
        # every seat taken and requests waiting for one: their next token waits for a seat (the
        # step time alone looks fine)
        queued = sum(w.num_waiting for w in workers if w.num_running >= self.max_num_seqs)
        values = {"itl_s": itl, "kv_usage": usage, "workers": n, "waiting_for_a_seat": queued}
        if usage > SATURATED or queued:
            need = self.decode_need(workers, demand)
            values |= {"need": float(need)}
            if need <= n:  # the tier's load fits it: one worker's batch, which a worker more would not take
                return TierLoad("decode", 0, False, Reason("itl-imbalance", "decode", values))
            return TierLoad("decode", need - n, False, Reason("itl-over-slo", "decode", values))
        if itl > slo:
            # One more worker takes its share of the sequences; the busiest then runs
            # ceil(total / (N+1)) of them. When that does not shorten the step (one sequence
            # alone is over the target: a long context, a slow machine), a worker more would only
            # be drained again once idle: the 1 <-> 2 flap of a single slow request.
            total = sum(running)
            per = math.ceil(total / (n + 1)) if total else 0.0
            itl_more = self.decode.predict((per, per * (sum(kv) / total if total else 0.0)))
            values |= {"itl_s_n_plus_1": itl_more}
            if itl_more > _HELPS * itl:
                return TierLoad("decode", 0, False, Reason("itl-floor", "decode", values))
            need = self.decode_need(workers, demand)
            values |= {"need": float(need)}
            if need <= n:  # the tier's load fits it: one worker's batch, which a worker more would not take
                return TierLoad("decode", 0, False, Reason("itl-imbalance", "decode", values))
            return TierLoad("decode", need - n, False, Reason("itl-over-slo", "decode", values))
        # Rising: the rate asked holds each worker over 0.9 of its capacity at the target (its ITL
        # follows in a tick or two, new workers take a start-up to come).
        rate, context = self.decode_demand(workers, demand)
        capacity = self.decode_capacity(context)
        if rate / n > SATURATED * capacity:
            need = self.decode_need(workers, demand)
            values |= {"capacity_tokens_per_s": capacity, "need": float(need)}
            if need > n:
                return TierLoad("decode", need - n, False, Reason("itl-rising", "decode", values))
        if n < 2:
            return TierLoad("decode", 0, False, Reason("load-ok", "decode", values))
        # Fewer workers: each decodes more tokens per second; its batch grows until it keeps up
        # (and its steps slow down with it), so re-predict at the steady batch, not today's.
        rates = [0.0 if math.isnan(w.decode_tokens_per_s) else w.decode_tokens_per_s for w in workers]
        context = sum(kv) / sum(running) if sum(running) else 0.0
        per_worker = sum(rates) / (n - 1) * _imbalance(rates)
        itl_less = self.steady_itl_s(per_worker, context)
        batch_less = per_worker * itl_less if math.isfinite(itl_less) else math.inf
        tokens_per_usage = sum(kv) / sum(w.kv_usage for w in workers) if usage > 0 else 0.0
        usage_less = batch_less * context / tokens_per_usage if tokens_per_usage else usage * n / (n - 1)
        values |= {"itl_s_n_minus_1": itl_less, "kv_usage_n_minus_1": usage_less}
        can_spare = itl_less <= slo and usage_less < SATURATED
        # ... and under the rising test's band (0.9 x 0.8 of the capacity), so that one does not
        # take the worker back on the next tick
        calm = per_worker < cfg.scale_down_margin * SATURATED * capacity
        if itl_less < cfg.scale_down_margin * slo and usage_less < cfg.scale_down_margin and calm:
            return TierLoad("decode", -1, can_spare, Reason("load-low", "decode", values))
        return TierLoad("decode", 0, can_spare, Reason("load-ok", "decode", values))
