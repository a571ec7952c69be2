"""Decides what each engine step computes, under a token budget. Pure bookkeeping: no tensors.

Every running request is a session with ``num_uncomputed`` tokens whose K/V are not in the cache
yet: a whole prompt (or a prompt left after a chunk), a session's new turn, or the one token
sampled last step. Each step the scheduler gives requests tokens, at most
``max_num_batched_tokens`` in all: first the running requests in the order they were admitted
(decode rows take one token; a prompt takes a chunk of at most ``prefill_chunk``, or in a step
that carries decode rows what they leave of ``mixed_chunk`` (``mixed_prompt_tokens``), and at most
``max_prefills`` prompts get a chunk per step), then waiting requests, first come first served.

KV blocks are taken as a sequence grows (``KVCacheManager.allocate``), never for tokens it has not
reached. When a running request needs a block and none is free, idle sessions are evicted (oldest
first); if that is not enough, the most recently admitted running request is preempted: its blocks
are freed, it goes back to the front of the queue, and when admitted again it recomputes its whole
sequence (prompt, images' features and the tokens it already produced) and goes on where it
stopped. A waiting request never preempts a running one; it waits.

With prefix caching (a ``SegmentHasher``), a request admitted with nothing computed (a new sequence,
or a preempted one coming back) first takes its longest cached prefix of full segments (the full
blocks in it shared, the segments past them copied into a block of its own: the step's
``block_copies``) and computes only the rest: at least its last token, whose logits it needs.
After each step the segments a step completed are registered under their hashes (``KVCacheManager``).

The engine core drives it as vLLM v1's does: ``schedule()`` returns a ``SchedulerOutput``, plain
data (request ids, token ranges, block ids) that the core turns into the model runner's inputs;
``update_from_output()`` then records what the runner computed and sampled. The scheduler writes its
queues and each request's scheduling counters; sessions are written through ``Turns``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from spyre_backend.config import SchedulerConfig
from spyre_backend.engine.kv_cache_manager import KVCacheManager
from spyre_backend.engine.request import Request
from spyre_backend.engine.sampler import Sample
from spyre_backend.engine.turns import Turns


@dataclass(frozen=True)
class ScheduledSequence:
    """One request's share of a step: compute tokens ``start .. start + num_tokens`` of its sequence."""

    request_id: int
    start: int
    num_tokens: int
    block_ids: tuple[int, ...]  # the sequence's blocks, covering start + num_tokens
    samples: bool  # the step reaches the sequence's end: the next token is sampled from its logits

    @property
    def is_prefill(self) -> bool:
        return self.num_tokens > 1


@dataclass
class SchedulerOutput:
    sequences: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)  # request ids sent back to the queue
    # (source, destination) KV blocks to copy before the step runs: cached segments a sequence took
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    evicted_sessions: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.sequences)

    @property
    def prefills(self) -> list[ScheduledSequence]:
        return [s for s in self.sequences if s.is_prefill]

    @property
    def decodes(self) -> list[ScheduledSequence]:
        return [s for s in self.sequences if not s.is_prefill]


UNMEASURED_MIXED_CHUNK = 256


def choose_mixed_chunk(time_chunk: Callable[[int], float], decode_s: float, slowdown: float, align: int,
                       block_size: int, prefill_chunk: int) -> int:
    """The most tokens a step may take beside decode rows (theirs included): the largest whose
    prompt step takes at most ``slowdown`` decode steps, by ``time_chunk(tokens)`` in seconds.
    Sizes are multiples of ``align`` up to a block, then whole blocks (``_tokens_for`` cuts a longer
    chunk to whole blocks), at most ``prefill_chunk``; the smallest at least, since a step that
    carries decode rows must still move the prompt on. They are tried from the smallest, and
    timing stops at the first too slow."""
    sizes = sorted({*range(align, block_size + 1, align), *range(block_size, prefill_chunk + 1, block_size)})
    sizes = [tokens for tokens in sizes if tokens <= prefill_chunk]
    chosen = sizes[0]
    for tokens in sizes:
        if time_chunk(tokens) > slowdown * decode_s:
            break
        chosen = tokens
    return chosen


def mixed_prompt_tokens(mixed_chunk: int, decode_rows: int, block_size: int) -> int:
    """Most prompt tokens in a step beside ``decode_rows`` decode rows. A CPU matmul reads its weight
    once per block of rows (oneDNN's bf16 kernel on AMX: 16; at 17 to 32 rows a 16384 x 2048 weight
    took 5.0-6.2 ms against 3.1-3.3 at 4 to 16), and a measured mixed_chunk is such a block
    (``choose_mixed_chunk``): so the prompt takes what the decode rows leave of it, and the step's
    rows stay within it. Where the rows would leave less than half, the prompt still gets a whole
    mixed_chunk, so that it moves on; and a mixed_chunk of more than a KV block is kept whole (the
    rows are a small share of it, and ``_tokens_for`` would cut what they leave to whole blocks)."""
    left = mixed_chunk - decode_rows
    return left if 2 * left >= mixed_chunk and mixed_chunk <= block_size else mixed_chunk


class Scheduler:
    def __init__(self, kv: KVCacheManager, turns: Turns, config: SchedulerConfig):
        self.kv = kv
        self.turns = turns
        self.config = config
        self.caches_prefixes = turns.hasher is not None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0
        self.prefix_queries = 0  # tokens of sequences looked up in the prefix cache, since start
        self.prefix_hits = 0  # of those, tokens found cached
        # most tokens in a step that carries decode rows, theirs included (mixed_prompt_tokens; 0:
        # no limit); -1 in the config is measured at warmup (choose_mixed_chunk), and until then the
        # size measured on the 2b shape before the bf16 decode kernel (docs/benchmarks.md, Mixed chunks)
        measured = config.mixed_prefill_chunk == -1
        self.mixed_chunk = min(UNMEASURED_MIXED_CHUNK, config.prefill_chunk) if measured else config.mixed_prefill_chunk

    def add(self, request: Request) -> None:
        """Queue a request whose turn has started (``Turns.start``: its session holds its prompt)."""
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def requests(self) -> list[Request]:
        """Every request the scheduler holds, running first."""
        return [*self.running, *self.waiting]

    # -- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.token_budget
        prefills = 0
        # a step with decode rows takes a smaller prompt chunk (mixed_prompt_tokens): their
        # streams wait for this step
        chunk = self.config.prefill_chunk
        decode_rows = sum(r.session.num_uncomputed == 1 for r in self.running)
        if self.mixed_chunk and decode_rows:
            chunk = min(chunk, mixed_prompt_tokens(self.mixed_chunk, decode_rows, self.kv.block_size))
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._tokens_for(request, budget, prefills, chunk)
            if n == 0:
                i += 1
                continue
            if not self._allocate_running(request, n, out):
                break  # the request itself was preempted, and with it everything after it
            out.sequences.append(self._scheduled(request, n))
            budget -= n
            prefills += n > 1
            i += 1
        # admit waiting requests, first come first served, unless this step had to preempt
        while (self.waiting and not out.preempted and budget > 0 and len(self.running) < self.config.max_running):
            request = self.waiting[0]
            session = request.session
            cached, copy = self._take_cached_prefix(request)  # None: not looked up
            n = self._tokens_for(request, budget, prefills, chunk)
            if n == 0 or not (self._evict_idle(self.kv.num_missing(session.sequence_id, session.num_computed + n), out)
                              and self.kv.allocate(session.sequence_id, session.num_computed + n)):
                if cached:  # give the blocks back while waiting (they stay cached): waiting holds nothing
                    self.kv.free(session.sequence_id)
                    self.turns.computed(session, 0)
                break  # FCFS: later requests wait behind this one
            if cached is not None:
                self.prefix_queries += len(session.token_ids)
                self.prefix_hits += cached
                if not request.sampled_any:
                    request.num_cached_tokens = cached
            if copy is not None:
                out.block_copies.append(copy)
            self.waiting.popleft()
            self.running.append(request)
            out.sequences.append(self._scheduled(request, n))
            budget -= n
            prefills += n > 1
        return out

    def update_from_output(self, out: SchedulerOutput, sampled: dict[int, Sample]) -> list[tuple[Request, Sample]]:
        """The model computed ``out`` (its tokens' K/V are in the cache now) and sampled a token for
        each request id in ``sampled``: the tokens join their sessions' histories. Returns the
        (request, sample) pairs, in step order, for the output processor."""
        running = {r.request_id: r for r in self.running}
        tokens = []
        for seq in out.sequences:
            request = running.get(seq.request_id)  # None: it ended while its step was being built
            if request is None:
                continue
            session = request.session
            self.turns.computed(session, seq.start + seq.num_tokens)
            if not request.sampled_any:
                request.num_prefill_tokens += seq.num_tokens
            size = self.kv.segment_size
            full = session.num_computed // size
            if self.caches_prefixes and full * size > seq.start:  # it filled a segment
                self.kv.register_segments(session.sequence_id, self.turns.segment_hashes(session, full))
            sample = sampled.get(seq.request_id)
            if sample is not None:
                self.turns.append(session, sample.token)
                tokens.append((request, sample))
        return tokens

    # -- helpers -----------------------------------------------------------------------------
    def _take_cached_prefix(self, request: Request) -> tuple[int | None, tuple[int, int] | None]:
        """A request with nothing computed takes its cached leading segments; returns their tokens
        (None where it has computed tokens already, or without prefix caching) and the block copy
        that gives it the last of them."""
        session = request.session
        if not self.caches_prefixes or session.num_computed or self.kv.block_ids(session.sequence_id):
            return None, None
        size = self.kv.segment_size
        usable = len(session.token_ids) - 1  # the last token is always computed
        tail = (lambda segment: self.turns.tail_candidates(session, segment, usable - segment * size)) \
            if self.turns.registers_tails else None
        cached, copy = self.kv.take_cached(session.sequence_id, self.turns.segment_hashes(session, usable // size),
                                           tail)
        self.turns.computed(session, cached)
        return cached, copy

    def _tokens_for(self, request: Request, budget: int, prefills: int, chunk: int) -> int:
        need = request.session.num_uncomputed
        if need <= 1:
            return need
        if prefills >= self.config.max_prefills:
            return 0
        n = min(need, chunk, budget)
        if n < need and n > self.kv.block_size:
            n -= n % self.kv.block_size  # a chunk that is not the last ends on a block boundary
        return n

    def _allocate_running(self, request: Request, n: int, out: SchedulerOutput) -> bool:
        """Blocks for ``n`` more tokens of a running request: evicting idle sessions, then
        preempting the most recently admitted requests. False if ``request`` itself was preempted."""
        session = request.session
        while not self.kv.allocate(session.sequence_id, session.num_computed + n):
            if self._evict_idle(self.kv.num_missing(session.sequence_id, session.num_computed + n), out):
                continue
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _evict_idle(self, blocks: int, out: SchedulerOutput) -> bool:
        """Evict idle sessions, oldest first, until ``blocks`` are free; True if they are."""
        if blocks <= self.kv.num_free:
            return True
        before = len(self.turns)
        enough = self.turns.evict_for(blocks)
        out.evicted_sessions += before - len(self.turns)
        return enough

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.session.sequence_id)
        self.turns.computed(request.session, 0)
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _scheduled(self, request: Request, n: int) -> ScheduledSequence:
        session = request.session
        start = session.num_computed
        return ScheduledSequence(request.request_id, start, n, tuple(self.kv.block_ids(session.sequence_id)),
                                 samples=start + n == len(session.token_ids))
