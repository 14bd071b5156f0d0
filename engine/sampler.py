"""Batched sampling: penalties, greedy, temperature, top-k, top-p, min-p, per-request seeds,
and log-probabilities with top-N alternatives.

Log-probabilities are those of the model's raw distribution (before penalties and
temperature), like vLLM's default. A seeded request owns a generator, so its tokens do not
depend on what else is in the batch.
"""

from __future__ import annotations

import numpy as np
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
        params = [r.sampling for r in requests]
        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if any(p.has_penalties for p in params):
            logits = self._apply_penalties(logits.clone(), requests)

        rand = [i for i, p in enumerate(params) if not p.greedy]
        token_ids = logits.argmax(dim=-1)
        if rand:
            idx = _on(logits.device, rand)
            probs = self._probs([params[i] for i in rand], logits[idx])
            token_ids[idx] = self._draw(probs, [requests[i] for i in rand])

        # One batched gather and top-k for every row that asked for logprobs; the host waits for the
        # device once for the tokens and once for their logprobs, whatever the batch.
        want = [i for i, p in enumerate(params) if p.logprobs is not None] if raw_logprobs is not None else []
        if not want:
            return [SampledToken(t) for t in token_ids.tolist()]
        rows = _on(logits.device, want)
        chosen = raw_logprobs[rows].gather(1, token_ids[rows, None])[:, 0]
        max_top = max(params[i].logprobs for i in want)
        top_values = top_indices = None
        if max_top:
            top_values, top_indices = raw_logprobs[rows].topk(max_top, dim=-1)
        ids = token_ids.tolist()
        out = [SampledToken(t) for t in ids]
        chosen_host = chosen.tolist()
        values_host = top_values.tolist() if top_values is not None else None
        indices_host = top_indices.tolist() if top_indices is not None else None
        for k, i in enumerate(want):
            top = {}
            num = params[i].logprobs
            if num:
                top = dict(zip(indices_host[k][:num], values_host[k][:num]))
            out[i].logprob = TokenLogprob(ids[i], chosen_host[k], top)
        return out

    # ---- pieces ----------------------------------------------------------------------------
    @staticmethod
    def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """All rows at once: the rows' token ids go to the device as one padded matrix (padding
        lands in a spare column), then one scatter builds the seen-mask and the output counts."""
        n, vocab = logits.shape
        dev = logits.device
        width = max(1, max(r.num_tokens for r in requests))
        tokens = np.full((n, width), vocab, dtype=np.int64)  # column ``vocab`` is the bin for padding
        outputs = np.full((n, width), vocab, dtype=np.int64)
        for i, r in enumerate(requests):
            if r.sampling.has_penalties:
                tokens[i, :r.num_tokens] = np.minimum(r.token_ids, vocab)
                outputs[i, :r.num_output_tokens] = np.minimum(r.output_token_ids, vocab)
        tokens_d = torch.from_numpy(tokens).to(dev, non_blocking=True)
        outputs_d = torch.from_numpy(outputs).to(dev, non_blocking=True)
        seen = torch.zeros(n, vocab + 1, dtype=torch.bool, device=dev).scatter_(1, tokens_d, True)[:, :vocab]
        counts = torch.zeros(n, vocab + 1, dtype=logits.dtype, device=dev)
        counts = counts.scatter_add_(1, outputs_d, torch.ones_like(outputs_d, dtype=logits.dtype))[:, :vocab]
        rep, freq, pres = (_on(dev, [getattr(r.sampling, name) for r in requests], logits.dtype)[:, None]
                           for name in ("repetition_penalty", "frequency_penalty", "presence_penalty"))
        # Repetition penalty over prompt and output, as in HF and vLLM; then OpenAI's penalties.
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
        return logits - (freq * counts + pres * (counts > 0).to(logits.dtype))

    @staticmethod
    def _probs(params: list, logits: torch.Tensor) -> torch.Tensor:
        temps = _on(logits.device, [p.temperature for p in params], logits.dtype)
        logits = logits / temps[:, None]
        top_ks = [p.top_k if p.top_k > 0 else 0 for p in params]
        top_ps = [p.top_p for p in params]
        if any(top_ks) or any(tp < 1.0 for tp in top_ps):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            vocab = logits.shape[-1]
            ks = _on(logits.device, [k if k else vocab for k in top_ks])
            ranks = torch.arange(vocab, device=logits.device)[None, :]
            drop = ranks >= ks[:, None]
            sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
            before = sorted_probs.cumsum(dim=-1) - sorted_probs
            ps = _on(logits.device, top_ps, logits.dtype)
            drop |= before >= ps[:, None]
            drop[:, 0] = False
            mask = torch.zeros_like(drop).scatter_(1, order, drop)
            logits = logits.masked_fill(mask, float("-inf"))
        probs = logits.softmax(dim=-1)
        min_ps = [p.min_p for p in params]
        if any(min_ps):
            mp = _on(logits.device, min_ps, probs.dtype)
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
            idx = _on(probs.device, unseeded)
            noise[idx] = torch.empty(len(unseeded), probs.shape[-1], device=probs.device,
                                     dtype=probs.dtype).exponential_(generator=self.generator)
        return (probs / noise).argmax(dim=-1)


def _on(device: torch.device, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values on the device without a sync (pageable memory is staged before this returns)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
