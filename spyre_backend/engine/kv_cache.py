"""KV cache in fixed-size blocks, preallocated once on the device.

Every layer owns one key pool and one value pool of shape
``[num_blocks, block_size, kv_heads, head_dim]``. A sequence holds a list of block ids (its block
table); token ``t`` of the sequence lives in block ``table[t // block_size]`` at offset
``t % block_size``. Block 0 is never handed out: padded positions of static-shape batches write
there, so padding can never touch a live sequence.
"""

from __future__ import annotations

from collections import deque

import torch

NULL_BLOCK = 0


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (one is reserved for padding)")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


class PagedKVCache:
    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ensure_capacity(self, block_table: list[int], num_tokens: int) -> None:
        """Grow a block table in place so it covers ``num_tokens`` tokens."""
        missing = self.blocks_needed(num_tokens) - len(block_table)
        if missing > 0:
            block_table.extend(self.allocator.allocate(missing))

    def free(self, block_table: list[int]) -> None:
        self.allocator.free(block_table)
        block_table.clear()
