"""Token selection per request inside one batch.

Each row carries its own parameters and random generator, so a seeded request samples the same
tokens whatever else shares its batch. Order of operations (as in vLLM): the grammar's token
bitmask (structured output: what it masks is never sampled), penalties, then greedy argmax or
temperature, top-k, top-p, min-p and a draw. Logprobs are those of the model's
distribution (after penalties, before temperature and truncation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from spyre_backend.engine.sampling_params import SamplingParams
from spyre_backend.engine.structured_output import apply_bitmasks

if TYPE_CHECKING:
    from concurrent.futures import Future


@dataclass
class SampleRow:
    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: torch.Tensor  # for the repetition penalty
    output_ids: list[int]
    banned: list[int]  # tokens not allowed yet (eos before min_tokens)
    allowed: torch.Tensor | None = None  # int32 [1, vocab/32] bitmask of its grammar (structured output)
    allowed_ready: Future | None = None  # done once ``allowed`` is filled (on the grammar's mask thread)


@dataclass
class Sample:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(params.seed if params.seed is not None else torch.seed())
    return gen


def _apply_penalties(logits: torch.Tensor, row: SampleRow) -> torch.Tensor:
    p = row.params
    out = torch.tensor(row.output_ids, dtype=torch.long)
    if p.repetition_penalty != 1.0:
        seen = torch.unique(torch.cat([row.prompt_ids.cpu(), out]))
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if out.numel() and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(out, minlength=logits.numel()).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        sorted_probs[(sorted_probs.cumsum(0) - sorted_probs) >= p.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample(logits: torch.Tensor, rows: list[SampleRow], never: list[int] = ()) -> list[Sample]:
    """logits: float32 [n, vocab] for the n real rows (padding rows already dropped), a tensor of
    this step's own (masked in place). ``never``: tokens no row may sample."""
    logits = logits.cpu()
    # logprobs are the model's own distribution, before bans and penalties (vLLM's default, raw
    # logprobs): banning the image placeholder would otherwise shift every logprob by its share
    raw = logits.clone() if any(r.params.logprobs is not None for r in rows) else logits
    if never:
        logits[:, list(never)] = float("-inf")
    # rows with a grammar: what it does not allow next can never be sampled, whatever the settings
    constrained = [i for i, row in enumerate(rows) if row.allowed is not None]
    if constrained:
        for i in constrained:
            if rows[i].allowed_ready is not None:
                rows[i].allowed_ready.result()  # one future per step: a wait only for the first row
        apply_bitmasks(logits, [rows[i].allowed for i in constrained], constrained)
    simple = [r.params.greedy and not (r.params.has_penalties or r.params.logprobs is not None
                                       or (r.allowed is not None and r.banned)) for r in rows]
    # greedy rows with tokens not allowed yet (eos before min_tokens) are masked all in one op:
    # per row it was a few small ops each, 0.2 ms of a batch-16 step
    bans = [(i, token) for i, row in enumerate(rows) if simple[i] for token in row.banned]
    masked = logits
    if bans:
        masked = logits.clone()
        at = torch.tensor(bans, dtype=torch.long)
        masked[at[:, 0], at[:, 1]] = float("-inf")
    argmax = masked.argmax(dim=-1).tolist()
    results = []
    for i, row in enumerate(rows):
        if simple[i]:  # the common case stays a single batched argmax
            results.append(Sample(argmax[i]))
            continue
        row_logits = logits[i].clone()
        if row.params.has_penalties:
            row_logits = _apply_penalties(row_logits, row)
        if row.banned:
            kept = row_logits[row.banned].clone()
            row_logits[row.banned] = float("-inf")
            if row.allowed is not None and not torch.isfinite(row_logits).any():
                row_logits[row.banned] = kept  # its grammar can only end here: the grammar wins over min_tokens
        p = row.params
        token = int(row_logits.argmax()) if p.greedy else _draw(row_logits, p, row.generator)
        sample_out = Sample(token)
        if p.logprobs is not None:
            logprobs = torch.log_softmax(raw[i], dim=-1)
            sample_out.logprob = float(logprobs[token])
            if p.logprobs:
                top = torch.topk(logprobs, p.logprobs)
                sample_out.top = list(zip(top.indices.tolist(), top.values.tolist()))
        results.append(sample_out)
    return results
