"""Drives the scheduler without a model, the way the engine core does: a turn starts
(``Turns.start``), then ``schedule()``, then ``update_from_output()`` with one sampled token for
every sequence whose step reached its end, and the turn ends (``Turns.end``)."""

from __future__ import annotations

import torch

from spyre_backend.config import SchedulerConfig
from spyre_backend.engine.kv_cache_manager import KVCacheManager
from spyre_backend.engine.prefix_cache import SegmentHasher
from spyre_backend.engine.request import Request
from spyre_backend.engine.sampler import Sample
from spyre_backend.engine.sampling_params import SamplingParams
from spyre_backend.engine.scheduler import Scheduler
from spyre_backend.engine.turns import Turns

BLOCK = 4
IMAGE = 99  # the image placeholder id of these tests


def make(num_blocks=64, segment=0, hasher=None, **config) -> Scheduler:
    kv = KVCacheManager(num_blocks, BLOCK, segment)
    turns = Turns(kv, image_token_id=IMAGE, ttl_s=600, max_sessions=1000, max_context=100_000, hasher=hasher)
    return Scheduler(kv, turns, SchedulerConfig(**config))


def start(sched: Scheduler, request: Request) -> Request:
    """Start ``request``'s turn as the engine core does, and queue it."""
    assert sched.turns.arrive(request)
    assert sched.turns.start(request, fits_pool=lambda num_tokens: None) is None
    sched.add(request)
    return request


def submit(sched: Scheduler, prompt_len: int, sequence_id=None, end=True) -> Request:
    sequence_id = sequence_id if sequence_id is not None else object()
    return start(sched, Request(torch.arange(prompt_len), None, SamplingParams(max_tokens=100), lambda out: None,
                                sequence_id=sequence_id, sequence_start=sched.turns.get(sequence_id) is None,
                                sequence_end=end))


def step(sched: Scheduler):
    """One engine step without a model: every sequence that samples gets token 7."""
    out = sched.schedule()
    sampled = {seq.request_id: Sample(7) for seq in out.sequences if seq.samples}
    for request, sample in sched.update_from_output(out, sampled):
        request.output_ids.append(sample.token)  # what the output processor records
    return out


def finish(sched: Scheduler, request: Request) -> None:
    sched.remove(request)
    sched.turns.end(request, completed=True, broken=False)


def tokens(out) -> dict[int, int]:
    return {s.request_id: s.num_tokens for s in out.sequences}


def make_cached(num_blocks=64, segment=BLOCK, **config) -> Scheduler:
    """Prefix caching by whole blocks (as on Spyre), or by ``segment``-token parts of them."""
    return make(num_blocks, segment, SegmentHasher(segment, IMAGE), **config)


def submit_ids(sched: Scheduler, ids: list[int], features: torch.Tensor | None = None) -> Request:
    return start(sched, Request(torch.tensor(ids), features, SamplingParams(max_tokens=100), lambda out: None,
                                sequence_id=object()))


def run_prefill(sched: Scheduler, request: Request):
    """Steps until ``request`` sampled its first token; returns its first scheduled sequence."""
    first = None
    for _ in range(50):
        if request.sampled_any:
            break
        out = step(sched)
        first = first or next((s for s in out.sequences if s.request_id == request.request_id), None)
    return first


def run_to_end(sched: Scheduler, request: Request) -> Request:
    """Prefill ``request`` until its first token, then end it (its blocks stay cached)."""
    run_prefill(sched, request)
    finish(sched, request)
    return request


def image_prompt(features_seed: int, question: list[int]) -> tuple[list[int], torch.Tensor]:
    ids = [1, 2, 3] + [IMAGE] * 6 + question  # the image's rows span blocks 0-2
    return ids, torch.randn(6, 8, generator=torch.Generator().manual_seed(features_seed))
