"""Sessions and their turns: the token history and KV blocks kept for a sequence id between turns.
This module is the only writer of ``Session`` records.

Every sequence the engine runs is a session, one-off requests included (they open and close one);
the KV cache manager's blocks are owned by the session's sequence id.

A turn with START opens (or restarts) a session; later turns of the same id prefill only their
new tokens on top of the kept KV, so images of earlier turns are never encoded again. Turns of one
sequence run one at a time, in arrival order (the others wait in a queue here). END frees the
session after its turn. Idle sessions are freed after a TTL, and evicted oldest-first when KV
blocks run short; a later turn of a freed session gets an error asking the client to resend the
conversation with START (the images are gone, so it cannot be recomputed here).

Who tells this module what happened: the engine core starts and ends turns (``start``, ``end``)
and hands over sampled tokens (``append``); the scheduler reports what the model computed
(``computed``) and asks for the history's segment hashes (prefix caching, ``segment_hashes``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from spyre_backend.engine.kv_cache_manager import KVCacheManager
from spyre_backend.engine.prefix_cache import SegmentHasher, chain_root
from spyre_backend.errors import SESSION_LOST

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
    hash_root: bytes = chain_root()  # its tenant's (the cache_salt of the turn that opened it)
    last_active: float = field(default_factory=time.monotonic)
    active: "Request | None" = None  # the turn now running (turns of one session never overlap)
    stop_requested: bool = False  # a stop request asked the running turn to end
    end_requested: bool = False  # close the session when the running turn ends

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
            self.image_features = [torch.cat(self.image_features)]  # the same rows, joined once
        return self.image_features[0]


class Turns:
    def __init__(self, kv: KVCacheManager, *, image_token_id: int, ttl_s: float, max_sessions: int,
                 max_context: int, hasher: SegmentHasher | None = None):
        """``hasher``: None without prefix caching."""
        self.kv = kv
        self.image_token_id = image_token_id
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.max_context = max_context
        self.hasher = hasher
        # tails (a turn's tokens past its last full segment) are registered where a prefill may
        # start anywhere: not on Spyre, whose prefix unit is the whole block its programs start on
        self.registers_tails = hasher is not None and kv.segment_size < kv.block_size
        self._sessions: dict[int | str, Session] = {}
        self._queued: dict[int | str, deque[Request]] = {}  # turns waiting for their sequence's running one
        self.evicted: dict[int | str, None] = {}  # ids whose state was dropped, for a clear error

    # -- lookups ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, sequence_id) -> Session | None:
        return self._sessions.get(sequence_id)

    def kept(self) -> int:
        """Sessions held between turns (not one-off sequences)."""
        return sum(1 for s in self._sessions.values()
                   if not (s.active is not None and (s.active.sequence_end or s.end_requested)))

    def idle(self) -> list[Session]:
        return sorted((s for s in self._sessions.values() if not s.busy), key=lambda s: s.last_active)

    # -- the turn lifecycle -----------------------------------------------------------------
    def arrive(self, request: Request) -> bool:
        """A new turn: True if it may start now, False if it was queued behind its sequence's
        running turn (``next_queued`` hands it out when that one ends)."""
        sid = request.sequence_id
        session = self._sessions.get(sid)
        if (session is not None and session.busy) or sid in self._queued:
            self._queued.setdefault(sid, deque()).append(request)
            return False
        return True

    def next_queued(self, sequence_id) -> Request | None:
        queue_ = self._queued.get(sequence_id)
        if not queue_:
            return None
        request = queue_.popleft()
        if not queue_:
            del self._queued[sequence_id]
        return request

    def start(self, request: Request, fits_pool) -> str | None:
        """Make ``request`` its session's running turn: its prompt and image features join the
        history. Returns why it cannot (the request then holds nothing), else None.
        ``fits_pool(num_tokens)``: why a sequence of that many tokens can never fit the KV pool, or None."""
        sid = request.sequence_id
        if request.sequence_start:
            if (not request.sequence_end and sid not in self._sessions
                    and self.kept() >= self.max_sessions and not self._evict_oldest_idle()):
                return (f"{self.kept()} sessions are open, the limit max_sessions={self.max_sessions}; "
                        "end one (END) and retry")
            session = self._open(sid)
            session.hash_root = chain_root(request.cache_salt)
        else:
            session = self._sessions.get(sid)
            if session is None:
                why = ("was evicted or expired" if sid in self.evicted
                       else "is not open on this server (it ended, or was lost in a restart)")
                return (f"{SESSION_LOST} sequence {sid} {why}; resend the whole conversation "
                        "with START (sequence_start)")
        history = len(session.token_ids)
        total = history + request.num_prompt_tokens + request.params.max_tokens
        problem = None
        if total > self.max_context:
            problem = (f"the conversation ({history} tokens so far) + prompt ({request.num_prompt_tokens}) "
                       f"+ max_tokens ({request.params.max_tokens}) exceeds the maximum context length "
                       f"{self.max_context}")
        else:
            problem = fits_pool(total)
        if problem:
            if request.sequence_end:
                self.close(session)
            return problem
        session.active = request
        session.stop_requested = session.end_requested = False
        session.token_ids.extend(request.prompt_ids.tolist())
        if request.image_features is not None:
            session.image_features.append(request.image_features)  # on the host, for recompute
        request.session = session
        return None

    def end(self, request: Request, *, completed: bool, broken: bool) -> None:
        """The running turn of ``request``'s session ended. ``completed``: some of it was computed
        (else its prompt and images leave the history again); ``broken``: the session cannot go
        on (a failure, or a prompt stopped half-way) and is closed."""
        session = request.session
        session.active = None
        session.last_active = time.monotonic()
        if not completed:
            self._forget_prompt(session, request)
        self._register_tail(session)  # before its blocks are freed: they stay cached
        if request.sequence_end or session.end_requested or broken:
            self.close(session)

    def stop(self, sequence_id, end: bool) -> tuple[str | None, list[Request]]:
        """A stop request: the running turn ends at the next step, queued turns are dropped (returned).
        Returns the error (no such session) and the dropped turns."""
        session = self._sessions.get(sequence_id)
        if session is None:
            return f"sequence {sequence_id} has no open session or running request", []
        dropped = list(self._queued.pop(sequence_id, ()))
        if session.busy:
            session.stop_requested = True
            session.end_requested |= end
        elif end:
            self.close(session)
        return None, dropped

    # -- what the model computed and sampled --------------------------------------------------
    def computed(self, session: Session, num_computed: int) -> None:
        """The first ``num_computed`` tokens' K/V are in the cache (0 after a preemption)."""
        session.num_computed = num_computed

    def append(self, session: Session, token: int) -> None:
        session.token_ids.append(token)

    # -- prefix-cache hashes of the history ----------------------------------------------------
    def segment_hashes(self, session: Session, num_segments: int) -> list[bytes]:
        """The hashes of the session's first ``num_segments`` segments (all full in its history)."""
        known = session.segment_hashes
        if len(known) < num_segments:
            known += self.hasher.more(session.token_ids, session.features(), known, num_segments, session.hash_root)
        return known[:num_segments]

    def tail_candidates(self, session: Session, segment: int, max_length: int) -> list[tuple[int, bytes]]:
        parent = self.segment_hashes(session, segment)[-1] if segment else session.hash_root
        return self.hasher.tail_candidates(session.token_ids, session.features(), parent, segment, max_length)

    def _register_tail(self, session: Session) -> None:
        """Register what the session computed past its last full segment."""
        segment, length = divmod(session.num_computed, self.kv.segment_size)
        if self.registers_tails and length:
            digest = self.tail_candidates(session, segment, length)[0][1]
            self.kv.register_tail(session.sequence_id, segment, digest)

    # -- eviction --------------------------------------------------------------------------
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

    # -- internals -------------------------------------------------------------------------
    def _open(self, sequence_id) -> Session:
        """A fresh session (START): any earlier state of that id is dropped."""
        old = self._sessions.pop(sequence_id, None)
        if old is not None:
            self.kv.free(old.sequence_id)
        self.evicted.pop(sequence_id, None)
        session = Session(sequence_id)
        self._sessions[sequence_id] = session
        return session

    def close(self, session: Session) -> None:
        self.kv.free(session.sequence_id)
        self._sessions.pop(session.sequence_id, None)

    def _forget_prompt(self, session: Session, request: Request) -> None:
        """A turn never prefilled: its prompt (and its images) leave the history, which stays as
        before the turn."""
        keep = len(session.token_ids) - request.num_prompt_tokens
        images = session.token_ids[keep:].count(self.image_token_id)
        del session.token_ids[keep:]
        if images:
            kept = session.features()
            session.image_features = [kept[: kept.shape[0] - images]] if kept.shape[0] > images else []
        # blocks past the kept history may be cached or shared now: drop them, never write them
        session.num_computed = self.kv.truncate(session.sequence_id, min(session.num_computed, keep))
        del session.segment_hashes[keep // self.kv.segment_size:]

    def _evict_oldest_idle(self) -> bool:
        idle = self.idle()
        if idle:
            self._evict(idle[0])
        return bool(idle)

    def _evict(self, session: Session) -> None:
        self.close(session)
        self.evicted[session.sequence_id] = None
        if len(self.evicted) > MAX_REMEMBERED_EVICTIONS:  # remember recent ones only
            del self.evicted[next(iter(self.evicted))]
