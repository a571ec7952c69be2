"""Sessions and their turns alone (``engine/turns.py``): no model, no scheduler."""

from __future__ import annotations

import torch

from spyre_backend.engine.kv_cache_manager import KVCacheManager
from spyre_backend.engine.request import Request
from spyre_backend.engine.sampling_params import SamplingParams
from spyre_backend.engine.turns import Turns
from spyre_backend.errors import SESSION_LOST

IMAGE = 99


def make(**limits) -> Turns:
    kv = KVCacheManager(16, 4)
    return Turns(kv, image_token_id=IMAGE, **{"ttl_s": 600, "max_sessions": 4, "max_context": 64, **limits})


def turn(sequence_id, ids, *, start=True, end=False, features=None, max_tokens=4) -> Request:
    return Request(torch.tensor(ids), features, SamplingParams(max_tokens=max_tokens), lambda out: None,
                   sequence_id=sequence_id, sequence_start=start, sequence_end=end)


def fits(num_tokens):
    return None


def test_turns_of_one_sequence_run_one_at_a_time_in_arrival_order():
    turns = make()
    first, second, third = turn(1, [1, 2]), turn(1, [3], start=False), turn(1, [4], start=False)
    assert turns.arrive(first) and turns.start(first, fits) is None
    assert not turns.arrive(second) and not turns.arrive(third)  # queued behind the running turn
    turns.end(first, completed=True, broken=False)
    assert turns.next_queued(1) is second and turns.start(second, fits) is None
    assert turns.get(1).token_ids == [1, 2, 3]
    assert turns.next_queued(1) is third and turns.next_queued(1) is None


def test_a_turn_never_computed_leaves_the_history_as_it_was():
    turns = make()
    first = turn(1, [1, IMAGE, 2], features=torch.ones(1, 8))
    turns.start(first, fits)
    turns.computed(first.session, 3)
    turns.append(first.session, 5)
    turns.end(first, completed=True, broken=False)
    second = turn(1, [IMAGE, IMAGE, 6], start=False, features=torch.zeros(2, 8))
    turns.start(second, fits)
    assert turns.get(1).features().shape[0] == 3
    turns.end(second, completed=False, broken=False)  # cancelled before any of it was computed
    session = turns.get(1)
    assert session.token_ids == [1, IMAGE, 2, 5] and session.features().shape[0] == 1
    assert not session.busy


def test_a_broken_turn_closes_its_session_and_a_later_turn_is_told_it_is_lost():
    turns = make()
    first = turn(1, [1, 2])
    turns.start(first, fits)
    turns.end(first, completed=True, broken=True)
    assert turns.get(1) is None
    error = turns.start(turn(1, [3], start=False), fits)
    assert error.startswith(SESSION_LOST) and "not open" in error


def test_a_stop_flags_the_running_turn_and_drops_the_queued_ones():
    turns = make()
    running, queued = turn(1, [1, 2]), turn(1, [3], start=False)
    turns.start(running, fits)
    turns.arrive(queued)
    error, dropped = turns.stop(1, end=True)
    assert error is None and dropped == [queued]
    assert running.session.stop_requested and running.session.end_requested
    turns.end(running, completed=True, broken=False)
    assert turns.get(1) is None  # END with the stop: closed after its turn
    assert "no open session" in turns.stop(1, end=False)[0]


def test_limits_name_themselves():
    turns = make(max_sessions=1, max_context=8)
    kept = turn(1, [1], end=False)
    turns.start(kept, fits)
    turns.end(kept, completed=True, broken=False)
    busy = turn(2, [1], end=False)
    turns.start(busy, fits)  # the idle session 1 is evicted to make room
    assert turns.get(1) is None and 1 in turns.evicted
    assert "max_sessions=1" in turns.start(turn(3, [1], end=False), fits)
    assert "maximum context length 8" in turns.start(turn(4, [1, 2, 3, 4, 5], end=True, max_tokens=4), fits)
    assert turns.start(turn(5, [1], end=True), lambda n: f"{n} tokens never fit") == "5 tokens never fit"
    assert turns.get(4) is None and turns.get(5) is None  # refused one-offs hold nothing
    assert "evicted" in turns.start(turn(1, [1], start=False), fits)
