"""Batched sampling: penalties, greedy, temperature, top-k, top-p, min-p, per-request seeds,
and log-probabilities with top-N alternatives.

Log-probabilities are those of the model's raw distribution (before penalties and
temperature), like vLLM's default. A seeded request owns a generator, so its tokens do not
depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from engine.request import Request, TokenLogprob
from engine.scheduler import SampledToken


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[SampledToken]:
        """``logits``: ``[len(requests), vocab]`` float32, one row per request."""
        n = len(requests)
        params = [r.sampling for r in requests]
        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if any(p.has_penalties for p in params):
            logits = self._apply_penalties(logits.clone(), requests)

        token_ids = torch.empty(n, dtype=torch.long, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if greedy:
            idx = torch.tensor(greedy, device=logits.device)
            token_ids[idx] = logits[idx].argmax(dim=-1)
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if rand:
            idx = torch.tensor(rand, device=logits.device)
            probs = self._probs([params[i] for i in rand], logits[idx])
            token_ids[idx] = self._draw(probs, [requests[i] for i in rand])

        ids = token_ids.tolist()
        out = [SampledToken(t) for t in ids]
        if raw_logprobs is not None:
            for i, p in enumerate(params):
                if p.logprobs is None:
                    continue
                row = raw_logprobs[i]
                top = {}
                if p.logprobs:
                    values, indices = row.topk(p.logprobs)
                    top = dict(zip(indices.tolist(), values.tolist()))
                out[i].logprob = TokenLogprob(ids[i], float(row[ids[i]]), top)
        return out

    # ---- pieces ----------------------------------------------------------------------------
    @staticmethod
    def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        vocab = logits.shape[-1]
        for i, r in enumerate(requests):
            p = r.sampling
            if not p.has_penalties:
                continue
            if p.repetition_penalty != 1.0:  # over prompt and output, as in HF and vLLM
                seen = torch.tensor(sorted(set(r.token_ids)), device=logits.device, dtype=torch.long)
                seen = seen[seen < vocab]
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and r.num_output_tokens:
                out = torch.tensor(r.output_token_ids, device=logits.device, dtype=torch.long)
                counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    @staticmethod
    def _probs(params: list, logits: torch.Tensor) -> torch.Tensor:
        temps = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)
        logits = logits / temps[:, None]
        top_ks = [p.top_k if p.top_k > 0 else 0 for p in params]
        top_ps = [p.top_p for p in params]
        if any(top_ks) or any(tp < 1.0 for tp in top_ps):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            vocab = logits.shape[-1]
            ks = torch.tensor([k if k else vocab for k in top_ks], device=logits.device)
            ranks = torch.arange(vocab, device=logits.device)[None, :]
            drop = ranks >= ks[:, None]
            sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
            before = sorted_probs.cumsum(dim=-1) - sorted_probs
            ps = torch.tensor(top_ps, device=logits.device, dtype=logits.dtype)
            drop |= before >= ps[:, None]
            drop[:, 0] = False
            mask = torch.zeros_like(drop).scatter_(1, order, drop)
            logits = logits.masked_fill(mask, float("-inf"))
        probs = logits.softmax(dim=-1)
        min_ps = [p.min_p for p in params]
        if any(min_ps):
            mp = torch.tensor(min_ps, device=logits.device, dtype=probs.dtype)
            threshold = probs.max(dim=-1, keepdim=True).values * mp[:, None]
            probs = probs.masked_fill(probs < threshold, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    def _draw(self, probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Exponential-race sampling: argmax(p / E), E ~ Exp(1), one noise row per request."""
        noise = torch.empty_like(probs)
        unseeded = []
        for i, r in enumerate(requests):
            seed = r.sampling.seed
            if seed is None:
                unseeded.append(i)
                continue
            gen = self._generators.get(r.request_id)
            if gen is None:
                gen = torch.Generator(device=probs.device).manual_seed(seed)
                self._generators[r.request_id] = gen
            noise[i].exponential_(generator=gen)
        if unseeded:
            idx = torch.tensor(unseeded, device=probs.device)
            noise[idx] = torch.empty(len(unseeded), probs.shape[-1], device=probs.device,
                                     dtype=probs.dtype).exponential_(generator=self.generator)
        return (probs / noise).argmax(dim=-1)
