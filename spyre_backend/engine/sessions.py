"""Sessions: the KV blocks and token history kept for a sequence id between its turns.

A turn with START opens (or restarts) a session; later turns of the same id prefill only their
new tokens on top of the kept KV, so images of earlier turns are never encoded again. END frees
the session after its turn. Idle sessions are freed after a TTL, and evicted oldest-first when
KV blocks run short; a later turn of a freed session gets an error asking the client to resend
the conversation with START (the images are gone, so it cannot be recomputed here).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spyre_backend.engine.kv_cache import PagedKVCache

if TYPE_CHECKING:
    from spyre_backend.engine.request import Request

MAX_REMEMBERED_EVICTIONS = 10_000


@dataclass
class Session:
    sequence_id: int | str
    block_table: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # history; the last one may lack KV yet
    num_computed: int = 0  # tokens whose K/V are in the cache
    last_active: float = field(default_factory=time.monotonic)
    active: "Request | None" = None  # the turn now running (turns of one session never overlap)

    @property
    def busy(self) -> bool:
        return self.active is not None


class SessionTable:
    def __init__(self, kv_cache: PagedKVCache, ttl_s: float):
        self.kv_cache = kv_cache
        self.ttl_s = ttl_s
        self.sessions: dict[int | str, Session] = {}
        self.evicted: dict[int | str, None] = {}  # ids whose state was dropped, for a clear error

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, sequence_id) -> Session | None:
        return self.sessions.get(sequence_id)

    def open(self, sequence_id) -> Session:
        """A fresh session (START): any earlier state of that id is dropped."""
        old = self.sessions.pop(sequence_id, None)
        if old is not None:
            self.kv_cache.free(old.block_table)
        self.evicted.pop(sequence_id, None)
        session = Session(sequence_id)
        self.sessions[sequence_id] = session
        return session

    def close(self, session: Session) -> None:
        self.kv_cache.free(session.block_table)
        self.sessions.pop(session.sequence_id, None)

    def kept(self) -> int:
        """Sessions held between turns (not one-off sequences)."""
        return sum(1 for s in self.sessions.values() if not (s.active is not None and s.active.sequence_end))

    def evict_oldest_idle(self) -> bool:
        idle = self.idle()
        if idle:
            self._evict(idle[0])
        return bool(idle)

    def idle(self) -> list[Session]:
        return sorted((s for s in self.sessions.values() if not s.busy),
                      key=lambda s: s.last_active)

    def expire(self, now: float) -> int:
        expired = [s for s in self.idle() if now - s.last_active > self.ttl_s]
        for s in expired:
            self._evict(s)
        return len(expired)

    def evict_for(self, blocks_needed: int) -> bool:
        """Free idle sessions, oldest first, until ``blocks_needed`` blocks are free."""
        for session in self.idle():
            if self.kv_cache.num_free_blocks >= blocks_needed:
                break
            self._evict(session)
        return self.kv_cache.num_free_blocks >= blocks_needed

    def _evict(self, session: Session) -> None:
        self.close(session)
        self.evicted[session.sequence_id] = None
        if len(self.evicted) > MAX_REMEMBERED_EVICTIONS:  # remember recent ones only
            del self.evicted[next(iter(self.evicted))]
