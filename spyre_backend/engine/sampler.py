"""Token selection per request inside one batch: greedy rows take argmax, others sample."""

from __future__ import annotations

import torch

from spyre_backend.engine.sampling_params import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(params.seed if params.seed is not None else torch.seed())
    return gen


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits: float32 [n, vocab] for n real rows (padding rows already dropped)."""
    logits = logits.cpu()
    greedy = logits.argmax(dim=-1)
    tokens = greedy.tolist()
    for row, p in enumerate(params):
        if p.greedy:
            continue
        row_logits = logits[row] / p.temperature
        if p.top_k > 0:
            kth = torch.topk(row_logits, min(p.top_k, row_logits.numel())).values[-1]
            row_logits = row_logits.masked_fill(row_logits < kth, float("-inf"))
        probs = torch.softmax(row_logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        tokens[row] = int(torch.multinomial(probs, 1, generator=generators[row]).item())
    return tokens
