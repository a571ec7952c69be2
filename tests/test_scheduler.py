"""The scheduler and the KV cache manager alone: no model, no tensors on a device.

Requests are driven the way the engine drives them: ``schedule()``, then ``step_done()``, then
one sampled token appended for every sequence whose step reached its end.
"""

from __future__ import annotations

import pytest
import torch

from spyre_backend.engine.kv_cache_manager import NULL_BLOCK, BlockPool, KVCacheManager
from spyre_backend.engine.request import Request
from spyre_backend.engine.sampling_params import SamplingParams
from spyre_backend.config import SchedulerConfig
from spyre_backend.engine.scheduler import Scheduler
from spyre_backend.engine.sessions import SessionTable

BLOCK = 4


def make(num_blocks=64, **config) -> Scheduler:
    kv = KVCacheManager(num_blocks, BLOCK)
    return Scheduler(kv, SessionTable(kv, ttl_s=600), SchedulerConfig(**config))


def submit(sched: Scheduler, prompt_len: int, sequence_id=None, end=True) -> Request:
    request = Request(torch.arange(prompt_len), None, SamplingParams(max_tokens=100), lambda out: None,
                      sequence_id=sequence_id if sequence_id is not None else object(), sequence_end=end)
    session = sched.sessions.get(request.sequence_id) or sched.sessions.open(request.sequence_id)
    session.token_ids.extend(range(prompt_len))
    session.active = request
    request.session = session
    sched.add(request)
    return request


def step(sched: Scheduler):
    """One engine step without a model; returns {request_id: tokens computed}."""
    out = sched.schedule()
    sched.step_done(out)
    by_id = {r.request_id: r for r in sched.running}
    for seq in out.sequences:
        if seq.samples:
            request = by_id[seq.request_id]
            request.output_ids.append(7)
            request.session.token_ids.append(7)
    return out


def finish(sched: Scheduler, request: Request) -> None:
    sched.remove(request)
    request.session.active = None
    if request.sequence_end:
        sched.sessions.close(request.session)


def tokens(out) -> dict[int, int]:
    return {s.request_id: s.num_tokens for s in out.sequences}


def test_decode_rows_and_a_prefill_chunk_share_one_step_under_the_budget():
    sched = make(max_running=8, prefill_chunk=16, max_num_batched_tokens=20)
    a, b = submit(sched, 3), submit(sched, 3)
    step(sched)  # a's prompt (3 tokens); b waits: one prompt chunk per step
    step(sched)  # a decodes, b's prompt
    c = submit(sched, 40)
    out = step(sched)
    assert tokens(out) == {a.request_id: 1, b.request_id: 1, c.request_id: 16}  # 18 <= 20
    assert out.num_tokens <= 20 and len(out.prefills) == 1 and len(out.decodes) == 2


def test_the_budget_caps_the_chunk_which_then_ends_on_a_block_boundary():
    sched = make(max_running=8, prefill_chunk=64, max_num_batched_tokens=15)
    a = submit(sched, 2)
    step(sched)
    c = submit(sched, 40)
    out = step(sched)
    # 14 tokens of budget left after a's decode row: the chunk is cut to 12, three whole blocks
    assert tokens(out) == {a.request_id: 1, c.request_id: 12}
    assert out.sequences[1].start == 0 and c.session.num_computed == 12


def test_a_long_prompt_is_prefilled_in_chunks_and_samples_only_at_its_end():
    sched = make(prefill_chunk=16)
    r = submit(sched, 40)
    outs = [step(sched) for _ in range(3)]
    assert [o.sequences[0].num_tokens for o in outs] == [16, 16, 8]
    assert [o.sequences[0].start for o in outs] == [0, 16, 32]
    assert [o.sequences[0].samples for o in outs] == [False, False, True]
    assert r.output_ids == [7] and r.num_prefill_tokens == 40
    out = step(sched)
    assert out.sequences[0].start == 40 and out.sequences[0].num_tokens == 1


def test_admission_is_first_come_first_served_and_bounded_by_max_running():
    sched = make(max_running=2, prefill_chunk=64)
    reqs = [submit(sched, 3) for _ in range(4)]
    for _ in range(3):
        step(sched)
    assert sched.running == reqs[:2] and list(sched.waiting) == reqs[2:]
    finish(sched, reqs[0])
    step(sched)
    assert sched.running == [reqs[1], reqs[2]] and list(sched.waiting) == [reqs[3]]


def test_blocks_are_taken_as_the_sequence_grows():
    sched = make(num_blocks=64)
    r = submit(sched, 5)
    step(sched)
    assert len(sched.kv.block_ids(r.sequence_id)) == 2  # 5 tokens: 2 blocks of 4, not max_tokens' 27
    for _ in range(3):  # positions 5, 6, 7: still within 2 blocks
        step(sched)
    assert len(sched.kv.block_ids(r.sequence_id)) == 2
    out = step(sched)  # position 8 needs a third
    assert len(out.sequences[0].block_ids) == 3 and NULL_BLOCK not in out.sequences[0].block_ids
    finish(sched, r)
    assert sched.kv.num_free == sched.kv.num_usable


def test_a_waiting_request_waits_for_blocks_instead_of_preempting():
    sched = make(num_blocks=4, max_running=4)  # 3 usable blocks
    a = submit(sched, 8)  # 2 blocks
    step(sched)
    b = submit(sched, 8)  # needs 2, one is free
    out = step(sched)
    assert tokens(out) == {a.request_id: 1} and list(sched.waiting) == [b] and not out.preempted


def test_the_most_recently_admitted_request_is_preempted_and_recomputed():
    sched = make(num_blocks=5, max_running=4, prefill_chunk=64)  # 4 usable blocks
    a, b = submit(sched, 7), submit(sched, 7)
    step(sched)
    step(sched)  # a: 8 tokens, b: 7 (2 blocks each, pool empty)
    assert sched.kv.num_free == 0
    out = step(sched)  # a's position 8 needs a third block: b (admitted last) is preempted
    assert out.preempted == [b.request_id] and tokens(out) == {a.request_id: 1}
    assert list(sched.waiting) == [b] and b.session.num_computed == 0 and b.num_preemptions == 1
    assert b.output_ids == [7] and len(b.session.token_ids) == 8  # what it produced is kept
    assert sched.num_preemptions == 1
    finish(sched, a)
    out = step(sched)  # resumed: recomputes its whole sequence, prompt and output, and samples
    assert out.sequences[0].request_id == b.request_id
    assert (out.sequences[0].start, out.sequences[0].num_tokens, out.sequences[0].samples) == (0, 8, True)
    assert b.output_ids == [7, 7]


def test_preempted_requests_resume_in_their_admission_order():
    sched = make(num_blocks=4, max_running=4, prefill_chunk=64, max_prefills=3)  # 3 usable blocks
    a, b, c = submit(sched, 4), submit(sched, 4), submit(sched, 4)
    out = step(sched)  # three prompts in one step; each fills one block
    assert len(out.prefills) == 3 and sched.kv.num_free == 0
    out = step(sched)  # a needs a second block and takes c's; then b needs one: b itself goes
    assert out.preempted == [c.request_id, b.request_id] and tokens(out) == {a.request_id: 1}
    assert list(sched.waiting) == [b, c]


def test_idle_sessions_are_evicted_before_running_requests_are_preempted():
    sched = make(num_blocks=5, max_running=4, prefill_chunk=64)  # 4 usable blocks
    kept = submit(sched, 7, sequence_id="kept", end=False)
    step(sched)
    finish(sched, kept)  # the session keeps its 2 blocks between turns
    assert len(sched.sessions) == 1 and sched.kv.num_free == 2
    a = submit(sched, 8)
    step(sched)
    out = step(sched)  # a needs a third block: the idle session goes, nobody is preempted
    assert not out.preempted and out.evicted_sessions == 1 and sched.sessions.get("kept") is None
    assert "kept" in sched.sessions.evicted and tokens(out) == {a.request_id: 1}


def test_a_session_turn_computes_only_what_the_cache_lacks():
    sched = make(prefill_chunk=64)
    first = submit(sched, 6, sequence_id=1, end=False)
    step(sched)
    finish(sched, first)  # 6 prompt tokens computed; the sampled token is not yet
    second = submit(sched, 5, sequence_id=1)
    out = step(sched)
    seq = out.sequences[0]
    assert (seq.start, seq.num_tokens) == (6, 6)  # the carried token and the new prompt
    assert second.num_prefill_tokens == 6


def test_block_pool_reference_counts():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.take(blocks[:1])
    pool.release(blocks)
    assert pool.num_free == 2 and pool.refs(blocks[0]) == 1  # still held by its second owner
    pool.release(blocks[:1])
    assert pool.num_free == 3
    with pytest.raises(ValueError):
        pool.release(blocks[:1])


def test_kv_manager_refuses_without_taking_anything():
    kv = KVCacheManager(4, BLOCK)  # 3 usable
    assert kv.allocate("a", 8) and not kv.allocate("b", 8)
    assert kv.block_ids("b") == [] and kv.num_free == 1
    assert kv.free("a") == 2 and kv.num_free == 3


# -- prefix caching ------------------------------------------------------------------------------
IMAGE = 99  # the image placeholder id of these tests


def make_cached(num_blocks=64, segment=BLOCK, **config) -> Scheduler:
    """Prefix caching by whole blocks (as on Spyre), or by ``segment``-token parts of them."""
    from spyre_backend.engine.prefix_cache import SegmentHasher

    kv = KVCacheManager(num_blocks, BLOCK, segment)
    return Scheduler(kv, SessionTable(kv, ttl_s=600), SchedulerConfig(**config), SegmentHasher(segment, IMAGE))


def submit_ids(sched: Scheduler, ids: list[int], features: torch.Tensor | None = None) -> Request:
    request = Request(torch.tensor(ids), None, SamplingParams(max_tokens=100), lambda out: None, sequence_id=object())
    session = sched.sessions.open(request.sequence_id)
    session.token_ids.extend(ids)
    if features is not None:
        session.image_features.append(features)
    session.active = request
    request.session = session
    sched.add(request)
    return request


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


def test_a_repeated_prompt_takes_the_cached_blocks_and_computes_only_the_rest():
    sched = make_cached(max_running=4, prefill_chunk=64)
    ids = list(range(10, 24))  # 14 tokens: 3 full blocks and 2 tokens
    first = submit_ids(sched, ids)
    assert run_prefill(sched, first).start == 0 and first.num_cached_tokens == 0
    finish(sched, first)
    again = submit_ids(sched, ids)
    seq = run_prefill(sched, again)
    assert (seq.start, seq.num_tokens, again.num_cached_tokens) == (12, 2, 12)
    assert (sched.prefix_queries, sched.prefix_hits) == (28, 12)


def test_the_last_token_is_always_computed():
    sched = make_cached(max_running=4, prefill_chunk=64)
    ids = list(range(10, 22))  # 12 tokens: exactly 3 blocks
    run_to_end(sched, submit_ids(sched, ids))
    again = submit_ids(sched, ids)
    seq = run_prefill(sched, again)
    assert (seq.start, seq.num_tokens) == (8, 4)  # the third block is computed again, into a block of its own


def test_the_same_text_with_another_image_shares_only_what_comes_before_the_image():
    sched = make_cached(max_running=4, prefill_chunk=64)
    ids, red = image_prompt(0, [5, 6, 7, 8, 9])
    _, blue = image_prompt(1, [5, 6, 7, 8, 9])
    run_to_end(sched, submit_ids(sched, ids, red))
    other = submit_ids(sched, ids, blue)
    assert run_prefill(sched, other).start == 0  # block 0 holds 1 image position already: nothing shared
    same = submit_ids(sched, ids, red.clone())  # the same image again (equal features, another tensor)
    seq = run_prefill(sched, same)
    assert seq.start == 12 and same.num_cached_tokens == 12


def test_a_cached_block_is_never_written_and_every_block_comes_back():
    sched = make_cached(num_blocks=9, max_running=4, prefill_chunk=64)  # 8 usable blocks
    ids = list(range(10, 24))
    a = submit_ids(sched, ids)
    run_prefill(sched, a)
    b = submit_ids(sched, ids)  # while a still runs: shares a's full blocks
    seq = run_prefill(sched, b)
    a_blocks, b_blocks = sched.kv.block_ids(a.session.sequence_id), sched.kv.block_ids(b.session.sequence_id)
    assert b_blocks[:3] == a_blocks[:3] and all(sched.kv.pool.refs(blk) == 2 for blk in a_blocks[:3])
    assert b_blocks[seq.start // BLOCK] not in a_blocks  # b writes only into a block of its own
    for r in (a, b):
        finish(sched, r)
    assert sched.kv.num_free == sched.kv.num_usable  # cached blocks count as free: nothing leaked
    assert sched.kv.num_cached == 3
    # other prompts need every block: the cached ones are handed out again, their hashes dropped
    fillers = [submit_ids(sched, list(range(100 * k, 100 * k + 15))) for k in (1, 2)]
    for r in fillers:
        run_prefill(sched, r)
    assert sched.kv.num_free == 0
    for r in fillers:
        finish(sched, r)
    late = submit_ids(sched, ids)
    assert run_prefill(sched, late).start == 0  # a's blocks were reused: a miss, never a stale hit


def test_a_preempted_request_comes_back_through_its_own_cached_blocks():
    sched = make_cached(num_blocks=7, max_running=4, prefill_chunk=64)  # 6 usable blocks
    a = submit_ids(sched, list(range(10, 17)))  # 7 tokens: 2 blocks, and decode grows it
    run_prefill(sched, a)
    b = submit_ids(sched, list(range(30, 42)))  # 12 tokens: 3 blocks
    run_prefill(sched, b)
    for _ in range(10):
        if sched.num_preemptions:
            break
        step(sched)
    assert b.num_preemptions == 1 and b in sched.waiting  # the pool ran out as both grew
    finish(sched, a)
    seq = step(sched).sequences[0]
    assert seq.request_id == b.request_id and seq.start == 12  # its full blocks were still cached


def test_truncate_keeps_only_whole_blocks():
    kv = KVCacheManager(16, BLOCK)
    kv.allocate("s", 14)
    blocks = kv.block_ids("s")[:]
    assert kv.truncate("s", 9) == 8 and kv.block_ids("s") == blocks[:2]
    assert kv.num_free == kv.num_usable - 2


# -- prefix caching by segments (half blocks here; 16 of 64 tokens on the CPU) -------------------
SEGMENT = 2


def test_a_prompt_that_diverges_inside_a_block_takes_its_leading_segments_as_a_copy():
    sched = make_cached(max_running=4, prefill_chunk=64, segment=SEGMENT)
    first = submit_ids(sched, list(range(10, 24)))  # 14 tokens
    run_prefill(sched, first)
    finish(sched, first)
    ids = list(range(10, 20)) + [7, 7, 7]  # shares 10 tokens: 2 full blocks and one segment of the third
    again = submit_ids(sched, ids)
    out = sched.schedule()
    seq = out.sequences[0]
    assert (seq.start, seq.num_tokens, again.num_cached_tokens) == (10, 3, 10)
    first_blocks, blocks = sched.kv.block_ids(first.session.sequence_id), list(seq.block_ids)
    assert first_blocks == []  # first is done: its blocks are free, and still cached
    source, destination = out.block_copies[0]
    assert len(out.block_copies) == 1 and blocks[2] == destination != source
    assert sched.kv.pool.refs(source) == 0  # only read: it stays in the free queue, cached
    assert sched.kv.pool.refs(destination) == 1


def test_segments_are_found_without_a_copy_when_a_whole_block_matches():
    sched = make_cached(max_running=4, prefill_chunk=64, segment=SEGMENT)
    run_to_end(sched, submit_ids(sched, list(range(10, 24))))
    submit_ids(sched, list(range(10, 22)) + [7])  # 12 shared tokens: 3 full blocks
    out = sched.schedule()
    assert (out.sequences[0].start, out.block_copies) == (12, [])


def test_the_last_token_is_computed_and_a_partial_hit_stops_before_it():
    sched = make_cached(max_running=4, prefill_chunk=64, segment=SEGMENT)
    ids = list(range(10, 22))  # 12 tokens: 3 blocks, 6 segments
    run_to_end(sched, submit_ids(sched, ids))
    submit_ids(sched, ids)
    out = sched.schedule()
    assert (out.sequences[0].start, out.sequences[0].num_tokens) == (10, 2)  # 5 segments: 2 blocks and a copy
    assert len(out.block_copies) == 1


def test_a_segment_is_shared_only_with_the_same_image():
    sched = make_cached(max_running=4, prefill_chunk=64, segment=SEGMENT)
    ids, red = image_prompt(0, [5, 6, 7, 8, 9])  # [1, 2, 3, img x 6, 5 ...]: segment 1 holds the first image row
    _, blue = image_prompt(1, [5, 6, 7, 8, 9])
    run_to_end(sched, submit_ids(sched, ids, red))
    other = submit_ids(sched, ids, blue)
    out = sched.schedule()
    assert out.sequences[0].start == 2 and len(out.block_copies) == 1  # only segment 0: [1, 2]
    finish(sched, other)
    submit_ids(sched, ids, red.clone())
    out = sched.schedule()
    assert out.sequences[0].start == 12 and out.block_copies == []


def test_a_request_that_must_wait_gives_back_its_copy_and_nothing_leaks():
    sched = make_cached(num_blocks=6, max_running=4, prefill_chunk=64, segment=SEGMENT)  # 5 usable blocks
    first = submit_ids(sched, list(range(10, 24)))  # 4 blocks, still running
    run_prefill(sched, first)
    waiting = submit_ids(sched, list(range(10, 20)) + [7, 7, 7])  # 2 shared blocks, a copy, and a 4th block
    out = sched.schedule()
    assert [s.request_id for s in out.sequences] == [first.request_id] and not out.block_copies
    assert waiting in sched.waiting and sched.kv.block_ids(waiting.session.sequence_id) == []
    assert sched.kv.num_free == 1 and waiting.session.num_computed == 0
    finish(sched, first)
    assert sched.kv.num_free == sched.kv.num_usable
    out = sched.schedule()
    assert out.sequences[0].start == 10 and len(out.block_copies) == 1
    finish(sched, waiting)
    assert sched.kv.num_free == sched.kv.num_usable  # cached blocks count as free: nothing leaked


def test_a_copy_source_handed_out_again_is_never_a_stale_hit():
    sched = make_cached(num_blocks=5, max_running=4, prefill_chunk=64, segment=SEGMENT)  # 4 usable blocks
    first = submit_ids(sched, list(range(10, 24)))  # 4 blocks
    run_to_end(sched, first)
    filler = submit_ids(sched, list(range(100, 115)))  # needs every block: the cache is emptied
    run_prefill(sched, filler)
    finish(sched, filler)
    submit_ids(sched, list(range(10, 20)) + [7, 7, 7])
    out = sched.schedule()
    assert (out.sequences[0].start, out.block_copies) == (0, [])


def test_a_conversation_resent_whole_takes_even_what_lies_past_the_last_full_segment():
    sched = make_cached(max_running=4, prefill_chunk=64, segment=SEGMENT)
    first = submit_ids(sched, list(range(10, 23)))  # 13 tokens: 6 segments and one token
    run_prefill(sched, first)
    sched.register_tail(first.session)  # the engine does this at the end of every turn
    finish(sched, first)
    computed = first.session.token_ids[:13]
    other = submit_ids(sched, computed[:12] + [98, 7, 7])  # differs in that last token
    out = sched.schedule()
    assert (out.sequences[0].start, out.block_copies) == (12, [])
    finish(sched, other)
    again = submit_ids(sched, computed + [7, 7])
    out = sched.schedule()
    assert out.sequences[0].start == 13 and len(out.block_copies) == 1  # 3 blocks shared, 1 token copied
    finish(sched, again)
    assert sched.kv.num_free == sched.kv.num_usable
