"""KV cache bookkeeping: which blocks of the device pool belong to whom. No tensors here.

The pool on the device (``kv_cache.KVPool``) is ``num_blocks`` blocks of ``block_size`` token slots
per layer. This module only hands out block ids: a ``BlockPool`` of reference-counted blocks, and a
``KVCacheManager`` that keeps one block list per owner (a sequence: its session key) and grows it
as the sequence grows, a block at a time, never for tokens it may never produce.

Prefix caching: a block is registered segment by segment (``segment_size`` tokens; the whole
block on Spyre), each under its content hash once its K/V are computed (``engine/prefix_cache.py``
chains it from the parent segment's hash, the segment's token ids and the image features at its
placeholder positions). A registered block keeps its hashes after its owners release it: it sits in
the free queue, still holding its K/V, until it is handed out again (least recently freed first).
A new sequence whose leading segments hash the same takes the full blocks among them (shared, by
reference count) instead of computing them, and gets the leading segments of the block after them
as a copy: a fresh block of its own into which the model runner copies the cached one before the
step runs (``take_cached``). Off Spyre the tokens a turn computed past its last full segment are
registered too at its end (``register_tail``). Cached tokens are never written: a sequence writes
only past what it computed (its own block may hold registered segments before that), and a new
one only past its cached prefix, into blocks of its own.

Block 0 (``NULL_BLOCK``) is never handed out: padded positions of static-shape steps write there.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

NULL_BLOCK = 0


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    """Reference-counted block ids; a block returns to the free queue when its count drops to 0.

    Freed blocks go to the tail and are taken from the head, so the least recently freed block is
    reused first: a freed block that is registered in the prefix cache stays there, hit-able, for
    as long as possible, and loses its hash only when it is handed out again.
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least 2 blocks (one is reserved for padding)")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self._refs = [0] * num_blocks
        self._cached: dict[bytes, int] = {}  # segment content hash -> a block holding that prefix
        self._hashes_of: dict[int, list[bytes]] = {}  # block -> the hashes registered on it

    @property
    def num_free(self) -> int:
        """Blocks no sequence holds, cached ones included (they are handed out when needed)."""
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache, held or free."""
        return len(self._hashes_of)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.popitem(last=False)[0] for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
            for digest in self._hashes_of.pop(b, ()):  # its K/V are about to be overwritten
                del self._cached[digest]
        return blocks

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} released more often than taken")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free[b] = None

    # -- prefix cache ------------------------------------------------------------------------
    def register(self, block: int, digest: bytes) -> None:
        """``block`` (held, its K/V computed up to the segment ``digest`` names) holds that content.
        Content already cached in some block is left where it is."""
        if self._refs[block] <= 0:
            raise ValueError(f"block {block} is not allocated")
        if digest not in self._cached:
            self._cached[digest] = block
            self._hashes_of.setdefault(block, []).append(digest)

    def lookup(self, digest: bytes) -> int | None:
        """A block (held or free) whose leading segments hold the content ``digest`` names."""
        return self._cached.get(digest)

    def take(self, blocks: list[int]) -> None:
        """Take a reference to blocks, held or free (a free one must still be cached: it leaves
        the free queue)."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, segment_size: int = 0):
        """``segment_size``: the prefix cache's unit, dividing ``block_size`` (0: the block)."""
        self.block_size = block_size
        self.segment_size = segment_size or block_size
        if block_size % self.segment_size:
            raise ValueError(f"segment_size {segment_size} must divide block_size {block_size}")
        self.pool = BlockPool(num_blocks)
        self._tables: dict[Hashable, list[int]] = {}
        self._registered: dict[Hashable, int] = {}  # leading segments of each owner registered already

    @property
    def num_blocks(self) -> int:
        """All blocks, the padding block included."""
        return self.pool.num_blocks

    @property
    def num_usable(self) -> int:
        return self.pool.num_usable

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ids(self, owner: Hashable) -> list[int]:
        return self._tables.get(owner, [])

    def num_missing(self, owner: Hashable, num_tokens: int) -> int:
        """Blocks ``owner`` still needs to hold ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self.block_ids(owner)))

    def allocate(self, owner: Hashable, num_tokens: int) -> bool:
        """Grow ``owner``'s blocks to cover ``num_tokens`` tokens; False (nothing taken) if too few are free."""
        missing = self.num_missing(owner, num_tokens)
        if missing > self.pool.num_free:
            return False
        if missing:
            self._tables.setdefault(owner, []).extend(self.pool.allocate(missing))
        return True

    def free(self, owner: Hashable) -> int:
        """Release every block of ``owner``; returns how many it held. The last blocks go first into
        the free queue, so they are reused before a prefix that later sequences may share."""
        table = self._tables.pop(owner, [])
        self._registered.pop(owner, None)
        self.pool.release(table[::-1])
        return len(table)

    def truncate(self, owner: Hashable, num_tokens: int) -> int:
        """Keep only ``owner``'s blocks that lie wholly within its first ``num_tokens`` tokens
        (a turn that ended early: the blocks past them may be registered, or shared, and must not
        be written again); returns the tokens they hold."""
        table = self._tables.get(owner, [])
        keep = min(len(table), num_tokens // self.block_size)
        self.pool.release(table[keep:][::-1])
        del table[keep:]
        if owner in self._registered:
            self._registered[owner] = min(self._registered[owner], keep * (self.block_size // self.segment_size))
        return keep * self.block_size

    # -- prefix cache ------------------------------------------------------------------------
    @property
    def num_cached(self) -> int:
        return self.pool.num_cached

    def take_cached(self, owner: Hashable, digests: list[bytes], tail=None) -> tuple[int, tuple[int, int] | None]:
        """Give ``owner`` (holding no blocks yet) the longest cached prefix of its segment hashes
        ``digests``: the full blocks in it, shared, and what lies past them (whole segments, then
        with ``tail`` some tokens of the next segment) as a copy into a new block. ``tail(n)``: the
        (tokens, hash) candidates of a part of segment ``n``, longest first (``register_tail``).
        Returns the tokens taken and that copy, (source block, new block), or None; the copy must
        run before the owner's next step, and before anything is written into the source."""
        if self._tables.get(owner):
            raise ValueError(f"{owner!r} holds blocks already")
        per_block, size = self.block_size // self.segment_size, self.segment_size
        blocks: list[int] = []
        for last in range(per_block - 1, len(digests), per_block):
            block = self.pool.lookup(digests[last])
            if block is None:
                break
            blocks.append(block)
        self.pool.take(blocks)
        base = len(blocks) * per_block
        found = None  # (the block to copy, the tokens it holds past the shared blocks)
        for segments in range(min(per_block - 1, len(digests) - base), 0, -1):
            source = self.pool.lookup(digests[base + segments - 1])
            if source is not None:
                found = (source, segments * size)
                break
        if tail is not None:
            # a cached part of the next segment lies in a block holding every segment before it
            after = base + (found[1] // size if found else 0)
            for tokens, digest in tail(after):
                source = self.pool.lookup(digest)
                if source is not None:
                    found = (source, (after - base) * size + tokens)
                    break
        copy, extra = None, 0
        if found is not None:
            source = found[0]
            self.pool.take([source])  # held, so that the new block is not the source itself
            if self.pool.num_free:
                copy, extra = (source, self.pool.allocate(1)[0]), found[1]
                blocks.append(copy[1])
            self.pool.release([source])  # back to the free queue's tail if nobody else holds it
        if blocks:
            self._tables[owner] = blocks
            self._registered[owner] = base + extra // size
        return base * size + extra, copy

    def register_tail(self, owner: Hashable, segment: int, digest: bytes) -> None:
        """``digest`` names the computed first tokens of ``owner``'s segment ``segment``, the last
        it has begun: a later sequence can take them (``take_cached``'s ``tail``). They never
        change: a sequence writes only past what it computed."""
        table = self._tables.get(owner, [])
        block = segment // (self.block_size // self.segment_size)
        if block < len(table):
            self.pool.register(table[block], digest)

    def register_segments(self, owner: Hashable, digests: list[bytes]) -> None:
        """``digests`` name ``owner``'s leading segments, all full and computed: register those not
        registered yet, each on the block it lies in."""
        table = self._tables.get(owner, [])
        per_block = self.block_size // self.segment_size
        done = self._registered.get(owner, 0)
        end = min(len(digests), len(table) * per_block)
        for i in range(done, end):
            self.pool.register(table[i // per_block], digests[i])
        self._registered[owner] = max(done, end)
