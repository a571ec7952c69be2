"""Prefix caching in the scheduler and the KV cache manager alone: no model, no tensors on a device
(``tests/scheduler_driver.py`` drives them as the engine core does)."""

from __future__ import annotations

from spyre_backend.engine.kv_cache_manager import KVCacheManager
from tests.scheduler_driver import BLOCK, finish, image_prompt, make_cached, run_prefill, run_to_end, step, submit_ids


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
    finish(sched, first)  # the end of every turn registers its tail
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
