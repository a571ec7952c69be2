"""The scheduler and the KV cache manager alone: no model, no tensors on a device
(``tests/scheduler_driver.py`` drives them as the engine core does)."""

from __future__ import annotations

import pytest

from spyre_backend.engine.kv_cache_manager import NULL_BLOCK, BlockPool, KVCacheManager
from tests.scheduler_driver import BLOCK, finish, make, step, submit, tokens


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
    assert len(sched.turns) == 1 and sched.kv.num_free == 2
    a = submit(sched, 8)
    step(sched)
    out = step(sched)  # a needs a third block: the idle session goes, nobody is preempted
    assert not out.preempted and out.evicted_sessions == 1 and sched.turns.get("kept") is None
    assert "kept" in sched.turns.evicted and tokens(out) == {a.request_id: 1}


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


def test_a_step_with_decode_rows_takes_what_they_leave_of_the_mixed_chunk():
    sched = make(max_running=8, prefill_chunk=32, mixed_prefill_chunk=BLOCK)
    long = submit(sched, 40)
    assert tokens(step(sched)) == {long.request_id: 32}  # alone: the whole chunk
    step(sched)  # long's last 8 tokens
    a = submit(sched, 2)
    assert tokens(step(sched)) == {long.request_id: 1, a.request_id: 2}  # a's prompt fits what long leaves
    other = submit(sched, 40)
    out = step(sched)  # long and a decode now: other's prompt goes in pieces of 4 - 2, 4 tokens a step
    assert tokens(out) == {long.request_id: 1, a.request_id: 1, other.request_id: 2}
    assert out.num_tokens == BLOCK
    finish(sched, long)
    finish(sched, a)
    assert tokens(step(sched)) == {other.request_id: 32}  # alone again: the whole chunk


def test_decode_rows_leave_the_prompt_at_least_half_of_the_mixed_chunk_or_all_of_it():
    from spyre_backend.engine.scheduler import mixed_prompt_tokens

    assert [mixed_prompt_tokens(16, rows, 64) for rows in (1, 3, 8)] == [15, 13, 8]  # the step's rows: 16
    assert [mixed_prompt_tokens(16, rows, 64) for rows in (9, 16, 40)] == [16, 16, 16]  # the prompt moves on
    assert mixed_prompt_tokens(128, 3, 64) == 128  # more than a block: whole (cut to 64 otherwise)


def test_the_mixed_chunk_is_validated():
    from spyre_backend.config import ConfigError, ServingConfig

    assert ServingConfig.from_strings({"mixed_prefill_chunk": "1024"}).scheduler.mixed_prefill_chunk == 1024  # at most
    for bad in ({"mixed_prefill_chunk": "-64"}, {"mixed_prefill_chunk": "100"}):
        with pytest.raises(ConfigError, match="mixed_prefill_chunk"):
            ServingConfig.from_strings(bad)


def test_the_mixed_chunk_is_the_largest_whose_step_fits_the_slowdown():
    from spyre_backend.engine.scheduler import choose_mixed_chunk

    timed = []

    def time_chunk(tokens):  # a decode step costs 0.1 s; each prompt token 1 ms more
        timed.append(tokens)
        return 0.1 + tokens * 1e-3

    # below a block, multiples of the alignment; from a block on, whole blocks
    assert choose_mixed_chunk(time_chunk, 0.1, 2.0, 16, 64, 512) == 64  # 128 (0.228 s) would not fit 0.2
    assert timed == [16, 32, 48, 64, 128]  # stops at the first size too slow
    assert choose_mixed_chunk(time_chunk, 0.1, 5.0, 16, 64, 512) == 384  # 0.484 s; 448 would not fit
    assert choose_mixed_chunk(time_chunk, 0.1, 1.3, 16, 64, 512) == 16  # 0.116; 32 (0.132) would not
    assert choose_mixed_chunk(time_chunk, 0.1, 100.0, 16, 64, 64) == 64  # never past prefill_chunk
    assert choose_mixed_chunk(time_chunk, 0.1, 1.0, 16, 64, 512) == 16  # the smallest at least


def test_a_measured_mixed_chunk_starts_at_256_and_a_set_one_is_kept():
    from spyre_backend.config import ConfigError, ServingConfig
    from spyre_backend.engine.scheduler import UNMEASURED_MIXED_CHUNK

    assert ServingConfig.from_strings({}).scheduler.mixed_prefill_chunk == -1  # the default: measured
    assert make(prefill_chunk=512).mixed_chunk == UNMEASURED_MIXED_CHUNK
    assert make(prefill_chunk=64).mixed_chunk == 64
    assert make(prefill_chunk=512, mixed_prefill_chunk=0).mixed_chunk == 0
    with pytest.raises(ConfigError, match="mixed_step_slowdown"):
        ServingConfig.from_strings({"mixed_step_slowdown": "0.5"})
