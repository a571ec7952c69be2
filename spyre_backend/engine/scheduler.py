"""Decides what each engine step runs: at most one prefill chunk, and one decode batch.

Running requests decode together every step; a long prompt is prefilled a chunk per step in
between, so running streams keep flowing while it loads. Admission is first-come first-served
and bounded by free KV blocks: a request reserves blocks for its whole turn (history + prompt +
max_tokens) when admitted, so a running request never runs out. When blocks are short, idle
sessions are evicted oldest-first; if that is not enough the request waits in the queue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from spyre_backend.engine.kv_cache import PagedKVCache
from spyre_backend.engine.request import Request
from spyre_backend.engine.sessions import SessionTable


@dataclass
class StepPlan:
    prefill: Request | None = None
    prefill_tokens: int = 0
    decode: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(self, kv_cache: PagedKVCache, sessions: SessionTable, *, max_running: int, prefill_chunk: int):
        self.kv_cache = kv_cache
        self.sessions = sessions
        self.max_running = max_running
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @staticmethod
    def turn_tokens(request: Request) -> int:
        """KV positions the whole turn may use: history + new prompt + max_tokens."""
        return len(request.session.token_ids) + request.params.max_tokens

    def admit(self) -> list[Request]:
        """Move waiting requests into the running set while blocks and batch slots allow."""
        admitted = []
        while self.waiting and len(self.running) < self.max_running:
            request = self.waiting[0]
            session = request.session
            missing = self.kv_cache.blocks_needed(self.turn_tokens(request)) - len(session.block_table)
            if missing > self.kv_cache.num_free_blocks and not self.sessions.evict_for(missing):
                break  # FCFS: later requests wait behind this one
            self.waiting.popleft()
            self.kv_cache.ensure_capacity(session.block_table, self.turn_tokens(request))
            self.running.append(request)
            admitted.append(request)
        return admitted

    def plan(self) -> StepPlan:
        plan = StepPlan()
        for request in self.running:
            if request.prefill_embeds is None:
                plan.decode.append(request)
            elif plan.prefill is None:
                plan.prefill = request
                remaining = request.prefill_embeds.shape[0] - request.num_prefilled
                plan.prefill_tokens = min(remaining, self.prefill_chunk)
        return plan

    def remove(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
