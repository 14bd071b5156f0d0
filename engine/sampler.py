"""Batched sampling: penalties, greedy, temperature, top-k, top-p, min-p, per-request seeds,
and log-probabilities with top-N alternatives.

Log-probabilities are those of the model's raw distribution (before penalties and
temperature), like vLLM's default.

A seeded request's draws are seeded by position: the noise for its output token ``k`` comes
from a generator seeded with ``draw_seed(seed, k)``, on whatever worker draws it. So its tokens
depend neither on what else is in the batch nor on where the earlier tokens were drawn: a prompt
prefilled on another worker (which drew token 0), a request preempted and recomputed, or an
n > 1 child (seed + i) all draw exactly what one aggregated engine would. Nothing about the
generator crosses a process: the position is the number of tokens the request already has.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from engine.plan import SampledToken
from engine.request import Request
from protocol.outputs import TokenLogprob


@dataclass
class SampleBatch:
    """A batch's sampled tokens, still on the device (no host sync made): row ``i`` belongs to
    the ``i``-th request given to the sampler. ``logprob_rows`` lists the rows that asked for
    logprobs, in order, with ``chosen`` ``[m]`` and the top ``[m, k]`` values/indices for them."""

    token_ids: torch.Tensor  # [n] int64
    logprob_rows: list[int] = field(default_factory=list)
    num_top: list[int] = field(default_factory=list)  # alternatives each of those rows asked for
    chosen: torch.Tensor | None = None  # [m] float32
    top_values: torch.Tensor | None = None  # [m, k] float32
    top_indices: torch.Tensor | None = None  # [m, k] int64

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.token_ids, self.chosen, self.top_values, self.top_indices]

    def with_tensors(self, tensors: list[torch.Tensor | None]) -> SampleBatch:
        return replace(self, token_ids=tensors[0], chosen=tensors[1], top_values=tensors[2], top_indices=tensors[3])

    def tolist(self) -> list[SampledToken]:
        """The tokens on the host (waits for the device where the tensors live there)."""
        ids = self.token_ids.tolist()
        out = [SampledToken(t) for t in ids]
        if not self.logprob_rows:
            return out
        chosen = self.chosen.tolist()
        values = self.top_values.tolist() if self.top_values is not None else None
        indices = self.top_indices.tolist() if self.top_indices is not None else None
        for k, (i, num) in enumerate(zip(self.logprob_rows, self.num_top)):
            top = dict(zip(indices[k][:num], values[k][:num])) if num else {}
            out[i].logprob = TokenLogprob(ids[i], chosen[k], top)
        return out


_MASK64 = (1 << 64) - 1


def draw_seed(seed: int, position: int) -> int:
    """The generator seed for a seeded request's output token ``position`` (0: the first token):
    splitmix64 of the pair, so nearby seeds and positions give unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1  # 63 bits: any torch generator takes it


def sample_position(request: Request) -> int:
    """Which output token of ``request`` a step launched now samples: its tokens on the host
    plus those sampled by launched steps whose ids have not come back (asynchronous scheduling)."""
    return request.num_output_tokens + request.num_inflight_tokens


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)  # unseeded requests
        self._seeded = torch.Generator(device=device)  # reseeded for every seeded row (draw_seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[SampledToken]:
        """``logits``: ``[len(requests), vocab]`` float32, one row per request."""
        return self.sample(logits, requests).tolist()

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampleBatch:
        """Queue the batch's sampling on the device; nothing waits for it. Penalties read the
        requests' tokens on the host, so they must all be known there."""
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

        # One batched gather and top-k for every row that asked for logprobs.
        want = [i for i, p in enumerate(params) if p.logprobs is not None] if raw_logprobs is not None else []
        if not want:
            return SampleBatch(token_ids)
        rows = _on(logits.device, want)
        chosen = raw_logprobs[rows].gather(1, token_ids[rows, None])[:, 0]
        num_top = [params[i].logprobs for i in want]
        top_values = top_indices = None
        if max(num_top):
            top_values, top_indices = raw_logprobs[rows].topk(max(num_top), dim=-1)
        return SampleBatch(token_ids, want, num_top, chosen, top_values, top_indices)

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
            # A launch reads the generator's state when it is queued: one generator serves every row.
            self._seeded.manual_seed(draw_seed(seed, sample_position(r)))
            noise[i].exponential_(generator=self._seeded)
        if unseeded:
            idx = _on(probs.device, unseeded)
            noise[idx] = torch.empty(len(unseeded), probs.shape[-1], device=probs.device,
                                     dtype=probs.dtype).exponential_(generator=self.generator)
        return (probs / noise).argmax(dim=-1)


def _on(device: torch.device, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values on the device without a sync (pageable memory is staged before this returns)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
