"""KV cache bookkeeping: which blocks of the device pool belong to whom. No tensors here.

The pool on the device (``kv_cache.KVPool``) is ``num_blocks`` blocks of ``block_size`` token slots
per layer. This module only hands out block ids: a ``BlockPool`` of reference-counted blocks, and a
``KVCacheManager`` that keeps one block list per owner (a sequence: its session key) and grows it
as the sequence grows, a block at a time, never for tokens it may never produce.

Block 0 (``NULL_BLOCK``) is never handed out: padded positions of static-shape steps write there.
"""

from __future__ import annotations

from collections import deque
from typing import Hashable

NULL_BLOCK = 0


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    """Reference-counted block ids; a block returns to the free queue when its count drops to 0.

    Freed blocks go to the tail and are taken from the head, so the least recently freed block is
    reused first (what a prefix cache keyed on block contents needs to keep hot blocks longest).
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least 2 blocks (one is reserved for padding)")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    def refs(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} is not allocated")
            self._refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} released more often than taken")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[Hashable, list[int]] = {}

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
        """Release every block of ``owner``; returns how many it held."""
        table = self._tables.pop(owner, [])
        self.pool.release(table)
        return len(table)
