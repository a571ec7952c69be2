"""First-come first-served admission into a running decode batch, bounded by free KV blocks."""

from __future__ import annotations

from collections import deque

from spyre_backend.engine.kv_cache import PagedKVCache
from spyre_backend.engine.request import Request


class Scheduler:
    def __init__(self, kv_cache: PagedKVCache, max_running: int):
        self.kv_cache = kv_cache
        self.max_running = max_running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def next_prefill(self) -> Request | None:
        """The oldest waiting request, with blocks for its prompt, if it can start now."""
        if not self.waiting or len(self.running) >= self.max_running:
            return None
        request = self.waiting[0]
        # Blocks for the whole request (prompt + max_tokens) are reserved up front, as static
        # Spyre programs want: a running request can then never run out of KV space.
        needed = self.kv_cache.blocks_needed(request.max_total_tokens)
        if needed > self.kv_cache.num_free_blocks:
            return None  # admission waits for blocks to be freed
        self.waiting.popleft()
        self.kv_cache.ensure_capacity(request.block_table, request.max_total_tokens)
        self.running.append(request)
        return request

    def finish(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request.block_table)
