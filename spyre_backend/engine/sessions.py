"""Sessions: the KV blocks and token history kept for a sequence id between its turns.

Every sequence the engine runs is a session, one-off requests included (they open and close one);
the KV cache manager's blocks are owned by the session's sequence id.

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

import torch

from spyre_backend.engine.kv_cache_manager import KVCacheManager

if TYPE_CHECKING:
    from spyre_backend.engine.request import Request

MAX_REMEMBERED_EVICTIONS = 10_000


@dataclass
class Session:
    sequence_id: int | str
    token_ids: list[int] = field(default_factory=list)  # history; the last one may lack KV yet
    num_computed: int = 0  # tokens whose K/V are in the cache
    # image features of the history's placeholders, in order, kept on the host for as long as the
    # session lives: a preempted turn recomputes its whole history (images are never re-encoded)
    image_features: list[torch.Tensor] = field(default_factory=list)
    segment_hashes: list[bytes] = field(default_factory=list)  # of the history's full segments (prefix_cache.py)
    last_active: float = field(default_factory=time.monotonic)
    active: "Request | None" = None  # the turn now running (turns of one session never overlap)

    @property
    def busy(self) -> bool:
        return self.active is not None

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    def features(self) -> torch.Tensor | None:
        """All image features of the history as one [n, hidden] tensor (None without images)."""
        if not self.image_features:
            return None
        if len(self.image_features) > 1:
            self.image_features = [torch.cat(self.image_features)]
        return self.image_features[0]


class SessionTable:
    def __init__(self, kv: KVCacheManager, ttl_s: float):
        self.kv = kv
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
            self.kv.free(old.sequence_id)
        self.evicted.pop(sequence_id, None)
        session = Session(sequence_id)
        self.sessions[sequence_id] = session
        return session

    def close(self, session: Session) -> None:
        self.kv.free(session.sequence_id)
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
            if self.kv.num_free >= blocks_needed:
                break
            self._evict(session)
        return self.kv.num_free >= blocks_needed

    def _evict(self, session: Session) -> None:
        self.close(session)
        self.evicted[session.sequence_id] = None
        if len(self.evicted) > MAX_REMEMBERED_EVICTIONS:  # remember recent ones only
            del self.evicted[next(iter(self.evicted))]
